"""Summary numbers of small simulations against figures computed by hand (docstrings show the sums).

Timing of a car that arrives at step a with delay_s 1 (one step): the controller starts it at its
minimum (6 A) in step a, the car draws that from a+1, and every step the grant rises by ramp_step_a
(2 A) until 16 A: draws 6, 8, 10, 12, 14 A in steps a+1..a+5 and 16 A from a+6. One unit of energy
is 0.01 A on one phase for one second at 230 V.
"""

from __future__ import annotations

import math

import pytest
from sim_helpers import DAY, cars, flat, limits, run, site

from load_controller.simulate.summary import summarize, table, weighted_quantile

V = 230.0
RAMP_AS = 6 + 8 + 10 + 12 + 14  # ampere-seconds per phase drawn while ramping up (steps a+1..a+5)


def wh(amp_seconds_per_phase: float, phases: int = 3) -> float:
    return amp_seconds_per_phase * phases * V / 3600


def one_wallbox(fuse: float = 35.0, **ctl: object):  # type: ignore[no-untyped-def]
    return site([{"id": "grid", "fuse_a": fuse, "meter": "grid-meter"}],
                [{"id": "wb", "circuit": "grid", "max_current_a": 16}], controller=dict(ctl))


def car(**kw: object) -> dict[str, object]:
    return {"id": "ev", "evse": "wb", "max_current_a": 16, "phases": 3, "delay_s": 1, "capacity_kwh": 100, **kw}


def test_energy_of_a_stay_too_short_for_the_need() -> None:
    """30 min at 16 A x 3: 6+8+10+12+14 A.s while ramping, then 16 A for 1800 - 6 steps; the rest is unmet."""
    res = run(one_wallbox(), flat(5, 5, 5), cars(car(arrive="18:00", depart="18:30", need_kwh=20)))
    s = summarize(res)
    expect = wh(RAMP_AS + 16 * (1800 - 6)) / 1000
    (c,) = s.cars
    assert c.delivered_kwh == pytest.approx(expect, abs=1e-3)
    assert c.wanted_kwh == pytest.approx(20.0, abs=1e-3)
    assert c.unmet_kwh == pytest.approx(20.0 - expect, abs=1e-3)
    assert c.stays == 1 and c.stays_met == 0
    assert c.paused_min == {}
    assert s.violations == {}


def test_a_car_gets_full_and_stops() -> None:
    """5 kWh = ceil(5000 Wh x 3600 / 230 V / 0.01) = 7826087 units; ramp 5000 x 3 units; then 4800 units per
    step (16 A x 3): ceil((7826087 - 15000) / 4800) = 1628 steps from a+6, so full at a+1634."""
    res = run(one_wallbox(), flat(0), cars(car(arrive="18:00", depart="23:00", need_kwh=5)))
    s = summarize(res)
    (c,) = s.cars
    assert c.delivered_kwh == c.wanted_kwh == pytest.approx(5.0, abs=1e-3)
    assert c.stays_met == 1 and c.unmet_kwh == 0
    a = res.plant.to_step(DAY.replace(hour=18))
    units = math.ceil(5000 * 3600 / V / 0.01)
    assert units == 7826087
    (st,) = res.stays
    assert st.full_at == a + 6 + math.ceil((units - 15000) / 4800)
    # from then on it draws nothing (and the controller pauses nobody: it still has its grant or reclaims it)
    rec = res.records
    after = [rec.draw[i][0] for i, k in enumerate(rec.k) if k >= st.full_at and rec.stay[i][0] >= 0]
    assert after and max(after) == 0.0


def test_peak_and_p99_per_phase_against_the_fuse() -> None:
    """House 10 A on L1 only; a car charges 10 min (600 s, less than 1 % of the day = 864 s). L1: 26 A for
    594 s, 16..24 A for one second each, 10 A for the rest (85801 s >= 99 % of 86400 = 85536): peak 26,
    p99 10. L2 and L3: the car alone (peak 16, p99 0)."""
    res = run(one_wallbox(), flat(10, 0, 0), cars(car(arrive="18:00", depart="18:10", need_kwh=30)))
    s = summarize(res)
    rows = {(n.node, n.phase): n for n in s.nodes}
    assert rows["grid", "L1"].peak_a == 26.0
    assert rows["grid", "L1"].p99_a == 10.0
    assert rows["grid", "L1"].limit_a == 35.0
    assert rows["grid", "L2"].peak_a == 16.0 and rows["grid", "L2"].p99_a == 0.0
    assert rows["grid", "L1"].over_s == 0.0


