"""The allocation solver: a pure function from a numeric problem to per-EVSE grants.

The problem is a set of linear capacity constraints with non-negative coefficients:

* per node of the circuit tree and grid phase: the sum of the per-phase currents of the EVSEs
  below it that draw on that phase must stay within the phase capacity;
* per node: an optional total (the sum over phases, i.e. power / voltage);
* per group (grid limits, rule budgets, the phase-imbalance limit): the same two kinds over an
  explicit set of EVSEs.

Each EVSE gets 0 or at least its minimum. The solve has three stages:

1. *fixed* loads (EVSEs that cannot be read) are subtracted first;
2. *admission*: EVSEs protected by the minimum charging time, then all others by priority (the
   ones already charging first within a priority), are admitted at their minimum while it fits
   (in the first phase mode that fits) - so a lower priority is paused only when its minimum no
   longer fits next to the higher ones' minimums, and no current is left unused;
3. *water-filling* per priority class (highest first): all admitted EVSEs of the class rise
   together (equal current per phase, from their minimum up to their cap) until a constraint is
   tight; the EVSEs in it freeze and the others keep rising. This is max-min fairness with floors.

The phase-imbalance limit is enforced by re-solving with an upper bound on the asymmetric load of
the heaviest phase until the difference between phases is within the limit.

No I/O, no clock: the same problem always gives the same solution.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

INF = math.inf
EPS = 1e-9
PHASE_NAMES = ("L1", "L2", "L3")


@dataclass(slots=True)
class Mode:
    """One way an EVSE can charge: the setpoint's phase count and the grid phases drawn."""

    nph: int  # phases in the setpoint (1 or 3)
    phases: tuple[int, ...]  # grid phases (0..2) the car draws on
    hi: float  # cap in A per phase in this mode
    hi_label: str = "evse_max"
    hi_detail: str | None = None
    # grid phases the car is seen drawing on, when fewer than ``phases`` (a 1-phase car on a 3-phase EVSE
    # that cannot be told to use 1 phase): budgeted on all ``phases``, counted on these for the imbalance
    asym: tuple[int, ...] | None = None


@dataclass(slots=True)
class Demand:
    key: str
    node: int  # index of the node it hangs from
    lo: float  # minimum current per phase
    modes: list[Mode]  # in order of preference; empty: does not want power
    priority: int = 0
    protected: bool = False  # within its minimum charging time: admitted first
    charging: bool = False  # currently granted > 0: admitted before new ones of its class
    order: int = 0  # stable tie-break (configuration order)
    groups: tuple[int, ...] = ()
    off_label: str = "not_connected"  # bound_by when it does not want power
    off_detail: str | None = None
    three_phases: tuple[int, ...] | None = None  # when set: report whether 3-phase at lo would fit
    one_phases: tuple[int, ...] | None = None  # when set and not admitted: report whether lo on these would fit
    hold: str | None = None  # e.g. "min_pause": not started even if it fits (reported only if it would)
    hold_detail: str | None = None


@dataclass(slots=True)
class Fixed:
    """A load the controller cannot steer right now (an EVSE that cannot be read)."""

    key: str
    node: int
    phases: tuple[int, ...]
    current: float
    groups: tuple[int, ...] = ()


@dataclass(slots=True)
class Node:
    id: str
    parent: int  # -1 for the root
    cap: list[float]  # per grid phase, A (INF: none)
    total: float = INF  # sum over phases, A (INF: none)
    labels: list[str] = field(default_factory=list)  # 4 labels: L1..L3, total (default node:<id>:Lx)
    details: list[str | None] = field(default_factory=lambda: [None, None, None, None])

    def __post_init__(self) -> None:
        if not self.labels:
            self.labels = [f"node:{self.id}:{p}" for p in PHASE_NAMES] + [f"node:{self.id}:power"]


@dataclass(slots=True)
class Group:
    label: str
    cap: list[float] = field(default_factory=lambda: [INF, INF, INF])
    total: float = INF
    all_members: bool = False  # every EVSE is a member (else: those listing the group)
    asym_only: bool = False  # only modes drawing on fewer than 3 phases count
    detail: str | None = None


