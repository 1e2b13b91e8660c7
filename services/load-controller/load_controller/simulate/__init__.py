"""What-if simulation of an installation: the real controller core against a plant model (no I/O).

``chargegate simulate`` (``load_controller.simulate.command``) reads the files and writes the outputs;
everything here works on values: the site configuration (:class:`chargegate.config.Config`, the same
model the services use), a :class:`~load_controller.simulate.scenario.Scenario` (house load, cars,
operator limits and tariffs) and a start time in, a :class:`~load_controller.simulate.engine.Result`
out. The controller is :func:`load_controller.controller.step`, the function the load-controller
service runs every cycle; nothing of the service's I/O (bus, broker, clock) is imported.
"""

from load_controller.simulate.engine import Result, simulate
from load_controller.simulate.scenario import Scenario
from load_controller.simulate.summary import Summary, summarize

__all__ = ["Result", "Scenario", "Summary", "simulate", "summarize"]
