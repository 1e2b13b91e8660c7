"""The SMGW part of ``chargegate demo``: a simulated Smart Meter Gateway and the grid operator.

:func:`demo_setup` is called by ``chargegate.demo.plan()``. It

* writes a test PKI (``smgw_link.pki``, the same as ``chargegate cert test-pki``) into ``DIR/pki``,
  imports the chargegate client certificate into the demo's certificate store and selects it
  (what ``chargegate cert import`` / ``cert select`` do);
* adds the ``smgw:`` section to the demo configuration: the gateway (trust anchor and pinned
  fingerprint), the CLS endpoints of the operator (CLS.EEDI broker, OCPP backend), the inbound
  channel, the variables API with the token ``demo``, and functions 1-3 switched on;
* routes the operator's OCPP backend (``ocpp_gateway.backend_sim``, started by the demo) through
  the SMGW: ``ocpp.backend.via_smgw`` with ``wss://ocpp.operator.test/ocpp`` end to end;
* returns the simulator processes: the operator's Mosquitto (TLS), the SMGW simulator
  (brainpoolP256r1 only, hence TLS 1.2, SOCKS5) and the operator's scripted backend
  (``python -m smgw_link.demo operator``).

The operator script waits for chargegate's CLS.EEDI device, then (``--tariff-after``) opens the
inbound channel as the SMGW would and announces a low-tariff period with
``PUT /api/tariff/schedule``, and (``--limit-after``) sends an LPC consumption limit
(6 kW for 120 s by default), reads the device's state, and records every message in and out as
JSON lines in ``DIR/operator-record.jsonl``. SIGTERM/SIGINT end it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import signal
import sys
import time
import urllib.parse
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from chargegate.broker import first_free, free_port, mosquitto_binary
from chargegate.files import open_private_append
from smgw_link.clseedi import messages as m

DEMO_TOKEN = "demo"  # the variables API's bearer token in the demo (documented in the README)
DEVICE_ID = "chargegate-demo"
CERT_NAME = "demo-cls"
MQTT_HOST, MQTT_PORT = "mqtt.operator.test", 8883
OCPP_HOST, OCPP_PORT = "ocpp.operator.test", 443
GATEWAY_GROUPS = "brainpoolP256r1"  # a brainpool-only gateway: TLS 1.2 with brainpool key exchange
LIMIT_W, LIMIT_S = 6000, 120
LIMIT_AFTER_S, TARIFF_AFTER_S, TARIFF_START_IN_S, TARIFF_MINUTES = 15.0, 8.0, 10.0, 30.0


def operator_broker_conf(dirpath: Path, port: int, cert: Path, key: Path) -> Path:
    """The operator's Mosquitto (TLS with the operator's certificate, loopback only)."""
    d = dirpath / "operator"
    d.mkdir(parents=True, exist_ok=True)
    lines = [
        "per_listener_settings false", "allow_anonymous true", f"listener {port} 127.0.0.1",
        f"certfile {cert}", f"keyfile {key}", "require_certificate false", "persistence false",
        "log_dest stderr", "log_type error", "log_type warning", "log_type notice",
    ]
    if os.geteuid() == 0:
        lines.append("user root")  # the 0600 key stays readable
    conf = d / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def demo_setup(dirpath: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """Add the ``smgw`` section to the demo configuration ``cfg``; return the simulator processes.

    Returns ``{"processes": [(name, argv), ...], "notes": [...], "backend_args": [...]}``;
    ``backend_args`` are extra arguments for the operator's OCPP backend simulator (its TLS
    certificate), since chargegate reaches it through the SMGW with TLS end to end.
    """
    from smgw_link.certstore import CertStore
    from smgw_link.pki import make_pki

    dirpath = dirpath.resolve()
    pki = make_pki(dirpath / "pki", "brainpoolP256r1")
    # as chargegate.config.load resolves it (an absolute override replaces dirpath)
    state_dir = dirpath / (os.environ.get("CHARGEGATE_STATE_DIR") or str(cfg.get("state_dir", "state")))
    store = CertStore(state_dir / "certs")
    store.import_pem(CERT_NAME, pki.client_cert, pki.client_key, replace=True)
    store.select(CERT_NAME)
    # a demo starts from scratch: no AVAIL, tariff schedule or limit left from an earlier run
    (state_dir / "smgw" / "operator.json").unlink(missing_ok=True)

    smgw_port, op_port, inbound_port = free_port(), free_port(), free_port()
    fwd_mqtt, fwd_ocpp = free_port(), free_port()
    http_port = first_free((8090, 8092, 8093, 8094))  # the same port on every run when it is free (8091: admin)
    routes = [f"{MQTT_HOST}:{MQTT_PORT}=127.0.0.1:{op_port}"]
    notes: list[str] = []
    backend_args: list[str] = []

    ocpp_via_smgw = False
    backend = (cfg.get("ocpp") or {}).get("backend") or {}
    if backend.get("enabled") and backend.get("url"):
        sim_url = urllib.parse.urlsplit(str(backend["url"]))
        if sim_url.port:
            ocpp_via_smgw = True
            routes.append(f"{OCPP_HOST}:{OCPP_PORT}=127.0.0.1:{sim_url.port}")
            backend.update({"url": f"wss://{OCPP_HOST}/ocpp", "via_smgw": True, "smgw_endpoint": "operator-ocpp",
                            "ca_file": str(pki.operator_ca)})
            backend_args = ["--cert", str(pki.operator_cert), "--key", str(pki.operator_key)]
            notes.append(f"OCPP to the operator's backend goes through the SMGW: wss://{OCPP_HOST}/ocpp "
                         f"(CLS channel, TLS end to end) -> its simulator on 127.0.0.1:{sim_url.port}")

    cfg["smgw"] = {
        "enabled": True,
        "gateway": {"host": "127.0.0.1", "port": smgw_port, "server_name": "smgw.local",
                    "trust_anchor": str(pki.gateway_ca), "pinned_sha256": pki.gateway_fingerprint(),
                    "connect_timeout_s": 3},
        "cert_store": str(store.root),
        "proxy": "socks5",
        "keepalive_s": 10,
        "reconnect_min_s": 0.5,
        "reconnect_max_s": 5,
        "functions": {"ocpp_via_smgw": ocpp_via_smgw, "power_reduction": True, "tariffs": True},
        "endpoints": [
            {"name": "operator-mqtt", "host": MQTT_HOST, "port": MQTT_PORT, "listen_port": fwd_mqtt,
             "purpose": "clseedi"},
            {"name": "operator-ocpp", "host": OCPP_HOST, "port": OCPP_PORT, "listen_port": fwd_ocpp,
             "purpose": "ocpp"},
        ],
        "clseedi": {"enabled": True, "endpoint": "operator-mqtt", "ca_file": str(pki.operator_ca),
                    "device_id": DEVICE_ID, "keepalive_s": 15},
        "inbound": {"enabled": True, "host": "127.0.0.1", "port": inbound_port},
        "http_api": {"host": "127.0.0.1", "port": http_port, "house_power_w": 24000, "tokens": [DEMO_TOKEN]},
    }
    if not cfg.get("evses"):
        # nothing to reduce: the operator's limit would be answered "execution failed" (no controller)
        cfg["smgw"]["clseedi"]["require_controller"] = False

    conf = operator_broker_conf(dirpath, op_port, pki.operator_cert, pki.operator_key)
    record = dirpath / "operator-record.jsonl"
    py = sys.executable
    processes: list[tuple[str, list[str]]] = [
        ("sim-operator-broker", [mosquitto_binary(), "-c", str(conf)]),
        ("sim-smgw", [py, "-m", "smgw_link.sim.smgw", "--pki", str(pki.dir), "--port", str(smgw_port),
                      "--groups", GATEWAY_GROUPS, "--tls", "1.2", "--mode", "socks5",
                      *[a for r in routes for a in ("--route", r)]]),
        ("sim-operator", [py, "-m", "smgw_link.demo", "operator", "--pki", str(pki.dir),
                          "--broker-port", str(op_port), "--device", DEVICE_ID, "--record", str(record),
                          "--inbound", f"127.0.0.1:{inbound_port}", "--token", DEMO_TOKEN]),
    ]
    from chargegate.demo import cli_command, shown

    cli = cli_command()
    cfg_file = shown(dirpath / "chargegate.yaml")
    notes += [
        f"SMGW simulator: 127.0.0.1:{smgw_port} (brainpoolP256r1, TLS 1.2, SOCKS5 CLS proxy); test PKI in "
        f"{shown(pki.dir)}; client certificate '{CERT_NAME}' selected: {cli} cert list --config {cfg_file}",
        f"grid operator (CLS.EEDI over its own TLS Mosquitto, reached as {MQTT_HOST}:{MQTT_PORT} through the SMGW): "
        f"{LIMIT_AFTER_S:.0f} s after its link is up, a {LIMIT_W / 1000:g} kW limit for {LIMIT_S} s arrives on "
        f"chargegate/grid/limit/dso (raised to the §14a floor when lower); a low tariff announced through the "
        f"inbound channel starts after about {TARIFF_AFTER_S + TARIFF_START_IN_S:.0f} s",
        f"operator's record (every CLS.EEDI message and inbound request): tail -f {shown(record)}",
        f"variables API: curl -H 'Authorization: Bearer {DEMO_TOKEN}' "
        f"'http://127.0.0.1:{http_port}/cnf?cmd=set_cm_vars&name=AVAIL&val=50'   "
        f"(house power 50 % -> grid/limit/local; GET /api/variables, /api/limits, /docs)",
    ]
    return {"processes": processes, "notes": notes, "backend_args": backend_args}


# -- the operator's scripted backend -----------------------------------------------------------------------
class Recorder:
    """JSON lines of everything the operator sends and receives (the operator's record)."""

    def __init__(self, path: Path) -> None:
        # the operator's record of every message in and out: 0600
        self.f: TextIO = io.TextIOWrapper(open_private_append(path), encoding="utf-8", line_buffering=True)

    def write(self, direction: str, channel: str, **fields: Any) -> None:
        rec = {"ts": datetime.now(UTC).isoformat(), "dir": direction, "channel": channel, **fields}
        line = json.dumps(rec, default=str)
        self.f.write(line + "\n")
        print(line, flush=True)

    def close(self) -> None:
        self.f.close()


async def _inbound_request(args: argparse.Namespace, method: str, path: str,
                           body: dict[str, Any] | None) -> tuple[int, Any]:
    """One HTTP request through the inbound channel, opened as the SMGW opens it (gateway certificate)."""
    from smgw_link.sim.smgw import SmgwSim, http_request

    pki = Path(args.pki)
    sim = SmgwSim(cert=pki / "gateway.pem", key=pki / "gateway.key", client_ca=pki / "device-ca.pem")
    host, _, port = args.inbound.rpartition(":")
    streams = await asyncio.wait_for(sim.open_inbound(host, int(port), pki / "device-ca.pem"), 10)
    status, payload = await http_request(streams, method, path, args.token,
                                         json.dumps(body).encode() if body is not None else None)
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode(errors="replace")


async def run_operator(args: argparse.Namespace, stop: asyncio.Event) -> None:
    from smgw_link.sim.operator import OperatorBackend

    rec = Recorder(Path(args.record))
    pki = Path(args.pki)
    backend = OperatorBackend("127.0.0.1", args.broker_port, pki / "operator-ca.pem", device_id=args.device,
                              source="demo-dso/operator-backend")
    seen = 0

    def drain() -> None:
        nonlocal seen
        for r in backend.received[seen:]:
            rec.write("in", "clseedi", topic=backend.from_device, msg=r.msg, schema_errors=r.schema_errors)
        seen = len(backend.received)

    async def sleep(s: float) -> bool:
        """Sleep while recording; False when asked to stop."""
        end = time.monotonic() + s
        while not stop.is_set() and time.monotonic() < end:
            drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(0.2, max(0.0, end - time.monotonic())))
        drain()
        return not stop.is_set()

    try:
        while not stop.is_set():
            try:
                await backend.start(wait=5)
                break
            except TimeoutError:
                backend.client.loop_stop()
                rec.write("note", "clseedi", text="operator broker not reachable yet, retrying")
                await sleep(1)
        if stop.is_set():
            return
        rec.write("note", "clseedi", text=f"operator backend connected to its broker; waiting for device "
                                          f"{args.device} on {backend.from_device}")
        while not backend.received and await sleep(0.2):
            pass
        if stop.is_set():
            return
        t0 = time.monotonic()
        rec.write("note", "clseedi", text="the device is online")
        steps = sorted([(args.tariff_after, "tariff"), (args.limit_after, "limit")])
        for at, what in steps:
            if not await sleep(max(0.0, t0 + at - time.monotonic())):
                return
            if what == "tariff":
                await _send_tariff(args, rec, sleep)
            else:
                await _send_limit(args, backend, rec, sleep)
        # after the limit's end: read the state again (the limit is gone, measurements go on)
        if await sleep(args.limit_s + 2):
            _send(backend, rec, m.read(backend.source), "read after the limit's duration")
        while await sleep(1):
            pass
    finally:
        drain()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(backend.stop(), 5)
        rec.close()


