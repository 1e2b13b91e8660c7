"""The installation's record: charging sessions, control actions, a 1-minute time series, charging modes.

One SQLite database in WAL mode (``history.db_file``, default ``state_dir/history/history.db``, mode 0600:
it holds personal data - idTags, when a car was at home). The history service is its only writer; the
CLI (``chargegate history``), the admin API (``/v1/history/...``) and the web page read it with
:func:`open_db` ``(readonly=True)`` and the query functions below, which return plain dataclasses.

Times are stored as UTC ISO 8601 text with milliseconds (``2026-12-05T16:30:00.000+00:00``), so that
text order is time order. The schema is versioned with ``PRAGMA user_version``; :data:`MIGRATIONS` are
applied in order, each in its own transaction, when the writer opens the database. A database written
by a newer version is refused (no silent downgrade).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from chargegate.files import private_sqlite

MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, """
CREATE TABLE sessions (
    id INTEGER PRIMARY KEY,
    evse_id TEXT NOT NULL,
    session_id TEXT NOT NULL,             -- the bus session id first seen (OCPP transaction, poller session)
    session_ids TEXT NOT NULL DEFAULT '[]', -- every bus session id merged into this record (service restarts)
    source TEXT,
    id_tag TEXT,
    started TEXT NOT NULL,
    stopped TEXT,
    energy_start_wh REAL,
    energy_stop_wh REAL,
    energy_wh REAL NOT NULL DEFAULT 0,
    energy_base_wh REAL NOT NULL DEFAULT 0, -- charged under earlier bus session ids (no register known)
    peak_power_w REAL,
    phases INTEGER NOT NULL DEFAULT 0,
    last_seen TEXT NOT NULL,
    stop_reason TEXT
);
CREATE INDEX sessions_started ON sessions(started);
CREATE INDEX sessions_open ON sessions(evse_id) WHERE stopped IS NULL;
CREATE TABLE session_tariffs (
    session INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    period_id TEXT,
    level TEXT NOT NULL,
    start TEXT NOT NULL,
    end TEXT,
    energy_wh REAL NOT NULL DEFAULT 0,
    price_ct_per_kwh REAL,
    PRIMARY KEY (session, seq)
);
CREATE TABLE signed_values (
    session INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    ts TEXT NOT NULL,
    context TEXT,
    format TEXT,
    data TEXT NOT NULL,                   -- exactly as the wallbox sent it
    PRIMARY KEY (session, seq)
);
CREATE TABLE controls (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,                   -- limit, evse_limit, failsafe, link_outage
    source TEXT,
    scope TEXT,
    started TEXT NOT NULL,
    ended TEXT,
    valid_until TEXT,
    power_w REAL,
    current_a TEXT,
    raised_to_floor INTEGER,
    effective_w REAL,
    limit_id TEXT,
    answer TEXT,
    detail TEXT,
    last_seen TEXT NOT NULL
);
CREATE INDEX controls_started ON controls(started);
CREATE TABLE series_node (
    ts TEXT NOT NULL,
    node TEXT NOT NULL,
    measured_l1 REAL, measured_l2 REAL, measured_l3 REAL,
    limit_l1 REAL, limit_l2 REAL, limit_l3 REAL,
    house_l1 REAL, house_l2 REAL, house_l3 REAL,
    PRIMARY KEY (ts, node)
) WITHOUT ROWID;
CREATE TABLE series_evse (
    ts TEXT NOT NULL,
    evse_id TEXT NOT NULL,
    drawn_l1 REAL, drawn_l2 REAL, drawn_l3 REAL,
    granted_a REAL,
    phases INTEGER,
    bound_by TEXT,
    detail TEXT,
    PRIMARY KEY (ts, evse_id)
) WITHOUT ROWID;
CREATE TABLE modes (
    evse_id TEXT PRIMARY KEY,
    mode TEXT NOT NULL,
    target TEXT,
    set_by TEXT,
    set_at TEXT NOT NULL
);
"""),
    (2, """
