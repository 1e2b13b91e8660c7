"""Charging profiles from the backend, evaluated into one per-EVSE limit for the load controller.

The backend's SetChargingProfile is never passed to a wallbox: the load controller stays in
charge of every current. The gateway keeps the profiles (1.6 and 2.0.1 shapes), evaluates them
as OCPP does (per purpose the highest stack level that is valid now wins; TxProfile overrides
TxDefaultProfile; ChargePointMaxProfile caps both) and publishes the result as ``evse/<id>/limit``
with ``valid_until`` at the next point where the result can change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from ocpp_gateway.rpc import RpcError, parse_datetime

MAX_VALIDITY = timedelta(hours=24)
MAX_PROFILE_A = 1000.0  # what evse/<id>/limit carries at most (chargegate.payloads.Amps, PositiveWatts)
MAX_PROFILE_W = 10_000_000.0


@dataclass
class Period:
    start_s: int
    limit: float
    phases: int | None


@dataclass
class Profile:
    id: int
    stack: int
    purpose: str  # ChargePointMaxProfile / ChargingStationMaxProfile, TxDefaultProfile, TxProfile
    kind: str  # Absolute, Recurring, Relative
    unit: str  # A or W
    periods: list[Period]
    received: datetime
    recurrency: str | None = None
    valid_from: datetime | None = None
    valid_to: datetime | None = None
    start_schedule: datetime | None = None
    duration_s: int | None = None
    transaction_id: str | None = None

    @classmethod
    def parse(cls, d: dict[str, Any], version: str, now: datetime | None = None) -> Profile:
        now = now or datetime.now(UTC)
        try:
            sched = d["chargingSchedule"]
            if isinstance(sched, list):  # 2.0.1: a list of schedules, the first one is used
                sched = sched[0]
            purpose = d["chargingProfilePurpose"]
            if purpose == "ChargingStationMaxProfile":
                purpose = "ChargePointMaxProfile"
            periods = sorted((Period(int(x["startPeriod"]), float(x["limit"]), x.get("numberPhases"))
                              for x in sched["chargingSchedulePeriod"]), key=lambda q: q.start_s)
            tx = d.get("transactionId")
            return cls(
                id=int(d.get("chargingProfileId", d.get("id", 0))), stack=int(d["stackLevel"]), purpose=purpose,
                kind=d["chargingProfileKind"], unit=sched["chargingRateUnit"], periods=periods, received=now,
                recurrency=d.get("recurrencyKind"),
                valid_from=_dt(d.get("validFrom")), valid_to=_dt(d.get("validTo")),
                start_schedule=_dt(sched.get("startSchedule")),
                duration_s=int(sched["duration"]) if sched.get("duration") is not None else None,
                transaction_id=str(tx) if tx is not None else None)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise RpcError("PropertyConstraintViolation" if not isinstance(e, KeyError) else
                           ("OccurenceConstraintViolation" if version == "1.6" else "OccurrenceConstraintViolation"),
                           f"charging profile: {e}") from None

    def refusal(self) -> str | None:
        """Why a schema-valid profile cannot be followed (None: it can): a negative limit asks for discharging,
        which a charging limit cannot express; a limit that is no finite number means nothing."""
        for q in self.periods:
            if not math.isfinite(q.limit):
                return f"the period starting at {q.start_s} s has no finite limit ({q.limit!r})"
            if q.limit < 0:
                return (f"the period starting at {q.start_s} s has a negative limit ({q.limit:g} {self.unit}): "
                        "discharging is not supported")
        return None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "stack": self.stack, "purpose": self.purpose, "kind": self.kind, "unit": self.unit,
                "periods": [[q.start_s, q.limit, q.phases] for q in self.periods],
                "received": self.received.isoformat(), "recurrency": self.recurrency,
                "valid_from": _iso(self.valid_from), "valid_to": _iso(self.valid_to),
                "start_schedule": _iso(self.start_schedule), "duration_s": self.duration_s,
                "transaction_id": self.transaction_id}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Profile:
        return cls(id=d["id"], stack=d["stack"], purpose=d["purpose"], kind=d["kind"], unit=d["unit"],
                   periods=[Period(a, b, c) for a, b, c in d["periods"]],
                   received=datetime.fromisoformat(d["received"]), recurrency=d.get("recurrency"),
                   valid_from=_fromiso(d.get("valid_from")), valid_to=_fromiso(d.get("valid_to")),
                   start_schedule=_fromiso(d.get("start_schedule")), duration_s=d.get("duration_s"),
                   transaction_id=d.get("transaction_id"))

    def evaluate(self, now: datetime, tx_started: datetime | None = None) -> tuple[Period | None, datetime]:
        """The period in force at ``now`` and the time of the next possible change."""
        far = now + MAX_VALIDITY
        if self.valid_from is not None and now < self.valid_from:
            return None, self.valid_from
        if self.valid_to is not None and now >= self.valid_to:
            return None, far
        start = self.start_schedule or self.received
        if self.kind == "Relative":
            start = tx_started or self.received
        elif self.kind == "Recurring" and self.recurrency in ("Daily", "Weekly"):
            step = timedelta(days=1 if self.recurrency == "Daily" else 7)
            if now >= start:
                start = start + step * ((now - start) // step)
        elapsed = (now - start).total_seconds()
        if elapsed < 0:
            return None, start
        if self.duration_s is not None and elapsed >= self.duration_s:
            nxt = far
            if self.kind == "Recurring" and self.recurrency in ("Daily", "Weekly"):
                nxt = start + timedelta(days=1 if self.recurrency == "Daily" else 7)
            return None, min(nxt, far)
        current = None
        nxt = far
        for q in self.periods:
            if q.start_s <= elapsed:
                current = q
            else:
                nxt = start + timedelta(seconds=q.start_s)
                break
        if self.duration_s is not None:
            nxt = min(nxt, start + timedelta(seconds=self.duration_s))
        if self.valid_to is not None:
            nxt = min(nxt, self.valid_to)
        if self.kind == "Recurring" and current is None:
            nxt = min(nxt, start + timedelta(days=1 if self.recurrency == "Daily" else 7))
        return current, nxt


@dataclass
class Limit:
    current_a: float | None
    power_w: float | None
    phases: int | None
    valid_until: datetime
    ids: list[int]


def effective(profiles: list[Profile], now: datetime, tx_started: datetime | None = None) -> Limit | None:
    """The limit the profiles impose at ``now`` (None: no limit) and until when it holds."""
    next_change = now + MAX_VALIDITY
    by_purpose: dict[str, tuple[Profile, Period]] = {}
    for prof in sorted(profiles, key=lambda x: -x.stack):
        period, nxt = prof.evaluate(now, tx_started)
        next_change = min(next_change, nxt)
        if period is None:
            continue
        have = by_purpose.get(prof.purpose)
        if have is None or (have[0].stack == prof.stack and have[0].unit == prof.unit and period.limit < have[1].limit):
            by_purpose[prof.purpose] = (prof, period)  # same stack level twice: the lower limit is the safe one
    chosen = []
    if "TxProfile" in by_purpose:
        chosen.append(by_purpose["TxProfile"])
    elif "TxDefaultProfile" in by_purpose:
        chosen.append(by_purpose["TxDefaultProfile"])
    if "ChargePointMaxProfile" in by_purpose:
        chosen.append(by_purpose["ChargePointMaxProfile"])
    if not chosen:
        return None
    amps = [per.limit for prof, per in chosen if prof.unit == "A"]
    watts = [per.limit for prof, per in chosen if prof.unit == "W"]
    phases = [per.phases for _, per in chosen if per.phases]
    return Limit(current_a=min(amps) if amps else None, power_w=min(watts) if watts else None,
                 phases=min(phases) if phases else None, valid_until=next_change, ids=[p.id for p, _ in chosen])


def _dt(v: Any) -> datetime | None:
    if v is None:
        return None
    if not isinstance(v, str):
        raise ValueError(f"{v!r} is not a date-time")
    return parse_datetime(v)


def _iso(v: datetime | None) -> str | None:
    return v.isoformat() if v is not None else None


def _fromiso(v: str | None) -> datetime | None:
    return datetime.fromisoformat(v) if v else None
