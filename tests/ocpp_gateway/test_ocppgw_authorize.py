"""Authorization as the backend decided it, asked once (issue 12.2, 12.5), over real WebSockets.

A 1.6 wallbox's Authorize(T) followed by StartTransaction(T) reaches the backend as one Authorize(T)
(the gateway used to authorize again at the start). A 2.0.1 wallbox's TransactionEvent for a token
the backend accepted is answered Accepted, not Invalid (a wallbox that stops on Invalid ends the
session); a token the backend refused stays refused."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from ocppgw_helpers import InProcessGateway, gateway_config, share_broker_secrets, until
from websockets.asyncio.client import ClientConnection, connect

from conftest import BrokerHandle
from ocpp_gateway.backend_sim import BackendSim

EVSES = """
  - id: a16
    circuit: grid
    ocpp: {charge_box_id: AUTH16, connector_id: 1}
  - id: a201
    circuit: grid
    ocpp: {charge_box_id: AUTH201, connector_id: 1, version: "2.0.1"}
    upstream: {version: "2.0.1", charge_box_id: UP-A201}
"""


@pytest.fixture(scope="module")
async def env(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory
              ) -> AsyncIterator[tuple[BackendSim, InProcessGateway]]:
    tmp: Path = tmp_path_factory.mktemp("ocppgw-auth")
    backend = BackendSim(tmp / "backend.sqlite")
    backend.rejected_tags.add("STOLEN")
    await backend.start()
    cfg, path = gateway_config(tmp / "gw", broker.port, backend_url=backend.url, evses=EVSES,
                               ocpp_extra="    free_charging: false\n")
    share_broker_secrets(cfg, broker.config)
    g = InProcessGateway(cfg, path)
    await g.start()
    for cp in ("a16", "UP-A201"):
        await backend.wait_connected(cp)
    try:
        yield backend, g
    finally:
        await g.stop()
        await backend.stop()


async def _call(ws: ClientConnection, uid: str, action: str, payload: dict[str, Any]) -> dict[str, Any]:
    await ws.send(json.dumps([2, uid, action, payload]))
    while True:
        m = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if m[0] == 2:
            await ws.send(json.dumps([3, m[1], {"status": "Accepted"} if m[2] != "GetConfiguration"
                                      else {"configurationKey": []}]))
            continue
        if m[1] == uid:
            assert m[0] == 3, m
            return dict(m[2])


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_16_authorize_then_start_asks_the_backend_once(env: tuple[BackendSim, InProcessGateway]) -> None:
    backend, g = env
    async with connect(f"ws://127.0.0.1:{g.cfg.ocpp.local.port}/ocpp/AUTH16", subprotocols=["ocpp1.6"],  # type: ignore[list-item]
                       proxy=None, open_timeout=5) as ws:
        await _call(ws, "b", "BootNotification", {"chargePointVendor": "v", "chargePointModel": "m"})
        await _call(ws, "s", "StatusNotification", {"connectorId": 1, "status": "Preparing", "errorCode": "NoError"})
        assert (await _call(ws, "a1", "Authorize", {"idTag": "CARD-1"}))["idTagInfo"]["status"] == "Accepted"
        start = await _call(ws, "t1", "StartTransaction", {"connectorId": 1, "idTag": "CARD-1", "meterStart": 10,
                                                           "timestamp": _now()})
        assert start["idTagInfo"]["status"] == "Accepted"
        # a refused tag stays refused at the start too
        assert (await _call(ws, "a2", "Authorize", {"idTag": "STOLEN"}))["idTagInfo"]["status"] == "Invalid"
    await until(lambda: any(pl.get("idTag") == "CARD-1" for _, _, pl in backend.calls("a16", "StartTransaction")),
                what="the start at the backend")
    auths = [pl["idTag"] for _, _, pl in backend.calls("a16", "Authorize")]
    assert auths.count("CARD-1") == 1, auths  # the wallbox's one Authorize, not a second at the start
    assert g.ctx is not None and g.ctx.counters["authorize_from_cache"] >= 1
    assert backend.errors_sent() == []


async def test_201_transaction_event_answers_what_the_backend_said(env: tuple[BackendSim, InProcessGateway]) -> None:
    backend, g = env
    async with connect(f"ws://127.0.0.1:{g.cfg.ocpp.local.port}/ocpp/AUTH201", subprotocols=["ocpp2.0.1"],  # type: ignore[list-item]
                       proxy=None, open_timeout=5) as ws:
        await _call(ws, "b", "BootNotification", {"reason": "PowerUp", "chargingStation": {"vendorName": "v",
                                                                                           "model": "m"}})
        tok = {"idToken": "CARD-2", "type": "ISO14443"}
        assert (await _call(ws, "a1", "Authorize", {"idToken": tok}))["idTokenInfo"]["status"] == "Accepted"
        base = {"transactionInfo": {"transactionId": "tx-auth-1"}, "evse": {"id": 1, "connectorId": 1}}
        started = await _call(ws, "e0", "TransactionEvent", {**base, "eventType": "Started", "timestamp": _now(),
                                                             "seqNo": 0, "triggerReason": "Authorized",
                                                             "idToken": tok})
        assert started["idTokenInfo"]["status"] == "Accepted"
        bad = {"idToken": "STOLEN", "type": "ISO14443"}
        assert (await _call(ws, "a2", "Authorize", {"idToken": bad}))["idTokenInfo"]["status"] == "Invalid"
        ended = await _call(ws, "e1", "TransactionEvent", {**base, "eventType": "Ended", "timestamp": _now(),
                                                           "seqNo": 1, "triggerReason": "StopAuthorized",
                                                           "idToken": bad,
                                                           "transactionInfo": {"transactionId": "tx-auth-1",
                                                                               "stoppedReason": "Local"}})
        assert ended["idTokenInfo"]["status"] == "Invalid"
    auths = [pl["idToken"]["idToken"] for _, _, pl in backend.calls("UP-A201", "Authorize")]
    assert auths == ["CARD-2", "STOLEN"]
    assert backend.errors_sent() == []
