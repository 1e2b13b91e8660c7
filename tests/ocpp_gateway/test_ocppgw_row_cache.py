"""TxQueue keeps the transaction rows it read or wrote in memory (the MeterValues path read one up to four
times): after every kind of write, what tx() / tx_by_local() return equals what a fresh SELECT says."""

from __future__ import annotations

from pathlib import Path

from ocpp_gateway.txqueue import TxQueue, TxRow


def _fresh(q: TxQueue, tx: str) -> TxRow | None:
    row = q.db.execute(f"SELECT {q._TX_COLS} FROM tx WHERE tx = ?", (tx,)).fetchone()
    return TxRow(*row) if row else None


def test_cached_rows_equal_the_database_after_every_write(tmp_path: Path) -> None:
    q = TxQueue(tmp_path / "q.sqlite")
    try:
        tx = q.begin_tx(cp="cp", evse_id="e", version="1.6", action="StartTransaction",
                        payload={"connectorId": 1, "idTag": "T", "meterStart": 0, "timestamp": "2026-01-01T00:00:00Z"},
                        id_tag="T", meter_start=0, started="2026-01-01T00:00:00Z", local_id="7")

        def check() -> None:
            assert q.tx(tx) == _fresh(q, tx)
            assert q.tx_by_local("e", "7") == _fresh(q, tx)

        check()
        assert q.tx(tx) is q.tx(tx)  # served from memory
        q.add(tx, "update", "MeterValues", {"connectorId": 1}, meter=12.5, last_ts="2026-01-01T00:01:00Z", local_seq=3)
        check()
        q.add(tx, "update", "MeterValues", {"connectorId": 1})  # nothing of the row changes
        check()
        q.add(tx, "update", "MeterValues", {"connectorId": 1}, digest="d1")
        check()
        assert q.tx(tx).last_digest == "d1"  # type: ignore[union-attr]
        q.add_seq_only(tx, 9)
        check()
        assert q.next_seq_no(tx) == 0
        check()
        head = q.head("cp")
        assert head is not None
        q.delivered(head.seq, backend_id="42", id_status="Accepted")
        check()
        assert q.tx(tx).backend_id == "42"  # type: ignore[union-attr]
        q.add(tx, "stop", "StopTransaction", {"transactionId": 42}, meter=20.0, stopped="2026-01-01T00:05:00Z")
        check()
        q.mark_stopped(tx, "2026-01-01T00:06:00Z")
        check()
        # a newer transaction with the same local id (a 2.0.1 wallbox's id reused) is the one tx_by_local finds
        tx2 = q.begin_tx(cp="cp", evse_id="e", version="2.0.1", action="TransactionEvent", payload={"x": 1},
                         id_tag="T", meter_start=0, started="2026-01-02T00:00:00Z", local_id="7")
        assert q.tx_by_local("e", "7") == _fresh(q, tx2) and q.tx_by_local("e", "7").tx == tx2  # type: ignore[union-attr]
        # a failed add (unknown transaction) leaves nothing cached
        try:
            q.add("nope", "update", "MeterValues", {})
        except KeyError:
            pass
        assert q.tx("nope") is None
        q.prune(keep_days=-1)  # forgets finished transactions whose messages are delivered
        assert q.tx(tx) == _fresh(q, tx)
    finally:
        q.close()


def test_a_rolled_back_add_leaves_the_cached_row_as_stored(tmp_path: Path) -> None:
    q = TxQueue(tmp_path / "q.sqlite")
    try:
        tx = q.begin_tx(cp="cp", evse_id="e", version="1.6", action="StartTransaction", payload={},
                        id_tag="T", meter_start=0, started="2026-01-01T00:00:00Z", local_id="1")
        before = q.tx(tx)

        class Bad:  # not JSON: the insert fails inside the transaction
            pass

        try:
            q.add(tx, "update", "MeterValues", {"x": Bad()}, meter=99.0)
        except TypeError:
            pass
        assert q.tx(tx) == _fresh(q, tx) == before
    finally:
        q.close()


def test_the_last_digest_survives_a_restart_and_an_older_file_gets_the_column(tmp_path: Path) -> None:
    """The repeat check of a 1.6 MeterValues (local.meter_values_digest) rests on the digest being stored with
    the message in one commit; a queue file of a version without the column is upgraded, its rows kept."""
    import sqlite3

    old = tmp_path / "old.sqlite"
    q = TxQueue(old)
    tx = q.begin_tx(cp="cp", evse_id="e", version="1.6", action="StartTransaction", payload={},
                    id_tag="T", meter_start=0, started="2026-01-01T00:00:00Z", local_id="1")
    q.close()
    db = sqlite3.connect(old)
    db.execute("ALTER TABLE tx DROP COLUMN last_digest")  # as the file of an older version
    db.commit()
    db.close()
    q = TxQueue(old)
    try:
        assert q.tx(tx) is not None and q.tx(tx).last_digest is None  # type: ignore[union-attr]
        q.add(tx, "update", "MeterValues", {"connectorId": 1}, digest="abc")
    finally:
        q.close()
    q = TxQueue(old)
    try:
        assert q.tx(tx).last_digest == "abc"  # type: ignore[union-attr]
        assert q.count("cp") == 2
    finally:
        q.close()
