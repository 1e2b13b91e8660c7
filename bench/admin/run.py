"""bench/admin: the admin API on this machine.

A real Mosquitto (project ACL, own accounts) on a free loopback port, smgw-link and ocpp-gateway as
separate processes (``python -m smgw_link`` / ``python -m ocpp_gateway``), the OCPP backend simulator
in this process, ``--evses`` Modbus EVSEs configured (each a charge point at the backend), their
statuses on the bus.

Reported:

* ``GET /v1/status`` latency (everything: EVSEs with status and setpoint, limits, services, errors),
  p50/p99 over ``--requests``;
* a configuration change end to end: ``PUT /v1/config/evses/<new>?wait_s=10`` (validated, written,
  reload sent, answered once smgw-link and ocpp-gateway report the new version) and the time until
  that EVSE's BootNotification reaches the backend; then its removal. p50/p99 over ``--rounds``.

    .venv/bin/python bench/admin/run.py [--evses 100] [--requests 300] [--rounds 10]
    .venv/bin/python bench/admin/run.py --smoke    # 3 EVSEs, 20 requests, 1 round (the test suite runs it)

The last line is ``RESULT {json}`` with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chargegate import config as cfgmod
from chargegate import payloads as p
from chargegate.broker import LocalBroker, account_password, bus_settings, free_port
from chargegate.bus import Bus
from chargegate.topics import Registry
from ocpp_gateway.backend_sim import BackendSim

TOKEN = "bench-admin-token-0123456789"


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(0, min(len(s) - 1, round(q / 100 * (len(s) - 1))))]


async def call(port: int, method: str, path: str, body: object = None) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nAuthorization: Bearer {TOKEN}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    writer.write(head.encode() + b"\r\n" + data)
    await writer.drain()
    raw = await reader.read(-1)
    writer.close()
    return int(raw.split(b" ", 2)[1]), raw.partition(b"\r\n\r\n")[2]


async def main(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="cg-bench-admin-"))
    backend = BackendSim(tmp / "backend.sqlite")
    await backend.start()
    port, admin_port = free_port(), free_port()
    evses = "".join(f"  - {{id: wb{i:03d}, circuit: grid, modbus: {{profile: alfen-eve, host: 127.0.0.1, "
                    f"port: {free_port()}}}}}\n" for i in range(args.evses))
    text = f"""
site: {{name: bench-admin}}
state_dir: {tmp / 'state'}
broker: {{port: {port}}}
circuits:
  - {{id: grid, fuse_a: 250}}
evses:
{evses}
ocpp:
  local: {{enabled: false}}
  backend: {{enabled: true, url: "{backend.url}", reconnect_min_s: 0.2, reconnect_max_s: 1}}
smgw:
  http_api: {{enabled: false}}
admin:
  enabled: true
  port: {admin_port}
  tokens: [{{name: bench, role: admin, token: "{TOKEN}"}}]
