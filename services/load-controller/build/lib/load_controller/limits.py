"""Grid-operator and supplier limits: scope, the §14a floor, expiry and the failsafe state."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from chargegate import payloads as p
from chargegate.config import Controller
from load_controller.solver import INF, Group

OPERATOR_SOURCES = (p.LimitSource.DSO, p.LimitSource.SUPPLIER)


@dataclass(frozen=True, slots=True)
class FailsafeState:
    since: datetime  # the trigger that set ``until``
    until: datetime
    cause: str
    power_w: float
    signature: tuple[Any, ...] = ()  # the operator limits in force when it began


def _operator_limits(limits: dict[str, p.GridLimit]) -> list[p.GridLimit]:
    return [lim for lim in limits.values() if lim.source in OPERATOR_SOURCES]


def is_failsafe_publication(lim: p.GridLimit) -> bool:
    """smgw-link publishes its own failsafe as the operator's limit, marked ``id: failsafe``."""
    return lim.id == "failsafe"


def operator_signature(limits: dict[str, p.GridLimit]) -> tuple[Any, ...]:
    """What the operators currently say, without timestamps and expiry (heartbeats repeat it)."""
    out = []
    for lim in sorted(_operator_limits(limits), key=lambda x: x.source.value):
        if is_failsafe_publication(lim):
            continue
        out.append((lim.source.value, lim.active, lim.power_w, tuple(lim.current_a) if lim.current_a else None,
                    lim.scope.value if lim.scope else None, lim.id))
    return tuple(out)


def _new_limit_since(entry: tuple[Any, ...], now_sig: tuple[Any, ...]) -> bool:
    """Whether an operator said something new: a source whose (non-failsafe) limit changed or appeared."""
    before = {x[0]: x for x in entry}
    return any(before.get(x[0]) != x for x in now_sig)


def failsafe_params(cfg: Controller, limits: dict[str, p.GridLimit]) -> tuple[float, float]:
    """Failsafe power and duration: as last announced by the operator, else configured."""
    power, duration = cfg.failsafe_power_w, cfg.failsafe_duration_s
    newest: p.GridLimit | None = None
    for lim in _operator_limits(limits):
        if (lim.failsafe_power_w is not None or lim.failsafe_duration_s is not None) and (
                newest is None or lim.ts > newest.ts):
            newest = lim
    if newest is not None:
        if newest.failsafe_power_w is not None:
            power = newest.failsafe_power_w
        if newest.failsafe_duration_s is not None:
            duration = max(newest.failsafe_duration_s, 0.0)
    explicit = limits.get(p.LimitSource.FAILSAFE.value)
    if explicit is not None and explicit.failsafe_duration_s is not None and newest is None:
        duration = explicit.failsafe_duration_s
    return power, duration


def failsafe_state(cfg: Controller, limits: dict[str, p.GridLimit], previous: FailsafeState | None,
                   now: datetime, cleared_at: datetime | None = None) -> tuple[FailsafeState | None, datetime | None]:
    """The controller's own failsafe in force at ``now``, and the moment it was last ended by a new limit.

    Entered when an operator limit (dso, supplier) expires while active: its publisher (smgw-link)
    stopped repeating it, so nobody can tell what the operator wants now. The SMGW link's loss is not
    a trigger here: smgw-link alone decides that failsafe (``smgw.on_link_loss``,
    ``smgw.link_loss_grace_s``) and publishes it as the operator's limit (``id: failsafe``), which
    the controller applies like any limit and drops when smgw-link ends it - one owner, so the two
    can never disagree about when it ends. Held for the failsafe duration from that moment, unless a new operator
    limit arrives - one whose content differs from what the operators said when it began (a
    heartbeat repeating the same limit, or smgw-link publishing its own failsafe, is not new).
    Derived from the retained inputs, so a restarted controller reconstructs it; ``previous`` keeps
    it when the trigger itself goes away (the link coming back), ``cleared_at`` keeps an ended
    failsafe from being entered again by the same old trigger.
    """
    power, duration = failsafe_params(cfg, limits)
    sig = operator_signature(limits)
    state = previous
    if state is not None and (now >= state.until or _new_limit_since(state.signature, sig)):
        if now < state.until:
            cleared_at = now
        state = None
    triggers: list[tuple[datetime, str]] = []
    for lim in _operator_limits(limits):
        if lim.active and now >= lim.valid_until:
            triggers.append((lim.valid_until, f"limit from {lim.source.value} expired"))
    for at, cause in triggers:
        if cleared_at is not None and at <= cleared_at:
            continue
        until = at + timedelta(seconds=duration)
        if until <= now:
            continue
        if state is None:
            state = FailsafeState(since=at, until=until, cause=cause, power_w=power, signature=sig)
        elif until > state.until:
            state = FailsafeState(since=at, until=until, cause=cause, power_w=power, signature=state.signature)
    return state, cleared_at


