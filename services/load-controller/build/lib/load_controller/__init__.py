"""chargegate load controller: decides every cycle how much current each EVSE may draw."""
