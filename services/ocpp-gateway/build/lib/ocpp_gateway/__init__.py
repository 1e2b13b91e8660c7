"""chargegate ocpp-gateway: OCPP wallboxes' central system and every EVSE's charge point at the backend."""

__version__ = "0.1.0"
