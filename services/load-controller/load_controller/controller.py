"""One control step: inputs + memory + now -> decision + new memory. Pure: no I/O, no clock.

``step`` turns the bus state (EVSE status, meter readings, grid and EVSE limits, tariffs, the SMGW
link) and the controller's memory (what it granted before and since when: hysteresis, overdraw
penalties, phase modes, reclaimed current, the failsafe) into a :class:`solver.Problem`, solves it
and returns per EVSE the current, the phase count and the constraint or rule that bound it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from chargegate import payloads as p
from chargegate.config import Controller
from load_controller import modes as modes_mod
from load_controller import rules as rules_mod
from load_controller.limits import FailsafeState, failsafe_state, limit_group
from load_controller.solver import INF, PHASE_NAMES, Demand, Fixed, Group, Mode, Node, Problem, Solution, solve
from load_controller.topology import EvseSpec, Topology

WANT_IEC = frozenset({p.IecState.B, p.IecState.C, p.IecState.D})
NO_WANT_IEC = frozenset({p.IecState.A, p.IecState.E, p.IecState.F})
WANT_STATES = frozenset({p.EvseState.PREPARING, p.EvseState.CHARGING, p.EvseState.SUSPENDED})
DEAD_STATES = frozenset({p.EvseState.FAULTED, p.EvseState.UNAVAILABLE, p.EvseState.OFFLINE})


@dataclass(slots=True)
class Inputs:
    """Everything the controller knows from the bus (latest valid message per topic)."""

    statuses: dict[str, p.EvseStatus] = field(default_factory=dict)
    readings: dict[str, p.MeterReading] = field(default_factory=dict)
    grid_limits: dict[str, p.GridLimit] = field(default_factory=dict)  # by source
    evse_limits: dict[str, p.EvseLimit] = field(default_factory=dict)
    tariff_current: p.TariffCurrent | None = None
    tariff_schedule: p.TariffSchedule | None = None
    link: p.SmgwLinkStatus | None = None
    setpoints: dict[str, p.Setpoint] = field(default_factory=dict)  # in force (retained, e.g. before a restart)
    services: dict[str, p.Health] = field(default_factory=dict)  # service health (event-driven publishers)
    modes: dict[str, p.ChargingMode] = field(default_factory=dict)  # charging mode per EVSE (evse/<id>/mode)


@dataclass(slots=True)
class EvseMemory:
    granted: float = 0.0
    nph: int = 3
    phases: tuple[int, ...] = ()
    wanted: bool = False
    on_since: datetime | None = None  # charging (granted > 0) since
    off_since: datetime | None = None  # paused by the controller while the car wanted power, since
    changed_at: datetime | None = None  # grant last changed
    raised_at: datetime | None = None  # grant last increased
    reclaim_cap: float | None = None  # the car draws less: cap handed back when it wants more
    used_phases: tuple[int, ...] | None = None  # EVSE-frame phases a car draws on (None: all); imbalance only
    three_fit_since: datetime | None = None  # in 1-phase mode: 3 phases at the minimum fit since
    plugged_at: datetime | None = None
    offline_assumed: float | None = None  # while offline: the current it is assumed to draw
    measured: bool = False  # this session it has reported a real draw (its meter can be trusted for reclaim)
    seen_phases: tuple[int, ...] | None = None  # phase detection: EVSE-frame phases drawn on in every measurement
    seen_since: datetime | None = None  # ... since (the measurement's time)
    one_phase_car: bool = False  # a switching EVSE's car draws on L1 only: told 1 phase for the rest of the session
    switch_pause: bool = False  # paused to switch to 1 phase: resumes at once when the EVSE confirms 1 phase
    settle_from: float | None = None  # cut from this grant: it may draw that much until seen following the cut
    settle_since: datetime | None = None  # ... since (the latest cut)

    def copy(self) -> EvseMemory:
        return EvseMemory(self.granted, self.nph, self.phases, self.wanted, self.on_since, self.off_since,
                          self.changed_at, self.raised_at, self.reclaim_cap, self.used_phases,
                          self.three_fit_since, self.plugged_at, self.offline_assumed, self.measured,
                          self.seen_phases, self.seen_since, self.one_phase_car, self.switch_pause,
                          self.settle_from, self.settle_since)


@dataclass(slots=True)
class Penalty:
    amount: float  # A (per phase, or summed over phases for a node's power limit)
    until: datetime
    set_at: datetime


@dataclass(slots=True)
class Memory:
    evses: dict[str, EvseMemory] = field(default_factory=dict)
    penalties: dict[tuple[int, int], Penalty] = field(default_factory=dict)  # (node, phase 0..2 | 3 power)
    meter_seen: dict[str, datetime] = field(default_factory=dict)  # newest reading checked for overdraw
    non_ev: dict[int, list[float]] = field(default_factory=dict)  # last known non-EV load per node
    # (node, EVSE id) -> (when the EVSE's current was measured, the non-EV load per phase fixed then): the
    # floor of the node's non-EV load until that EVSE's next measurement (see _ev_floor)
    ev_refs: dict[tuple[int, str], tuple[datetime, list[float]]] = field(default_factory=dict)
    failsafe: FailsafeState | None = None
    failsafe_cleared_at: datetime | None = None  # ended early by a new limit at (its triggers are spent)
    imbalance_caps: list[float] | None = None  # warm start for the phase-imbalance bound
    cycle: int = 0


@dataclass(slots=True)
class EvseDecision:
    evse_id: str
    current: float
    phases: int
    bound_by: str
    detail: str | None
    wanted: bool
    online: bool
    mode: str | None = None  # the charging mode in force (None: no mode message, the rules)


@dataclass(slots=True)
class Decision:
    cycle: int
    evses: list[EvseDecision]
    limits: dict[str, Any]
    warnings: list[str]
    solution: Solution


def wants_power(st: p.EvseStatus) -> bool:
    """Whether a car is connected and may charge: IEC 61851 B, C or D (else the derived state)."""
    if st.state in DEAD_STATES:
        return False
    if st.iec_state in WANT_IEC:
        return True
    if st.iec_state in NO_WANT_IEC:
        return False
    return st.state in WANT_STATES


def meter_currents(r: p.MeterReading, voltage: float) -> list[float] | None:
    """Per-phase currents (signed, import positive) of a reading, from currents or phase powers."""
    if r.current_a is not None:
        return list(r.current_a)
    if r.power_phase_w is not None:
        return [w / voltage for w in r.power_phase_w]
    if r.power_w is not None:
        return [r.power_w / voltage / 3] * 3
    return None


_OFF_TEXT: dict[tuple[p.EvseState, p.IecState | None], tuple[str, str]] = {}


def _off_text(state: p.EvseState, iec: p.IecState | None) -> tuple[str, str]:
    """bound_by and detail of an EVSE that does not want power (the same few texts every cycle: made once)."""
    key = (state, iec)
    got = _OFF_TEXT.get(key)
    if got is None:
        if state in DEAD_STATES:
            label = f"evse_state:{state.value}"
        elif iec in (p.IecState.E, p.IecState.F):
            label = f"evse_state:{iec.value}"  # type: ignore[union-attr]
        else:
            label = "not_connected"
        got = _OFF_TEXT[key] = (label, f"state {state.value}" + (f", IEC {iec.value}" if iec else ""))
    return got


_LABELS: weakref.WeakKeyDictionary[Topology, list[tuple[str, str, str, str]]] = weakref.WeakKeyDictionary()


def _node_labels(topo: Topology) -> list[tuple[str, str, str, str]]:
    """The constraint labels of each node (node:<id>:L1..L3, node:<id>:power), made once per topology."""
    got = _LABELS.get(topo)
    if got is None:
        got = _LABELS[topo] = [(f"node:{nd.id}:L1", f"node:{nd.id}:L2", f"node:{nd.id}:L3", f"node:{nd.id}:power")
                               for nd in topo.nodes]
    return got


def _mode(ctx: tuple[Any, ...], nph: int, phases: tuple[int, ...], asym: tuple[int, ...] | None = None,
          carry: bool = False) -> Mode:
    """One way the EVSE of ``ctx`` (made in ``step``) can charge: its cap (the EVSE, its limits, a power
    limit per phase count) and the ramp from its grant (``carry``: the grant carries over to ``nph``)."""
    cap_a, lab, det, cap_w, wlab, ramp_to, ramp_nph, min_a, v, ramp_detail = ctx
    hi, hl, hd = cap_a, lab, det
    if cap_w < INF:
        w = cap_w / (v * len(phases))
        if w < hi:
            hi, hl, hd = w, wlab, f"limit {cap_w:.0f} W"
    r = ramp_to if ramp_nph and (ramp_nph == nph or carry) else min_a
    if r < hi - 1e-9:
        hi, hl, hd = r, "ramp", ramp_detail
    return Mode(nph, phases, hi, hl, hd, asym)


_FMT: dict[tuple[datetime, timedelta | None], str] = {}


def _fmt(ts: datetime) -> str:
    """ISO 8601 to the second; the same few instants (pauses, limits, penalties) every cycle: kept (by the
    instant and its UTC offset: equal instants in other offsets are written differently)."""
    key = (ts, ts.utcoffset())
    got = _FMT.get(key)
    if got is None:
        if len(_FMT) > 4096:
            _FMT.clear()
        got = _FMT[key] = ts.isoformat(timespec="seconds")
    return got


def _age(now: datetime, ts: datetime) -> float:
    return (now - ts).total_seconds()


def initial_memory(e: EvseSpec, sp: p.Setpoint | None, st: p.EvseStatus | None = None,
                   now: datetime | None = None) -> EvseMemory:
    """Memory for an EVSE the controller has not decided on yet (start-up): the setpoint in force. An EVSE
    that reports more applied than that setpoint has not followed it yet: it settles from there."""
    if sp is not None and sp.source == "load-controller":
        m = EvseMemory(granted=sp.current_a, nph=sp.phases, wanted=sp.current_a > 0, changed_at=sp.ts,
                       raised_at=sp.ts)
        applied = st.applied.current_a if st is not None and st.applied is not None else None
        if applied is not None and applied > sp.current_a + 1e-9:
            m.settle_from, m.settle_since = min(applied, e.max_a), now or sp.ts
        return m
    return EvseMemory(nph=e.phases)


def _followed(cfg: Controller, e: EvseSpec, m: EvseMemory, st: p.EvseStatus, recent: bool) -> bool:
    """Whether an EVSE that was cut is seen following it: a status measured after the cut, with the setpoint
    applied (when it reports one) and a draw at most the new grant (within the overdraw tolerance)."""
    if not recent or m.settle_since is None:
        return False
    at = st.measured_at or st.ts
    if at <= m.settle_since:
        return False
    if st.applied is not None and st.applied.current_a > m.granted + 1e-6:
        return False
    if not st.plausible:
        return False
    return max(st.current_a) <= m.granted + cfg.overdraw_tolerance_a


def assumed_draw(e: EvseSpec, m: EvseMemory, st: p.EvseStatus | None) -> float:
    """What an EVSE that cannot be read is assumed to draw: the most it was last allowed (by us, as
    applied, or its own safe current that it falls back to without setpoints), at most its maximum."""
    applied = st.applied.current_a if st is not None and st.applied is not None else 0.0
    return min(e.max_a, max(m.granted, applied, e.safe_a))


def step(topo: Topology, cfg: Controller, tz: ZoneInfo, inputs: Inputs, memory: Memory,
         now: datetime) -> tuple[Decision, Memory]:
    v = cfg.voltage_v
    warnings: list[str] = []
    evses = topo.evses
    n_e = len(evses)
    new = Memory(penalties={k: pen for k, pen in memory.penalties.items() if pen.until > now},
                 meter_seen=dict(memory.meter_seen), non_ev=dict(memory.non_ev), cycle=memory.cycle + 1)

    # -- EVSE observations ------------------------------------------------------------------------
    statuses: list[p.EvseStatus | None] = [inputs.statuses.get(e.id) for e in evses]
    fresh = [False] * n_e
    recent = [False] * n_e  # the status (its measurement) itself is younger than evse_timeout_s
    wants = [False] * n_e
    meas: list[list[float] | None] = [None] * n_e  # measured current per grid phase
    live_sources = {name for name, h in inputs.services.items()
                    if name in cfg.event_driven_sources and h.status != p.HealthStatus.OFFLINE
                    and _age(now, h.ts) <= cfg.publisher_timeout_s}
    evse_timeout_s = cfg.evse_timeout_s
    offline_state = p.EvseState.OFFLINE
    for e in evses:
        i = e.index
        st = statuses[i]
        if st is None:
            continue
        rec = recent[i] = (now - st.ts).total_seconds() <= evse_timeout_s
        ok = st.online and st.state != offline_state and (rec or st.source in live_sources)
        fresh[i] = ok
        if not ok:
            continue
        wants[i] = wants_power(st)
        if st.plausible:
            cur = st.current_a
            applied = st.applied
            if applied is not None:
                # a car draws at most what its EVSE allows now: a higher measurement predates the setpoint (an
                # OCPP wallbox's currents come with its MeterValues, up to a sample interval old) and would
                # understate the non-EV load behind the meter
                a_max = applied.current_a
                cur = [min(a, a_max) for a in cur]
            g = [0.0, 0.0, 0.0]
            rot = e.rotation
            if e.phases == 3:
                g[rot[0]] += cur[0]
                g[rot[1]] += cur[1]
                g[rot[2]] += cur[2]
            else:
                g[rot[0]] += cur[0]
            meas[i] = g

    # -- how old each EV measurement is: an OCPP wallbox's currents come with its MeterValues -------------
    # (``measured_at``), a polled EVSE's are as of its status (age 0 while it is fresh). Beyond
    # ev_current_max_age_s a measurement is not subtracted from a meter: the car may draw less by now
    mage = [0.0] * n_e
    sub: list[list[float] | None] = list(meas)  # what is subtracted from the meters above each EVSE
    timed = False  # some EVSE's subtracted current has its own measurement time (only they fix a floor)
    for e in evses:
        st = statuses[e.index]
        if meas[e.index] is None or st is None or st.measured_at is None:
            continue
        mage[e.index] = _age(now, st.measured_at)
        if mage[e.index] <= cfg.ev_current_max_age_s:
            timed = True
        else:
            sub[e.index] = None
            if max(meas[e.index] or (0.0,)) > 0.0:
                warnings.append(f"evse {e.id}: its current was measured {mage[e.index]:.0f} s ago (more than "
                                f"ev_current_max_age_s): the meters count it as other load")

    # -- metered nodes: non-EV load, stale meters, overdraw ------------------------------------------
    non_ev: dict[int, list[float] | None] = {}
    meter_cur: dict[str, list[float]] = {}
    stale_nodes: list[int] = []
    for n, mid in topo.metered:
        r = inputs.readings.get(mid)
        cur = None
        if r is not None and r.online and r.plausible and _age(now, r.ts) <= cfg.meter_timeout_s:
            cur = meter_currents(r, v)
        if cur is None or r is None:
            non_ev[n] = None
            stale_nodes.append(n)
            continue
        meter_cur[mid] = cur
        evs = [0.0, 0.0, 0.0]
        for i in topo.below[n]:
            mi = sub[i]
            if mi is not None:
                evs[0] += mi[0]
                evs[1] += mi[1]
                evs[2] += mi[2]
        ne = [max(0.0, cur[k] - evs[k]) for k in range(3)]
        floor = _ev_floor(cfg, topo, n, cur, _age(now, r.ts), sub, mage, statuses, memory, new) if timed else None
        if floor is not None:
            ne = [max(ne[k], floor[k]) for k in range(3)]
        seen = memory.meter_seen.get(mid)
        last_ne = memory.non_ev.get(n)
        if seen is not None and r.ts <= seen and last_ne is not None:
            # the reading an earlier cycle used already, against newer EV currents: the cars may have ramped up
            # since the meter was read (a silent meter within meter_timeout_s), so the difference can only
            # understate the non-EV load - it may grow, but only a new reading lowers it
            ne = [max(ne[k], last_ne[k]) for k in range(3)]
        non_ev[n] = ne
        new.non_ev[n] = ne
        if seen is None or r.ts > seen:
            new.meter_seen[mid] = r.ts
            node = topo.nodes[n]
            # An overdraw is answered at once by the capacities below (they follow the measured non-EV load).
            # The penalty is only for draw the controller did not grant: EVSEs drawing more than they were
            # allowed (cars or devices not following); load the meter already shows is not counted twice.
            over: list[float] | None = None
            for k in range(3):
                lim = node.limits[k]
                if lim < INF and cur[k] > lim + cfg.overdraw_tolerance_a:
                    over = over if over is not None else _not_following(topo, n, sub, memory)
                    amount = min(cur[k] - lim, over[k])
                    if amount > cfg.overdraw_tolerance_a:
                        _penalise(new, (n, k), amount, lim, now, cfg)
                    warnings.append(f"overdraw at node {node.id} {PHASE_NAMES[k]}: {cur[k]:.1f} A > {lim:g} A"
                                    + (f" ({amount:.1f} A drawn beyond the grants: cut)"
                                       if amount > cfg.overdraw_tolerance_a else " (the load behind the meter rose)"))
            if node.max_power_w < INF:
                pw = r.power_w if r.power_w is not None else sum(cur) * v
                if pw > node.max_power_w + cfg.overdraw_tolerance_a * v:
                    over = over if over is not None else _not_following(topo, n, sub, memory)
                    amount = min((pw - node.max_power_w) / v, sum(over))
                    if amount > cfg.overdraw_tolerance_a:
                        _penalise(new, (n, 3), amount, node.max_power_w / v, now, cfg)
                    warnings.append(f"overdraw at node {node.id}: {pw:.0f} W > {node.max_power_w:.0f} W")
    for n in stale_nodes:
        nd = topo.nodes[n]
        warnings.append(f"meter {nd.meter} of node {nd.id} is unknown (silent, offline, invalid or never heard): "
                        f"its capacity is taken as used, beyond an unmetered allowance of "
                        f"{cfg.unmetered_allowance_a:g} A per phase")

    # -- node capacities ------------------------------------------------------------------------------
    # A node whose meter is unknown (never heard since start, silent past meter_timeout_s, offline or
    # implausible) is taken as fully used: only what the installer declares safe to draw without a meter
    # (unmetered_allowance_a per phase, default 0) is left for the EVSEs below it. The same before and after
    # a restart: nothing remembered from before the silence counts.
    reserve = cfg.reserve_a
    allow = cfg.unmetered_allowance_a
    nodes: list[Node] = []
    node_labels = _node_labels(topo)
    penalties = new.penalties
    for nd in topo.nodes:
        n = nd.index
        stale = n in non_ev and non_ev[n] is None
        ne = non_ev.get(n) or [0.0, 0.0, 0.0]
        if not stale and nd.max_power_w == INF and (not penalties or not any((n, k) in penalties for k in range(4))):
            # the common case: no meter trouble, no penalty, no power limit
            lim = nd.limits
            caps = [INF if lim[k] == INF else max(0.0, lim[k] - reserve - ne[k]) for k in range(3)]
            nodes.append(Node(nd.id, nd.parent, caps, INF, list(node_labels[n]), [None, None, None, None]))
            continue
        labels = list(node_labels[n])
        details: list[str | None] = [None, None, None, None]
        caps = []
        unknown = "" if not stale else (
            f"meter {nd.meter} unknown (silent, offline or never heard): node:{nd.id} is taken as fully "
            f"used; " + (f"the EVSEs below share the unmetered allowance of {allow:g} A per phase"
                         if allow > 0 else "charging below it is paused (unmetered_allowance_a is 0)"))
        for k in range(3):
            lim = nd.limits[k]
            if lim == INF and not stale:
                caps.append(INF)
                continue
            if stale:
                c = min(lim - reserve, allow)
                labels[k] = "stale_meter"
                details[k] = unknown
            else:
                c = lim - reserve - ne[k]
            pen = new.penalties.get((n, k))
            if pen is not None:
                c -= pen.amount
                labels[k] = "overdraw_penalty"
                details[k] = (f"node:{nd.id}:{PHASE_NAMES[k]} was overdrawn: {pen.amount:.1f} A cut until "
                              f"{_fmt(pen.until)}")
            caps.append(max(0.0, c))
        total = INF
        if nd.max_power_w < INF or stale:
            t = nd.max_power_w / v - 3 * reserve
            if stale:
                t = min(t, 3 * allow)
                labels[3] = "stale_meter"
                details[3] = unknown
            else:
                t -= sum(ne)
            pen = new.penalties.get((n, 3))
            if pen is not None:
                t -= pen.amount
                labels[3] = "overdraw_penalty"
                details[3] = f"node:{nd.id}:power was overdrawn: {pen.amount * v:.0f} W cut until {_fmt(pen.until)}"
            total = max(0.0, t)
        nodes.append(Node(id=nd.id, parent=nd.parent, cap=caps, total=total, labels=labels, details=details))

    # -- grid limits and the failsafe -------------------------------------------------------------------
    groups: list[Group] = []
    ctrl_groups: list[int] = []
    limit_infos: list[dict[str, Any]] = []
    root = topo.root
    root_metered = root.meter is not None
    ne_root = non_ev.get(0) if root_metered else None
    for src in sorted(inputs.grid_limits):
        lim = inputs.grid_limits[src]
        if not lim.binding(now):
            limit_infos.append({"source": lim.source.value, "active": lim.active,
                                "expired": now >= lim.valid_until, "valid_until": _fmt(lim.valid_until)})
            continue
        scope = lim.scope.value if lim.scope is not None else cfg.grid_limit_scope
        lg = limit_group(source=lim.source.value, power_w=lim.power_w, current_a=lim.current_a, scope=scope,
                         cfg=cfg, floor_w=topo.floor_w, non_ev_root=ne_root, root_metered=root_metered,
                         valid_until=lim.valid_until)
        groups.append(lg.group)
        if lg.controllable_only:
            ctrl_groups.append(len(groups) - 1)
        limit_infos.append(lg.info)
        if lg.warning:
            warnings.append(lg.warning)
    fs, new.failsafe_cleared_at = failsafe_state(cfg, inputs.grid_limits, memory.failsafe, now,
                                                 memory.failsafe_cleared_at)
    new.failsafe = fs
    fs_info: dict[str, Any] | None = None
    if fs is not None:
        lg = limit_group(source="failsafe", power_w=fs.power_w, current_a=None, scope=cfg.grid_limit_scope,
                         cfg=cfg, floor_w=topo.floor_w, non_ev_root=ne_root, root_metered=root_metered,
                         valid_until=fs.until)
        lg.group.detail = lg.group.detail or f"failsafe {fs.power_w:.0f} W until {_fmt(fs.until)} ({fs.cause})"
        groups.append(lg.group)
        if lg.controllable_only:
            ctrl_groups.append(len(groups) - 1)
        fs_info = {"cause": fs.cause, "since": _fmt(fs.since), "until": _fmt(fs.until), "power_w": fs.power_w,
                   **{k: lg.info[k] for k in ("scope", "effective_w", "raised_to_floor")}}
        warnings.append(f"failsafe {fs.power_w:.0f} W until {_fmt(fs.until)}: {fs.cause}")
        if lg.warning:
            warnings.append(lg.warning)

    # -- charging rules -----------------------------------------------------------------------------------
    mems: list[EvseMemory] = []
    for e in evses:
        m = memory.evses.get(e.id)
        if m is None:
            m = initial_memory(e, inputs.setpoints.get(e.id), statuses[e.index], now)
        mems.append(m)
    outcome = rules_mod.RuleOutcome()
    by_mode = modes_mod.apply(cfg.rules, inputs.modes, [e.id for e in evses])
    active_rules = by_mode.rules
    rule_groups_of: dict[int, list[int]] = {}
    if active_rules:
        views = []
        if any(not r.evses for r in active_rules if r.enabled):
            ruled = evses
        else:
            wanted_ids = {i for r in active_rules if r.enabled for i in r.evses}
            ruled = [e for e in evses if e.id in wanted_ids]
        for e in ruled:
            m = mems[e.index]
            st = statuses[e.index]
            mi = meas[e.index]
            pw = 0.0
            sess_wh = None
            sess_start = m.plugged_at
            if st is not None and fresh[e.index]:
                if st.power_w is not None and st.plausible:
                    pw = max(st.power_w, 0.0)
                elif mi is not None:
                    pw = sum(mi) * v
                if st.session is not None:
                    sess_start = st.session.started
                    sess_wh = st.session.energy_wh
                    if not sess_wh and st.session.energy_start_wh is not None and st.energy_wh is not None:
                        sess_wh = max(0.0, st.energy_wh - st.session.energy_start_wh)
            protected = (m.granted > 0 and m.on_since is not None
                         and _age(now, m.on_since) < cfg.min_charge_time_s)
            views.append(rules_mod.EvseRuleView(
                index=e.index, id=e.id, wants=wants[e.index], charging=m.granted > 0, protected=protected,
                min_a=e.min_a, max_a=e.max_a, phases=e.phases, switching=e.switching, power_w=pw,
                session_energy_wh=sess_wh, session_start=sess_start))
        surplus: dict[str | None, float | None] = {}
        for rule in active_rules:
            if rule.type == "solar":
                mid = rule.meter or root.meter
                cur = meter_cur.get(mid) if mid else None
                r = inputs.readings.get(mid) if mid else None
                if cur is None or r is None:
                    surplus[rule.meter] = None
                else:
                    pw = r.power_w if r.power_w is not None else sum(cur) * v
                    surplus[rule.meter] = -pw
        outcome = rules_mod.evaluate(active_rules, views, now=now, tz=tz, voltage=v,
                                     tariff=rules_mod.tariff_level(inputs.tariff_current, inputs.tariff_schedule, now),
                                     surplus_w=surplus, all_ids=[e.id for e in evses])
        for rg in outcome.groups:
            groups.append(Group(label=f"rule:{rg.rule_id}", total=rg.total_a, detail=rg.detail))
            gi = len(groups) - 1
            for i in rg.members:
                rule_groups_of.setdefault(i, []).append(gi)
    for e in evses:  # charging mode off: paused whatever the rules say (a session target included)
        why = by_mode.off.get(e.id)
        if why is not None:
            outcome.caps[e.index] = ("mode:off", why)

    # -- demands ---------------------------------------------------------------------------------------------
    ctrl_t = tuple(ctrl_groups)
    demands: list[Demand] = []
    fixed: list[Fixed] = []
    new_mems: list[EvseMemory] = []
    offline_assumed: dict[int, float] = {}
    settling: dict[int, float] = {}  # EVSE index -> what it may still draw (a cut it has not followed yet)
    step_a = cfg.ramp_step_a
    ramp_detail = f"rising by at most {step_a:g} A per cycle"
    min_gap = 0.9 * cfg.cycle_s
    for e in evses:
        i = e.index
        m = mems[i]
        st = statuses[i]
        gtuple = (ctrl_t if e.controllable else ()) + tuple(rule_groups_of.get(i, ()))
        if not fresh[i]:
            assumed = m.offline_assumed if m.offline_assumed is not None else assumed_draw(e, m, st)
            offline_assumed[i] = assumed
            nm = m.copy()
            nm.offline_assumed = assumed
            new_mems.append(nm)
            fixed.append(Fixed(e.id, e.node, e.grid_phases, assumed, ctrl_t if e.controllable else ()))
            why = "no status yet" if st is None else ("reported offline" if not st.online or
                                                       st.state == p.EvseState.OFFLINE else
                                                       f"status older than {cfg.evse_timeout_s:g} s"
                                                       + (f" and {st.source} is gone" if st.source in
                                                          cfg.event_driven_sources else ""))
            demands.append(Demand(e.id, e.node, e.min_a, [], 0, False, False, i, (), "evse_offline",
                                  f"{why}: assumed to draw {assumed:g} A"))
            continue
        assert st is not None
        if not wants[i]:
            new_mems.append(EvseMemory(0.0, e.phases))
            label, off_detail = _off_text(st.state, st.iec_state)
            demands.append(Demand(e.id, e.node, e.min_a, [], 0, False, False, i, (), label, off_detail))
            continue
        nm = m.copy()
        nm.offline_assumed = None
        nm.wanted = True
        if not m.wanted:
            nm.plugged_at = now
            nm.off_since = None
            nm.reclaim_cap = None
            nm.used_phases = None
            nm.seen_phases = nm.seen_since = None
            nm.one_phase_car = False
            nm.switch_pause = False
            nm.settle_from = nm.settle_since = None
        new_mems.append(nm)
        # a 1-phase setpoint keeps the car off L2/L3 only once the EVSE has applied it: until its status says
        # so (a device that cannot switch never does), the EVSE stays budgeted on all its phases
        confirmed1 = st.applied is not None and st.applied.phases == 1
        resume1 = e.switching and nm.switch_pause and confirmed1 and m.granted <= 0
        hold = hold_detail = None
        if (nm.off_since is not None and m.granted <= 0 and _age(now, nm.off_since) < cfg.min_pause_s
                and not resume1):
            hold = "min_pause"
            hold_detail = f"paused at {_fmt(nm.off_since)}, minimum pause {cfg.min_pause_s:g} s"
        cap_a, lab, det = e.max_a, "evse_max", None
        cap_w, wlab = INF, ""
        force1 = False
        el = inputs.evse_limits.get(e.id)
        if el is not None and el.active and now < el.valid_until:
            src = f"evse_limit:{el.source.value}"
            if el.current_a is not None and el.current_a < cap_a:
                cap_a, lab, det = el.current_a, src, f"limit {el.current_a:g} A until {_fmt(el.valid_until)}"
            if el.power_w is not None:
                cap_w, wlab = el.power_w, src
            if el.phases == 1 and e.switching:
                force1 = True
        um = inputs.modes.get(e.id)  # the household's cap (Home Assistant's number, the web page): only lowers
        if um is not None and um.max_current_a is not None and um.max_current_a < cap_a:
            who = f" (set by {um.set_by})" if um.set_by else ""
            cap_a, lab, det = um.max_current_a, "mode:max_current", f"maximum {um.max_current_a:g} A{who}"
        rc = outcome.caps.get(i)
        if rc is not None:
            cap_a, lab, det = 0.0, rc[0], rc[1]
        if nm.reclaim_cap is not None and nm.reclaim_cap < cap_a:
            cap_a, lab, det = nm.reclaim_cap, "reclaim", f"the car draws less: {nm.reclaim_cap:g} A until it wants more"
        # a cut this EVSE has not been seen following yet: it may still draw what it had (see _hold_raises)
        if nm.settle_from is not None:
            if (_followed(cfg, e, m, st, recent[i]) or nm.settle_since is None
                    or _age(now, nm.settle_since) >= cfg.decrease_settle_s or nm.settle_from <= m.granted + 1e-9):
                nm.settle_from = nm.settle_since = None
            else:
                settling[i] = nm.settle_from
        can_raise = m.raised_at is None or (now - m.raised_at).total_seconds() >= min_gap
        # what every mode of this EVSE starts from: the cap, a power limit, the ramp from its grant
        if m.granted > 0:
            ramp_to = m.granted + (step_a if can_raise else 0.0)
            ramp_nph = m.nph
        else:
            ramp_to = e.min_a
            ramp_nph = 0

        mctx = (cap_a, lab, det, cap_w, wlab, ramp_to, ramp_nph, e.min_a, v, ramp_detail)

        one = (e.rotation[0],)
        # Phase detection never frees a phase the car could use: a 3-phase EVSE is budgeted on all its
        # phases unless it is told to use 1 phase (a switching EVSE whose car draws on L1 only). Phases a car
        # is seen drawing on only count for the phase imbalance (README, "Phase detection").
        used = nm.used_phases if e.phases == 3 else None
        asym3 = tuple(sorted(e.rotation[k] for k in used)) if used else None
        three = e.grid_phases
        three_track = None
        one_probe = None
        if e.switching:
            # 1 phase: on L1 once confirmed, else on all phases (counted on L1 for the imbalance, as commanded)
            one_b, one_asym = (one, None) if confirmed1 else (e.grid_phases, one)
            if force1:
                modes = [_mode(mctx, 1, one_b, one_asym)]
            elif nm.one_phase_car:
                # a 1-phase car: 1 phase for the rest of the session (no flapping back to 3); the switch itself
                # keeps its current (the car drew it on L1 already)
                modes = [_mode(mctx, 1, one_b, one_asym, carry=m.nph == 3)]
            elif resume1:
                modes = [_mode(mctx, 1, one)]  # paused to switch, the EVSE has switched: go on on L1
            elif m.granted > 0 and m.nph == 1:
                waited = m.three_fit_since is not None and _age(now, m.three_fit_since) >= cfg.phase_switch_delay_s
                if waited:
                    modes = [_mode(mctx, 3, three), _mode(mctx, 1, one_b, one_asym)]
                else:
                    modes = [_mode(mctx, 1, one_b, one_asym)]
                    three_track = e.grid_phases
            else:
                modes = [_mode(mctx, 3, three, asym3), _mode(mctx, 1, one_b, one_asym)]
                if not confirmed1:
                    one_probe = one  # paused: would its minimum fit on L1 once switched?
        elif e.phases == 3:
            modes = [_mode(mctx, 3, three, asym3)]
        else:
            modes = [_mode(mctx, 1, one)]
        charging = m.granted > 0
        protected = (charging and m.on_since is not None
                     and (now - m.on_since).total_seconds() < cfg.min_charge_time_s)
        # positional (the order of Demand's fields): much cheaper than keywords, 1000 times a cycle
        demands.append(Demand(e.id, e.node, e.min_a, modes, e.priority, protected, charging, i, gtuple,
                              "not_connected", None, three_track, one_probe, hold, hold_detail))

    # -- solve ------------------------------------------------------------------------------------------------
    problem = Problem(nodes=nodes, demands=demands, groups=groups, fixed=fixed,
                      imbalance_limit=cfg.imbalance_limit_a, step=cfg.current_step_a,
                      imbalance_caps=memory.imbalance_caps)
    sol = solve(problem)
    _hold_raises(topo, sol, nodes, fixed, mems, settling, fresh, wants, offline_assumed)
    if sol.imbalance_bound and sol.imbalance_caps is not None:
        # start from here next cycle, one ramp step looser (a tighter bound is only ever safer)
        new.imbalance_caps = [c + cfg.ramp_step_a for c in sol.imbalance_caps]
    for r in sol.repairs:
        warnings.append(f"final safety check cut a grant: {r}")

    # -- decisions and the next memory -------------------------------------------------------------------------
    out: list[EvseDecision] = []
    grants = sol.grants
    max_age = cfg.ev_current_max_age_s
    new_evses: dict[str, EvseMemory] = {}
    for e in evses:
        i = e.index
        g = grants[i]
        m = mems[i]
        nm = new_mems[i]
        new_evses[e.id] = nm
        if i in offline_assumed:
            assumed = offline_assumed[i]
            cut = sol.fixed_cut.get(e.id)
            cur = 0.0 if cut else assumed
            detail = g.detail if not cut else f"{g.detail}; overcommitted under {cut}: told to pause"
            nph = m.nph if m.granted > 0 else e.phases
            nm.granted = cur
            out.append(EvseDecision(e.id, cur, nph, "evse_offline", detail, False, False))
            continue
        if not wants[i]:
            out.append(EvseDecision(e.id, 0.0, e.phases, g.bound_by, g.detail, False, True))
            continue
        st = statuses[i]
        cur = g.current
        nph = g.nph
        detail = g.detail
        was = m.granted
        was_nph = m.nph
        if cur <= 0 and g.one_fits:
            # 3 phases do not fit but 1 would: paused and told 1 phase, resumes on L1 once the EVSE confirms it
            nph = 1
            detail = f"{detail}; told 1 phase, resumes on L1 once the EVSE has switched"
        nm.switch_pause = cur <= 0 and nph == 1 and e.switching and (bool(g.one_fits) or nm.switch_pause)
        nm.granted = cur
        nm.nph = nph
        nm.phases = g.phases
        # a pause to switch to 1 phase does not end the charging session (minimum charging time, rules)
        if cur > 0 and was <= 0:
            if not (m.switch_pause and nph == 1 and m.on_since is not None):
                nm.on_since = now
            nm.off_since = None
        elif cur <= 0 and was > 0:
            if not nm.switch_pause:
                nm.on_since = None
            nm.off_since = now
        if cur < was - 1e-9:  # a cut: it may draw the old grant until it is seen following
            nm.settle_from = max(nm.settle_from or 0.0, was)
            nm.settle_since = now
        if abs(cur - was) > 1e-9 or nph != was_nph:
            nm.changed_at = now
        if cur > was + 1e-9:
            nm.raised_at = now
        if nph != was_nph:
            nm.used_phases = None
            nm.reclaim_cap = None
        if e.switching and nph == 1 and cur > 0:
            nm.three_fit_since = (m.three_fit_since or now) if g.three_fits else None
        else:
            nm.three_fit_since = None
        if st is not None and recent[i] and mage[i] <= max_age:  # only on a recent measurement
            _reclaim(cfg, e, m, nm, st, now)
            _detect_phases(cfg, e, m, nm, st)
        out.append(EvseDecision(e.id, cur, nph, g.bound_by, detail, True, True))
    new.evses = new_evses
    if by_mode.names:
        for d in out:
            d.mode = by_mode.names.get(d.evse_id)

    limits: dict[str, Any] = {
        "grid_limits": limit_infos,
        "failsafe": fs_info,
        "floor_14a_w": round(topo.floor_w, 1),
        "controllable_evses": topo.n_controllable,
        "stale_meters": [topo.nodes[n].meter for n in stale_nodes],
        "penalties": {f"node:{topo.nodes[n].id}:{'power' if k == 3 else PHASE_NAMES[k]}":
                      {"amount_a": round(pen.amount, 2), "until": _fmt(pen.until)}
                      for (n, k), pen in sorted(new.penalties.items())},
        "rules": outcome.info,
        "imbalance_a": round(sol.imbalance, 2),
        "usage_a": {k: round(x, 2) for k, x in sol.usage.items()},
        "capacity_a": {k: round(x, 2) for k, x in sol.capacity.items()},
        "warnings": warnings,
    }
    return Decision(cycle=new.cycle, evses=out, limits=limits, warnings=warnings, solution=sol), new


def _hold_raises(topo: Topology, sol: Solution, nodes: list[Node], fixed: list[Fixed], mems: list[EvseMemory],
                 settling: dict[int, float], fresh: list[bool], wants: list[bool],
                 offline_assumed: dict[int, float]) -> None:
    """Current freed by a cut goes to others only once the cut EVSE follows (safety rule 4: reductions act
    at once, increases wait). A car takes up to several seconds to follow a lower setpoint, while a raise
    is taken up at once: until then the cut EVSE may still draw its old grant (``settling``, and the cuts
    of this cycle). Where the node's capacity does not hold that next to the new grants, the EVSEs below it
    that this cycle would raise or start keep their previous grant instead (in place, on ``sol``). A node
    that cannot hold it even so has lost capacity (the house load rose): nothing is raised there, and the
    cuts stand."""
    may_draw: dict[int, float] = dict(settling)
    for e in topo.evses:
        i = e.index
        if i in offline_assumed or not fresh[i] or not wants[i]:
            continue
        if sol.grants[i].current < mems[i].granted - 1e-9:
            may_draw[i] = max(may_draw.get(i, 0.0), mems[i].granted)
    if not may_draw:
        return
    held: set[int] = set()
    # per node: what the EVSEs below it may draw beyond their new grants (summed in EVSE order, as ``below``)
    extras: dict[int, list[float]] = {}
    for i in sorted(may_draw):
        d = may_draw[i]
        g = sol.grants[i]
        if d > g.current:
            e = topo.evses[i]
            for n in topo.nodes[e.node].chain:
                extra = extras.get(n)
                if extra is None:
                    extra = extras[n] = [0.0, 0.0, 0.0]
                for k in e.grid_phases:
                    extra[k] += d - g.current
    if not extras:
        return
    for nd in topo.nodes:  # root first
        n = nd.index
        extra = extras.get(n)
        if extra is None or max(extra) <= 1e-9:
            continue
        below = topo.below[n]
        used = [0.0, 0.0, 0.0]
        below_set = set(below)
        for i in below:
            g = sol.grants[i]
            for k in g.phases:
                used[k] += g.current
        for f in fixed:
            if topo.evse_index.get(f.key) in below_set:
                for k in f.phases:
                    used[k] += f.current
        cap = nodes[n].cap
        over = any(used[k] + extra[k] > cap[k] + 1e-6 for k in range(3)) or (
            nodes[n].total < INF and sum(used) + sum(extra) > nodes[n].total + 1e-6)
        if not over:
            continue
        detail: str | None = None
        for i in below:
            g = sol.grants[i]
            m = mems[i]
            if i in held or g.current <= m.granted + 1e-9 or i in may_draw:
                continue
            held.add(i)
            if detail is None:  # the same for every EVSE held at this node
                cut_ids = ", ".join(topo.evses[j].id for j in below if j in may_draw)
                detail = (f"waits until {cut_ids} follow{'s' if ',' not in cut_ids else ''} a cut "
                          f"(node:{nd.id}; at most decrease_settle_s)")
            g.current = m.granted
            if m.granted > 0:
                g.nph, g.phases = m.nph, m.phases or g.phases
            g.bound_by = "settling"
            g.detail = detail


def _ev_floor(cfg: Controller, topo: Topology, n: int, cur: list[float], meter_age: float,
              sub: list[list[float] | None], mage: list[float], statuses: list[p.EvseStatus | None],
              memory: Memory, new: Memory) -> list[float] | None:
    """The floor of node ``n``'s non-EV load that EVSEs with non-continuous measurements (OCPP) fix.

    The non-EV load is the meter minus the EVs' currents. An OCPP wallbox reports its current only with
    its MeterValues: when its car lowers its draw on its own between two of them, the meter falls but the
    subtracted current does not, and the house looks lighter than it is. What the freed current is given
    to, the car takes back when it draws again: the fuse is overdrawn. So when such an EVSE's measurement
    is new (younger than ``ev_current_fresh_s``, and the meter's reading too), the non-EV load at that
    moment is fixed as a floor until its next measurement: the meter minus its current minus what every
    other EVSE below may draw at most (its fresh measurement, else the more of its measurement and what
    it is allowed). That floor never exceeds the true non-EV load (each EVSE draws at most what it is
    allowed), so it holds the estimate up while the car is below its measurement and costs nothing
    otherwise; a lower house load shows within one sample interval.
    """
    fresh_s = cfg.ev_current_fresh_s
    floor: list[float] | None = None
    upper_sum: list[float] | None = None
    upper: dict[int, list[float]] = {}
    for i in topo.below[n]:
        mi = sub[i]
        st = statuses[i]
        if mi is None or st is None or st.measured_at is None or max(mi) < 0.5:
            continue  # measured continuously, not counted, or not drawing: no floor from it
        e = topo.evses[i]
        key = (n, e.id)
        old = memory.ev_refs.get(key)
        if old is not None and old[0] == st.measured_at:
            ref = old[1]
        elif mage[i] <= fresh_s and meter_age <= fresh_s:
            if upper_sum is None:
                upper_sum = [0.0, 0.0, 0.0]
                for j in topo.below[n]:
                    ej = topo.evses[j]
                    u = _upper(cfg, ej, sub[j], mage[j], statuses[j], memory.evses.get(ej.id))
                    if u is not None:
                        upper[j] = u
                        for k in range(3):
                            upper_sum[k] += u[k]
            ui = upper.get(i, mi)
            ref = [max(0.0, cur[k] - mi[k] - (upper_sum[k] - ui[k])) for k in range(3)]
        else:
            continue  # its new measurement came late: no floor until the next one
        new.ev_refs[key] = (st.measured_at, ref)
        floor = ref if floor is None else [max(floor[k], ref[k]) for k in range(3)]
    return floor


def _upper(cfg: Controller, e: EvseSpec, mi: list[float] | None, age: float, st: p.EvseStatus | None,
           m: EvseMemory | None) -> list[float] | None:
    """What an EVSE (subtracted from its meters) may draw now at most, per grid phase."""
    if mi is None:
        return None
    if age <= cfg.ev_current_fresh_s:
        return mi
    allowed = max(st.applied.current_a if st is not None and st.applied is not None else 0.0,
                  m.granted if m is not None else 0.0)
    out = list(mi)
    for k in e.grid_phases:
        out[k] = max(out[k], allowed)
    return out


def _not_following(topo: Topology, n: int, sub: list[list[float] | None], memory: Memory) -> list[float]:
    """Per grid phase: how much the EVSEs below node ``n`` are measured drawing beyond what they were last
    granted (a car or device not following its setpoint)."""
    out = [0.0, 0.0, 0.0]
    for i in topo.below[n]:
        mi = sub[i]
        e = topo.evses[i]
        m = memory.evses.get(e.id)
        if mi is None or m is None:
            continue
        granted_on = (e.rotation[0],) if (e.phases == 1 or m.nph == 1) else e.grid_phases
        for k in range(3):
            allowed = m.granted if k in granted_on else 0.0
            out[k] += max(0.0, mi[k] - allowed)
    return out


def _penalise(mem: Memory, key: tuple[int, int], excess: float, limit: float, now: datetime,
              cfg: Controller) -> None:
    """Cut a node's capacity by the excess at once and keep the cut for ``overdraw_penalty_s``. A further
    overdraw within ``overdraw_settle_s`` (the EVSEs still reacting) does not add up."""
    old = mem.penalties.get(key)
    set_at = now
    if old is not None and _age(now, old.set_at) < cfg.overdraw_settle_s:
        amount = max(old.amount, excess)
        set_at = old.set_at  # the EVSEs are still settling from that cut: it does not restart the settle time
    elif old is not None:
        amount = old.amount + excess
    else:
        amount = excess
    amount = min(amount, limit)
    mem.penalties[key] = Penalty(amount=amount, until=now + timedelta(seconds=cfg.overdraw_penalty_s), set_at=set_at)


def _drawn(e: EvseSpec, nm: EvseMemory, st: p.EvseStatus) -> float:
    cur = st.current_a
    if e.phases == 1 or nm.nph == 1:
        return cur[0]
    used = nm.used_phases or (0, 1, 2)
    return max(cur[k] for k in used)


def _reclaim(cfg: Controller, e: EvseSpec, m: EvseMemory, nm: EvseMemory, st: p.EvseStatus,
             now: datetime) -> None:
    """Current a car does not draw is capped (and given to others); the cap goes when it draws up to it."""
    if st.plausible and max(st.current_a) >= 1.0:
        nm.measured = True
    if not cfg.reclaim or not st.plausible or m.granted <= 0 or nm.granted <= 0 or not nm.measured:
        # an EVSE that has never shown a draw may have no meter at all (currents read 0): not reclaimed
        nm.reclaim_cap = None if nm.granted <= 0 else nm.reclaim_cap
        return
    drawn = _drawn(e, nm, st)
    if nm.reclaim_cap is not None and drawn >= nm.reclaim_cap - max(cfg.reclaim_margin_a / 2, 1e-6):
        nm.reclaim_cap = None
        return
    stable = m.changed_at is not None and _age(now, m.changed_at) >= cfg.reclaim_after_s
    if stable and drawn < m.granted - cfg.reclaim_threshold_a:
        step = cfg.current_step_a
        cap = max(e.min_a, round((drawn + cfg.reclaim_margin_a) / step) * step)
        if cap < m.granted - 1e-9:
            nm.reclaim_cap = round(cap, 6)


def _detect_phases(cfg: Controller, e: EvseSpec, m: EvseMemory, nm: EvseMemory, st: p.EvseStatus) -> None:
    """Which phases a car on a 3-phase EVSE draws on, from its measured per-phase currents.

    Evidence is a measurement taken while the EVSE offered 3 phases (granted before and now, the applied
    setpoint not 1-phase) with a clear draw; detected when every such measurement for ``reclaim_after_s``
    showed the same phases (ramping or changing grants do not matter). Then:

    * a switching EVSE whose car draws on L1 only is told to use 1 phase for the rest of the session
      (``one_phase_car``): the EVSE itself then keeps the car off L2/L3, so they can be given to others;
    * otherwise the car stays budgeted on all phases (it may use the others at any moment: a car adding
      phases, a swap the status missed) and only the phase imbalance counts it on the phases it uses, until
      a measurement shows it drawing on another one.
    """
    offered3 = (nm.nph == 3 and m.nph == 3 and m.granted > 0 and nm.granted > 0
                and (st.applied is None or st.applied.phases == 3))
    if not cfg.phase_detection or e.phases != 3 or not st.plausible or not offered3:
        if nm.nph != 3 or nm.granted <= 0:
            nm.used_phases = None
        nm.seen_phases = nm.seen_since = None
        return
    cur = st.current_a
    if nm.used_phases is not None:
        if any(cur[k] >= 1.0 for k in range(3) if k not in nm.used_phases):
            nm.used_phases = None  # draws on another phase: counted on all at once
            nm.seen_phases = nm.seen_since = None
        return
    if max(cur) < min(3.0, e.min_a / 2):
        nm.seen_phases = nm.seen_since = None  # not drawing enough to tell
        return
    pattern = tuple(k for k in range(3) if cur[k] >= 1.0)
    if pattern != nm.seen_phases or nm.seen_since is None:
        nm.seen_phases, nm.seen_since = pattern, st.ts
        return
    if len(pattern) < 3 and _age(st.ts, nm.seen_since) >= cfg.reclaim_after_s:
        nm.used_phases = pattern
        if e.switching and pattern == (0,):
            nm.one_phase_car = True
