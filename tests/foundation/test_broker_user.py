"""The local broker does not run as root: started by root it runs as ``mosquitto`` (else ``nobody``), with
its files readable by it and by nobody else, and its persistence folder writable by it. The suite's own
broker fixture (tests run as root here) is checked in /proc."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from chargegate.broker import (
    RUNTIME_BASE,
    LocalBroker,
    blocked_on_the_way,
    broker_user,
    free_port,
    placement,
    render_conf,
)
from conftest import BrokerHandle, make_config

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the broker drops privileges only when started by root")


def test_broker_user_is_chosen_from_the_users_that_exist() -> None:
    everyone = {"mosquitto", "nobody"}.__contains__
    assert broker_user(0, everyone) == "mosquitto"
    assert broker_user(0, {"nobody"}.__contains__) == "nobody"
    assert broker_user(0, lambda name: False) == "root"  # nothing else to run as: said so, not silently
    assert broker_user(1000, everyone) is None  # not root: the broker runs as whoever starts it
    conf = render_conf(port=1883, listen="127.0.0.1", password_file="/x/passwd", acl_file="/x/acl",
                       persistence_dir="/x/data", run_as=broker_user(0, everyone))
    assert "user mosquitto" in conf.splitlines() and "user root" not in conf
    conf = render_conf(port=1883, listen="127.0.0.1", password_file="/x/passwd", acl_file="/x/acl",
                       persistence_dir=None, run_as=broker_user(1000, everyone))
    assert not [line for line in conf.splitlines() if line.startswith("user ")]


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder every user may enter (what /var/lib/chargegate or /opt/... usually are)."""
    d = Path(tempfile.mkdtemp(prefix="cg-broker-user-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_a_closed_folder_on_the_way_is_found(open_dir: Path) -> None:
    closed = open_dir / "closed"
    (closed / "inner").mkdir(parents=True)
    os.chmod(closed, 0o700)
    os.chmod(closed / "inner", 0o755)
    st = closed.stat()
    stranger = st.st_uid + 4242
    assert blocked_on_the_way(closed / "inner", stranger, set()) == closed
    os.chmod(closed, 0o750)
    assert blocked_on_the_way(closed / "inner", stranger, {st.st_gid}) is None  # through its group
    assert blocked_on_the_way(closed / "inner", stranger, set()) == closed
    os.chmod(closed, 0o711)
    assert blocked_on_the_way(closed / "inner", stranger, set()) is None


def proc_uids(pid: int) -> set[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return {int(x) for x in line.split()[1:]}
    raise AssertionError("no Uid line")


def owner_mode(path: Path) -> tuple[str, str, int]:
    st = path.stat()
    return pwd.getpwuid(st.st_uid).pw_name, str(st.st_gid), stat.S_IMODE(st.st_mode)


def check_files(folder: Path, user: str) -> None:
    pw = pwd.getpwnam(user)
    gid = str(pw.pw_gid)
    for name in ("passwd", "acl", "mosquitto.conf"):
        assert owner_mode(folder / name) == (user, gid, 0o600), (name, owner_mode(folder / name))
    assert owner_mode(folder / "data") == (user, gid, 0o700)
    assert owner_mode(folder) == ("root", gid, 0o750)
    assert f"user {user}" in (folder / "mosquitto.conf").read_text().splitlines()


def retained_roundtrip(port: int, password: str, topic: str, payload: bytes | None) -> bytes | None:
    """Publish ``payload`` retained (when given), or read what is retained on ``topic``, as account sim."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bu-{time.monotonic_ns()}")
    c.username_pw_set("sim", password)
    got: dict[str, bytes] = {}
    ready, received = threading.Event(), threading.Event()
    c.on_connect = lambda cl, u, f, rc, p: ready.set()
    c.on_message = lambda cl, u, m: (got.setdefault("m", m.payload), received.set())
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        assert ready.wait(5)
        if payload is not None:
            c.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
            return None
        c.subscribe(topic, qos=1)
        return got["m"] if received.wait(5) else None
    finally:
        c.loop_stop()
        c.disconnect()


@as_root
def test_the_suites_broker_runs_unprivileged_and_keeps_retained_messages(broker: BrokerHandle) -> None:
    """tmp folders of pytest are 0700 (root's): the broker's files are under /run/chargegate then."""
    user = broker_user()
    assert user in ("mosquitto", "nobody")
    proc = broker.broker.proc
    assert proc is not None and proc.poll() is None
    assert proc_uids(proc.pid) == {pwd.getpwnam(user).pw_uid}, Path(f"/proc/{proc.pid}/status").read_text()
    folder = broker.broker.conf.parent
    assert folder == broker.broker.runtime_dir and folder.parent == RUNTIME_BASE
    check_files(folder, user)
    # its persistence folder is writable for it: a retained message survives a restart of the broker
    topic = f"{broker.config.site.topic_root}/sim/bu/draw"
    pw = broker.password("sim")
    retained_roundtrip(broker.port, pw, topic, b"kept")
    broker.restart()
    assert proc_uids(broker.broker.proc.pid) == {pwd.getpwnam(user).pw_uid}  # type: ignore[union-attr]
    assert retained_roundtrip(broker.port, pw, topic, None) == b"kept"
    assert list((folder / "data").iterdir())
    # nothing of it is readable by others; the account passwords stay root's alone
    secrets = broker.config.state_dir / "broker" / "secrets"
    assert owner_mode(secrets)[0] == "root" and owner_mode(secrets)[2] == 0o700
    assert not [f for f in folder.rglob("*") if f.stat().st_mode & 0o007]


@as_root
def test_a_reachable_state_dir_keeps_the_broker_files(open_dir: Path) -> None:
    cfg = make_config(open_dir)
    user = broker_user()
    assert user is not None
    place = placement(cfg)
    assert place.dir == cfg.state_dir / "broker" and place.user == user and place.note is None
    assert placement(cfg, euid=1000).user is None  # not root: as it was
    b = LocalBroker.prepare(cfg, port=free_port(), persistence=True)
    b.start()
    try:
        assert b.runtime_dir is None and b.conf.parent == cfg.state_dir / "broker"
        assert b.proc is not None and proc_uids(b.proc.pid) == {pwd.getpwnam(user).pw_uid}
        check_files(cfg.state_dir / "broker", user)
        assert b.log_file is not None and owner_mode(b.log_file) == ("root", "0", 0o600)
    finally:
        b.discard()
