"""Benchmark: N OCPP wallboxes and N upstream connections through one ocpp-gateway process.

Processes: Mosquitto, the backend simulator, the gateway (each its own process); this process runs
N wallbox clients (through the gateway) and N direct clients (straight to the same backend) at
the same time. Each client sends a transaction MeterValues every 1/rate seconds with a unique
energy value; the backend records the arrival time of every frame, so the forwarding latency is
backend arrival minus client send time for both paths in the same run. Memory: the gateway's
RSS with nothing connected, with N upstream connections, and with N wallboxes as well.

    .venv/bin/python bench/ocpp/bench_ocpp.py [--n 200] [--duration 30] [--rate 0.5]
    .venv/bin/python bench/ocpp/bench_ocpp.py --smoke   # 3 wallboxes, 2 s (the test suite runs it)

The last line is ``RESULT {json}`` with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from websockets.asyncio.client import ClientConnection, connect

from chargegate import config as cfgmod
from chargegate.broker import LocalBroker, free_port

REPO = Path(__file__).resolve().parents[2]
STAMPS_DIR = Path(__file__).resolve().parent / "stamps"


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing on port {port}")


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


class Client:
    """A minimal OCPP 1.6 charge point: boot, its status, one transaction, periodic MeterValues."""

    def __init__(self, url: str, cbid: str, rate: float, sends: dict[tuple[str, str], float], key_cp: str) -> None:
        self.url, self.cbid, self.rate, self.sends, self.key_cp = url, cbid, rate, sends, key_cp
        self.n = 0
        self.pending: dict[str, asyncio.Future[Any]] = {}
        self.ws: ClientConnection | None = None
        self.errors = 0
        self.state = "Available"
        self.background: set[asyncio.Task[None]] = set()

    async def call(self, action: str, payload: dict[str, Any]) -> Any:
        self.n += 1
        uid = f"{self.cbid}-{self.n}"
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[uid] = fut
        assert self.ws is not None
        await self.ws.send(json.dumps([2, uid, action, payload]))
        return await asyncio.wait_for(fut, 30)

    async def reader(self) -> None:
        assert self.ws is not None
        async for raw in self.ws:
            msg = json.loads(raw)
            if msg[0] == 3 and msg[1] in self.pending:
                self.pending.pop(msg[1]).set_result(msg[2])
            elif msg[0] == 4 and msg[1] in self.pending:
                self.errors += 1
                self.pending.pop(msg[1]).set_result(None)
            elif msg[0] == 2:  # the gateway's calls, answered as a wallbox does
                action, req = msg[2], msg[3]
                if action == "GetConfiguration":
                    res: dict[str, Any] = {"configurationKey": [
                        {"key": "MeterValueSampleInterval", "readonly": False, "value": str(round(1 / self.rate))},
                        {"key": "MeterValuesSampledData", "readonly": False,
                         "value": "Energy.Active.Import.Register"}]}
                else:  # SetChargingProfile, ChangeConfiguration, TriggerMessage
                    res = {"status": "Accepted"}
                await self.ws.send(json.dumps([3, msg[1], res]))
                if action == "TriggerMessage" and req.get("requestedMessage") == "StatusNotification":
                    task = asyncio.create_task(self.status())
                    self.background.add(task)
                    task.add_done_callback(self.background.discard)

    async def status(self) -> None:
        """The connector's status, as a wallbox sends it after its boot, on each change and when asked (without
        it the gateway asks again and, 30 s after its start, reports the status as unknown to the backend for
        every wallbox at once: the bench's clients once did not send it)."""
        ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        await self.call("StatusNotification", {"connectorId": 1, "errorCode": "NoError", "status": self.state,
                                               "timestamp": ts})

    async def run(self, stop: asyncio.Event, start_at: float) -> None:
        self.ws = await connect(f"{self.url}/{self.cbid}", subprotocols=["ocpp1.6"],  # type: ignore[list-item]
                                proxy=None, open_timeout=30, ping_interval=None, max_queue=64)
        rd = asyncio.create_task(self.reader())
        try:
            await self.call("BootNotification", {"chargePointVendor": "bench", "chargePointModel": "b"})
            await self.status()
            ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            res = await self.call("StartTransaction", {"connectorId": 1, "idTag": "BENCH", "meterStart": 0,
                                                       "timestamp": ts})
            tid = res["transactionId"]
            self.state = "Charging"
            await self.status()
            await asyncio.sleep(max(0.0, start_at - time.time()) + random.random() / self.rate)
            energy = 0
            while not stop.is_set():
                energy += 1
                value = str(energy)
                payload = {"connectorId": 1, "transactionId": tid, "meterValue": [{
                    "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "sampledValue": [{"value": value, "measurand": "Energy.Active.Import.Register", "unit": "Wh"}]}]}
                self.sends[(self.key_cp, value)] = time.time()
                await self.call("MeterValues", payload)
                await asyncio.sleep(1 / self.rate)
        finally:
            rd.cancel()
            for t in self.background:
                t.cancel()
            await self.ws.close()


def hop_legs(stamps: Path, sends: dict[tuple[str, str], float],
             arrived: dict[tuple[str, str], float]) -> dict[str, list[float]]:
    """Each forwarded MeterValues in three legs, in ms: the client's send until the gateway's OCPP layer reads
    it (the wire and the gateway's loop getting to it), inside the gateway until it sends it on (schema
    checks, queue commit, fsync, delivery loop), and from there until the backend reads it."""
    got: dict[str, dict[tuple[str, str], float]] = {"in": {}, "out": {}}
    if stamps.exists():
        for line in stamps.read_text().splitlines():
            t, name, direction, raw = json.loads(line)
            msg = json.loads(raw)
            if msg[0] != 2 or msg[2] != "MeterValues":
                continue
            with contextlib.suppress(KeyError, IndexError, TypeError):
                value = msg[3]["meterValue"][0]["sampledValue"][0]["value"]
                got[direction].setdefault((name.lower(), value), t)  # the first time (not a resend)
    legs: dict[str, list[float]] = {"in": [], "hop": [], "out": []}
    for key, t_in in got["in"].items():
        sent, t_out, t_be = sends.get(key), got["out"].get(key), arrived.get(key)
        if sent is None or t_out is None or t_be is None:
            continue
        legs["in"].append((t_in - sent) * 1000)
        legs["hop"].append((t_out - t_in) * 1000)
        legs["out"].append((t_be - t_out) * 1000)
    return legs


def callgrind_total(path: Path) -> int:
    """The instruction count of a callgrind output file (its ``totals:`` line; ``summary:`` may say 0 when the
    instrumentation was switched on while running)."""
    totals = [int(line.split()[1]) for line in path.read_text().splitlines() if line.startswith("totals:")]
    if not totals:
        raise RuntimeError(f"no totals in {path}")
    return sum(totals)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


async def bench(n: int, duration: float, rate: float, smoke: bool = False, callgrind: bool = False) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench-ocpp-"))
    bport, gport, kport = free_port(), free_port(), free_port()
    evses = "\n".join(f"  - id: wb-{i}\n    circuit: grid\n    ocpp: {{charge_box_id: WB-{i}}}" for i in range(n))
    (tmp / "chargegate.yaml").write_text(f"""
site: {{name: bench}}
broker: {{port: {bport}}}
logging: {{level: warning}}
circuits: [{{id: grid, fuse_a: 4000}}]
evses:
{evses}
ocpp:
  local: {{host: 127.0.0.1, port: {gport}, max_messages_per_s: 50}}
  backend: {{enabled: true, url: "ws://127.0.0.1:{kport}/ocpp", heartbeat_interval_s: 3600,
            reconnect_min_s: 0.5, reconnect_max_s: 2}}
""")
    cfg = cfgmod.load(tmp / "chargegate.yaml")
    broker = LocalBroker.prepare(cfg, port=bport, persistence=False)
    broker.start()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs: list[subprocess.Popen[bytes]] = []
    backend: subprocess.Popen[bytes] | None = None
    try:
        # the gateway alone gets stamps/ on its path: its sitecustomize stamps each MeterValues frame where it
        # enters and leaves the gateway's OCPP layer (OcppRpc's on_frame hook), so the gateway's own share of the
        # latency is measured, not only inferred from the difference to the direct path
        stamps = tmp / "stamps.jsonl"
        gw_env = dict(env, BENCH_OCPP_STAMPS=str(stamps),
                      PYTHONPATH=os.pathsep.join(filter(None, [str(STAMPS_DIR), env.get("PYTHONPATH")])))
        # --callgrind: the gateway runs under valgrind's callgrind, counting instructions only while it forwards
        # (switched on and off around the measured window): instructions per forwarded message are repeatable
        # where CPU times and latencies move with the machine's load (the latencies under valgrind mean nothing)
        cg_out = tmp / "callgrind.out"
        prefix = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={cg_out}"] \
            if callgrind else []
        gw = subprocess.Popen([*prefix, sys.executable, "-m", "ocpp_gateway", "--config", str(tmp / "chargegate.yaml")],
                              stdout=open(tmp / "gateway.log", "wb"), stderr=subprocess.STDOUT, env=gw_env, cwd=REPO)
        procs.append(gw)
        wait_port(gport, 180.0 if callgrind else 20.0)
        pause = 0.5 if smoke else 2.0  # let the process settle before its memory is read
        await asyncio.sleep(pause)
        rss0 = rss_mb(gw.pid)
        backend = subprocess.Popen([sys.executable, "-m", "ocpp_gateway.backend_sim", "--port", str(kport),
                                    "--db", str(tmp / "backend.sqlite"), "--control-port", str(free_port())],
                                   stdout=open(tmp / "backend.log", "wb"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
        procs.append(backend)
        wait_port(kport)
        db = sqlite3.connect(tmp / "backend.sqlite")
        t0 = time.time()
        while True:
            up = db.execute("SELECT COUNT(DISTINCT cp) FROM frames WHERE raw LIKE '%BootNotification%'").fetchone()[0]
            if up >= n or time.time() - t0 > 60:
                break
            await asyncio.sleep(0.2)
        t_up = time.time() - t0
        await asyncio.sleep(pause)
        rss1 = rss_mb(gw.pid)
        sends: dict[tuple[str, str], float] = {}
        stop = asyncio.Event()
        lead = 2.0 if smoke else 5.0  # every client connected and in its transaction before the clock starts
        start_at = time.time() + lead
        via = [Client(f"ws://127.0.0.1:{gport}/ocpp", f"WB-{i}", rate, sends, f"wb-{i}") for i in range(n)]
        direct = [Client(f"ws://127.0.0.1:{kport}/ocpp", f"DIRECT-{i}", rate, sends, f"DIRECT-{i}") for i in range(n)]
        gwp = psutil.Process(gw.pid)
        cpu0 = gwp.cpu_times()
        tasks = [asyncio.create_task(c.run(stop, start_at)) for c in via + direct]
        await asyncio.sleep(lead - 0.5)
        rss2 = rss_mb(gw.pid)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        # the gateway's CPU time while it only forwards (every client connected and in its transaction):
        # CPU seconds do not depend much on what else the machine runs, unlike the latencies
        if callgrind:
            subprocess.run(["callgrind_control", "-i", "on", str(gw.pid)], check=True, capture_output=True)
        steady0, n0 = gwp.cpu_times(), len(sends)
        await asyncio.sleep(duration)
        steady1, n1 = gwp.cpu_times(), len(sends)
        if callgrind:
            subprocess.run(["callgrind_control", "-i", "off", str(gw.pid)], check=True, capture_output=True)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        cpu1 = gwp.cpu_times()
        await asyncio.sleep(1.0 if smoke else 3.0)  # let the last forwarded messages arrive
        lat: dict[str, list[float]] = {"gateway": [], "direct": []}
        arrived: dict[tuple[str, str], float] = {}
        worst: dict[str, dict[int, float]] = {"gateway": {}, "direct": {}}  # per second of the run: the slowest
        for cp, raw, ts in db.execute("SELECT cp, raw, ts FROM frames WHERE dir = 'in' AND raw LIKE '%MeterValues%'"):
            msg = json.loads(raw)
            value = msg[3]["meterValue"][0]["sampledValue"][0]["value"]
            sent = sends.get((cp, value))
            if sent is not None:
                path = "direct" if cp.startswith("DIRECT") else "gateway"
                lat[path].append((ts - sent) * 1000)
                arrived[(cp, value)] = ts
                sec = int(sent - start_at)
                worst[path][sec] = max(worst[path].get(sec, 0.0), (ts - sent) * 1000)
        # the gateway's stamps (written when it exits): the three legs of each message through it
        gw.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            gw.wait(120 if callgrind else 10)
        legs = hop_legs(stamps, sends, arrived)
        expected = {"gateway": sum(1 for k in sends if not k[0].startswith("DIRECT")),
                    "direct": sum(1 for k in sends if k[0].startswith("DIRECT"))}
        print(f"\nocpp-gateway benchmark: {n} wallboxes + {n} upstream connections through one gateway, "
              f"{n} direct clients to the same backend, {rate} MeterValues/s per client, {duration:.0f} s")
        print(f"  upstream connections registered: {up}/{n} in {t_up:.1f} s")
        for path in ("direct", "gateway"):
            xs = lat[path]
            print(f"  {path:8s} latency client->backend: n={len(xs)}/{expected[path]}  p50={percentile(xs, 50):.2f} ms"
                  f"  p99={percentile(xs, 99):.2f} ms  mean={statistics.fmean(xs) if xs else float('nan'):.2f} ms"
                  f"  max={max(xs) if xs else float('nan'):.1f} ms")
        busy = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        print(f"  added by the gateway: p50 +{percentile(lat['gateway'], 50) - percentile(lat['direct'], 50):.2f} ms,"
              f" p99 +{percentile(lat['gateway'], 99) - percentile(lat['direct'], 99):.2f} ms")
        for leg, what in (("in", "client send -> gateway reads it"), ("hop", "inside the gateway (read -> sent on)"),
                          ("out", "gateway sends -> backend reads it")):
            xs = legs[leg]
            print(f"  leg {what:38s}: n={len(xs)}  p50={percentile(xs, 50):.2f} ms  p99={percentile(xs, 99):.2f} ms"
                  f"  max={max(xs) if xs else float('nan'):.1f} ms")
        for path in ("direct", "gateway"):
            top = sorted(worst[path].items(), key=lambda kv: -kv[1])[:3]
            print(f"  {path:8s} slowest seconds of the run (second: max ms): "
                  + ", ".join(f"{sec}: {ms:.0f}" for sec, ms in top))
        print(f"  gateway RSS: idle {rss0:.1f} MB, +{n} upstream {rss1:.1f} MB, +{n} wallboxes {rss2:.1f} MB")
        print(f"  memory per upstream connection {(rss1 - rss0) * 1024 / n:.1f} KB, "
              f"per wallbox connection {(rss2 - rss1) * 1024 / n:.1f} KB")
        print(f"  gateway CPU during the run: {100 * busy / (duration + lead - 0.5):.0f} % of one core "
              f"(forwarding {rate * n:.0f} transaction messages/s with two SQLite commits each)")
        steady_msgs = sum(1 for k in list(sends)[n0:n1] if not k[0].startswith("DIRECT"))
        cpu_per_msg = ((steady1.user + steady1.system) - (steady0.user + steady0.system)) * 1000 / max(1, steady_msgs)
        print(f"  gateway CPU per forwarded message while forwarding: {cpu_per_msg:.2f} ms "
              f"({steady_msgs} messages; receive, queue, answer, deliver, answer from the backend)")
        if callgrind:
            ir = callgrind_total(cg_out)
            print(f"  gateway instructions per forwarded message (callgrind): {ir / max(1, steady_msgs) / 1e6:.2f} M "
                  f"({ir / 1e6:.0f} M in all; {cg_out})")
        errors = sum(c.errors for c in via + direct)
        print(f"  CALLERRORs seen by clients: {errors}")
        figures = {"wallboxes": n, "upstream_registered": up, "duration_s": duration, "rate_per_s": rate,
                   "callerrors": errors,
                   **{f"{path}_{k}": v for path in ("direct", "gateway") for k, v in (
                       ("n", len(lat[path])), ("expected", expected[path]),
                       ("p50_ms", round(percentile(lat[path], 50), 3)),
                       ("p99_ms", round(percentile(lat[path], 99), 3)))},
                   "added_p50_ms": round(percentile(lat["gateway"], 50) - percentile(lat["direct"], 50), 3),
                   "added_p99_ms": round(percentile(lat["gateway"], 99) - percentile(lat["direct"], 99), 3),
                   **{f"leg_{leg}_{k}": round(percentile(legs[leg], q), 3) for leg in ("in", "hop", "out")
                      for k, q in (("p50_ms", 50), ("p99_ms", 99))},
                   "rss_idle_mb": round(rss0, 1), "rss_upstream_mb": round(rss1, 1), "rss_wallboxes_mb": round(rss2, 1),
                   "cpu_pct": round(100 * busy / (duration + lead - 0.5), 1),
                   "cpu_ms_per_message": round(cpu_per_msg, 3)}
        print("RESULT " + json.dumps(figures), flush=True)
        # every message forwarded and answered: anything else is a failure, whatever the timing
        return 0 if errors == 0 and up >= n and all(lat[k] for k in lat) and legs["hop"] else 1
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=0.5, help="MeterValues per second per client")
    ap.add_argument("--smoke", action="store_true", help="tiny run for the test suite: 3 wallboxes, 2 s")
    ap.add_argument("--callgrind", action="store_true",
                    help="run the gateway under callgrind: its instructions per forwarded message (slow; use --n 20)")
    args = ap.parse_args()
    if args.smoke:
        args.n, args.duration, args.rate = 3, 2.0, 2.0
    sys.exit(asyncio.run(bench(args.n, args.duration, args.rate, args.smoke, args.callgrind)))


if __name__ == "__main__":
    main()
