"""The simulation loop: the real controller step against the plant, with the safety checks in every step.

Every step ``k`` (``cycle_s`` apart): the plant is brought to ``k``, the controller
(:func:`load_controller.controller.step`, the service's own) decides from what the plant shows, the
decision is checked and recorded, and the plant receives it.

**Fast-forward (exact).** Most seconds of a day change nothing: the house load holds for a minute, the
cars follow their setpoints, the controller's memory stays the same. When after a step the plant is at
rest (every EVSE has applied what it was told, nothing on its way) and the controller's memory is the
same as before that step, the next steps give the same decision until either the plant changes on its
own (house load, a car arriving, leaving or full, a limit or tariff starting or ending) or ``now``
crosses a threshold the controller compares it with. ``step`` compares ``now`` only with times it
holds (in its memory and inputs) plus durations of its configuration (the ``*_s`` settings), and with
local times of the charging rules (windows, a ``min_energy`` deadline and the moment it would start
the boost); so the first step at which a threshold may be crossed is known, and the steps before it are
taken as copies of the last one. ``fast=False`` runs every step (the tests compare both, step by step).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from chargegate import payloads as p
from chargegate.config import Config
from chargegate.config.controller import MinEnergyRule, WindowRule
from load_controller import modes as modes_mod
from load_controller.controller import Decision, Inputs, Memory, step
from load_controller.rules import next_local
from load_controller.simulate.plant import SitePlant, Stay
from load_controller.simulate.scenario import Scenario
from load_controller.solver import PHASE_NAMES
from load_controller.topology import Topology

EPS = 1e-6
_MEM_FIELDS = tuple(f.name for f in dataclasses.fields(Memory) if f.name not in ("cycle", "meter_seen"))
OPERATOR_SOURCES = ("dso", "supplier")
MAX_VIOLATIONS_KEPT = 50


@dataclass(slots=True)
class Violation:
    """A step in which the controller's decision did not hold a safety rule."""

    step: int
    at: datetime
    kind: str  # fuse | power | invariant | solver
    where: str
    value: float
    limit: float
    detail: str


@dataclass(slots=True)
class Records:
    """One row per computed step; a row holds until the next row's step (fast-forwarded steps are copies)."""

    k: list[int] = field(default_factory=list)
    node_a: list[tuple[float, ...]] = field(default_factory=list)  # per node and grid phase, what flows (A)
    grant: list[tuple[float, ...]] = field(default_factory=list)  # per EVSE (A per phase)
    nph: list[tuple[int, ...]] = field(default_factory=list)
    bound: list[tuple[str, ...]] = field(default_factory=list)
    draw: list[tuple[float, ...]] = field(default_factory=list)  # per EVSE: what its car draws per phase (A)
    used: list[tuple[int, ...]] = field(default_factory=list)  # per EVSE: how many phases it draws on
    stay: list[tuple[int, ...]] = field(default_factory=list)  # per EVSE: the stay index plugged in (-1: none)
    units: list[tuple[int, ...]] = field(default_factory=list)  # per EVSE: that stay's energy so far (units)
    needs: list[tuple[bool, ...]] = field(default_factory=list)  # per EVSE: a car is plugged in and needs more
    ev_w: list[float] = field(default_factory=list)  # all EVs together (W)
    ctrl_w: list[float] = field(default_factory=list)  # the controllable EVSEs together (W)
    curtail: list[tuple[str, float | None, bool]] = field(default_factory=list)  # (label or "", effective W, at floor)
    tariff: list[int] = field(default_factory=list)  # tariff interval index (-1: none)

    def durations(self, n_steps: int) -> list[int]:
        ks = self.k
        return [b - a for a, b in zip(ks, [*ks[1:], n_steps], strict=True)]


@dataclass(slots=True)
class Result:
    cfg: Config
    topo: Topology
    scenario: Scenario
    start: datetime
    dt: float
    n_steps: int
    tz: ZoneInfo
    records: Records
    plant: SitePlant
    violations: list[Violation]
    violation_counts: Counter[str]
    overload_steps: Counter[str]  # "node:L1" -> steps drawn above its limit (physically: cars following late)
    overload_max: dict[str, float]  # "node:L1" -> the largest excess (A)
    operator_over_steps: int  # steps the EVs drew more than a binding operator limit allows (following late)
    operator_over_max_w: float
    warnings: Counter[str]
    step_calls: int
    fast: bool

    @property
    def stays(self) -> list[Stay]:
        return self.plant.all_stays


def energy_evses(cfg: Config, scenario: Scenario) -> set[str]:
    """EVSEs whose status must carry the session energy: a min_energy rule or a car's session target."""
    ids = [e.id for e in cfg.evses]
    out: set[str] = set()
    for r in cfg.controller.rules:
        if isinstance(r, MinEnergyRule) and r.enabled:
            out.update(r.evses or ids)
    out.update(c.evse for c in scenario.cars.cars if c.target_kwh is not None)
    return out


