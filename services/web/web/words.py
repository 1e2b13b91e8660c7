"""What the bus says, in words a household member understands (pure functions, no I/O)."""

from __future__ import annotations

from datetime import datetime

from chargegate import payloads as p

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

MODE_WORDS: dict[str, str] = {
    "off": "off: does not charge",
    "now": "now: as fast as the installation allows",
    "rules": "rules: the configured charging rules",
    "solar": "solar: from surplus only",
    "solar+min": "solar + minimum: the minimum from the grid, the rest from surplus",
}

PLUGGED = {"preparing", "charging", "suspended", "finishing"}


def state_words(status: p.EvseStatus | None) -> str:
    if status is None:
        return "no status yet"
    if not status.online:
        return "not reachable" + (f" ({status.reason})" if status.reason else "")
    return STATE_WORDS.get(status.state.value, status.state.value)


def _phase(label: str) -> str:
    return {"L1": "phase L1", "L2": "phase L2", "L3": "phase L3", "power": "power"}.get(label, label)


def reason_words(bound_by: str | None, detail: str | None = None, names: dict[str, str] | None = None) -> str:
    """``bound_by`` of ``controller/allocation`` (and its ``detail``) in words. ``names``: circuit id -> name."""
    names = names or {}
    if not bound_by:
        return "no decision yet"
    b = bound_by
    text: str
    if b.startswith("node:"):
        _, node, what = [*b.split(":", 2), "", ""][:3]
        text = f"the fuse of {names.get(node, node)} ({_phase(what)}) is fully used"
    elif b.startswith("grid_limit:"):
        src = b.split(":", 1)[1]
        text = {"dso": "the grid operator's limit", "supplier": "the energy supplier's limit",
                "local": "the local limit (house power)", "failsafe": "the failsafe limit"}.get(src, f"the {src} limit")
        text += " applies"
    elif b == "§14a_floor":
        text = "the grid operator's limit applies, raised to the §14a minimum"
    elif b == "evse_max":
        text = "at the wallbox's maximum"
    elif b.startswith("evse_limit:"):
        text = "a limit from the supplier's backend for this wallbox"
    elif b.startswith("rule:mode.solar+min."):
        text = "solar + minimum mode: the minimum from the grid, the rest from surplus"
    elif b.startswith("rule:mode.solar."):
        text = "solar mode: only what the house exports"
    elif b.startswith("rule:mode.target."):
        text = "the session target"
    elif b.startswith("rule:"):
        text = f"charging rule {b.split(':', 1)[1]}"
    elif b == "mode:off":
        text = "charging mode off"
    elif b == "mode:max_current":
        text = "the maximum current set for this wallbox"
    elif b == "ramp":
        text = "ramping up step by step"
    elif b == "reclaim":
        text = "the car draws less, so the rest is given to others"
    elif b == "phase_imbalance":
        text = "the phases would be too unbalanced"
    elif b == "overdraw_penalty":
        text = "held back: something drew more than it was granted"
    elif b == "stale_meter":
        text = "a meter is silent, so charging below it is paused"
    elif b == "min_current":
        text = "not enough room for the minimum charging current"
    elif b == "min_pause":
        text = "a short pause before charging again"
    elif b == "not_connected":
        text = "no car plugged in"
    elif b.startswith("evse_state:"):
        text = f"the wallbox is {STATE_WORDS.get(b.split(':', 1)[1], b.split(':', 1)[1])}"
    elif b == "evse_offline":
        text = "the wallbox is not reachable"
    elif b == "settling":
        text = "waiting for another wallbox to follow a cut"
    else:
        text = b
    if detail and detail.startswith(text):
        text = detail
    elif detail and detail not in text:
        text += f" - {detail}"
    return text


def amount(seconds: float) -> str:
    s = abs(seconds)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.0f} days"


def time_left(until: datetime | None, now: datetime) -> str:
    if until is None:
        return "no end given"
    left = (until - now).total_seconds()
    return f"{amount(left)} left" if left >= 0 else f"ended {amount(left)} ago"


def fmt_num(v: float | None, digits: int = 1, unit: str = "") -> str:
    if v is None:
        return "–"
    text = f"{v:.{digits}f}"
    return f"{text} {unit}".rstrip()
