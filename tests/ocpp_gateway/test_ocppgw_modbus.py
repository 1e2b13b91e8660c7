"""Modbus EVSEs (status published on the real broker as evse-poller does) as charge points at the
backend; the connection through smgw-link's forwarding listener with wss, SNI and Basic auth."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from ocppgw_helpers import InProcessGateway, gateway_config, make_pki, share_broker_secrets, until

from chargegate import payloads as p
from chargegate.broker import free_port
from chargegate.bus import Bus
from conftest import BrokerHandle, connected_bus
from ocpp_gateway.backend_sim import BackendSim
from ocpp_gateway.service import Gateway

EVSES = """
  - id: mb1
    circuit: grid
    id_tag: TAG-MB1
    modbus: {profile: alfen-eve, host: 127.0.0.1, port: 1502}
  - id: mb2
    circuit: grid
    modbus: {profile: alfen-eve, host: 127.0.0.1, port: 1503}
    upstream: {version: "2.0.1"}
"""


class Env:
    backend: BackendSim
    gw: Gateway
    poller: Bus
    commands: list[p.EvseCommand]
    answer: bool


@pytest.fixture(scope="module")
async def env(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    tmp: Path = tmp_path_factory.mktemp("ocppgw-modbus")
    e = Env()
    e.backend = BackendSim(tmp / "backend.sqlite")
    await e.backend.start()
    cfg, path = gateway_config(tmp / "gw", broker.port, backend_url=e.backend.url, evses=EVSES,
                               backend_extra="    meter_values_interval_s: 0.4\n")
    share_broker_secrets(cfg, broker.config)
    g = InProcessGateway(cfg, path)
    e.gw = await g.start()
    e.poller = await connected_bus(broker, "evse-poller")
    e.commands = []
    e.answer = True

    def on_command(m: Any) -> None:
        cmd = m.payload
        e.commands.append(cmd)
        e.poller.publish("evse.command_result", p.EvseCommandResult(evse_id=cmd.evse_id, request_id=cmd.request_id,
                                                                    accepted=e.answer), evse_id=cmd.evse_id)

    e.poller.subscribe("evse.command", on_command)
    await asyncio.sleep(0.2)
    for cp in ("mb1", "mb2"):
        await e.backend.wait_connected(cp)
    try:
        yield e
    finally:
        await g.stop()
        await e.poller.stop()
        await e.backend.stop()


def status(evse_id: str, iec: str, energy: float | None, power: float = 0.0, current: float = 0.0,
           online: bool = True) -> p.EvseStatus:
    state = {"A": p.EvseState.AVAILABLE, "B": p.EvseState.PREPARING, "C": p.EvseState.CHARGING}[iec]
    return p.EvseStatus(evse_id=evse_id, online=online, state=state if online else p.EvseState.OFFLINE,
                        iec_state=p.IecState(iec), energy_wh=energy, power_w=power,
                        current_a=[current, current, current], phases_in_use=3 if current else 0,
                        source="evse-poller")


def pub(e: Env, st: p.EvseStatus) -> None:
    e.poller.publish("evse.status", st, evse_id=st.evse_id)


def statuses(b: BackendSim, cp: str) -> list[str]:
    return [pl.get("status", pl.get("connectorStatus")) for _, _, pl in b.calls(cp, "StatusNotification")
            if pl.get("connectorId") == 1]


async def test_modbus_session_16(env: Env) -> None:
    b = env.backend
    pub(env, status("mb1", "A", 1000))
    await until(lambda: statuses(b, "mb1")[-1:] == ["Available"], what="Available at the backend")
    pub(env, status("mb1", "B", 1000))
    await until(lambda: len(b.calls("mb1", "StartTransaction")) == 1, what="StartTransaction")
    start = b.calls("mb1", "StartTransaction")[0][2]
    assert start["meterStart"] == 1000 and start["idTag"] == "TAG-MB1" and start["connectorId"] == 1
    pub(env, status("mb1", "C", 1234.5, power=11040.0, current=16.0))
    await until(lambda: any(sv["value"] == "1234.5" for _, _, pl in b.calls("mb1", "MeterValues")
                            for mv in pl["meterValue"] for sv in mv["sampledValue"]), what="meter values")
    mv = next(pl for _, _, pl in b.calls("mb1", "MeterValues") if any(
        sv["value"] == "1234.5" for m in pl["meterValue"] for sv in m["sampledValue"]))
    vals = {(sv["measurand"], sv.get("phase")): sv["value"] for sv in mv["meterValue"][0]["sampledValue"]}
    assert vals[("Power.Active.Import", None)] == "11040"
    assert vals[("Current.Import", "L1")] == "16" and vals[("Current.Import", "L3")] == "16"
    assert "Charging" in statuses(b, "mb1")
    pub(env, status("mb1", "A", 1350))
    await until(lambda: len(b.calls("mb1", "StopTransaction")) == 1, what="StopTransaction")
    stop = b.calls("mb1", "StopTransaction")[0][2]
    assert stop["meterStop"] == 1350 and stop["reason"] == "EVDisconnected"
    [s] = b.transactions("mb1")
    assert s.problems == [] and s.meter_start == 1000 and s.meter_stop == 1350
    assert b.errors_sent() == []


async def test_modbus_remote_start_stop_availability(env: Env) -> None:
    b = env.backend
    res = await b.call("mb1", "RemoteStartTransaction", {"idTag": "RS-1", "connectorId": 1})
    assert res["status"] == "Accepted"
    cmd = env.commands[-1]
    assert cmd.action == p.EvseCommandAction.START and cmd.id_tag == "RS-1" and cmd.evse_id == "mb1"
    pub(env, status("mb1", "B", 2000))
    await until(lambda: len(b.calls("mb1", "StartTransaction")) == 2, what="remote started session")
    assert b.calls("mb1", "StartTransaction")[-1][2]["idTag"] == "RS-1"
    tid = b.transactions("mb1")[-1].transaction_id
    pub(env, status("mb1", "C", 2100, 4000, 6))
    await asyncio.sleep(0.1)
    res = await b.call("mb1", "RemoteStopTransaction", {"transactionId": int(tid)})
    assert res["status"] == "Accepted" and env.commands[-1].action == p.EvseCommandAction.STOP
    await until(lambda: len(b.calls("mb1", "StopTransaction")) == 2, what="remote stop")
    stop = b.calls("mb1", "StopTransaction")[-1][2]
    assert stop["reason"] == "Remote" and stop["meterStop"] == 2100 and stop["transactionId"] == int(tid)
    # still plugged: no new session until the car leaves
    pub(env, status("mb1", "B", 2100))
    await asyncio.sleep(0.3)
    assert len(b.calls("mb1", "StartTransaction")) == 2
    pub(env, status("mb1", "A", 2100))
    env.answer = False
    res = await b.call("mb1", "ChangeAvailability", {"connectorId": 1, "type": "Inoperative"})
    assert res["status"] == "Rejected" and env.commands[-1].action == p.EvseCommandAction.DISABLE
    env.answer = True
    res = await b.call("mb1", "ChangeAvailability", {"connectorId": 0, "type": "Inoperative"})
    assert res["status"] == "Accepted"
    res = await b.call("mb1", "TriggerMessage", {"requestedMessage": "StatusNotification"})
    assert res["status"] == "Accepted"
    res = await b.call("mb1", "UnlockConnector", {"connectorId": 1})
    assert res["status"] == "NotSupported"
    res = await b.call("mb1", "ChangeConfiguration", {"key": "MeterValueSampleInterval", "value": "30"})
    assert res["status"] == "Accepted"
    res = await b.call("mb1", "GetConfiguration", {"key": ["MeterValueSampleInterval"]})
    assert res["configurationKey"][0]["value"] == "30"
    await b.call("mb1", "ChangeConfiguration", {"key": "MeterValueSampleInterval", "value": "1"})


async def test_modbus_session_201_and_offline(env: Env) -> None:
    b = env.backend
    pub(env, status("mb2", "A", 50))
    pub(env, status("mb2", "B", 50))
    await until(lambda: any(pl["eventType"] == "Started" for _, _, pl in b.calls("mb2", "TransactionEvent")),
                what="Started")
    pub(env, status("mb2", "C", 60, 4000, 6))
    await asyncio.sleep(0.5)
    pub(env, status("mb2", "C", 61, online=False))  # the poller lost the wallbox
    await until(lambda: "Unavailable" in statuses(b, "mb2"), what="Unavailable")
    pub(env, status("mb2", "C", 75, 4000, 6))
    await asyncio.sleep(0.5)
    pub(env, status("mb2", "A", 80))
    await until(lambda: any(pl["eventType"] == "Ended" for _, _, pl in b.calls("mb2", "TransactionEvent")),
                what="Ended")
    [s] = b.transactions("mb2")
    assert s.problems == [] and s.meter_start == 50 and s.meter_stop == 80
    assert s.meter_values and set(s.meter_values) <= {60.0, 75.0}
    seqs = [pl["seqNo"] for _, _, pl in b.calls("mb2", "TransactionEvent")]
    assert seqs == list(range(len(seqs)))


# -- through smgw-link's forwarding listener -----------------------------------------------------

class Relay:
    """A TCP forwarder standing in for smgw-link's local listener: bytes in, bytes out."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.connections = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        tr, tw = await asyncio.open_connection(*self.target)

        async def pipe(a: asyncio.StreamReader, b: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await a.read(65536):
                    b.write(data)
                    await b.drain()
            b.close()

        await asyncio.gather(pipe(r, tw), pipe(tr, w))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_via_smgw_forwarder_wss_sni_and_basic_auth(broker: BrokerHandle,
                                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp: Path = tmp_path_factory.mktemp("ocppgw-smgw")
    pki = make_pki(tmp / "pki", server_names=("ocpp.supplier.test",))
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(str(pki["server_cert"]), str(pki["server_key"]))
    backend = BackendSim(tmp / "backend.sqlite", password="up-pw", ssl_context=sctx)
    await backend.start()
    relay = Relay(("127.0.0.1", backend.port))
    await relay.start()
    # the backend's name does not resolve here: only the forwarder can reach it
    url = f"wss://ocpp.supplier.test:{backend.port}/ocpp"
    cfg, path = gateway_config(tmp / "gw", broker.port, backend_url=url, evses="""
  - id: smgw1
    circuit: grid
    modbus: {profile: alfen-eve, host: 127.0.0.1, port: 1502}
    upstream: {charge_box_id: SUPPLIER-0001}
  - id: smgw2
    circuit: grid
    modbus: {profile: alfen-eve, host: 127.0.0.1, port: 1503}
    upstream: {password: wrong}
""", backend_extra=f"    via_smgw: true\n    password: up-pw\n    ca_file: {pki['ca']}\n",
        extra=f"""
smgw:
  enabled: true
  gateway: {{host: 127.0.0.1, pinned_sha256: "{"00" * 32}"}}
  functions: {{ocpp_via_smgw: true}}
  endpoints:
    - {{name: supplier-ocpp, host: ocpp.supplier.test, port: {backend.port}, listen_port: {relay.port},
       purpose: ocpp}}
""")
    share_broker_secrets(cfg, broker.config)
    g = InProcessGateway(cfg, path)
    gw = await g.start()
    try:
        await backend.wait_connected("SUPPLIER-0001")
        assert backend.hosts["SUPPLIER-0001"] == f"ocpp.supplier.test:{backend.port}"
        assert backend.auth_users["SUPPLIER-0001"] == "SUPPLIER-0001"
        assert relay.connections >= 1
        await until(lambda: backend.calls("SUPPLIER-0001", "BootNotification") != [], what="boot")
        boots = backend.calls("SUPPLIER-0001", "BootNotification")
        assert boots[0][2]["chargePointModel"] == "alfen-eve"
        await until(lambda: gw.ctx.counters["upstream_connect_failed"] >= 1, what="wrong password refused")  # type: ignore[attr-defined]
        assert "smgw2" not in backend.connected or not backend.connected["smgw2"].is_set()
    finally:
        await g.stop()
        await relay.stop()
        await backend.stop()
