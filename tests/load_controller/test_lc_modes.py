"""Charging modes through ``step``: what each mode does, and that no mode lifts a fuse, a grid-operator
limit or the §14a floor (the fuse property over random installations draws modes too, in
test_lc_properties)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lc_harness import build_config

from chargegate import payloads as p
from load_controller import modes as modes_mod
from load_controller.controller import Inputs, Memory, step
from load_controller.topology import Topology, floor_14a_w

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)  # 13:00 in Berlin
TZ = ZoneInfo("Europe/Berlin")
M = p.ChargingModeName


def rig(rules: list[dict] | None = None, fuse: float = 35, n: int = 2):  # type: ignore[no-untyped-def,type-arg]
    cfg = build_config({
        "circuits": [{"id": "grid", "fuse_a": fuse, "meter": "gm"}],
        "meters": [{"id": "gm"}],
        "evses": [{"id": f"e{j}", "circuit": "grid", "max_current_a": 16} for j in range(n)],
        "controller": {"ramp_step_a": 100, "rules": rules or [], "min_charge_time_s": 0, "min_pause_s": 0},
    })
    return cfg, Topology(cfg)


def run(cfg, topo, modes: dict[str, p.ChargingMode], export_w: float = 0.0, cycles: int = 3,  # type: ignore[no-untyped-def]
        limit_w: float | None = None, session_wh: float | None = None):
    inputs = Inputs(modes=modes)
    mem = Memory()
    now = NOW
    for _ in range(cycles):
        for e in cfg.evses:
            sess = p.Session(id="s", started=NOW - timedelta(hours=1), energy_wh=session_wh or 0)
            inputs.statuses[e.id] = p.EvseStatus(evse_id=e.id, online=True, state="charging", iec_state="C",
                                                 ts=now, session=sess)
        inputs.readings["gm"] = p.MeterReading(meter_id="gm", power_w=-export_w, current_a=[0, 0, 0], ts=now)
        if limit_w is not None:
            inputs.grid_limits["dso"] = p.GridLimit(source="dso", active=True, power_w=limit_w, scope="grid",
                                                    valid_until=NOW + timedelta(hours=1), ts=NOW)
        d, mem = step(topo, cfg.controller, TZ, inputs, mem, now)
        now += timedelta(seconds=1)
    return {x.evse_id: x for x in d.evses}, d


def mode(evse: str, m: p.ChargingModeName, **kw) -> p.ChargingMode:  # type: ignore[no-untyped-def]
    return p.ChargingMode(evse_id=evse, mode=m, set_by="test", **kw)


def test_off_now_and_rules() -> None:
    # a window rule that keeps everyone paused at 13:00
    cfg, topo = rig([{"id": "night", "type": "window", "windows": [{"start": "22:00", "end": "06:00"}]}])
    d, _ = run(cfg, topo, {})
    assert d["e0"].current == 0 and d["e0"].bound_by == "rule:night" and d["e0"].mode is None
    d, _ = run(cfg, topo, {"e0": mode("e0", M.NOW), "e1": mode("e1", M.RULES)})
    assert d["e0"].current == 16 and d["e0"].mode == "now"
    assert d["e1"].current == 0 and d["e1"].bound_by == "rule:night" and d["e1"].mode == "rules"
    cfg, topo = rig()
    d, _ = run(cfg, topo, {"e0": mode("e0", M.OFF)})
    assert d["e0"].current == 0 and d["e0"].bound_by == "mode:off"
    assert d["e0"].detail == "charging mode off (set by test)"
    assert d["e1"].current == 16


def test_solar_and_solar_min() -> None:
    cfg, topo = rig()
    d, _ = run(cfg, topo, {"e0": mode("e0", M.SOLAR), "e1": mode("e1", M.SOLAR_MIN)}, export_w=0)
    assert d["e0"].current == 0 and d["e0"].bound_by.startswith("rule:mode.solar.e0")
    assert d["e1"].current == 6  # the minimum from the grid
    d, _ = run(cfg, topo, {"e0": mode("e0", M.SOLAR)}, export_w=3 * 230 * 10)
    assert 9 <= d["e0"].current <= 10  # the surplus, no more
    assert "solar surplus" in (d["e0"].detail or "")


def test_session_target_boosts_when_the_deadline_nears_but_not_when_off() -> None:
    cfg, topo = rig([{"id": "night", "type": "window", "windows": [{"start": "22:00", "end": "06:00"}]}])
    target = p.SessionTarget(energy_wh=30000, by="14:00")  # 30 kWh in 1 h at 11 kW: start now
    d, _ = run(cfg, topo, {"e0": mode("e0", M.RULES, target=target)}, session_wh=0)
    assert d["e0"].current == 16 and d["e1"].current == 0
    d, _ = run(cfg, topo, {"e0": mode("e0", M.OFF, target=target)}, session_wh=0)
    assert d["e0"].current == 0


def test_rules_shared_by_a_mode_evse_keep_the_others() -> None:
    rules = [{"id": "t", "type": "tariff", "charge_in": ["low"], "max_power_w_otherwise": 0}]
    out = modes_mod.apply(build_config({"circuits": [{"id": "g", "fuse_a": 35}],
                                        "evses": [{"id": "a", "circuit": "g"}, {"id": "b", "circuit": "g"}],
                                        "controller": {"rules": rules}}).controller.rules,
                          {"a": mode("a", M.NOW)}, ["a", "b"])
    assert [(r.id, r.evses) for r in out.rules] == [("t", ["b"])]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 6), limit_w=st.floats(0, 40000), export_w=st.floats(0, 30000),
       ms=st.lists(st.sampled_from(list(M)), min_size=6, max_size=6), target=st.booleans())
def test_no_mode_lifts_a_grid_limit_the_floor_or_the_fuse(n: int, limit_w: float, export_w: float,
                                                          ms: list[p.ChargingModeName], target: bool) -> None:
    cfg, topo = rig(fuse=63, n=n)
    tg = p.SessionTarget(energy_wh=50000, by="13:30") if target else None
    modes = {f"e{j}": mode(f"e{j}", ms[j], target=tg) for j in range(n)}
    d, _ = run(cfg, topo, modes, export_w=export_w, limit_w=limit_w)
    v = cfg.controller.voltage_v
    got_w = sum(x.current * x.phases * v for x in d.values())
    floor = floor_14a_w(n)
    assert got_w <= max(limit_w, floor) + 1e-6  # the limit, raised to the §14a floor, is obeyed
    assert sum(x.current for x in d.values()) <= 63 + 1e-6  # the fuse, on each phase (all 3-phase EVSEs)
    for j in range(n):
        if ms[j] is M.OFF:
            assert d[f"e{j}"].current == 0
        assert d[f"e{j}"].mode == ms[j].value


def test_the_households_maximum_current_caps_an_evse() -> None:
    cfg, topo = rig()
    d, _ = run(cfg, topo, {"e0": mode("e0", M.NOW, max_current_a=10.0)})
    assert d["e0"].current == 10 and d["e0"].bound_by == "mode:max_current"
    assert d["e0"].detail == "maximum 10 A (set by test)"
    assert d["e1"].current == 16  # the other EVSE is not touched
    d, _ = run(cfg, topo, {"e0": mode("e0", M.OFF, max_current_a=10.0)})
    assert d["e0"].current == 0 and d["e0"].bound_by == "mode:off"  # off stays off


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 4), limit_w=st.floats(0, 40000), caps=st.lists(st.floats(6, 40), min_size=4, max_size=4),
       ms=st.lists(st.sampled_from(list(M)), min_size=4, max_size=4))
def test_a_maximum_current_only_lowers(n: int, limit_w: float, caps: list[float], ms: list[p.ChargingModeName]) -> None:
    """A cap never grants more than without it, never more than the cap, and keeps the limit and the fuse."""
    cfg, topo = rig(fuse=63, n=n)
    plain, _ = run(cfg, topo, {f"e{j}": mode(f"e{j}", ms[j]) for j in range(n)}, limit_w=limit_w)
    capped, _ = run(cfg, topo, {f"e{j}": mode(f"e{j}", ms[j], max_current_a=caps[j]) for j in range(n)},
                    limit_w=limit_w)
    v = cfg.controller.voltage_v
    assert sum(x.current * x.phases * v for x in capped.values()) <= max(limit_w, floor_14a_w(n)) + 1e-6
    assert sum(x.current for x in capped.values()) <= 63 + 1e-6
    for j in range(n):
        assert capped[f"e{j}"].current <= caps[j] + 1e-9
    # with every EVSE capped at or above what it got without a cap, nothing changes
    if all(caps[j] >= plain[f"e{j}"].current for j in range(n)) and all(c >= 16 for c in caps[:n]):
        assert {k: x.current for k, x in capped.items()} == {k: x.current for k, x in plain.items()}
