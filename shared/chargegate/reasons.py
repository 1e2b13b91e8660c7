"""Why an EVSE gets what it gets, in a sentence a household member understands.

``controller/allocation`` names, per EVSE, the limit or rule that bound it (``bound_by``, a code for
machines: ``node:garage:L2``, ``grid_limit:dso``, ``min_pause``...) and a ``detail`` with the
figures. :func:`reason_text` turns both into one short sentence. It is the one table of these
sentences: the load-controller publishes it as ``reason_text`` next to the code, the web page and
``chargegate status`` show it (and use it for allocations of an older controller without the field).
Pure functions, no I/O.
"""

from __future__ import annotations

import re
from datetime import datetime, tzinfo

# the EVSE states of evse/<id>/status, as words
STATE_WORDS: dict[str, str] = {
    "available": "no car plugged in",
    "preparing": "car plugged in, waiting",
    "charging": "charging",
    "suspended": "car plugged in, paused",
    "finishing": "session ending",
    "faulted": "fault",
    "unavailable": "out of service",
    "offline": "not reachable",
}

# bound_by codes that are the whole reason (the controller's configuration key in brackets)
FIXED: dict[str, str] = {
    "§14a_floor": "the grid operator's limit applies, raised to the §14a minimum",
    "evse_max": "at the wallbox's maximum",
    "mode:off": "charging mode off",
    "mode:max_current": "the maximum current set for this wallbox",
    "ramp": "ramping up step by step (ramp_step_a)",
    "reclaim": "the car draws less, so the rest is given to others",
    "phase_imbalance": "the phases would be too unbalanced (max_phase_imbalance_a)",
    "overdraw_penalty": "held back: something drew more than it was granted",
    "stale_meter": "a meter is silent, so charging below it is paused",
    "min_current": "not enough room for the minimum charging current (min_current_a)",
    "min_pause": "paused after a stop: waits at least min_pause_s before starting again",
    "not_connected": "no car plugged in",
    "evse_offline": "the wallbox is not reachable",
    "settling": "waiting for another wallbox to follow a cut",
}

# what a wallbox in evse_state:<state> is doing, when that is why it gets nothing
EVSE_STATE_REASONS: dict[str, str] = {
    "available": "no car plugged in",
    "preparing": "the car is plugged in but has not asked for power yet",
    "suspended": "the car has paused charging (full, or its own timer)",
    "finishing": "the session is ending",
    "faulted": "the wallbox reports a fault",
    "unavailable": "the wallbox is out of service",
    "offline": "the wallbox is not reachable",
}

GRID_LIMIT_SOURCES: dict[str, str] = {
    "dso": "the grid operator's limit", "supplier": "the energy supplier's limit",
    "local": "the local limit (house power)", "failsafe": "the failsafe limit",
}


def _phase(label: str) -> str:
    return {"L1": "phase L1", "L2": "phase L2", "L3": "phase L3", "power": "power"}.get(label, label)


def reason_code_text(bound_by: str | None, names: dict[str, str] | None = None) -> str:
    """The sentence for the code alone. ``names``: circuit id -> name. An unknown code is returned as it is."""
    names = names or {}
    if not bound_by:
        return "no decision yet"
    b = bound_by
    if b in FIXED:
        return FIXED[b]
    if b.startswith("node:"):
        _, node, what = [*b.split(":", 2), "", ""][:3]
        return f"the fuse of {names.get(node, node)} ({_phase(what)}) is fully used"
    if b.startswith("grid_limit:"):
        src = b.split(":", 1)[1]
        return GRID_LIMIT_SOURCES.get(src, f"the {src} limit") + " applies"
    if b.startswith("evse_limit:"):
        return "a limit from the supplier's backend for this wallbox"
    if b.startswith("rule:mode.solar+min."):
        return "solar + minimum mode: the minimum from the grid, the rest from surplus"
    if b.startswith("rule:mode.solar."):
        return "solar mode: only what the house exports"
    if b.startswith("rule:mode.target."):
        return "the session target"
    if b.startswith("rule:"):
        return f"charging rule {b.split(':', 1)[1]}"
    if b.startswith("evse_state:"):
        state = b.split(":", 1)[1]
        return EVSE_STATE_REASONS.get(state, f"the wallbox is {STATE_WORDS.get(state, state)}")
    return b


_NOT_FIT = re.compile(r"^the minimum ([\d.]+) A does not fit under (\S+)$")


def constraint_words(label: str, names: dict[str, str] | None = None) -> str:
    """A constraint's label (``node:grid:L1``, ``grid_limit:dso``, ``§14a_floor``) as a noun: what is full."""
    names = names or {}
    if label.startswith("node:"):
        _, node, what = [*label.split(":", 2), "", ""][:3]
        return f"the fuse of {names.get(node, node)} ({_phase(what)})"
    if label.startswith("grid_limit:"):
        src = label.split(":", 1)[1]
        return GRID_LIMIT_SOURCES.get(src, f"the {src} limit")
    if label == "§14a_floor":
        return "the grid operator's limit (§14a floor)"
    return reason_code_text(label, names)


_PAUSE = re.compile(r"^paused at (\S+), minimum pause ([\d.]+) s$")
_FLOOR = re.compile(r"^(\w+) limit (.+?) raised to the §14a floor (\d+) W$")


def reason_text(bound_by: str | None, detail: str | None = None, names: dict[str, str] | None = None,
                tz: tzinfo | None = None) -> str:
    """``bound_by`` of ``controller/allocation`` and its ``detail`` in one sentence (the detail's figures
    appended, or the detail alone when it already says the same in more words). ``names``: circuit id ->
    name; ``tz``: for clock times in it (default: the local zone)."""
    text = reason_code_text(bound_by, names)
    if not bound_by:
        return text
    floor = _FLOOR.match(detail or "")
    if floor:  # "dso limit 6000 W raised to the §14a floor 13020 W"
        who = GRID_LIMIT_SOURCES.get(floor.group(1), f"the {floor.group(1)} limit")
        return f"{who} of {floor.group(2)} is below the §14a floor: raised to {floor.group(3)} W"
    not_fit = _NOT_FIT.match(detail or "")
    if bound_by == "min_current" and not_fit:  # "the minimum 6 A does not fit under §14a_floor"
        where = constraint_words(not_fit.group(2), names)
        return f"waits: no room left for its minimum {not_fit.group(1)} A under {where}"
    pause = _PAUSE.match(detail or "")
    if bound_by == "min_pause" and pause:  # "paused at 2026-...Z, minimum pause 60 s"
        try:
            since = f"{datetime.fromisoformat(pause.group(1)).astimezone(tz):%H:%M:%S}"
        except ValueError:
            since = pause.group(1)
        return f"paused since {since}: waits {pause.group(2)} s after a stop before charging again (min_pause_s)"
    if detail and detail.startswith(text):
        return detail
    if detail and detail not in text:
        return f"{text} - {detail}"
    return text


USED_PHASE_A = 1.0  # a phase that carries at least this much is in use


def phases_drawn(current_a: object, granted_phases: object) -> int | None:
    """How many phases the car really draws on, from the measured currents, when that is fewer than it was
    granted (a 1-phase car on a 3-phase wallbox that cannot switch: granted x3, draws on one). None when
    it draws nothing or on every granted phase: nothing to tell."""
    if not isinstance(current_a, list) or not isinstance(granted_phases, int):
        return None
    drawn = sum(1 for x in current_a if isinstance(x, int | float) and x >= USED_PHASE_A)
    return drawn if 0 < drawn < granted_phases else None
