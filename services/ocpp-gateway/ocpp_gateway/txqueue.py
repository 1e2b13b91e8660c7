"""The durable transaction queue (SQLite, WAL, ``synchronous=FULL``).

Every transaction message bound for the backend (StartTransaction, transaction MeterValues,
StopTransaction, 2.0.1 TransactionEvent) is committed here *before* anything else happens to it
(before the wallbox gets its answer, before a Modbus session is reported as started). A delivery
loop per upstream charge point sends the oldest message of that charge point, waits for the
answer and only then deletes it, so messages go out in order, at least once, and survive
``kill -9``. Each message keeps the OCPP message id it was first sent with, so a message that is
re-sent after a crash carries the same id (a backend can recognise the replay).

1.6 backends assign the transaction id in the StartTransaction answer. Messages queued before that
answer (offline sessions) are stored with the local transaction key; the backend's id is recorded
in ``tx`` when it arrives and written into every queued message of that transaction.

Bound and drop policy (``ocpp.queue.max_messages``): when the queue is full, intermediate meter
values are dropped, oldest first, but never the first or the last one of a transaction (so each
session keeps its start and end readings); Start and Stop (and TransactionEvent Started/Ended)
are never dropped: when only those are left, the queue grows beyond its bound and says so in the
log and counters. A message the backend refuses with a CALLERROR is retried with backoff; after
``max_attempts`` it is moved to the ``dead`` table (kept for inspection, never silently lost) and
delivery continues.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from chargegate.files import private_sqlite

log = structlog.get_logger("ocpp_gateway.txqueue")

SCHEMA = """
CREATE TABLE IF NOT EXISTS msg (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    cp TEXT NOT NULL,
    tx TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('start', 'update', 'stop')),
    action TEXT NOT NULL,
    payload TEXT NOT NULL,
    uid TEXT NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS msg_cp ON msg (cp, seq);