@dataclass(slots=True)
class Problem:
    nodes: list[Node]
    demands: list[Demand]
    groups: list[Group] = field(default_factory=list)
    fixed: list[Fixed] = field(default_factory=list)
    imbalance_limit: float = INF
    step: float = 0.0  # round grants down to this (0: no rounding)
    imbalance_caps: list[float] | None = None  # start caps per phase for the asymmetric load (warm start)


@dataclass(slots=True)
class Grant:
    key: str
    current: float
    nph: int
    phases: tuple[int, ...]
    bound_by: str
    detail: str | None = None
    three_fits: bool | None = None
    asym: tuple[int, ...] | None = None  # the mode's ``asym``
    one_fits: bool | None = None  # not admitted: its minimum would fit on ``Demand.one_phases``


@dataclass(slots=True)
class Solution:
    grants: list[Grant]  # aligned with Problem.demands
    fixed_cut: dict[str, str]  # fixed loads whose constraints are overcommitted: key -> constraint label
    usage: dict[str, float]  # constraint label -> usage (only constraints with a finite capacity)
    capacity: dict[str, float]
    imbalance: float  # final difference between phases of the asymmetric load
    iterations: int
    repairs: list[str]  # constraint violations found by the final check (never expected)
    imbalance_caps: list[float] | None = None  # final caps per phase on the asymmetric load (None: none)
    imbalance_bound: bool = False  # the imbalance limit bound a grant


_Key = tuple[int, tuple[int, ...], tuple[int, ...], tuple[int, ...] | None]


@dataclass(slots=True)
class _Shape:
    """What a constraint space derives from the problem's structure alone (the tree, which constraints are
    finite, the groups' kinds and names): the same from cycle to cycle while the installation and the kinds
    of limits in force stay the same, so it is kept across solves (see ``_SHAPES``)."""

    chains: list[tuple[int, ...]]
    names: list[str]
    coefs: dict[_Key, list[tuple[int, float]]]


_SHAPES: dict[tuple[object, ...], _Shape] = {}
_SHAPES_MAX = 16


class _Space:
    """Flat constraint arrays: node i uses 4i..4i+3, group g uses 4(N+g)..4(N+g)+3."""

    def __init__(self, problem: Problem, groups: list[Group]) -> None:
        self.problem = problem
        self.groups = groups
        nodes = problem.nodes
        n = len(nodes)
        self.cap: list[float] = []
        self.labels: list[str] = []  # bound_by label per constraint
        self.details: list[str | None] = []
        for nd in nodes:
            self.cap.extend((nd.cap[0], nd.cap[1], nd.cap[2], nd.total))
            self.labels.extend(nd.labels)
            self.details.extend(nd.details)
        for g in groups:
            self.cap.extend((g.cap[0], g.cap[1], g.cap[2], g.total))
            self.labels.extend((g.label,) * 4)
            self.details.extend((g.detail,) * 4)
        self.k = len(self.cap)
        self.n_nodes = n
        self.all_groups = tuple(i for i, g in enumerate(groups) if g.all_members)
        sig = (tuple([nd.id for nd in nodes]), tuple([nd.parent for nd in nodes]),
               tuple([(g.label, g.asym_only, g.all_members) for g in groups]), tuple([c < INF for c in self.cap]))
        shape = _SHAPES.get(sig)
        if shape is None:
            if len(_SHAPES) >= _SHAPES_MAX:
                _SHAPES.clear()
            shape = _SHAPES[sig] = _Shape(self._chains(nodes), self._names(nodes, groups), {})
        self.chains = shape.chains
        self.names: list[str] = shape.names  # unique name per constraint (for reports)
        self._cache = shape.coefs

    @staticmethod
    def _chains(nodes: list[Node]) -> list[tuple[int, ...]]:
        n = len(nodes)
        chains: list[tuple[int, ...]] = []
        for i in range(n):
            chain = []
            j = i
            guard = 0
            while j >= 0 and guard <= n:
                chain.append(j)
                j = nodes[j].parent
                guard += 1
            chains.append(tuple(chain))
        return chains

    @staticmethod
    def _names(nodes: list[Node], groups: list[Group]) -> list[str]:
        names: list[str] = []
        for nd in nodes:
            names.extend([f"node:{nd.id}:{p}" for p in PHASE_NAMES] + [f"node:{nd.id}:power"])
        for g in groups:
            names.extend([f"{g.label}:{p}" for p in PHASE_NAMES] + [f"{g.label}:total"])
        return names

    def coefs(self, node: int, phases: tuple[int, ...], groups: tuple[int, ...],
              asym: tuple[int, ...] | None = None) -> list[tuple[int, float]]:
        """(constraint index, coefficient per A per phase) of a load on ``phases`` below ``node``;
        ``asym``: the phases it counts on in the asymmetric-only groups (default ``phases``)."""
        key = (node, phases, groups, asym)
        got = self._cache.get(key)
        if got is not None:
            return got
        cap = self.cap
        out: list[tuple[int, float]] = []
        nph = float(len(phases))
        for nd in self.chains[node]:
            b = 4 * nd
            for ph in phases:
                if cap[b + ph] < INF:
                    out.append((b + ph, 1.0))
            if cap[b + 3] < INF:
                out.append((b + 3, nph))
        gs = self.groups
        seen: set[int] = set()
        for gi in (*groups, *self.all_groups):
            if gi in seen or gi >= len(gs):
                continue
            seen.add(gi)
            counted = phases
            if gs[gi].asym_only:
                counted = asym if asym is not None else phases
                if len(counted) >= 3:
                    continue
            b = 4 * (self.n_nodes + gi)
            for ph in counted:
                if cap[b + ph] < INF:
                    out.append((b + ph, 1.0))
            if cap[b + 3] < INF:
                out.append((b + 3, float(len(counted))))
        self._cache[key] = out
        return out


