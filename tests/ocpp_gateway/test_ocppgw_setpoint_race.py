"""A setpoint that arrives while the gateway is still installing a charging profile is not lost.

The apply loop cleared its wake-up flag after a profile install and before waiting again, so a setpoint
that arrived during the install (a wallbox taking its time to answer SetChargingProfile) was dropped
until the next refresh, up to 30 s later: the wallbox kept charging at the safe current while the
controller believed it had granted 13 A. Real sockets: the broker, the gateway's local listener and
a 1.6 wallbox on a WebSocket that answers every SetChargingProfile after 0.4 s.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

from ocppgw_helpers import InProcessGateway, gateway_config, share_broker_secrets, until
from websockets.asyncio.client import connect

from chargegate import payloads as p
from conftest import BrokerHandle, connected_bus

EVSES = """
  - id: slow1
    circuit: grid
    ocpp: {charge_box_id: CB-SLOW}
"""
TS = "2026-01-01T10:00:00Z"


async def test_setpoint_during_a_slow_profile_install_is_applied(broker: BrokerHandle, tmp_path: Path) -> None:
    cfg, path = gateway_config(tmp_path, broker.port, backend_url=None, evses=EVSES)
    share_broker_secrets(cfg, broker.config)
    g = InProcessGateway(cfg, path)
    await g.start()
    ctl = await connected_bus(broker, "load-controller")
    profiles: list[dict[str, Any]] = []
    installing = asyncio.Event()
    try:
        async with connect(f"ws://127.0.0.1:{cfg.ocpp.local.port}/ocpp/CB-SLOW", subprotocols=["ocpp1.6"],  # type: ignore[list-item]
                           proxy=None, open_timeout=5) as ws:
            pending: dict[str, asyncio.Future[Any]] = {}
            answering: set[asyncio.Task[None]] = set()

            async def reader() -> None:
                async for raw in ws:
                    msg = json.loads(raw)
                    if msg[0] == 3 and msg[1] in pending:
                        pending.pop(msg[1]).set_result(msg[2])
                    elif msg[0] == 2:
                        t = asyncio.ensure_future(answer(msg))
                        answering.add(t)
                        t.add_done_callback(answering.discard)

            async def answer(msg: list[Any]) -> None:
                uid, action, body = msg[1], msg[2], msg[3]
                if action == "SetChargingProfile":
                    profiles.append(body)
                    installing.set()
                    await asyncio.sleep(0.4)  # a wallbox that takes its time
                    res: dict[str, Any] = {"status": "Accepted"}
                elif action == "TriggerMessage":
                    res = {"status": "Rejected"}
                elif action == "GetConfiguration":
                    res = {"configurationKey": [], "unknownKey": []}
                elif action == "ChangeConfiguration":
                    res = {"status": "Accepted"}
                else:
                    res = {"status": "Accepted"}
                await ws.send(json.dumps([3, uid, res]))

            async def call(uid: str, action: str, body: dict[str, Any]) -> Any:
                fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                pending[uid] = fut
                await ws.send(json.dumps([2, uid, action, body]))
                return await asyncio.wait_for(fut, 5)

            rd = asyncio.ensure_future(reader())
            boot = await call("b1", "BootNotification", {"chargePointVendor": "test", "chargePointModel": "slow"})
            assert boot["status"] == "Accepted"
            await call("s1", "StatusNotification", {"connectorId": 1, "status": "Preparing", "errorCode": "NoError",
                                                    "timestamp": TS})
            # the gateway installs its profiles; while the wallbox sits on the answer, the setpoint arrives
            await asyncio.wait_for(installing.wait(), 10)
            ctl.publish("evse.setpoint", p.Setpoint(evse_id="slow1", current_a=13.0, phases=3,
                                                    valid_until=p.utcnow() + timedelta(seconds=8), seq=1),
                        evse_id="slow1")

            def limits() -> list[float]:
                return [per["limit"] for prof in profiles
                        for per in prof["csChargingProfiles"]["chargingSchedule"]["chargingSchedulePeriod"]]

            # without the fix the next install came with the 30 s refresh at the earliest
            await until(lambda: 13.0 in limits(), 4, what="the 13 A setpoint sent to the wallbox")
            rd.cancel()
    finally:
        await ctl.stop()
        await g.stop()
