"""The service serialises setpoints itself (hundreds per cycle): they must validate as Setpoint."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from chargegate import payloads as p
from chargegate.topics import Registry
from load_controller.service import setpoint_json


@settings(max_examples=100, deadline=None)
@given(current=st.floats(0, 80), phases=st.sampled_from([1, 3]), seq=st.integers(0, 2**53 - 1),
       reason=st.sampled_from(["§14a_floor", "node:garage:L2", "grid_limit:dso", "evse_max", "min_current"]))
def test_setpoint_json_is_a_valid_setpoint(current: float, phases: int, seq: int, reason: str) -> None:
    now = p.utcnow()
    data = setpoint_json("wb-1.a", current, phases, (now + timedelta(seconds=10)).isoformat(), seq, reason,
                         now.isoformat())
    reg = Registry()
    parsed = reg.parse(reg.topic("evse.setpoint", evse_id="wb-1.a"), data)
    assert parsed is not None, reg.invalid
    sp = parsed[2]
    assert isinstance(sp, p.Setpoint)
    assert (sp.current_a, sp.phases, sp.seq, sp.reason, sp.source) == (current, phases, seq, reason, "load-controller")
    assert sp.valid_until > sp.ts


def test_allocation_json_is_a_valid_allocation() -> None:
    from lc_harness import SCENARIOS, run_scenario

    from load_controller.service import allocation_json

    runner = run_scenario(SCENARIOS / "08_dso_limit_two_evses.json")
    decision = runner.history[-1]
    reg = Registry()
    parsed = reg.parse(reg.topic("controller.allocation"), allocation_json(decision, 1.234, p.utcnow().isoformat()))
    assert parsed is not None, reg.invalid
    alloc = parsed[2]
    assert isinstance(alloc, p.Allocation)
    assert [(a.evse_id, a.current_a, a.bound_by) for a in alloc.evses] == [("wb1", 10.9, "§14a_floor"),
                                                                          ("wb2", 0.0, "min_current")]
    assert alloc.limits["grid_limits"][0]["raised_to_floor"] is True
    assert any("§14a floor" in w for w in alloc.limits["warnings"])
    assert alloc.solve_ms == 1.234 and alloc.cycle == decision.cycle
    # next to each code, its sentence for people (chargegate.reasons), with the figures of its detail
    wb1, wb2 = alloc.evses
    assert wb1.reason_text is not None and "below the §14a floor: raised to" in wb1.reason_text, wb1
    assert wb2.reason_text is not None and wb2.reason_text.startswith("waits: no room left for its minimum"), wb2


def test_allocation_is_new_when_only_a_reason_or_the_limits_in_force_change() -> None:
    """A failsafe (or another operator) replacing a limit with the same grants and the same label (both
    raised to the §14a floor) must be republished at once, not at the next periodic republish."""
    import copy

    from lc_harness import SCENARIOS, run_scenario

    from load_controller.service import allocation_key

    decision = run_scenario(SCENARIOS / "08_dso_limit_two_evses.json").history[-1]
    same = copy.deepcopy(decision)
    assert allocation_key(same) == allocation_key(decision)
    other_reason = copy.deepcopy(decision)
    other_reason.evses[0].detail = "failsafe 4200 W raised to the §14a floor"
    assert other_reason.evses[0].bound_by == decision.evses[0].bound_by
    assert allocation_key(other_reason) != allocation_key(decision)
    failsafe = copy.deepcopy(decision)
    failsafe.limits["failsafe"] = {"cause": "link down", "power_w": 4200}
    assert allocation_key(failsafe) != allocation_key(decision)


def test_decreases_are_published_before_increases() -> None:
    from lc_harness import SCENARIOS, run_scenario

    from load_controller.service import Published, publish_order

    decision = run_scenario(SCENARIOS / "08_dso_limit_two_evses.json").history[-1]
    until = p.utcnow() + timedelta(seconds=10)
    first, second = decision.evses[0], decision.evses[1]
    # the second is cut (it had more), the first raised (it had less): the cut goes out first
    published = {first.evse_id: Published(first.current - 1, 3, until, 1),
                 second.evse_id: Published(second.current + 5, 3, until, 1)}
    assert [d.evse_id for d in publish_order(decision, published)] == [second.evse_id, first.evse_id]
    assert [d.evse_id for d in publish_order(decision, {})] == [first.evse_id, second.evse_id]