def _fits(used: list[float], cap: list[float], coefs: list[tuple[int, float]], amount: float) -> int:
    """-1 when ``amount`` per phase fits on all constraints, else the first constraint that blocks."""
    for k, a in coefs:
        if used[k] + a * amount > cap[k] + 1e-7:
            return k
    return -1


def solve(problem: Problem) -> Solution:
    """Solve ``problem``; see the module docstring."""
    groups = list(problem.groups)
    imb_index = -1
    if problem.imbalance_limit < INF:
        start = list(problem.imbalance_caps) if problem.imbalance_caps else [INF, INF, INF]
        groups.append(Group(label="phase_imbalance", cap=start, all_members=True, asym_only=True,
                            detail=f"phase imbalance limit {problem.imbalance_limit:g} A"))
        imb_index = len(groups) - 1
    iterations = 0
    while True:
        iterations += 1
        space = _Space(problem, groups)
        grants, _used, fixed_cut = _solve_once(problem, space)
        imbalance, heavy, light = _imbalance(problem, grants)
        if imb_index < 0 or imbalance <= problem.imbalance_limit + 1e-6 or iterations >= 6:
            break
        g = groups[imb_index]
        new_cap = max(0.0, light + problem.imbalance_limit)
        if new_cap >= g.cap[heavy] - 1e-9:
            # cannot tighten further (fixed loads alone are asymmetric): stop
            break
        # bound every phase by the lightest one (not only the heaviest): one re-solve usually does it
        g.cap = [min(c, new_cap) for c in g.cap]
    if imb_index >= 0 and imbalance > problem.imbalance_limit + 1e-6:
        _force_imbalance(problem, grants, imbalance)
        imbalance, _, _ = _imbalance(problem, grants)
    if problem.step > 0:
        _round(grants, problem)
        if imb_index >= 0:
            # rounding a grant on the lightest phase down widens the difference (by up to a step each)
            for _ in range(3):
                imbalance, _, _ = _imbalance(problem, grants)
                if imbalance <= problem.imbalance_limit + 1e-6:
                    break
                _force_imbalance(problem, grants, imbalance)
                _round(grants, problem)
            imbalance, _, _ = _imbalance(problem, grants)
    repairs, checked_used = _verify(problem, space, grants)
    usage: dict[str, float] = {}
    capacity: dict[str, float] = {}
    # what the check summed, unless it cut a grant (then summed anew, as the check's own sums went down by steps)
    final_used = checked_used if not repairs else _usage(problem, space, grants)
    for k in range(space.k):
        if space.cap[k] < INF:
            usage[space.names[k]] = final_used[k]
            capacity[space.names[k]] = space.cap[k]
    caps = list(groups[imb_index].cap) if imb_index >= 0 else None
    bound = any(g.bound_by == "phase_imbalance" for g in grants)
    return Solution(grants=grants, fixed_cut=fixed_cut, usage=usage, capacity=capacity, imbalance=imbalance,
                    iterations=iterations, repairs=repairs, imbalance_caps=caps, imbalance_bound=bound)


