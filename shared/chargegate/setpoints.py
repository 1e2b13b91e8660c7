"""How an EVSE's driver (evse-poller, ocpp-gateway) takes a setpoint from the bus.

A setpoint's ``ts`` and ``valid_until`` come from another process's clock, or from whoever got the
load controller's broker account. Taken as they are, one setpoint dated 2099 with a huge ``seq``
would stay the "newest" for ever: every later setpoint of the real controller would be refused as
out of order, and it would never expire, so the safe current would never take over. So, on arrival:

* ``ts`` is clamped to the time of arrival (nothing is newer than now);
* ``valid_until`` is capped at arrival + the configured setpoint validity (+ a small margin for
  clock skew): a setpoint never holds longer than the controller would have made it hold;
* a setpoint is refused as out of order only when it is older by *both* sequence number and
  (clamped) timestamp than one still in force from the same source; a restarted controller's
  setpoints carry a newer timestamp, so an older, higher ``seq`` never blocks them.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from chargegate.payloads import Setpoint

VALIDITY_MARGIN_S = 2.0  # for clock skew between the controller's host and ours
_MARGIN = timedelta(seconds=VALIDITY_MARGIN_S)
_HOLD: dict[float, timedelta] = {}  # validity_s -> the longest a setpoint may hold (built once, not per setpoint)


def on_arrival(sp: Setpoint, now: datetime, validity_s: float) -> Setpoint:
    """``sp`` with its timestamps made safe to keep (see the module's docstring)."""
    hold = _HOLD.get(validity_s)
    if hold is None:
        if len(_HOLD) > 16:  # (a handful of configured validities at most; bounded whatever the caller)
            _HOLD.clear()
        hold = _HOLD[validity_s] = timedelta(seconds=validity_s + VALIDITY_MARGIN_S)
    ts = sp.ts if sp.ts <= now else now
    limit = now + hold
    until = sp.valid_until if sp.valid_until <= limit else limit
    if ts == sp.ts and until == sp.valid_until:
        return sp
    return sp.model_copy(update={"ts": ts, "valid_until": until})


def clamped(sp: Setpoint, now: datetime) -> bool:
    """Whether the setpoint as sent claimed a time from the future (for a counter and one warning)."""
    return sp.ts > now + _MARGIN


def out_of_order(new: Setpoint, old: Setpoint | None, now: datetime) -> bool:
    """``new`` (already through :func:`on_arrival`) is a late copy of an older setpoint than ``old``."""
    return (old is not None and new.source == old.source and new.seq < old.seq and new.ts < old.ts
            and not old.expired(now))