CREATE INDEX sessions_id_tag ON sessions(id_tag, started);
CREATE INDEX series_evse_by_evse ON series_evse(evse_id, ts);
ALTER TABLE series_evse ADD COLUMN mode TEXT;
"""),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


class RecordError(RuntimeError):
    pass


def iso(dt: datetime) -> str:
    """The stored form of a time: UTC, milliseconds, ``+00:00``."""
    if dt.tzinfo is None:
        raise ValueError("naive datetime")
    return dt.astimezone(UTC).isoformat(timespec="milliseconds")


def parse(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def open_db(path: Path, readonly: bool = False) -> sqlite3.Connection:
    """Open the record. The writer creates it (0600, its folder 0700) and migrates it; a reader opens an
    existing one read-only (``RecordError`` when there is none yet)."""
    if readonly:
        if not path.exists():
            raise RecordError(f"no history recorded yet ({path} does not exist)")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 5000")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            conn.close()
            raise RecordError(f"{path} has schema version {version}, this chargegate knows up to {SCHEMA_VERSION}")
        return conn
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_sqlite(path)  # SQLite creates -wal and -shm with the database file's permissions
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 5000")
    if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only before the first table: deletes can shrink it
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal":
        raise RecordError(f"{path}: WAL mode not available (journal_mode {mode})")
    private_sqlite(path)  # -wal/-shm an older version left wider
    conn.execute("PRAGMA synchronous = FULL")  # a committed record survives a power cut too
    conn.execute("PRAGMA foreign_keys = ON")
    migrate(conn)
    return conn


def open_empty() -> sqlite3.Connection:
    """An empty record in memory with the current schema: what a reader sees before anything was recorded."""
    conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    migrate(conn)
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations the database has not seen; returns the schema version."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise RecordError(f"the record has schema version {version}, this chargegate knows up to {SCHEMA_VERSION}")
    for number, script in MIGRATIONS:
        if number <= version:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in (s.strip() for s in script.split(";")):
                if stmt:
                    conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        version = number
    return version


def disk_usage(path: Path) -> int:
    """Bytes on disk of the database with its WAL and shared-memory files."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        try:
            total += os.stat(f"{path}{suffix}").st_size
        except FileNotFoundError:
            pass
    return total


# -- read API ---------------------------------------------------------------------------------------------
@dataclass
class TariffPart:
    period_id: str | None
    level: str
    start: datetime
    end: datetime | None
    energy_wh: float
    price_ct_per_kwh: float | None

    @property
    def cost(self) -> float | None:
        """In the currency of the prices (ct/kWh -> currency units)."""
        if self.price_ct_per_kwh is None:
            return None
        return self.energy_wh / 1000 * self.price_ct_per_kwh / 100


@dataclass
class SignedValue:
    ts: datetime
    context: str | None
    format: str | None
    data: str


@dataclass
class SessionRow:
    id: int
    evse_id: str
    session_id: str
    session_ids: list[str]
    source: str | None
    id_tag: str | None
    started: datetime
    stopped: datetime | None
    energy_start_wh: float | None
    energy_stop_wh: float | None
    energy_wh: float
    peak_power_w: float | None
    phases: int
    stop_reason: str | None
    tariffs: list[TariffPart] = field(default_factory=list)
    signed: list[SignedValue] = field(default_factory=list)

    @property
    def cost(self) -> float | None:
        """The session's cost at the prices recorded per tariff period (None when a part has no price)."""
        if not self.tariffs:
            return None if self.energy_wh > 0 else 0.0
        parts = [t.cost for t in self.tariffs if t.energy_wh > 0]
        if any(c is None for c in parts):
            return None
        return sum(c for c in parts if c is not None)

    @property
    def duration_s(self) -> float | None:
        return (self.stopped - self.started).total_seconds() if self.stopped else None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cost"] = self.cost
        d["duration_s"] = self.duration_s
        for t, td in zip(self.tariffs, d["tariffs"], strict=True):
            td["cost"] = t.cost
        return _jsonable(d)


@dataclass
class ControlRow:
    id: int
    kind: str
    source: str | None
    scope: str | None
    started: datetime
    ended: datetime | None
    valid_until: datetime | None
    power_w: float | None
    current_a: list[float] | None
    raised_to_floor: bool | None
    effective_w: float | None
    limit_id: str | None
    answer: str | None
    detail: str | None

    @property
    def duration_s(self) -> float | None:
        return (self.ended - self.started).total_seconds() if self.ended else None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["duration_s"] = self.duration_s
        return _jsonable(d)


