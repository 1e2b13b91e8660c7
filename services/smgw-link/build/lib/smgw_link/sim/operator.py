"""Operator backend simulator for CLS.EEDI: a second Mosquitto (TLS, the operator's broker) and a
small controller that publishes ``control``/``read`` messages and records acks and states,
checking each against the official schemas.

Run: ``python -m smgw_link.sim.operator --pki DIR --port 18883 --device chargegate
--limit 5000 --duration 600`` (the PKI from ``chargegate cert test-pki``; the broker presents
``operator.pem``, names mqtt.operator.test/localhost/127.0.0.1).
The operator's OCPP backend simulator is ``ocpp_gateway.backend_sim`` (ocpp-gateway).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from chargegate.broker import LocalBroker, free_port
from smgw_link.clseedi import messages as m


@dataclass
class OperatorBroker:
    """A Mosquitto for the operator side, TLS with the operator's certificate, on loopback."""

    dir: Path
    cert: Path
    key: Path
    port: int = 0
    broker: LocalBroker | None = None  # the process, run like the project's own broker

    def start(self) -> None:
        self.port = self.port or free_port()
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "operator-mosquitto.conf"
        lines = [
            "per_listener_settings false", "allow_anonymous true", f"listener {self.port} 127.0.0.1",
            f"certfile {self.cert}", f"keyfile {self.key}", "require_certificate false", "persistence false",
            "log_dest stderr", "log_type error", "log_type warning",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # our 0600 key stays readable
        conf.write_text("\n".join(lines) + "\n")
        self.broker = LocalBroker(conf=conf, port=self.port, log_file=self.dir / "operator-mosquitto.log")
        self.broker.start()

    def stop(self) -> None:
        if self.broker is not None:
            self.broker.stop()

    def kill(self) -> None:
        if self.broker is not None:
            self.broker.kill()


@dataclass
class Received:
    at: float
    msg: dict[str, Any]
    schema_errors: list[str]


@dataclass
class OperatorBackend:
    """The backend side of CLS.EEDI: publishes to ``to-localdevice``, records ``from-localdevice``."""

    host: str
    port: int
    ca: Path | None
    device_id: str = "chargegate"
    source: str = "operator-sim"
    received: list[Received] = field(default_factory=list)
    connected: bool = False
    read_reply: dict[str, Any] | None = None  # control data sent in reply to the device's read

    def __post_init__(self) -> None:
        self.to_device = f"clseedi/to-localdevice/{self.device_id}"
        self.from_device = f"clseedi/from-localdevice/{self.device_id}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"operator-{uuid.uuid4().hex[:6]}")
        if self.ca is not None:
            ctx = ssl.create_default_context(cafile=str(self.ca))
            c.tls_set_context(ctx)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_disconnect = lambda *a: setattr(self, "connected", False)
        self.client = c

    def _on_connect(self, client: mqtt.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        if not reason.is_failure:
            client.subscribe(self.from_device, qos=1)
            self.connected = True

    def _on_message(self, client: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            obj = json.loads(msg.payload)
            errs = m.schema_errors(obj)
        except json.JSONDecodeError as e:
            obj, errs = {"raw": msg.payload.decode(errors="replace")}, [f"not JSON: {e}"]
        self.received.append(Received(time.monotonic(), obj, errs))
        if (self.read_reply is not None and not errs and obj.get("type") == m.READ
                and isinstance(obj.get("id"), str)):
            client.publish(self.to_device, json.dumps(self.control(self.read_reply, relation=obj["id"])), qos=1)
        if self._loop is not None and self._event is not None:
            self._loop.call_soon_threadsafe(self._event.set)

    async def start(self, wait: float = 10) -> None:
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        # the broker's certificate names the operator host; connect to loopback with that name
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()
        deadline = time.monotonic() + wait
        while not self.connected:
            if time.monotonic() > deadline:
                raise TimeoutError("operator backend could not connect to its broker")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self.client.disconnect()
        await asyncio.get_running_loop().run_in_executor(None, self.client.loop_stop)

    # -- sending -------------------------------------------------------------------------------------
    def send(self, msg: dict[str, Any] | bytes | str) -> str | None:
        raw = msg if isinstance(msg, bytes | str) else json.dumps(msg)
        self.client.publish(self.to_device, raw, qos=1)
        return msg.get("id") if isinstance(msg, dict) else None

    def control(self, data: dict[str, Any], relation: str | None = None) -> dict[str, Any]:
        return m.envelope(m.CONTROL, self.source, {"protocol": m.PROTOCOL, **data}, relation)

    def limit(self, value_w: int, active: bool = True, duration_s: int | None = None) -> str:
        lim: dict[str, Any] = {"value": value_w, "active": active}
        if duration_s is not None:
            lim["duration"] = duration_s
        msg = self.control({"limits": {"power": {"active": {"consumption": lim}}}})
        self.send(msg)
        return str(msg["id"])

    def failsafe(self, value_w: int) -> str:
        msg = self.control({"failsafes": {"power": {"active": {"consumption": value_w}}}})
        self.send(msg)
        return str(msg["id"])

    def read(self, parameters: list[str] | None = None) -> str:
        msg = m.read(self.source, parameters)
        self.send(msg)
        return str(msg["id"])

    # -- waiting -------------------------------------------------------------------------------------
    def replies(self, relation: str) -> list[Received]:
        return [r for r in self.received if r.msg.get("relation") == relation]

    async def wait_reply(self, relation: str, within_s: float = 5) -> Received:
        return await self.wait_for(lambda r: r.msg.get("relation") == relation, within_s)

    async def wait_for(self, pred: Any, within_s: float = 5, after: int = 0) -> Received:
        assert self._event is not None
        deadline = time.monotonic() + within_s
        while True:
            for r in self.received[after:]:
                if pred(r):
                    return r
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no matching CLS.EEDI message from the device")
            self._event.clear()
            try:
                await asyncio.wait_for(self._event.wait(), left)
            except TimeoutError:
                pass


async def _main(args: argparse.Namespace) -> None:
    from smgw_link.pki import make_pki

    pki_dir = Path(args.pki)
    if not (pki_dir / "operator.pem").exists():
        make_pki(pki_dir, "brainpoolP256r1")
    broker = OperatorBroker(pki_dir / "operator-broker", pki_dir / "operator.pem", pki_dir / "operator.key",
                            args.port)
    broker.start()
    print(f"operator broker (TLS) on 127.0.0.1:{broker.port}", flush=True)
    backend = OperatorBackend("127.0.0.1", broker.port, pki_dir / "operator-ca.pem", device_id=args.device)
    try:
        await backend.start()
        if args.limit is not None:
            mid = backend.limit(args.limit, True, args.duration)
            r = await backend.wait_reply(mid, 30)
            print(json.dumps(r.msg), "schema errors:" if r.schema_errors else "", r.schema_errors or "")
        rid = backend.read()
        r = await backend.wait_reply(rid, 30)
        print(json.dumps(r.msg, indent=1))
        if args.stay:
            await asyncio.Event().wait()
    finally:
        await backend.stop()
        if not args.stay:
            broker.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m smgw_link.sim.operator", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pki", default="state/sim-pki")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--device", default="chargegate")
    ap.add_argument("--limit", type=int, default=None, help="send an LPC consumption limit (W)")
    ap.add_argument("--duration", type=int, default=None)
    ap.add_argument("--stay", action="store_true", help="keep the broker running")
    args = ap.parse_args(argv)
    try:
        asyncio.run(_main(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
