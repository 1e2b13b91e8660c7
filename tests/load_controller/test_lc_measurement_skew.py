"""The non-EV load behind a grid meter is the meter minus the EVs' measured currents. Found by the system
fault-injection suite (tests/system): both terms can be stale in a way that makes the estimate too
low, and the controller then hands out current the fuse does not have:

* the meter's last reading is kept (it went silent, within ``meter_timeout_s``) while the cars ramp up
  and report it: the same old reading minus the newer, higher EV currents;
* an EV reports more than it is allowed now (an OCPP wallbox's current comes with its MeterValues,
  up to a sample interval old, after its setpoint went down).

The real load (house plus what the cars actually draw) must stay within the fuse."""

from __future__ import annotations

from typing import Any

from lc_harness import Runner


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
