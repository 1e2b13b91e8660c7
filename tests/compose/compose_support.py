"""A container engine of the test's own and the compose stack on it (tests/compose/test_stack.py).

:class:`Engine` starts Debian's ``dockerd`` as root with its own ``--host`` socket, ``--pidfile`` and
``--exec-root`` in a temporary folder and its ``--data-root`` in the cache (``CHARGEGATE_DOCKER_CACHE``,
default ``$XDG_CACHE_HOME/chargegate/docker`` or ``~/.cache/chargegate/docker``), so that images and
the build cache persist between runs and between clones on the same machine. It runs without iptables
rules and without the default bridge (``--iptables=false --bridge=none``): compose makes its own bridge
network, on which the containers reach each other by name, and published ports are forwarded by the
engine's userland proxy. One run at a time uses the data root (a lock file beside it); it is stopped
by its PID. :func:`engine_problem` says why no engine can be started (the test is then skipped with
that reason)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("CHARGEGATE_DOCKER_CACHE")
             or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "chargegate" / "docker")
LOCK_WAIT_S = 180.0  # another test run's engine on the same data root


def compose_command() -> list[str] | None:
    """``docker compose`` (v2 plugin) where installed, else Debian 12's ``docker-compose`` (1.29)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def engine_problem() -> str | None:
    if os.geteuid() != 0:
        return "the container engine needs root (dockerd, debootstrap)"
    missing = [t for t in ("dockerd", "docker", "debootstrap") if shutil.which(t) is None]
    if compose_command() is None:
        missing.append("docker-compose")
    if missing:
        return (f"{', '.join(missing)} not installed (`make docker` or "
                "`apt-get install docker.io docker-compose debootstrap` as root)")
    return None


class EngineError(RuntimeError):
    pass


class Engine:
    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="cg-dockerd-", dir="/tmp"))  # short: socket path limits
        self.sock = self.tmp / "docker.sock"
        self.pidfile = self.tmp / "docker.pid"
        self.log = self.tmp / "dockerd.log"
        self.data_root = CACHE / "engine"
        self.host = f"unix://{self.sock}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock: Any = None

    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host}

    def docker(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["docker", *args], env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise EngineError(f"docker {' '.join(args)}: exit {r.returncode}\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
        return r

    def _take_lock(self) -> None:
        CACHE.mkdir(parents=True, exist_ok=True)
        self._lock = open(CACHE / "engine.lock", "w")
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EngineError(f"another test run's engine has used {self.data_root} for over "
                                      f"{LOCK_WAIT_S:.0f} s ({CACHE / 'engine.lock'})") from None
                time.sleep(1)
        # an engine left running by a run that died holds the data root: stop it (we hold the lock)
        stale = CACHE / "engine.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(stale.read_text())
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if cmd and cmd[0].endswith(b"dockerd") and str(self.data_root).encode() in cmd:
                _stop_pid(pid)

    def start(self) -> None:
        self._take_lock()
        self.data_root.mkdir(parents=True, exist_ok=True)
        argv = ["dockerd", "--data-root", str(self.data_root), "--host", self.host, "--pidfile", str(self.pidfile),
                "--exec-root", str(self.tmp / "exec"), "--iptables=false", "--bridge=none", "--log-level=warn"]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        (CACHE / "engine.pid").write_text(str(self.proc.pid))
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise EngineError(f"dockerd exited with {self.proc.returncode}: {self.log_tail()}")
            if self.sock.exists() and self.docker("version", check=False, timeout=10).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise EngineError(f"dockerd did not answer on {self.sock} within 30 s: {self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        try:
            pid = int(self.pidfile.read_text()) if self.pidfile.exists() else (self.proc.pid if self.proc else None)
            if pid is not None:
                _stop_pid(pid)
            if self.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
            with contextlib.suppress(OSError):
                (CACHE / "engine.pid").unlink()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if self._lock is not None:
                self._lock.close()


def _stop_pid(pid: int, timeout: float = 30) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            # a zombie of ours (Popen not yet waited for) counts as gone
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                    return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)


class Watcher:
    """An MQTT client on the host's published broker port: the latest payload per topic and every
    message in order (JSON parsed; a payload that is not JSON is kept as bytes)."""

    def __init__(self, port: int, account: str, password: str, root: str = "chargegate") -> None:
        self.lock = threading.Lock()
        self.latest: dict[str, Any] = {}
        self.seen: list[tuple[float, str, Any]] = []
        self.connects = 0
        self.refused: list[str] = []
        self.root = root
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"compose-test-{account}-{os.getpid()}")
        self.client.username_pw_set(account, password)
        self.client.reconnect_delay_set(0.2, 1.0)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def _on_connect(self, c: mqtt.Client, u: object, f: object, rc: mqtt.ReasonCode, p: object) -> None:
        if rc.is_failure:
            self.refused.append(str(rc))
            return
        self.connects += 1
        c.subscribe(f"{self.root}/#", qos=1)

    def _on_message(self, c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        try:
            payload: Any = json.loads(m.payload)
        except ValueError:
            payload = bytes(m.payload)
        rel = m.topic.removeprefix(self.root + "/")
        with self.lock:
            self.latest[rel] = payload
            self.seen.append((time.time(), rel, payload))

    def get(self, rel: str) -> Any:
        with self.lock:
            return self.latest.get(rel)

    def since(self, t: float, rel: str) -> list[Any]:
        with self.lock:
            return [p for ts, r, p in self.seen if ts >= t and r == rel]

    def find(self, t: float, rel: str, pred: Callable[[Any], bool]) -> Any:
        return next((p for p in self.since(t, rel) if isinstance(p, dict) and pred(p)), None)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def publish(port: int, account: str, password: str, topic: str, payload: bytes, qos: int = 1) -> None:
    """One message from the host as ``account`` (waits for the broker's PUBACK)."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"compose-pub-{account}-{time.monotonic_ns()}")
    c.username_pw_set(account, password)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        c.publish(topic, payload, qos=qos).wait_for_publish(5)
    finally:
        c.loop_stop()
        c.disconnect()