def _durations(cfg: Config) -> list[float]:
    """Every duration of the controller's configuration (in seconds), sorted, with 0."""
    vals = {0.0}
    ctl = cfg.controller
    for name in type(ctl).model_fields:
        v = getattr(ctl, name)
        if name.endswith("_s") and isinstance(v, int | float) and not isinstance(v, bool) and v > 0:
            vals.add(float(v))
    for r in ctl.rules:
        m = getattr(r, "margin_s", None)
        if isinstance(m, int | float) and m > 0:
            vals.add(float(m))
    vals.add(900.0)  # a session target's min_energy margin (load_controller.modes)
    return sorted(vals)


def _times(obj: Any, out: list[datetime], depth: int = 0) -> None:
    if depth > 8 or obj is None:
        return
    if isinstance(obj, datetime):
        out.append(obj)
    elif isinstance(obj, str | int | float | bool):
        return
    elif isinstance(obj, dict):
        for v in obj.values():
            _times(v, out, depth + 1)
    elif isinstance(obj, list | tuple | set | frozenset):
        for v in obj:
            _times(v, out, depth + 1)
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            _times(getattr(obj, f.name), out, depth + 1)
    elif isinstance(obj, p.Model):
        for v in obj.__dict__.values():
            _times(v, out, depth + 1)


def _same_memory(a: Memory, b: Memory) -> bool:
    for name in _MEM_FIELDS:
        if getattr(a, name) != getattr(b, name):
            return False
    return a.meter_seen.keys() == b.meter_seen.keys()


class _Danger:
    """The first step at which ``step`` might decide differently, the inputs and memory staying the same."""

    def __init__(self, cfg: Config, topo: Topology, tz: ZoneInfo, start: datetime, dt: float) -> None:
        self.cfg = cfg
        self.topo = topo
        self.tz = tz
        self.start = start
        self.dt = dt
        self.durs = [c / dt for c in _durations(cfg)]
        self.ids = [e.id for e in topo.evses]

    def _x(self, t: datetime) -> float:
        return (t - self.start).total_seconds() / self.dt

    def next(self, k: int, now: datetime, memory: Memory, inputs: Inputs) -> int:
        times: list[datetime] = []
        for name in _MEM_FIELDS:
            _times(getattr(memory, name), times)
        for e in memory.evses.values():
            _times(e, times)
        held: list[datetime] = []
        _times(inputs.grid_limits, held)
        _times(inputs.evse_limits, held)
        _times(inputs.tariff_schedule, held)
        _times(inputs.tariff_current, held)
        _times(inputs.statuses, held)
        _times(inputs.modes, held)
        times.extend(t for t in held if t != now)
        best = math.inf
        durs = self.durs
        for t in set(times):
            off = self._x(t)
            i = bisect.bisect_left(durs, k - EPS - off)
            if i < len(durs):
                best = min(best, max(k + 1, math.ceil(off + durs[i] - EPS)))
        # local times of the charging rules in force
        rules = modes_mod.apply(self.cfg.controller.rules, inputs.modes, self.ids).rules
        fixed: list[datetime] = []
        for r in rules:
            if not r.enabled:
                continue
            if isinstance(r, WindowRule):
                for w in r.windows:
                    fixed.append(next_local(w.start, now, self.tz))
                    fixed.append(next_local(w.end, now, self.tz))
                fixed.append(next_local("00:00", now, self.tz))
            elif isinstance(r, MinEnergyRule):
                for eid in r.evses or self.ids:
                    st = inputs.statuses.get(eid)
                    if st is None or st.session is None:
                        continue
                    e = self.topo.evses[self.topo.evse_index[eid]]
                    deadline = next_local(r.by, st.session.started, self.tz)
                    fixed.append(deadline)
                    full_w = e.max_a * self.cfg.controller.voltage_v * e.phases
                    remaining = r.energy_wh - (st.session.energy_wh or 0.0)
                    if remaining <= 0 or full_w <= 0:
                        continue
                    # the boost starts once now >= deadline - (remaining / full power + margin); while the car
                    # charges at power_w, remaining falls with the time too (the plant holds its draw constant)
                    pw = st.power_w or 0.0
                    lead = (deadline - now).total_seconds() - r.margin_s - remaining / full_w * 3600
                    flips = [lead] if pw <= 0 else []
                    if 0 < pw < full_w:
                        flips.append(lead / (1 - pw / full_w))
                    if pw > 0:
                        flips.append(remaining / pw * 3600)  # the energy reached
                    for tau in flips:
                        for d in (-self.dt, 0.0, self.dt):  # float rounding of the energy: one step either side
                            fixed.append(now + timedelta(seconds=tau + d))
        for t in fixed:
            x = self._x(t)
            if x >= k - EPS:
                best = min(best, max(k + 1, math.ceil(x - EPS)))
        return int(best) if best < math.inf else 2**62


