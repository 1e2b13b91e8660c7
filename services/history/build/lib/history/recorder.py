"""The recorder: bus payloads in, rows of the record out (``chargegate.record`` holds the schema).

Every handler takes the payload and ``now`` and writes inside one open transaction; :meth:`Recorder.flush`
commits it. The service commits at once after what must never be lost (a session started or stopped,
a control action, a mode) and at least every ``FLUSH_S`` otherwise: a ``kill -9`` then loses at most
that much progress of an open session, which the retained EVSE status brings back at the restart
(energy comes from the register at the start and the latest one).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog

from chargegate import payloads as p
from chargegate import record as rec
from chargegate.config import Config
from history import logic

log = structlog.get_logger("history")


@dataclass
class OpenSession:
    id: int
    evse_id: str
    session_id: str
    ids: list[str]
    id_tag: str | None
    started: datetime
    energy_start_wh: float | None
    register_wh: float | None
    energy_wh: float
    energy_base_wh: float
    bus_wh: float
    peak_w: float | None
    phases: int
    last_seen: datetime
    tariff_seq: int = 0
    tariff_key: tuple[str | None, str] | None = None
    signed_seen: set[str] = field(default_factory=set)
    signed_seq: int = 0
    published_at: datetime | None = None


@dataclass
class OpenControl:
    id: int
    key: tuple[object, ...]
    valid_until: datetime | None
    raised: bool | None = None
    effective_w: float | None = None


@dataclass
class Minute:
    start: datetime
    nodes: dict[str, logic.Mean] = field(default_factory=dict)
    evses: dict[str, logic.Mean] = field(default_factory=dict)


def signed_values_of(st: p.EvseStatus) -> list[tuple[str | None, str | None, str]]:
    """Signed meter data on a status, as (context, format, data) - exactly as the wallbox sent it.

    The ocpp-gateway puts it on the session (``session.signed_meter_values``: a list of strings or of
    objects with ``data``/``signed_meter_data``, ``format``/``encoding``, ``context``)."""
    out: list[tuple[str | None, str | None, str]] = []
    for holder in (st.session, st):
        if holder is None:
            continue
        extra = getattr(holder, "model_extra", None) or {}
        for name in ("signed_meter_values", "signed_values", "signed"):
            vals = getattr(holder, name, None)
            if vals is None:
                vals = extra.get(name)
            if not vals:
                continue
            for v in vals if isinstance(vals, list) else [vals]:
                if isinstance(v, str):
                    out.append((None, None, v))
                elif isinstance(v, dict | p.BaseModel):
                    d = v if isinstance(v, dict) else v.model_dump()
                    data = d.get("data") or d.get("signed_meter_data") or d.get("signedMeterData") or d.get("value")
                    if isinstance(data, str) and data:
                        fmt = d.get("format") or d.get("encoding") or d.get("encodingMethod")
                        ctx = d.get("context")
                        out.append((str(ctx) if ctx else None, str(fmt) if fmt else None, data))
    return out


class Recorder:
    def __init__(self, db: sqlite3.Connection, config: Config) -> None:
        self.db = db
        self.sessions: dict[str, OpenSession] = {}
        self.ended_seen: set[str] = set()  # EVSEs whose last status said: no session
        self.limits: dict[str, OpenControl] = {}  # by grid limit source
        self.evse_limits: dict[str, OpenControl] = {}
        self.failsafe: OpenControl | None = None  # the load controller's own failsafe
        self.outage: OpenControl | None = None
        self.link_state: p.LinkState | None = None
        self.tariff_current: p.TariffCurrent | None = None
        self.tariff_schedule: p.TariffSchedule | None = None
        self.statuses: dict[str, p.EvseStatus] = {}
        self.readings: dict[str, p.MeterReading] = {}
        self.allocation: p.Allocation | None = None
        self.minute: Minute | None = None
        self.in_tx = False
        self.important = False  # something that must be committed at once was written
        self.changed_sessions: set[str] = set()
        self.changed_controls: set[int] = set()
        self.closed_sessions: list[str] = []  # EVSEs whose session ended (their session target ends too)
        self.counters: dict[str, int] = {}
        self.configure(config)
        self._load()

    def configure(self, config: Config) -> None:
        self.config = config
        self.prices = config.history.prices
        self.nodes = logic.node_views(config)
        self.series_s = config.history.series_interval_s
        self.meter_timeout = timedelta(seconds=config.controller.meter_timeout_s)

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    # -- transactions ----------------------------------------------------------------------------------
    def _w(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> sqlite3.Cursor:
        if not self.in_tx:
            self.db.execute("BEGIN IMMEDIATE")
            self.in_tx = True
        return self.db.execute(sql, args)

    def flush(self) -> bool:
        """Commit what was written; True when there was something."""
        if not self.in_tx:
            return False
        self.db.execute("COMMIT")
        self.in_tx = False
        self.important = False
        return True

    # -- start-up ------------------------------------------------------------------------------------
    def _load(self) -> None:
        for r in self.db.execute("SELECT * FROM sessions WHERE stopped IS NULL ORDER BY id"):
            last = self.db.execute("SELECT seq, period_id, level FROM session_tariffs WHERE session = ? "
                                   "ORDER BY seq DESC LIMIT 1", (r["id"],)).fetchone()
            signed = [s["data"] for s in self.db.execute("SELECT data FROM signed_values WHERE session = ?",
                                                         (r["id"],))]
            ids = json.loads(r["session_ids"])
            self.sessions[r["evse_id"]] = OpenSession(
                id=r["id"], evse_id=r["evse_id"], session_id=ids[-1] if ids else r["session_id"], ids=ids,
                id_tag=r["id_tag"], started=rec.parse(r["started"]),  # type: ignore[arg-type]
                energy_start_wh=r["energy_start_wh"], register_wh=r["energy_stop_wh"], energy_wh=r["energy_wh"],
                energy_base_wh=r["energy_base_wh"], bus_wh=max(0.0, r["energy_wh"] - r["energy_base_wh"]),
                peak_w=r["peak_power_w"], phases=r["phases"], last_seen=rec.parse(r["last_seen"]),  # type: ignore[arg-type]
                tariff_seq=last["seq"] if last else 0,
                tariff_key=(last["period_id"], last["level"]) if last else None,
                signed_seen=set(signed), signed_seq=len(signed))
        for r in self.db.execute("SELECT * FROM controls WHERE ended IS NULL ORDER BY id"):
            oc = OpenControl(r["id"], (), rec.parse(r["valid_until"]),
                             None if r["raised_to_floor"] is None else bool(r["raised_to_floor"]), r["effective_w"])
            kind, source = r["kind"], r["source"]
            if kind in ("limit", "failsafe") and source != "load-controller":
                # the key is rebuilt from the row: a heartbeat of the same limit continues it
                oc.key = (kind, r["limit_id"], r["power_w"],
                          tuple(json.loads(r["current_a"])) if r["current_a"] else None, r["scope"])
                self.limits[source] = oc
            elif kind == "failsafe":
                self.failsafe = oc
            elif kind == "evse_limit":
                oc.key = ("evse_limit", r["limit_id"], r["power_w"],
                          tuple(json.loads(r["current_a"])) if r["current_a"] else None, r["scope"])
                self.evse_limits[(r["scope"] or "").removeprefix("evse:")] = oc
            elif kind == "link_outage":
                self.outage = oc

    # -- sessions ------------------------------------------------------------------------------------
    def on_status(self, st: p.EvseStatus, now: datetime) -> None:
        self.statuses[st.evse_id] = st
        op = self.sessions.get(st.evse_id)
        sess = st.session
        if sess is None:
            if logic.session_ended(st):
                self.ended_seen.add(st.evse_id)
                if op is not None:
                    self._close(op, st.ts, st.energy_wh, "ended" if st.state is p.EvseState.AVAILABLE
                                else f"no session ({st.state.value})")
            return
        if op is not None and sess.id != op.session_id and sess.id not in op.ids:
            if logic.same_session(op.id_tag, sess.id_tag, st.evse_id in self.ended_seen):
                op.ids.append(sess.id)
                op.session_id = sess.id
                op.energy_base_wh = op.energy_wh
                op.bus_wh = 0.0
                self._count("sessions_continued")
                log.info("session continues under a new id (a service restarted)", evse_id=st.evse_id,
                         record_id=op.id, session_id=sess.id)
            else:
                self._close(op, st.ts, None, "another session started")
                op = None
        elif op is not None and sess.id != op.session_id:
            op.session_id = sess.id  # an id merged before
        self.ended_seen.discard(st.evse_id)
        if op is None:
            op = self._open(st, sess)
        if not st.online:
            return
        changed = False
        if sess.id_tag and op.id_tag != sess.id_tag and op.id_tag is None:
            op.id_tag = sess.id_tag
            changed = True
        if op.energy_start_wh is None and sess.energy_start_wh is not None:
            op.energy_start_wh = sess.energy_start_wh
            changed = True
        if st.energy_wh is not None and (op.register_wh is None or st.energy_wh >= op.register_wh):
            changed = changed or op.register_wh != st.energy_wh
            op.register_wh = st.energy_wh
        op.bus_wh = max(op.bus_wh, sess.energy_wh)
        e = logic.energy_charged(op.energy_start_wh, op.register_wh, op.energy_base_wh, op.bus_wh)
        if e > op.energy_wh + 1e-9:
            self._attribute(op, e - op.energy_wh, st.ts)
            op.energy_wh = e
            changed = True
        if st.power_w is not None and st.plausible and (op.peak_w is None or st.power_w > op.peak_w):
            op.peak_w = st.power_w
            changed = True
        if st.phases_in_use > op.phases:
            op.phases = st.phases_in_use
            changed = True
        for ctx, fmt, data in signed_values_of(st):
            if data in op.signed_seen:
                continue
            op.signed_seen.add(data)
            op.signed_seq += 1
            self._w("INSERT INTO signed_values (session, seq, ts, context, format, data) VALUES (?,?,?,?,?,?)",
                    (op.id, op.signed_seq, rec.iso(st.ts), ctx, fmt, data))
            self.important = True
            self._count("signed_values")
        op.last_seen = st.ts
        if changed:
            self._w("UPDATE sessions SET session_ids=?, id_tag=?, energy_start_wh=?, energy_stop_wh=?, energy_wh=?, "
                    "energy_base_wh=?, peak_power_w=?, phases=?, last_seen=? WHERE id=?",
                    (json.dumps(op.ids), op.id_tag, op.energy_start_wh, op.register_wh, op.energy_wh,
                     op.energy_base_wh, op.peak_w, op.phases, rec.iso(op.last_seen), op.id))
            self.changed_sessions.add(op.evse_id)

    def _open(self, st: p.EvseStatus, sess: p.Session) -> OpenSession:
        start_wh = sess.energy_start_wh if sess.energy_start_wh is not None else (
            st.energy_wh - sess.energy_wh if st.energy_wh is not None else None)
        cur = self._w("INSERT INTO sessions (evse_id, session_id, session_ids, source, id_tag, started, "
                      "energy_start_wh, energy_stop_wh, energy_wh, last_seen) VALUES (?,?,?,?,?,?,?,?,0,?)",
                      (st.evse_id, sess.id, json.dumps([sess.id]), st.source, sess.id_tag, rec.iso(sess.started),
                       start_wh, start_wh, rec.iso(st.ts)))
        op = OpenSession(id=int(cur.lastrowid or 0), evse_id=st.evse_id, session_id=sess.id, ids=[sess.id],
                         id_tag=sess.id_tag, started=sess.started, energy_start_wh=start_wh, register_wh=start_wh,
                         energy_wh=0.0, energy_base_wh=0.0, bus_wh=0.0, peak_w=None, phases=0, last_seen=st.ts)
        self.sessions[st.evse_id] = op
        self.important = True
        self.changed_sessions.add(st.evse_id)
        self._count("sessions_started")
        log.info("session started", evse_id=st.evse_id, record_id=op.id, session_id=sess.id)
        return op

    def _attribute(self, op: OpenSession, wh: float, ts: datetime) -> None:
        t = logic.tariff_at(self.tariff_current, self.tariff_schedule, ts)
        key = (t.period_id, t.level)
        if op.tariff_key == key:
            self._w("UPDATE session_tariffs SET energy_wh = energy_wh + ?, end = ? WHERE session = ? AND seq = ?",
                    (wh, rec.iso(ts), op.id, op.tariff_seq))
            return
        if op.tariff_key is not None:
            self._w("UPDATE session_tariffs SET end = ? WHERE session = ? AND seq = ?",
                    (rec.iso(ts), op.id, op.tariff_seq))
        op.tariff_seq += 1
        op.tariff_key = key
        self._w("INSERT INTO session_tariffs (session, seq, period_id, level, start, end, energy_wh, "
                "price_ct_per_kwh) VALUES (?,?,?,?,?,?,?,?)",
                (op.id, op.tariff_seq, t.period_id, t.level, rec.iso(ts), rec.iso(ts), wh,
                 logic.price_for(t, self.prices)))

    def _close(self, op: OpenSession, ts: datetime, register_wh: float | None, reason: str) -> None:
        if register_wh is not None and op.register_wh is not None and register_wh > op.register_wh \
                and op.energy_start_wh is not None:
            e = register_wh - op.energy_start_wh
            if e > op.energy_wh:
                self._attribute(op, e - op.energy_wh, ts)
                op.energy_wh = e
            op.register_wh = register_wh
        stopped = max(ts, op.started)
        self._w("UPDATE sessions SET stopped=?, stop_reason=?, energy_stop_wh=?, energy_wh=?, last_seen=? WHERE id=?",
                (rec.iso(stopped), reason, op.register_wh, op.energy_wh, rec.iso(max(op.last_seen, stopped)), op.id))
        if op.tariff_key is not None:
            self._w("UPDATE session_tariffs SET end = ? WHERE session = ? AND seq = ?",
                    (rec.iso(stopped), op.id, op.tariff_seq))
        del self.sessions[op.evse_id]
        self.important = True
        self.changed_sessions.add(op.evse_id)
        self.closed_sessions.append(op.evse_id)
        self._count("sessions_stopped")
        log.info("session stopped", evse_id=op.evse_id, record_id=op.id, energy_wh=round(op.energy_wh, 1),
                 reason=reason)

    # -- control actions -----------------------------------------------------------------------------
    def on_grid_limit(self, lim: p.GridLimit, now: datetime) -> None:
        src = lim.source.value
        oc = self.limits.get(src)
        key = logic.limit_key(lim)
        binding = lim.binding(now)
        if oc is not None and (not binding or oc.key != key):
            end = lim.valid_until if (binding is False and lim.active and now >= lim.valid_until) else lim.ts
            self._end_control(oc, min(end, now) if end else now)
            del self.limits[src]
            oc = None
        if not binding:
            return
        if oc is None:
            kind = logic.control_kind(lim)
            cur = self._w(
                "INSERT INTO controls (kind, source, scope, started, valid_until, power_w, current_a, limit_id, "
                "answer, detail, last_seen) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (kind.value, src, lim.scope.value if lim.scope else None, rec.iso(min(lim.ts, now)),
                 rec.iso(lim.valid_until), lim.power_w, json.dumps(lim.current_a) if lim.current_a else None,
                 lim.id, getattr(lim, "answer", None), lim.reason, rec.iso(now)))
            oc = self.limits[src] = OpenControl(int(cur.lastrowid or 0), key, lim.valid_until)
            self.important = True
            self.changed_controls.add(oc.id)
            self._count("controls_recorded")
            log.info("control action recorded", kind=kind.value, source=src, power_w=lim.power_w,
                     record_id=oc.id)
        elif oc.valid_until != lim.valid_until:
            oc.valid_until = lim.valid_until
            self._w("UPDATE controls SET valid_until = ?, last_seen = ? WHERE id = ?",
                    (rec.iso(lim.valid_until), rec.iso(now), oc.id))

    def on_evse_limit(self, lim: p.EvseLimit, now: datetime) -> None:
        oc = self.evse_limits.get(lim.evse_id)
        binding = lim.active and now < lim.valid_until
        scope = f"evse:{lim.evse_id}"
        key = ("evse_limit", lim.id, lim.power_w, (lim.current_a,) if lim.current_a is not None else None, scope)
        if oc is not None and (not binding or oc.key != key):
            self._end_control(oc, min(lim.valid_until, now) if lim.active else min(lim.ts, now))
            del self.evse_limits[lim.evse_id]
            oc = None
        if not binding:
            return
        if oc is None:
            cur = self._w(
                "INSERT INTO controls (kind, source, scope, started, valid_until, power_w, current_a, limit_id, "
                "detail, last_seen) VALUES ('evse_limit',?,?,?,?,?,?,?,?,?)",
                (lim.source.value, scope, rec.iso(min(lim.ts, now)), rec.iso(lim.valid_until), lim.power_w,
                 json.dumps([lim.current_a]) if lim.current_a is not None else None, lim.id,
                 f"phases {lim.phases}" if lim.phases else None, rec.iso(now)))
            self.evse_limits[lim.evse_id] = OpenControl(int(cur.lastrowid or 0), key, lim.valid_until)
            self.important = True
            self._count("controls_recorded")
        elif oc.valid_until != lim.valid_until:
            oc.valid_until = lim.valid_until
            self._w("UPDATE controls SET valid_until = ?, last_seen = ? WHERE id = ?",
                    (rec.iso(lim.valid_until), rec.iso(now), oc.id))

    def on_link(self, link: p.SmgwLinkStatus, now: datetime) -> None:
        prev, self.link_state = self.link_state, link.state
        lost = link.state is p.LinkState.DOWN or (link.state is p.LinkState.CONNECTING and prev is p.LinkState.UP)
        if lost and self.outage is None:
            since = link.since if link.since is not None and link.since <= now else now
            cur = self._w("INSERT INTO controls (kind, source, started, detail, last_seen) "
                          "VALUES ('link_outage', 'smgw-link', ?, ?, ?)",
                          (rec.iso(since), (link.error or link.state.value)[:500], rec.iso(now)))
            self.outage = OpenControl(int(cur.lastrowid or 0), (), None)
            self.important = True
            self._count("controls_recorded")
            log.info("SMGW link outage recorded", since=since.isoformat(), error=link.error)
        elif link.state in (p.LinkState.UP, p.LinkState.DISABLED) and self.outage is not None:
            end = link.since if link.since is not None and link.since <= now else now
            self._end_control(self.outage, end)
            self.outage = None

    def on_allocation(self, a: p.Allocation, now: datetime) -> None:
        self.allocation = a
        for info in a.limits.get("grid_limits") or []:
            if not isinstance(info, dict):
                continue
            oc = self.limits.get(str(info.get("source")))
            if oc is None or "raised_to_floor" not in info:
                continue
            raised = bool(info.get("raised_to_floor"))
            eff = info.get("effective_w")
            eff = float(eff) if isinstance(eff, int | float) else None
            if raised != oc.raised or eff != oc.effective_w:
                oc.raised, oc.effective_w = raised, eff
                self._w("UPDATE controls SET raised_to_floor = ?, effective_w = ? WHERE id = ?",
                        (int(raised), eff, oc.id))
                self.changed_controls.add(oc.id)
        fs = a.limits.get("failsafe")
        if isinstance(fs, dict) and self.failsafe is None:
            since = _dt(fs.get("since")) or a.ts
            cur = self._w(
                "INSERT INTO controls (kind, source, scope, started, valid_until, power_w, raised_to_floor, "
                "effective_w, detail, last_seen) VALUES ('failsafe','load-controller',?,?,?,?,?,?,?,?)",
                (fs.get("scope"), rec.iso(min(since, now)), _iso(_dt(fs.get("until"))), _num(fs.get("power_w")),
                 None if fs.get("raised_to_floor") is None else int(bool(fs.get("raised_to_floor"))),
                 _num(fs.get("effective_w")), str(fs.get("cause") or "")[:500], rec.iso(now)))
            self.failsafe = OpenControl(int(cur.lastrowid or 0), (), _dt(fs.get("until")))
            self.important = True
            self._count("controls_recorded")
            log.info("failsafe period recorded", cause=fs.get("cause"))
        elif not isinstance(fs, dict) and self.failsafe is not None:
            self._end_control(self.failsafe, min(a.ts, now))
            self.failsafe = None

    def _end_control(self, oc: OpenControl, ts: datetime) -> None:
        self._w("UPDATE controls SET ended = ?, last_seen = ? WHERE id = ?", (rec.iso(ts), rec.iso(ts), oc.id))
        self.important = True
        self.changed_controls.add(oc.id)

    def expire(self, now: datetime) -> None:
        """Close limits whose validity ran out without a message saying so (their publisher is gone)."""
        for table in (self.limits, self.evse_limits):
            for k, oc in list(table.items()):
                if oc.valid_until is not None and now >= oc.valid_until:
                    self._end_control(oc, oc.valid_until)
                    del table[k]

    # -- time series ---------------------------------------------------------------------------------
    def on_reading(self, r: p.MeterReading) -> None:
        self.readings[r.meter_id] = r

    def sample(self, now: datetime) -> None:
        """One sample-and-hold sample of every node's current and every EVSE's draw (the service calls it
        every second); a minute's samples are written when the minute is over."""
        start = _floor(now, self.series_s)
        if self.minute is not None and self.minute.start != start:
            self._write_minute(self.minute)
            self.minute = None
        if self.minute is None:
            self.minute = Minute(start)
        m = self.minute
        v = self.config.controller.voltage_v
        for node in self.nodes:
            if node.meter is None:
                continue
            r = self.readings.get(node.meter)
            if r is None or not r.online or now - r.ts > self.meter_timeout:
                continue
            cur = _currents(r, v)
            if cur is not None:
                m.nodes.setdefault(node.id, logic.Mean()).add(cur)
        for evse_id, st in self.statuses.items():
            drawn = list(st.current_a) if st.online else [0.0, 0.0, 0.0]
            m.evses.setdefault(evse_id, logic.Mean()).add(drawn)

    def _write_minute(self, m: Minute) -> None:
        ts = rec.iso(m.start)
        draws = {e: mean.value() or [0.0, 0.0, 0.0] for e, mean in m.evses.items()}
        root_cap = self._root_grid_cap()
        for i, node in enumerate(self.nodes):
            measured = m.nodes[node.id].value() if node.id in m.nodes else None
            lim = list(node.limits)
            if i == 0 and root_cap is not None:
                lim = [c if (x is None or c < x) else x for x, c in zip(lim, root_cap, strict=True)]
            house = logic.house_load(measured, draws, node) if measured is not None else [None, None, None]
            meas = measured or [None, None, None]
            if measured is None and all(x is None for x in lim):
                continue
            self._w("INSERT OR REPLACE INTO series_node VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (ts, node.id, *_r(meas), *_r(lim), *_r(house)))
        alloc = {e.evse_id: e for e in self.allocation.evses} if self.allocation else {}
        for evse_id, drawn in draws.items():
            a = alloc.get(evse_id)
            self._w("INSERT OR REPLACE INTO series_evse (ts, evse_id, drawn_l1, drawn_l2, drawn_l3, granted_a, phases, "
                    "bound_by, detail, mode) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (ts, evse_id, *_r(drawn), a.current_a if a else None, a.phases if a else None,
                     a.bound_by if a else None, (a.detail or "")[:300] if a else None, a.mode if a else None))
        self._count("series_minutes")

    def _root_grid_cap(self) -> list[float] | None:
        if self.allocation is None:
            return None
        caps: list[float] | None = None
        for info in self.allocation.limits.get("grid_limits") or []:
            if isinstance(info, dict) and info.get("scope") == "grid" and info.get("effective_current_a"):
                c = [float(x) for x in info["effective_current_a"]]
                caps = c if caps is None else [min(a, b) for a, b in zip(caps, c, strict=True)]
        return caps

    # -- tariffs -------------------------------------------------------------------------------------
    def on_tariff_current(self, t: p.TariffCurrent) -> None:
        self.tariff_current = t

    def on_tariff_schedule(self, t: p.TariffSchedule) -> None:
        self.tariff_schedule = t

    # -- what the bus shows ----------------------------------------------------------------------------
    def session_record(self, evse_id: str) -> p.SessionRecord | None:
        row = self.db.execute("SELECT id FROM sessions WHERE evse_id = ? ORDER BY id DESC LIMIT 1",
                              (evse_id,)).fetchone()
        s = rec.session(self.db, row["id"]) if row else None
        if s is None:
            return None
        return p.SessionRecord(
            evse_id=s.evse_id, record_id=s.id, session_id=s.session_id[:64], started=s.started, stopped=s.stopped,
            id_tag=s.id_tag, energy_start_wh=s.energy_start_wh, energy_stop_wh=s.energy_stop_wh,
            energy_wh=round(s.energy_wh, 3), peak_power_w=s.peak_power_w, phases=s.phases,
            cost=round(s.cost, 4) if s.cost is not None else None, currency=self.prices.currency,
            tariffs=[p.TariffShare(period_id=t.period_id, level=t.level, start=t.start, end=t.end,
                                   energy_wh=round(t.energy_wh, 3), price_ct_per_kwh=t.price_ct_per_kwh,
                                   cost=round(t.cost, 4) if t.cost is not None else None) for t in s.tariffs[-500:]],
            signed_values=len(s.signed))

    def control_record(self, record_id: int) -> p.ControlRecord | None:
        r = self.db.execute("SELECT started FROM controls WHERE id = ?", (record_id,)).fetchone()
        if r is None:
            return None
        rows = [c for c in rec.controls(self.db, start=None, end=None) if c.id == record_id]
        if not rows:
            return None
        c = rows[0]
        return p.ControlRecord(record_id=c.id, kind=p.ControlKind(c.kind), source=c.source, scope=c.scope,
                               started=c.started, ended=c.ended, valid_until=c.valid_until, power_w=c.power_w,
                               current_a=c.current_a, raised_to_floor=c.raised_to_floor, effective_w=c.effective_w,
                               limit_id=c.limit_id, answer=c.answer, detail=c.detail)


def _floor(now: datetime, step_s: float) -> datetime:
    t = now.timestamp()
    return datetime.fromtimestamp(t - t % step_s, tz=now.tzinfo)


def _currents(r: p.MeterReading, v: float) -> list[float] | None:
    if r.current_a is not None:
        return list(r.current_a)
    if r.power_phase_w is not None:
        return [w / v for w in r.power_phase_w]
    if r.power_w is not None:
        return [r.power_w / v / 3] * 3
    return None


def _r(xs: list[float | None] | tuple[float | None, ...]) -> list[float | None]:
    return [None if x is None else round(x, 3) for x in xs]


def _dt(v: object) -> datetime | None:
    if not isinstance(v, str):
        return None
    try:
        d = datetime.fromisoformat(v)
    except ValueError:
        return None
    return d if d.tzinfo is not None else None


def _iso(d: datetime | None) -> str | None:
    return rec.iso(d) if d is not None else None


def _num(v: object) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None