CREATE INDEX IF NOT EXISTS msg_tx ON msg (tx, seq);
CREATE TABLE IF NOT EXISTS dead (
    seq INTEGER PRIMARY KEY,
    cp TEXT NOT NULL, tx TEXT NOT NULL, kind TEXT NOT NULL, action TEXT NOT NULL,
    payload TEXT NOT NULL, uid TEXT NOT NULL, created REAL NOT NULL, attempts INTEGER NOT NULL,
    reason TEXT, died REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tx (
    tx TEXT PRIMARY KEY,
    cp TEXT NOT NULL,
    evse_id TEXT NOT NULL,
    version TEXT NOT NULL,
    local_id TEXT,
    backend_id TEXT,
    id_tag TEXT,
    meter_start REAL,
    meter_last REAL,
    started TEXT NOT NULL,
    stopped TEXT,
    seq_no INTEGER NOT NULL DEFAULT 0,
    id_status TEXT,
    last_ts TEXT,
    local_seq INTEGER,
    last_digest TEXT
);
CREATE INDEX IF NOT EXISTS tx_local ON tx (evse_id, local_id);
CREATE INDEX IF NOT EXISTS tx_backend ON tx (cp, backend_id);
CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT NOT NULL);
"""

TX_ID_PLACEHOLDER = "__backend_transaction_id__"


class SyncTicket:
    """The commits one task makes inside :meth:`TxQueue.deferred_sync` (see there)."""

    __slots__ = ("queue", "task", "upto", "written")

    def __init__(self, queue: TxQueue, task: asyncio.Task[Any] | None) -> None:
        self.queue, self.task, self.written = queue, task, False
        self.upto = 0  # the last of its commits (``TxQueue._written``): ``sync(ticket.upto)`` covers them all


_DEFERRED: ContextVar[SyncTicket | None] = ContextVar("txqueue_deferred_sync", default=None)


ROW_CACHE_MAX = 4096  # transaction rows kept in memory (TxQueue._rows; far more than open transactions)
CHECKPOINT_EVERY = 100  # commits (about 800 WAL pages: SQLite's own default is a checkpoint per 1000 pages)


class _Syncer:
    """The queue's thread for the WAL's fsyncs (group commit) and its checkpoints. ``request(n)``: make the
    commits up to ``n`` durable; the result goes back to the loop (``TxQueue._synced_to``)."""

    def __init__(self, queue: TxQueue, loop: asyncio.AbstractEventLoop) -> None:
        self.queue, self.loop = queue, loop
        self.cv = threading.Condition()
        self.want = 0  # commits asked for
        self.attempted = 0  # commits the last fsync covered (or tried to)
        self.checkpoint_due = False
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="txqueue-sync", daemon=True)
        self.thread.start()

    def request(self, upto: int, retry: bool = False) -> None:
        with self.cv:
            if retry:  # after a failed fsync: once more for what it covered
                self.attempted = min(self.attempted, upto - 1)
            if upto > self.want:
                self.want = upto
            if self.want > self.attempted:
                self.cv.notify()

    def checkpoint(self) -> None:
        with self.cv:
            self.checkpoint_due = True
            self.cv.notify()

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join(30)

    def _run(self) -> None:
        db: sqlite3.Connection | None = None
        try:
            while True:
                with self.cv:
                    while not self.stopping and self.want <= self.attempted and not self.checkpoint_due:
                        self.cv.wait()
                    if self.stopping:
                        return
                    upto = self.want if self.want > self.attempted else 0
                    if upto:
                        self.attempted = upto
                    checkpoint, self.checkpoint_due = self.checkpoint_due, False
                if upto:
                    error: OSError | None = None
                    try:
                        self.queue._fdatasync_wal()
                    except OSError as e:
                        error = e
                    try:
                        self.loop.call_soon_threadsafe(self.queue._synced_to, upto, error)
                    except RuntimeError:  # the loop is closed: nobody waits any more
                        return
                if checkpoint:
                    try:
                        if db is None:
                            db = sqlite3.connect(str(self.queue.path), isolation_level=None)
                            db.execute("PRAGMA synchronous=FULL")
                        self.queue._checkpoint(db)
                    except sqlite3.Error as e:  # the next one tries again; the WAL only grows meanwhile
                        log.warning("checkpoint of the transaction queue failed", error=str(e))
        finally:
            if db is not None:
                db.close()


@dataclass(frozen=True)
class Queued:
    seq: int
    cp: str
    tx: str
    kind: str
    action: str
    payload: dict[str, Any]
    uid: str
    attempts: int
    next_try: float = 0.0  # time.time() of the next attempt after a refusal
    text: str | None = None  # the payload as stored (JSON): what goes to the backend when nothing is filled in

    def due_in(self) -> float:
        return max(0.0, self.next_try - time.time())


@dataclass(frozen=True)
class TxRow:
    tx: str
    cp: str
    evse_id: str
    version: str
    local_id: str | None
    backend_id: str | None
    id_tag: str | None
    meter_start: float | None
    meter_last: float | None
    started: str
    stopped: str | None
    seq_no: int
    last_ts: str | None
    local_seq: int | None
    last_digest: str | None = None  # the digest of the wallbox's last 1.6 MeterValues queued (repeat check)


class TxQueue:
    """One SQLite file for all upstream charge points. All calls are synchronous and short."""

    def __init__(self, path: Path | str, max_messages: int = 100_000, max_attempts: int = 10) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_messages = max_messages
        self.max_attempts = max_attempts
        # idTags and meter values are personal data: the file (and SQLite's -wal/-shm, which take its mode)
        # is 0600 whatever the umask
        private_sqlite(self.path)
        self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        private_sqlite(self.path)  # -wal/-shm an older version left wider
        self.db.execute("PRAGMA synchronous=FULL")
        # the connection's synchronous level as last set: it is set before each write (``_sync_level``) and left
        # there, so a run of deferred commits and deletes (the relay path: two per meter value) switches it
        # never, not four times per message (each PRAGMA a statement on the loop)
        self._level = "FULL"
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(SCHEMA)
        if "last_digest" not in {r[1] for r in self.db.execute("PRAGMA table_info(tx)")}:  # a file of before
            self.db.execute("ALTER TABLE tx ADD COLUMN last_digest TEXT")
        self.dropped = 0
        self.over_bound_logged = False
        self._count = self.db.execute("SELECT COUNT(*) FROM msg").fetchone()[0]
        # commits written without their own fsync (deferred_sync) and how many of them are on disk
        self._written = 0
        self._synced = 0
        self._failed_upto = 0  # the last fsync that failed covered the commits up to here
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._syncer: _Syncer | None = None  # the sync thread, from the first deferred commit on
        self._since_checkpoint = 0  # commits since the sync thread was last asked for a checkpoint
        self._wal_fd: int | None = None
        self._deferred_tx: SyncTicket | None = None  # the open transaction is a deferred_sync one
        self._tx_inserted: list[int] = []  # the messages the open transaction inserted
        # messages of deferred commits whose fsync has not returned yet: seq -> the commit (``_written``) that
        # must be on disk before anything may happen to them that rests on their being stored (their delete)
        self._unsynced_msg: dict[int, int] = {}
        # transaction rows as last read or written by this connection (the hot path read one up to four times per
        # MeterValues); every write to a row replaces or drops its entry, so a hit equals what SELECT would say
        self._rows: dict[str, TxRow] = {}
        self._by_local: dict[tuple[str, str], str] = {}  # (evse_id, local_id) -> the newest tx with it
        # charge points whose queue this connection found empty and has inserted nothing for since (head() after
        # each delivery found it empty with a SELECT per message); only _insert adds messages
        self._empty: set[str] = set()

    def close(self) -> None:
        if self._syncer is not None:
            self._syncer.stop()
            self._syncer = None
        self.db.close()
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None

    # -- durability off the event loop --------------------------------------------------------
    @contextlib.contextmanager
    def deferred_sync(self) -> Iterator[SyncTicket]:
        """The commits the current task makes inside are written to the WAL without their own fsync
        (``synchronous=NORMAL``); the caller must ``await sync()`` (when ``ticket.written``) before it
        acknowledges anything they hold - the wallbox's answer. Every other task's commits, meanwhile, are
        ``synchronous=FULL`` as always. The point: the fsync (0.2 ms on a quiet SSD, 4-8 ms here with other
        jobs writing, more on an SD card) runs in a thread of its own, once for all the messages waiting for
        it, while the event loop serves the other connections, instead of stopping all of them once per
        message. The thread is asked for it at the commit itself, so the fsync runs while the task still
        works on the message (its status, its answer)."""
        ticket = SyncTicket(self, asyncio.current_task())
        token = _DEFERRED.set(ticket)
        try:
            yield ticket
        finally:
            _DEFERRED.reset(token)

    @property
    def unsynced(self) -> bool:
        """Commits whose fsync is still to come (nothing of them may leave the gateway yet)."""
        return self._synced < self._written

    async def sync(self, upto: int | None = None) -> None:
        """Return once every commit made so far (or up to the ``upto``-th deferred one) is on disk: the WAL
        file fsynced (``fdatasync``, what SQLite does at a ``synchronous=FULL`` commit in WAL mode) by the sync
        thread. Commits arriving while one fsync runs share the next one (group commit). An error (EIO) raises:
        the caller does not acknowledge (a later ``sync`` tries again)."""
        target = self._written if upto is None else min(upto, self._written)
        if self._synced >= target:
            return
        syncer = self._syncer
        assert syncer is not None  # made at the first deferred commit
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        syncer.request(target, retry=target <= self._failed_upto)
        await fut

    def durable_after(self, seq: int) -> int:
        """0 when message ``seq`` is on disk (or was committed ``synchronous=FULL``), else the deferred commit
        whose fsync must return first (for :meth:`until_durable`)."""
        n = self._unsynced_msg.get(seq, 0)
        return n if n > self._synced else 0

    async def until_durable(self, seq: int) -> None:
        """Return once message ``seq``'s insert is on disk. The delivery loop forwards a meter value while its
        fsync may still run (services/ocpp-gateway/README.md, "Forwarding while the fsync runs") and awaits this
        before it deletes the message: a delete is never committed before the insert it undoes is durable.
        Raises like :meth:`sync` when the fsync fails (the message stays queued)."""
        n = self.durable_after(seq)
        if n:
            await self.sync(n)

    def _synced_to(self, upto: int, error: OSError | None) -> None:
        """The sync thread's report (on the loop): commits up to ``upto`` are on disk, or failed to be."""
        if error is None:
            self._synced = max(self._synced, upto)
            done = self._synced
            if self._unsynced_msg:
                synced = self._synced
                self._unsynced_msg = {s: n for s, n in self._unsynced_msg.items() if n > synced}
        else:
            self._failed_upto = max(self._failed_upto, upto)
            done = upto
        keep: list[tuple[int, asyncio.Future[None]]] = []
        for target, fut in self._waiters:
            if target > done:
                keep.append((target, fut))
            elif not fut.done():
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(OSError(error.errno, f"fsync of the queue's WAL failed: {error.strerror}"))
        self._waiters = keep

    def _fdatasync_wal(self) -> None:
        """In the sync thread: the WAL's data on disk."""
        fd = self._wal_fd
        if fd is not None and os.fstat(fd).st_nlink == 0:
            os.close(fd)  # SQLite removed the WAL and made a new one (never while this process has it open)
            fd = None
        if fd is None:
            fd = self._wal_fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        os.fdatasync(fd)

    def _checkpoint(self, db: sqlite3.Connection) -> None:
        """In the sync thread, on its own connection: copy the WAL into the database (PASSIVE: it waits for no
        reader or writer; the loop's connection goes on meanwhile). On the loop, SQLite's automatic checkpoint
        (every 1000 WAL pages, about every 100 forwarded messages) fsynced the WAL and the database there,
        stopping every connection for two fsyncs - tens of ms when the disk is busy (bench/ocpp)."""
        db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    # -- helpers -----------------------------------------------------------------------------
    def _sync_level(self, level: str) -> None:
        """Set ``PRAGMA synchronous`` for the next commit (outside a transaction: SQLite takes it only there).
        Every write of this class sets the level it needs first: FULL for everything but the deferred commits
        (their fsync follows in sync()) and the deletes of delivered messages."""
        if self._level != level:
            self.db.execute(f"PRAGMA synchronous={level}")
            self._level = level

    def _begin(self, level: str = "FULL") -> None:
        """Open a write transaction; its commit is ``level`` (FULL unless told), NORMAL in the task of a
        deferred_sync (see there)."""
        ticket = _DEFERRED.get()
        # a commit of the task inside deferred_sync: written to the WAL, its fsync follows in sync() (SQLite
        # takes the level only outside a transaction; nothing else runs on the loop until COMMIT or ROLLBACK)
        self._deferred_tx = ticket if ticket is not None and ticket.queue is self and \
            ticket.task is asyncio.current_task() else None
        self._sync_level("NORMAL" if self._deferred_tx is not None else level)
        self._tx_inserted.clear()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._end_deferred()
            raise

    def _end_deferred(self) -> SyncTicket | None:
        ticket, self._deferred_tx = self._deferred_tx, None
        return ticket

    def _commit(self) -> None:
        try:
            self.db.execute("COMMIT")  # synchronous=FULL (fsynced before it returns) unless deferred
        except BaseException:
            self._rollback()
            raise
        ticket = self._end_deferred()
        if ticket is not None:
            self._written += 1
            ticket.written = True
            ticket.upto = self._written
            for seq in self._tx_inserted:
                self._unsynced_msg[seq] = self._written
            syncer = self._syncer
            if syncer is None:
                syncer = self._syncer = _Syncer(self, asyncio.get_running_loop())
                # checkpoints from now on in the sync thread (see _checkpoint), not on the loop
                self.db.execute("PRAGMA wal_autocheckpoint=0")
            syncer.request(self._written)  # the fsync starts now, while the caller goes on
        self._count_commit()

    def _count_commit(self) -> None:
        if self._syncer is not None:
            self._since_checkpoint += 1
            if self._since_checkpoint >= CHECKPOINT_EVERY:
                self._since_checkpoint = 0
                self._syncer.checkpoint()

    def _rollback(self) -> None:
        self._tx_inserted.clear()
        try:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        finally:
            self._end_deferred()

    def next_local_id(self) -> int:
        """A transaction id for a local 1.6 wallbox, unique forever (persisted)."""
        self._begin()
        try:
            row = self.db.execute("SELECT v FROM kv WHERE k = 'local_tx_id'").fetchone()
            n = int(row[0]) + 1 if row else 1
            self.db.execute("INSERT OR REPLACE INTO kv (k, v) VALUES ('local_tx_id', ?)", (str(n),))
            self._commit()
        except BaseException:
            self._rollback()
            raise
        return n

    def get_kv(self, key: str) -> str | None:
        row = self.db.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_kv(self, key: str, value: str) -> None:
        self._sync_level("FULL")
        self.db.execute("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", (key, value))

    # -- enqueue -----------------------------------------------------------------------------
    def begin_tx(self, *, cp: str, evse_id: str, version: str, action: str, payload: dict[str, Any],
                 id_tag: str | None, meter_start: float | None, started: str, local_id: str | None = None,
                 tx: str | None = None, backend_id: str | None = None, seq_no: int = 0,
                 last_ts: str | None = None, local_seq: int | None = None) -> str:
        """Record a new transaction and its start message in one commit. Returns the tx key."""
        tx = tx or uuid.uuid4().hex
        self._begin()
        try:
            self.db.execute(
                "INSERT INTO tx (tx, cp, evse_id, version, local_id, backend_id, id_tag, meter_start, meter_last, "
                "started, seq_no, last_ts, local_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (tx, cp, evse_id, version, local_id, backend_id, id_tag, meter_start, meter_start, started, seq_no,
                 last_ts, local_seq))
            self._insert(cp, tx, "start", action, payload)
            self._commit()
        except BaseException:
            self._rollback()
            raise
        self._rows.pop(tx, None)
        if local_id is not None:
            self._by_local[(evse_id, local_id)] = tx  # the newest row with it, as tx_by_local's ORDER BY says
        self._enforce_bound()
        return tx

    def add(self, tx: str, kind: str, action: str, payload: dict[str, Any], *, meter: float | None = None,
            stopped: str | None = None, last_ts: str | None = None, local_seq: int | None = None,
            digest: str | None = None) -> int:
        """Queue an update or stop message of transaction ``tx``; ``digest`` (of the wallbox's message it
        came from) is kept with the transaction in the same commit. Returns its sequence number."""
        row = self.tx(tx)
        if row is None:
            raise KeyError(f"unknown transaction {tx}")
        changes = (meter is not None or stopped is not None or last_ts is not None or local_seq is not None
                   or digest is not None)
        self._begin()
        try:
            seq = self._insert(row.cp, tx, kind, action, payload)
            if changes:
                # one statement for what is given (None: left as it is)
                self.db.execute(
                    "UPDATE tx SET meter_last = coalesce(?, meter_last), stopped = coalesce(?, stopped), "
                    "last_ts = coalesce(?, last_ts), local_seq = coalesce(?, local_seq), "
                    "last_digest = coalesce(?, last_digest) WHERE tx = ?",
                    (meter, stopped, last_ts, local_seq, digest, tx))
            self._commit()
        except BaseException:
            self._rows.pop(tx, None)
            self._rollback()
            raise
        if changes:  # the row as the UPDATE left it (what a SELECT would read now)
            self._rows[tx] = dataclasses.replace(
                row, meter_last=float(meter) if meter is not None else row.meter_last,
                stopped=stopped if stopped is not None else row.stopped,
                last_ts=last_ts if last_ts is not None else row.last_ts,
                local_seq=int(local_seq) if local_seq is not None else row.local_seq,
                last_digest=digest if digest is not None else row.last_digest)
        self._enforce_bound()
        return seq

    def add_seq_only(self, tx: str, local_seq: int) -> None:
        """Remember a wallbox's TransactionEvent seqNo that carried nothing to forward (duplicate check)."""
        self._rows.pop(tx, None)
        self._sync_level("FULL")
        self.db.execute("UPDATE tx SET local_seq = ? WHERE tx = ?", (local_seq, tx))

    def mark_stopped(self, tx: str, stopped: str) -> None:
        self._rows.pop(tx, None)
        self._sync_level("FULL")
        self.db.execute("UPDATE tx SET stopped = ? WHERE tx = ?", (stopped, tx))

    def next_seq_no(self, tx: str) -> int:
        """2.0.1 TransactionEvent seqNo, persisted per transaction."""
        self._rows.pop(tx, None)
        self._begin()
        try:
            row = self.db.execute("SELECT seq_no FROM tx WHERE tx = ?", (tx,)).fetchone()
            n = int(row[0]) if row else 0
            self.db.execute("UPDATE tx SET seq_no = ? WHERE tx = ?", (n + 1, tx))
            self._commit()
        except BaseException:
            self._rollback()
            raise
        return n

    def _insert(self, cp: str, tx: str, kind: str, action: str, payload: dict[str, Any]) -> int:
        cur = self.db.execute(
            "INSERT INTO msg (cp, tx, kind, action, payload, uid, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (cp, tx, kind, action, json.dumps(payload, separators=(",", ":")), str(uuid.uuid4()), time.time()))
        self._count += 1
        self._empty.discard(cp)
        seq = int(cur.lastrowid or 0)
        self._tx_inserted.append(seq)
        return seq

    def _enforce_bound(self) -> None:
        while self._count > self.max_messages:
            # an intermediate update: not the first and not the last update of its transaction
            row = self.db.execute(
                "SELECT m.seq, m.tx FROM msg m WHERE m.kind = 'update' "
                "AND EXISTS (SELECT 1 FROM msg a WHERE a.tx = m.tx AND a.kind = 'update' AND a.seq < m.seq) "
                "AND EXISTS (SELECT 1 FROM msg b WHERE b.tx = m.tx AND b.kind = 'update' AND b.seq > m.seq) "
                "ORDER BY m.seq LIMIT 1").fetchone()
            if row is None:
                # then any update that is not the last one of its transaction
                row = self.db.execute(
                    "SELECT m.seq, m.tx FROM msg m WHERE m.kind = 'update' "
                    "AND EXISTS (SELECT 1 FROM msg b WHERE b.tx = m.tx AND b.kind = 'update' AND b.seq > m.seq) "
                    "ORDER BY m.seq LIMIT 1").fetchone()
            if row is None:
                if not self.over_bound_logged:
                    self.over_bound_logged = True
                    log.error("transaction queue is over its bound with only start/stop messages left; "
                              "keeping them all", queued=self._count, bound=self.max_messages)
                return
            self._sync_level("FULL")
            self.db.execute("DELETE FROM msg WHERE seq = ?", (row[0],))
            self._count -= 1
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("transaction queue full: dropped intermediate meter values", dropped_total=self.dropped,
                            bound=self.max_messages)
        self.over_bound_logged = False

    # -- delivery ----------------------------------------------------------------------------
    def head(self, cp: str) -> Queued | None:
        """The oldest queued message of ``cp``; ``Queued.text`` is its payload as stored (``payload`` decoded)."""
        if cp in self._empty:
            return None
        row = self.db.execute(
            "SELECT seq, cp, tx, kind, action, payload, uid, attempts, next_try FROM msg WHERE cp = ? "
            "ORDER BY seq LIMIT 1", (cp,)).fetchone()
        if row is None:
            if not self.db.in_transaction:  # committed state only (an open transaction may still roll back)
                self._empty.add(cp)
            return None
        return Queued(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), row[6], row[7], row[8], row[5])

    def due_in(self, seq: int) -> float:
        row = self.db.execute("SELECT next_try FROM msg WHERE seq = ?", (seq,)).fetchone()
        return max(0.0, (row[0] if row else 0.0) - time.time())

    def delivered(self, seq: int, *, backend_id: str | None = None, id_status: str | None = None) -> None:
        """The backend answered ``seq``: delete it (and record the backend's transaction id).

        This commit is not fsynced on its own (``synchronous=NORMAL``; the next enqueue's FULL commit
        syncs the WAL up to here): a process crash loses nothing, a power cut can at worst bring a
        delivered message back, which is then sent again with its original message id - never a loss.
        """
        if backend_id is None and _DEFERRED.get() is None and not self.db.in_transaction:
            # the usual case: one statement, its own transaction (BEGIN and COMMIT would be two more)
            self._sync_level("NORMAL")
            cur = self.db.execute("DELETE FROM msg WHERE seq = ?", (seq,))
            self._count -= cur.rowcount
            self._unsynced_msg.pop(seq, None)
            self._count_commit()
            return
        self._delivered(seq, backend_id, id_status)

    def _delivered(self, seq: int, backend_id: str | None, id_status: str | None) -> None:
        self._begin(level="NORMAL")  # a delete needs no fsync of its own (above)
        try:
            row = self.db.execute("SELECT tx FROM msg WHERE seq = ?", (seq,)).fetchone() \
                if backend_id is not None else None
            cur = self.db.execute("DELETE FROM msg WHERE seq = ?", (seq,))
            if row is not None and backend_id is not None:
                self._rows.pop(row[0], None)
                self.db.execute("UPDATE tx SET backend_id = ?, id_status = ? WHERE tx = ?",
                                (backend_id, id_status, row[0]))
                self._fill_backend_id(row[0], backend_id)
            self._commit()
            self._count -= cur.rowcount
        except BaseException:
            self._rollback()
            raise
        self._unsynced_msg.pop(seq, None)

    def _fill_backend_id(self, tx: str, backend_id: str) -> None:
        """Write the backend's transaction id into the messages queued before it was known."""
        for seq, payload in self.db.execute("SELECT seq, payload FROM msg WHERE tx = ?", (tx,)).fetchall():
            if TX_ID_PLACEHOLDER in payload:
                data = json.loads(payload)
                data = fill_transaction_id(data, backend_id)
                self.db.execute("UPDATE msg SET payload = ? WHERE seq = ?",
                                (json.dumps(data, separators=(",", ":")), seq))

    def failed(self, seq: int, error: str, backoff_s: float) -> bool:
        """The backend refused ``seq`` with a CALLERROR. Returns True when it was moved to ``dead``."""
        row = self.db.execute("SELECT attempts FROM msg WHERE seq = ?", (seq,)).fetchone()
        if row is None:
            return False
        attempts = row[0] + 1
        if attempts >= self.max_attempts:
            self._begin()
            try:
                self.db.execute(
                    "INSERT INTO dead (seq, cp, tx, kind, action, payload, uid, created, attempts, reason, died) "
                    "SELECT seq, cp, tx, kind, action, payload, uid, created, ?, ?, ? FROM msg WHERE seq = ?",
                    (attempts, error[:500], time.time(), seq))
                cur = self.db.execute("DELETE FROM msg WHERE seq = ?", (seq,))
                self._commit()
                self._count -= cur.rowcount
            except BaseException:
                self._rollback()
                raise
            return True
        self._sync_level("FULL")
        self.db.execute("UPDATE msg SET attempts = ?, next_try = ?, last_error = ? WHERE seq = ?",
                        (attempts, time.time() + backoff_s * min(2 ** (attempts - 1), 32), error[:500], seq))
        return False

    def bury_tx(self, tx: str, reason: str) -> int:
        """Move every queued message of ``tx`` to ``dead`` (its start was refused for good)."""
        self._begin()
        try:
            self.db.execute(
                "INSERT INTO dead (seq, cp, tx, kind, action, payload, uid, created, attempts, reason, died) "
                "SELECT seq, cp, tx, kind, action, payload, uid, created, attempts, ?, ? FROM msg WHERE tx = ?",
                (reason[:500], time.time(), tx))
            cur = self.db.execute("DELETE FROM msg WHERE tx = ?", (tx,))
            self._commit()
        except BaseException:
            self._rollback()
            raise
        self._count -= cur.rowcount
        return cur.rowcount

    # -- lookups -----------------------------------------------------------------------------
    def count(self, cp: str | None = None) -> int:
        if cp is None:
            return self._count
        return int(self.db.execute("SELECT COUNT(*) FROM msg WHERE cp = ?", (cp,)).fetchone()[0])

    def dead_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM dead").fetchone()[0])

    _TX_COLS = ("tx, cp, evse_id, version, local_id, backend_id, id_tag, meter_start, meter_last, started, stopped, "
                "seq_no, last_ts, local_seq, last_digest")

    def tx(self, tx: str) -> TxRow | None:
        cached = self._rows.get(tx)
        if cached is not None:
            return cached
        row = self.db.execute(f"SELECT {self._TX_COLS} FROM tx WHERE tx = ?", (tx,)).fetchone()
        if row is None:
            return None
        found = TxRow(*row)
        self._remember(found)
        return found

    def _remember(self, row: TxRow) -> None:
        if self.db.in_transaction:  # not committed yet: a rollback would leave the entry wrong
            return
        if len(self._rows) >= ROW_CACHE_MAX:
            self._rows.clear()
            self._by_local.clear()
        self._rows[row.tx] = row
        if row.local_id is not None:
            self._by_local.setdefault((row.evse_id, row.local_id), row.tx)

    def tx_by_local(self, evse_id: str, local_id: str) -> TxRow | None:
        key = self._by_local.get((evse_id, local_id))
        if key is not None:
            hit = self.tx(key)
            if hit is not None and hit.evse_id == evse_id and hit.local_id == local_id:
                return hit
        row = self.db.execute(f"SELECT {self._TX_COLS} FROM tx WHERE evse_id = ? AND local_id = ? "
                              "ORDER BY rowid DESC LIMIT 1", (evse_id, local_id)).fetchone()
        if row is None:
            return None
        found = TxRow(*row)
        if not self.db.in_transaction:
            self._by_local[(evse_id, local_id)] = found.tx  # the newest (ORDER BY rowid DESC)
            self._remember(found)
        return found

    def tx_by_local_any(self, evse_ids: list[str], local_id: str) -> TxRow | None:
        if not evse_ids:
            return None
        marks = ",".join("?" * len(evse_ids))
        row = self.db.execute(f"SELECT {self._TX_COLS} FROM tx WHERE local_id = ? AND evse_id IN ({marks}) "
                              "ORDER BY rowid DESC LIMIT 1", (local_id, *evse_ids)).fetchone()
        return TxRow(*row) if row else None

    def tx_by_backend(self, cp: str, backend_id: str) -> TxRow | None:
        row = self.db.execute(f"SELECT {self._TX_COLS} FROM tx WHERE cp = ? AND backend_id = ? "
                              "ORDER BY rowid DESC LIMIT 1", (cp, backend_id)).fetchone()
        return TxRow(*row) if row else None

    def open_tx(self, evse_id: str) -> TxRow | None:
        row = self.db.execute(f"SELECT {self._TX_COLS} FROM tx WHERE evse_id = ? AND stopped IS NULL "
                              "ORDER BY rowid DESC LIMIT 1", (evse_id,)).fetchone()
        return TxRow(*row) if row else None

    def prune(self, keep_days: float = 60.0) -> None:
        """Forget finished transactions whose messages are all delivered (id mapping no longer needed)."""
        cutoff = time.time() - keep_days * 86400
        self._rows.clear()
        self._by_local.clear()
        self._sync_level("FULL")
        self.db.execute(
            "DELETE FROM tx WHERE stopped IS NOT NULL AND stopped < ? "
            "AND NOT EXISTS (SELECT 1 FROM msg WHERE msg.tx = tx.tx)",
            (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(cutoff)),))


def fill_transaction_id(data: Any, backend_id: str) -> Any:
    """Replace the placeholder with the backend's (integer, in 1.6) transaction id."""
    value: Any = int(backend_id) if backend_id.lstrip("-").isdigit() else backend_id
    if isinstance(data, dict):
        return {k: (value if v == TX_ID_PLACEHOLDER else fill_transaction_id(v, backend_id)) for k, v in data.items()}
    if isinstance(data, list):
        return [fill_transaction_id(v, backend_id) for v in data]
    return data
