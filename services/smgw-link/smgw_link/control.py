"""What the operators want, as state: LPC limit and failsafe, AVAIL, TARIF, tariff schedule.

:class:`OperatorControl` is pure logic (time is passed in), persisted to a JSON file so that a
restart keeps an active limit and the failsafe value. :meth:`OperatorControl.outputs` turns the
state into the bus payloads that smgw-link publishes:

``grid/limit/<limit_source>`` (dso by default) - the CLS.EEDI LPC limit, or the failsafe limit
    while in failsafe, with ``scope`` = ``smgw.limit_scope``. ``failsafe_power_w`` and
    ``failsafe_duration_s`` always carry the failsafe in force (with power reduction on).
``grid/limit/<http_api.inbound_source>`` (supplier) - AVAIL set through the inbound channel.
``grid/limit/local`` - AVAIL set on the local network. AVAIL limits have ``scope`` grid.
``tariff/current``, ``tariff/schedule``.

Every limit payload has ``valid_until`` = min(now + limit_hold_s, end of its duration): it is
republished every ``limit_heartbeat_s``, so a dead smgw-link makes its limits expire.

LPC failsafe (EEBUS LPC semantics; "as configured" by ``smgw.on_link_loss``): with power
reduction on and ``on_link_loss: failsafe``, an operator link that stays down for
``link_loss_grace_s`` puts the installation into the failsafe state: the published limit becomes
the failsafe value. The state ends when a new limit arrives from the operator, or after
``failsafe_duration_s``; after that, without a new limit, no limit applies (LPC "autonomous") until
the next link loss.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import TypeAdapter, ValidationError

from chargegate import payloads as p
from chargegate.config.smgw import Smgw
from chargegate.files import write_private

log = structlog.get_logger("smgw_link.control")

Channel = Literal["inbound", "local"]
_periods = TypeAdapter(list[p.TariffPeriod])


def _dt(v: str | None) -> datetime | None:
    return datetime.fromisoformat(v) if v else None


def _iso(v: datetime | None) -> str | None:
    return v.isoformat() if v else None


@dataclass
class LpcLimit:
    value_w: int
    active: bool
    duration_s: int | None
    received: datetime
    message_id: str | None = None
    expired: bool = False

    @property
    def ends(self) -> datetime | None:
        return self.received + timedelta(seconds=self.duration_s) if self.duration_s is not None else None

    def binding(self, now: datetime) -> bool:
        return self.active and not self.expired and (self.ends is None or now < self.ends)

    def remaining_s(self, now: datetime) -> int | None:
        if self.ends is None:
            return None
        return max(0, int((self.ends - now).total_seconds()))


@dataclass
class Avail:
    percent: float
    set_at: datetime
    until: datetime | None = None

    def binding(self, now: datetime) -> bool:
        return self.percent < 100 and (self.until is None or now < self.until)


@dataclass
class Tarif:
    level: int  # 0 normal, 1 reduced (the reference product's TARIF)
    set_at: datetime
    until: datetime | None = None
    channel: Channel = "local"


@dataclass
class Notify:
    interval_s: int
    end_time: int  # UNIX seconds
    sources: list[str]


@dataclass
class Outputs:
    limits: dict[str, p.GridLimit]
    tariff: p.TariffCurrent
    schedule: p.TariffSchedule
    failsafe: bool


@dataclass
class OperatorControl:
    cfg: Smgw
    path: Path | None = None
    lpc: LpcLimit | None = None
    failsafe_w: int | None = None  # from CLS.EEDI; None = smgw.failsafe_power_w
    notify: Notify | None = None
    avail: dict[str, Avail] = field(default_factory=dict)  # per channel
    tarif: Tarif | None = None
    schedule: list[p.TariffPeriod] = field(default_factory=list)
    failsafe_since: datetime | None = None
    failsafe_ends: datetime | None = None
    link_up: bool = False
    link_down_since: datetime | None = None
    outage_handled: bool = False  # failsafe already entered (and maybe left) in this outage
    events: list[str] = field(default_factory=list)  # human-readable, drained by the service

    # -- persistence ---------------------------------------------------------------------------
    @classmethod
    def load(cls, cfg: Smgw, path: Path | None, now: datetime) -> OperatorControl:
        oc = cls(cfg=cfg, path=path, link_down_since=now)
        if path is None or not path.exists():
            return oc
        try:
            data = json.loads(path.read_text())
            if data.get("lpc"):
                d = data["lpc"]
                oc.lpc = LpcLimit(int(d["value_w"]), bool(d["active"]), d.get("duration_s"),
                                  _dt(d["received"]) or now, d.get("message_id"), bool(d.get("expired")))
            oc.failsafe_w = data.get("failsafe_w")
            for w in (oc.lpc.value_w if oc.lpc else None, oc.failsafe_w):
                if w is not None and not (isinstance(w, int) and 0 <= w <= p.MAX_POWER_W):
                    raise ValueError(f"power {w!r} W outside 0..{p.MAX_POWER_W} W")
            if data.get("notify"):
                n = data["notify"]
                oc.notify = Notify(int(n["interval_s"]), int(n["end_time"]), list(n["sources"]))
            for ch, a in (data.get("avail") or {}).items():
                if ch in ("inbound", "local"):
                    oc.avail[ch] = Avail(float(a["percent"]), _dt(a["set_at"]) or now, _dt(a.get("until")))
            if data.get("tarif"):
                t = data["tarif"]
                oc.tarif = Tarif(int(t["level"]), _dt(t["set_at"]) or now, _dt(t.get("until")),
                                 t.get("channel", "local"))
            oc.schedule = _periods.validate_python(data.get("schedule") or [])
            oc.failsafe_since = _dt(data.get("failsafe_since"))
            oc.failsafe_ends = _dt(data.get("failsafe_ends"))
            oc.outage_handled = oc.failsafe_since is not None
        except (OSError, ValueError, KeyError, TypeError, ValidationError) as e:
            log.error("operator state file unreadable, starting without it", path=str(path), error=str(e))
            return cls(cfg=cfg, path=path, link_down_since=now)
        return oc

    def save(self) -> None:
        if self.path is None:
            return
        data: dict[str, Any] = {
            "lpc": ({**asdict(self.lpc), "received": _iso(self.lpc.received)} if self.lpc else None),
            "failsafe_w": self.failsafe_w,
            "notify": asdict(self.notify) if self.notify else None,
            "avail": {ch: {"percent": a.percent, "set_at": _iso(a.set_at), "until": _iso(a.until)}
                      for ch, a in self.avail.items()},
            "tarif": ({"level": self.tarif.level, "set_at": _iso(self.tarif.set_at),
                       "until": _iso(self.tarif.until), "channel": self.tarif.channel} if self.tarif else None),
            "schedule": [x.model_dump(mode="json") for x in self.schedule],
            "failsafe_since": _iso(self.failsafe_since),
            "failsafe_ends": _iso(self.failsafe_ends),
        }
        write_private(self.path, json.dumps(data, indent=1))  # the operator's limits and schedule: 0600

    # -- inputs ----------------------------------------------------------------------------------
    @property
    def failsafe_power_w(self) -> float:
        return float(self.failsafe_w if self.failsafe_w is not None else self.cfg.failsafe_power_w)

    def set_limit(self, value_w: int, active: bool, duration_s: int | None, now: datetime,
                  message_id: str | None = None) -> None:
        """A CLS.EEDI LPC consumption limit (replaces the previous one entirely)."""
        self.lpc = LpcLimit(value_w, active, duration_s, now, message_id)
        if self.failsafe_since is not None:
            self._leave_failsafe(now, "a new limit arrived")
        self.save()

    def set_failsafe(self, value_w: int) -> None:
        self.failsafe_w = value_w
        self.save()

    def set_notify(self, notify: Notify | None) -> None:
        self.notify = notify
        self.save()

    def set_avail(self, channel: Channel, percent: float, now: datetime, duration_s: float | None = None) -> None:
        if not 0 <= percent <= 100:
            raise ValueError("AVAIL must be within 0..100")
        self.avail[channel] = Avail(percent, now, now + timedelta(seconds=duration_s) if duration_s else None)
        self.save()

    def set_tarif(self, channel: Channel, level: int, now: datetime, duration_s: float | None = None) -> None:
        if level not in (0, 1):
            raise ValueError("TARIF must be 0 (normal) or 1 (reduced)")
        self.tarif = Tarif(level, now, now + timedelta(seconds=duration_s) if duration_s else None, channel)
        self.save()

    def set_schedule(self, periods: list[p.TariffPeriod]) -> None:
        self.schedule = sorted(periods, key=lambda x: x.start)
        self.save()

    def set_link(self, up: bool, now: datetime) -> None:
        if up == self.link_up:
            return
        self.link_up = up
        if up:
            self.link_down_since = None
            self.outage_handled = False
            self.events.append("operator link up")
        else:
            self.link_down_since = now
            self.events.append("operator link down")

    # -- time ------------------------------------------------------------------------------------
    def _failsafe_enabled(self) -> bool:
        return self.cfg.enabled and self.cfg.functions.power_reduction and self.cfg.on_link_loss == "failsafe"

    def _leave_failsafe(self, now: datetime, why: str) -> None:
        self.events.append(f"failsafe left: {why}")
        log.info("failsafe state left", reason=why)
        self.failsafe_since = None
        self.failsafe_ends = None

    def tick(self, now: datetime) -> None:
        """Advance the state machine to ``now`` (expiry, failsafe entry and exit)."""
        changed = False
        if self.lpc is not None and self.lpc.active and not self.lpc.expired and self.lpc.ends is not None \
                and now >= self.lpc.ends:
            self.lpc.expired = True
            self.events.append(f"limit {self.lpc.value_w} W expired after {self.lpc.duration_s} s")
            log.info("operator limit expired", value_w=self.lpc.value_w, duration_s=self.lpc.duration_s)
            changed = True
        if self.failsafe_since is not None and self.failsafe_ends is not None and now >= self.failsafe_ends:
            self._leave_failsafe(now, "failsafe duration over")
            if self.lpc is not None:  # LPC: after the failsafe duration, unlimited ("autonomous")
                self.lpc.active = False
            changed = True
        if (self._failsafe_enabled() and not self.link_up and not self.outage_handled
                and self.failsafe_since is None and self.link_down_since is not None
                and now >= self.link_down_since + timedelta(seconds=self.cfg.link_loss_grace_s)):
            self.failsafe_since = now
            self.failsafe_ends = now + timedelta(seconds=self.cfg.failsafe_duration_s)
            self.outage_handled = True
            self.events.append(f"failsafe entered: operator link lost since {self.link_down_since:%H:%M:%S}")
            log.warning("operator link lost: failsafe limit applies", failsafe_power_w=self.failsafe_power_w,
                        down_since=self.link_down_since.isoformat(), duration_s=self.cfg.failsafe_duration_s)
            changed = True
        for ch, a in list(self.avail.items()):
            if a.until is not None and now >= a.until and a.percent < 100:
                self.avail[ch] = Avail(100, now)
                self.events.append(f"AVAIL ({ch}) back to 100 %")
                changed = True
        if self.tarif is not None and self.tarif.until is not None and now >= self.tarif.until:
            self.tarif = None
            changed = True
        if changed:
            self.save()

    def next_deadline(self, now: datetime) -> datetime | None:
        """The next moment at which :meth:`tick` changes something."""
        cands: list[datetime] = []
        if self.lpc is not None and self.lpc.active and not self.lpc.expired and self.lpc.ends is not None:
            cands.append(self.lpc.ends)
        if self.failsafe_ends is not None:
            cands.append(self.failsafe_ends)
        if (self._failsafe_enabled() and not self.link_up and not self.outage_handled
                and self.failsafe_since is None and self.link_down_since is not None):
            cands.append(self.link_down_since + timedelta(seconds=self.cfg.link_loss_grace_s))
        cands += [a.until for a in self.avail.values() if a.until is not None and a.percent < 100]
        if self.tarif is not None and self.tarif.until is not None:
            cands.append(self.tarif.until)
        for per in self.schedule:
            cands += [t for t in (per.start, per.end) if t is not None and t > now]
        future = [c for c in cands if c > now - timedelta(seconds=1)]
        return min(future) if future else None

    # -- outputs ---------------------------------------------------------------------------------
    @property
    def in_failsafe(self) -> bool:
        return self.failsafe_since is not None

    def lpc_binding(self, now: datetime) -> bool:
        return (self.cfg.functions.power_reduction and self.lpc is not None and self.lpc.binding(now)
                and not self.in_failsafe)

    def outputs(self, now: datetime) -> Outputs:
        cfg = self.cfg
        hold = now + timedelta(seconds=cfg.limit_hold_s)
        scope = p.LimitScope(cfg.limit_scope)
        fs_w = self.failsafe_power_w if cfg.functions.power_reduction else None
        fs_d = cfg.failsafe_duration_s if cfg.functions.power_reduction else None
        src = p.LimitSource(cfg.limit_source)
        limits: dict[str, p.GridLimit] = {}
        if self.in_failsafe:
            ends = self.failsafe_ends or hold
            limits[src.value] = p.GridLimit(
                source=src, active=True, power_w=self.failsafe_power_w, scope=scope, valid_until=min(hold, ends),
                id="failsafe", reason=f"failsafe: operator link lost (until {ends:%Y-%m-%d %H:%M:%S} UTC)",
                failsafe_power_w=fs_w, failsafe_duration_s=fs_d)
        elif self.lpc_binding(now):
            assert self.lpc is not None
            ends = self.lpc.ends
            limits[src.value] = p.GridLimit(
                source=src, active=True, power_w=float(self.lpc.value_w), scope=scope,
                valid_until=min(hold, ends) if ends else hold,
                id=self._lpc_id(), reason=self._lpc_reason() + (f" for {self.lpc.duration_s} s" if ends else ""),
                failsafe_power_w=fs_w, failsafe_duration_s=fs_d)
        else:
            limits[src.value] = p.GridLimit(source=src, active=False, scope=scope, valid_until=hold,
                                            reason="no operator limit", failsafe_power_w=fs_w,
                                            failsafe_duration_s=fs_d)
        house = cfg.http_api.house_power_w
        for ch, source in (("inbound", p.LimitSource(cfg.http_api.inbound_source)), ("local", p.LimitSource.LOCAL)):
            a = self.avail.get(ch)
            if ch == "inbound" and not cfg.functions.power_reduction:
                a = None
            if a is None and ch == "inbound" and not cfg.inbound.enabled:
                continue  # nothing to say on a source nobody can set
            if a is not None and a.binding(now):
                limits[source.value] = p.GridLimit(
                    source=source, active=True, power_w=round(house * a.percent / 100, 1), scope=p.LimitScope.GRID,
                    valid_until=min(hold, a.until) if a.until else hold, id=f"avail:{ch}",
                    reason=f"AVAIL={a.percent:g} % of {house:g} W ({ch})")
            else:
                limits[source.value] = p.GridLimit(source=source, active=False, scope=p.LimitScope.GRID,
                                                   valid_until=hold, id=f"avail:{ch}", reason="AVAIL=100 %")
        return Outputs(limits=limits, tariff=self.tariff_now(now), schedule=p.TariffSchedule(
            periods=list(self.schedule), source=p.LimitSource(cfg.limit_source if cfg.functions.tariffs else "local")),
            failsafe=self.in_failsafe)

    def _lpc_id(self) -> str:
        mid = self.lpc.message_id if self.lpc else None
        if mid and mid.startswith("admin:"):
            return mid[:128]  # set through the admin API: "admin:<who>"
        return f"clseedi:{mid}"[:128] if mid else "clseedi"

    def _lpc_reason(self) -> str:
        mid = self.lpc.message_id if self.lpc else None
        if mid and mid.startswith("admin:"):
            return f"operator limit set through the admin API by {mid[6:]}"[:200]
        return "CLS.EEDI LPC consumption limit"

    def tariff_now(self, now: datetime) -> p.TariffCurrent:
        if self.tarif is not None and (self.tarif.until is None or now < self.tarif.until):
            t = self.tarif
            src = p.LimitSource(self.cfg.http_api.inbound_source) if t.channel == "inbound" else p.LimitSource.LOCAL
            level = p.TariffLevel.LOW if t.level == 1 else p.TariffLevel.NORMAL
            return p.TariffCurrent(period=p.TariffPeriod(id=f"tarif:{t.channel}:{int(t.set_at.timestamp())}",
                                                         level=level, start=t.set_at, end=t.until),
                                   source=src, valid_until=t.until)
        for per in self.schedule:
            if per.start <= now and (per.end is None or now < per.end):
                return p.TariffCurrent(period=per, source=p.LimitSource(self.cfg.limit_source), valid_until=per.end)
        upcoming = [x.start for x in self.schedule if x.start > now]
        start = max([x.end for x in self.schedule if x.end is not None and x.end <= now], default=now)
        return p.TariffCurrent(period=p.TariffPeriod(id="normal", level=p.TariffLevel.NORMAL, start=start,
                                                     end=min(upcoming) if upcoming else None),
                               source=p.LimitSource.LOCAL, valid_until=min(upcoming) if upcoming else None)

    def drain_events(self) -> list[str]:
        ev, self.events = self.events, []
        return ev


def same_limit(a: p.GridLimit | None, b: p.GridLimit) -> bool:
    """Equal apart from ts and a valid_until that is merely refreshed."""
    if a is None:
        return False
    keys = ("source", "active", "power_w", "current_a", "scope", "id", "reason", "failsafe_power_w",
            "failsafe_duration_s")
    return all(getattr(a, k) == getattr(b, k) for k in keys)
