"""smgw-link as a whole: real Mosquitto (project bus), SMGW simulator (brainpool HAN TLS, SOCKS5),
the operator's own Mosquitto (TLS) with a CLS.EEDI backend, the variables API and the inbound channel."""

from __future__ import annotations

import asyncio
import json
import math
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from admin_support import running_link
from hypothesis import given
from hypothesis import strategies as st

from chargegate import payloads as p
from chargegate.broker import free_port
from chargegate.bus import Bus
from chargegate.runtime import ServiceContext
from conftest import BrokerHandle, connected_bus, make_config, wait_for
from fuzz_support import fuzz, scalars
from smgw_link.certstore import CertStore
from smgw_link.clseedi import messages as m
from smgw_link.pki import Pki, make_pki
from smgw_link.sim.operator import OperatorBackend, OperatorBroker
from smgw_link.sim.smgw import SmgwSim, http_request

TOKEN = "test-token-0123456789"


@dataclass
class Rig:
    pki: Pki
    sim: SmgwSim
    op_broker: OperatorBroker
    backend: OperatorBackend
    ctx: ServiceContext
    observer: Bus
    controller: Bus
    http_port: int
    inbound_port: int
    limits: dict[str, list[p.GridLimit]] = field(default_factory=dict)
    links: list[p.SmgwLinkStatus] = field(default_factory=list)
    tariffs: list[p.TariffCurrent] = field(default_factory=list)

    def last(self, source: str) -> p.GridLimit | None:
        return self.limits.get(source, [None])[-1]  # type: ignore[list-item]

    async def http(self, method: str, path: str, body: Any = None, token: str | None = TOKEN) -> tuple[int, Any]:
        streams = await asyncio.open_connection("127.0.0.1", self.http_port)
        status, raw = await http_request(streams, method, path, token,
                                         json.dumps(body).encode() if body is not None else None)
        return status, json.loads(raw) if raw else None


def service_yaml(broker: BrokerHandle, pki: Pki, sim_port: int, fwd_port: int, http_port: int, inbound_port: int,
                 store: Path) -> str:
    accounts = {a: broker.password(a) for a in ("smgw-link", "load-controller", "observer")}
    return f"""
site: {{name: smgw-test}}
broker:
  port: {broker.port}
  accounts: {json.dumps(accounts)}
circuits:
  - id: grid
    fuse_a: 35
    meter: grid-meter
evses:
  - id: wb1
    circuit: grid
    modbus: {{profile: alfen-eve, host: 127.0.0.1, port: 1502}}
meters:
  - id: grid-meter
    modbus: {{profile: sdm630, host: 127.0.0.1, port: 1503}}
smgw:
  enabled: true
  gateway: {{host: 127.0.0.1, port: {sim_port}, trust_anchor: {pki.gateway_ca}, server_name: smgw.local,
            connect_timeout_s: 2}}
  cert_store: {store}
  keepalive_s: 1
  reconnect_min_s: 0.1
  reconnect_max_s: 0.3
  functions: {{power_reduction: true, tariffs: true}}
  endpoints:
    - {{name: operator-mqtt, host: mqtt.operator.test, port: 8883, listen_port: {fwd_port}, purpose: clseedi}}
    - {{name: operator-ocpp, host: ocpp.operator.test, port: 443, listen_port: {free_port()}, purpose: ocpp}}
  clseedi: {{enabled: true, endpoint: operator-mqtt, ca_file: {pki.operator_ca}, device_id: house-1, keepalive_s: 5}}
  inbound: {{enabled: true, host: 127.0.0.1, port: {inbound_port}, allowed_sha256: ["{pki.gateway_fingerprint()}"]}}
  http_api: {{host: 127.0.0.1, port: {http_port}, house_power_w: 24000, tokens: ["{TOKEN}"]}}
  link_loss_grace_s: 1
  failsafe_duration_s: 60
  limit_heartbeat_s: 1
  limit_hold_s: 3
"""


