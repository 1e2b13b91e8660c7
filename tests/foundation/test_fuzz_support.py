"""The fuzz strategies themselves: drawing payloads must not change the shared hostile values (a strategy
with external state makes hypothesis fail with FlakyStrategyDefinition, seen in the smgw-link fuzz test)."""

from __future__ import annotations

import copy

from hypothesis import HealthCheck, given, settings

from fuzz_support import BOUNDARY, mutated, template


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(payload=mutated(template("evse.setpoint"), max_changes=6))
def _draw(payload: bytes) -> None:
    assert payload is not None


def test_drawing_mutations_leaves_the_shared_values_alone() -> None:
    before = copy.deepcopy(BOUNDARY)
    _draw()
    assert BOUNDARY == before
