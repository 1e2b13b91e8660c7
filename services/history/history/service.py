"""The history service: records the installation from the bus into ``chargegate.record``'s database and
keeps the charging mode of every EVSE (``evse/<id>/mode``, set over ``evse/<id>/mode/set``)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from datetime import datetime, timedelta
from typing import Any

from chargegate import payloads as p
from chargegate import record as rec
from chargegate.bus import Message
from chargegate.config import Config
from chargegate.ratelog import LogLimiter
from chargegate.runtime import ServiceContext, run_service
from history.recorder import Recorder

SERVICE = "history"
FLUSH_S = 1.0  # the most progress of an open session a kill -9 can lose (the retained status restores it)
SESSION_PUBLISH_S = 10.0
MAINTENANCE_S = 3600.0


def retention(db: sqlite3.Connection, config: Config, now: datetime) -> dict[str, int]:
    """Delete what is older than its kind's retention; returns rows deleted per kind."""
    r = config.history.retention
    out = {"sessions": 0, "controls": 0, "series": 0}
    db.execute("BEGIN IMMEDIATE")
    try:
        if r.sessions_days is not None:
            cut = rec.iso(now - timedelta(days=r.sessions_days))
            out["sessions"] = db.execute("DELETE FROM sessions WHERE stopped IS NOT NULL AND stopped < ?",
                                         (cut,)).rowcount
        if r.controls_days is not None:
            cut = rec.iso(now - timedelta(days=r.controls_days))
            out["controls"] = db.execute("DELETE FROM controls WHERE ended IS NOT NULL AND ended < ?",
                                         (cut,)).rowcount
        if r.series_days is not None:
            cut = rec.iso(now - timedelta(days=r.series_days))
            out["series"] = (db.execute("DELETE FROM series_node WHERE ts < ?", (cut,)).rowcount
                             + db.execute("DELETE FROM series_evse WHERE ts < ?", (cut,)).rowcount)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return out


def used_bytes(db: sqlite3.Connection) -> int:
    page = db.execute("PRAGMA page_size").fetchone()[0]
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    free = db.execute("PRAGMA freelist_count").fetchone()[0]
    return int((pages - free) * page)