def test_weighted_quantile() -> None:
    assert weighted_quantile([1.0, 5.0, 3.0], [98, 1, 1], 0.99) == 3.0
    assert weighted_quantile([1.0, 5.0, 3.0], [98, 1, 1], 1.0) == 5.0
    assert weighted_quantile([1.0, 5.0], [99, 1], 0.99) == 1.0
    assert weighted_quantile([], [], 0.99) == 0.0


def test_time_paused_and_why() -> None:
    """A tariff rule lets it charge only in the low tariff (22:00-06:00); it arrives at 20:00: paused 120 min
    by the rule, then charging from 22:00 (no minimum pause: it had never been granted anything)."""
    cfg = one_wallbox(rules=[{"id": "cheap", "type": "tariff", "charge_in": ["low"]}])
    lim = limits(tariffs=[{"level": "low", "start": "22:00", "end": "06:00"},
                          {"level": "normal", "start": "06:00", "end": "22:00"}])
    res = run(cfg, flat(2, 2, 2), cars(car(arrive="20:00", depart="23:00", need_kwh=60)), lim)
    s = summarize(res)
    (c,) = s.cars
    assert c.paused_min == {"rule:cheap": 120.0}
    assert c.delivered_kwh == pytest.approx(wh(RAMP_AS + 16 * (3600 - 6)) / 1000, abs=1e-3)
    assert [t.level for t in s.tariffs] == ["low"]


def test_cost_by_tariff() -> None:
    """Arrives 21:00 in the normal tariff (35 ct), low (25 ct) from 22:00, leaves 23:00. Normal: the ramp and
    3594 s at 16 A; low: 3600 s at 16 A x 3 x 230 V = 11.04 kWh = 2.76 EUR."""
    cfg = one_wallbox()
    lim = limits(tariffs=[{"level": "low", "start": "22:00", "end": "06:00", "price_ct_per_kwh": 25},
                          {"level": "normal", "start": "06:00", "end": "22:00"}],
                 prices={"normal": 35})
    res = run(cfg, flat(0), cars(car(arrive="21:00", depart="23:00", need_kwh=60)), lim)
    s = summarize(res)
    by = {t.level: t for t in s.tariffs}
    normal_kwh = wh(RAMP_AS + 16 * (3600 - 6)) / 1000
    assert by["low"].kwh == pytest.approx(11.04, abs=1e-6)
    assert by["low"].cost == pytest.approx(2.76, abs=0.005)
    assert by["normal"].kwh == pytest.approx(normal_kwh, abs=1e-3)
    assert by["normal"].cost == pytest.approx(normal_kwh * 0.35, abs=0.005)
    assert s.cost == pytest.approx(2.76 + normal_kwh * 0.35, abs=0.01)
    assert s.cars[0].cost == pytest.approx(s.cost, abs=0.01)
    assert s.currency == "EUR"