@pytest.fixture(scope="module")
async def rig(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    tmp = tmp_path_factory.mktemp("smgw-service")
    pki = make_pki(tmp / "pki", "brainpoolP256r1")
    store = CertStore(tmp / "store")
    store.import_pem("cls", pki.client_cert, pki.client_key)
    store.select("cls")
    op_broker = OperatorBroker(tmp / "operator", pki.operator_cert, pki.operator_key)
    op_broker.start()
    sim = SmgwSim(cert=pki.gateway_cert, key=pki.gateway_key, client_ca=pki.device_ca,
                  routes={"mqtt.operator.test:8883": ("127.0.0.1", op_broker.port)})
    await sim.start()
    backend = OperatorBackend("127.0.0.1", op_broker.port, pki.operator_ca, device_id="house-1")
    await backend.start()
    http_port, inbound_port = free_port(), free_port()
    cfg = make_config(tmp, service_yaml(broker, pki, sim.port, free_port(), http_port, inbound_port, tmp / "store"))
    observer = await connected_bus(broker, "observer")
    controller = await connected_bus(broker, "load-controller")
    controller.publish("service.health", p.Health(service="load-controller", status=p.HealthStatus.ONLINE),
                       service="load-controller")
    try:
        async with running_link(cfg, tmp / "chargegate.yaml") as ctx:
            r = Rig(pki, sim, op_broker, backend, ctx, observer, controller, http_port, inbound_port)
            observer.subscribe("grid.limit",
                               lambda msg: r.limits.setdefault(msg.params["source"], []).append(msg.payload))
            observer.subscribe("link.smgw", lambda msg: r.links.append(msg.payload))
            observer.subscribe("tariff.current", lambda msg: r.tariffs.append(msg.payload))
            await wait_for(lambda: bool(r.links) and r.links[-1].state == p.LinkState.UP, 15)
            yield r
    finally:
        await backend.stop()
        await observer.stop()
        await controller.stop()
        await sim.stop()
        op_broker.stop()


async def test_link_up_with_certificate_and_channels(rig: Rig) -> None:
    st = rig.links[-1]
    assert st.state == p.LinkState.UP and st.error is None
    assert st.certificate == "cls" and st.cert_days_left is not None and 360 < st.cert_days_left < 366
    assert st.channels["tls"]["version"] == "TLSv1.2"
    assert st.channels["operator-mqtt"]["opened"] >= 1
    assert st.channels["operator-ocpp"]["enabled"] is False  # ocpp_via_smgw is off
    assert st.channels["clseedi"]["connected"] is True
    await wait_for(lambda: rig.links[-1].bytes_tx > 0 and rig.links[-1].bytes_rx > 0, 5)
    # on connect the device announced its use cases and asked the backend for its control state
    await rig.backend.wait_for(lambda r: r.msg.get("type") == m.READ, 5)
    await rig.backend.wait_for(lambda r: r.msg.get("type") == m.STATE, 5)
    reads = [x for x in rig.backend.received if x.msg.get("type") == m.READ]
    states = [x for x in rig.backend.received if x.msg.get("type") == m.STATE]
    assert reads and states and all(not x.schema_errors for x in rig.backend.received)
    assert "lpc" in states[0].msg["data"]["supportedEebusUseCases"]


async def test_clseedi_limit_reaches_the_bus_and_is_acked(rig: Rig) -> None:
    n = len(rig.limits.get("dso", []))
    mid = rig.backend.limit(5000)
    ack = await rig.backend.wait_reply(mid)
    assert ack.msg["type"] == m.ACK and ack.msg["data"]["errorNumber"] == 0 and not ack.schema_errors
    await wait_for(lambda: len(rig.limits.get("dso", [])) > n and rig.last("dso").power_w == 5000, 5)  # type: ignore[union-attr]
    gl = rig.last("dso")
    assert gl is not None and gl.active and gl.source == p.LimitSource.DSO and gl.scope == p.LimitScope.CONTROLLABLE
    assert (gl.valid_until - gl.ts).total_seconds() <= 3.01  # refreshed, never open-ended
    # it stays fresh (heartbeat), while smgw-link lives
    k = len(rig.limits["dso"])
    await wait_for(lambda: len(rig.limits["dso"]) > k, 3)
    assert rig.last("dso").active  # type: ignore[union-attr]
    rid = rig.backend.read(["limits"])
    state = await rig.backend.wait_reply(rid)
    assert state.msg["data"]["limits"]["power"]["active"]["consumption"]["value"] == 5000


async def test_limit_with_duration_expires(rig: Rig) -> None:
    mid = rig.backend.limit(3000, duration_s=2)
    assert (await rig.backend.wait_reply(mid)).msg["data"]["errorNumber"] == 0
    await wait_for(lambda: rig.last("dso") is not None and rig.last("dso").power_w == 3000, 5)  # type: ignore[union-attr]
    gl = rig.last("dso")
    assert gl is not None and gl.valid_until <= gl.ts + __import__("datetime").timedelta(seconds=2.01)
    mark = len(rig.backend.received)
    await wait_for(lambda: not rig.last("dso").active, 5)  # type: ignore[union-attr]
    # the backend is told (unsolicited state: limits no longer active)
    note = await rig.backend.wait_for(lambda r: r.msg.get("type") == m.STATE and "limits" in r.msg["data"], 5, mark)
    assert note.msg["data"]["limits"]["power"]["active"]["consumption"]["active"] is False


async def test_invalid_message_gets_error_1_and_changes_nothing(rig: Rig) -> None:
    mid = rig.backend.limit(7000)
    await rig.backend.wait_reply(mid)
    await wait_for(lambda: rig.last("dso").power_w == 7000, 5)  # type: ignore[union-attr]
    bad = rig.backend.control({"limits": {"power": {"active": {"consumption": {"value": "lots", "active": True}}}}})
    rig.backend.send(bad)
    ack = await rig.backend.wait_reply(bad["id"])
    assert ack.msg["data"]["errorNumber"] == 1
    rig.backend.send(b"\x00garbage")
    await rig.backend.wait_for(lambda r: r.msg.get("type") == m.ACK and "relation" not in r.msg, 5)
    await asyncio.sleep(0.3)
    assert rig.last("dso").power_w == 7000 and rig.last("dso").active  # type: ignore[union-attr]
    assert rig.ctx.counters["clseedi_invalid"] >= 2


async def test_http_api_auth_validation_and_variables(rig: Rig) -> None:
    assert (await rig.http("GET", "/api/variables", token=None))[0] == 401
    assert (await rig.http("GET", "/api/variables", token="wrong"))[0] == 401
    assert (await rig.http("PUT", "/api/variables/AVAIL", {"value": 150}))[0] == 422
    assert (await rig.http("PUT", "/api/variables/AVAIL", {"value": "x"}))[0] == 422
    # numbers are strict: a boolean is not 1 %, a numeric string is not a number, NaN/Infinity are refused
    for bad in (True, False, "50", float("nan"), float("inf")):
        status, body = await rig.http("PUT", "/api/variables/AVAIL", {"value": bad})
        assert status == 422, (bad, status, body)
    assert (await rig.http("PUT", "/api/variables/AVAIL", {"value": 50, "duration_s": True}))[0] == 422
    for val in ("nan", "inf", "1e999", "true"):
        assert (await rig.http("GET", f"/cnf?cmd=set_cm_vars&name=AVAIL&val={val}"))[0] == 422, val
    assert rig.last("local") is None or not rig.last("local").active  # type: ignore[union-attr]  # nothing set
    assert (await rig.http("PUT", "/api/variables/AVAIL", {"value": 50, "extra": 1}))[0] == 422
    assert (await rig.http("PUT", "/api/variables/TARIF", {"value": 2}))[0] == 422
    assert (await rig.http("PUT", "/api/variables/NOPE", {"value": 2}))[0] == 404
    status, body = await rig.http("PUT", "/api/variables/AVAIL", {"value": 50})
    assert status == 200 and body["value"] == 50
    await wait_for(lambda: rig.last("local") is not None and rig.last("local").active, 5)  # type: ignore[union-attr]
    gl = rig.last("local")
    assert gl is not None and gl.power_w == 12000 and gl.scope == p.LimitScope.GRID
    status, body = await rig.http("GET", "/cnf?cmd=set_cm_vars&name=TARIF&val=1")
    assert status == 200 and body == {"TARIF": 1.0}
    await wait_for(lambda: bool(rig.tariffs) and rig.tariffs[-1].period.level == p.TariffLevel.LOW, 5)
    status, body = await rig.http("GET", "/cnf?cmd=get_cm_vars")
    assert body == {"AVAIL": 50.0, "TARIF": 1.0}
    assert (await rig.http("PUT", "/api/variables/AVAIL", {"value": 100}))[0] == 200
    await wait_for(lambda: not rig.last("local").active, 5)  # type: ignore[union-attr]
    assert (await rig.http("PUT", "/api/variables/TARIF", {"value": 0}))[0] == 200
    status, doc = await rig.http("GET", "/openapi.json", token=None)
    assert status == 200 and "/api/variables/{name}" in doc["paths"]


async def test_inbound_channel_reaches_the_api(rig: Rig) -> None:
    streams = await rig.sim.open_inbound("127.0.0.1", rig.inbound_port, rig.pki.device_ca)
    status, body = await http_request(streams, "PUT", "/api/variables/AVAIL", TOKEN, b'{"value": 40}')
    assert status == 200, body
    await wait_for(lambda: rig.last("supplier") is not None and rig.last("supplier").active, 5)  # type: ignore[union-attr]
    assert rig.last("supplier").power_w == 9600  # type: ignore[union-attr]
    streams = await rig.sim.open_inbound("127.0.0.1", rig.inbound_port, rig.pki.device_ca)
    assert (await http_request(streams, "PUT", "/api/variables/AVAIL", None, b'{"value": 40}'))[0] == 401
    streams = await rig.sim.open_inbound("127.0.0.1", rig.inbound_port, rig.pki.device_ca)
    assert (await http_request(streams, "PUT", "/api/variables/AVAIL", TOKEN, b'{"value": 100}'))[0] == 200
    await wait_for(lambda: not rig.last("supplier").active, 5)  # type: ignore[union-attr]


async def test_link_loss_leads_to_the_failsafe_limit(rig: Rig) -> None:
    mid = rig.backend.failsafe(4800)
    assert (await rig.backend.wait_reply(mid)).msg["data"]["errorNumber"] == 0
    await wait_for(lambda: rig.last("dso").failsafe_power_w == 4800, 5)  # type: ignore[union-attr]
    seen: dict[str, float] = {}  # when the failsafe limit and the `down` status first arrived
    rig.observer.subscribe("grid.limit", lambda m: m.payload.id == "failsafe" and seen.setdefault(
        "failsafe", time.monotonic()))
    rig.observer.subscribe("link.smgw", lambda m: m.payload.state == p.LinkState.DOWN and seen.setdefault(
        "down", time.monotonic()))
    # the gateway goes away (port closed, every channel cut)
    await rig.sim.pause()
    rig.sim.drop_all()
    await wait_for(lambda: rig.links[-1].state == p.LinkState.CONNECTING, 5)
    await wait_for(lambda: rig.last("dso").id == "failsafe", 6)  # type: ignore[union-attr]
    gl = rig.last("dso")
    assert gl is not None and gl.active and gl.power_w == 4800 and "failsafe" in (gl.reason or "")
    await wait_for(lambda: rig.links[-1].state == p.LinkState.DOWN, 5)
    # `down` is published with the failsafe (it used to follow up to 1 s later)
    assert abs(seen["down"] - seen["failsafe"]) < 0.25, seen
    assert rig.links[-1].error and "refused" in rig.links[-1].error
    assert rig.links[-1].channels["failsafe"] is True
    # back: the device asks for the backend's control state; the reply's limit ends the failsafe
    rig.backend.read_reply = {"limits": {"power": {"active": {"consumption": {"value": 6500, "active": True}}}}}
    await rig.sim.resume()
    await wait_for(lambda: rig.links[-1].state == p.LinkState.UP, 20)
    await wait_for(lambda: rig.last("dso").id != "failsafe" and rig.last("dso").power_w == 6500, 10)  # type: ignore[union-attr]
    rig.backend.read_reply = None


async def test_inbound_operator_commands_need_the_function_switch(tmp_path: Path) -> None:
    """Functions off: the operator's AVAIL/TARIF through the inbound channel are 'not supported'
    (403, logged, nothing changes); the same variables set locally still work."""
    import socket
    from datetime import UTC, datetime

    from chargegate.config.smgw import Smgw
    from smgw_link.control import OperatorControl
    from smgw_link.httpapi import ApiState, make_app
    from smgw_link.service import _serve_http

    cfg = Smgw.model_validate({"http_api": {"tokens": [TOKEN]}, "inbound": {"enabled": True}})
    control = OperatorControl.load(cfg, None, datetime.now(UTC))
    counters: dict[str, int] = {}
    state = ApiState(cfg, control, lambda: None, lambda: datetime.now(UTC), counters)
    servers = []
    ports = {}
    for origin in ("inbound", "local"):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        ports[origin] = sock.getsockname()[1]
        servers.append(await _serve_http(make_app(state, origin), sock))  # type: ignore[arg-type]
    try:
        async def put(origin: str, name: str, value: float) -> int:
            streams = await asyncio.open_connection("127.0.0.1", ports[origin])
            body = json.dumps({"value": value}).encode()
            return (await http_request(streams, "PUT", f"/api/variables/{name}", TOKEN, body))[0]

        assert await put("inbound", "AVAIL", 30) == 403
        assert await put("inbound", "TARIF", 1) == 403
        assert control.avail == {} and control.tarif is None
        assert counters["http_not_supported"] == 2
        assert await put("local", "AVAIL", 30) == 200
        assert control.avail["local"].percent == 30
    finally:
        for s in servers:
            await s.stop()


# -- fuzz of the variables API (issue 14): any name and value, both ways in ------------------------------------

_RANGE = {"AVAIL": lambda x: 0 <= x <= 100, "TARIF": lambda x: x in (0, 1)}
_VALS = st.one_of(st.sampled_from(["50", "0", "100", "-1", "101", "1e999", "nan", "inf", "-inf", "true", "50.5",
                                   "0x10", " 50", "5e1", "1_0", "", "1,5", "1" * 40, "-0", "1e-320"]),
                  st.integers(-200, 200).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                  st.text(max_size=12))
_NAMES = st.one_of(st.sampled_from(["AVAIL", "TARIF", "avail", "NOPE", "", "../AVAIL", "AVAIL "]), st.text(max_size=8))


def _number(text: str) -> float | None:
    try:
        x = float(text)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


@fuzz(80)
@given(via=st.sampled_from(["cnf", "put"]), name=_NAMES, val=_VALS,
       json_value=st.one_of(scalars, st.lists(scalars, max_size=2), st.dictionaries(st.text(max_size=3), scalars,
                                                                                    max_size=2)),
       extra=st.booleans())
async def test_variables_api_with_any_name_and_value(rig: Rig, via: str, name: str, val: str, json_value: Any,
                                                     extra: bool) -> None:
    """A known variable with a number in its range is set (and said back); anything else is a 4xx with a reason
    and sets nothing; the service answers the next request."""
    before = (await rig.http("GET", "/cnf?cmd=get_cm_vars"))[1]
    if via == "cnf":
        status, body = await rig.http("GET", "/cnf?cmd=set_cm_vars&name=" + urllib.parse.quote(name, safe="")
                                      + "&val=" + urllib.parse.quote(val, safe=""))
        x = _number(val) if len(val) <= 32 else None
    else:
        doc = {"value": json_value, **({"x": 1} if extra else {})}
        status, body = await rig.http("PUT", "/api/variables/" + urllib.parse.quote(name, safe=""), doc)
        ok_type = isinstance(json_value, int | float) and not isinstance(json_value, bool)
        x = float(json_value) if ok_type and math.isfinite(json_value) and not extra else None
    valid = len(name) <= 32 and name in _RANGE and x is not None and _RANGE[name](x)
    if valid:
        assert status == 200, (via, name, val, json_value, status, body)
        said = body.get(name) if via == "cnf" else body["value"]
        assert said == x
        # back to the defaults (no limit, normal tariff) for the next example
        assert (await rig.http("PUT", f"/api/variables/{name}", {"value": 100 if name == "AVAIL" else 0}))[0] == 200
    else:
        assert 400 <= status < 500, (via, name, val, json_value, status, body)
        assert isinstance(body, dict) and body.get("detail"), body  # says what was wrong
        assert (await rig.http("GET", "/cnf?cmd=get_cm_vars"))[1] == before  # nothing set
