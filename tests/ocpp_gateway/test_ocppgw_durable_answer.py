"""A wallbox's transaction message is on disk before the wallbox gets its answer, while the fsync that puts it
there runs off the event loop (TxQueue.deferred_sync / sync). A meter value may go to the backend while that
fsync runs, but its delete (after the backend's answer) waits for it; a start or stop goes to the backend only
once it is on disk (services/ocpp-gateway/README.md, "Forwarding while the fsync runs").

Real WebSockets, the real broker, the backend simulator; the WAL's fdatasync is held back by a gate: until it
is released the wallbox has no answer, the message is committed in the queue and stays there although the
backend answered it, and a second wallbox is answered meanwhile (the loop is not stopped by the fsync)."""

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


class _Held:
    """TxQueue's WAL fsync held back by a gate; every ``delivered`` (the delete) records whether the message it
    deletes was on disk at that moment and how many fsyncs had returned."""

    def __init__(self, monkeypatch: Any) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.synced: list[int] = []
        self.deletes: list[tuple[int, int, int]] = []  # (seq, durable_after(seq), fsyncs returned)
        real_sync, real_delivered = TxQueue._fdatasync_wal, TxQueue.delivered
        held = self

        def fdatasync(self: TxQueue) -> None:
            held.gate.wait(10)
            real_sync(self)
            held.synced.append(self._written)

        def delivered(self: TxQueue, seq: int, **kw: Any) -> None:
            held.deletes.append((seq, self.durable_after(seq), len(held.synced)))
            real_delivered(self, seq, **kw)

        monkeypatch.setattr(TxQueue, "_fdatasync_wal", fdatasync)
        monkeypatch.setattr(TxQueue, "delivered", delivered)


async def _two_boxes(broker: BrokerHandle, tmp_path: Any) -> tuple[BackendSim, InProcessGateway, Any, list[Box]]:
    backend = BackendSim(tmp_path / "backend.sqlite")
    await backend.start()
    cfg, path = gateway_config(tmp_path / "gw", broker.port, backend_url=backend.url, evses=EVSES)
    share_broker_secrets(cfg, broker.config)
    g = InProcessGateway(cfg, path)
    gw = await g.start()
    url = f"ws://127.0.0.1:{cfg.ocpp.local.port}/ocpp"
    boxes: list[Box] = []
    for cb in ("CB-A", "CB-B"):
        ws = await connect(f"{url}/{cb}", subprotocols=["ocpp1.6"], proxy=None)  # type: ignore[list-item]
        boxes.append(Box(ws))
    for box in boxes:
        await box.call("BootNotification", {"chargePointVendor": "t", "chargePointModel": "t"})
    await backend.wait_connected("wa")
    await backend.wait_connected("wb")
    return backend, g, gw, boxes


async def _close(backend: BackendSim, g: InProcessGateway, boxes: list[Box]) -> None:
    for box in boxes:
        box.reader.cancel()
        await box.ws.close()
    await g.stop()
    await backend.stop()


def _mv(tid: int, wh: str) -> dict[str, Any]:
    return {"connectorId": 1, "transactionId": tid, "meterValue": [{
        "timestamp": "2026-12-07T12:01:00Z",
        "sampledValue": [{"value": wh, "measurand": "Energy.Active.Import.Register", "unit": "Wh"}]}]}


async def test_answer_waits_for_the_fsync_the_meter_value_goes_out_meanwhile(broker: BrokerHandle, tmp_path: Any,
                                                                             monkeypatch: Any) -> None:
    backend, g, gw, boxes = await _two_boxes(broker, tmp_path)
    try:
        a, b = boxes
        start = await a.call("StartTransaction", {"connectorId": 1, "idTag": "T1", "meterStart": 0,
                                                  "timestamp": "2026-12-07T12:00:00Z"})
        tid = start[2]["transactionId"]
        await until(lambda: gw.queue.count("wa") == 0 and bool(backend.calls("wa", "StartTransaction")),
                    what="the start delivered upstream")

        h = _Held(monkeypatch)
        h.gate.clear()
        uid = await a.send("MeterValues", _mv(tid, "4711"))
        await until(lambda: gw.queue.unsynced, what="the MeterValues committed, its fsync pending")
        # the forward does not wait for the fsync: the backend gets it (and answers it) meanwhile ...
        await until(lambda: len(_meter_values(backend, "wa")) == 1, what="MeterValues at the backend")
        assert _meter_values(backend, "wa")[0]["meterValue"][0]["sampledValue"][0]["value"] == "4711"
        hb = await b.call("Heartbeat", {})  # ... the other wallbox is served ...
        assert hb[0] == 3
        await asyncio.sleep(0.3)
        assert uid not in a.answers  # ... but this one has no answer: its message is not on disk yet
        assert gw.queue.count("wa") == 1  # and the backend's answer did not delete it
        assert h.deletes == [] and h.synced == []
        assert gw.local.counters["tx_forwarded_before_fsync"] == 1
        h.gate.set()
        await until(lambda: uid in a.answers, what="the answer once the fsync is done")
        assert a.answers[uid][0] == 3
        await until(lambda: gw.queue.count("wa") == 0, what="the delete once the insert is on disk")
        assert not gw.queue.unsynced
        # the delete came after the fsync that covered the insert, never before
        assert len(h.deletes) == 1 and h.deletes[0][1] == 0 and h.deletes[0][2] >= 1
        assert len(_meter_values(backend, "wa")) == 1  # once on the wire
    finally:
        await _close(backend, g, boxes)


