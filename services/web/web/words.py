"""What the bus says, in words a household member understands (pure functions, no I/O)."""

from __future__ import annotations

from datetime import datetime, tzinfo

from chargegate import payloads as p
from chargegate.reasons import STATE_WORDS, reason_text

__all__ = ["STATE_WORDS", "reason_words"]

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


def reason_words(bound_by: str | None, detail: str | None = None, names: dict[str, str] | None = None,
                 tz: tzinfo | None = None) -> str:
    """``bound_by`` of ``controller/allocation`` (and its ``detail``) in words (the shared table in
    :mod:`chargegate.reasons`, as the controller's ``reason_text``). ``names``: circuit id -> name."""
    return reason_text(bound_by, detail, names, tz)


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
