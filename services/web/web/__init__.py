"""chargegate web: the page for the household and the installer, and Home Assistant MQTT discovery."""
