"""Signed meter values (German Eichrecht, OCMF) reach the backend byte for byte, over real WebSockets.

OCPP 1.6 carries them as sampled values with ``format: "SignedData"`` (MeterValues and
``StopTransaction.transactionData``), OCPP 2.0.1 as ``signedMeterValue`` in a sampled value of a
TransactionEvent. Towards a backend of the same version every sampled value goes out exactly as the
wallbox sent it; across versions the signed data travels in the other version's form. The durable
queue keeps them across a gateway restart while the backend is away, and the bus status carries them
on the session (for the session record)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from ocppgw_helpers import InProcessGateway, gateway_config, share_broker_secrets, until
from websockets.asyncio.client import ClientConnection, connect

from chargegate import payloads as p
from chargegate.bus import Bus
from conftest import BrokerHandle, connected_bus
from ocpp_gateway.backend_sim import BackendSim

OCMF_BEGIN = ('OCMF|{"FV":"1.0","GI":"KEBA_KCP30","GS":"17619300","GV":"2.8.5","PG":"T32","MV":"Phoenix Contact",'
              '"RD":[{"TM":"2026-12-07T10:00:00,000+0000 S","TX":"B","RV":1000,"RI":"1-b:1.8.0","RU":"Wh"}]}|'
              '{"SA":"ECDSA-secp256r1-SHA256","SD":"3045022100C3A1"}')
OCMF_END = OCMF_BEGIN.replace('"TX":"B","RV":1000', '"TX":"E","RV":2100').replace("C3A1", "D4B2")

EVSES = """
  - id: s16
    circuit: grid
    ocpp: {charge_box_id: SIG16, connector_id: 1}
  - id: s201
    circuit: grid
    ocpp: {charge_box_id: SIG201, connector_id: 1, version: "2.0.1"}
    upstream: {version: "2.0.1", charge_box_id: UP-S201}
  - id: x16
    circuit: grid
    ocpp: {charge_box_id: SIGX16, connector_id: 1}
    upstream: {version: "2.0.1", charge_box_id: UP-X16}
  - id: x201
    circuit: grid
    ocpp: {charge_box_id: SIGX201, connector_id: 1, version: "2.0.1"}
