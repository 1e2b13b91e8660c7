"""Live configuration: the running ocpp-gateway service takes a new configuration on ``reload``
(real broker, real WebSockets, the backend simulator, a wallbox simulator): a new EVSE appears at the
backend and a new local charge box id is accepted without a restart; EVSEs left unchanged keep
their connections; a removed one is disconnected. And the SMGW route of the upstream connection
follows the function switch."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from ocppgw_helpers import gateway_config, share_broker_secrets, until

from chargegate import config as cfgmod
from chargegate import payloads as p
from chargegate.runtime import start_context, stop_context
from conftest import BrokerHandle, connected_bus
from ocpp_gateway.backend_sim import BackendSim
from ocpp_gateway.service import serve
from ocpp_gateway.sim.wallbox import SimConnector, WallboxSim
from ocpp_gateway.upstream import upstream_target

BEFORE = """
  - id: m1
    circuit: grid
    modbus: {profile: alfen-eve, host: 127.0.0.1, port: 1502}
  - id: o1
    circuit: grid
    ocpp: {charge_box_id: CB1, connector_id: 1}
"""
ADDED = """
  - id: m2
    circuit: grid
    modbus: {profile: alfen-eve, host: 127.0.0.1, port: 1503}
  - id: o2
    circuit: grid
    ocpp: {charge_box_id: CB2, connector_id: 1}
"""


async def test_new_evses_appear_without_a_restart_and_removed_ones_go(broker: BrokerHandle,
                                                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp: Path = tmp_path_factory.mktemp("ocppgw-reload")
    backend = BackendSim(tmp / "backend.sqlite")
    await backend.start()
    cfg, path = gateway_config(tmp / "gw", broker.port, backend_url=backend.url, evses=BEFORE)
    share_broker_secrets(cfg, broker.config)
    ctx = await start_context("ocpp-gateway", cfg, path, connect_timeout=5)
    task = asyncio.create_task(serve(ctx))
    admin = await connected_bus(broker, "admin")
    obs = await connected_bus(broker, "observer")
    status: dict[str, p.EvseStatus | None] = {}
    health: list[p.Health] = []
    obs.subscribe("evse.status", lambda m: status.__setitem__(m.payload.evse_id, m.payload))
    obs.subscribe_raw("chargegate/evse/+/status",
                      lambda t, data, r: status.__setitem__(t.split("/")[2], None) if not data else None)
    obs.subscribe("service.health", lambda m: health.append(m.payload), service="ocpp-gateway")
    url = f"ws://127.0.0.1:{cfg.ocpp.local.port}/ocpp"
    wb1 = WallboxSim("CB1", url, [SimConnector(1, "o1")], meter_interval_s=1)
    wb2 = WallboxSim("CB2", url, [SimConnector(1, "o2")], meter_interval_s=1)
    wb1.start()
    wb2.start()  # not configured yet: refused (404) until the reload
    try:
        for cp in ("m1", "o1"):
            await backend.wait_connected(cp)
        await until(lambda: wb1.booted.is_set(), what="CB1 booted at the gateway")
        await until(lambda: wb2.refused is not None, what="CB2 refused before it is configured")
        assert "m2" not in backend.connected and "o2" not in backend.connected

        # the admin writes a configuration with two more EVSEs and sends reload
        path.write_text(path.read_text().replace(BEFORE, BEFORE + ADDED))
        new_version = cfgmod.load(path).digest()
        admin.publish("service.command", p.ServiceCommand(action="reload", request_id="r1"), service="ocpp-gateway")
        for cp in ("m2", "o2"):
            await backend.wait_connected(cp)
            await until(lambda cp=cp: backend.calls(cp, "BootNotification") != [], what=f"{cp} booted upstream")
        await until(lambda: wb2.booted.is_set(), what="CB2 accepted and booted at the gateway")
        await until(lambda: status.get("o2") is not None and status["o2"].online, what="o2 online on the bus")
        await until(lambda: any(h.config_version == new_version for h in health), what="health with new version")
        # nothing else was restarted
        assert backend.connects["m1"] == 1 and backend.connects["o1"] == 1 and wb1.connects == 1
        assert task.done() is False

        # remove o1: its charge point leaves the backend, the wallbox is turned away, its status is cleared
        path.write_text(path.read_text().replace("""  - id: o1
    circuit: grid
    ocpp: {charge_box_id: CB1, connector_id: 1}
""", ""))
        admin.publish("service.command", p.ServiceCommand(action="reload", request_id="r2"), service="ocpp-gateway")
        await until(lambda: not backend.connected["o1"].is_set(), what="o1 gone from the backend")
        await until(lambda: "o1" in status and status["o1"] is None, what="o1 status cleared")
        await until(lambda: wb1.refused is not None and not wb1.connected.is_set(), what="CB1 refused")
        assert backend.connects["m1"] == 1 and backend.connects["o2"] == 1 and backend.connected["o2"].is_set()
    finally:
        for w in (wb1, wb2):
            await w.stop()
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        await stop_context(ctx)
        await admin.stop()
        await obs.stop()
        await backend.stop()


def _cfg(tmp: Path, smgw: str) -> cfgmod.Config:
    cfg, _ = gateway_config(tmp, 1883, backend_url="wss://ocpp.supplier.test/ocpp", evses=BEFORE,
                            backend_extra="    via_smgw: true\n", extra=smgw)
    return cfg


ENDPOINT = """  endpoints:
    - {name: supplier, host: ocpp.supplier.test, port: 443, listen_port: 18443, purpose: ocpp}
"""
GATEWAY = '  enabled: true\n  gateway: {host: 127.0.0.1, pinned_sha256: "' + "00" * 32 + '"}\n'


def test_upstream_through_the_smgw_follows_the_function_switch(tmp_path: Path) -> None:
    on = _cfg(tmp_path / "on", "smgw:\n" + GATEWAY + "  functions: {ocpp_via_smgw: true}\n" + ENDPOINT)
    t = upstream_target(on, on.evse("m1"))
    assert t is not None and (t.connect_host, t.connect_port) == ("127.0.0.1", 18443)
    assert t.url == "wss://ocpp.supplier.test/ocpp/m1"  # the name stays for TLS and the Host header
    off = _cfg(tmp_path / "off", "smgw:\n" + GATEWAY + "  functions: {ocpp_via_smgw: false}\n" + ENDPOINT)
    with pytest.raises(ValueError, match=r"function 1 \(smgw.functions.ocpp_via_smgw\) is switched off"):
        upstream_target(off, off.evse("m1"))
    disabled = _cfg(tmp_path / "disabled", "smgw:\n  functions: {ocpp_via_smgw: true}\n" + ENDPOINT)
    with pytest.raises(ValueError, match=r"SMGW link is off"):
        upstream_target(disabled, disabled.evse("m1"))
    wrong = _cfg(tmp_path / "wrong", "smgw:\n" + GATEWAY + "  functions: {ocpp_via_smgw: true}\n" + ENDPOINT.replace(
        "purpose: ocpp", "purpose: other"))
    cfg = wrong.model_copy(update={"ocpp": wrong.ocpp.model_copy(update={"backend": wrong.ocpp.backend.model_copy(
        update={"smgw_endpoint": "supplier"})})})
    with pytest.raises(ValueError, match="purpose other, not ocpp"):
        upstream_target(cfg, cfg.evse("m1"))
