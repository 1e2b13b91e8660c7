"""The random installations and event sequences of the control step's equivalence test (issue 19), and the
fingerprint of a step's outcome.

The step was optimised in issue 19 with a promise: no decision changes. Before the kept-simple step was
retired, every example drawn from these strategies ran through both, cycle by cycle, and their decisions and
next memories were equal (floats bit for bit); ``data/step_vectors.json.gz`` holds those examples with a
fingerprint of the kept-simple step's outcome per cycle, and test_lc_step_equivalence.py replays them against
today's step. The recorder and the kept-simple copy (tests/load_controller/record_step_vectors.py and
lc_reference/) are in commit 6e5668eabb76 of this repository's history.

Random installations: circuit trees, metered and unmetered nodes, 1- and 3-phase EVSEs on rotated phases,
switching ones, priorities, charging rules, controller settings. Random event sequences: cars plugging in and
out, not following cuts, on 1 to 3 phases; house load; grid limits by power or current, with a failsafe when
one expires; per-EVSE limits; charging modes; tariffs; OCPP wallboxes whose currents come with MeterValues and
stay fresh by their gateway's health; EVSEs and meters going silent or offline; time passing irregularly.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import strategies as st
from lc_harness import build_config

from chargegate import payloads as p
from load_controller import controller
from load_controller.topology import Topology

START = datetime(2026, 1, 5, 11, 0, tzinfo=UTC)
TZ = ZoneInfo("Europe/Berlin")


def canonical(x: Any) -> str:
    """A text that two outcomes share exactly when the old test's comparison called them equal: dataclasses by
    their fields (of whichever copy of the classes), dicts and sets in any order, lists and tuples kept apart,
    numbers by value (16 == 16.0, 0.0 == -0.0) and floats bit for bit otherwise."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return "{" + ",".join(f"{f.name}:{canonical(getattr(x, f.name))}" for f in dataclasses.fields(x)) + "}"
    if isinstance(x, dict):
        return "{" + ",".join(sorted(f"{canonical(k)}:{canonical(v)}" for k, v in x.items())) + "}"
    if isinstance(x, list):
        return "[" + ",".join(canonical(v) for v in x) + "]"
    if isinstance(x, tuple):
        return "(" + ",".join(canonical(v) for v in x) + ")"
    if isinstance(x, set | frozenset):
        return "<" + ",".join(sorted(canonical(v) for v in x)) + ">"
    if isinstance(x, enum.Enum):
        return f"{type(x).__name__}.{x.name}"
    if isinstance(x, bool) or x is None:
        return repr(x)
    if isinstance(x, int | float):
        return repr(float(x) + 0.0)
    return repr(x)


def fingerprint(decision: Any, memory: Any) -> str:
    """12 hex digits of the canonical decision and next memory of one cycle."""
    return hashlib.sha256(f"{canonical(decision)}|{canonical(memory)}".encode()).hexdigest()[:12]


def currents(decision: Any) -> str:
    """The EVSEs' currents and phases of a decision, for a readable message when a fingerprint differs."""
    return " ".join(f"{d.evse_id}={float(d.current) + 0.0!r}/{d.phases}" for d in decision.evses)


