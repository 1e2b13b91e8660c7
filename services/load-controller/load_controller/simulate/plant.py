"""The plant: house load, cars at their EVSEs, meters, operator limits and tariffs, in simulated time.

Time is counted in steps of ``dt`` (the controller's ``cycle_s``) from ``start``. At step ``k`` the plant
is brought to ``k`` (:meth:`SitePlant.tick`: events at ``k``, setpoints whose delay has passed), shows
the controller what the bus would (:meth:`observe`: EVSE statuses as the evse-poller publishes them,
meter readings, ``grid/limit/*``, ``tariff/schedule``, charging modes) and receives its decision
(:meth:`send`), which each car follows ``delay_s`` later (at least one step). Between two steps every
car draws a constant current; energy is counted in whole units of 0.01 A x one step per phase, so a
span of ``n`` identical steps adds exactly what ``n`` single steps add.

A car draws min(setpoint, its on-board charger, the EVSE's maximum) on the phases it uses: its own
phase count, the EVSE's (a 1-phase EVSE: one), and 1 when a switching EVSE has applied a 1-phase
setpoint (a device that cannot switch ignores the phase count, as the evse-poller does). It stops
(IEC B, 0 A) once it has what it needs; it stays plugged in until it leaves.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from chargegate import payloads as p
from chargegate.config import Config, ConfigError
from chargegate.config.controller import ALL_DAYS
from load_controller.controller import Inputs
from load_controller.simulate.scenario import CarSpec, LimitSpec, Period, Scenario, TariffSpec, hhmm_time
from load_controller.topology import EvseSpec, Topology

UNIT_A = 0.01  # energy is counted in units of UNIT_A x one step, per phase


def _defaults(model: type[p.Model]) -> dict[str, Any]:
    out = {}
    for name, f in model.model_fields.items():
        if f.is_required():
            continue
        out[name] = f.get_default(call_default_factory=True)
    return out


_STATUS_DEFAULTS = _defaults(p.EvseStatus)
_READING_DEFAULTS = _defaults(p.MeterReading)


def build(model: type[p.Model], defaults: dict[str, Any], **values: Any) -> Any:
    """A payload the plant produces itself (valid by construction): no validation, no default factories."""
    return model.model_construct(**{**defaults, **values})


@dataclass(slots=True)
class Stay:
    """One car at one EVSE from ``arrive`` to ``depart`` (steps; gone at ``depart``)."""

    index: int
    car: CarSpec
    evse: int
    arrive: int
    depart: int
    need_units: int
    delay_steps: int
    started: datetime
    delivered: int = 0
    full_at: int | None = None


@dataclass(slots=True)
class Port:
    """The plant side of one EVSE."""

    spec: EvseSpec
    stays: list[Stay]
    reports_energy: bool  # its status carries the session energy (a min_energy rule or session target needs it)
    next_stay: int = 0
    stay: Stay | None = None
    applied_a: float = 0.0
    applied_nph: int = 3
    pending: deque[tuple[int, float, int]] = field(default_factory=deque)
    last_sent: tuple[float, int] | None = None
    draw_c: int = 0  # centiamps on each used phase
    used: tuple[int, ...] = ()  # EVSE-frame phases drawn on
    register: int = 0  # energy units over all stays
    dirty: bool = True
    status: Any = None


@dataclass(frozen=True, slots=True)
class Interval:
    start: int  # step
    end: int  # step (exclusive)
    start_at: datetime
    end_at: datetime
    spec: Any
    key: str


def daily_span(day: date, start: str, end: str, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """``start`` to ``end`` (HH:MM local) on ``day``; an ``end`` not later than ``start`` is the next day's."""
    s = datetime.combine(day, hhmm_time(start), tzinfo=tz)
    e = datetime.combine(day, hhmm_time(end), tzinfo=tz)
    if e <= s:
        e = datetime.combine(day + timedelta(days=1), hhmm_time(end), tzinfo=tz)
    return s, e


