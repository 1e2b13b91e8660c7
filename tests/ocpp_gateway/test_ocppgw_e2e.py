"""End to end over real WebSockets and the real broker: wallbox simulators (1.6J and 2.0.1) ->
gateway -> backend simulator (1.6J and 2.0.1), setpoints, backend commands, backend limits."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from ocppgw_helpers import InProcessGateway, gateway_config, share_broker_secrets, until
from websockets.asyncio.client import connect

from chargegate import payloads as p
from chargegate.bus import Bus
from conftest import BrokerHandle, connected_bus
from ocpp_gateway.backend_sim import BackendSim
from ocpp_gateway.service import Gateway
from ocpp_gateway.sim.wallbox import SimConnector, WallboxSim

EVSES = """
  - id: wb16
    circuit: grid
    ocpp: {charge_box_id: CB16, connector_id: 1}
  - id: wb16b
    circuit: grid
    phases: 1
    phase_rotation: [2]
    ocpp: {charge_box_id: CB16, connector_id: 2}
  - id: wb201
    circuit: grid
    ocpp: {charge_box_id: CB201, connector_id: 1, version: "2.0.1"}
  - id: wbup201
    circuit: grid
    ocpp: {charge_box_id: CBUP, connector_id: 1}
    upstream: {version: "2.0.1", charge_box_id: UP-201}
  - id: wbraw
    circuit: grid
    ocpp: {charge_box_id: CBRAW, connector_id: 1}