@st.composite
def sites(draw: st.DrawFn) -> dict[str, Any]:
    n_subs = draw(st.integers(0, 3))
    subs = [f"sub{j}" for j in range(n_subs)]
    children = []
    meters = [{"id": "gm"}]
    for s in subs:
        c: dict[str, Any] = {"id": s, "fuse_a": draw(st.sampled_from([16, 20, 32, 63]))}
        if draw(st.booleans()):
            c["meter"] = f"m-{s}"
            meters.append({"id": f"m-{s}"})
        if draw(st.integers(0, 3)) == 0:
            c["max_power_w"] = draw(st.sampled_from([7000, 11000, 22000]))
        children.append(c)
    grid: dict[str, Any] = {"id": "grid", "fuse_a": draw(st.sampled_from([25, 35, 63, 100])), "children": children}
    if draw(st.integers(0, 5)) > 0:
        grid["meter"] = "gm"
    if draw(st.integers(0, 3)) == 0:
        grid["max_power_w"] = draw(st.sampled_from([15000, 30000]))
    evses = []
    for j in range(draw(st.integers(1, 8))):
        phases = draw(st.sampled_from([1, 3, 3]))
        rot = list(draw(st.permutations([1, 2, 3])))[:phases]
        evses.append({"id": f"e{j}", "circuit": draw(st.sampled_from(["grid", *subs])), "phases": phases,
                      "phase_rotation": rot, "min_current_a": draw(st.sampled_from([6, 6, 8])),
                      "max_current_a": draw(st.sampled_from([16, 32])), "priority": draw(st.sampled_from([0, 0, 1])),
                      "phase_switching": phases == 3 and draw(st.booleans()),
                      "controllable": draw(st.booleans())})
    ids = [e["id"] for e in evses]
    rules: list[dict[str, Any]] = []
    for kind in draw(st.lists(st.sampled_from(["tariff", "solar", "window", "min_energy"]), max_size=2,
                              unique=True)):
        members = draw(st.lists(st.sampled_from(ids), max_size=3, unique=True))
        if kind == "tariff":
            rules.append({"id": "cheap", "type": "tariff", "evses": members, "charge_in": ["low"],
                          "max_power_w_otherwise": draw(st.sampled_from([0, 5000]))})
        elif kind == "solar":
            rules.append({"id": "sun", "type": "solar", "evses": members, "meter": "gm",
                          "top_up_to_min": draw(st.booleans())})
        elif kind == "window":
            rules.append({"id": "night", "type": "window", "evses": members,
                          "windows": [{"start": "12:05", "end": "23:00"}]})
        else:
            rules.append({"id": "target", "type": "min_energy", "evses": members, "energy_wh": 20000,
                          "by": "14:00"})
    controller: dict[str, Any] = {
        "reserve_a": draw(st.sampled_from([0, 1])), "ramp_step_a": draw(st.sampled_from([2, 50])),
        "reclaim_after_s": draw(st.sampled_from([0, 5, 20])), "min_charge_time_s": draw(st.sampled_from([0, 60])),
        "min_pause_s": draw(st.sampled_from([0, 60])), "phase_switch_delay_s": draw(st.sampled_from([0, 30])),
        "imbalance_limit_a": draw(st.sampled_from([4.0, 16.0, 20.0])),
        "unmetered_allowance_a": draw(st.sampled_from([0, 6])),
        "decrease_settle_s": draw(st.sampled_from([0, 10])),
        "overdraw_penalty_s": draw(st.sampled_from([0, 30, 300])),
        "grid_limit_scope": draw(st.sampled_from(["grid", "controllable"])),
        "current_step_a": draw(st.sampled_from([0.1, 1.0])),
        "reclaim": draw(st.booleans()), "phase_detection": draw(st.booleans()),
        "rules": rules,
    }
    return {"circuits": [grid], "meters": meters, "evses": evses, "controller": controller}


ID = st.integers(0, 7)
CAR_PHASES = st.sampled_from([(0,), (0, 1), (0, 1, 2)])
PLUG = st.tuples(st.just("plug"), ID, CAR_PHASES, st.sampled_from([10.0, 16.0, 32.0]))
RUN = st.tuples(st.just("run"), st.integers(1, 15))  # that many cycles, 1 s apart
events = st.one_of(
    PLUG, PLUG, RUN, RUN, RUN,
    st.tuples(st.just("unplug"), ID),
    st.tuples(st.just("phases"), ID, CAR_PHASES),
    st.tuples(st.just("stubborn"), ID, st.sampled_from([0.0, 10.0, 16.0])),  # ignores cuts below this
    st.tuples(st.just("house"), st.integers(0, 3), st.lists(st.floats(0, 40), min_size=3, max_size=3)),
    st.tuples(st.just("limit"), st.one_of(st.none(), st.floats(0, 25000),
                                          st.lists(st.floats(0, 40), min_size=3, max_size=3)),
              st.sampled_from([None, "grid", "controllable"]), st.sampled_from([5.0, 3600.0])),
    st.tuples(st.just("evse_limit"), ID, st.one_of(st.none(), st.floats(0, 32)),
              st.one_of(st.none(), st.floats(1000, 22000)), st.sampled_from([None, 1, 3])),
    st.tuples(st.just("mode"), ID, st.sampled_from(["off", "now", "rules", "solar", "solar+min", None]),
              st.one_of(st.none(), st.sampled_from([6.0, 10.0, 13.0]))),
    st.tuples(st.just("tariff"), st.sampled_from([None, "low", "normal", "high"])),
    st.tuples(st.just("offline"), ID),
    st.tuples(st.just("online"), ID),
    st.tuples(st.just("ocpp"), ID, st.sampled_from([1.0, 5.0, 30.0])),  # sampled every so many seconds
    st.tuples(st.just("gateway"), st.sampled_from(["online", "offline", None])),
    st.tuples(st.just("silence"), st.booleans()),
    st.tuples(st.just("meter_offline"), st.sampled_from([False, False, False, True])),
    st.tuples(st.just("wait"), st.sampled_from([0.3, 1.0, 1.0, 5.0, 25.0, 70.0])),
)


