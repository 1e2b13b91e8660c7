"""An unknown house load is the worst case, the same before and after a restart (safety rule 2).

A node whose meter has never been heard since the controller started, or whose reading is older than
``meter_timeout_s`` (a retained reading on the broker included), offline or implausible, is taken as
fully used: the EVSEs below it share only ``unmetered_allowance_a`` per phase (default 0: paused).
Observed before: each EVSE got its minimum (32 A on L1 of a 25 A fuse with a 20 A single-phase house
load), and after a restart the last known house load was forgotten."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lc_harness import build_config

from chargegate import payloads as p
from chargegate.topics import Registry
from load_controller.controller import Inputs, Memory, step
from load_controller.topology import Topology

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
TZ = ZoneInfo("Europe/Berlin")
REGISTRY = Registry("chargegate")


def _site(n_evses: int, allowance: float = 0.0, fuse: int = 25) -> dict[str, Any]:
    return {
        "circuits": [{"id": "grid", "fuse_a": fuse, "meter": "gm"}],
        "meters": [{"id": "gm"}],
        "evses": [{"id": f"e{j}", "circuit": "grid", "max_current_a": 32} for j in range(n_evses)],
        "controller": {"ramp_step_a": 50, "min_charge_time_s": 0, "min_pause_s": 0, "reclaim": False,
                       "unmetered_allowance_a": allowance},
    }


def _charging(inputs: Inputs, n: int, at: datetime) -> None:
    for j in range(n):
        inputs.statuses[f"e{j}"] = p.EvseStatus(evse_id=f"e{j}", online=True, state="charging", iec_state="C",
                                                ts=at)


def _run(cfg_data: dict[str, Any], inputs: Inputs, memory: Memory, now: datetime, cycles: int = 3
         ) -> tuple[Any, Memory]:
    cfg = build_config(cfg_data)
    topo = Topology(cfg)
    decision = None
    for c in range(cycles):
        decision, memory = step(topo, cfg.controller, TZ, inputs, memory, now + timedelta(seconds=c))
    return decision, memory


def test_a_meter_never_heard_pauses_the_evses_below() -> None:
    inputs = Inputs()
    _charging(inputs, 2, NOW)
    d, _ = _run(_site(2), inputs, Memory(), NOW)
    assert [(x.current, x.bound_by) for x in d.evses] == [(0.0, "stale_meter"), (0.0, "stale_meter")]
    assert "taken as fully used" in (d.evses[0].detail or "") and "paused" in (d.evses[0].detail or "")
    assert d.limits["stale_meters"] == ["gm"]


def test_a_silent_meter_means_the_same_before_and_after_a_restart() -> None:
    """20 A single-phase house load on L1 of a 25 A fuse: while the meter is heard the car gets 5 A
    (below its minimum: paused) ... then the meter goes silent; whether the controller remembers or
    restarts (fresh memory, only the retained, now stale reading), nothing is granted."""
    site = _site(1)
    inputs = Inputs()
    _charging(inputs, 1, NOW)
    inputs.readings["gm"] = p.MeterReading(meter_id="gm", current_a=[20.0, 0.0, 0.0], ts=NOW)
    d, mem = _run(site, inputs, Memory(), NOW)
    assert d.evses[0].current == 0.0  # 5 A left on L1, below the 6 A minimum
    later = NOW + timedelta(seconds=60)  # the meter silent since NOW: its retained reading is stale
    _charging(inputs, 1, later)
    remembered, _ = _run(site, inputs, mem, later)
    restarted, _ = _run(site, inputs, Memory(), later)
    for d in (remembered, restarted):
        assert (d.evses[0].current, d.evses[0].bound_by) == (0.0, "stale_meter"), d.evses


def test_the_unmetered_allowance_is_shared_and_never_exceeded() -> None:
    inputs = Inputs()
    _charging(inputs, 3, NOW)
    d, _ = _run(_site(3, allowance=20.0, fuse=35), inputs, Memory(), NOW)
    assert sum(x.current for x in d.evses) <= 20.0 + 1e-9
    assert all(x.bound_by == "stale_meter" for x in d.evses if x.current == 0)
    assert any(x.current > 0 for x in d.evses)


@st.composite
def histories(draw: st.DrawFn) -> tuple[dict[str, Any], list[list[float]], str, bool, int]:
    n = draw(st.integers(1, 4))
    allowance = draw(st.sampled_from([0.0, 0.0, 6.0, 10.0, 20.0]))
    fuse = draw(st.sampled_from([16, 25, 35, 63]))
    site = _site(n, allowance, fuse)
    house = [[draw(st.floats(0, 40)) for _ in range(3)] for _ in range(draw(st.integers(0, 6)))]
    how = draw(st.sampled_from(["never", "silent", "offline", "implausible", "nonfinite"]))
    restart = draw(st.booleans())
    extra = draw(st.integers(1, 4))
    return site, house, how, restart, extra


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories())
def test_unknown_meter_grants_at_most_the_allowance_with_or_without_a_restart(
        h: tuple[dict[str, Any], list[list[float]], str, bool, int]) -> None:
    site, house, how, restart, extra = h
    cfg = build_config(site)
    topo = Topology(cfg)
    ctl = cfg.controller
    inputs = Inputs()
    mem = Memory()
    now = NOW
    for load in house:  # a history with the meter heard (the cars follow their grants)
        _charging(inputs, len(topo.evses), now)
        inputs.readings["gm"] = p.MeterReading(meter_id="gm", current_a=load, ts=now)
        _, mem = step(topo, ctl, TZ, inputs, mem, now)
        now += timedelta(seconds=1)
    if how == "never" or not house:
        inputs.readings.pop("gm", None)
    elif how == "silent":
        now += timedelta(seconds=ctl.meter_timeout_s + 1)
    elif how == "nonfinite":  # the meter's next readings carry NaN/Infinity/1e999: the bus drops every one
        for bad in ("NaN", "Infinity", "-Infinity", "1e999"):
            text = '{"v": 1, "ts": "' + now.isoformat() + '", "meter_id": "gm", "current_a": [' + bad + ', 1.0, 1.0]}'
            assert REGISTRY.parse("chargegate/meter/gm/reading", text.encode()) is None, bad
        now += timedelta(seconds=ctl.meter_timeout_s + 1)  # so the meter is silent from the controller's view
    elif how == "offline":
        inputs.readings["gm"] = p.MeterReading(meter_id="gm", online=False, ts=now)
    else:
        inputs.readings["gm"] = p.MeterReading(meter_id="gm", current_a=[1.0, 1.0, 1.0], plausible=False, ts=now)
    if restart:
        mem = Memory()
    for _ in range(extra):
        _charging(inputs, len(topo.evses), now)
        d, mem = step(topo, ctl, TZ, inputs, mem, now)
        per_phase = [0.0, 0.0, 0.0]
        for e, x in zip(topo.evses, d.evses, strict=True):
            for k in e.grid_phases:
                per_phase[k] += x.current
        cap = min(ctl.unmetered_allowance_a, 25.0e3)
        assert all(a <= cap + 1e-6 for a in per_phase), (how, restart, per_phase, d.evses)
        assert all(x.current == 0 or x.bound_by == "stale_meter" or cap > 0 for x in d.evses)
        now += timedelta(seconds=1)