def simulate(cfg: Config, scenario: Scenario, start: datetime, *, days: float = 1.0, fast: bool = True) -> Result:
    """Run ``days`` of simulated time from ``start`` (aware) and return everything that happened."""
    ctl = cfg.controller
    dt = ctl.cycle_s
    tz = ZoneInfo(cfg.site.timezone)
    topo = Topology(cfg)
    n_steps = round(days * 86400 / dt)
    plant = SitePlant(cfg, topo, scenario, start, n_steps, tz, energy_evses(cfg, scenario))
    danger = _Danger(cfg, topo, tz, start, dt)
    rec = Records()
    violations: list[Violation] = []
    vcount: Counter[str] = Counter()
    over_steps: Counter[str] = Counter()
    over_max: dict[str, float] = {}
    warn: Counter[str] = Counter()
    op_over = 0
    op_over_max = 0.0
    v = ctl.voltage_v
    evses = topo.evses
    nodes = topo.nodes
    limits = [nd.limits for nd in nodes]
    ctrl = [e.controllable for e in evses]
    floor_sources = set(ctl.floor_sources)
    memory = Memory()
    calls = 0
    k = 0
    plant.tick(0)
    while k < n_steps:
        now = plant.now
        inputs = plant.observe()
        decision, new_mem = step(topo, ctl, tz, inputs, memory, now)
        calls += 1
        decs = decision.evses
        # -- checks -----------------------------------------------------------------------------------------
        bad = _check_decision(decision, topo)
        would = plant.would_draw(decs)
        for nd in nodes:
            wn = would[nd.index]
            for j in range(3):
                if wn[j] > nd.limits[j] + EPS:
                    hidden = nd.index not in plant.metered_nodes and max(plant.house[nd.index]) > 0
                    bad.append(("fuse", f"node:{nd.id}:{PHASE_NAMES[j]}", wn[j], nd.limits[j],
                                "house load at a node without a meter (the controller cannot see it)" if hidden
                                else "the grants and the house load exceed the fuse"))
            if nd.max_power_w < math.inf and sum(wn) * v > nd.max_power_w + EPS:
                bad.append(("power", f"node:{nd.id}:power", sum(wn) * v, nd.max_power_w,
                            "the grants and the house load exceed the power limit"))
        # -- what the plant does in this step --------------------------------------------------------------------
        node_a = plant.node_currents()
        for nd in nodes:
            na = node_a[nd.index]
            lim = limits[nd.index]
            for j in range(3):
                if na[j] > lim[j] + EPS:
                    key = f"{nd.id}:{PHASE_NAMES[j]}"
                    over_steps[key] += 1
                    over_max[key] = max(over_max.get(key, 0.0), na[j] - lim[j])
        ports = plant.ports
        ev_w = 0.0
        ctrl_w = 0.0
        ctrl_phase = [0.0, 0.0, 0.0]
        for i, port in enumerate(ports):
            if port.draw_c > 0:
                w = port.draw_c * 0.01 * len(port.used) * v
                ev_w += w
                if ctrl[i]:
                    ctrl_w += w
                    for j in port.used:
                        ctrl_phase[evses[i].rotation[j]] += port.draw_c * 0.01
        label, eff_w, at_floor = _curtailment(decision, floor_sources)
        excess = _operator_excess(decision, ctrl_w, ev_w, ctrl_phase, node_a, v)
        if excess > EPS:
            op_over += 1
            op_over_max = max(op_over_max, excess)
        rec.k.append(k)
        rec.node_a.append(tuple(x for na in node_a for x in na))
        rec.grant.append(tuple(d.current for d in decs))
        rec.nph.append(tuple(d.phases for d in decs))
        rec.bound.append(tuple(d.bound_by for d in decs))
        rec.draw.append(tuple(port.draw_c * 0.01 for port in ports))
        rec.used.append(tuple(len(port.used) for port in ports))
        rec.stay.append(tuple(port.stay.index if port.stay is not None else -1 for port in ports))
        rec.units.append(tuple(port.stay.delivered if port.stay is not None else 0 for port in ports))
        rec.needs.append(tuple(port.stay is not None and port.stay.full_at is None for port in ports))
        rec.ev_w.append(ev_w)
        rec.ctrl_w.append(ctrl_w)
        rec.curtail.append((label, eff_w, at_floor))
        rec.tariff.append(plant.tariff_at(k))
        plant.send(decs, k)
        # -- the next step to compute --------------------------------------------------------------------------
        nxt = k + 1
        if fast and k > 0 and plant.settled() and _same_memory(memory, new_mem):
            nxt = max(k + 1, min(danger.next(k, now, new_mem, inputs), plant.next_event(k), n_steps))
        span = nxt - k
        for w in decision.warnings:
            warn[w[:160]] += span
        for kind, where, val, lim, detail in bad:
            vcount[kind] += span
            if len(violations) < MAX_VIOLATIONS_KEPT:
                violations.append(Violation(k, now, kind, where, val, lim, detail))
        if span > 1:
            _repeat_overload(node_a, limits, nodes, over_steps, span - 1)
            if excess > EPS:
                op_over += span - 1
            new_mem.cycle += span - 1
            last_seen = plant.at(nxt - 1)
            for mid in new_mem.meter_seen:
                new_mem.meter_seen[mid] = last_seen
        memory = new_mem
        if nxt < n_steps:
            plant.tick(nxt)
        else:
            plant.advance(n_steps)
        k = nxt
    return Result(cfg=cfg, topo=topo, scenario=scenario, start=start, dt=dt, n_steps=n_steps, tz=tz, records=rec,
                  plant=plant, violations=violations, violation_counts=vcount, overload_steps=over_steps,
                  overload_max=over_max, operator_over_steps=op_over, operator_over_max_w=op_over_max,
                  warnings=warn, step_calls=calls, fast=fast)