"""


class Env:
    backend: BackendSim
    g: InProcessGateway
    obs: Bus
    status: dict[str, p.EvseStatus]


@pytest.fixture(scope="module")
async def env(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    tmp: Path = tmp_path_factory.mktemp("ocppgw-signed")
    e = Env()
    e.status = {}
    e.backend = BackendSim(tmp / "backend.sqlite")
    await e.backend.start()
    cfg, path = gateway_config(tmp / "gw", broker.port, backend_url=e.backend.url, evses=EVSES)
    share_broker_secrets(cfg, broker.config)
    e.g = InProcessGateway(cfg, path)
    await e.g.start()
    e.obs = await connected_bus(broker, "observer")
    e.obs.subscribe("evse.status", lambda m: e.status.__setitem__(m.payload.evse_id, m.payload))
    for cp in ("s16", "UP-S201", "UP-X16", "x201"):
        await e.backend.wait_connected(cp)
    try:
        yield e
    finally:
        await e.g.stop()
        await e.obs.stop()
        await e.backend.stop()


Call = Callable[[str, str, dict[str, Any]], Awaitable[list[Any]]]


async def wallbox(env: Env, cbid: str, version: str) -> tuple[ClientConnection, Call]:
    ws = await connect(f"ws://127.0.0.1:{env.g.cfg.ocpp.local.port}/ocpp/{cbid}",
                       subprotocols=[f"ocpp{version}"], proxy=None, open_timeout=5)  # type: ignore[list-item]

    async def call(uid: str, action: str, payload: dict[str, Any]) -> list[Any]:
        await ws.send(json.dumps([2, uid, action, payload]))
        while True:
            m = json.loads(await asyncio.wait_for(ws.recv(), 5))
            if m[0] == 2:  # the gateway's own calls (configuration, profiles, triggers): accept them
                res: dict[str, Any] = {"status": "Accepted"}
                if m[2] == "GetConfiguration":
                    res = {"configurationKey": []}
                await ws.send(json.dumps([3, m[1], res]))
                continue
            if m[1] == uid:
                assert m[0] == 3, m
                return list(m)

    if version == "1.6":
        await call("boot", "BootNotification", {"chargePointVendor": "KEBA", "chargePointModel": "KC-P30"})
        await call("st", "StatusNotification", {"connectorId": 1, "status": "Preparing", "errorCode": "NoError"})
    else:
        await call("boot", "BootNotification", {"reason": "PowerUp", "chargingStation": {
            "vendorName": "KEBA", "model": "KC-P30"}})
        await call("st", "StatusNotification", {"timestamp": _ts(0), "connectorStatus": "Occupied", "evseId": 1,
                                                "connectorId": 1})
    return ws, call


T0 = (datetime.now(UTC) - timedelta(seconds=60)).replace(microsecond=0)


def _ts(s: int) -> str:
    return (T0 + timedelta(seconds=s)).strftime("%Y-%m-%dT%H:%M:%SZ")


def sv16(value: str, context: str, signed: bool = False) -> dict[str, Any]:
    out = {"value": value, "context": context, "measurand": "Energy.Active.Import.Register", "unit": "Wh",
           "location": "Outlet"}
    if signed:
        out["format"] = "SignedData"
    return out


def sv201(value: int, context: str, signed: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"value": value, "context": context, "measurand": "Energy.Active.Import.Register",
                           "unitOfMeasure": {"unit": "Wh", "multiplier": 0}, "location": "Outlet"}
    if signed is not None:
        out["signedMeterValue"] = {"signedMeterData": signed, "signingMethod": "ECDSA-secp256r1-SHA256",
                                   "encodingMethod": "OCMF", "publicKey": "3059301306072A8648CE3D0201"}
    return out


def received(env: Env, cp: str, action: str) -> list[dict[str, Any]]:
    return [m[3] for _, _, m in env.backend.frames(cp, "in") if m[0] == 2 and m[2] == action]


async def session_16(call: Call, tag: str) -> None:
    ans = await call("start", "StartTransaction", {"connectorId": 1, "idTag": tag, "meterStart": 1000,
                                                   "timestamp": _ts(0)})
    tid = ans[2]["transactionId"]
    await call("mv1", "MeterValues", {"connectorId": 1, "transactionId": tid, "meterValue": [
        {"timestamp": _ts(0), "sampledValue": [sv16("1000", "Transaction.Begin"),
                                               sv16(OCMF_BEGIN, "Transaction.Begin", signed=True)]}]})
    await call("stop", "StopTransaction", {"transactionId": tid, "meterStop": 2100, "timestamp": _ts(30),
                                           "reason": "EVDisconnected", "transactionData": [
        {"timestamp": _ts(30), "sampledValue": [sv16("2100", "Transaction.End"),
                                                sv16(OCMF_END, "Transaction.End", signed=True)]}]})


async def session_201(call: Call, tid: str, tag: str) -> None:
    base = {"transactionInfo": {"transactionId": tid}, "evse": {"id": 1, "connectorId": 1}}
    await call("e0", "TransactionEvent", {**base, "eventType": "Started", "timestamp": _ts(0), "seqNo": 0,
                                          "triggerReason": "Authorized",
                                          "idToken": {"idToken": tag, "type": "ISO14443"},
                                          "meterValue": [{"timestamp": _ts(0), "sampledValue": [
                                              sv201(1000, "Transaction.Begin", OCMF_BEGIN)]}]})
    await call("e1", "TransactionEvent", {**base, "eventType": "Ended", "timestamp": _ts(30), "seqNo": 1,
                                          "triggerReason": "EVCommunicationLost",
                                          "transactionInfo": {"transactionId": tid, "stoppedReason": "EVDisconnected"},
                                          "meterValue": [{"timestamp": _ts(30), "sampledValue": [
                                              sv201(2100, "Transaction.End", OCMF_END)]}]})


async def test_16_signed_data_reaches_a_16_backend_byte_for_byte_and_the_bus(env: Env) -> None:
    ws, call = await wallbox(env, "SIG16", "1.6")
    seen: list[list[p.SignedMeterValue]] = []
    env.obs.subscribe("evse.status", lambda m: m.payload.evse_id == "s16" and m.payload.session is not None
                      and seen.append(m.payload.session.signed_meter_values))
    async with ws:
        await session_16(call, "SIGTAG16")
    await until(lambda: env.g.gw.queue.count("s16") == 0 and received(env, "s16", "StopTransaction"), what="delivery")
    mv = [x for x in received(env, "s16", "MeterValues") if "transactionId" in x]
    assert mv and mv[-1]["meterValue"][0]["sampledValue"] == [sv16("1000", "Transaction.Begin"),
                                                              sv16(OCMF_BEGIN, "Transaction.Begin", signed=True)]
    stop = received(env, "s16", "StopTransaction")[-1]
    assert "idTag" not in stop  # the wallbox sent none: the gateway adds none (issue 12.10)
    assert stop["transactionData"] == [{"timestamp": _ts(30), "sampledValue": [
        sv16("2100", "Transaction.End"), sv16(OCMF_END, "Transaction.End", signed=True)]}]
    assert env.backend.errors_sent() == []
    # the session on the bus carried the signed data exactly as sent (the session record keeps it)
    await until(lambda: any(len(x) == 2 for x in seen), what="both signed values on the bus")
    last = next(x for x in reversed(seen) if len(x) == 2)
    assert [(s.data, s.format, s.context) for s in last] == [(OCMF_BEGIN, "OCMF", "Transaction.Begin"),
                                                            (OCMF_END, "OCMF", "Transaction.End")]


async def test_201_signed_meter_value_reaches_a_201_backend_byte_for_byte(env: Env) -> None:
    ws, call = await wallbox(env, "SIG201", "2.0.1")
    async with ws:
        await session_201(call, "tx-sig-201", "SIGTAG201")
    await until(lambda: env.g.gw.queue.count("UP-S201") == 0 and any(
        x["eventType"] == "Ended" for x in received(env, "UP-S201", "TransactionEvent")), what="delivery")
    events = {x["eventType"]: x for x in received(env, "UP-S201", "TransactionEvent")}
    assert events["Started"]["meterValue"] == [{"timestamp": _ts(0), "sampledValue": [
        sv201(1000, "Transaction.Begin", OCMF_BEGIN)]}]
    assert events["Ended"]["meterValue"] == [{"timestamp": _ts(30), "sampledValue": [
        sv201(2100, "Transaction.End", OCMF_END)]}]
    assert env.backend.errors_sent() == []


async def test_signed_data_crosses_versions(env: Env) -> None:
    """1.6 wallbox -> 2.0.1 backend: SignedData becomes the signedMeterValue of the value it signs.
    2.0.1 wallbox -> 1.6 backend: signedMeterValue becomes a SignedData sampled value next to it."""
    ws, call = await wallbox(env, "SIGX16", "1.6")
    async with ws:
        await session_16(call, "SIGTAGX16")
    ws, call = await wallbox(env, "SIGX201", "2.0.1")
    async with ws:
        await session_201(call, "tx-sig-x201", "SIGTAGX201")
    await until(lambda: env.g.gw.queue.count("UP-X16") == 0 and env.g.gw.queue.count("x201") == 0
                and any(x["eventType"] == "Ended" for x in received(env, "UP-X16", "TransactionEvent"))
                and received(env, "x201", "StopTransaction"), what="delivery")
    ev = [x for x in received(env, "UP-X16", "TransactionEvent")]
    signed = [sv["signedMeterValue"] for x in ev for mv in x.get("meterValue", []) for sv in mv["sampledValue"]
              if "signedMeterValue" in sv]
    assert [s["signedMeterData"] for s in signed] == [OCMF_BEGIN, OCMF_END]
    assert all(s["encodingMethod"] == "OCMF" for s in signed)
    stop = received(env, "x201", "StopTransaction")[-1]
    svs = [sv for mv in stop["transactionData"] for sv in mv["sampledValue"]]
    assert {"value": OCMF_END, "format": "SignedData"}.items() <= next(
        sv for sv in svs if sv.get("format") == "SignedData").items()
    mv16 = [sv for x in received(env, "x201", "MeterValues") if "transactionId" in x for mv in x["meterValue"]
            for sv in mv["sampledValue"] if sv.get("format") == "SignedData"]
    assert [sv["value"] for sv in mv16] == [OCMF_BEGIN]  # the Started event's signed begin, after the start
    assert env.backend.errors_sent() == []


async def test_signed_data_survives_a_restart_while_the_backend_is_away(env: Env) -> None:
    await env.backend.go_away()
    ws, call = await wallbox(env, "SIG16", "1.6")
    async with ws:
        await session_16(call, "SIGTAGRESTART")
    assert env.g.gw.queue.count("s16") >= 3  # start, meter values, stop: queued durably
    await env.g.stop()
    await env.g.start()
    await env.backend.come_back()
    await until(lambda: env.g.gw.queue.count("s16") == 0 and any(
        x.get("transactionData", [{}])[0].get("timestamp") == _ts(30) and x["meterStop"] == 2100
        for x in received(env, "s16", "StopTransaction")), 20, what="delivery after the restart")
    stops = received(env, "s16", "StopTransaction")
    assert stops[-1]["transactionData"][0]["sampledValue"][1] == sv16(OCMF_END, "Transaction.End", signed=True)
    assert env.backend.errors_sent() == []
