"""The transaction queue's sync thread (TxQueue.deferred_sync / sync): the fsync starts at the commit, before
anybody awaits it; a failed fsync acknowledges nothing and the next sync tries again; the WAL is checkpointed
by the thread, not on the event loop."""

from __future__ import annotations

import asyncio
import errno
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from ocpp_gateway import txqueue
from ocpp_gateway.txqueue import TxQueue


def _start(q: TxQueue) -> str:
    return q.begin_tx(cp="cp", evse_id="e", version="1.6", action="StartTransaction",
                      payload={"connectorId": 1, "idTag": "T", "meterStart": 0, "timestamp": "2026-01-01T00:00:00Z"},
                      id_tag="T", meter_start=0, started="2026-01-01T00:00:00Z", local_id="1")


def _meter(q: TxQueue, tx: str, wh: int) -> None:
    q.add(tx, "update", "MeterValues", {"connectorId": 1, "transactionId": 1, "meterValue": [
        {"timestamp": "2026-01-01T00:00:01Z", "sampledValue": [{"value": str(wh)}]}]}, meter=float(wh))


async def test_the_fsync_starts_at_the_commit(tmp_path: Path, monkeypatch: Any) -> None:
    q = TxQueue(tmp_path / "q.sqlite")
    tx = _start(q)
    entered, gate = threading.Event(), threading.Event()
    real = TxQueue._fdatasync_wal

    def held(self: TxQueue) -> None:
        entered.set()
        gate.wait(10)
        real(self)

    monkeypatch.setattr(TxQueue, "_fdatasync_wal", held)
    try:
        with q.deferred_sync() as ticket:
            _meter(q, tx, 1)
        assert ticket.written and q.unsynced
        # nobody awaits sync() yet: the thread is in the fsync already
        assert await asyncio.to_thread(entered.wait, 5)
        waiter = asyncio.ensure_future(q.sync())
        await asyncio.sleep(0.1)
        assert not waiter.done() and q.unsynced  # held: not acknowledged
        gate.set()
        await asyncio.wait_for(waiter, 5)
        assert not q.unsynced
    finally:
        gate.set()
        q.close()


async def test_a_failed_fsync_acknowledges_nothing_and_the_next_sync_tries_again(tmp_path: Path,
                                                                                monkeypatch: Any) -> None:
    q = TxQueue(tmp_path / "q.sqlite")
    tx = _start(q)
    calls: list[str] = []
    real = TxQueue._fdatasync_wal

    def failing(self: TxQueue) -> None:
        calls.append("fail")
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(TxQueue, "_fdatasync_wal", failing)
    try:
        with q.deferred_sync():
            _meter(q, tx, 1)
        with pytest.raises(OSError) as e:
            await asyncio.wait_for(q.sync(), 5)
        assert e.value.errno == errno.EIO and q.unsynced
        monkeypatch.setattr(TxQueue, "_fdatasync_wal", lambda self: (calls.append("ok"), real(self)))
        await asyncio.wait_for(q.sync(), 5)  # the same commit, fsynced this time
        assert not q.unsynced and calls[-1] == "ok"
    finally:
        q.close()


async def test_checkpoints_run_in_the_sync_thread(tmp_path: Path, monkeypatch: Any) -> None:
    q = TxQueue(tmp_path / "q.sqlite")
    tx = _start(q)
    threads: list[str] = []
    real = TxQueue._checkpoint

    def seen(self: TxQueue, db: sqlite3.Connection) -> None:
        threads.append(threading.current_thread().name)
        real(self, db)

    monkeypatch.setattr(TxQueue, "_checkpoint", seen)
    try:
        for wh in range(txqueue.CHECKPOINT_EVERY + 5):
            with q.deferred_sync():
                _meter(q, tx, wh)
            await q.sync()
        assert q.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0  # none on the loop's connection
        for _ in range(100):
            if threads:
                break
            await asyncio.sleep(0.02)
        assert threads and set(threads) == {"txqueue-sync"}
        assert q.count("cp") == txqueue.CHECKPOINT_EVERY + 6  # the start and every update, all there
    finally:
        q.close()


async def test_until_durable_waits_for_the_insert_and_a_failed_fsync_keeps_the_message(tmp_path: Path,
                                                                                      monkeypatch: Any) -> None:
    """The delivery loop's guard before a delete (a meter value forwarded while its fsync ran): until_durable
    returns only after the fsync that covers the insert; when that fsync fails it raises (the loop deletes
    nothing, the message stays queued and goes out again with its id) and the next one covers it."""
    q = TxQueue(tmp_path / "q.sqlite")
    tx = _start(q)
    gate = threading.Event()
    real = TxQueue._fdatasync_wal
    mode = {"fail": True}

    def held(self: TxQueue) -> None:
        gate.wait(10)
        if mode["fail"]:
            raise OSError(errno.EIO, "Input/output error")
        real(self)

    monkeypatch.setattr(TxQueue, "_fdatasync_wal", held)
    try:
        assert q.durable_after(1) == 0  # the start: committed synchronous=FULL, on disk at once
        with q.deferred_sync():
            _meter(q, tx, 1)
        head = q.head("cp")
        assert head is not None and head.kind == "start"
        m = q.db.execute("SELECT MAX(seq) FROM msg").fetchone()[0]
        assert q.durable_after(m) > 0
        waiter = asyncio.ensure_future(q.until_durable(m))
        await asyncio.sleep(0.1)
        assert not waiter.done()  # held: the delete would have to wait
        gate.set()
        with pytest.raises(OSError):
            await asyncio.wait_for(waiter, 5)
        assert q.durable_after(m) > 0 and q.count("cp") == 2  # not durable, still queued
        mode["fail"] = False
        await asyncio.wait_for(q.until_durable(m), 5)
        assert q.durable_after(m) == 0
    finally:
        gate.set()
        q.close()
