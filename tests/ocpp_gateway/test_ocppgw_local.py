"""The local central system against bad input, floods, wrong credentials and TLS (real sockets)."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from ocppgw_helpers import InProcessGateway, gateway_config, make_pki, share_broker_secrets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus

from conftest import BrokerHandle
from ocpp_gateway.service import Gateway

EVSES = """
  - id: open1
    circuit: grid
    ocpp: {charge_box_id: CB-OPEN}
  - id: flood1
    circuit: grid
    ocpp: {charge_box_id: CB-FLOOD}
  - id: pw1
    circuit: grid
    ocpp: {charge_box_id: CB-PW, password: "s3cret-pw"}
  - id: v201
    circuit: grid
    ocpp: {charge_box_id: CB-201, version: "2.0.1"}
"""


@pytest.fixture(scope="module")
async def gw(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Gateway, int]]:
    tmp: Path = tmp_path_factory.mktemp("ocppgw-local")
    cfg, path = gateway_config(tmp, broker.port, backend_url=None, evses=EVSES,
                               ocpp_extra="    max_messages_per_s: 5\n")
    share_broker_secrets(cfg, broker.config)
    g = InProcessGateway(cfg, path)
    gateway = await g.start()
    try:
        yield gateway, cfg.ocpp.local.port
    finally:
        await g.stop()


async def ws_connect(port: int, cbid: str, proto: str = "ocpp1.6", **kw: Any) -> ClientConnection:
    return await connect(f"ws://127.0.0.1:{port}/ocpp/{cbid}", subprotocols=[proto], proxy=None,  # type: ignore[list-item]
                         open_timeout=5, **kw)


async def rpc(ws: ClientConnection, frame: str | list[Any]) -> list[Any]:
    await ws.send(frame if isinstance(frame, str) else json.dumps(frame))
    return list(json.loads(await asyncio.wait_for(ws.recv(), 5)))


TS = "2024-05-01T10:00:00Z"

BAD_16 = [
    ("not json at all", "-1", "FormationViolation"),
    ('{"a": 1}', "-1", "FormationViolation"),
    ('[2, "m1", "Heartbeat"]', "m1", "FormationViolation"),
    ('[2, "m2", "Heartbeat", []]', "m2", "FormationViolation"),
    ('[7, "m3", {}]', "m3", "FormationViolation"),
    ('[2, "m4", "FooBar", {}]', "m4", "NotImplemented"),
    (json.dumps([2, "m5", "StartTransaction", {"connectorId": 1, "idTag": "x", "timestamp": TS}]), "m5",
     "OccurenceConstraintViolation"),
    (json.dumps([2, "m6", "StartTransaction", {"connectorId": "1", "idTag": "x", "meterStart": 0, "timestamp": TS}]),
     "m6", "TypeConstraintViolation"),
    (json.dumps([2, "m7", "StatusNotification", {"connectorId": 1, "status": "Bogus", "errorCode": "NoError"}]),
     "m7", "PropertyConstraintViolation"),
    (json.dumps([2, "m8", "BootNotification", {"chargePointVendor": "v", "chargePointModel": "m", "x": 1}]), "m8",
     "FormationViolation"),
    (json.dumps([2, "m9", "Authorize", {"idTag": "x" * 21}]), "m9", "PropertyConstraintViolation"),
    (json.dumps([2, "m10", "StartTransaction", {"connectorId": 1, "idTag": "x", "meterStart": 0,
                                                 "timestamp": "yesterday"}]), "m10", "PropertyConstraintViolation"),
    (json.dumps([2, "m11", "GetConfiguration", {}]), "m11", "NotSupported"),  # a central system's message
]


@pytest.mark.parametrize(("frame", "uid", "code"), BAD_16)
async def test_bad_frames_16_get_the_right_callerror(gw: tuple[Gateway, int], frame: str, uid: str,
                                                     code: str) -> None:
    _, port = gw
    async with await ws_connect(port, "CB-OPEN") as ws:
        ans = await rpc(ws, frame)
        assert ans[0] == 4 and ans[1] == uid and ans[2] == code, ans
        # the connection stays up and works
        ok = await rpc(ws, [2, "hb", "Heartbeat", {}])
        assert ok[0] == 3 and ok[1] == "hb" and "currentTime" in ok[2]


async def test_bad_frames_201_use_201_codes(gw: tuple[Gateway, int]) -> None:
    gateway, port = gw
    async with await ws_connect(port, "CB-201", "ocpp2.0.1") as ws:
        assert (await rpc(ws, "{{{"))[:3] == [4, "-1", "RpcFrameworkError"]
        assert (await rpc(ws, '[9, "a", {}]'))[:3] == [4, "a", "MessageTypeNotSupported"]
        boot = {"reason": "PowerUp", "chargingStation": {"model": "m", "vendorName": "v"}, "bogus": 1}
        assert (await rpc(ws, [2, "b", "BootNotification", boot]))[:3] == [4, "b", "FormatViolation"]
        assert (await rpc(ws, [2, "c", "StatusNotification", {"timestamp": TS, "evseId": 1, "connectorId": 1}]))[:3] \
            == [4, "c", "OccurrenceConstraintViolation"]
        assert (await rpc(ws, [2, "d", "RemoteStartTransaction", {"idTag": "x"}]))[:3] == [4, "d", "NotImplemented"]
        ok = await rpc(ws, [2, "hb", "Heartbeat", {}])
        assert ok[0] == 3
    assert gateway.ctx.counters["ocpp_bad_frame"] > 0  # type: ignore[attr-defined]


async def test_flooding_charge_point_is_limited_without_hurting_others(gw: tuple[Gateway, int]) -> None:
    gateway, port = gw
    async with await ws_connect(port, "CB-FLOOD") as flood, await ws_connect(port, "CB-OPEN") as other:
        for i in range(60):
            await flood.send(json.dumps([2, f"f{i}", "Heartbeat", {}]))
        # the other charge point is served at once while the flood is being handled
        t0 = time.monotonic()
        ok = await rpc(other, [2, "o1", "Heartbeat", {}])
        assert ok[0] == 3 and time.monotonic() - t0 < 1.0
        answers = [json.loads(await asyncio.wait_for(flood.recv(), 5)) for _ in range(60)]
        rejected = [a for a in answers if a[0] == 4]
        assert rejected and all(a[2] == "GenericError" for a in rejected)
        assert len(answers) - len(rejected) <= 14  # burst of 2 s worth plus what refilled meanwhile
        # transaction messages are never refused: they wait for a token
        start = [2, "tx1", "StartTransaction", {"connectorId": 1, "idTag": "T", "meterStart": 10, "timestamp": TS}]
        ans = await asyncio.wait_for(rpc(flood, start), 5)
        assert ans[0] == 3 and isinstance(ans[2]["transactionId"], int)
    assert gateway.ctx.counters["ocpp_rate_limited"] > 0  # type: ignore[attr-defined]


async def test_unknown_charge_box_refused(gw: tuple[Gateway, int]) -> None:
    _, port = gw
    with pytest.raises(InvalidStatus) as e:
        await ws_connect(port, "CB-STRANGER")
    assert e.value.response.status_code == 404


async def test_basic_auth(gw: tuple[Gateway, int]) -> None:
    _, port = gw
    for auth in (None, "CB-PW:wrong", "OTHER:s3cret-pw"):
        headers = {}
        if auth:
            import base64

            headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
        with pytest.raises(InvalidStatus) as e:
            await ws_connect(port, "CB-PW", additional_headers=headers)
        assert e.value.response.status_code == 401
    ws = await connect(f"ws://CB-PW:s3cret-pw@127.0.0.1:{port}/ocpp/CB-PW", subprotocols=["ocpp1.6"],  # type: ignore[list-item]
                       proxy=None, open_timeout=5)
    async with ws:
        assert (await rpc(ws, [2, "hb", "Heartbeat", {}]))[0] == 3


async def test_subprotocol_negotiation(gw: tuple[Gateway, int]) -> None:
    _, port = gw
    ws = await connect(f"ws://127.0.0.1:{port}/ocpp/CB-OPEN", subprotocols=["ocpp2.0.1", "ocpp1.6"],  # type: ignore[list-item]
                       proxy=None)
    async with ws:
        assert ws.subprotocol == "ocpp2.0.1"  # the wallbox's preference when none is configured
    ws = await connect(f"ws://127.0.0.1:{port}/ocpp/CB-201", subprotocols=["ocpp1.6", "ocpp2.0.1"],  # type: ignore[list-item]
                       proxy=None)
    async with ws:
        assert ws.subprotocol == "ocpp2.0.1"  # configured version wins
    with pytest.raises(InvalidStatus) as e:
        await ws_connect(port, "CB-OPEN", "ocpp1.5")
    assert e.value.response.status_code == 400


# -- TLS ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
async def tls_gw(broker: BrokerHandle,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[int, dict[str, Path]]]:
    tmp: Path = tmp_path_factory.mktemp("ocppgw-tls")
    pki = make_pki(tmp / "pki", clients=("CB-TLS", "CB-OTHER"))
    cfg, path = gateway_config(tmp, broker.port, backend_url=None, evses="""
  - id: tls1
    circuit: grid
    ocpp: {charge_box_id: CB-TLS, password: "pw-tls"}
  - id: tls2
    circuit: grid
    ocpp: {charge_box_id: CB-OTHER}
