"""The allocation's reason codes in sentences (chargegate.reasons): one table for the load-controller's
``reason_text``, the web page and ``chargegate status``; every code the controller emits has a sentence."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

from chargegate.reasons import phases_drawn, reason_code_text, reason_text


def test_sentences_with_their_figures() -> None:
    names = {"garage": "the garage"}
    assert reason_text("node:garage:L2", None, names) == "the fuse of the garage (phase L2) is fully used"
    assert reason_text("§14a_floor", "dso limit 6000 W raised to the §14a floor 13020 W") == (
        "the grid operator's limit of 6000 W is below the §14a floor: raised to 13020 W")
    assert reason_text("min_current", "the minimum 6 A does not fit under node:garage:L1", names) == (
        "waits: no room left for its minimum 6 A under the fuse of the garage (phase L1)")
    assert reason_text("min_current", "the minimum 6 A does not fit under §14a_floor") == (
        "waits: no room left for its minimum 6 A under the grid operator's limit (§14a floor)")
    paused = datetime(2026, 5, 4, 10, 0, 1, tzinfo=UTC)
    assert reason_text("min_pause", f"paused at {paused.isoformat()}, minimum pause 60 s", tz=UTC) == (
        "paused since 10:00:01: waits 60 s after a stop before charging again (min_pause_s)")
    assert reason_text("min_pause") == "paused after a stop: waits at least min_pause_s before starting again"
    assert reason_text("ramp", "rising by at most 2 A per cycle") == (
        "ramping up step by step (ramp_step_a) - rising by at most 2 A per cycle")
    assert reason_text("evse_state:suspended") == "the car has paused charging (full, or its own timer)"
    assert reason_text(None) == "no decision yet"
    assert reason_text("something_new") == "something_new"  # an unknown code is shown as it is


def test_every_code_the_controller_emits_has_a_sentence() -> None:
    """The literal bound_by codes in the load-controller's source: none falls through as the bare code."""
    src = Path(__file__).resolve().parents[2] / "services" / "load-controller" / "load_controller"
    text = "\n".join(f.read_text() for f in src.glob("*.py"))
    codes = set(re.findall(r'bound_by = "([a-z_§0-9]+)"', text)) | set(re.findall(r'Grant\([^)]*"([a-z_]+)"\)', text))
    codes |= {"min_current", "min_pause", "ramp", "evse_max", "reclaim", "settling", "phase_imbalance"}
    assert len(codes) >= 6, codes
    for code in codes:
        assert reason_code_text(code) != code, code


def test_phases_drawn_from_the_measured_currents() -> None:
    assert phases_drawn([6.0, 0.0, 0.1], 3) == 1  # a 1-phase car on a 3-phase wallbox
    assert phases_drawn([6.0, 6.0, 6.0], 3) is None  # all granted phases in use: nothing to tell
    assert phases_drawn([0.0, 0.0, 0.0], 3) is None  # draws nothing
    assert phases_drawn([6.0, 0.0, 0.0], 1) is None
    assert phases_drawn("bad", 3) is None and phases_drawn([6.0, 0.0, 0.0], None) is None