async def _send_tariff(args: argparse.Namespace, rec: Recorder, sleep: Any) -> None:
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=args.tariff_start_in)
    end = start + timedelta(minutes=args.tariff_minutes)
    body = {"periods": [
        {"id": f"demo-low-{start:%H%M%S}", "level": "low", "start": start.isoformat(), "end": end.isoformat(),
         "price_ct_per_kwh": 19.5},
        {"id": f"demo-normal-{end:%H%M%S}", "level": "normal", "start": end.isoformat(),
         "end": (end + timedelta(hours=12)).isoformat(), "price_ct_per_kwh": 32.0},
    ]}
    for attempt in range(10):
        rec.write("out", "inbound-http", method="PUT", path="/api/tariff/schedule", body=body, attempt=attempt + 1)
        try:
            status, answer = await _inbound_request(args, "PUT", "/api/tariff/schedule", body)
        except (OSError, TimeoutError, ConnectionError) as e:
            rec.write("in", "inbound-http", error=f"{type(e).__name__}: {e}")
        else:
            rec.write("in", "inbound-http", status=status, body=answer)
            if status == 200:
                return
        if not await sleep(3):
            return


def _send(backend: Any, rec: Recorder, msg: dict[str, Any], text: str, **fields: Any) -> str:
    backend.send(msg)
    rec.write("out", "clseedi", topic=backend.to_device, msg=msg, text=text, **fields)
    return str(msg["id"])


