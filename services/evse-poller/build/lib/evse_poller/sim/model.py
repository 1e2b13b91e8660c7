"""The physics of the simulators: a car, the charging point it is plugged into, and a meter.

The charging point obeys what its controller was told: the current limit written over Modbus,
or, when its communication watchdog ran out, its failsafe current. A plugged car draws
``min(limit, car maximum)`` on ``min(car phases, EVSE phases)`` phases (nothing below 6 A, the
IEC 61851 minimum), and the energy counter integrates the draw.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

NOMINAL_V = 230.0
IEC_MIN_A = 6.0

Clock = Callable[[], float]
WatchdogMode = Literal["off", "traffic", "setpoint", "keepalive"]


@dataclass
class Car:
    plugged: bool = False
    phases: int = 3
    max_current_a: float = 16.0
    wants_charge: bool = True  # False: battery full (stays in state B)


class ChargePoint:
    """One charging point (socket) with its car.

    ``watchdog_mode``: how the device notices its controller is gone -
    ``traffic`` any Modbus request resets the watchdog (Heidelberg), ``setpoint`` only writing
    the current limit does (Alfen validity time), ``keepalive`` a life-bit write does (Webasto),
    ``off`` no watchdog.
    """

    def __init__(self, *, phases: int = 3, max_current_a: float = 32.0, default_current_a: float | None = None,
                 failsafe_current_a: float = 0.0, watchdog_s: float = 0.0, watchdog_mode: WatchdogMode = "off",
                 fallback_until_first_write: bool = False, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.evse_phases = phases
        self.max_current_a = max_current_a
        self.car = Car()
        self.commanded_a: float | None = default_current_a  # what the controller wrote
        self.failsafe_a = failsafe_current_a
        self.watchdog_s = watchdog_s
        self.watchdog_mode: WatchdogMode = watchdog_mode
        self.fallback_until_first_write = fallback_until_first_write
        self.enabled = True
        self.phase_setting = phases  # 1 or 3 (phase switching)
        self.energy_wh = 0.0
        self.session_start_wh = 0.0
        self.last_contact = clock()
        self.last_setpoint_write: float | None = None
        self.last_keepalive: float | None = None
        self.writes = 0
        self.requests = 0
        self._last_tick = clock()
        self._listeners: list[Callable[[], None]] = []

    # -- contact with the controller ---------------------------------------------------------
    def on_request(self) -> None:
        self.requests += 1
        if self.watchdog_mode == "traffic":
            self.last_contact = self.clock()

    def set_limit(self, current_a: float) -> None:
        self.tick()
        self.commanded_a = current_a
        now = self.clock()
        self.last_setpoint_write = now
        self.writes += 1
        if self.watchdog_mode == "setpoint":
            self.last_contact = now
        self._changed()

    def keepalive(self) -> None:
        now = self.clock()
        self.last_keepalive = now
        if self.watchdog_mode == "keepalive":
            self.last_contact = now

    def watchdog_expired(self) -> bool:
        if self.watchdog_mode == "off" or self.watchdog_s <= 0:
            return False
        if self.watchdog_mode == "setpoint" and self.last_setpoint_write is None:
            return self.fallback_until_first_write
        if self.watchdog_mode == "keepalive" and self.last_keepalive is None:
            return self.fallback_until_first_write
        return self.clock() - self.last_contact > self.watchdog_s

    # -- what the charging point does --------------------------------------------------------
    def limit_a(self) -> float:
        """The current the charging point offers now (PWM), before the car's own limit."""
        if not self.enabled:
            return 0.0
        limit = self.failsafe_a if self.watchdog_expired() else (self.commanded_a or 0.0)
        return max(0.0, min(limit, self.max_current_a))

    def active_phases(self) -> int:
        return max(1, min(self.car.phases, self.evse_phases, self.phase_setting))

    def draw(self) -> list[float]:
        """Per EVSE phase (L1, L2, L3) what the car draws now."""
        limit = self.limit_a()
        if not self.car.plugged or not self.car.wants_charge or limit < IEC_MIN_A:
            return [0.0, 0.0, 0.0]
        a = min(limit, self.car.max_current_a)
        n = self.active_phases()
        return [a if i < n else 0.0 for i in range(3)]

    def iec(self) -> str:
        """IEC 61851 state letter: A no car, B connected, C charging."""
        if not self.car.plugged:
            return "A"
        return "C" if any(self.draw()) else "B"

    def power_w(self) -> float:
        return sum(self.draw()) * NOMINAL_V

    def tick(self) -> None:
        """Integrate energy up to now."""
        now = self.clock()
        dt = now - self._last_tick
        if dt > 0:
            self.energy_wh += self.power_w() * dt / 3600.0
        self._last_tick = now

    # -- the car ----------------------------------------------------------------------------
    def plug(self, phases: int = 3, max_current_a: float = 16.0) -> None:
        self.tick()
        self.car = Car(plugged=True, phases=phases, max_current_a=max_current_a)
        self.session_start_wh = self.energy_wh
        self._changed()

    def unplug(self) -> None:
        self.tick()
        self.car = Car(plugged=False, phases=self.car.phases, max_current_a=self.car.max_current_a)
        self._changed()

    def set_enabled(self, enabled: bool) -> None:
        self.tick()
        self.enabled = enabled
        self._changed()

    def set_phases(self, phases: int) -> None:
        self.tick()
        self.phase_setting = phases
        self._changed()

    def on_change(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)

    def _changed(self) -> None:
        for fn in self._listeners:
            fn()


class MeterModel:
    """A meter measuring ``source()``: per grid phase currents (A, positive = import)."""

    def __init__(self, source: Callable[[], list[float]], voltage_v: float = NOMINAL_V,
                 clock: Clock = time.monotonic) -> None:
        self.source = source
        self.voltage_v = voltage_v
        self.clock = clock
        self.import_wh = 0.0
        self.export_wh = 0.0
        self._last = clock()

    def currents(self) -> list[float]:
        return [float(x) for x in self.source()]

    def phase_power(self) -> list[float]:
        return [i * self.voltage_v for i in self.currents()]

    def tick(self) -> None:
        now = self.clock()
        dt = now - self._last
        if dt > 0:
            p = sum(self.phase_power())
            if p >= 0:
                self.import_wh += p * dt / 3600.0
            else:
                self.export_wh += -p * dt / 3600.0
        self._last = now