def _solve_once(problem: Problem, space: _Space) -> tuple[list[Grant], list[float], dict[str, str]]:
    cap = space.cap
    used = [0.0] * space.k
    fixed_cut: dict[str, str] = {}
    for f in problem.fixed:
        if f.current <= 0:
            continue
        for k, a in space.coefs(f.node, f.phases, f.groups):
            used[k] += a * f.current
    for f in problem.fixed:
        if f.current <= 0:
            continue
        for k, _a in space.coefs(f.node, f.phases, f.groups):
            if used[k] > cap[k] + 1e-7:
                fixed_cut[f.key] = space.labels[k]
                break

    demands = problem.demands
    grants: list[Grant] = []
    for d in demands:
        if d.modes:
            m0 = d.modes[0]
            grants.append(Grant(d.key, 0.0, m0.nph, m0.phases, "min_current"))
        else:
            grants.append(Grant(d.key, 0.0, 3, (0, 1, 2), d.off_label, d.off_detail))

    admitted_mode: dict[int, Mode] = {}
    admitted_coefs: dict[int, list[tuple[int, float]]] = {}

    known = space._cache

    def try_admit(i: int) -> None:
        d = demands[i]
        g = grants[i]
        lo = d.lo
        blocked_label: str | None = None
        blocked_detail: str | None = None
        for m in d.modes:
            if m.hi < lo - 1e-9:
                if blocked_label is None:
                    blocked_label, blocked_detail = m.hi_label, m.hi_detail
                continue
            coefs = known.get((d.node, m.phases, d.groups, m.asym)) or space.coefs(d.node, m.phases, d.groups, m.asym)
            k = -1  # _fits, inline: the first constraint that blocks lo
            for kk, a in coefs:
                if used[kk] + a * lo > cap[kk] + 1e-7:
                    k = kk
                    break
            if k < 0 and d.hold is not None:
                g.bound_by, g.detail = d.hold, d.hold_detail
                return
            if k < 0:
                for kk, a in coefs:
                    used[kk] += a * lo
                admitted_mode[i] = m
                admitted_coefs[i] = coefs
                g.nph, g.phases, g.current, g.asym = m.nph, m.phases, d.lo, m.asym
                if d.three_phases is not None and len(m.phases) < 3:
                    # would 3 phases at the minimum fit instead of this 1-phase admission?
                    mine = dict(coefs)
                    c3 = space.coefs(d.node, d.three_phases, d.groups)
                    g.three_fits = all(used[kk] - mine.get(kk, 0.0) * d.lo + a3 * d.lo <= cap[kk] + 1e-7
                                       for kk, a3 in c3)
                elif d.three_phases is not None:
                    g.three_fits = True
                return
            if blocked_label is None or not blocked_label.startswith(("min_current", "rule:", "stale_meter")):
                # a rule's budget names the rule, an unknown meter names itself; any other constraint (fuses,
                # limits) is min_current
                named = space.labels[k].startswith(("rule:", "stale_meter"))
                blocked_label = space.labels[k] if named else "min_current"
                blocked_detail = (space.details[k] if named and space.details[k] else
                                  f"the minimum {d.lo:g} A does not fit under {space.labels[k]}")
        g.bound_by = blocked_label or "min_current"
        g.detail = blocked_detail
        if d.three_phases is not None:
            g.three_fits = False
        if d.one_phases is not None:
            g.one_fits = _fits(used, cap, space.coefs(d.node, d.one_phases, d.groups), d.lo) < 0

    # by priority, the ones charging first, configuration order (the index last: a stable sort's tie-break)
    keyed = [(-d.priority, not d.charging, d.order, i) for i, d in enumerate(demands) if d.modes]
    keyed.sort()
    order = [t[3] for t in keyed]
    for i in order:
        if demands[i].protected:
            try_admit(i)
    classes: list[list[int]] = []
    for i in order:
        if classes and demands[classes[-1][0]].priority == demands[i].priority:
            classes[-1].append(i)
        else:
            classes.append([i])
    for i in order:
        if not demands[i].protected:
            try_admit(i)
    for cls in classes:
        members = [i for i in cls if i in admitted_mode]
        if members:
            _fill(members, demands, admitted_mode, admitted_coefs, grants, used, cap, space.labels, space.details)
    return grants, used, fixed_cut


