"""Pure pieces of the recorder (no I/O, no clock): the tariff in force, prices, session identity, the
house load of a node, and which control action a limit message is."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from chargegate import payloads as p
from chargegate.config import Config
from chargegate.config.history import Prices

UNKNOWN_LEVEL = "unknown"


@dataclass(frozen=True, slots=True)
class TariffNow:
    period_id: str | None
    level: str  # low / normal / high / unknown
    announced_ct_per_kwh: float | None


def tariff_at(current: p.TariffCurrent | None, schedule: p.TariffSchedule | None, now: datetime) -> TariffNow:
    """The tariff period in force at ``now``: ``tariff/current`` while it is valid and covers ``now``,
    else the latest-starting period of ``tariff/schedule`` that covers it, else unknown."""
    if current is not None and (current.valid_until is None or now < current.valid_until):
        per = current.period
        if per.start <= now and (per.end is None or now < per.end):
            return TariffNow(per.id, per.level.value, per.price_ct_per_kwh)
    if schedule is not None:
        best: p.TariffPeriod | None = None
        for per in schedule.periods:
            if per.start <= now and (per.end is None or now < per.end) and (best is None or per.start > best.start):
                best = per
        if best is not None:
            return TariffNow(best.id, best.level.value, best.price_ct_per_kwh)
    return TariffNow(None, UNKNOWN_LEVEL, None)


def price_for(t: TariffNow, prices: Prices) -> float | None:
    """ct/kWh for energy charged in ``t``: the configured price of its level, else the period's announced
    price, else ``default_ct_per_kwh`` (for no known tariff: the default, else the normal price)."""
    if t.level == UNKNOWN_LEVEL:
        return prices.default_ct_per_kwh if prices.default_ct_per_kwh is not None else prices.normal
    configured = getattr(prices, t.level, None)
    if configured is not None:
        return float(configured)
    if t.announced_ct_per_kwh is not None:
        return t.announced_ct_per_kwh
    return prices.default_ct_per_kwh


def same_session(open_tag: str | None, new_tag: str | None, ended_seen: bool) -> bool:
    """Whether a new bus session id on an EVSE with an open record continues that record: a driver that
    restarted during the session gives it a new id (the car never left: no status without a session
    was seen in between) - unless another idTag started it."""
    if ended_seen:
        return False
    return open_tag is None or new_tag is None or open_tag == new_tag


def session_ended(st: p.EvseStatus) -> bool:
    """A status that ends the open session: the EVSE is reachable and reports no session."""
    return st.session is None and st.online and st.state is not p.EvseState.OFFLINE


def energy_charged(start_wh: float | None, register_wh: float | None, base_wh: float,
                   bus_session_wh: float) -> float:
    """Energy of a session: from the register when both ends are known, else what the drivers counted
    (``base_wh`` under earlier bus session ids plus the current one's)."""
    if start_wh is not None and register_wh is not None and register_wh >= start_wh:
        return register_wh - start_wh
    return base_wh + bus_session_wh


def control_kind(lim: p.GridLimit) -> p.ControlKind:
    if lim.source is p.LimitSource.FAILSAFE or lim.id == "failsafe":
        return p.ControlKind.FAILSAFE
    return p.ControlKind.LIMIT


def limit_key(lim: p.GridLimit) -> tuple[object, ...]:
    """What makes a limit message another control action than the one in force (a heartbeat
    republishing the same limit with a later valid_until does not)."""
    return (control_kind(lim).value, lim.id, lim.power_w, tuple(lim.current_a) if lim.current_a else None,
            lim.scope.value if lim.scope else None)


@dataclass(frozen=True, slots=True)
class NodeView:
    id: str
    meter: str | None
    limits: tuple[float | None, float | None, float | None]
    evses: tuple[tuple[str, tuple[int, ...]], ...]  # EVSEs below: (id, grid phase 0..2 of each EVSE phase)


def node_views(cfg: Config) -> list[NodeView]:
    out = []
    for c in cfg.all_circuits():
        below = {x.id for x in c.walk()}
        pl = c.phase_limits()
        lim: tuple[float | None, float | None, float | None] = (pl[0], pl[1], pl[2]) if pl else (None, None, None)
        evs = tuple((e.id, tuple(ph - 1 for ph in e.phase_rotation)) for e in cfg.evses if e.circuit in below)
        out.append(NodeView(c.id, c.meter, lim, evs))
    return out


def house_load(measured: list[float], evse_draws: dict[str, list[float]], node: NodeView) -> list[float]:
    """The node's non-EV load per grid phase: measured minus what the EVSEs below draw (each EVSE phase on
    its grid phase), floored at 0."""
    out = list(measured)
    for evse_id, rotation in node.evses:
        drawn = evse_draws.get(evse_id)
        if not drawn:
            continue
        for k, grid_phase in enumerate(rotation):
            if k < len(drawn):
                out[grid_phase] -= drawn[k]
    return [max(0.0, x) for x in out]


class Mean:
    """Per-phase mean of samples (1 s sample-and-hold gives the time-weighted mean of a minute)."""

    __slots__ = ("n", "sums")

    def __init__(self) -> None:
        self.sums = [0.0, 0.0, 0.0]
        self.n = 0

    def add(self, v: list[float]) -> None:
        for k in range(3):
            self.sums[k] += v[k]
        self.n += 1

    def value(self) -> list[float] | None:
        return [s / self.n for s in self.sums] if self.n else None