def bound(db: sqlite3.Connection, max_bytes: int) -> int:
    """Keep the database under ``max_bytes``: delete the oldest time-series minutes (a tenth of them at a
    time) while it is above; sessions and control actions are never deleted for space. Returns the
    minutes deleted."""
    deleted = 0
    while used_bytes(db) > max_bytes:
        n = db.execute("SELECT count(DISTINCT ts) FROM series_evse").fetchone()[0]
        m = db.execute("SELECT count(DISTINCT ts) FROM series_node").fetchone()[0]
        total = max(n, m)
        if total == 0:
            break
        step = max(1, total // 10)
        cut = db.execute("SELECT ts FROM (SELECT DISTINCT ts FROM series_evse UNION SELECT DISTINCT ts FROM "
                         "series_node) ORDER BY ts LIMIT 1 OFFSET ?", (min(step, total - 1),)).fetchone()
        cut_ts = cut[0] if cut else "9999"
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM series_evse WHERE ts < ?", (cut_ts,))
        db.execute("DELETE FROM series_node WHERE ts < ?", (cut_ts,))
        if step >= total - 1:
            db.execute("DELETE FROM series_evse")
            db.execute("DELETE FROM series_node")
        db.execute("COMMIT")
        db.executescript("PRAGMA incremental_vacuum;")  # run to completion (execute() steps once)
        deleted += step
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return deleted


class History:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.bus = ctx.bus
        self.config = ctx.config
        self.path = self.config.history.db_path(ctx.state_dir)
        self.db = rec.open_db(self.path)
        self.rec = Recorder(self.db, self.config)
        self.modes = rec.modes(self.db)
        self.published_at: dict[str, float] = {}
        self.log = ctx.log
        self.degraded: str | None = None
        # what the bus says about EVSEs and meters that are not configured is not recorded (it would open
        # sessions and keep state per id for ever): counted, logged once per id and minute, a few a minute
        self.unknown_log = LogLimiter(self.log)

    # -- writing safely ------------------------------------------------------------------------------
    def guarded(self, what: str, fn: Any, *args: Any) -> None:
        """Run a recorder handler; a database error rolls the open transaction back, rebuilds the recorder
        from what is committed and replays the latest statuses (memory never runs ahead of the record)."""
        try:
            fn(*args)
            if self.rec.important:
                self.commit()
        except sqlite3.Error as e:
            self.ctx.counters["db_errors"] += 1
            self.log.error("writing the record failed; rolled back", step=what, error=str(e))
            self._recover(str(e))

    def _recover(self, error: str) -> None:
        try:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        old = self.rec
        self.rec = Recorder(self.db, self.config)
        self.rec.tariff_current, self.rec.tariff_schedule = old.tariff_current, old.tariff_schedule
        self.rec.readings, self.rec.allocation = old.readings, old.allocation
        self._set_degraded(f"record write failed: {error}")

    def _set_degraded(self, detail: str | None) -> None:
        if detail != self.degraded:
            self.degraded = detail
            self.ctx.status = p.HealthStatus.DEGRADED if detail else p.HealthStatus.ONLINE
            self.ctx.detail = detail
            if self.bus.connected.is_set():
                self.ctx.publish_health()

    def commit(self) -> None:
        try:
            self.rec.flush()
        except sqlite3.Error as e:
            self.ctx.counters["db_errors"] += 1
            self.log.error("committing the record failed", error=str(e))
            self._recover(str(e))
            return
        if self.degraded and self.degraded.startswith("record write failed"):
            self._set_degraded(None)
        self.publish_changes()

    # -- bus handlers --------------------------------------------------------------------------------
    def configured(self, kind: str, ident: str, what: str) -> bool:
        ids = self.config.evses if kind == "evse" else self.config.meters
        if any(x.id == ident for x in ids):
            return True
        self.ctx.counters[f"unknown_{kind}"] += 1
        self.unknown_log.warning(f"{kind}:{ident}", f"{what} of an {kind.upper() if kind == 'evse' else kind} that "
                                 "is not configured, not recorded", subject=f"{kind} ids", **{f"{kind}_id": ident})
        return False

    def on_status(self, msg: Message) -> None:
        st = msg.payload
        assert isinstance(st, p.EvseStatus)
        if not self.configured("evse", st.evse_id, "status"):
            return
        self.guarded("status", self.rec.on_status, st, p.utcnow())
        self.after_sessions()

    def on_reading(self, msg: Message) -> None:
        assert isinstance(msg.payload, p.MeterReading)
        if self.configured("meter", msg.payload.meter_id, "reading"):
            self.rec.on_reading(msg.payload)

    def on_grid_limit(self, msg: Message) -> None:
        assert isinstance(msg.payload, p.GridLimit)
        self.guarded("grid limit", self.rec.on_grid_limit, msg.payload, p.utcnow())

    def on_evse_limit(self, msg: Message) -> None:
        assert isinstance(msg.payload, p.EvseLimit)
        if not self.configured("evse", msg.payload.evse_id, "limit"):
            return
        self.guarded("evse limit", self.rec.on_evse_limit, msg.payload, p.utcnow())

    def on_link(self, msg: Message) -> None:
        assert isinstance(msg.payload, p.SmgwLinkStatus)
        self.guarded("link", self.rec.on_link, msg.payload, p.utcnow())

    def on_allocation(self, msg: Message) -> None:
        assert isinstance(msg.payload, p.Allocation)
        self.guarded("allocation", self.rec.on_allocation, msg.payload, p.utcnow())

    def on_tariff_current(self, msg: Message) -> None:
        assert isinstance(msg.payload, p.TariffCurrent)
        self.rec.on_tariff_current(msg.payload)

    def on_tariff_schedule(self, msg: Message) -> None:
        assert isinstance(msg.payload, p.TariffSchedule)
        self.rec.on_tariff_schedule(msg.payload)

    # -- charging modes ------------------------------------------------------------------------------
    def mode_of(self, evse_id: str) -> p.ChargingMode:
        row = self.modes.get(evse_id)
        if row is None:
            return p.ChargingMode(evse_id=evse_id)
        return p.ChargingMode(evse_id=evse_id, mode=p.ChargingModeName(row.mode),
                              target=p.SessionTarget.model_validate(row.target) if row.target else None,
                              max_current_a=row.max_current_a, set_by=row.set_by, set_at=row.set_at)

    def on_mode_set(self, msg: Message) -> None:
        cmd = msg.payload
        assert isinstance(cmd, p.ModeCommand)
        if cmd.evse_id not in {e.id for e in self.config.evses}:
            self.ctx.counters["mode_unknown_evse"] += 1
            self.unknown_log.warning(f"mode:{cmd.evse_id}", "charging mode for an unknown EVSE ignored",
                                     subject="EVSE ids", evse_id=cmd.evse_id, source=cmd.source)
            return
        cur = self.mode_of(cmd.evse_id)
        if cmd.max_current_a is not None:
            evse = self.config.evse(cmd.evse_id)
            if not evse.min_current_a <= cmd.max_current_a <= evse.max_current_a:
                self.ctx.counters["mode_invalid"] += 1
                self.log.warning("maximum current outside the EVSE's range ignored", evse_id=cmd.evse_id,
                                 max_current_a=cmd.max_current_a, min_current_a=evse.min_current_a,
                                 evse_max_current_a=evse.max_current_a, source=cmd.source)
                return
        mode = cmd.mode or cur.mode
        target = None if cmd.clear_target else cur.target
        if cmd.target is not None:
            op = self.rec.sessions.get(cmd.evse_id)
            target = cmd.target.model_copy(update={"session_id": op.session_id if op else None})
        cap = None if cmd.clear_max_current else (cmd.max_current_a if cmd.max_current_a is not None
                                                  else cur.max_current_a)
        self.store_mode(cmd.evse_id, mode, target, cmd.source, cap)
        self.log.info("charging mode set", evse_id=cmd.evse_id, mode=mode.value, source=cmd.source,
                      target=target.model_dump() if target else None, max_current_a=cap, request_id=cmd.request_id)

    def store_mode(self, evse_id: str, mode: p.ChargingModeName, target: p.SessionTarget | None,
                   set_by: str | None, max_current_a: float | None = None) -> None:
        now = p.utcnow()
        try:
            self.rec.flush()
            self.db.execute("INSERT OR REPLACE INTO modes (evse_id, mode, target, set_by, set_at, max_current_a) "
                            "VALUES (?,?,?,?,?,?)",
                            (evse_id, mode.value, json.dumps(target.model_dump()) if target else None, set_by,
                             rec.iso(now), max_current_a))
        except sqlite3.Error as e:
            self.ctx.counters["db_errors"] += 1
            self.log.error("storing the charging mode failed", evse_id=evse_id, error=str(e))
            return
        self.modes = rec.modes(self.db)
        self.ctx.counters["modes_set"] += 1
        self.bus.publish("evse.mode", self.mode_of(evse_id), evse_id=evse_id)

    def after_sessions(self) -> None:
        """A session target belongs to its session: bound when one starts, ended with it."""
        closed, self.rec.closed_sessions = self.rec.closed_sessions, []
        for evse_id, row in list(self.modes.items()):
            if not row.target:
                continue
            op = self.rec.sessions.get(evse_id)
            bound_to = row.target.get("session_id")
            t = p.SessionTarget.model_validate(row.target)
            if bound_to is not None and (op is None or bound_to not in op.ids) and (evse_id in closed or op):
                self.store_mode(evse_id, p.ChargingModeName(row.mode), None, "history (session ended)",
                                row.max_current_a)
            elif bound_to is None and op is not None:
                self.store_mode(evse_id, p.ChargingModeName(row.mode),
                                t.model_copy(update={"session_id": op.session_id}), row.set_by, row.max_current_a)

    # -- publishing ----------------------------------------------------------------------------------
    def publish_changes(self, force: bool = False) -> None:
        now = time.monotonic()
        for evse_id in list(self.rec.changed_sessions):
            open_now = evse_id in self.rec.sessions
            last = self.published_at.get(evse_id)
            if open_now and last is not None and now - last < SESSION_PUBLISH_S and not force \
                    and self.rec.sessions[evse_id].energy_wh > 0:
                continue
            self.rec.changed_sessions.discard(evse_id)
            r = self.rec.session_record(evse_id)
            if r is not None:
                self.bus.publish("history.session", r, evse_id=evse_id)
                self.published_at[evse_id] = now
        for cid in list(self.rec.changed_controls):
            self.rec.changed_controls.discard(cid)
            c = self.rec.control_record(cid)
            if c is not None:
                self.bus.publish("history.control", c, kind=c.kind.value)

    def publish_modes(self) -> None:
        for e in self.config.evses:
            self.bus.publish("evse.mode", self.mode_of(e.id), evse_id=e.id)

    # -- periodic work -------------------------------------------------------------------------------
    def second(self) -> None:
        now = p.utcnow()
        self.guarded("sample", self.rec.sample, now)
        self.guarded("expire", self.rec.expire, now)
        self.commit()

    def maintenance(self) -> None:
        now = p.utcnow()
        try:
            self.rec.flush()
            gone = retention(self.db, self.config, now)
            cap = int(self.config.history.max_db_mb * 1024 * 1024)
            trimmed = bound(self.db, cap)
        except sqlite3.Error as e:
            self.ctx.counters["db_errors"] += 1
            self.log.error("retention failed", error=str(e))
            return
        if any(gone.values()) or trimmed:
            self.log.info("old records deleted", **gone, series_minutes_trimmed_for_space=trimmed)
        self.ctx.counters["retention_deleted"] += sum(gone.values())
        self.ctx.counters["series_trimmed_for_space"] += trimmed
        self.update_health()

    def update_health(self) -> None:
        c = self.ctx.counters
        c["db_bytes"] = rec.disk_usage(self.path)
        c["db_used_bytes"] = used_bytes(self.db)
        c["db_limit_bytes"] = int(self.config.history.max_db_mb * 1024 * 1024)
        for k, v in self.rec.counters.items():
            c[k] = v
        c["sessions_open"] = len(self.rec.sessions)

    def on_reload(self, config: Config) -> None:
        self.config = config
        self.rec.configure(config)
        self.publish_modes()

    def on_connect(self) -> None:
        self.publish_modes()

    def subscribe(self) -> None:
        b = self.bus
        b.subscribe("tariff.current", self.on_tariff_current)
        b.subscribe("tariff.schedule", self.on_tariff_schedule)
        b.subscribe("evse.status", self.on_status)
        b.subscribe("meter.reading", self.on_reading)
        b.subscribe("grid.limit", self.on_grid_limit)
        b.subscribe("evse.limit", self.on_evse_limit)
        b.subscribe("link.smgw", self.on_link)
        b.subscribe("controller.allocation", self.on_allocation)
        b.subscribe("evse.mode_set", self.on_mode_set)
        b.on_connect(self.on_connect)

    async def run(self) -> None:
        self.subscribe()
        self.ctx.on_reload(self.on_reload)
        self.log.info("history recording", db=str(self.path), schema=rec.SCHEMA_VERSION,
                      open_sessions=len(self.rec.sessions))
        self.maintenance()
        if self.bus.connected.is_set():
            self.publish_modes()
        try:
            await self.ctx.tasks.supervised("record-loop", self._loop)
        finally:
            try:
                self.rec.flush()
            finally:
                self.db.close()

    async def _loop(self) -> None:
        """Every second: write what arrived; maintenance and health counters now and then (supervised)."""
        last_maint = time.monotonic()
        last_health = 0.0
        while True:
            await asyncio.sleep(FLUSH_S)
            self.second()
            mono = time.monotonic()
            if mono - last_maint >= MAINTENANCE_S:
                last_maint = mono
                self.maintenance()
            elif mono - last_health >= 10:
                last_health = mono
                self.update_health()


async def serve(ctx: ServiceContext) -> None:
    await History(ctx).run()


def main() -> None:
    run_service(SERVICE, serve)