@dataclass(slots=True)
class LimitGroup:
    group: Group
    controllable_only: bool
    info: dict[str, Any]
    warning: str | None


def limit_group(*, source: str, power_w: float | None, current_a: list[float] | None, scope: str,
                cfg: Controller, floor_w: float, non_ev_root: list[float] | None, root_metered: bool,
                valid_until: datetime | None) -> LimitGroup:
    """Turn one binding limit into a solver group (capacities in A, totals in A summed over phases).

    ``scope`` grid: the limit holds for the grid connection, so the measured non-EV load at the root
    is subtracted (``non_ev_root`` None with a metered root = stale meter: assume the worst, all of
    it taken). ``scope`` controllable: the limit holds for the controllable EVSEs alone.
    The §14a floor raises a limit from a floor source so that the EVSEs keep at least ``floor_w``.
    """
    v = cfg.voltage_v
    total = power_w / v if power_w is not None else INF
    caps = [float(x) for x in current_a] if current_a is not None else [INF, INF, INF]
    worst = False
    if scope == "grid" and root_metered:
        if non_ev_root is None:
            worst = True
            total = 0.0
            caps = [0.0, 0.0, 0.0]
        else:
            if total < INF:
                total -= sum(non_ev_root)
            caps = [c - n if c < INF else INF for c, n in zip(caps, non_ev_root, strict=True)]
    total = max(total, 0.0)
    caps = [max(c, 0.0) for c in caps]
    raised = False
    floor_a = floor_w / v
    if source in cfg.floor_sources and floor_w > 0:
        if total < floor_a - 1e-9:
            total = floor_a
            raised = True
        if all(c < INF for c in caps) and sum(caps) < floor_a - 1e-9:
            add = (floor_a - sum(caps)) / 3
            caps = [c + add for c in caps]
            raised = True
    label = "§14a_floor" if raised else f"grid_limit:{source}"
    detail = None
    warning = None
    asked = []
    if power_w is not None:
        asked.append(f"{power_w:.0f} W")
    if current_a is not None:
        asked.append("/".join(f"{c:g}" for c in current_a) + " A")
    if raised:
        detail = f"{source} limit {' '.join(asked)} raised to the §14a floor {floor_w:.0f} W"
        warning = detail
    elif worst:
        detail = f"{source} limit on the grid connection with a stale grid meter: nothing left for EVs"
    info: dict[str, Any] = {
        "source": source, "scope": scope, "power_w": power_w, "current_a": current_a,
        "effective_w": None if total == INF else round(total * v, 1),
        "effective_current_a": None if any(c == INF for c in caps) else [round(c, 3) for c in caps],
        "raised_to_floor": raised, "valid_until": valid_until.isoformat() if valid_until else None,
    }
    group = Group(label=label, cap=caps, total=total, all_members=(scope == "grid"), detail=detail)
    return LimitGroup(group=group, controllable_only=(scope != "grid"), info=info, warning=warning)


def is_finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)