def test_14a_floor_minutes_and_the_late_car() -> None:
    """The DSO asks for 1 kW from 18:00 to 19:00; one controllable EVSE: raised to the §14a floor of 4.2 kW
    = 18.26 A over three phases = 6.0 A per phase after rounding. 60 min curtailed, all at the floor. The car
    follows the cut one step late: in that step it draws 16 A x 3 x 230 V = 11040 W, 6840 W above 4200 W."""
    lim = limits(limits=[{"source": "dso", "start": "18:00", "end": "19:00", "power_w": 1000}])
    res = run(one_wallbox(), flat(1, 1, 1), cars(car(arrive="17:00", depart="20:00", need_kwh=60)), lim)
    s = summarize(res)
    assert s.curtailed_min == 60.0
    assert s.floor_min == 60.0
    assert s.curtailed_by == {"dso": 60.0}
    assert s.operator_over_s == 1.0
    assert s.operator_over_max_w == pytest.approx(16 * 3 * V - 4200, abs=0.5)
    rec = res.records
    k18 = res.plant.to_step(DAY.replace(hour=18))
    during = {rec.grant[i][0] for i, k in enumerate(rec.k) if k18 <= k < k18 + 3600}
    assert during == {6.0}
    # 17:00-18:00: ramp + 3594 s at 16 A; 18:00: one step at 16 A, then 6 A; 19:00-20:00: 6 A then the ramp
    # back (8, 10, 12, 14 A in the four steps after the car follows), then 16 A
    first = RAMP_AS + 16 * 3594
    curtailed = 16 + 6 * 3599
    after = 6 + 8 + 10 + 12 + 14 + 16 * (3600 - 5)
    assert s.cars[0].delivered_kwh == pytest.approx(wh(first + curtailed + after) / 1000, abs=2e-3)


def test_a_house_load_the_controller_cannot_see_is_a_violation() -> None:
    """The garage (20 A, no meter) has a 10 A load on L1 of its own; the controller takes the garage as free
    and grants 16 A: every step with a grant above 10 A (12, 14, 16: from a+3 to the departure) breaks the
    garage fuse on L1 with the grants it made. 30 min stay: 1800 - 3 steps."""
    cfg = site([{"id": "grid", "fuse_a": 35, "meter": "grid-meter", "children": [{"id": "garage", "fuse_a": 20}]}],
               [{"id": "wb", "circuit": "garage", "max_current_a": 16}])
    res = run(cfg, flat(10, 0, 0, node="garage"), cars(car(arrive="18:00", depart="18:30", need_kwh=30)))
    s = summarize(res)
    assert s.violations == {"fuse": 1800 - 3}
    assert res.violations[0].where == "node:garage:L1"
    assert "without a meter" in res.violations[0].detail
    assert "fuse 1797" in table([s])
    rows = {(n.node, n.phase): n for n in s.nodes}
    assert rows["garage", "L1"].peak_a == 26.0
    assert rows["garage", "L1"].max_excess_a == 6.0


def test_comparison_table_has_both_columns() -> None:
    c = cars(car(arrive="18:00", depart="19:00", need_kwh=30))
    a = summarize(run(one_wallbox(35), flat(30, 30, 30), c), "35 A")
    b = summarize(run(one_wallbox(50), flat(30, 30, 30), c), "50 A")
    txt = table([a, b])
    head = txt.splitlines()[0]
    assert "35 A" in head and "50 A" in head
    # 35 A - 30 A house - 0 reserve = 5 A: below the minimum, paused; 50 A: 16 A
    assert a.cars[0].delivered_kwh == 0.0
    assert a.cars[0].paused_min == {"min_current": 60.0}
    assert b.cars[0].delivered_kwh == pytest.approx(wh(RAMP_AS + 16 * 3594) / 1000, abs=1e-3)
    md = table([a, b], "markdown")
    assert md.splitlines()[0].startswith("| ") and "| 35 A | 50 A |" in md.splitlines()[0]


def test_a_car_of_an_evse_only_one_configuration_has_gets_one_row() -> None:
    two = site([{"id": "grid", "fuse_a": 35, "meter": "grid-meter"}],
               [{"id": "wb", "circuit": "grid"}, {"id": "wb2", "circuit": "grid"}])
    c = cars(car(arrive="18:00", depart="19:00", need_kwh=5),
             car(id="guest", evse="wb2", arrive="18:00", depart="19:00", need_kwh=5))
    a = summarize(run(one_wallbox(35), flat(5, 5, 5), c), "one")
    b = summarize(run(two, flat(5, 5, 5), c), "two")
    assert a.cars_without_evse == ["guest"]
    lines = [ln for ln in table([a, b]).splitlines() if "guest" in ln]
    assert len(lines) == 2, lines  # delivered/wanted and paused, no third "no such EVSE" row
    assert "no such EVSE in this configuration" in lines[0] and "5.0 / 5.0 kWh" in lines[0]
