"""A wallbox's transaction message is on disk before the wallbox gets its answer and before the backend gets
the message, while the fsync that puts it there runs off the event loop (TxQueue.deferred_sync / sync).

Real WebSockets, the real broker, the backend simulator; the WAL's fdatasync is held back by a gate: until it
is released the wallbox has no answer and the backend nothing, the message is committed in the queue, and a
second wallbox is answered meanwhile (the loop is not stopped by the fsync)."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from ocppgw_helpers import InProcessGateway, gateway_config, share_broker_secrets, until
from websockets.asyncio.client import ClientConnection, connect

from conftest import BrokerHandle
from ocpp_gateway.backend_sim import BackendSim
from ocpp_gateway.txqueue import TxQueue

EVSES = """
  - id: wa
    circuit: grid
    ocpp: {charge_box_id: CB-A}
  - id: wb
    circuit: grid
    ocpp: {charge_box_id: CB-B}
"""


class Box:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.n = 0
        self.answers: dict[str, Any] = {}
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            if msg[0] in (3, 4):
                self.answers[msg[1]] = msg
            elif msg[0] == 2:  # the gateway's own calls (configuration, profiles)
                await self.ws.send(json.dumps([3, msg[1], {"status": "Accepted"}]))

    async def send(self, action: str, payload: dict[str, Any]) -> str:
        self.n += 1
        uid = f"m{self.n}"
        await self.ws.send(json.dumps([2, uid, action, payload]))
        return uid

    async def call(self, action: str, payload: dict[str, Any]) -> Any:
        uid = await self.send(action, payload)
        await until(lambda: uid in self.answers, what=f"answer to {action}")
        return self.answers[uid]


def _meter_values(backend: BackendSim, cp: str) -> list[dict[str, Any]]:
    return [pl for _, _, pl in backend.calls(cp, "MeterValues")]


async def test_answer_and_forward_wait_for_the_fsync(broker: BrokerHandle, tmp_path: Any,
                                                     monkeypatch: Any) -> None:
    backend = BackendSim(tmp_path / "backend.sqlite")
    await backend.start()
    cfg, path = gateway_config(tmp_path / "gw", broker.port, backend_url=backend.url, evses=EVSES)
    share_broker_secrets(cfg, broker.config)
    g = InProcessGateway(cfg, path)
    gw = await g.start()
    url = f"ws://127.0.0.1:{cfg.ocpp.local.port}/ocpp"
    boxes: list[Box] = []
    try:
        for cb in ("CB-A", "CB-B"):
            ws = await connect(f"{url}/{cb}", subprotocols=["ocpp1.6"], proxy=None)  # type: ignore[list-item]
            boxes.append(Box(ws))
        a, b = boxes
        for box in boxes:
            await box.call("BootNotification", {"chargePointVendor": "t", "chargePointModel": "t"})
        await backend.wait_connected("wa")
        start = await a.call("StartTransaction", {"connectorId": 1, "idTag": "T1", "meterStart": 0,
                                                  "timestamp": "2026-12-07T12:00:00Z"})
        tid = start[2]["transactionId"]
        await until(lambda: gw.queue.count("wa") == 0 and bool(backend.calls("wa", "StartTransaction")),
                    what="the start delivered upstream")

        gate = threading.Event()
        synced: list[int] = []
        real = TxQueue._fdatasync_wal

        def held(self: TxQueue) -> None:
            gate.wait(10)
            real(self)
            synced.append(self._written)

        monkeypatch.setattr(TxQueue, "_fdatasync_wal", held)
        uid = await a.send("MeterValues", {"connectorId": 1, "transactionId": tid, "meterValue": [{
            "timestamp": "2026-12-07T12:01:00Z",
            "sampledValue": [{"value": "4711", "measurand": "Energy.Active.Import.Register", "unit": "Wh"}]}]})
        await until(lambda: gw.queue.unsynced, what="the MeterValues committed, its fsync pending")
        assert gw.queue.count("wa") == 1  # in the queue (committed) ...
        hb = await b.call("Heartbeat", {})  # ... the other wallbox is served meanwhile ...
        assert hb[0] == 3
        await asyncio.sleep(0.3)
        assert uid not in a.answers  # ... but this one has no answer yet
        assert _meter_values(backend, "wa") == []  # and the backend has nothing
        gate.set()
        await until(lambda: uid in a.answers, what="the answer once the fsync is done")
        assert a.answers[uid][0] == 3
        assert synced and not gw.queue.unsynced
        await until(lambda: len(_meter_values(backend, "wa")) == 1, what="MeterValues at the backend")
        assert _meter_values(backend, "wa")[0]["meterValue"][0]["sampledValue"][0]["value"] == "4711"
    finally:
        for box in boxes:
            box.reader.cancel()
            await box.ws.close()
        await g.stop()
        await backend.stop()
