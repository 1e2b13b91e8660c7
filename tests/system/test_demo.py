"""The demo as a user runs it: messages within 30 s, every service back within 5 s of a broker
restart, and a malformed payload leaves every service running with one clear log line each; the
whole product (every EVSE with status and setpoint and booted at the operator's OCPP backend
through the SMGW, the grid operator's CLS.EEDI limit on grid/limit/dso and in the allocation, the
tariff, a grid meter that sees every car); Ctrl-C stops it with exit 0 and no process left."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from chargegate import record as rec
from chargegate import record_export as rx
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

    def latest(self, topic: str) -> dict[str, Any] | None:
        for _, t, payload in reversed(list(self.msgs)):
            if t == topic:
                return json.loads(payload) if payload else None
        return None

    def payloads(self, topic: str) -> list[tuple[float, dict[str, Any]]]:
        return [(t, json.loads(pl)) for t, tp, pl in list(self.msgs) if tp == topic and pl]

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def _wait(what: str, cond: Any, timeout: float, show: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout} s" + (f"; last seen: {show()}" if show else ""))


def _demo_processes(demo: Demo) -> dict[int, str]:
    """pid -> command line of every live process that belongs to the demo (its directory in argv)."""
    out = {}
    marker = str(demo.dir)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmd and state != "Z":
            out[int(entry.name)] = cmd
    return out


STALE_TAG = "STALE-RUN"  # the idTag of a transaction a previous demo in the same folder left


def _leave_a_previous_run(folder: Path) -> None:
    """What a stopped demo leaves: an open transaction in the backend simulator's record, a log."""
    from ocpp_gateway.backend_sim import Recorder

    rec16 = Recorder(folder / "backend.sqlite")
    rec16.frame("ocpp-1", "1.6", "in", json.dumps([2, "stale-1", "StartTransaction", {
        "connectorId": 1, "idTag": STALE_TAG, "meterStart": 75, "timestamp": "2026-01-01T00:00:00Z"}]))
    rec16.frame("ocpp-1", "1.6", "out", json.dumps([3, "stale-1", {"transactionId": 999,
                                                                   "idTagInfo": {"status": "Accepted"}}]))
    rec16.db.close()
    (folder / "logs").mkdir()
    (folder / "logs" / "ocpp-gateway.log").write_text('{"event": "from the previous run"}\n')


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    folder = tmp_path_factory.mktemp("demo")
    _leave_a_previous_run(folder)
    d = Demo(folder)
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