def _expand(periods: list[Any], first_day: date, days: int, tz: ZoneInfo, to_step: Any, what: str,
            n_steps: int) -> list[Interval]:
    out: list[Interval] = []
    for idx, per in enumerate(periods):
        per_: Period = per
        for d in range(-1, days + 1):
            day = first_day + timedelta(days=d)
            if per_.date is not None:
                if day != per_.date:
                    continue
            elif ALL_DAYS[day.weekday()] not in per_.days:
                continue
            s, e = daily_span(day, per_.start, per_.end, tz)
            ks, ke = to_step(s), to_step(e)
            if ke <= 0 or ks >= n_steps:
                continue
            out.append(Interval(ks, ke, s, e, per, f"{what}[{idx}]"))
    out.sort(key=lambda iv: iv.start)
    return out


def _no_overlap(ivs: list[Interval], what: str, source: str) -> None:
    for a, b in itertools.pairwise(ivs):
        if b.start < a.end:
            raise ConfigError(source, [(b.key, f"{what} overlaps {a.key} ({a.start_at.isoformat()} - "
                                               f"{a.end_at.isoformat()})")])


class SitePlant:
    """The plant for one site configuration and one scenario (see the module docstring)."""

    def __init__(self, cfg: Config, topo: Topology, scenario: Scenario, start: datetime, n_steps: int,
                 tz: ZoneInfo, energy_evses: set[str]) -> None:
        self.cfg = cfg
        self.topo = topo
        self.start = start
        self.dt = cfg.controller.cycle_s
        self.n_steps = n_steps
        self.tz = tz
        self.v = cfg.controller.voltage_v
        self.k = 0
        self.acc_k = 0  # energy is accounted up to this step
        self.now = start
        self.inputs = Inputs()
        first_day = start.astimezone(tz).date()
        days = math.ceil(n_steps * self.dt / 86400) + 1
        self.first_day = first_day
        # -- house load per node (as rows give it), inclusive of the sub-distributions -----------------
        nodes = {nd.id: nd.index for nd in topo.nodes}
        series: dict[int, tuple[list[int], list[tuple[float, float, float]]]] = {}
        unknown = sorted({r[1] for r in scenario.house if r[1] is not None and r[1] not in nodes})
        if unknown:
            raise ConfigError(scenario.label or "house load",
                              [("node", f"{', '.join(unknown)} is not a circuit of the configuration "
                                        f"(circuits: {', '.join(nodes)})")])
        for ts, node, vals in sorted(scenario.house, key=lambda r: r[0]):
            n = nodes[node] if node is not None else 0
            ks, vs = series.setdefault(n, ([], []))
            k = max(0, self.to_step(ts))
            if ks and ks[-1] == k:
                vs[-1] = vals
            elif ks and k < 0:
                continue
            else:
                ks.append(k)
                vs.append(vals)
        for ks, _vs in series.values():
            ks[0] = 0  # before its first row the first row's value holds
        self.house_series = series
        self.house_changes = sorted({k for ks, _ in series.values() for k in ks if k > 0})
        self.children: list[list[int]] = [[] for _ in topo.nodes]
        for nd in topo.nodes:
            if nd.parent >= 0:
                self.children[nd.parent].append(nd.index)
        self.metered_nodes = {n for n, _ in topo.metered}
        self.house: list[list[float]] = [[0.0, 0.0, 0.0] for _ in topo.nodes]
        # -- cars ---------------------------------------------------------------------------------------------
        evse_ids = {e.id: e for e in topo.evses}
        stays: dict[int, list[Stay]] = {e.index: [] for e in topo.evses}
        self.missing_evse: list[CarSpec] = []
        self.all_stays: list[Stay] = []
        for car in scenario.cars.cars:
            e = evse_ids.get(car.evse)
            if e is None:
                self.missing_evse.append(car)
                continue
            for d in range(-1, days + 1):
                day = first_day + timedelta(days=d)
                if ALL_DAYS[day.weekday()] not in car.days:
                    continue
                arr, dep = daily_span(day, car.arrive, car.depart, tz)
                ka, kd = self.to_step(arr), self.to_step(dep)
                if kd <= 0 or ka >= n_steps or ka < 0:
                    continue  # a stay that began before the run is left out (its need is unknown)
                need_units = math.ceil(car.need_kwh * 1000 * 3600 / (self.v * self.dt) / UNIT_A - 1e-9)
                st = Stay(0, car, e.index, ka, min(kd, n_steps + 1), need_units,
                          max(1, math.ceil(car.delay_s / self.dt - 1e-9)), arr)
                stays[e.index].append(st)
        for i, lst in stays.items():
            lst.sort(key=lambda s: s.arrive)
            for a, b in itertools.pairwise(lst):
                if b.arrive < a.depart:
                    raise ConfigError("cars", [(f"cars.{b.car.id}", f"arrives at EVSE {evse_ids and topo.evses[i].id} "
                                                                    f"on {b.started.isoformat()} while {a.car.id} is "
                                                                    f"still plugged in there")])
        for i in sorted(stays):
            for st in stays[i]:
                st.index = len(self.all_stays)
                self.all_stays.append(st)
        self.ports = [Port(e, stays[e.index], e.id in energy_evses, applied_nph=e.phases) for e in topo.evses]
        # -- limits and tariffs ---------------------------------------------------------------------------
        lim = scenario.limits
        self.limit_ivs = _expand(lim.limits, first_day, days, tz, self.to_step, "limits", n_steps)
        for src in {iv.spec.source for iv in self.limit_ivs}:
            _no_overlap([iv for iv in self.limit_ivs if iv.spec.source == src], f"a {src} limit", "limits")
        self.tariff_ivs = _expand(lim.tariffs, first_day, days, tz, self.to_step, "tariffs", n_steps)
        _no_overlap(self.tariff_ivs, "a tariff period", "limits")
        self.tariff_starts = [iv.start for iv in self.tariff_ivs]
        events: dict[int, list[tuple[str, Any]]] = {}
        for iv in self.limit_ivs:
            events.setdefault(max(0, iv.start), []).append(("limit_on", iv))
            if iv.spec.ends == "deactivate" and iv.end < n_steps:
                events.setdefault(iv.end, []).append(("limit_off", iv))
        if self.tariff_ivs:
            for d in range(days + 1):
                k = self.to_step(datetime.combine(first_day + timedelta(days=d), time(0), tzinfo=tz))
                if k < n_steps:
                    events.setdefault(max(0, k), []).append(("schedule", None))
        self.events = events
        self.event_steps = sorted(events)
        self.mode_inputs: dict[str, p.ChargingMode] = {}

    # -- time ---------------------------------------------------------------------------------------------------
    def to_step(self, ts: datetime) -> int:
        """The first step at or after ``ts``."""
        return math.ceil((ts - self.start).total_seconds() / self.dt - 1e-9)

    def at(self, k: int) -> datetime:
        return self.start + timedelta(seconds=k * self.dt)

    # -- energy ---------------------------------------------------------------------------------------------------
    def units_wh(self, units: int) -> float:
        return units * UNIT_A * self.v * self.dt / 3600.0

    def advance(self, to: int) -> None:
        """Count the energy the cars draw from ``acc_k`` to ``to`` (constant draws in between)."""
        n = to - self.acc_k
        if n <= 0:
            return
        for port in self.ports:
            st = port.stay
            if st is None or port.draw_c <= 0:
                continue
            add = min(port.draw_c * len(port.used) * n, st.need_units - st.delivered)
            st.delivered += add
            port.register += add
        self.acc_k = to

    # -- events ---------------------------------------------------------------------------------------------------
    def tick(self, k: int) -> None:
        """Bring the plant to step ``k``: energy up to ``k``, then everything that happens at ``k``."""
        self.advance(k)
        self.k = k
        self.now = self.at(k)
        house_changed = k == 0 or (self.house_changes and _contains(self.house_changes, k))
        if house_changed:
            self._house(k)
        for port in self.ports:
            st = port.stay
            if st is not None and st.depart <= k:
                port.stay = None
                port.dirty = True
                self.mode_inputs.pop(port.spec.id, None)
                st = None
            if st is None and port.next_stay < len(port.stays) and port.stays[port.next_stay].arrive <= k:
                st = port.stay = port.stays[port.next_stay]
                port.next_stay += 1
                port.dirty = True
                car = st.car
                if car.mode is not None or car.target_kwh is not None:
                    target = (p.SessionTarget.model_validate({"energy_wh": car.target_kwh * 1000, "by": car.by})
                              if car.target_kwh is not None and car.by is not None else None)
                    self.mode_inputs[port.spec.id] = p.ChargingMode(
                        evse_id=port.spec.id, mode=car.mode or "rules", target=target, set_by="simulation",
                        ts=self.now)
            if st is not None and st.full_at is None and st.delivered >= st.need_units:
                st.full_at = k
                port.dirty = True
            while port.pending and port.pending[0][0] <= k:
                _, a, nph = port.pending.popleft()
                if (a, nph) != (port.applied_a, port.applied_nph):
                    port.applied_a, port.applied_nph = a, nph
                    port.dirty = True
            if port.dirty:
                self._draw(port)
        for kind, iv in self.events.get(k, ()):
            if kind == "limit_on":
                self._limit_on(iv)
            elif kind == "limit_off":
                self._limit_off(iv)
            elif kind == "schedule":
                self._schedule(k)

    def _house(self, k: int) -> None:
        def incl(n: int) -> list[float]:
            s = self.house_series.get(n)
            kids = [incl(c) for c in self.children[n]]
            if s is not None:
                ks, vs = s
                v = vs[bisect.bisect_right(ks, k) - 1]
                out = [float(v[0]), float(v[1]), float(v[2])]
            else:
                out = [sum(x[j] for x in kids) for j in range(3)] if kids else [0.0, 0.0, 0.0]
            self.house[n] = out
            return out

        incl(0)

    def _draw(self, port: Port) -> None:
        e = port.spec
        st = port.stay
        if st is None or st.full_at is not None:
            port.draw_c, port.used = 0, ()
            return
        a = min(port.applied_a, st.car.max_current_a, e.max_a)
        port.draw_c = round(a / UNIT_A) if a > 0 else 0
        one = e.phases == 1 or st.car.phases == 1 or (e.switching and port.applied_nph == 1)
        port.used = (0,) if one else (0, 1, 2)
        if port.draw_c <= 0:
            port.used = ()

    def _limit_on(self, iv: Interval) -> None:
        spec: LimitSpec = iv.spec
        valid = iv.end_at if spec.ends == "expire" else iv.end_at + timedelta(hours=1)
        self.inputs.grid_limits[spec.source] = p.GridLimit(
            source=spec.source, active=True, power_w=spec.power_w, current_a=spec.current_a, scope=spec.scope,
            valid_until=valid, id=spec.id or iv.key, reason="simulated", ts=max(iv.start_at, self.start))

    def _limit_off(self, iv: Interval) -> None:
        spec: LimitSpec = iv.spec
        self.inputs.grid_limits[spec.source] = p.GridLimit(
            source=spec.source, active=False, valid_until=iv.end_at + timedelta(days=1), id=spec.id or iv.key,
            ts=iv.end_at)

    def _schedule(self, k: int) -> None:
        lo, hi = self.at(k) - timedelta(days=1), self.at(k) + timedelta(days=2)
        periods = []
        for iv in self.tariff_ivs:
            if iv.end_at <= lo or iv.start_at >= hi:
                continue
            spec: TariffSpec = iv.spec
            periods.append(p.TariffPeriod(id=f"{iv.key}@{iv.start_at.date().isoformat()}", level=spec.level,
                                          start=iv.start_at, end=iv.end_at, price_ct_per_kwh=spec.price_ct_per_kwh))
        self.inputs.tariff_schedule = p.TariffSchedule(periods=periods[:1000], ts=self.at(k))

    def tariff_at(self, k: int) -> int:
        """Index of the tariff period in force during step ``k`` (-1: none)."""
        i = bisect.bisect_right(self.tariff_starts, k) - 1
        if i >= 0 and self.tariff_ivs[i].end > k:
            return i
        return -1

    # -- what the controller sees ---------------------------------------------------------------------------
    def observe(self) -> Inputs:
        now = self.now
        inp = self.inputs
        v = self.v
        for port in self.ports:
            e = port.spec
            st = port.stay
            if port.dirty or port.status is None or port.reports_energy:
                cur = [0.0, 0.0, 0.0]
                a = port.draw_c * UNIT_A
                for j in port.used:
                    cur[j] = a
                if st is None:
                    state, iec = p.EvseState.AVAILABLE, p.IecState.A
                elif a > 0:
                    state, iec = p.EvseState.CHARGING, p.IecState.C
                else:
                    state, iec = p.EvseState.SUSPENDED, p.IecState.B
                extra: dict[str, Any] = {}
                if port.reports_energy:
                    extra["energy_wh"] = self.units_wh(port.register)
                    if st is not None:
                        extra["session"] = p.Session.model_construct(
                            id=f"{st.car.id}-{st.index}", started=st.started, energy_start_wh=None,
                            energy_wh=self.units_wh(st.delivered), id_tag=None, signed_meter_values=[])
                port.status = build(
                    p.EvseStatus, _STATUS_DEFAULTS, ts=now, evse_id=e.id, online=True, state=state, iec_state=iec,
                    phases_in_use=len(port.used), current_a=cur, power_w=a * len(port.used) * v,
                    applied=p.AppliedSetpoint.model_construct(current_a=port.applied_a, phases=port.applied_nph,
                                                              seq=None, source="load-controller", fallback=False),
                    source="evse-poller", flags=[], **extra)
                port.dirty = False
                inp.statuses[e.id] = port.status
            else:
                port.status.__dict__["ts"] = now
        node_a = self.node_currents()
        for n, mid in self.topo.metered:
            cur = node_a[n]
            inp.readings[mid] = build(p.MeterReading, _READING_DEFAULTS, meter_id=mid, ts=now, online=True,
                                      current_a=list(cur), power_w=sum(cur) * v, flags=[])
        inp.modes = self.mode_inputs
        return inp

    def node_currents(self) -> list[list[float]]:
        """What flows through every node now, per grid phase: its house load and the cars below it."""
        out = [list(h) for h in self.house]
        for port in self.ports:
            if port.draw_c <= 0:
                continue
            e = port.spec
            a = port.draw_c * UNIT_A
            for j in port.used:
                g = e.rotation[j]
                for n in self.topo.nodes[e.node].chain:
                    out[n][g] += a
        return out

    def would_draw(self, decisions: list[Any]) -> list[list[float]]:
        """Per node and grid phase: the house load now plus what every car would draw under ``decisions``."""
        out = [list(h) for h in self.house]
        for port, d in zip(self.ports, decisions, strict=True):
            st = port.stay
            if st is None or st.full_at is not None or d.current <= 0:
                continue
            e = port.spec
            a = min(d.current, st.car.max_current_a, e.max_a)
            one = e.phases == 1 or st.car.phases == 1 or (e.switching and d.phases == 1)
            for j in ((0,) if one else (0, 1, 2)):
                g = e.rotation[j]
                for n in self.topo.nodes[e.node].chain:
                    out[n][g] += a
        return out

    # -- the controller's decision ------------------------------------------------------------------------------
    def send(self, decisions: list[Any], k: int) -> None:
        for port, d in zip(self.ports, decisions, strict=True):
            e = port.spec
            target = (d.current, d.phases if e.switching else e.phases)
            if target == port.last_sent:
                continue
            port.last_sent = target
            delay = port.stay.delay_steps if port.stay is not None else 1
            eff = k + delay
            if port.pending and port.pending[-1][0] > eff:
                eff = port.pending[-1][0]
            port.pending.append((eff, target[0], target[1]))

    def settled(self) -> bool:
        """Every EVSE has applied what it was last told and nothing is on its way (the plant is at rest)."""
        for port in self.ports:
            if port.pending:
                return False
            if port.last_sent is not None and port.last_sent != (port.applied_a, port.applied_nph):
                return False
        return True

    def next_event(self, k: int) -> int:
        """The first step after ``k`` at which something in the plant changes on its own."""
        nxt = self.n_steps
        i = bisect.bisect_right(self.house_changes, k)
        if i < len(self.house_changes):
            nxt = min(nxt, self.house_changes[i])
        i = bisect.bisect_right(self.event_steps, k)
        if i < len(self.event_steps):
            nxt = min(nxt, self.event_steps[i])
        for port in self.ports:
            st = port.stay
            if st is not None:
                nxt = min(nxt, max(st.depart, k + 1))
                if st.full_at is None and port.draw_c > 0:
                    per = port.draw_c * len(port.used)
                    nxt = min(nxt, self.acc_k + max(1, -(-(st.need_units - st.delivered) // per)))
            elif port.next_stay < len(port.stays):
                nxt = min(nxt, max(port.stays[port.next_stay].arrive, k + 1))
            if port.pending:
                nxt = min(nxt, port.pending[0][0])
        return max(nxt, k + 1)


def _contains(sorted_list: list[int], k: int) -> bool:
    i = bisect.bisect_left(sorted_list, k)
    return i < len(sorted_list) and sorted_list[i] == k