async def _send_limit(args: argparse.Namespace, backend: Any, rec: Recorder, sleep: Any) -> None:
    for attempt in range(10):
        msg = backend.control({"limits": {"power": {"active": {"consumption": {
            "value": args.limit_w, "active": True, "duration": args.limit_s}}}}})
        mid = _send(backend, rec, msg, f"LPC consumption limit {args.limit_w} W for {args.limit_s} s",
                    attempt=attempt + 1)
        try:
            r = await backend.wait_reply(mid, 10)
        except TimeoutError:
            rec.write("note", "clseedi", text="no ack within 10 s")
        else:
            err = (r.msg.get("data") or {}).get("errorNumber")
            if err == 0:
                if await sleep(3):
                    _send(backend, rec, m.read(backend.source), "read the device's state under the limit")
                return
            rec.write("note", "clseedi", text=f"limit not applied (errorNumber {err}), sending it again")
        if not await sleep(5):
            return


def _operator_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m smgw_link.demo operator",
                                 description="the demo's scripted grid operator (CLS.EEDI and the inbound channel)")
    ap.add_argument("--pki", required=True)
    ap.add_argument("--broker-port", type=int, required=True)
    ap.add_argument("--device", default=DEVICE_ID)
    ap.add_argument("--record", required=True)
    ap.add_argument("--inbound", required=True, help="HOST:PORT of chargegate's inbound TLS server")
    ap.add_argument("--token", default=DEMO_TOKEN)
    ap.add_argument("--limit-w", type=int, default=LIMIT_W)
    ap.add_argument("--limit-s", type=int, default=LIMIT_S)
    ap.add_argument("--limit-after", type=float, default=LIMIT_AFTER_S)
    ap.add_argument("--tariff-after", type=float, default=TARIFF_AFTER_S)
    ap.add_argument("--tariff-start-in", type=float, default=TARIFF_START_IN_S)
    ap.add_argument("--tariff-minutes", type=float, default=TARIFF_MINUTES)
    args = ap.parse_args(argv)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_operator(args, stop)

    asyncio.run(main())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["operator"]:
        return _operator_main(argv[1:])
    print("usage: python -m smgw_link.demo operator --pki DIR --broker-port N --record FILE --inbound HOST:PORT",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