def _repeat_overload(node_a: list[list[float]], limits: list[tuple[float, float, float]], nodes: list[Any],
                     over_steps: Counter[str], times: int) -> None:
    for nd in nodes:
        na = node_a[nd.index]
        lim = limits[nd.index]
        for j in range(3):
            if na[j] > lim[j] + EPS:
                over_steps[f"{nd.id}:{PHASE_NAMES[j]}"] += times


def _check_decision(d: Decision, topo: Topology) -> list[tuple[str, str, float, float, str]]:
    """The controller's own invariants, checked from outside (as tests/load_controller does)."""
    out: list[tuple[str, str, float, float, str]] = []
    sol = d.solution
    for name, used in sol.usage.items():
        cap = sol.capacity[name]
        if used > cap + EPS and not name.startswith("phase_imbalance") and not sol.fixed_cut:
            out.append(("solver", name, used, cap, "a constraint is used beyond its capacity"))
    for r in sol.repairs:
        out.append(("solver", "final check", 0.0, 0.0, f"the final safety check had to cut: {r}"))
    for e, dec in zip(topo.evses, d.evses, strict=True):
        if dec.online and 0 < dec.current < e.min_a - EPS:
            out.append(("invariant", f"evse:{e.id}", dec.current, e.min_a, "granted above 0 but below its minimum"))
        if dec.current > e.max_a + EPS:
            out.append(("invariant", f"evse:{e.id}", dec.current, e.max_a, "granted above its maximum"))
    return out


def _binding_operator(d: Decision) -> list[dict[str, Any]]:
    out = [g for g in d.limits.get("grid_limits", []) if "effective_w" in g and g.get("source") in OPERATOR_SOURCES]
    fs = d.limits.get("failsafe")
    if fs:
        out.append({"source": "failsafe", **fs})
    return out


def _curtailment(d: Decision, floor_sources: set[str]) -> tuple[str, float | None, bool]:
    """The operator limit in force (label, effective W for the EVs, whether it was raised to the §14a floor)."""
    best: tuple[str, float | None, bool] = ("", None, False)
    for g in _binding_operator(d):
        eff = g.get("effective_w")
        floor = bool(g.get("raised_to_floor")) and g.get("source") in floor_sources
        if best[0] == "" or (eff is not None and (best[1] is None or eff < best[1])):
            best = (str(g.get("source")), eff, floor)
        elif floor:
            best = (best[0], best[1], True)
    return best


def _operator_excess(d: Decision, ctrl_w: float, ev_w: float, ctrl_phase: list[float],
                     node_a: list[list[float]], v: float) -> float:
    """How far (W) the EVs draw beyond a binding operator limit in this step (0: within)."""
    worst = 0.0
    for g in _binding_operator(d):
        eff = g.get("effective_w")
        if eff is None:
            continue
        drawn = ev_w if g.get("scope") == "grid" else ctrl_w
        worst = max(worst, drawn - eff)
        cur = g.get("effective_current_a")
        if cur is not None and g.get("scope") != "grid":
            for j in range(3):
                worst = max(worst, (ctrl_phase[j] - cur[j]) * v)
    return worst if worst > 1.0 else 0.0  # 1 W: rounding of the per-phase split