""", ocpp_extra=f"    tls: 'on'\n    cert_file: {pki['server_cert']}\n    key_file: {pki['server_key']}\n"
                f"    client_ca_file: {pki['ca']}\n")
    share_broker_secrets(cfg, broker.config)
    g = InProcessGateway(cfg, path)
    await g.start()
    try:
        yield cfg.ocpp.local.port, pki
    finally:
        await g.stop()


def client_ctx(pki: dict[str, Path], who: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    if who:
        ctx.load_cert_chain(str(pki[f"{who}_cert"]), str(pki[f"{who}_key"]))
    return ctx


async def test_wss_with_client_certificate(tls_gw: tuple[int, dict[str, Path]]) -> None:
    port, pki = tls_gw
    ws = await connect(f"wss://CB-TLS:pw-tls@localhost:{port}/ocpp/CB-TLS", subprotocols=["ocpp1.6"],  # type: ignore[list-item]
                       ssl=client_ctx(pki, "CB-TLS"), proxy=None, open_timeout=5)
    async with ws:
        boot = await rpc(ws, [2, "b", "BootNotification", {"chargePointVendor": "v", "chargePointModel": "m"}])
        assert boot[0] == 3 and boot[2]["status"] == "Accepted"
    # a valid certificate of another charge box is refused
    with pytest.raises(InvalidStatus) as e:
        await connect(f"wss://localhost:{port}/ocpp/CB-TLS", subprotocols=["ocpp1.6"],  # type: ignore[list-item]
                      ssl=client_ctx(pki, "CB-OTHER"), proxy=None, open_timeout=5)
    assert e.value.response.status_code == 403
    # its own certificate but not the password of CB-TLS
    with pytest.raises(InvalidStatus):
        await connect(f"wss://localhost:{port}/ocpp/CB-TLS", subprotocols=["ocpp1.6"],  # type: ignore[list-item]
                      ssl=client_ctx(pki, "CB-TLS"), proxy=None, open_timeout=5)
    # without a client certificate the TLS handshake fails
    with pytest.raises((ssl.SSLError, OSError, InvalidHandshake)):
        ws = await connect(f"wss://localhost:{port}/ocpp/CB-OTHER", subprotocols=["ocpp1.6"],  # type: ignore[list-item]
                           ssl=client_ctx(pki, None), proxy=None, open_timeout=5)
        await ws.send("[2,\"x\",\"Heartbeat\",{}]")
        await asyncio.wait_for(ws.recv(), 5)
