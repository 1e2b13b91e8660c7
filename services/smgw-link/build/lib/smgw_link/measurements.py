"""Latest readings from the bus, turned into CLS.EEDI measurement sets.

``gcp``: the meter of the root circuit (the grid connection point).
``controllable``: the sum over the controllable EVSEs (§14a), per-phase currents mapped onto the
grid phases with each EVSE's ``phase_rotation``.

A reading that is offline, implausible or older than ``clseedi.measurement_max_age_s`` is not
reported (the spec: invalid values SHALL be removed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from chargegate import payloads as p
from chargegate.config import Config
from smgw_link.clseedi.messages import measurement_set


@dataclass
class Measurements:
    config: Config
    meters: dict[str, tuple[float, p.MeterReading]] = field(default_factory=dict)
    evses: dict[str, tuple[float, p.EvseStatus]] = field(default_factory=dict)

    def on_meter(self, reading: p.MeterReading) -> None:
        self.meters[reading.meter_id] = (time.monotonic(), reading)

    def on_evse(self, status: p.EvseStatus) -> None:
        self.evses[status.evse_id] = (time.monotonic(), status)

    @property
    def max_age(self) -> float:
        return self.config.smgw.clseedi.measurement_max_age_s

    def _fresh(self, stamp: float) -> bool:
        return time.monotonic() - stamp <= self.max_age

    @property
    def gcp_meter(self) -> str | None:
        return self.config.root_circuit.meter

    def gcp(self) -> dict[str, Any] | None:
        mid = self.gcp_meter
        if mid is None or mid not in self.meters:
            return None
        stamp, r = self.meters[mid]
        if not (self._fresh(stamp) and r.online and r.plausible):
            return None
        ce = self.config.smgw.clseedi
        m = measurement_set(ce.gcp_meter_id or mid, "gcp", id_type=ce.gcp_id_type, power_w=r.power_w,
                            power_phase_w=r.power_phase_w, current_a=r.current_a, voltage_v=r.voltage_v,
                            energy_consumed_wh=r.energy_import_wh, energy_produced_wh=r.energy_export_wh)
        return m if len(m) > 2 else None

    def controllable(self) -> dict[str, Any] | None:
        power = 0.0
        have_power = False
        currents = [0.0, 0.0, 0.0]
        energy = 0.0
        have_energy = False
        n = 0
        for evse in self.config.evses:
            if not evse.controllable or evse.id not in self.evses:
                continue
            stamp, st = self.evses[evse.id]
            if not (self._fresh(stamp) and st.online and st.plausible):
                continue
            n += 1
            if st.power_w is not None:
                power += st.power_w
                have_power = True
            for i, grid_phase in enumerate(evse.phase_rotation):
                currents[grid_phase - 1] += st.current_a[i]
            if st.energy_wh is not None:
                energy += st.energy_wh
                have_energy = True
        if n == 0:
            return None
        return measurement_set(f"{self.config.smgw.clseedi.device_id}-controllable", "controllable",
                               power_w=power if have_power else None, current_a=currents,
                               energy_consumed_wh=energy if have_energy else None)

    def sets(self, sources: list[str] | None = None) -> list[dict[str, Any]]:
        out = []
        for name, fn in (("gcp", self.gcp), ("controllable", self.controllable)):
            if sources is not None and name not in sources:
                continue
            m = fn()
            if m is not None:
                out.append(m)
        return out

    def use_cases(self) -> list[str]:
        out = []
        if self.gcp_meter is not None:
            out.append("mgcp")
        if any(e.controllable for e in self.config.evses):
            out.append("mpc")
        return out