async def test_a_start_leaves_only_once_it_is_on_disk(broker: BrokerHandle, tmp_path: Any, monkeypatch: Any) -> None:
    backend, g, gw, boxes = await _two_boxes(broker, tmp_path)
    try:
        a, b = boxes
        h = _Held(monkeypatch)
        h.gate.clear()
        uid = await a.send("StartTransaction", {"connectorId": 1, "idTag": "T1", "meterStart": 0,
                                                "timestamp": "2026-12-07T12:00:00Z"})
        await until(lambda: gw.queue.count("wa") == 1 and gw.queue.unsynced, what="the start committed")
        assert (await b.call("Heartbeat", {}))[0] == 3
        await asyncio.sleep(0.3)
        assert uid not in a.answers and backend.calls("wa", "StartTransaction") == []  # neither answer nor forward
        h.gate.set()
        await until(lambda: uid in a.answers, what="the answer once the fsync is done")
        await until(lambda: gw.queue.count("wa") == 0 and bool(backend.calls("wa", "StartTransaction")),
                    what="the start at the backend")
        assert gw.local.counters["tx_forwarded_before_fsync"] == 0
        assert [d[1] for d in h.deletes] == [0]

        # and a stop the same way
        tid = a.answers[uid][2]["transactionId"]
        h.gate.clear()
        uid = await a.send("StopTransaction", {"transactionId": tid, "meterStop": 10,
                                               "timestamp": "2026-12-07T12:05:00Z"})
        await until(lambda: gw.queue.count("wa") == 1 and gw.queue.unsynced, what="the stop committed")
        await asyncio.sleep(0.3)
        assert uid not in a.answers and backend.calls("wa", "StopTransaction") == []
        h.gate.set()
        await until(lambda: gw.queue.count("wa") == 0 and bool(backend.calls("wa", "StopTransaction")),
                    what="the stop at the backend")
        assert uid in a.answers and all(d[1] == 0 for d in h.deletes)
    finally:
        await _close(backend, g, boxes)


async def test_a_meter_value_repeated_after_its_answer_was_lost_is_forwarded_once(broker: BrokerHandle,
                                                                                  tmp_path: Any) -> None:
    """The wallbox's connection drops after its MeterValues was stored and forwarded but before it read the
    answer; it repeats the message on its new connection (with the same message id, or a new one): the backend
    gets it once (the RPC layer knows message ids per connection only; the digest stored with the queued
    message tells). A new sample is forwarded as always."""
    backend, g, gw, boxes = await _two_boxes(broker, tmp_path)
    try:
        a = boxes[0]
        start = await a.call("StartTransaction", {"connectorId": 1, "idTag": "T1", "meterStart": 0,
                                                  "timestamp": "2026-12-07T12:00:00Z"})
        tid = start[2]["transactionId"]
        assert (await a.call("MeterValues", _mv(tid, "100")))[0] == 3
        await until(lambda: len(_meter_values(backend, "wa")) == 1, what="MeterValues at the backend")
        uid = f"m{a.n}"
        a.reader.cancel()
        await a.ws.close()
        ws = await connect(f"ws://127.0.0.1:{g.cfg.ocpp.local.port}/ocpp/CB-A", subprotocols=["ocpp1.6"],  # type: ignore[list-item]
                           proxy=None)
        a = boxes[0] = Box(ws)
        await a.ws.send(json.dumps([2, uid, "MeterValues", _mv(tid, "100")]))  # the same message id
        await until(lambda: uid in a.answers, what="the repeat answered")
        assert a.answers[uid][0] == 3
        assert (await a.call("MeterValues", _mv(tid, "100")))[0] == 3  # the same content with a new id
        assert gw.local.counters["duplicate_meter_values"] == 2
        assert (await a.call("MeterValues", _mv(tid, "101")))[0] == 3  # a new sample
        await until(lambda: len(_meter_values(backend, "wa")) == 2, what="the new sample at the backend")
        await until(lambda: gw.queue.count("wa") == 0, what="the queue drained")
        values = [m["meterValue"][0]["sampledValue"][0]["value"] for m in _meter_values(backend, "wa")]
        assert values == ["100", "101"]
    finally:
        await _close(backend, g, boxes)
