"""Random event sequences through the controller with its memory, against a physical plant.

Cars plug in and out (1-, 2- and 3-phase cars, on rotated EVSEs, some switching 1/3 phases), a
plugged-in car starts using other phases (no unplug seen), some switching EVSEs' devices ignore the
phase count (they report 3 phases applied), the house load jumps, DSO limits come
and go, EVSEs drop off the network (and keep drawing what they last heard) and come back, time
passes irregularly. After every cycle the currents the plant would
actually draw (each car: min(setpoint it heard, its own maximum) on its phases) plus the house load
and the reserve must stay within every fuse on every phase, and within the DSO limit (or the §14a
floor) - hysteresis, ramps, reclaim, phase detection and switching included.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lc_harness import build_config

from chargegate import payloads as p
from load_controller.controller import Inputs, Memory, step
from load_controller.solver import INF
from load_controller.topology import Topology

START = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)

events = st.one_of(
    st.tuples(st.just("plug"), st.integers(0, 5), st.sampled_from([(0,), (0, 1), (0, 1, 2)]),
              st.sampled_from([10.0, 16.0, 32.0])),
    st.tuples(st.just("unplug"), st.integers(0, 5)),
    # the car plugged in starts using other phases (no unplug: a car adding phases, or a swap the status missed)
    st.tuples(st.just("phases"), st.integers(0, 5), st.sampled_from([(0,), (0, 1), (0, 1, 2)])),
    st.tuples(st.just("house"), st.integers(0, 1), st.lists(st.floats(0, 30), min_size=3, max_size=3)),
    st.tuples(st.just("limit"), st.one_of(st.none(), st.floats(0, 25000))),
    st.tuples(st.just("offline"), st.integers(0, 5)),
    st.tuples(st.just("online"), st.integers(0, 5)),
    st.tuples(st.just("wait"), st.sampled_from([0.3, 1.0, 1.0, 5.0, 25.0, 70.0])),
    st.tuples(st.just("silence"), st.booleans()),
)


@st.composite
def sites(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(2, 6))
    evses = []
    for j in range(n):
        phases = draw(st.sampled_from([1, 3, 3]))
        rot = list(draw(st.permutations([1, 2, 3])))[:phases]
        evses.append({"id": f"e{j}", "circuit": draw(st.sampled_from(["grid", "sub"])), "phases": phases,
                      "name": "ignores-phases" if phases == 3 and draw(st.integers(0, 3)) == 0 else None,
                      "phase_rotation": rot, "min_current_a": draw(st.sampled_from([6, 6, 8])),
                      "max_current_a": draw(st.sampled_from([16, 32])), "priority": draw(st.sampled_from([0, 0, 1])),
                      "phase_switching": phases == 3 and draw(st.booleans()),
                      "controllable": draw(st.booleans())})
    return {
        "circuits": [{"id": "grid", "fuse_a": draw(st.sampled_from([25, 35, 50])), "meter": "gm",
                      "children": [{"id": "sub", "fuse_a": draw(st.sampled_from([16, 20, 32])), "meter": "sm"}]}],
        "meters": [{"id": "gm"}, {"id": "sm"}],
        "evses": evses,
        "controller": {"reserve_a": draw(st.sampled_from([0, 1])), "ramp_step_a": draw(st.sampled_from([2, 50])),
                       "reclaim_after_s": 5, "min_charge_time_s": draw(st.sampled_from([0, 60])),
                       "phase_switch_delay_s": 30},
    }


class Plant:
    def __init__(self, cfg_data: dict[str, Any], sampled: dict[str, float] | None = None) -> None:
        self.cfg = build_config(cfg_data)
        self.topo = Topology(self.cfg)
        self.ctl = self.cfg.controller
        self.now = START
        self.memory = Memory()
        self.inputs = Inputs()
        self.cars: dict[str, tuple[tuple[int, ...], float] | None] = {e.id: None for e in self.topo.evses}
        self.online = {e.id: True for e in self.topo.evses}
        self.heard: dict[str, tuple[float, int]] = {e.id: (e.safe_a, e.phases) for e in self.topo.evses}
        # devices that ignore the phase count of a setpoint (no phase register): they report 3 phases applied
        self.ignores = {e.id for e in self.cfg.evses if e.name == "ignores-phases"}
        self.house = {"grid": [0.0, 0.0, 0.0], "sub": [0.0, 0.0, 0.0]}
        self.limit: float | None = None
        self.silent = False  # the meters keep their last reading (not refreshed)
        # OCPP-like EVSEs: their currents are sampled every so many seconds (MeterValues) and carry the
        # sample's time; a car may change its draw in between
        self.sampled = sampled or {}
        self.samples: dict[str, tuple[datetime, list[float]]] = {}
        self.limit_check = True  # the controllable EVSEs' draw within the DSO limit (or the §14a floor)

    def draw(self, eid: str) -> list[float]:
        """EVSE-frame currents the car takes now."""
        car = self.cars[eid]
        out = [0.0, 0.0, 0.0]
        if car is None:
            return out
        phases, car_max = car
        current, nph = self.heard[eid]
        e = self.topo.evses[self.topo.evse_index[eid]]
        used = (0,) if (nph == 1 or e.phases == 1) else tuple(k for k in phases if k < e.phases)
        for k in used:
            out[k] = min(current, car_max)
        return out

    def grid_draw(self, eid: str) -> list[float]:
        e = self.topo.evses[self.topo.evse_index[eid]]
        d = self.draw(eid)
        g = [0.0, 0.0, 0.0]
        for k in range(e.phases):
            g[e.rotation[k]] += d[k]
        return g

    def node_house(self, node: str) -> list[float]:
        if node == "grid":
            return [a + b for a, b in zip(self.house["grid"], self.house["sub"], strict=True)]
        return list(self.house["sub"])

    def observe(self) -> None:
        for e in self.topo.evses:
            if not self.online[e.id]:
                self.inputs.statuses[e.id] = p.EvseStatus(evse_id=e.id, online=False, state="offline", ts=self.now)
                continue
            d = self.draw(e.id)
            car = self.cars[e.id] is not None
            iec = ("C" if max(d) > 0 else "B") if car else "A"
            current, nph = self.heard[e.id]
            measured_at = None
            if e.id in self.sampled:
                last = self.samples.get(e.id)
                # a new sample when due, and at once when the car stops drawing (a status change: the gateway
                # then reports 0 A itself)
                if (last is None or (self.now - last[0]).total_seconds() >= self.sampled[e.id]
                        or (max(d) == 0 and max(last[1]) > 0)):
                    last = self.samples[e.id] = (self.now, d)
                measured_at, d = last
            self.inputs.statuses[e.id] = p.EvseStatus(evse_id=e.id, online=True, iec_state=iec,
                                                      state="charging" if car else "available", current_a=d,
                                                      applied=p.AppliedSetpoint(current_a=current, phases=nph),
                                                      measured_at=measured_at, ts=self.now)
        for node, mid in (("grid", "gm"), ("sub", "sm")):
            if self.silent and mid in self.inputs.readings:
                continue
            cur = self.node_house(node)
            for i in self.topo.below[self.topo.node_index[node]]:
                g = self.grid_draw(self.topo.evses[i].id)
                cur = [a + b for a, b in zip(cur, g, strict=True)]
            self.inputs.readings[mid] = p.MeterReading(meter_id=mid, current_a=[min(c, 1000) for c in cur],
                                                       ts=self.now)
        if self.limit is None:
            self.inputs.grid_limits.pop("dso", None)
        else:
            self.inputs.grid_limits["dso"] = p.GridLimit(source="dso", active=True, power_w=self.limit,
                                                         valid_until=self.now + timedelta(hours=1), ts=self.now)

    def cycle(self) -> None:
        self.observe()
        decision, self.memory = step(self.topo, self.ctl, ZoneInfo("Europe/Berlin"), self.inputs, self.memory,
                                     self.now)
        for d in decision.evses:
            e = self.topo.evses[self.topo.evse_index[d.evse_id]]
            assert d.current == 0 or d.current >= e.min_a - 1e-9 or not d.online, d
            assert d.current <= e.max_a + 1e-9, d
            if self.online[d.evse_id]:
                self.heard[d.evse_id] = (d.current, e.phases if d.evse_id in self.ignores else d.phases)
        self.check(decision)

    def check(self, decision: Any) -> None:
        offline = [e.id for e in self.topo.evses if not self.online[e.id]]
        for nd in self.topo.nodes:
            house = self.node_house(nd.id)
            load = [0.0, 0.0, 0.0]
            base = [h + self.ctl.reserve_a for h in house]
            for i in self.topo.below[nd.index]:
                eid = self.topo.evses[i].id
                g = self.grid_draw(eid)
                load = [a + b for a, b in zip(load, g, strict=True)]
                if eid in offline:
                    base = [a + b for a, b in zip(base, g, strict=True)]
            for k in range(3):
                lim = nd.limits[k]
                if lim == INF:
                    continue
                total = house[k] + self.ctl.reserve_a + load[k]
                assert total <= max(lim, base[k]) + 1e-6, (nd.id, k, total, lim, decision.evses, self.cars)
        if self.limit is not None and self.limit_check:
            v = self.ctl.voltage_v
            ctrl = [e for e in self.topo.evses if e.controllable]
            watts = sum(sum(self.grid_draw(e.id)) * v for e in ctrl)
            off_w = sum(sum(self.grid_draw(e.id)) * v for e in ctrl if e.id in offline)
            allowed = max(self.limit, self.topo.floor_w, off_w)
            assert watts <= allowed + 1e-3, (watts, self.limit, self.topo.floor_w, decision.evses)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(sites(), st.lists(events, min_size=5, max_size=40))
def test_random_sequences_never_exceed_a_fuse_or_limit(site: dict[str, Any], seq: list[tuple[Any, ...]]) -> None:
    plant = Plant(site)
    ids = [e.id for e in plant.topo.evses]
    plant.cycle()
    for ev in seq:
        kind = ev[0]
        if kind == "plug":
            plant.cars[ids[ev[1] % len(ids)]] = (ev[2], ev[3])
        elif kind == "unplug":
            plant.cars[ids[ev[1] % len(ids)]] = None
        elif kind == "phases":
            car = plant.cars[ids[ev[1] % len(ids)]]
            if car is not None:
                plant.cars[ids[ev[1] % len(ids)]] = (ev[2], car[1])
        elif kind == "house":
            if not plant.silent:  # unknowable while the meters are silent
                plant.house["grid" if ev[1] == 0 else "sub"] = ev[2]
        elif kind == "silence":
            plant.silent = ev[1]
        elif kind == "limit":
            plant.limit = ev[1]
        elif kind == "offline":
            plant.online[ids[ev[1] % len(ids)]] = False
        elif kind == "online":
            plant.online[ids[ev[1] % len(ids)]] = True
        plant.now += timedelta(seconds=ev[1] if kind == "wait" else 1.0)
        plant.cycle()


ocpp_events = st.one_of(
    st.tuples(st.just("plug"), st.integers(0, 5), st.sampled_from([(0,), (0, 1), (0, 1, 2)]),
              st.sampled_from([10.0, 16.0, 32.0])),
    st.tuples(st.just("unplug"), st.integers(0, 5)),
    # the car changes its own draw (battery nearly full, its own pause, back up): nothing reports it until
    # the wallbox's next MeterValues
    st.tuples(st.just("car_max"), st.sampled_from([0.0, 3.0, 6.0, 10.0, 16.0, 32.0])),
    st.tuples(st.just("car_max"), st.sampled_from([0.0, 3.0, 6.0, 10.0, 16.0, 32.0])),
    st.tuples(st.just("limit"), st.one_of(st.none(), st.floats(0, 25000))),
    st.tuples(st.just("wait"), st.sampled_from([0.3, 1.0, 1.0, 2.0, 5.0, 12.0, 30.0])),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(sites(), st.integers(0, 5), st.sampled_from([1.0, 5.0, 10.0, 20.0, 60.0]),
       st.lists(st.floats(0, 20), min_size=3, max_size=3), st.lists(ocpp_events, min_size=5, max_size=40))
def test_a_car_changing_its_draw_between_ocpp_samples_never_overdraws_a_fuse(
        site: dict[str, Any], which: int, interval: float, house: list[float], seq: list[tuple[Any, ...]]) -> None:
    """One EVSE reports its currents only every ``interval`` seconds (an OCPP wallbox's MeterValues, some
    beyond ev_current_max_age_s); its car lowers and raises its own draw in between. The house load is
    constant: the meters show every change of the car, but they cannot tell it from a lighter house.
    The fuses hold all the same (the non-EV load is held at what it was at the EVSE's last sample)."""
    ids = [e["id"] for e in site["evses"]]
    ocpp = ids[which % len(ids)]
    plant = Plant(site, sampled={ocpp: interval})
    plant.house["grid"] = house
    for eid in ids:  # every car plugged in and hungry: what the OCPP car frees is wanted at once
        plant.cars[eid] = ((0, 1, 2), 32.0)
    for _ in range(30):  # ramped up, sampled, reclaimed
        plant.cycle()
        plant.now += timedelta(seconds=1)
    for ev in seq:
        kind = ev[0]
        if kind == "plug":
            plant.cars[ids[ev[1] % len(ids)]] = (ev[2], ev[3])
        elif kind == "unplug":
            plant.cars[ids[ev[1] % len(ids)]] = None
        elif kind == "car_max":
            car = plant.cars[ocpp]
            if car is not None:
                plant.cars[ocpp] = (car[0], ev[1])
        elif kind == "limit":
            plant.limit = ev[1]
        plant.now += timedelta(seconds=ev[1] if kind == "wait" else 1.0)
        plant.cycle()


class LaggingPlant(Plant):
    """Cars follow a lower setpoint only after ``lag_s`` (IEC 61851-1 gives them 5 s) and a higher one at
    once; the wallbox applies every setpoint at once and reports it (``applied``) with the real draw."""

    def __init__(self, cfg_data: dict[str, Any], lag_s: float) -> None:
        super().__init__(cfg_data)
        self.lag_s = lag_s
        self.history: dict[str, list[tuple[datetime, float]]] = {e.id: [] for e in self.topo.evses}

    def draw(self, eid: str) -> list[float]:
        car = self.cars[eid]
        out = [0.0, 0.0, 0.0]
        if car is None:
            return out
        phases, car_max = car
        current, nph = self.heard[eid]
        recent = [c for t, c in self.history[eid] if (self.now - t).total_seconds() < self.lag_s]
        current = max([current, *recent])
        e = self.topo.evses[self.topo.evse_index[eid]]
        used = (0,) if (nph == 1 or e.phases == 1) else tuple(k for k in phases if k < e.phases)
        for k in used:
            out[k] = min(current, car_max)
        return out

    def cycle(self) -> None:
        before = dict(self.heard)
        super().cycle()
        for eid, (current, _nph) in before.items():
            if self.heard[eid][0] < current and self.cars[eid] is not None:
                self.history[eid].append((self.now, current))  # a cut: the old current goes on for lag_s
            self.history[eid] = [(t, c) for t, c in self.history[eid]
                                 if (self.now - t).total_seconds() < self.lag_s]


lagging_events = st.one_of(
    st.tuples(st.just("plug"), st.integers(0, 5), st.sampled_from([(0,), (0, 1), (0, 1, 2)]),
              st.sampled_from([10.0, 16.0, 32.0])),
    st.tuples(st.just("unplug"), st.integers(0, 5)),
    st.tuples(st.just("limit"), st.one_of(st.none(), st.floats(0, 25000))),
    st.tuples(st.just("wait"), st.sampled_from([0.3, 1.0, 1.0, 2.0, 5.0, 12.0])),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(sites(), st.sampled_from([0.5, 2.0, 5.0, 8.0]), st.lists(st.floats(0, 15), min_size=3, max_size=3),
       st.lists(lagging_events, min_size=5, max_size=40))
def test_current_freed_by_a_cut_is_not_handed_out_before_the_car_follows(
        site: dict[str, Any], lag_s: float, house: list[float], seq: list[tuple[Any, ...]]) -> None:
    """Cars take ``lag_s`` to follow a cut (less than decrease_settle_s). A cycle that cuts one EVSE and
    would give the current to another (a car plugged in, fair shares, priorities, a DSO limit) must not
    raise the other before the first is seen following: the fuses hold in between, every cycle. (The
    house load is constant here: a house load that jumps overdraws a fuse until the cars follow their
    cuts whatever the controller does.)"""
    for e in site["evses"]:
        e["phase_switching"] = False  # the lag is modelled on the current only
    plant = LaggingPlant(site, lag_s)
    plant.limit_check = False  # a lower DSO limit is exceeded until the cars follow, whatever the controller does
    plant.house["grid"] = house
    ids = [e.id for e in plant.topo.evses]
    plant.cycle()
    for ev in seq:
        kind = ev[0]
        if kind == "unplug" or (kind == "plug" and plant.cars[ids[ev[1] % len(ids)]] is None):
            plant.history[ids[ev[1] % len(ids)]] = []  # a car arriving was not drawing under an earlier cut
        if kind == "plug":
            plant.cars[ids[ev[1] % len(ids)]] = (ev[2], ev[3])
        elif kind == "unplug":
            plant.cars[ids[ev[1] % len(ids)]] = None
        elif kind == "limit":
            plant.limit = ev[1]
        plant.now += timedelta(seconds=ev[1] if kind == "wait" else 1.0)
        plant.cycle()
