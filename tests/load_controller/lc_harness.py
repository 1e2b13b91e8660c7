"""Runs JSON scenario files against the pure controller (``load_controller.controller.step``).

A scenario::

    {"description": "...",
     "config": {circuits, evses, meters, controller, site},   # EVSEs without modbus/ocpp get a stub
     "start": "2026-01-05T12:00:00+00:00",
     "plant": {"house_a": {"grid": [5, 3, 2]},                 # optional: non-EV load per node
               "cars": {"wb1": {"max_a": 16, "phases": [0, 1, 2]}}},   # EVSE-frame phases the car uses
                                                               # "min_draw_a": 16: it ignores cuts below 16 A
                                                               # "switches": false: the device ignores 1 phase
     "steps": [{"at": 0,                                       # seconds after start
                "cycles": 1,                                   # control cycles to run (cycle_s apart)
                "evse_status": {"wb1": {"state": "charging", "iec_state": "C"}},
                "meter": {"grid-meter": {"current_a": [5, 3, 2]}},
                "grid_limit": {"dso": {"active": true, "power_w": 4000, "valid_for_s": 600}},
                "evse_limit": {"wb1": {...}}, "tariff_current": {...}, "tariff_schedule": {...},
                "link": {"state": "down"}, "health": {"ocpp-gateway": {"status": "online"}},
                "plant": {"cars": {"wb1": {"max_a": 8}}, "silent_meters": ["grid-meter"]},  # plant changes
                "expect": {"wb1": {"current_a": 16, "phases": 3, "bound_by": "evse_max"}},
                "expect_warning": "raised to the §14a floor"}],
     "check_plant": true}                                      # optional, see check_plant()

A step without ``at`` comes one cycle after the previous one. Without a ``plant`` every car follows
its setpoint. With a ``plant``, EVSE currents and meter readings are simulated each cycle from the last decision
(the car draws min(setpoint, its max) on its phases - on L1 only when told 1 phase, unless its entry says
``"switches": false``; meters see the house load plus the EVs below). Statuses report the setpoint as
applied (``applied``: current and the phase count the device really uses), as the poller does.
Payload fields ``ts`` default to the step's time; ``age_s`` makes a message older; ``valid_for_s``
sets ``valid_until`` relative to it. ``null`` removes a message. Every cycle is checked against the
safety invariants (no constraint exceeded; every grant 0 or at least the EVSE's minimum). With
``"check_plant": true`` also what the plant would really draw under each new decision (every car
min(setpoint, its max) on the phases it uses, 1 phase when told 1, plus the house load) must stay
within every fuse on every phase - so a car using a phase the controller did not budget is caught.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from chargegate import config as cfgmod
from chargegate import payloads as p
from load_controller.controller import Decision, Inputs, Memory, step
from load_controller.topology import Topology

SCENARIOS = Path(__file__).parent / "scenarios"


def build_config(data: dict[str, Any]) -> cfgmod.Config:
    data = json.loads(json.dumps(data))
    for i, e in enumerate(data.get("evses", [])):
        if "modbus" not in e and "ocpp" not in e:
            e["modbus"] = {"profile": "sim", "host": "127.0.0.1", "port": 1502 + i}
    for m in data.get("meters", []):
        m.setdefault("modbus", {"profile": "sdm630", "host": "127.0.0.1", "port": 1600})
    return cfgmod.validate_data(data, "scenario")


def _when(now: datetime, d: dict[str, Any]) -> dict[str, Any]:
    d = dict(d)
    age = d.pop("age_s", 0)
    ts = now - timedelta(seconds=age)
    d.setdefault("ts", ts.isoformat())
    if "valid_for_s" in d:
        d["valid_until"] = (ts + timedelta(seconds=d.pop("valid_for_s"))).isoformat()
    return d


class Runner:
    def __init__(self, scenario: dict[str, Any]) -> None:
        self.sc = scenario
        self.cfg = build_config(scenario["config"])
        self.topo = Topology(self.cfg)
        self.tz = ZoneInfo(self.cfg.site.timezone)
        self.start = datetime.fromisoformat(scenario.get("start", "2026-01-05T12:00:00+00:00"))
        self.now = self.start
        self.inputs = Inputs()
        self.memory = Memory()
        self.last: Decision | None = None
        # without a plant every car simply follows its setpoint (and statuses stay fresh)
        self.plant = scenario.get("plant") or {"cars": {e.id: {} for e in self.topo.evses}}
        self.status_base: dict[str, dict[str, Any]] = {}
        self.history: list[Decision] = []

    # -- inputs ------------------------------------------------------------------------------------------
    def apply(self, s: dict[str, Any]) -> None:
        now = self.now
        for eid, d in (s.get("evse_status") or {}).items():
            if d is None:
                self.inputs.statuses.pop(eid, None)
                self.status_base.pop(eid, None)
                continue
            base = {"evse_id": eid, "online": True, **d}
            self.status_base[eid] = base
            self.inputs.statuses[eid] = p.EvseStatus.model_validate(_when(now, base))
        for mid, d in (s.get("meter") or {}).items():
            if d is None:
                self.inputs.readings.pop(mid, None)
                continue
            self.inputs.readings[mid] = p.MeterReading.model_validate(_when(now, {"meter_id": mid, **d}))
        for src, d in (s.get("grid_limit") or {}).items():
            if d is None:
                self.inputs.grid_limits.pop(src, None)
                continue
            self.inputs.grid_limits[src] = p.GridLimit.model_validate(_when(now, {"source": src, **d}))
        for eid, d in (s.get("evse_limit") or {}).items():
            if d is None:
                self.inputs.evse_limits.pop(eid, None)
                continue
            self.inputs.evse_limits[eid] = p.EvseLimit.model_validate(_when(now, {"evse_id": eid, **d}))
        if "tariff_current" in s:
            d = s["tariff_current"]
            self.inputs.tariff_current = None if d is None else p.TariffCurrent.model_validate(_when(now, d))
        if "tariff_schedule" in s:
            d = s["tariff_schedule"]
            self.inputs.tariff_schedule = None if d is None else p.TariffSchedule.model_validate(_when(now, d))
        for name, d in (s.get("health") or {}).items():
            if d is None:
                self.inputs.services.pop(name, None)
                continue
            self.inputs.services[name] = p.Health.model_validate(_when(now, {"service": name, **d}))
        if "link" in s:
            d = s["link"]
            self.inputs.link = None if d is None else p.SmgwLinkStatus.model_validate(_when(now, d))

    def simulate_plant(self) -> None:
        """Refresh EVSE currents and meter readings from the last decision (a simple car model)."""
        if not self.plant:
            return
        cars = self.plant.get("cars", {})
        house = self.plant.get("house_a", {})
        offline_draw = self.plant.get("offline_draw_a", {})
        grants = {d.evse_id: d for d in self.last.evses} if self.last else {}
        draws: dict[int, list[float]] = {}  # evse index -> grid phase currents
        for e in self.topo.evses:
            base = self.status_base.get(e.id)
            st = self.inputs.statuses.get(e.id)
            g = grants.get(e.id)
            setpoint = g.current if g is not None else 0.0
            nph = g.phases if g is not None else e.phases
            car = cars.get(e.id)
            switches = car.get("switches", True) if car is not None else True
            applied_nph = nph if switches else e.phases
            evse_frame = [0.0, 0.0, 0.0]
            if e.id in offline_draw:
                for k in range(e.phases):
                    evse_frame[k] = offline_draw[e.id]
            elif (car is not None and st is not None and base is not None
                  and base.get("iec_state", "C") in ("B", "C", "D")):
                phases = car.get("phases", list(range(e.phases)))
                if applied_nph == 1:
                    phases = [0]
                # "min_draw_a": a car (or device) that does not follow a cut below this
                draw = max(min(setpoint, car.get("max_a", 32.0)), car.get("min_draw_a", 0.0))
                for k in phases:
                    if k < e.phases:
                        evse_frame[k] = draw
            grid = [0.0, 0.0, 0.0]
            for k in range(e.phases):
                grid[e.rotation[k]] += evse_frame[k]
            draws[e.index] = grid
            if base is not None and base.get("online", True) and not base.get("frozen"):
                upd = {**base, "current_a": evse_frame}
                if g is not None and "applied" not in base:
                    upd["applied"] = {"current_a": g.current, "phases": applied_nph}
                if base.get("iec_state") in ("B", "C", "D") and car is not None:
                    upd["iec_state"] = "C" if max(evse_frame) > 0 else "B"
                self.inputs.statuses[e.id] = p.EvseStatus.model_validate(_when(self.now, upd))
        for n, mid in self.topo.metered:
            if mid in self.plant.get("silent_meters", []):
                continue
            node = self.topo.nodes[n]
            cur = list(house.get(node.id, [0.0, 0.0, 0.0]))
            for child in self.topo.nodes:
                if child.index != n and n in child.chain and child.id in house:
                    cur = [a + b for a, b in zip(cur, house[child.id], strict=True)]
            for i in self.topo.below[n]:
                cur = [a + b for a, b in zip(cur, draws[i], strict=True)]
            self.inputs.readings[mid] = p.MeterReading.model_validate(
                {"meter_id": mid, "current_a": cur, "ts": self.now.isoformat()})

    # -- running -----------------------------------------------------------------------------------------
    def cycle(self) -> Decision:
        self.simulate_plant()
        decision, self.memory = step(self.topo, self.cfg.controller, self.tz, self.inputs, self.memory, self.now)
        check_invariants(self, decision)
        if self.sc.get("check_plant"):
            check_plant(self, decision)
        self.last = decision
        self.history.append(decision)
        return decision

    def run_step(self, s: dict[str, Any]) -> Decision:
        if "at" in s:
            at = self.start + timedelta(seconds=s["at"])
        else:
            at = self.now + timedelta(seconds=self.cfg.controller.cycle_s)
        if at > self.now or not self.history:
            self.now = at
        if "plant" in s:
            self.plant = self.plant or {}
            for k, val in s["plant"].items():
                if k in ("cars", "house_a") and isinstance(val, dict):
                    merged = dict(self.plant.get(k, {}))
                    for kk, vv in val.items():
                        merged[kk] = {**merged.get(kk, {}), **vv} if k == "cars" else vv
                    self.plant[k] = merged
                else:
                    self.plant[k] = val
        self.apply(s)
        cycles = int(s.get("cycles", 1))
        decision = self.cycle()
        for _ in range(cycles - 1):
            self.now += timedelta(seconds=self.cfg.controller.cycle_s)
            decision = self.cycle()
        return decision


def check_invariants(runner: Runner, d: Decision) -> None:
    sol = d.solution
    for name, used in sol.usage.items():
        cap = sol.capacity[name]
        # a load that cannot be steered (an unreachable EVSE assumed at its last allowance) may overcommit a
        # constraint whose capacity fell (e.g. a meter went unknown): it is then told to pause (fixed_cut)
        overcommitted = bool(sol.fixed_cut)
        assert used <= cap + 1e-6 or name.startswith("phase_imbalance") or overcommitted, f"{name}: {used} > {cap}"
    assert not sol.repairs, sol.repairs
    for e, dec in zip(runner.topo.evses, d.evses, strict=True):
        assert dec.current == 0 or dec.current >= e.min_a - 1e-9 or not dec.online, (e.id, dec.current)
        assert dec.current <= e.max_a + 1e-9, (e.id, dec.current)


def check_plant(runner: Runner, d: Decision) -> None:
    """The currents the plant draws under decision ``d`` (cars plugged in now, on the phases they use
    now, as they would follow its setpoints) plus the house load stay within every fuse."""
    cars = (runner.plant or {}).get("cars", {})
    house = (runner.plant or {}).get("house_a", {})
    grants = {x.evse_id: x for x in d.evses}
    draws: dict[int, list[float]] = {}
    for e in runner.topo.evses:
        g = [0.0, 0.0, 0.0]
        base = runner.status_base.get(e.id)
        car = cars.get(e.id)
        dec = grants[e.id]
        if car is not None and base is not None and base.get("iec_state", "C") in ("B", "C", "D"):
            one = dec.phases == 1 and car.get("switches", True)
            phases = [0] if one else car.get("phases", list(range(e.phases)))
            for k in phases:
                if k < e.phases:
                    g[e.rotation[k]] += min(dec.current, car.get("max_a", 32.0))
        draws[e.index] = g
    for nd in runner.topo.nodes:
        load = [0.0, 0.0, 0.0]
        for other in runner.topo.nodes:
            if nd.index in other.chain and other.id in house:
                load = [a + b for a, b in zip(load, house[other.id], strict=True)]
        for i in runner.topo.below[nd.index]:
            load = [a + b for a, b in zip(load, draws[i], strict=True)]
        for k in range(3):
            assert load[k] <= nd.limits[k] + 1e-6, \
                f"plant: node {nd.id} L{k + 1} draws {load[k]:.1f} A > {nd.limits[k]:g} A ({d.evses})"


def check_expect(decision: Decision, expect: dict[str, Any], where: str) -> None:
    got = {d.evse_id: d for d in decision.evses}
    for eid, exp in expect.items():
        d = got[eid]
        msg = f"{where}: {eid} got {d.current} A x{d.phases} bound_by={d.bound_by} ({d.detail})"
        if "current_a" in exp:
            want = exp["current_a"]
            if isinstance(want, dict):
                assert want.get("min", -1) - 1e-6 <= d.current <= want.get("max", 1e9) + 1e-6, msg
            else:
                assert abs(d.current - want) < 0.051, msg
        if "phases" in exp:
            assert d.phases == exp["phases"], msg
        if "bound_by" in exp:
            assert d.bound_by == exp["bound_by"], msg
        if "wanted" in exp:
            assert d.wanted == exp["wanted"], msg


def run_scenario(path: Path) -> Runner:
    sc = json.loads(path.read_text())
    r = Runner(sc)
    for i, s in enumerate(sc["steps"]):
        d = r.run_step(s)
        where = f"{path.name} step {i} (t={(r.now - r.start).total_seconds():g}s)"
        if "expect" in s:
            check_expect(d, s["expect"], where)
        if "expect_warning" in s:
            assert any(s["expect_warning"] in w for w in d.warnings), f"{where}: warnings {d.warnings}"
        if "expect_limits" in s:
            for k, v in s["expect_limits"].items():
                assert d.limits.get(k) == v, f"{where}: limits[{k}] = {d.limits.get(k)!r}, expected {v!r}"
    return r