"""
    path = tmp / "chargegate.yaml"
    path.write_text(text)
    cfg = cfgmod.load(path)
    broker = LocalBroker.prepare(cfg, port=port, persistence=False)
    broker.start()
    for account in ("smgw-link", "ocpp-gateway", "evse-poller"):
        account_password(cfg, account)
    env = {**os.environ, "CHARGEGATE_LOG_FORMAT": "json", "CHARGEGATE_LOG_LEVEL": "warning"}
    procs = [subprocess.Popen([sys.executable, "-m", mod, "--config", str(path)], env=env,
                              stdout=subprocess.DEVNULL, stderr=(tmp / f"{mod}.log").open("wb"))
             for mod in ("smgw_link", "ocpp_gateway")]
    poller = Bus("evse-poller", Registry(cfg.site.topic_root), bus_settings(cfg, "evse-poller"))
    try:
        await poller.start(wait=10)
        for i in range(args.evses):
            poller.publish("evse.status", p.EvseStatus(evse_id=f"wb{i:03d}", online=True, state=p.EvseState.CHARGING,
                                                       iec_state=p.IecState.C, current_a=[16, 16, 16]),
                           evse_id=f"wb{i:03d}")
        t0 = time.monotonic()
        while sum(1 for e in backend.connected.values() if e.is_set()) < args.evses:
            if time.monotonic() - t0 > 60:
                raise SystemExit("the charge points did not all connect")
            await asyncio.sleep(0.1)
        while True:
            try:
                if (await call(admin_port, "GET", "/v1/whoami"))[0] == 200:
                    break
            except OSError:
                await asyncio.sleep(0.1)
        status_ms = []
        for _ in range(args.requests):
            t = time.perf_counter()
            code, body = await call(admin_port, "GET", "/v1/status")
            status_ms.append((time.perf_counter() - t) * 1000)
            assert code == 200, body[:200]
        size = len(body)
        change_ms, boot_ms, remove_ms = [], [], []
        for r in range(args.rounds):
            cbid = f"NEW-{r:03d}"
            item = {"circuit": "grid", "modbus": {"profile": "alfen-eve", "host": "127.0.0.1", "port": free_port()},
                    "upstream": {"charge_box_id": cbid}}
            t = time.perf_counter()
            code, body = await call(admin_port, "PUT", f"/v1/config/evses/new{r}?wait_s=10", item)
            change_ms.append((time.perf_counter() - t) * 1000)
            out = json.loads(body)
            assert code == 200 and all(out["applied"].values()), body[:300]
            await backend.wait_connected(cbid, 20)
            while not backend.calls(cbid, "BootNotification"):  # noqa: ASYNC110 (the simulator records)
                await asyncio.sleep(0.005)
            boot_ms.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            code, body = await call(admin_port, "DELETE", f"/v1/config/evses/new{r}?wait_s=10")
            assert code == 200, body[:300]
            remove_ms.append((time.perf_counter() - t) * 1000)
        reconnects = sum(n - 1 for cp, n in backend.connects.items() if cp.startswith("wb"))
        print(f"admin API bench: {args.evses} EVSEs (each a charge point at the backend), smgw-link and ocpp-gateway "
              f"as processes, Python {sys.version.split()[0]}")
        print(f"  GET /v1/status ({size / 1024:.0f} KiB): p50 {statistics.median(status_ms):.1f} ms, "
              f"p99 {pct(status_ms, 99):.1f} ms over {len(status_ms)} requests")
        print(f"  add an EVSE, answered when both services run it: p50 {statistics.median(change_ms):.0f} ms, "
              f"p99 {pct(change_ms, 99):.0f} ms")
        print(f"  add an EVSE -> its BootNotification at the backend: p50 {statistics.median(boot_ms):.0f} ms, "
              f"p99 {pct(boot_ms, 99):.0f} ms")
        print(f"  remove it, answered when both services run it: p50 {statistics.median(remove_ms):.0f} ms, "
              f"p99 {pct(remove_ms, 99):.0f} ms ({len(change_ms)} rounds)")
        print(f"  reconnects of the {args.evses} existing charge points meanwhile: {reconnects}")
        print("RESULT " + json.dumps({
            "evses": args.evses, "status_kib": round(size / 1024, 1), "requests": len(status_ms),
            "status_p50_ms": round(statistics.median(status_ms), 2), "status_p99_ms": round(pct(status_ms, 99), 2),
            "rounds": len(change_ms), "add_p50_ms": round(statistics.median(change_ms), 1),
            "add_p99_ms": round(pct(change_ms, 99), 1), "boot_p50_ms": round(statistics.median(boot_ms), 1),
            "remove_p50_ms": round(statistics.median(remove_ms), 1), "reconnects": reconnects}), flush=True)
        return 0 if reconnects == 0 else 1
    finally:
        await poller.stop()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        broker.stop()
        await backend.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--evses", type=int, default=100)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="tiny run for the test suite: 3 EVSEs, 20 requests, 1 round")
    a = ap.parse_args()
    if a.smoke:
        a.evses, a.requests, a.rounds = 3, 20, 1
    sys.exit(asyncio.run(main(a)))
