"""The relay path's shortcuts (issue 19): the queue sets ``PRAGMA synchronous`` only when it changes, so every
commit must still run at the level it needs (FULL for everything but a deferred commit and a delivered
message's delete); head() remembers empty queues; a queued message goes out as its stored text, byte for byte
the frame the payload would have been encoded to."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from ocpp_gateway.rpc import OcppRpc
from ocpp_gateway.txqueue import TxQueue

START = {"connectorId": 1, "idTag": "T", "meterStart": 0, "timestamp": "2026-01-01T00:00:00Z"}


def _meter(wh: int) -> dict[str, Any]:
    return {"connectorId": 1, "transactionId": 1, "meterValue": [
        {"timestamp": "2026-01-01T00:00:01Z", "sampledValue": [{"value": str(wh), "unit": "Wh"}]}]}


class Levels:
    """SQLite's view, from the statements it runs: the synchronous level in force at every commit (an explicit
    COMMIT, or a write statement outside a transaction, which commits itself)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.level = db.execute("PRAGMA synchronous").fetchone()[0]  # 2 = FULL, 1 = NORMAL
        self.commits: list[tuple[str, int]] = []
        self.in_tx = False
        db.set_trace_callback(self._trace)

    def _trace(self, sql: str) -> None:
        s = sql.strip().upper()
        if s.startswith("PRAGMA SYNCHRONOUS="):
            self.level = {"FULL": 2, "NORMAL": 1}[s.split("=")[1]]
        elif s.startswith("BEGIN"):
            self.in_tx = True
        elif s.startswith(("COMMIT", "ROLLBACK")):
            self.in_tx = False
            if s.startswith("COMMIT"):
                self.commits.append((sql, self.level))
        elif s.startswith(("INSERT", "UPDATE", "DELETE")) and not self.in_tx:
            self.commits.append((sql, self.level))

    def take(self) -> list[int]:
        out = [lvl for _, lvl in self.commits]
        self.commits.clear()
        return out


async def test_every_commit_runs_at_the_level_it_needs(tmp_path: Path) -> None:
    q = TxQueue(tmp_path / "q.sqlite")
    try:
        lv = Levels(q.db)
        tx = q.begin_tx(cp="cp", evse_id="e", version="1.6", action="StartTransaction", payload=START, id_tag="T",
                        meter_start=0, started="2026-01-01T00:00:00Z", local_id="1")
        assert lv.take() == [2]  # the start: FULL
        head = q.head("cp")
        assert head is not None
        q.delivered(head.seq, backend_id="7", id_status="Accepted")
        assert lv.take() == [1]  # a delete: NORMAL (a power cut can at worst bring it back)
        for wh in (1, 2):
            with q.deferred_sync() as ticket:
                q.add(tx, "update", "MeterValues", _meter(wh), meter=float(wh))
            assert ticket.written
            assert lv.take() == [1]  # deferred: NORMAL, the fsync follows in sync()
            await q.sync(ticket.upto)
            head = q.head("cp")
            assert head is not None
            q.delivered(head.seq)
            assert lv.take() == [1]
        # after a NORMAL commit, every other write is FULL again (the level is not left behind)
        wh = 10

        def normal() -> None:
            nonlocal wh
            wh += 1
            with q.deferred_sync():
                q.add(tx, "update", "MeterValues", _meter(wh), meter=float(wh))
            assert lv.take() == [1]

        normal()
        q.set_kv("k", "v")
        assert lv.take() == [2]
        normal()
        q.add(tx, "update", "MeterValues", _meter(4), meter=4.0)  # not deferred: FULL
        assert lv.take() == [2]
        normal()
        q.add_seq_only(tx, 3)
        assert lv.take() == [2]
        normal()
        head = q.head("cp")
        assert head is not None
        assert q.failed(head.seq, "GenericError: x", 1.0) is False
        assert lv.take() == [2]  # the retry count: FULL
        normal()
        q.mark_stopped(tx, "2026-01-01T00:05:00Z")
        assert lv.take() == [2]
        normal()
        assert q.next_local_id() == 1
        assert lv.take() == [2]
        normal()
        q.prune(keep_days=-1)
        assert lv.take() == [2]
        normal()
        assert q.next_seq_no(tx) == 0
        assert lv.take() == [2]
        await q.sync()
        # what SQLite itself says after the last FULL write
        assert q.db.execute("PRAGMA synchronous").fetchone()[0] == 2
    finally:
        q.close()


def test_head_knows_empty_queues_and_sees_every_new_message(tmp_path: Path) -> None:
    q = TxQueue(tmp_path / "q.sqlite")
    try:
        assert q.head("cp") is None and q.head("other") is None
        tx = q.begin_tx(cp="cp", evse_id="e", version="1.6", action="StartTransaction", payload=START, id_tag="T",
                        meter_start=0, started="2026-01-01T00:00:00Z", local_id="1")
        first = q.head("cp")
        assert first is not None and first.kind == "start"
        assert q.head("other") is None
        q.delivered(first.seq)
        assert q.head("cp") is None  # empty again, remembered
        seq = q.add(tx, "update", "MeterValues", _meter(1))
        nxt = q.head("cp")
        assert nxt is not None and nxt.seq == seq and nxt.payload == _meter(1)
        assert nxt.text == json.dumps(_meter(1), separators=(",", ":"))
        q.delivered(nxt.seq)
        assert q.head("cp") is None
        # an insert rolled back (add failing after its INSERT): no message, and head() reads the table again
        q._begin()
        q._insert("cp", tx, "update", "MeterValues", _meter(2))
        q._rollback()
        assert "cp" not in q._empty and q.head("cp") is None and "cp" in q._empty
        seq = q.add(tx, "stop", "StopTransaction", {"transactionId": 1, "meterStop": 2,
                                                    "timestamp": "2026-01-01T00:05:00Z"})
        stop = q.head("cp")
        assert stop is not None and stop.seq == seq
        # a queue reopened (restart) reads the table
        q.close()
        q = TxQueue(tmp_path / "q.sqlite")
        again = q.head("cp")
        assert again is not None and again.seq == seq
    finally:
        q.close()


class RecWs:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, text: str) -> None:
        self.sent.append(text)


async def test_a_stored_payload_goes_out_as_the_frame_it_would_have_been_encoded_to() -> None:
    payload = {"connectorId": 1, "transactionId": 12, "meterValue": [{"timestamp": "2026-01-01T00:00:01Z",
               "sampledValue": [{"value": "1.50", "unit": "kWh", "measurand": "Energy.Active.Import.Register",
                                 "context": "Sample.Periodic"},
                                {"value": "Gr\u00fc\u00dfe \"x\" \\ \u2603", "format": "SignedData"}]}]}
    text = json.dumps(payload, separators=(",", ":"))
    frames: dict[str, str] = {}
    for mode in ("dict", "text"):
        ws = RecWs()
        rpc = OcppRpc(ws, "1.6", "cp", None, call_timeout=0.05)
        try:
            await rpc.call("MeterValues", json.loads(text), unique_id='id-"1"',
                           payload_text=text if mode == "text" else None)
        except TimeoutError:
            pass  # nobody answers: only the frame sent matters here
        frames[mode] = ws.sent[0]
    assert frames["text"] == frames["dict"]
    assert json.loads(frames["text"]) == [2, 'id-"1"', "MeterValues", payload]
