"""A setpoint that arrives while the gateway is still installing a charging profile is not lost.

The apply loop cleared its wake-up flag after a profile install and before waiting again, so a setpoint
that arrived during the install (a wallbox taking its time to answer SetChargingProfile) was dropped
until the next refresh, up to 30 s later: the wallbox kept charging at the safe current while the
controller believed it had granted 13 A. Real sockets: the broker, the gateway's local listener and
a 1.6 wallbox on a WebSocket that answers every SetChargingProfile after 0.4 s.
"""

from __future__ import annotations

import asyncio
import contextlib
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


def _plain_answer(msg: list[Any]) -> str:
    """A simple wallbox's answer to a CALL of the gateway other than SetChargingProfile."""
    res: dict[str, Any] = {"configurationKey": [], "unknownKey": []} if msg[2] == "GetConfiguration" else \
        {"status": "Rejected" if msg[2] == "TriggerMessage" else "Accepted"}
    return json.dumps([3, msg[1], res])


async def _boot(ws: Any, cbid: str) -> None:
    """BootNotification and a Preparing status (what the gateway asks meanwhile gets a plain answer)."""
    for uid, action, body in (("b1", "BootNotification", {"chargePointVendor": "test", "chargePointModel": cbid}),
                              ("s1", "StatusNotification", {"connectorId": 1, "status": "Preparing",
                                                            "errorCode": "NoError", "timestamp": TS})):
        await ws.send(json.dumps([2, uid, action, body]))
        while True:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
            if msg[0] == 3 and msg[1] == uid:
                break
            if msg[0] == 2:
                await ws.send(_plain_answer(msg))


async def test_a_wallbox_gone_during_the_install_is_no_task_failure(broker: BrokerHandle, tmp_path: Path) -> None:
    """The wallbox drops its connection while the gateway waits for its SetChargingProfile answer: that is
    no failure of the gateway (no task restart, no apply failure counted); on its next connection it gets
    the setpoint in force."""
    cfg, path = gateway_config(tmp_path, broker.port, backend_url=None, evses=EVSES)
    share_broker_secrets(cfg, broker.config)
    g = InProcessGateway(cfg, path)
    gw = await g.start()
    ctl = await connected_bus(broker, "load-controller")
    url = f"ws://127.0.0.1:{cfg.ocpp.local.port}/ocpp/CB-SLOW"
    try:
        ctl.publish("evse.setpoint", p.Setpoint(evse_id="slow1", current_a=11.0, phases=3,
                                                valid_until=p.utcnow() + timedelta(seconds=30), seq=1),
                    evse_id="slow1")
        async with connect(url, subprotocols=["ocpp1.6"], proxy=None, open_timeout=5) as ws:  # type: ignore[list-item]
            await _boot(ws, "gone")
            while True:  # the first SetChargingProfile: hang up instead of answering
                msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if msg[0] == 2 and msg[2] == "SetChargingProfile":
                    break
                if msg[0] == 2:
                    await ws.send(_plain_answer(msg))
        await until(lambda: not gw.local.boxes["CB-SLOW"].session, 5, what="the session ended")  # type: ignore[union-attr]
        limits: list[float] = []
        async with connect(url, subprotocols=["ocpp1.6"], proxy=None, open_timeout=5) as ws:  # type: ignore[list-item]
            await _boot(ws, "back")
            async with asyncio.timeout(10):
                while 11.0 not in limits:
                    msg = json.loads(await ws.recv())
                    if msg[0] != 2:
                        continue
                    if msg[2] == "SetChargingProfile":
                        limits += [per["limit"] for per in
                                   msg[3]["csChargingProfiles"]["chargingSchedule"]["chargingSchedulePeriod"]]
                        await ws.send(json.dumps([3, msg[1], {"status": "Accepted"}]))
                    else:
                        await ws.send(_plain_answer(msg))
        assert g.ctx is not None
        assert not {k: v for k, v in g.ctx.task_restarts.items() if k.startswith("apply:")}, g.ctx.task_restarts
        assert gw.ctx.counters.get("setpoint_apply_failed", 0) == 0, gw.ctx.counters  # type: ignore[attr-defined]
    finally:
        await ctl.stop()
        await g.stop()