class Plant:
    """A plant (cars, house load, meters) driven by the control step; ``on_cycle(plant, decision, memory)``
    sees every cycle's decision and next memory (the replay compares them, the recorder recorded them)."""

    def __init__(self, cfg_data: dict[str, Any], on_cycle: Callable[[Plant, Any, Any], None]) -> None:
        self.cfg = build_config(cfg_data)
        self.topo = Topology(self.cfg)
        self.ctl = self.cfg.controller
        self.now = START
        self.memory = controller.Memory()
        self.inputs = controller.Inputs()
        self.on_cycle = on_cycle
        ids = [e.id for e in self.topo.evses]
        self.cars: dict[str, tuple[tuple[int, ...], float] | None] = dict.fromkeys(ids)
        self.stubborn: dict[str, float] = dict.fromkeys(ids, 0.0)
        self.online = dict.fromkeys(ids, True)
        self.heard: dict[str, tuple[float, int]] = {e.id: (e.safe_a, e.phases) for e in self.topo.evses}
        self.house = {nd.id: [0.0, 0.0, 0.0] for nd in self.topo.nodes}
        self.sampled: dict[str, float] = {}
        self.samples: dict[str, tuple[datetime, list[float]]] = {}
        self.silent = False
        self.meter_offline = False
        self.energy: dict[str, float] = dict.fromkeys(ids, 0.0)
        self.cycles = 0

    def draw(self, eid: str) -> list[float]:
        car = self.cars[eid]
        out = [0.0, 0.0, 0.0]
        if car is None:
            return out
        phases, car_max = car
        current, nph = self.heard[eid]
        current = max(current, self.stubborn[eid])
        e = self.topo.evses[self.topo.evse_index[eid]]
        used = (0,) if (nph == 1 or e.phases == 1) else tuple(k for k in phases if k < e.phases)
        for k in used:
            out[k] = min(current, car_max)
        return out

    def observe(self) -> None:
        for e in self.topo.evses:
            if not self.online[e.id]:
                self.inputs.statuses[e.id] = p.EvseStatus(evse_id=e.id, online=False, state="offline", ts=self.now)
                continue
            d = self.draw(e.id)
            self.energy[e.id] += sum(d) * 230.0 / 3600.0
            car = self.cars[e.id] is not None
            iec = ("C" if max(d) > 0 else "B") if car else "A"
            current, nph = self.heard[e.id]
            measured_at = None
            source = None
            if e.id in self.sampled:
                source = "ocpp-gateway"
                last = self.samples.get(e.id)
                if last is None or (self.now - last[0]).total_seconds() >= self.sampled[e.id]:
                    last = self.samples[e.id] = (self.now, d)
                measured_at, d = last
            session = p.Session(id=f"s-{e.id}", started=START, energy_wh=self.energy[e.id]) if car else None
            self.inputs.statuses[e.id] = p.EvseStatus(
                evse_id=e.id, online=True, iec_state=iec, state="charging" if car else "available", current_a=d,
                applied=p.AppliedSetpoint(current_a=current, phases=nph), measured_at=measured_at, ts=self.now,
                power_w=sum(d) * 230.0 if car else None, session=session, source=source)
        for nd in self.topo.nodes:
            if nd.meter is None or (self.silent and nd.meter in self.inputs.readings):
                continue
            cur = [0.0, 0.0, 0.0]
            for other in self.topo.nodes:
                if nd.index in other.chain:
                    cur = [a + b for a, b in zip(cur, self.house[other.id], strict=True)]
            for i in self.topo.below[nd.index]:
                e = self.topo.evses[i]
                d = self.draw(e.id)
                for k in range(e.phases):
                    cur[e.rotation[k]] += d[k]
            # the root meter sees a solar export on top (power_w below zero) when the house is light
            pw = sum(cur) * 230.0 - (8000.0 if nd.index == 0 else 0.0)
            self.inputs.readings[nd.meter] = p.MeterReading(meter_id=nd.meter, current_a=[min(c, 1000) for c in cur],
                                                             power_w=pw, online=not self.meter_offline, ts=self.now)

    def cycle(self) -> None:
        self.observe()
        decision, self.memory = controller.step(self.topo, self.ctl, TZ, self.inputs, self.memory, self.now)
        self.on_cycle(self, decision, self.memory)
        self.cycles += 1
        for d in decision.evses:
            if self.online[d.evse_id]:
                self.heard[d.evse_id] = (d.current, d.phases)

    def apply(self, ev: tuple[Any, ...]) -> None:
        ids = [e.id for e in self.topo.evses]
        kind = ev[0]
        eid = ids[ev[1] % len(ids)] if kind not in ("house", "run") and len(ev) > 1 and isinstance(ev[1], int) else ""
        if kind == "plug":
            self.cars[eid] = (ev[2], ev[3])
        elif kind == "unplug":
            self.cars[eid] = None
            self.energy[eid] = 0.0
        elif kind == "phases":
            car = self.cars[eid]
            if car is not None:
                self.cars[eid] = (ev[2], car[1])
        elif kind == "stubborn":
            self.stubborn[eid] = ev[2]
        elif kind == "house":
            self.house[self.topo.nodes[ev[1] % len(self.topo.nodes)].id] = ev[2]
        elif kind == "limit":
            _, bound, scope, valid_s = ev
            if bound is None:
                self.inputs.grid_limits.pop("dso", None)
            else:
                self.inputs.grid_limits["dso"] = p.GridLimit(
                    source="dso", active=True, power_w=bound if isinstance(bound, float) and bound > 0 else None,
                    current_a=bound if isinstance(bound, list) else (None if bound else [0.0, 0.0, 0.0]),
                    scope=scope, failsafe_power_w=5000, failsafe_duration_s=60,
                    valid_until=self.now + timedelta(seconds=valid_s), ts=self.now)
        elif kind == "evse_limit":
            _, _, cur, pw, ph = ev
            if cur is None and pw is None:
                self.inputs.evse_limits.pop(eid, None)
            else:
                self.inputs.evse_limits[eid] = p.EvseLimit(evse_id=eid, current_a=cur, power_w=pw, phases=ph,
                                                           valid_until=self.now + timedelta(seconds=120), ts=self.now)
        elif kind == "mode":
            _, _, mode, cap = ev
            if mode is None:
                self.inputs.modes.pop(eid, None)
            else:
                self.inputs.modes[eid] = p.ChargingMode(evse_id=eid, mode=mode, max_current_a=cap,
                                                        set_by="test" if cap else None, ts=self.now)
        elif kind == "tariff":
            level = ev[1]
            self.inputs.tariff_current = None if level is None else p.TariffCurrent(
                period=p.TariffPeriod(id=f"t-{level}", level=level, start=self.now - timedelta(minutes=5)),
                ts=self.now)
        elif kind == "offline":
            self.online[eid] = False
        elif kind == "online":
            self.online[eid] = True
        elif kind == "ocpp":
            self.sampled[eid] = ev[2]
        elif kind == "gateway":
            if ev[1] is None:
                self.inputs.services.pop("ocpp-gateway", None)
            else:
                self.inputs.services["ocpp-gateway"] = p.Health(service="ocpp-gateway", status=ev[1], ts=self.now)
        elif kind == "silence":
            self.silent = ev[1]
        elif kind == "meter_offline":
            self.meter_offline = ev[1]
        elif kind == "run":
            for _ in range(ev[1] - 1):
                self.now += timedelta(seconds=1)
                self.cycle()
        self.now += timedelta(seconds=ev[1] if kind == "wait" else 1.0)