def _fill(members: list[int], demands: list[Demand], modes: dict[int, Mode],
          coefs_of: dict[int, list[tuple[int, float]]], grants: list[Grant], used: list[float],
          cap: list[float], labels: list[str], details: list[str | None]) -> None:
    """Water-fill the admitted ``members`` of one priority class (they are in ``used`` at lo)."""
    n = len(members)
    lo = [demands[i].lo for i in members]
    hi = [max(modes[i].hi, demands[i].lo) for i in members]
    cm: dict[int, list[tuple[int, float]]] = {}
    for j, i in enumerate(members):
        for k, a in coefs_of[i]:
            lst = cm.get(k)
            if lst is None:
                cm[k] = [(j, a)]
            else:
                lst.append((j, a))
    active = [hi[j] > lo[j] + EPS for j in range(n)]
    val = lo[:]
    bound: list[int] = [-1] * n
    # per constraint index (lists: cheaper than dicts in the inner loops; only the constraints in cm are used)
    nk = len(cap)
    base: list[float] = [0.0] * nk
    act_lo: list[float] = [0.0] * nk
    events: dict[int, list[tuple[float, float, int]]] = {}
    for k, mem in cm.items():
        al = 0.0
        ev: list[tuple[float, float, int]] = []
        for j, a in mem:
            if active[j]:
                al += a * lo[j]
                ev.append((lo[j], a, j))
                ev.append((hi[j], -a, j))
        base[k] = used[k] - al  # everything but the active members' contributions
        act_lo[k] = al
        ev.sort()
        events[k] = ev

    def crossing(k: int, level: float) -> float:
        rem = cap[k] - base[k]
        v = act_lo[k]
        if v >= rem - 1e-9:
            return level
        slope = 0.0
        prev = -INF
        for x, da, j in events[k]:
            if not active[j]:
                continue
            if slope > 0.0:
                nv = v + slope * (x - prev)
                if nv >= rem - 1e-12:
                    return max(prev + (rem - v) / slope, level)
                v = nv
            prev = x
            slope += da
        return INF

    version = [0] * nk
    heap = [(crossing(k, 0.0), k, 0) for k in cm]
    heapq.heapify(heap)
    level = 0.0
    while heap:
        lvl, k, ver = heapq.heappop(heap)
        if lvl == INF:
            break
        if ver != version[k]:
            heapq.heappush(heap, (crossing(k, level), k, version[k]))
            continue
        level = max(level, lvl)
        for j, _a in cm[k]:
            if not active[j]:
                continue
            x = hi[j] if level >= hi[j] else (lo[j] if level <= lo[j] else level)
            active[j] = False
            val[j] = x
            if x < hi[j] - 1e-9 or (level <= hi[j] + 1e-9 and modes[members[j]].hi_label == "ramp"):
                bound[j] = k  # below its cap, or tight exactly at a mere ramp step: name the constraint
            for k2, a2 in coefs_of[members[j]]:
                base[k2] += a2 * x
                act_lo[k2] -= a2 * lo[j]
                version[k2] += 1
    for j in range(n):
        if active[j]:
            val[j] = hi[j]
    for j, i in enumerate(members):
        x = val[j]
        for k, a in coefs_of[i]:
            used[k] += a * (x - lo[j])
        g = grants[i]
        g.current = x
        if bound[j] >= 0:
            g.bound_by = labels[bound[j]]
            g.detail = details[bound[j]]
        else:
            g.bound_by = modes[i].hi_label
            g.detail = modes[i].hi_detail


def _asym_phases(g: Grant) -> tuple[int, ...]:
    """The phases a grant counts on for the imbalance (none when it draws on all three)."""
    ph = g.asym if g.asym is not None else g.phases
    return ph if len(ph) < 3 else ()


