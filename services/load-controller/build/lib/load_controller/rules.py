"""Charging rules from the configuration, evaluated every cycle (pure: ``now`` is an input)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from chargegate import payloads as p
from chargegate.config.controller import MinEnergyRule, SolarRule, TariffRule, TimeWindow, WindowRule

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _hhmm(s: str) -> time:
    h, m = s.split(":")
    return time(int(h), int(m))


def in_window(w: TimeWindow, local: datetime) -> bool:
    """Whether local time ``local`` is inside ``w`` (a window ending before its start runs across
    midnight and counts for the day it starts on; start == end is the whole day)."""
    start, end = _hhmm(w.start), _hhmm(w.end)
    t = local.time()
    today = DAYS[local.weekday()]
    yesterday = DAYS[(local.weekday() - 1) % 7]
    if start == end:
        return today in w.days
    if start < end:
        return today in w.days and start <= t < end
    # across midnight
    return (today in w.days and t >= start) or (yesterday in w.days and t < end)


def tariff_level(current: p.TariffCurrent | None, schedule: p.TariffSchedule | None,
                 now: datetime) -> tuple[str | None, str | None]:
    """The tariff level in force and the id of its period (None when unknown)."""
    if current is not None and (current.valid_until is None or now < current.valid_until):
        per = current.period
        if per.start <= now and (per.end is None or now < per.end):
            return per.level.value, per.id
    if schedule is not None:
        best: p.TariffPeriod | None = None
        for per in schedule.periods:
            if per.start <= now and (per.end is None or now < per.end) and (best is None or per.start > best.start):
                best = per
        if best is not None:
            return best.level.value, best.id
    return None, None


def next_local(hhmm: str, after: datetime, tz: ZoneInfo) -> datetime:
    """The first moment at local time ``hhmm`` strictly after ``after``."""
    local = after.astimezone(tz)
    t = _hhmm(hhmm)
    cand = datetime.combine(local.date(), t, tzinfo=tz)
    if cand <= local:
        cand = datetime.combine(local.date() + timedelta(days=1), t, tzinfo=tz)
    return cand


@dataclass(slots=True)
class RuleGroupSpec:
    rule_id: str
    members: list[int]  # EVSE indices
    total_a: float  # budget summed over phases (A)
    detail: str


@dataclass(slots=True)
class EvseRuleView:
    """What the rule engine needs to know about one EVSE."""

    index: int
    id: str
    wants: bool
    charging: bool  # granted > 0 in the previous cycle
    protected: bool  # within its minimum charging time
    min_a: float
    max_a: float
    phases: int
    switching: bool
    power_w: float  # measured now (0 when unknown)
    session_energy_wh: float | None
    session_start: datetime | None


@dataclass(slots=True)
class RuleOutcome:
    caps: dict[int, tuple[str, str]] = field(default_factory=dict)  # EVSE -> (label, detail): paused by a rule
    groups: list[RuleGroupSpec] = field(default_factory=list)
    boosted: dict[int, str] = field(default_factory=dict)  # EVSE -> min_energy rule id overriding the others
    info: dict[str, Any] = field(default_factory=dict)


def evaluate(rules: list[Any], evses: list[EvseRuleView], *, now: datetime, tz: ZoneInfo, voltage: float,
             tariff: tuple[str | None, str | None], surplus_w: dict[str | None, float | None],
             all_ids: list[str]) -> RuleOutcome:
    """Evaluate every enabled rule for the EVSEs it names (all when it names none).

    ``surplus_w`` maps a meter id (None: the root meter) to its export in W (None: unknown/stale).
    Rules combine with AND (the lowest wins); a ``min_energy`` rule whose deadline is near lifts the
    other rules for its EVSE.
    """
    out = RuleOutcome()
    by_id = {e.id: e for e in evses}

    def members(rule: Any) -> list[EvseRuleView]:
        ids = rule.evses or all_ids
        return [by_id[i] for i in ids if i in by_id]

    local = now.astimezone(tz)
    for rule in rules:
        if not rule.enabled or not isinstance(rule, MinEnergyRule):
            continue
        for e in members(rule):
            if not e.wants or e.session_energy_wh is None:
                continue
            remaining = rule.energy_wh - e.session_energy_wh
            start = e.session_start or now
            deadline = next_local(rule.by, start, tz)
            full_w = e.max_a * voltage * e.phases
            if remaining <= 0 or now >= deadline or full_w <= 0:
                continue
            need_s = remaining / full_w * 3600 + rule.margin_s
            if now >= deadline - timedelta(seconds=need_s):
                out.boosted[e.index] = rule.id
                out.info[f"rule:{rule.id}:{e.id}"] = (f"boost: {remaining:.0f} Wh still needed by "
                                                      f"{deadline.isoformat()}")
    level, period_id = tariff
    for rule in rules:
        if not rule.enabled or isinstance(rule, MinEnergyRule):
            continue
        ms = [e for e in members(rule) if e.index not in out.boosted]
        label = f"rule:{rule.id}"
        if isinstance(rule, WindowRule):
            inside = any(in_window(w, local) for w in rule.windows)
            out.info[label] = "inside window" if inside else "outside window"
            if not inside:
                for e in ms:
                    out.caps.setdefault(e.index, (label, "outside the charging window"))
        elif isinstance(rule, TariffRule):
            lvl = level or rule.unknown_level
            ok = lvl in rule.charge_in
            out.info[label] = f"tariff {lvl}{' (assumed)' if level is None else ''}: " + (
                "charging" if ok else f"at most {rule.max_power_w_otherwise:.0f} W")
            if ok:
                continue
            detail = f"tariff {lvl}{f' ({period_id})' if period_id else ''}"
            if rule.max_power_w_otherwise <= 0:
                for e in ms:
                    out.caps.setdefault(e.index, (label, f"{detail}: charging only in {'/'.join(rule.charge_in)}"))
            elif ms:
                out.groups.append(RuleGroupSpec(rule.id, [e.index for e in ms], rule.max_power_w_otherwise / voltage,
                                                f"{detail}: at most {rule.max_power_w_otherwise:.0f} W"))
        elif isinstance(rule, SolarRule):
            export = surplus_w.get(rule.meter)
            if export is None:
                export_w = 0.0
                note = "grid meter stale: no surplus assumed"
            else:
                export_w = export
                note = f"export {export:.0f} W"
            # the rule's own EVSEs draw part of what would otherwise be exported
            avail_w = export_w + sum(e.power_w for e in ms if e.charging)
            if not any(e.charging for e in ms):
                avail_w -= rule.start_threshold_w
            avail_a = max(avail_w, 0.0) / voltage
            wanting = [e for e in ms if e.wants]
            if rule.top_up_to_min:
                avail_a = max(avail_a, sum(e.min_a * (1 if e.switching or e.phases == 1 else 3) for e in wanting))
            protected = sum(e.min_a * e.phases for e in wanting if e.protected)
            avail_a = max(avail_a, protected)
            out.info[label] = f"{note}, budget {avail_a * voltage:.0f} W"
            if ms:
                out.groups.append(RuleGroupSpec(rule.id, [e.index for e in ms], avail_a,
                                                f"solar surplus {avail_a * voltage:.0f} W ({note})"))
    return out