async def test_applied_names_the_setpoint_the_wallbox_got(broker: BrokerHandle, tmp_path: Path) -> None:
    """A setpoint that arrives while the wallbox is still answering the profile of the one before: the status
    after that answer says the earlier one is applied (its current and its sequence number), not the new
    one, whose profile follows - the controller must not take seq 2 for applied while the wallbox runs seq 1."""
    cfg, path = gateway_config(tmp_path, broker.port, backend_url=None, evses=EVSES)
    share_broker_secrets(cfg, broker.config)
    g = InProcessGateway(cfg, path)
    await g.start()
    ctl = await connected_bus(broker, "load-controller")
    statuses: list[p.EvseStatus] = []
    ctl.subscribe("evse.status", lambda m: statuses.append(m.payload), evse_id="slow1")  # type: ignore[arg-type]
    url = f"ws://127.0.0.1:{cfg.ocpp.local.port}/ocpp/CB-SLOW"
    until_ = p.utcnow() + timedelta(seconds=30)
    try:
        ctl.publish("evse.setpoint", p.Setpoint(evse_id="slow1", current_a=10.0, phases=3, valid_until=until_, seq=1),
                    evse_id="slow1")
        async with connect(url, subprotocols=["ocpp1.6"], proxy=None, open_timeout=5) as ws:  # type: ignore[list-item]
            await _boot(ws, "slow")
            sent_second = False
            async with asyncio.timeout(15):
                while not any(s.applied and s.applied.seq == 2 for s in statuses):
                    msg = json.loads(await ws.recv())
                    if msg[0] != 2:
                        continue
                    if msg[2] != "SetChargingProfile":
                        await ws.send(_plain_answer(msg))
                        continue
                    limit = msg[3]["csChargingProfiles"]["chargingSchedule"]["chargingSchedulePeriod"][0]["limit"]
                    if limit == 10.0 and not sent_second:  # seq 1's profile: the next setpoint comes meanwhile
                        ctl.publish("evse.setpoint", p.Setpoint(evse_id="slow1", current_a=12.0, phases=3,
                                                                valid_until=until_, seq=2), evse_id="slow1")
                        sent_second = True
                        await asyncio.sleep(0.4)
                    await ws.send(json.dumps([3, msg[1], {"status": "Accepted"}]))
        applied = [(s.applied.current_a, s.applied.seq) for s in statuses if s.applied and not s.applied.fallback]
        assert (10.0, 1) in applied and (12.0, 2) in applied, applied
        assert all(pair in ((10.0, 1), (12.0, 2)) for pair in applied), applied
    finally:
        await ctl.stop()
        await g.stop()


async def test_a_refreshed_setpoint_extends_the_profile_with_time_in_hand(broker: BrokerHandle, tmp_path: Path) -> None:
    """The controller refreshes a setpoint (same current, a later end) when about half of its validity is left;
    the gateway sends the longer profile then, not only when the wallbox's profile is nearly over: a refresh
    that came a little early was skipped, and the wallbox ran on to its profile's last seconds (one slow to
    answer fell back to its safe current - 6 A for a paused car - before the next refresh landed)."""
    cfg, path = gateway_config(tmp_path, broker.port, backend_url=None, evses=EVSES)
    share_broker_secrets(cfg, broker.config)
    g = InProcessGateway(cfg, path)
    await g.start()
    ctl = await connected_bus(broker, "load-controller")
    url = f"ws://127.0.0.1:{cfg.ocpp.local.port}/ocpp/CB-SLOW"
    valid_to: list[str] = []
    try:
        t0 = p.utcnow()
        ctl.publish("evse.setpoint", p.Setpoint(evse_id="slow1", current_a=10.0, phases=3,
                                                valid_until=t0 + timedelta(seconds=10), seq=1), evse_id="slow1")
        async with connect(url, subprotocols=["ocpp1.6"], proxy=None, open_timeout=5) as ws:  # type: ignore[list-item]
            await _boot(ws, "refresh")

            async def profiles_until(deadline_s: float) -> None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(deadline_s):
                        while True:
                            msg = json.loads(await ws.recv())
                            if msg[0] != 2:
                                continue
                            if msg[2] == "SetChargingProfile":
                                prof = msg[3]["csChargingProfiles"]
                                if prof["stackLevel"] == 1:
                                    valid_to.append(prof["validTo"])
                                await ws.send(json.dumps([3, msg[1], {"status": "Accepted"}]))
                            else:
                                await ws.send(_plain_answer(msg))

            await profiles_until(4.4)  # the first profile, ends at t0 + 10 s
            assert len(valid_to) == 1, valid_to
            # 5.5 s of its 10 s left: the refresh (ending 10 s from now) goes out at once
            ctl.publish("evse.setpoint", p.Setpoint(evse_id="slow1", current_a=10.0, phases=3,
                                                    valid_until=p.utcnow() + timedelta(seconds=10), seq=2),
                        evse_id="slow1")
            await profiles_until(1.5)
        assert len(valid_to) == 2 and valid_to[1] > valid_to[0], valid_to
    finally:
        await ctl.stop()
        await g.stop()