@dataclass
class NodeSample:
    ts: datetime
    node: str
    measured_a: list[float | None]
    limit_a: list[float | None]
    house_a: list[float | None]


@dataclass
class EvseSample:
    ts: datetime
    evse_id: str
    drawn_a: list[float | None]
    granted_a: float | None
    phases: int | None
    bound_by: str | None
    detail: str | None
    mode: str | None


@dataclass
class ModeRow:
    evse_id: str
    mode: str
    target: dict[str, Any] | None
    set_by: str | None
    set_at: datetime


@dataclass
class MonthSummary:
    month: str  # YYYY-MM (local time of the session start)
    id_tag: str | None
    sessions: int
    energy_wh: float
    cost: float | None


def _jsonable(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def _range(col: str, start: datetime | None, end: datetime | None, args: list[Any]) -> list[str]:
    where = []
    if start is not None:
        where.append(f"{col} >= ?")
        args.append(iso(start))
    if end is not None:
        where.append(f"{col} < ?")
        args.append(iso(end))
    return where


def sessions(conn: sqlite3.Connection, start: datetime | None = None, end: datetime | None = None,
             evse: str | None = None, id_tag: str | None = None, include_open: bool = True,
             details: bool = True) -> list[SessionRow]:
    """Sessions that started in [start, end), oldest first, with their tariff parts and signed values."""
    args: list[Any] = []
    where = _range("started", start, end, args)
    if evse is not None:
        where.append("evse_id = ?")
        args.append(evse)
    if id_tag is not None:
        where.append("id_tag = ?")
        args.append(id_tag)
    if not include_open:
        where.append("stopped IS NOT NULL")
    sql = "SELECT * FROM sessions" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY started, id"
    rows = [_session(r) for r in conn.execute(sql, args)]
    if details and rows:
        by_id = {r.id: r for r in rows}
        ids = list(by_id)
        for chunk in _chunks(ids, 500):
            marks = ",".join("?" * len(chunk))
            for t in conn.execute(f"SELECT * FROM session_tariffs WHERE session IN ({marks}) ORDER BY session, seq",
                                  chunk):
                by_id[t["session"]].tariffs.append(TariffPart(
                    t["period_id"], t["level"], parse(t["start"]), parse(t["end"]),  # type: ignore[arg-type]
                    t["energy_wh"], t["price_ct_per_kwh"]))
            for s in conn.execute(f"SELECT * FROM signed_values WHERE session IN ({marks}) ORDER BY session, seq",
                                  chunk):
                by_id[s["session"]].signed.append(SignedValue(parse(s["ts"]), s["context"], s["format"],  # type: ignore[arg-type]
                                                              s["data"]))
    return rows


def session(conn: sqlite3.Connection, record_id: int) -> SessionRow | None:
    r = conn.execute("SELECT started FROM sessions WHERE id = ?", (record_id,)).fetchone()
    if r is None:
        return None
    t = parse(r["started"])
    assert t is not None
    return next((s for s in sessions(conn, start=t) if s.id == record_id), None)


def _chunks(xs: list[int], n: int) -> Iterator[list[int]]:
    for i in range(0, len(xs), n):
        yield xs[i:i + n]


def _session(r: sqlite3.Row) -> SessionRow:
    return SessionRow(
        id=r["id"], evse_id=r["evse_id"], session_id=r["session_id"], session_ids=json.loads(r["session_ids"]),
        source=r["source"], id_tag=r["id_tag"], started=parse(r["started"]),  # type: ignore[arg-type]
        stopped=parse(r["stopped"]), energy_start_wh=r["energy_start_wh"], energy_stop_wh=r["energy_stop_wh"],
        energy_wh=r["energy_wh"], peak_power_w=r["peak_power_w"], phases=r["phases"], stop_reason=r["stop_reason"])


def controls(conn: sqlite3.Connection, start: datetime | None = None, end: datetime | None = None,
             kind: str | None = None, source: str | None = None) -> list[ControlRow]:
    """Control actions in force at some time in [start, end) (started before ``end``, not ended before
    ``start``), oldest first."""
    args: list[Any] = []
    where = []
    if end is not None:
        where.append("started < ?")
        args.append(iso(end))
    if start is not None:
        where.append("(ended IS NULL OR ended >= ?)")
        args.append(iso(start))
    if kind is not None:
        where.append("kind = ?")
        args.append(kind)
    if source is not None:
        where.append("source = ?")
        args.append(source)
    sql = "SELECT * FROM controls" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY started, id"
    return [ControlRow(
        id=r["id"], kind=r["kind"], source=r["source"], scope=r["scope"], started=parse(r["started"]),  # type: ignore[arg-type]
        ended=parse(r["ended"]), valid_until=parse(r["valid_until"]), power_w=r["power_w"],
        current_a=json.loads(r["current_a"]) if r["current_a"] else None,
        raised_to_floor=None if r["raised_to_floor"] is None else bool(r["raised_to_floor"]),
        effective_w=r["effective_w"], limit_id=r["limit_id"], answer=r["answer"], detail=r["detail"])
        for r in conn.execute(sql, args)]


def node_series(conn: sqlite3.Connection, start: datetime | None = None, end: datetime | None = None,
                node: str | None = None) -> list[NodeSample]:
    args: list[Any] = []
    where = _range("ts", start, end, args)
    if node is not None:
        where.append("node = ?")
        args.append(node)
    sql = "SELECT * FROM series_node" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY ts, node"
    return [NodeSample(parse(r["ts"]), r["node"], [r["measured_l1"], r["measured_l2"], r["measured_l3"]],  # type: ignore[arg-type]
                       [r["limit_l1"], r["limit_l2"], r["limit_l3"]], [r["house_l1"], r["house_l2"], r["house_l3"]])
            for r in conn.execute(sql, args)]


def evse_series(conn: sqlite3.Connection, start: datetime | None = None, end: datetime | None = None,
                evse: str | None = None) -> list[EvseSample]:
    args: list[Any] = []
    where = _range("ts", start, end, args)
    if evse is not None:
        where.append("evse_id = ?")
        args.append(evse)
    sql = "SELECT * FROM series_evse" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY ts, evse_id"
    return [EvseSample(parse(r["ts"]), r["evse_id"], [r["drawn_l1"], r["drawn_l2"], r["drawn_l3"]],  # type: ignore[arg-type]
                       r["granted_a"], r["phases"], r["bound_by"], r["detail"], r["mode"])
            for r in conn.execute(sql, args)]


def house_load(conn: sqlite3.Connection, start: datetime | None = None, end: datetime | None = None,
               node: str | None = None) -> list[tuple[datetime, str, list[float]]]:
    """The house (non-EV) load per metered circuit node and minute: the node's measured current minus the
    EVSE draws below it, per grid phase, floored at 0 (what ``chargegate simulate --load`` reads)."""
    out = []
    for s in node_series(conn, start, end, node):
        if any(h is None for h in s.house_a):
            continue
        out.append((s.ts, s.node, [float(h) for h in s.house_a]))  # type: ignore[arg-type]
    return out


def monthly_summary(conn: sqlite3.Connection, start: datetime | None = None, end: datetime | None = None,
                    evse: str | None = None, id_tag: str | None = None,
                    tz: Any = UTC) -> list[MonthSummary]:
    """Finished sessions per month (of their start, in ``tz``) and idTag: count, energy and cost."""
    acc: dict[tuple[str, str | None], MonthSummary] = {}
    for s in sessions(conn, start, end, evse, id_tag, include_open=False):
        month = s.started.astimezone(tz).strftime("%Y-%m")
        m = acc.setdefault((month, s.id_tag), MonthSummary(month, s.id_tag, 0, 0.0, 0.0))
        m.sessions += 1
        m.energy_wh += s.energy_wh
        c = s.cost
        m.cost = None if (c is None or m.cost is None) else m.cost + c
    return sorted(acc.values(), key=lambda m: (m.month, m.id_tag or ""))


def modes(conn: sqlite3.Connection) -> dict[str, ModeRow]:
    return {r["evse_id"]: ModeRow(r["evse_id"], r["mode"], json.loads(r["target"]) if r["target"] else None,
                                  r["set_by"], parse(r["set_at"]))  # type: ignore[arg-type]
            for r in conn.execute("SELECT * FROM modes")}


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    out = {}
    for table in ("sessions", "controls", "series_node", "series_evse", "signed_values"):
        out[table] = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    return out


def rows_json(rows: Iterable[Any]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        out.append(r.as_dict() if hasattr(r, "as_dict") else _jsonable(asdict(r)))
    return out
