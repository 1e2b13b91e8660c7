"""Simulators: OCPP wallboxes with cars (``python -m ocpp_gateway.sim --config FILE``)."""

from ocpp_gateway.sim.wallbox import Car, SimConnector, WallboxSim

__all__ = ["Car", "SimConnector", "WallboxSim"]
