"""Simulators of the supported wallboxes and meters (pymodbus servers with a car model).

Python API for tests and benchmarks::

    sims = Simulators(config)      # one simulated device per Modbus EVSE / meter of the config
    await sims.start()
    sims.plug("wb1", phases=3, max_current_a=16)
    ...
    await sims.stop()

Command line: ``python -m evse_poller.sim --config chargegate.yaml`` (or ``chargegate sim run``).
"""

from evse_poller.sim.model import Car, ChargePoint, MeterModel
from evse_poller.sim.runner import SimCommand, Simulators, run

__all__ = ["Car", "ChargePoint", "MeterModel", "SimCommand", "Simulators", "run"]
