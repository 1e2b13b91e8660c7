"""Every file holding a secret or personal data is 0600 (its folder 0700), copies, temporary and side files
included, whatever the umask: each test runs a real write path under umask 0o022 (what most systems have) and
looks at the modes on disk."""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from chargegate import record as rec
from chargegate.broker import LocalBroker, account_password, free_port, secrets_dir, write_broker_files
from chargegate.config.store import AuditLog
from chargegate.runner import Proc
from conftest import make_config


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def modes(paths: list[Path]) -> dict[str, str]:
    return {p.name: oct(mode(p)) for p in paths}


@pytest.fixture(autouse=True)
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def no_temporaries(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if ".tmp" in p.name], list(folder.rglob("*"))


def test_broker_password_acl_configuration_secrets_and_log(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    out = tmp_path / "broker-files"
    out.mkdir()
    (out / "acl").write_text("left by an older version, 0644")
    write_broker_files(cfg, out, port=free_port(), persistence=False)
    files = [out / "passwd", out / "acl", out / "mosquitto.conf"]
    assert all(mode(f) == 0o600 for f in files), modes(files)
    account_password(cfg, "observer")  # generated once into state_dir/broker/secrets
    sdir = secrets_dir(cfg)
    secrets = list(sdir.iterdir())
    assert mode(sdir) == 0o700 and secrets and all(mode(f) == 0o600 for f in secrets), modes(secrets)
    no_temporaries(out)
    # the broker's log names clients and their addresses
    broker = LocalBroker.prepare(cfg, port=free_port(), persistence=False)
    broker.start()
    try:
        assert broker.log_file is not None and mode(broker.log_file) == 0o600
    finally:
        broker.discard()


def test_history_database_and_its_wal_left_wider_by_an_older_version(tmp_path: Path) -> None:
    """A record written before the database was private (0644, and a -wal left by a crash) is narrowed when
    the history service opens it; a new one is 0600 with its -wal/-shm."""
    old = tmp_path / "old"
    old.mkdir()
    db = old / "history.db"
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("CREATE TABLE t (x)")
    writer.execute("INSERT INTO t VALUES (1)")
    crashed = tmp_path / "history"
    crashed.mkdir()
    for f in old.iterdir():  # what a kill -9 leaves: the database and its non-empty -wal, 0644
        shutil.copy(f, crashed / f.name)
    writer.close()
    assert (crashed / "history.db-wal").stat().st_size > 0 and mode(crashed / "history.db-wal") == 0o644
    conn = rec.open_db(crashed / "history.db")
    try:
        files = [f for f in crashed.iterdir() if f.name.startswith("history.db")]
        assert {f.name for f in files} >= {"history.db", "history.db-wal", "history.db-shm"}
        assert all(mode(f) == 0o600 for f in files), modes(files)
    finally:
        conn.close()
    fresh = tmp_path / "fresh" / "history.db"
    conn = rec.open_db(fresh)
    try:
        files = [f for f in fresh.parent.iterdir()]
        assert len(files) == 3 and all(mode(f) == 0o600 for f in files), modes(files)
        assert mode(fresh.parent) == 0o700
    finally:
        conn.close()


def test_ocpp_queue_side_files_left_wider(tmp_path: Path) -> None:
    from ocpp_gateway.txqueue import TxQueue

    path = tmp_path / "q.sqlite"
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("CREATE TABLE t (x)")
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for f in tmp_path.iterdir():
        if f.is_file():
            shutil.copy(f, crashed / f.name)
    writer.close()
    TxQueue(crashed / "q.sqlite")
    files = list(crashed.iterdir())
    assert any(f.name.endswith("-wal") for f in files) and all(mode(f) == 0o600 for f in files), modes(files)


def test_audit_log_left_wider_is_narrowed(tmp_path: Path) -> None:
    path = tmp_path / "admin" / "audit.jsonl"
    path.parent.mkdir()
    path.write_text("")
    assert mode(path) == 0o644
    AuditLog(path).record("alice", "admin", "PUT config", "config", "accepted")
    assert mode(path) == 0o600
    fresh = tmp_path / "new-admin" / "audit.jsonl"
    AuditLog(fresh).record("alice", "admin", "PUT config", "config", "accepted")
    assert mode(fresh) == 0o600 and mode(fresh.parent) == 0o700


def test_certificate_store_every_file(tmp_path: Path) -> None:
    from smgw_link.certstore import CertStore
    from smgw_link.pki import make_pki

    pki = make_pki(tmp_path / "pki", "P-256")
    assert all(mode(k) == 0o600 for k in pki.dir.glob("*.key")), modes(list(pki.dir.glob("*.key")))
    root = tmp_path / "certs"
    root.mkdir(mode=0o755)
    store = CertStore(root)
    store.import_pem("cls", pki.client_cert, pki.client_key)
    store.select("cls")
    store.request("next", "cls-device-2", "P-256")
    files = [root / "selected", root / "cls" / "cert.pem", root / "cls" / "key.pem", root / "next" / "key.pem",
             root / "next" / "request.csr"]
    assert all(mode(f) == 0o600 for f in files), modes(files)
    dirs = [root, root / "cls", root / "next"]
    assert all(mode(d) == 0o700 for d in dirs), modes(dirs)
    no_temporaries(root)


def test_smgw_link_state_files(tmp_path: Path) -> None:
    """The operator's limits and schedule, the certificate switch-over state (who switched) and the demo
    operator's record of every message."""
    from datetime import UTC, datetime

    from smgw_link.admin.certs import Switcher
    from smgw_link.certstore import CertStore
    from smgw_link.control import OperatorControl
    from smgw_link.demo import Recorder

    cfg = make_config(tmp_path)
    state = tmp_path / "state" / "smgw"
    oc = OperatorControl.load(cfg.smgw, state / "operator.json", datetime.now(UTC))
    oc.set_limit(4200, True, 60, datetime.now(UTC), message_id="m1")
    oc.save()
    sw = Switcher(lambda: CertStore(tmp_path / "certs"), lambda: None, lambda r, t, d: None,
                  lambda: state / "cert-switch.json")
    sw._save()
    r = Recorder(tmp_path / "demo" / "operator-record.jsonl")
    r.write("out", "mqtt", msg={"x": 1})
    r.close()
    files = [state / "operator.json", state / "cert-switch.json", tmp_path / "demo" / "operator-record.jsonl"]
    assert all(mode(f) == 0o600 for f in files), modes(files)
    no_temporaries(state)


def test_service_logs_and_poller_state(tmp_path: Path) -> None:
    from evse_poller.poller import Poller

    proc = Proc("x", [sys.executable, "-c", "print('a log line')"], logfile=tmp_path / "logs" / "x.log")
    proc.start()
    assert proc.popen is not None and proc.popen.wait(10) == 0
    assert mode(tmp_path / "logs" / "x.log") == 0o600 and mode(tmp_path / "logs") == 0o700
    cfg = make_config(tmp_path)
    poller = Poller(cfg, publisher=None, state_dir=tmp_path / "state")  # type: ignore[arg-type]
    poller._save_controls()
    assert mode(tmp_path / "state" / "evse-poller" / "control.json") == 0o600


def test_cli_history_export_and_demo_configuration(tmp_path: Path) -> None:
    from chargegate.demo import write_demo_config
    from history.cli import register

    cfg = make_config(tmp_path)
    rec.open_db(cfg.history.db_path(cfg.state_dir)).close()
    ap = argparse.ArgumentParser()
    register(ap.add_subparsers(dest="command"))
    out = tmp_path / "export" / "sessions.csv"
    args = ap.parse_args(["history", "sessions", "--config", str(tmp_path / "chargegate.yaml"), "--out", str(out)])
    assert args.func(args) == 0
    assert "record_id" in out.read_text(encoding="utf-8") and mode(out) == 0o600
    demo_cfg = tmp_path / "demo" / "chargegate.yaml"
    demo_cfg.parent.mkdir()
    write_demo_config(demo_cfg, {"admin": {"tokens": [{"name": "demo", "role": "admin", "token": "demo"}]}})
    assert mode(demo_cfg) == 0o600