"""


class Env:
    def __init__(self) -> None:
        self.backend: BackendSim
        self.gw: Gateway
        self.g: InProcessGateway
        self.obs: Bus
        self.ctl: Bus
        self.status: dict[str, p.EvseStatus] = {}
        self.limits: dict[str, p.EvseLimit] = {}
        self.wb16: WallboxSim
        self.wb201: WallboxSim
        self.wbup: WallboxSim


@pytest.fixture(scope="module")
async def env(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    tmp: Path = tmp_path_factory.mktemp("ocppgw-e2e")
    e = Env()
    e.backend = BackendSim(tmp / "backend.sqlite")
    await e.backend.start()
    cfg, path = gateway_config(tmp / "gw", broker.port, backend_url=e.backend.url, evses=EVSES,
                               backend_extra="    meter_values_interval_s: 1\n")
    share_broker_secrets(cfg, broker.config)
    e.g = InProcessGateway(cfg, path)
    e.gw = await e.g.start()
    e.obs = await connected_bus(broker, "observer")
    e.obs.subscribe("evse.status", lambda m: e.status.__setitem__(m.payload.evse_id, m.payload))
    e.obs.subscribe("evse.limit", lambda m: e.limits.__setitem__(m.payload.evse_id, m.payload))
    e.ctl = await connected_bus(broker, "load-controller")
    url = f"ws://127.0.0.1:{cfg.ocpp.local.port}/ocpp"
    e.wb16 = WallboxSim("CB16", url, [SimConnector(1, "wb16"), SimConnector(2, "wb16b", phases=1,
                                                                            phase_rotation=[2])],
                        meter_interval_s=0.5)
    e.wb201 = WallboxSim("CB201", url, [SimConnector(1, "wb201")], version="2.0.1", meter_interval_s=0.5)
    e.wbup = WallboxSim("CBUP", url, [SimConnector(1, "wbup201")], meter_interval_s=0.5)
    for w in (e.wb16, e.wb201, e.wbup):
        w.start()
    for cp in ("wb16", "wb16b", "wb201", "UP-201"):
        await e.backend.wait_connected(cp)
    for w in (e.wb16, e.wb201, e.wbup):
        await until(w.booted.is_set, what="wallbox boot")
    try:
        yield e
    finally:
        for w in (e.wb16, e.wb201, e.wbup):
            await w.stop()
        await e.g.stop()
        await e.obs.stop()
        await e.ctl.stop()
        await e.backend.stop()


def sent_tx(w: WallboxSim, n: int | None = None) -> list[tuple[str, dict[str, Any]]]:
    return [(a, pl) for a, pl, _ in w.sent if a in ("StartTransaction", "StopTransaction", "MeterValues",
                                                     "TransactionEvent")
            and (n is None or pl.get("connectorId", (pl.get("evse") or {}).get("id")) in (n, None))]


def energy_values16(w: WallboxSim, n: int) -> list[float]:
    out: list[float] = []
    for a, pl in sent_tx(w, n):
        if a == "MeterValues" and pl.get("connectorId") == n:
            out += [float(sv["value"]) for mv in pl["meterValue"] for sv in mv["sampledValue"]
                    if sv["measurand"] == "Energy.Active.Import.Register"]
    return out


async def test_session_16_exact_meter_values_and_bus_status(env: Env) -> None:
    w = env.wb16
    w.connectors[1].energy_wh = 123456.0  # a wallbox that has charged before
    w.plug(1, phases=3, max_current_a=16)
    await until(lambda: env.status.get("wb16") is not None and env.status["wb16"].session is not None,
                what="session on the bus")
    await asyncio.sleep(1.6)
    w.unplug(1)
    await until(lambda: w.pending_tx_messages() == 0 and env.gw.queue.count("wb16") == 0, what="delivery")
    sessions = env.backend.transactions("wb16")
    assert len(sessions) == 1
    s = sessions[0]
    assert s.problems == []
    start = next(pl for a, pl in sent_tx(w) if a == "StartTransaction" and pl["connectorId"] == 1)
    stop = next(pl for a, pl in sent_tx(w) if a == "StopTransaction")
    assert s.meter_start == start["meterStart"] == 123456
    assert s.meter_stop == stop["meterStop"] > 123456
    assert s.meter_values == energy_values16(w, 1)  # every value, in order, exactly
    assert len(s.meter_values) >= 2
    assert s.id_tag == "SIMTAG"
    # the bus shows the energy register exactly and the session
    await until(lambda: env.status["wb16"].energy_wh == stop["meterStop"], what="meterStop on the bus", wait_s=3)
    st = env.status["wb16"]
    assert st.source == "ocpp-gateway" and st.online
    assert env.backend.errors_sent() == []


async def test_session_201_wallbox_to_16_backend(env: Env) -> None:
    w = env.wb201
    w.connectors[1].energy_wh = 5000.0
    w.plug(1)
    await asyncio.sleep(1.3)
    w.unplug(1)
    await until(lambda: w.pending_tx_messages() == 0 and env.gw.queue.count("wb201") == 0, what="delivery")
    sessions = env.backend.transactions("wb201")
    assert len(sessions) == 1 and sessions[0].problems == []
    s = sessions[0]
    events = [pl for a, pl in sent_tx(w) if a == "TransactionEvent"]
    assert events[0]["eventType"] == "Started" and events[-1]["eventType"] == "Ended"
    energy = [float(sv["value"]) for ev in events for mv in ev.get("meterValue", []) for sv in mv["sampledValue"]
              if sv["measurand"] == "Energy.Active.Import.Register"]
    assert s.meter_start == energy[0] == 5000
    assert s.meter_stop == energy[-1]
    # the Started event's meter values follow the 1.6 StartTransaction as a MeterValues (Transaction.Begin)
    assert s.meter_values == energy[:-1]
    assert env.status["wb201"].energy_wh == energy[-1]


async def test_session_16_wallbox_to_201_backend(env: Env) -> None:
    w = env.wbup
    w.connectors[1].energy_wh = 777.0
    w.plug(1)
    await asyncio.sleep(1.3)
    w.unplug(1)
    await until(lambda: w.pending_tx_messages() == 0 and env.gw.queue.count("UP-201") == 0, what="delivery")
    sessions = env.backend.transactions("UP-201")
    assert len(sessions) == 1 and sessions[0].problems == []
    s = sessions[0]
    assert s.meter_start == 777
    stop = next(pl for a, pl in sent_tx(w) if a == "StopTransaction")
    assert s.meter_stop == stop["meterStop"]
    assert s.meter_values == energy_values16(w, 1)
    kinds = [m for m in s.messages]
    assert kinds[0] == "TransactionEvent.Started" and kinds[-1] == "TransactionEvent.Ended"
    # 2.0.1 seqNo is 0, 1, 2, ... without gaps
    seqs = [pl["seqNo"] for _, _, pl in env.backend.calls("UP-201", "TransactionEvent")]
    assert seqs == list(range(len(seqs)))


async def test_setpoint_becomes_profile_and_falls_back(env: Env) -> None:
    w = env.wb16
    c = w.connectors[2]  # 1-phase connector
    now = p.utcnow()
    env.ctl.publish("evse.setpoint", p.Setpoint(evse_id="wb16b", current_a=10.37, phases=3,
                                                valid_until=now + timedelta(seconds=2.5), seq=5), evse_id="wb16b")
    await until(lambda: c.limit_a() == (10.3, 1), what="wallbox obeys the setpoint")
    prof = [pl for a, pl in w.received if a == "SetChargingProfile" and pl["connectorId"] == 2][-1]
    cp = prof["csChargingProfiles"]
    assert cp["charging_profile_purpose"] == "TxDefaultProfile" and cp["stack_level"] == 1
    assert cp["valid_to"] is not None
    assert cp["charging_schedule"]["charging_schedule_period"][0]["number_phases"] == 1
    await until(lambda: env.status["wb16b"].applied is not None and env.status["wb16b"].applied.current_a == 10.3,
                what="applied setpoint on the bus")
    assert env.status["wb16b"].applied.seq == 5
    # no new setpoint: after valid_until the wallbox is back at the safe current (6 A)
    await until(lambda: c.limit_a()[0] == 6.0, 5, what="fallback to the safe current")
    await until(lambda: env.status["wb16b"].applied is not None and env.status["wb16b"].applied.fallback, 3,
                what="fallback reported")
    # after a reconnect both profiles are installed again
    n_before = len([1 for a, _ in w.received if a == "SetChargingProfile"])
    env.ctl.publish("evse.setpoint", p.Setpoint(evse_id="wb16b", current_a=8, phases=1,
                                                valid_until=p.utcnow() + timedelta(seconds=30), seq=6),
                    evse_id="wb16b")
    await until(lambda: c.limit_a() == (8.0, 1), what="second setpoint")
    c.profiles.clear()  # a wallbox that lost its profiles while rebooting
    await w.drop_connection()
    await until(lambda: len([1 for a, _ in w.received if a == "SetChargingProfile"]) >= n_before + 4, 8,
                what="profiles re-sent after reconnect")
    await until(lambda: c.limit_a() == (8.0, 1), what="setpoint re-applied")


async def test_backend_commands_reach_the_wallbox(env: Env) -> None:
    b, w = env.backend, env.wb16
    res = await b.call("wb16", "GetConfiguration", {"key": ["MeterValueSampleInterval", "Nope"]})
    assert res["configurationKey"][0]["key"] == "MeterValueSampleInterval"
    assert res["unknownKey"] == ["Nope"]
    res = await b.call("wb16", "ChangeConfiguration", {"key": "HeartbeatInterval", "value": "120"})
    assert res["status"] == "Accepted" and w.configuration["HeartbeatInterval"] == "120"
    res = await b.call("wb16b", "UnlockConnector", {"connectorId": 1})
    assert res["status"] == "Unlocked"
    assert ("UnlockConnector", {"connectorId": 2}) in w.received  # connector 1 upstream = connector 2 here
    res = await b.call("wb16b", "ChangeAvailability", {"connectorId": 0, "type": "Inoperative"})
    assert res["status"] == "Accepted" and not w.connectors[2].operative
    res = await b.call("wb16b", "ChangeAvailability", {"connectorId": 1, "type": "Operative"})
    assert res["status"] == "Accepted" and w.connectors[2].operative
    # a triggered message always reaches the backend (the status even when it repeats the last one)
    n_status = len(env.backend.calls("wb16", "StatusNotification"))
    n_beat = len(env.backend.calls("wb16", "Heartbeat"))
    res = await b.call("wb16", "TriggerMessage", {"requestedMessage": "StatusNotification", "connectorId": 1})
    assert res["status"] == "Accepted"
    assert ("TriggerMessage", {"requestedMessage": "StatusNotification", "connectorId": 1}) in w.received
    await until(lambda: len(env.backend.calls("wb16", "StatusNotification")) > n_status, 5,
                what="the triggered StatusNotification at the backend")
    res = await b.call("wb16", "TriggerMessage", {"requestedMessage": "Heartbeat"})
    assert res["status"] == "Accepted"
    await until(lambda: len(env.backend.calls("wb16", "Heartbeat")) > n_beat, 5,
                what="the triggered Heartbeat at the backend")
    res = await b.call("wb16", "Reset", {"type": "Soft"})
    assert res["status"] == "Accepted" and ("Reset", {"type": "Soft"}) in w.received
    # remote start and stop with the ids mapped both ways
    res = await b.call("wb16", "RemoteStartTransaction", {"idTag": "REMOTE1", "connectorId": 1})
    assert res["status"] == "Accepted"
    w.plug(1)
    await until(lambda: any(pl.get("idTag") == "REMOTE1" for _, _, pl in b.calls("wb16", "StartTransaction")),
                what="remote started session at the backend")
    tid = next(s.transaction_id for s in b.transactions("wb16") if s.id_tag == "REMOTE1")
    res = await b.call("wb16", "RemoteStopTransaction", {"transactionId": int(tid)})
    assert res["status"] == "Accepted"
    await until(lambda: any(s.transaction_id == tid and s.meter_stop is not None for s in b.transactions("wb16")),
                what="remote stopped session")
    local = [pl for a, pl in w.received if a == "RemoteStopTransaction"][-1]["transactionId"]
    assert str(local) == w.tx_ids[next(k for k, v in w.tx_ids.items() if str(v) == str(local))]
    w.unplug(1)
    res = await b.call("wb16", "RemoteStopTransaction", {"transactionId": 999999})
    assert res["status"] == "Rejected"


async def test_backend_commands_to_201_wallbox_translated(env: Env) -> None:
    b, w = env.backend, env.wb201
    res = await b.call("wb201", "RemoteStartTransaction", {"idTag": "R201"})
    assert res["status"] == "Accepted"
    assert w.received[-1][0] == "RequestStartTransaction"
    res = await b.call("wb201", "ChangeAvailability", {"connectorId": 1, "type": "Inoperative"})
    assert res["status"] == "Accepted" and not w.connectors[1].operative
    res = await b.call("wb201", "ChangeAvailability", {"connectorId": 1, "type": "Operative"})
    assert w.connectors[1].operative
    res = await b.call("wb201", "Reset", {"type": "Hard"})
    assert res["status"] == "Accepted" and w.received[-1] == ("Reset", {"type": "Immediate"})
    # a 2.0.1 wallbox has no 1.6 configuration keys: the gateway answers with its own charge point's keys
    res = await b.call("wb201", "GetConfiguration", {"key": ["HeartbeatInterval", "FooBar"]})
    assert res["configurationKey"] == [{"key": "HeartbeatInterval", "readonly": False, "value": "300"}]
    assert res["unknownKey"] == ["FooBar"]
    assert not any(a == "GetVariables" and any(v["variable"]["name"] == "HeartbeatInterval"
                                               for v in d["getVariableData"]) for a, d in w.received)
    w.connectors[1].remote_tag = None


async def test_backend_profile_becomes_limit_not_passed_to_wallbox(env: Env) -> None:
    b, w = env.backend, env.wb16
    before = len([1 for a, pl in w.received if a == "SetChargingProfile"])
    prof = {"chargingProfileId": 77, "stackLevel": 2, "chargingProfilePurpose": "ChargePointMaxProfile",
            "chargingProfileKind": "Absolute",
            "chargingSchedule": {"chargingRateUnit": "A",
                                 "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 11.0, "numberPhases": 3},
                                                            {"startPeriod": 2, "limit": 7.5}]}}
    res = await b.call("wb16", "SetChargingProfile", {"connectorId": 0, "csChargingProfiles": prof})
    assert res["status"] == "Accepted"
    await until(lambda: env.limits.get("wb16") is not None and env.limits["wb16"].current_a == 11.0,
                what="limit on the bus")
    lim = env.limits["wb16"]
    assert lim.active and lim.phases == 3 and lim.source == p.LimitSource.OCPP_BACKEND
    # the next period is published when it starts
    await until(lambda: env.limits["wb16"].current_a == 7.5, 5, what="second period")
    res = await b.call("wb16", "ClearChargingProfile", {"id": 77})
    assert res["status"] == "Accepted"
    await until(lambda: not env.limits["wb16"].active, what="limit cleared")
    after = [pl for a, pl in w.received if a == "SetChargingProfile"][before:]
    assert all(pl["csChargingProfiles"]["charging_profile_id"] != 77 for pl in after)
    # 2.0.1 backend: ChargingStationMaxProfile in W
    prof201 = {"id": 5, "stackLevel": 0, "chargingProfilePurpose": "ChargingStationMaxProfile",
               "chargingProfileKind": "Absolute",
               "chargingSchedule": [{"id": 1, "chargingRateUnit": "W",
                                     "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 4200.0}]}]}
    res = await b.call("UP-201", "SetChargingProfile", {"evseId": 0, "chargingProfile": prof201})
    assert res["status"] == "Accepted"
    await until(lambda: env.limits.get("wbup201") is not None and env.limits["wbup201"].power_w == 4200.0,
                what="2.0.1 limit on the bus")


async def test_backend_outage_queues_and_delivers_in_order(env: Env) -> None:
    b, w = env.backend, env.wb16
    await b.go_away()
    w.connectors[1].energy_wh = 200000.0
    w.plug(1)
    await asyncio.sleep(1.2)
    w.unplug(1)
    await until(lambda: w.pending_tx_messages() == 0, what="wallbox handed everything to the gateway")
    queued = env.gw.queue.count("wb16")
    assert queued >= 3  # start, meter values, stop: all waiting for the backend
    await b.come_back()
    await until(lambda: env.gw.queue.count("wb16") == 0, 15, what="queue delivered after the outage")
    sessions = [s for s in b.transactions("wb16") if s.meter_start == 200000]
    assert len(sessions) == 1
    s = sessions[0]
    assert s.problems == []
    stop = [pl for a, pl in sent_tx(w) if a == "StopTransaction"][-1]
    assert s.meter_stop == stop["meterStop"]
    # the meter values queued before the backend assigned the id carry that id
    ids = {pl["transactionId"] for _, _, pl in b.calls("wb16", "MeterValues") if pl["meterValue"]
           and float(pl["meterValue"][0]["sampledValue"][0]["value"]) >= 200000}
    assert ids == {int(s.transaction_id)}
    assert env.backend.errors_sent() == []


async def test_backend_sim_http_control(env: Env, tmp_path: Path) -> None:
    import json as _json
    import urllib.error
    import urllib.parse
    import urllib.request

    from chargegate.broker import free_port

    port = free_port()
    await env.backend.start_control(port)

    def get(path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return _json.loads(r.read())

    loop = asyncio.get_running_loop()
    st = await loop.run_in_executor(None, get, "/status")
    assert st["listening"] and "wb16" in st["connected"]
    res = await loop.run_in_executor(None, get, "/call?cp=wb16&action=GetConfiguration&payload="
                                     + urllib.parse.quote('{"key": ["NumberOfConnectors"]}'))
    assert res["configurationKey"][0]["value"] == "2"
    tx = await loop.run_in_executor(None, get, "/transactions?cp=wb16")
    assert tx and all(s["problems"] == [] for s in tx) and {s["cp"] for s in tx} == {"wb16"}
    # without cp: the sessions of every charge point, each naming its cp (not a 400 "KeyError: 'cp'")
    every = await loop.run_in_executor(None, get, "/transactions")
    assert [s for s in every if s["cp"] == "wb16"] == tx
    # /call without its parameters: a 400 that says which are missing
    with pytest.raises(urllib.error.HTTPError) as bad:
        await loop.run_in_executor(None, get, "/call?cp=wb16")
    assert bad.value.code == 400 and "needs the query parameters action" in bad.value.read().decode()
    assert (await loop.run_in_executor(None, get, "/down")) == {"listening": False}
    await until(lambda: not env.gw.upstreams["wb16"].booted.is_set(), what="gateway noticed the backend left")
    assert (await loop.run_in_executor(None, get, "/up")) == {"listening": True}
    await until(lambda: env.gw.upstreams["wb16"].booted.is_set(), 10, what="gateway back at the backend")


async def test_201_backend_commands_to_16_wallbox(env: Env) -> None:
    b, w = env.backend, env.wbup
    await b.wait_connected("UP-201")  # back after the outage test (it waits for wb16's queue only)
    res = await b.call("UP-201", "RequestStartTransaction", {"idToken": {"idToken": "R-201", "type": "Central"},
                                                             "remoteStartId": 7})
    assert res["status"] == "Accepted"
    assert ("RemoteStartTransaction", {"idTag": "R-201", "connectorId": 1}) in w.received
    w.plug(1)
    await until(lambda: any(s.id_tag == "R-201" for s in b.transactions("UP-201")), what="remote started session")
    tid = next(s.transaction_id for s in b.transactions("UP-201") if s.id_tag == "R-201")
    # the backend's remoteStartId comes back in the Started event, so it can match the session to its request
    started = [pl for _, _, pl in b.calls("UP-201", "TransactionEvent") if pl["eventType"] == "Started"
               and pl["transactionInfo"]["transactionId"] == tid]
    assert started and started[0]["transactionInfo"].get("remoteStartId") == 7, started
    assert started[0]["triggerReason"] == "RemoteStart"
    res = await b.call("UP-201", "RequestStopTransaction", {"transactionId": tid})
    assert res["status"] == "Accepted"
    local = [pl for a, pl in w.received if a == "RemoteStopTransaction"][-1]["transactionId"]
    assert str(local) == w.tx_ids[next(iter(k for k, v in w.tx_ids.items() if str(v) == str(local)))]
    await until(lambda: any(s.transaction_id == tid and s.meter_stop is not None
                            for s in b.transactions("UP-201")), what="remote stopped")
    w.unplug(1)
    res = await b.call("UP-201", "Reset", {"type": "Immediate"})
    assert res["status"] == "Accepted" and w.received[-1] == ("Reset", {"type": "Hard"})
    res = await b.call("UP-201", "TriggerMessage", {"requestedMessage": "StatusNotification"})
    assert res["status"] == "Accepted"
    res = await b.call("UP-201", "TriggerMessage", {"requestedMessage": "TransactionEvent"})
    assert res["status"] == "NotImplemented"  # a 1.6 wallbox has no TransactionEvent
    res = await b.call("UP-201", "GetVariables", {"getVariableData": [
        {"component": {"name": "OCPPCommCtrlr"}, "variable": {"name": "HeartbeatInterval"}}]})
    assert res["getVariableResult"][0]["attributeStatus"] == "UnknownComponent"
    res = await b.call("UP-201", "UnlockConnector", {"evseId": 1, "connectorId": 1})
    assert res["status"] == "Unlocked"
    res = await b.call("UP-201", "RequestStopTransaction", {"transactionId": "nope"})
    assert res["status"] == "Rejected"
    assert b.errors_sent() == []


async def test_equal_timestamps_are_forwarded_and_a_repeated_message_id_is_answered_once(env: Env) -> None:
    """A wallbox's Transaction.Begin at the start time and a Sample.Clock next to a Sample.Periodic carry
    the same timestamp: both are meter values the backend must get. A repeat of one message id (the
    wallbox did not see the answer) is answered again with the same answer and forwarded once."""
    t0 = (datetime.now(UTC) - timedelta(seconds=30)).replace(microsecond=0)
    ts = t0.strftime("%Y-%m-%dT%H:%M:%SZ")
    t1 = (t0 + timedelta(seconds=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
    t2 = (t0 + timedelta(seconds=20)).strftime("%Y-%m-%dT%H:%M:%SZ")
    await env.backend.wait_connected("wbraw")
    async with connect(f"ws://127.0.0.1:{env.g.cfg.ocpp.local.port}/ocpp/CBRAW", subprotocols=["ocpp1.6"],  # type: ignore[list-item]
                       proxy=None, open_timeout=5) as ws:
        async def call(uid: str, action: str, payload: dict[str, Any]) -> list[Any]:
            await ws.send(json.dumps([2, uid, action, payload]))
            while True:
                m = json.loads(await asyncio.wait_for(ws.recv(), 5))
                if m[0] == 2:  # the gateway's own calls (configuration, triggers): accept them
                    await ws.send(json.dumps([3, m[1], {"status": "Accepted"}]))
                    continue
                if m[1] == uid:
                    return list(m)

        assert (await call("b1", "BootNotification", {"chargePointVendor": "raw", "chargePointModel": "raw"}))[0] == 3
        await call("s1", "StatusNotification", {"connectorId": 1, "status": "Preparing", "errorCode": "NoError"})
        ans = await call("t1", "StartTransaction", {"connectorId": 1, "idTag": "RAWTAG", "meterStart": 1000,
                                                    "timestamp": ts})
        assert ans[0] == 3
        tid = ans[2]["transactionId"]

        def mv(value: int, at: str, context: str) -> dict[str, Any]:
            return {"connectorId": 1, "transactionId": tid, "meterValue": [{"timestamp": at, "sampledValue": [
                {"value": str(value), "context": context, "measurand": "Energy.Active.Import.Register",
                 "unit": "Wh"}]}]}

        assert (await call("m1", "MeterValues", mv(1000, ts, "Transaction.Begin")))[0] == 3
        assert (await call("m2", "MeterValues", mv(1500, t1, "Sample.Periodic")))[0] == 3
        assert (await call("m3", "MeterValues", mv(1500, t1, "Sample.Clock")))[0] == 3
        first = await call("m4", "MeterValues", mv(2000, t2, "Sample.Periodic"))
        again = await call("m4", "MeterValues", mv(2000, t2, "Sample.Periodic"))
        assert again == first
        stop = await call("t2", "StopTransaction", {"transactionId": tid, "meterStop": 2100, "timestamp": t2,
                                                    "reason": "EVDisconnected"})
        assert stop[0] == 3
    await until(lambda: env.gw.queue.count("wbraw") == 0 and any(
        s.meter_stop is not None for s in env.backend.transactions("wbraw")), what="delivery")
    s = next(s for s in env.backend.transactions("wbraw") if s.id_tag == "RAWTAG")
    assert s.problems == []
    assert s.meter_start == 1000 and s.meter_stop == 2100
    assert s.meter_values == [1000, 1500, 1500, 2000]  # equal timestamps forwarded, the repeat once
    assert env.g.ctx.counters["ocpp_duplicate_message_ids"] >= 1
    assert env.backend.errors_sent() == []