def _asym_load(problem: Problem, grants: list[Grant]) -> list[float]:
    """The asymmetric load per grid phase (grants and fixed loads on fewer than 3 phases)."""
    u = [0.0, 0.0, 0.0]
    for g in grants:
        if g.current > 0:
            for ph in _asym_phases(g):
                u[ph] += g.current
    for f in problem.fixed:
        if f.current > 0 and len(f.phases) < 3:
            for ph in f.phases:
                u[ph] += f.current
    return u


def _imbalance(problem: Problem, grants: list[Grant]) -> tuple[float, int, float]:
    u = _asym_load(problem, grants)
    heavy = max(range(3), key=lambda p: (u[p], -p))
    light = min(u)
    return u[heavy] - light, heavy, light


def _force_imbalance(problem: Problem, grants: list[Grant], imbalance: float) -> None:
    """Last resort when re-solving did not converge: cut asymmetric grants on the heaviest phase."""
    demands = problem.demands
    for _ in range(3 * len(grants) + 3):
        imb, heavy, light = _imbalance(problem, grants)
        if imb <= problem.imbalance_limit + 1e-6:
            return
        u = _asym_load(problem, grants)
        lightest = {ph for ph in range(3) if u[ph] <= light + 1e-9}
        # only a grant on the heaviest phase and not on a lightest one narrows the difference when cut
        cands = [i for i, g in enumerate(grants) if g.current > 0 and heavy in _asym_phases(g)
                 and not lightest.intersection(_asym_phases(g))]
        if not cands:
            return
        i = min(cands, key=lambda i: (demands[i].priority, -demands[i].order))
        g = grants[i]
        excess = imb - problem.imbalance_limit
        target = g.current - excess
        g.current = target if target >= demands[i].lo - 1e-9 else 0.0
        g.bound_by = "phase_imbalance"
        g.detail = f"phase imbalance limit {problem.imbalance_limit:g} A"


def _round(grants: list[Grant], problem: Problem) -> None:
    step = problem.step
    for g, d in zip(grants, problem.demands, strict=True):
        if g.current <= 0:
            g.current = 0.0
            continue
        r = math.floor(g.current / step + 1e-6) * step
        r = round(r, 6)
        if r < d.lo:
            r = d.lo if g.current >= d.lo - 1e-6 else 0.0
        g.current = r


def _usage(problem: Problem, space: _Space, grants: list[Grant]) -> list[float]:
    used = [0.0] * space.k
    for f in problem.fixed:
        if f.current > 0:
            for k, a in space.coefs(f.node, f.phases, f.groups):
                used[k] += a * f.current
    for g, d in zip(grants, problem.demands, strict=True):
        if g.current > 0:
            for k, a in space.coefs(d.node, g.phases, d.groups, g.asym):
                used[k] += a * g.current
    return used


def _verify(problem: Problem, space: _Space, grants: list[Grant]) -> tuple[list[str], list[float]]:
    """Check every constraint; should one be exceeded (a bug), pause EVSEs until it holds. Returns the
    repairs and the usage per constraint (``_usage`` of the grants; only meaningful when nothing was repaired)."""
    repairs: list[str] = []
    used = _usage(problem, space, grants)
    fixed_only = [0.0] * space.k
    for f in problem.fixed:
        if f.current > 0:
            for k, a in space.coefs(f.node, f.phases, f.groups):
                fixed_only[k] += a * f.current
    for k in range(space.k):
        if used[k] <= space.cap[k] + 1e-6 or used[k] <= fixed_only[k] + 1e-6:
            continue
        repairs.append(f"{space.labels[k]}: {used[k]:.3f} > {space.cap[k]:.3f}")
        members = []
        for i, (g, d) in enumerate(zip(grants, problem.demands, strict=True)):
            if g.current > 0 and any(kk == k for kk, _ in space.coefs(d.node, g.phases, d.groups, g.asym)):
                members.append(i)
        members.sort(key=lambda i: (problem.demands[i].priority, -problem.demands[i].order))
        for i in members:
            if used[k] <= space.cap[k] + 1e-6:
                break
            g = grants[i]
            for kk, a in space.coefs(problem.demands[i].node, g.phases, problem.demands[i].groups, g.asym):
                used[kk] -= a * g.current
            g.current = 0.0
            g.bound_by = space.labels[k]
            g.detail = "paused by the final safety check"
    return repairs, used