SETUP = st.tuples(st.one_of(st.none(), PLUG), st.sampled_from([0.0, 0.0, 0.0, 16.0, 32.0]),
                  st.sampled_from([None, None, 1.0, 10.0, 30.0]))  # a car, it ignores cuts below, OCPP sampling

SETUP = st.tuples(st.one_of(st.none(), PLUG), st.sampled_from([0.0, 0.0, 0.0, 16.0, 32.0]),
                  st.sampled_from([None, None, 1.0, 10.0, 30.0]))  # a car, it ignores cuts below, OCPP sampling
SETPOINTS = st.lists(st.tuples(st.just("setpoint"), ID, st.floats(0, 32), st.sampled_from([1, 3])), max_size=8)


def start_plant(plant: Plant, setup: list[Any], house: list[Any]) -> None:
    """Cars, their stubbornness and OCPP sampling, house load on every node: from the start."""
    for e, (car, stubborn, sampled) in zip(plant.topo.evses, setup, strict=False):
        if car is not None:
            plant.cars[e.id] = (tuple(car[2]), car[3])
        plant.stubborn[e.id] = stubborn
        if sampled is not None:
            plant.sampled[e.id] = sampled
    for nd, h in zip(plant.topo.nodes, house, strict=False):
        plant.house[nd.id] = h


def restart_plant(plant: Plant, sps: list[Any]) -> None:
    """A (re)started controller takes the retained setpoints as its memory."""
    ids = [e.id for e in plant.topo.evses]
    for _, j, cur, ph in sps:
        eid = ids[j % len(ids)]
        plant.inputs.setpoints[eid] = p.Setpoint(evse_id=eid, current_a=round(cur, 1), phases=ph,
                                                 source="load-controller", seq=1,
                                                 valid_until=START + timedelta(seconds=10), ts=START)
        plant.heard[eid] = (round(cur, 1), ph)
        plant.cars[eid] = ((0, 1, 2), 32.0)


def event(raw: list[Any]) -> tuple[Any, ...]:
    """An event as drawn, back from JSON (which keeps tuples as lists)."""
    ev = list(raw)
    if ev[0] in ("plug", "phases"):
        ev[2] = tuple(ev[2])
    return tuple(ev)
