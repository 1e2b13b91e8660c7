"""The demo as a user runs it: messages within 30 s, every service back within 5 s of a broker
restart, and a malformed payload leaves every service running with one clear log line each."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from chargegate.runner import available_services

pytestmark = pytest.mark.system


class Demo:
    def __init__(self, tmp: Path) -> None:
        self.dir = tmp
        self.lines: list[str] = []
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "chargegate.cli", "demo", "--dir", str(tmp),
                                      "--no-status"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = rx.search(line)
                if m:
                    return m
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} in demo output:\n" + "\n".join(self.lines[-40:]))

    def events(self, event: str) -> list[dict[str, object]]:
        out = []
        for line in list(self.lines):
            if line.startswith("{") and f'"{event}"' in line:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
                return -9
        return self.proc.returncode


class Watch:
    """An MQTT explorer: the observer account subscribed to chargegate/#."""

    def __init__(self, port: int, user: str = "observer", password: str = "demo") -> None:
        self.msgs: list[tuple[float, str, bytes]] = []
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{time.monotonic_ns()}")
        self.c.username_pw_set(user, password)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe("chargegate/#", qos=1)
        self.c.on_message = lambda c, u, m: self.msgs.append((time.monotonic(), m.topic, m.payload))
        self.c.reconnect_delay_set(0.1, 0.5)
        self.c.connect_async("127.0.0.1", port)
        self.c.loop_start()

    def health_since(self, t0: float) -> dict[str, str]:
        out: dict[str, str] = {}
        for t, topic, payload in list(self.msgs):
            if t >= t0 and topic.startswith("chargegate/service/") and topic.endswith("/health") and payload:
                out[topic.split("/")[2]] = json.loads(payload)["status"]
        return out

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    d = Demo(tmp_path_factory.mktemp("demo"))
    try:
        yield d
    finally:
        code = d.stop()
        assert code == 0, "demo did not stop cleanly on Ctrl-C:\n" + "\n".join(d.lines[-30:])


def test_demo_messages_broker_restart_and_bad_input(demo: Demo) -> None:
    services = set(available_services())
    port = int(demo.wait_line(r"broker:\s+127\.0\.0\.1:(\d+)", 30).group(1))
    t_start = time.monotonic()
    watch = Watch(port)
    try:
        # 1. messages under chargegate/# within 30 s, and every service online
        while time.monotonic() - t_start < 30 and set(watch.health_since(0)) != services:
            time.sleep(0.1)
        assert watch.msgs, "no messages under chargegate/# within 30 s"
        assert all(v == "online" for v in watch.health_since(0).values())
        assert set(watch.health_since(0)) == services

        # 2. kill the broker: the supervisor restarts it and every service is back within 5 s
        broker_pid = int(demo.events("broker started")[-1]["pid"])  # type: ignore[call-overload]
        os.kill(broker_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(demo.events("broker started")) < 2:
            time.sleep(0.05)
        assert len(demo.events("broker started")) >= 2, "the broker was not restarted"
        t_up = time.monotonic()
        while time.monotonic() - t_up < 5 and set(watch.health_since(t_up)) != services:
            time.sleep(0.05)
        back = watch.health_since(t_up)
        assert set(back) == services and all(v == "online" for v in back.values()), back
        print(f"services back {time.monotonic() - t_up:.2f} s after the broker restarted")

        # 3. a malformed payload on a topic every service reads: all stay up, one log line each
        secret = (demo.dir / "state" / "broker" / "secrets" / "evse-poller").read_text().strip()
        bad = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bad-input")
        bad.username_pw_set("evse-poller", secret)
        bad.connect("127.0.0.1", port)
        bad.loop_start()
        exits_before = len(demo.events("process exited, restarting"))
        bad.publish("chargegate/evse/alfen/status", b'{"evse_id": "alfen", "online": "perhaps", "state": "charging"}',
                    qos=1).wait_for_publish(5)
        time.sleep(3)  # give every service time to (not) crash
        bad.loop_stop()
        bad.disconnect()
        assert len(demo.events("process exited, restarting")) == exits_before
        hits = {}
        for svc in services:
            log = (demo.dir / "logs" / f"{svc}.log").read_text()
            hits[svc] = [line for line in log.splitlines()
                         if "invalid message dropped" in line and "chargegate/evse/alfen/status" in line]
        print({k: len(v) for k, v in hits.items()})
        assert all(len(v) <= 1 for v in hits.values()), hits  # one clear line, not one per cycle
        assert sum(len(v) for v in hits.values()) >= 2  # the services that read EVSE status said so
        line = json.loads(next(v[0] for v in hits.values() if v))
        assert "online" in line["error"] and line["level"] == "warning"
    finally:
        watch.close()
