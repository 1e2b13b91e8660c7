"""The non-EV load behind a grid meter is the meter minus the EVs' measured currents. Found by the system
fault-injection suite (tests/system): both terms can be stale in a way that makes the estimate too
low, and the controller then hands out current the fuse does not have:

* the meter's last reading is kept (it went silent, within ``meter_timeout_s``) while the cars ramp up
  and report it: the same old reading minus the newer, higher EV currents;
* an EV reports more than it is allowed now (an OCPP wallbox's current comes with its MeterValues,
  up to a sample interval old, after its setpoint went down).

The real load (house plus what the cars actually draw) must stay within the fuse."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

from lc_harness import Runner

from load_controller.controller import step


def _config(**controller: Any) -> dict[str, Any]:
    return {
        "circuits": [{"id": "grid", "fuse_a": 40, "meter": "gm"}],
        "evses": [{"id": "a", "circuit": "grid", "max_current_a": 40},
                  {"id": "b", "circuit": "grid", "max_current_a": 40}],
        "meters": [{"id": "gm"}],
        "controller": {"cycle_s": 1, "min_charge_time_s": 0, "min_pause_s": 0, "reclaim": False, **controller},
    }


def real_load(r: Runner, house: float, car_max: dict[str, float]) -> float:
    """Per phase (all 3-phase, same rotation): the house plus what each car draws under its grant."""
    assert r.last is not None
    return house + sum(min(d.current, car_max.get(d.evse_id, 0.0)) for d in r.last.evses)


def test_a_silent_meter_does_not_hand_out_what_the_cars_ramp_up_to() -> None:
    house = 8.0
    r = Runner({"config": _config(meter_timeout_s=10), "plant": {
        "house_a": {"grid": [house] * 3}, "cars": {"a": {"max_a": 40}}}})
    r.run_step({"at": 0, "evse_status": {"a": {"state": "charging", "iec_state": "C"}}})
    while r.last is not None and r.last.evses[0].current < 14:
        r.run_step({})
    # the meter goes silent while the car is still ramping; its last reading stays (not yet stale)
    r.plant["silent_meters"] = ["gm"]
    loads = []
    for _ in range(12):  # meter_timeout_s 10: the reading counts as stale after that
        r.run_step({})
        loads.append(real_load(r, house, {"a": 40}))
    assert max(loads) <= 40 + 1e-6, f"real load per phase {loads} with a 40 A fuse"


def test_an_ev_reporting_more_than_it_is_allowed_does_not_shrink_the_house_load() -> None:
    house = 8.0
    # b is held at 6 A (a backend limit) and draws 6 A; its status still says 16 A (the last MeterValues
    # before its setpoint went down) while its applied setpoint says 6 A
    r = Runner({"config": _config(), "plant": {
        "house_a": {"grid": [house] * 3}, "cars": {"a": {"max_a": 40}, "b": {"max_a": 40}}}})
    r.run_step({"at": 0, "evse_limit": {"b": {"current_a": 6, "valid_for_s": 600}}, "evse_status": {
        "a": {"state": "charging", "iec_state": "C"},
        "b": {"state": "charging", "iec_state": "C", "current_a": [16, 16, 16], "frozen": True,
              "applied": {"current_a": 6, "phases": 3}}}})
    loads = []
    for _ in range(20):
        r.run_step({"evse_status": {"b": {"state": "charging", "iec_state": "C", "current_a": [16, 16, 16],
                                          "frozen": True, "applied": {"current_a": 6, "phases": 3}}}})
        loads.append(real_load(r, house, {"a": 40, "b": 40}))
    assert max(loads) <= 40 + 1e-6, f"real load per phase {loads} with a 40 A fuse"


def _sampled_plant(house: float, interval: float) -> tuple[Any, dict[str, Any]]:
    """a: an OCPP wallbox (currents every ``interval`` s with its MeterValues); b: polled; both cars 3-phase."""
    from test_lc_dynamics import Plant  # the physical plant of the random-sequence tests

    site = {"circuits": [{"id": "grid", "fuse_a": 40, "meter": "gm",
                          "children": [{"id": "sub", "fuse_a": 63, "meter": "sm"}]}],
            "meters": [{"id": "gm"}, {"id": "sm"}],
            "evses": [{"id": "a", "circuit": "grid", "max_current_a": 32},
                      {"id": "b", "circuit": "grid", "max_current_a": 32}],
            "controller": {"min_charge_time_s": 0, "min_pause_s": 0}}
    plant = Plant(site, sampled={"a": interval})
    plant.house["grid"] = [house] * 3
    return plant, site


def test_a_car_lowering_its_draw_between_meter_values_does_not_lend_its_current_out() -> None:
    # a's car draws 10 A (its own maximum), b takes the rest of the 40 A fuse. Right after a's MeterValues
    # a's car drops to 3 A on its own: the grid meter falls by 7 A, a's reported current stays 10 A. The
    # house must not look 7 A lighter: b would get it, and when a's car draws 10 A again the fuse is
    # overdrawn until a's next MeterValues
    plant, _ = _sampled_plant(house=10.0, interval=10.0)
    plant.cars["a"] = ((0, 1, 2), 10.0)
    plant.cars["b"] = ((0, 1, 2), 32.0)
    for _ in range(60):
        plant.now += timedelta(seconds=1)
        plant.cycle()
    b_before = plant.heard["b"][0]
    assert b_before >= 40 - 10 - 12, plant.heard  # a's unused current went to b (reclaim)
    last_sample = plant.samples["a"][0]
    while plant.now - last_sample < timedelta(seconds=10):  # to just after a's next sample
        plant.now += timedelta(seconds=1)
        plant.cycle()
    plant.cars["a"] = ((0, 1, 2), 3.0)
    for _ in range(8):
        plant.now += timedelta(seconds=1)
        plant.cycle()  # Plant.check: the real load within the fuse, every cycle
    assert plant.heard["b"][0] <= b_before + 1e-6, plant.heard
    plant.cars["a"] = ((0, 1, 2), 10.0)  # back up, before its next MeterValues
    plant.now += timedelta(seconds=1)
    plant.cycle()
    # and once a's MeterValues show 3 A, b gets the difference (a's current is reclaimed as usual)
    for _ in range(40):
        plant.cars["a"] = ((0, 1, 2), 3.0)
        plant.now += timedelta(seconds=1)
        plant.cycle()
    assert plant.heard["b"][0] > b_before + 3, plant.heard


def test_a_measurement_older_than_ev_current_max_age_counts_as_other_load() -> None:
    # a's wallbox stops sending MeterValues (neither its interval nor triggers): once its last current is
    # older than ev_current_max_age_s (25 s), the meter's reading of it is other load - b gets only what
    # is left after a's draw AND a's grant - and the allocation says why
    plant, _ = _sampled_plant(house=10.0, interval=10.0)
    plant.cars["a"] = ((0, 1, 2), 10.0)
    plant.cars["b"] = ((0, 1, 2), 32.0)
    for _ in range(40):
        plant.now += timedelta(seconds=1)
        plant.cycle()
    plant.sampled["a"] = 3600.0  # no more MeterValues
    last = plant.samples["a"][0]
    warned = []
    for _ in range(40):
        plant.now += timedelta(seconds=1)
        plant.cycle()
        d, _mem = step(plant.topo, plant.ctl, ZoneInfo("Europe/Berlin"), plant.inputs, plant.memory, plant.now)
        warned.append(any("evse a:" in w and "ev_current_max_age_s" in w for w in d.warnings))
        age = (plant.now - last).total_seconds()
        assert warned[-1] == (age > 25), (age, d.warnings)
    grant_a, grant_b = plant.heard["a"][0], plant.heard["b"][0]
    # a's 10 A counted in the house load and granted: b's share shrank by a's draw
    assert grant_b <= 40 - 10 - 10 - grant_a + 0.2, plant.heard
    # a new MeterValues: trusted again at once
    plant.sampled["a"] = 10.0
    plant.samples.pop("a")
    for _ in range(30):
        plant.now += timedelta(seconds=1)
        plant.cycle()
    assert plant.heard["b"][0] > grant_b + 5, plant.heard
