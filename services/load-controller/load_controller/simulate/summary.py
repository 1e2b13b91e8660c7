"""The numbers of a simulation run, and tables of one run or two side by side (pure)."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from load_controller.simulate.engine import Result
from load_controller.solver import PHASE_NAMES

LEVELS = ("low", "normal", "high")


@dataclass(slots=True)
class CarRow:
    car: str
    evse: str
    stays: int
    wanted_kwh: float
    delivered_kwh: float
    unmet_kwh: float
    stays_met: int  # stays that got all they wanted
    paused_min: dict[str, float]  # while it still needed energy, by the reason the controller gave
    cost: float | None


@dataclass(slots=True)
class NodeRow:
    node: str
    phase: str
    limit_a: float | None
    peak_a: float
    p99_a: float
    over_s: float  # time drawn above the limit (cars following a cut late, a house load jump)
    max_excess_a: float


@dataclass(slots=True)
class TariffRow:
    level: str
    kwh: float
    price_ct_per_kwh: float | None
    cost: float | None


@dataclass(slots=True)
class Summary:
    label: str
    site: str
    start: str
    days: float
    house: str
    steps: int
    step_calls: int
    cars: list[CarRow]
    nodes: list[NodeRow]
    tariffs: list[TariffRow]
    currency: str
    curtailed_min: float  # an operator limit (or the failsafe) bound the EVs
    floor_min: float  # ... and had been raised to the §14a floor
    curtailed_by: dict[str, float]
    violations: dict[str, int]
    violation_examples: list[str]
    operator_over_s: float  # the EVs drew more than a binding operator limit (following it late)
    operator_over_max_w: float
    cars_without_evse: list[str] = field(default_factory=list)
    warnings: list[tuple[str, float]] = field(default_factory=list)  # most frequent controller warnings (minutes)

    @property
    def wanted_kwh(self) -> float:
        return sum(c.wanted_kwh for c in self.cars)

    @property
    def delivered_kwh(self) -> float:
        return sum(c.delivered_kwh for c in self.cars)

    @property
    def unmet_kwh(self) -> float:
        return sum(c.unmet_kwh for c in self.cars)

    @property
    def cost(self) -> float | None:
        costs = [t.cost for t in self.tariffs if t.kwh > 0]
        return None if any(c is None for c in costs) else sum(c for c in costs if c is not None)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(wanted_kwh=self.wanted_kwh, delivered_kwh=self.delivered_kwh, unmet_kwh=self.unmet_kwh,
                 cost=self.cost)
        return d


def weighted_quantile(values: list[float], weights: list[int], q: float) -> float:
    """The smallest value at or below which at least ``q`` of the total weight lies."""
    pairs = sorted((v, w) for v, w in zip(values, weights, strict=True) if w > 0)
    if not pairs:
        return 0.0
    total = sum(w for _, w in pairs)
    acc = 0
    for v, w in pairs:
        acc += w
        if acc >= q * total - 1e-9:
            return v
    return pairs[-1][0]


def _price(res: Result, idx: int) -> tuple[str, float | None]:
    """Tariff level and price (ct/kWh) of tariff interval ``idx`` (-1: no tariff known)."""
    lp = res.scenario.limits.prices
    hp = res.cfg.history.prices
    default = lp.default if lp.default is not None else hp.default_ct_per_kwh
    if idx < 0:
        normal = lp.normal if lp.normal is not None else hp.normal
        return "unknown", default if default is not None else normal
    spec = res.plant.tariff_ivs[idx].spec
    if spec.price_ct_per_kwh is not None:
        return spec.level, spec.price_ct_per_kwh
    for src in (lp, hp):
        v = getattr(src, spec.level)
        if v is not None:
            return spec.level, v
    return spec.level, default


def summarize(res: Result, label: str = "") -> Summary:
    rec = res.records
    dur = rec.durations(res.n_steps)
    minutes = res.dt / 60.0
    topo = res.topo
    stays = res.stays
    n = len(rec.k)
    wh = res.plant.units_wh
    # -- energy per record (from the exact counters) and what it cost -------------------------------------------
    tariff_wh: dict[int, float] = defaultdict(float)
    stay_cost: dict[int, float | None] = defaultdict(float)
    paused: dict[int, Counter[str]] = defaultdict(Counter)
    for r in range(n):
        row_stay = rec.stay[r]
        nxt_stay = rec.stay[r + 1] if r + 1 < n else None
        level_price = _price(res, rec.tariff[r])
        for j, s in enumerate(row_stay):
            if s < 0:
                continue
            start_u = rec.units[r][j]
            end_u = rec.units[r + 1][j] if nxt_stay is not None and nxt_stay[j] == s else stays[s].delivered
            e = wh(end_u - start_u)
            if e:
                tariff_wh[rec.tariff[r]] += e
                price = level_price[1]
                c = stay_cost[s]
                stay_cost[s] = None if c is None or price is None else c + e / 1000 * price / 100
            if rec.needs[r][j] and rec.grant[r][j] <= 0:
                paused[s][rec.bound[r][j]] += dur[r]
    # -- cars ----------------------------------------------------------------------------------------------------
    by_car: dict[str, list[int]] = defaultdict(list)
    for st in stays:
        by_car[st.car.id].append(st.index)
    cars: list[CarRow] = []
    for car in res.scenario.cars.cars:
        idx = by_car.get(car.id, [])
        if not idx:
            continue
        wanted = sum(wh(stays[i].need_units) for i in idx) / 1000
        got = sum(wh(stays[i].delivered) for i in idx) / 1000
        pc: Counter[str] = Counter()
        for i in idx:
            pc.update(paused[i])
        costs = [stay_cost[i] for i in idx]
        cost = None if any(c is None for c in costs) else sum(c for c in costs if c is not None)
        cars.append(CarRow(car.id, car.evse, len(idx), round(wanted, 3), round(got, 3),
                           round(max(0.0, wanted - got), 3),
                           sum(1 for i in idx if stays[i].delivered >= stays[i].need_units),
                           {k: round(v * minutes, 1) for k, v in pc.most_common()},
                           None if cost is None else round(cost, 2)))
    # -- nodes -----------------------------------------------------------------------------------------------------
    nodes: list[NodeRow] = []
    for nd in topo.nodes:
        for j in range(3):
            col = nd.index * 3 + j
            vals = [row[col] for row in rec.node_a]
            lim = nd.limits[j]
            key = f"{nd.id}:{PHASE_NAMES[j]}"
            nodes.append(NodeRow(nd.id, PHASE_NAMES[j], None if lim == float("inf") else lim,
                                 round(max(vals, default=0.0), 2), round(weighted_quantile(vals, dur, 0.99), 2),
                                 round(res.overload_steps.get(key, 0) * res.dt, 1),
                                 round(res.overload_max.get(key, 0.0), 2)))
    # -- tariffs ---------------------------------------------------------------------------------------------------
    per_level: dict[str, list[float | None]] = {}
    for idx, e in sorted(tariff_wh.items()):
        level, price = _price(res, idx)
        acc = per_level.setdefault(level, [0.0, 0.0, price])
        acc[0] = (acc[0] or 0.0) + e / 1000
        cost = None if price is None or acc[1] is None else acc[1] + e / 1000 * price / 100
        acc[1] = cost
        if acc[2] != price:
            acc[2] = None  # several prices at one level: see the cost
    tariffs = [TariffRow(level, round(v[0] or 0.0, 3), v[2], None if v[1] is None else round(v[1], 2))
               for level, v in sorted(per_level.items(), key=lambda x: ((*LEVELS, "unknown")).index(x[0]))]
    # -- curtailment -----------------------------------------------------------------------------------------------
    curt = 0
    floor = 0
    by_src: Counter[str] = Counter()
    for r in range(n):
        lab, _eff, at_floor = rec.curtail[r]
        if lab:
            curt += dur[r]
            by_src[lab] += dur[r]
            if at_floor:
                floor += dur[r]
    currency = res.scenario.limits.prices.currency or res.cfg.history.prices.currency
    examples = [f"{v.at.astimezone(res.tz).isoformat(timespec='seconds')} {v.kind} {v.where}: {v.value:.2f} > "
                f"{v.limit:.2f} ({v.detail})" for v in res.violations[:10]]
    return Summary(
        label=label, site=res.cfg.site.name, start=res.start.astimezone(res.tz).isoformat(timespec="minutes"),
        days=round(res.n_steps * res.dt / 86400, 3), house=res.scenario.label, steps=res.n_steps,
        step_calls=res.step_calls, cars=cars, nodes=nodes, tariffs=tariffs, currency=currency,
        curtailed_min=round(curt * minutes, 1), floor_min=round(floor * minutes, 1),
        curtailed_by={k: round(v * minutes, 1) for k, v in by_src.most_common()},
        violations=dict(res.violation_counts), violation_examples=examples,
        operator_over_s=round(res.operator_over_steps * res.dt, 1),
        operator_over_max_w=round(res.operator_over_max_w, 1),
        cars_without_evse=[c.id for c in res.plant.missing_evse],
        warnings=[(w, round(c * minutes, 1)) for w, c in res.warnings.most_common(5)])


# -- tables ----------------------------------------------------------------------------------------------------------


def _f(x: float | None, unit: str = "", nd: int = 1) -> str:
    if x is None:
        return "-"
    return f"{x:.{nd}f}{unit}"


def _dur(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def _paused(d: dict[str, float]) -> str:
    if not d:
        return "0 min"
    total = sum(d.values())
    parts = ", ".join(f"{k} {v:.0f}" for k, v in list(d.items())[:3])
    return f"{total:.0f} min ({parts})"


def rows(s: Summary) -> list[tuple[str, str]]:
    """(metric, value) pairs in reading order: the summary table of one run."""
    out: list[tuple[str, str]] = [
        ("house load", s.house),
        ("simulated", f"{s.days:g} d from {s.start} ({s.steps} steps, {s.step_calls} computed)"),
        ("energy wanted / delivered", f"{s.wanted_kwh:.1f} / {s.delivered_kwh:.1f} kWh"),
        ("unmet need", f"{s.unmet_kwh:.1f} kWh"),
    ]
    for c in s.cars:
        out.append((f"car {c.car} @ {c.evse}: delivered / wanted",
                    f"{c.delivered_kwh:.1f} / {c.wanted_kwh:.1f} kWh ({c.stays_met}/{c.stays} stays full)"))
        out.append((f"car {c.car}: paused while needing", _paused(c.paused_min)))
    for name in s.cars_without_evse:
        out.append((f"car {name}", "no such EVSE in this configuration"))
    for nr in s.nodes:
        if nr.limit_a is None and nr.peak_a == 0:
            continue
        lim = "-" if nr.limit_a is None else f"{nr.limit_a:g}"
        val = f"{nr.peak_a:.1f} / {nr.p99_a:.1f} A of {lim} A"
        if nr.over_s > 0:
            val += f"; over it {_dur(nr.over_s)} (max +{nr.max_excess_a:.1f} A)"
        out.append((f"{nr.node} {nr.phase} peak / p99 vs fuse", val))
    out.append(("curtailed (operator limit or failsafe)",
                f"{s.curtailed_min:.0f} min" + (f" ({', '.join(f'{k} {v:.0f}' for k, v in s.curtailed_by.items())})"
                                                if s.curtailed_by else "")))
    out.append(("at the §14a floor", f"{s.floor_min:.0f} min"))
    if s.operator_over_s > 0:
        out.append(("EVs above an operator limit (following late)",
                    f"{_dur(s.operator_over_s)} (max +{s.operator_over_max_w:.0f} W)"))
    for t in s.tariffs:
        price = f" at {t.price_ct_per_kwh:g} ct" if t.price_ct_per_kwh is not None else ""
        out.append((f"energy {t.level}", f"{t.kwh:.1f} kWh{price} = {_f(t.cost, ' ' + s.currency, 2)}"))
    out.append(("cost", _f(s.cost, " " + s.currency, 2)))
    viol = sum(s.violations.values())
    out.append(("safety violations", "none" if not viol else
                f"{viol} steps ({', '.join(f'{k} {v}' for k, v in s.violations.items())})"))
    return out


def text_table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = [" ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), line]
    fmt += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in body]
    fmt[0] = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()
    return "\n".join(fmt)


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in [header, *body]]
    out = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(out)


def table(summaries: list[Summary], style: str = "text") -> str:
    """One run, or several side by side (one column each; rows only one of them has show '-')."""
    keys: list[str] = []
    vals: list[dict[str, str]] = []
    for s in summaries:
        d: dict[str, str] = {}
        prev = -1
        for k, v in rows(s):
            if k not in keys:
                keys.insert(prev + 1, k)  # after the row it follows in this run
            prev = keys.index(k)
            d[k] = v
        vals.append(d)
    # a car whose EVSE only one configuration has: its row says so in the other column (no row of its own)
    for s, d in zip(summaries, vals, strict=True):
        for name in s.cars_without_evse:
            own = [k for k in keys if k.startswith(f"car {name} @ ")]
            if own:
                d.pop(f"car {name}")
                d[own[0]] = "no such EVSE in this configuration"
    keys = [k for k in keys if any(k in d for d in vals)]
    header = ["", *[s.label or f"run {i + 1}" for i, s in enumerate(summaries)]]
    body = [[k, *[d.get(k, "-") for d in vals]] for k in keys]
    return markdown_table(header, body) if style == "markdown" else text_table(header, body)
