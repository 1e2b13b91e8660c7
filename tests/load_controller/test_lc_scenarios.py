"""Every JSON scenario in scenarios/ against the pure controller: inputs in, expected setpoints and
bound_by out, safety invariants checked on every cycle."""

from __future__ import annotations

from pathlib import Path

import pytest
from lc_harness import SCENARIOS, run_scenario

FILES = sorted(SCENARIOS.glob("*.json"))


def test_there_are_scenarios() -> None:
    assert len(FILES) >= 20


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_scenario(path: Path) -> None:
    run_scenario(path)