def test_demo_whole_product(demo: Demo) -> None:
    """Every EVSE has a status and a setpoint and is booted at the operator's backend (reached through
    the SMGW); the operator's LPC limit arrives on grid/limit/dso and the allocation names it; the
    tariff period and the SMGW link are on the bus; the grid meter counts every car, OCPP ones too."""
    port = int(demo.wait_line(r"broker:\s+127\.0\.0\.1:(\d+)", 30).group(1))
    control = int(demo.wait_line(r"curl http://127\.0\.0\.1:(\d+)/status", 5).group(1))
    demo.wait_line(r"SMGW simulator: 127\.0\.0\.1:\d+ \(brainpoolP256r1, TLS 1\.2, SOCKS5", 5)
    # a fresh start: the previous run's backend record and logs are gone, the ports are written down
    demo.wait_line(r"fresh start: removed \d+ files of the previous run", 5)
    ports = json.loads((demo.dir / "ports").read_text())
    assert ports["broker"] == port and ports["ocpp_backend_record"] == control, ports
    assert "from the previous run" not in (demo.dir / "logs" / "ocpp-gateway.log").read_text()
    cfg = yaml.safe_load((demo.dir / "chargegate.yaml").read_text())
    evses = [e["id"] for e in cfg["evses"]]
    assert {"alfen", "webasto", "charx", "ocpp-1"} <= set(evses)
    assert cfg["ocpp"]["backend"]["via_smgw"] and cfg["smgw"]["functions"] == {
        "ocpp_via_smgw": True, "power_reduction": True, "tariffs": True}
    watch = Watch(port)
    try:
        # every EVSE: a status and a setpoint
        _wait("status and setpoint of every EVSE", lambda: all(
            watch.latest(f"chargegate/evse/{e}/status") and watch.latest(f"chargegate/evse/{e}/setpoint")
            for e in evses), 30, lambda: {e: (watch.latest(f"chargegate/evse/{e}/status") or {}).get("state")
                                          for e in evses})
        for e in evses:
            assert watch.latest(f"chargegate/evse/{e}/status")["online"] is True, e  # type: ignore[index]

        # every EVSE booted at the operator's OCPP backend, which it reaches through the SMGW
        def booted() -> set[str]:
            with urllib.request.urlopen(f"http://127.0.0.1:{control}/messages", timeout=5) as r:
                frames = json.load(r)
            return {f["cp"] for f in frames if isinstance(f["msg"], list) and f["msg"][0] == 2
                    and f["msg"][2] == "BootNotification"}
        _wait("BootNotification of every EVSE at the backend", lambda: set(evses) <= booted(), 30, booted)
        with urllib.request.urlopen(f"http://127.0.0.1:{control}/transactions", timeout=5) as r:
            assert not [t for t in json.load(r) if t["id_tag"] == STALE_TAG]  # not continued from the last run
        link = _wait("SMGW link up with the OCPP channel used", lambda: (
            (lk := watch.latest("chargegate/link/smgw")) and lk["state"] == "up"
            and lk["channels"]["operator-ocpp"]["opened"] >= 1 and lk), 20,
            lambda: watch.latest("chargegate/link/smgw"))
        assert link["channels"]["tls"]["version"] == "TLSv1.2" and link["certificate"] == "demo-cls"
        assert link["channels"]["clseedi"]["connected"] is True

        # the grid operator's limit: on grid/limit/dso, and the allocation names it
        dso = _wait("the operator's LPC limit on grid/limit/dso", lambda: (
            (lim := watch.latest("chargegate/grid/limit/dso")) and lim["active"] and lim["power_w"] == 6000
            and lim), 60, lambda: (watch.latest("chargegate/grid/limit/dso"),
                                   (demo.dir / "operator-record.jsonl").read_text()[-3000:]))
        assert dso["id"].startswith("clseedi:") and dso["scope"] == "controllable"

        def names_dso() -> dict[str, Any] | None:
            a = watch.latest("chargegate/controller/allocation")
            if not a:
                return None
            applied = [g for g in a["limits"].get("grid_limits", []) if g.get("source") == "dso"
                       and g.get("power_w") == 6000 and g.get("effective_w") == a["limits"]["floor_14a_w"]]
            # who it binds depends on what charges when it arrives (priorities, minimum pause): an EVSE
            # bound by it, or the controller's warning that it was raised to the §14a floor
            named = [e for e in a["evses"] if e["bound_by"] == "grid_limit:dso"
                     or (e["bound_by"] == "§14a_floor" and "dso" in (e.get("detail") or ""))]
            named += [w for w in a["limits"].get("warnings", []) if "dso limit 6000 W" in w]
            return a if applied and named else None
        alloc = _wait("the allocation bound by the DSO limit", names_dso, 30,
                      lambda: watch.latest("chargegate/controller/allocation"))
        floor = alloc["limits"]["floor_14a_w"]
        # 6 kW is below the §14a floor of the four controllable wallboxes: raised to it, never above
        assert floor > 6000
        total_w = sum(e["current_a"] * (3 if e["phases"] == 3 else 1) * 230 for e in alloc["evses"])
        assert total_w <= floor + 1, (total_w, floor)

        # the operator's record: the limit acknowledged with errorNumber 0, every message schema-valid
        # (the operator's simulator writes what it received every 0.2 s: the limit may be applied before)
        def acked() -> list[dict[str, Any]] | None:
            record = [json.loads(line) for line in (demo.dir / "operator-record.jsonl").read_text().splitlines()]
            sent = [r for r in record if r["dir"] == "out" and r["channel"] == "clseedi"
                    and "limits" in (r.get("msg", {}).get("data") or {})]
            acks = {r["msg"]["relation"]: r["msg"]["data"]["errorNumber"] for r in record
                    if r["dir"] == "in" and r.get("msg", {}).get("type", "").endswith(".ack")}
            return record if sent and sent[-1]["msg"]["id"] in acks else None
        record = _wait("the operator's record of the limit and its ack", acked, 10,
                       lambda: (demo.dir / "operator-record.jsonl").read_text()[-3000:])
        sent = [r for r in record if r["dir"] == "out" and r["channel"] == "clseedi"
                and "limits" in (r.get("msg", {}).get("data") or {})]
        acks = {r["msg"]["relation"]: r["msg"]["data"]["errorNumber"] for r in record
                if r["dir"] == "in" and r.get("msg", {}).get("type", "").endswith(".ack")}
        assert acks[sent[-1]["msg"]["id"]] == 0, (sent, acks)
        assert all(not r["schema_errors"] for r in record if r["dir"] == "in" and r["channel"] == "clseedi")

        # the tariff period announced through the inbound channel
        tariff = _wait("the low tariff period", lambda: (
            (t := watch.latest("chargegate/tariff/current")) and t["period"]["level"] == "low" and t), 30,
            lambda: (watch.latest("chargegate/tariff/current"), watch.latest("chargegate/tariff/schedule")))
        assert tariff["period"]["id"].startswith("demo-low-")

        # the grid meter: house base load (1 A per phase) plus every car, OCPP ones included
        def meter_matches() -> bool:
            reading = watch.latest("chargegate/meter/grid-meter/reading")
            draws = {e: watch.latest(f"chargegate/sim/{e}/draw") for e in evses}
            if not reading or not all(draws.values()):
                return False
            expect = [1.0 + sum(d["grid_current_a"][i] for d in draws.values()) for i in range(3)]  # type: ignore[union-attr]
            return all(abs(a - b) < 0.25 for a, b in zip(reading["current_a"], expect, strict=True))
        assert watch.latest("chargegate/sim/ocpp-1/draw")["source"] == "ocpp-sim"  # type: ignore[index]
        _wait("grid meter = base load + every car's draw", meter_matches, 20, lambda: (
            watch.latest("chargegate/meter/grid-meter/reading"),
            {e: (watch.latest(f"chargegate/sim/{e}/draw") or {}).get("grid_current_a") for e in evses}))

        # the record: the operator's limit and the sessions of Modbus and OCPP wallboxes, as exported
        db = demo.dir / "state" / "history" / "history.db"

        def exported(what: str) -> list[dict[str, Any]]:
            if not db.exists():
                return []
            conn = rec.open_db(db, readonly=True)
            try:
                return json.loads(rx.export(conn, what, fmt="json", style="intl", tz=UTC, currency="EUR"))
            finally:
                conn.close()

        controls = _wait("the DSO limit in the exported control record", lambda: [
            c for c in exported("controls") if c.get("source") == "dso" and c.get("power_w") == 6000], 30,
            lambda: exported("controls")[-5:])
        assert controls[-1]["raised_to_floor"] is True, controls[-1]
        charging = {e for e in evses if (watch.latest(f"chargegate/evse/{e}/status") or {}).get("session")}
        sessions = _wait("a recorded session of every charging EVSE", lambda: (
            (rows := exported("sessions")) and charging <= {r["evse_id"] for r in rows} and rows), 30,
            lambda: (charging, exported("sessions")))
        assert charging & {"alfen", "webasto", "charx"} and "ocpp-1" in charging, charging  # Modbus and OCPP
        assert all(r["energy_wh"] >= 0 for r in sessions), sessions

        # finished sessions of a Modbus and of the OCPP wallbox: the record's energy is the wallbox's
        # register difference, its tariff parts add up to it, its cost is energy x the configured price of
        # each part's tariff level, and the OCPP one is what the operator's backend bills (meterStop - meterStart)
        prices = {"low": 22.0, "normal": 34.0, "high": 45.0, "unknown": 34.0}  # the demo's (unknown: normal)
        modbus = next(e for e in ("alfen", "webasto", "charx") if e in charging)
        def alloc_of(e: str) -> list[dict[str, Any]]:
            return [x for x in (watch.latest("chargegate/controller/allocation") or {}).get("evses", [])
                    if x.get("evse_id") == e]

        def charged(e: str) -> bool:  # drawing, with a few Wh in its session already
            d = watch.latest(f"chargegate/sim/{e}/draw") or {}
            st = watch.latest(f"chargegate/evse/{e}/status") or {}
            return d.get("state") == "C" and (st.get("session") or {}).get("energy_wh", 0) >= 5

        # the Modbus one has charged; the OCPP one may sit at 0 A under the operator's limit (the §14a
        # floor of 4.2 kW fits one 3-phase car at 6 A): its record must then say 0 Wh, as the backend does
        _wait(f"{modbus} charging", lambda: charged(modbus), 40,
              lambda: (watch.latest(f"chargegate/sim/{modbus}/draw"), alloc_of(modbus)))
        # unplugged as the README shows it: `chargegate sim unplug`, for the OCPP simulator as for a Modbus one
        for e in (modbus, "ocpp-1"):
            r = subprocess.run([sys.executable, "-m", "chargegate.cli", "sim", "unplug", e, "--config",
                                str(demo.dir / "chargegate.yaml")], capture_output=True, text=True, timeout=30)
            assert r.returncode == 0 and r.stdout.strip() == f"{e}: car unplugged", (r.stdout, r.stderr)

        def finished(e: str) -> dict[str, Any] | None:
            return next((r for r in exported("sessions") if r["evse_id"] == e and r["stopped"]), None)

        for e in (modbus, "ocpp-1"):
            row = _wait(f"the finished session of {e} in the record", lambda e=e: finished(e), 30,
                        lambda e=e: [r for r in exported("sessions") if r["evse_id"] == e])
            draw = watch.latest(f"chargegate/sim/{e}/draw")
            assert draw is not None and draw["plugged"] is False, draw
            assert row["energy_wh"] > 0 or e == "ocpp-1", (row, draw, alloc_of(e))
            assert abs(row["energy_stop_wh"] - row["energy_start_wh"] - row["energy_wh"]) < 0.01, row
            assert abs(row["energy_stop_wh"] - draw["energy_wh"]) <= 1.0, (row, draw)  # registers in whole Wh
            parts = [t for t in row["tariffs"] if t["energy_wh"] > 0]
            assert abs(sum(t["energy_wh"] for t in parts) - row["energy_wh"]) < 0.5, row
            expect = sum(t["energy_wh"] / 1000 * prices[t["level"]] / 100 for t in parts)
            assert row["cost"] is not None and abs(row["cost"] - expect) < 1e-6, (row, expect)
            if e == "ocpp-1":
                with urllib.request.urlopen(f"http://127.0.0.1:{control}/transactions?cp=ocpp-1", timeout=5) as r:
                    billed = [t for t in json.load(r) if t["meter_stop"] is not None]
                assert billed and not billed[-1]["problems"], billed
                assert abs(billed[-1]["meter_stop"] - billed[-1]["meter_start"] - row["energy_wh"]) <= 1.0, (
                    billed[-1], row)
    finally:
        watch.close()


def test_demo_stops_cleanly_on_ctrl_c(demo: Demo) -> None:
    """Ctrl-C: exit 0, and no simulator, broker or service of the demo is left running."""
    started = [int(e["pid"]) for e in demo.events("process started")]  # type: ignore[call-overload]
    brokers = [int(e["pid"]) for e in demo.events("broker started")]  # type: ignore[call-overload]
    names = {e["process"] for e in demo.events("process started")}
    assert {"sim-smgw", "sim-operator", "sim-operator-broker", "sim-backend", "sim-ocpp", "sim-modbus"} <= names
    running = _demo_processes(demo)
    assert len(running) >= len(names), running  # the check below sees them while they run
    code = demo.stop()
    assert code == 0, "demo did not stop cleanly on Ctrl-C:\n" + "\n".join(demo.lines[-30:])
    time.sleep(0.2)
    left = _demo_processes(demo)
    assert not left, f"processes of the demo still running: {left}"
    for pid in started + brokers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1]
                                                                 .split()[:1]), pid
    assert not any("process did not stop in time" in line for line in demo.lines), demo.lines[-20:]
