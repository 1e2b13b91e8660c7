"""The whole path through the SMGW stand-in: an admin, through the simulator's inbound channel, adds
an EVSE; the real ocpp-gateway service picks the new configuration up on ``reload`` and the EVSE
boots as a charge point at the backend simulator - reached through smgw-link's CLS channel and the
simulator's SOCKS5 proxy - without any service restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from admin_support import ADMIN_TOKEN, OPERATOR_TOKEN, accounts_yaml, admin_yaml, listen_port, request

from chargegate import payloads as p
from chargegate.broker import free_port
from chargegate.config import load
from chargegate.runtime import start_context, stop_context
from conftest import BrokerHandle, connected_bus, make_config, wait_for
from ocpp_gateway.backend_sim import BackendSim
from ocpp_gateway.service import serve as serve_gateway
from smgw_link.certstore import CertStore
from smgw_link.pki import make_pki
from smgw_link.service import serve as serve_link
from smgw_link.sim.smgw import SmgwSim


def e2e_yaml(broker: BrokerHandle, gw_ca: Path, sim_port: int, fwd_port: int, inbound_port: int,
             pin: str, store: Path) -> str:
    return f"""
site: {{name: admin-e2e}}
{accounts_yaml(broker, "smgw-link", "ocpp-gateway", "observer")}
circuits:
  - id: grid
    fuse_a: 35
evses:
  - id: wb1
    circuit: grid
    modbus: {{profile: alfen-eve, host: 127.0.0.1, port: {free_port()}}}
ocpp:
  local: {{host: 127.0.0.1, port: {listen_port()}}}
  backend:
    enabled: true
    url: ws://ocpp.operator.test:8080/ocpp
    via_smgw: true
    reconnect_min_s: 0.2
    reconnect_max_s: 1
smgw:
  enabled: true
  gateway: {{host: 127.0.0.1, port: {sim_port}, trust_anchor: {gw_ca}, server_name: smgw.local, connect_timeout_s: 2}}
  cert_store: {store}
  keepalive_s: 1
  reconnect_min_s: 0.1
  reconnect_max_s: 0.3
  functions: {{ocpp_via_smgw: true, power_reduction: true}}
  endpoints:
    - {{name: operator-ocpp, host: ocpp.operator.test, port: 8080, listen_port: {fwd_port}, purpose: ocpp}}
  inbound: {{enabled: true, host: 127.0.0.1, port: {inbound_port}, allowed_sha256: ["{pin}"]}}
  http_api: {{enabled: false}}
{admin_yaml(listen_port())}
"""


async def test_admin_adds_an_evse_through_the_smgw_and_it_boots_at_the_backend(
        broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("admin-e2e")
    pki = make_pki(tmp / "pki", "brainpoolP256r1")
    store = CertStore(tmp / "store")
    store.import_pem("cls", pki.client_cert, pki.client_key)
    store.select("cls")
    backend = BackendSim(tmp / "backend.sqlite")
    await backend.start()
    sim = SmgwSim(cert=pki.gateway_cert, key=pki.gateway_key, client_ca=pki.device_ca,
                  routes={"ocpp.operator.test:8080": ("127.0.0.1", backend.port)})
    await sim.start()
    inbound_port = listen_port()
    cfg = make_config(tmp, e2e_yaml(broker, pki.gateway_ca, sim.port, listen_port(), inbound_port,
                                    pki.gateway_fingerprint(), tmp / "store"))
    path = tmp / "chargegate.yaml"
    link_ctx = await start_context("smgw-link", cfg, path, connect_timeout=5)
    gw_ctx = await start_context("ocpp-gateway", load(path), path, connect_timeout=5)
    tasks = [asyncio.create_task(serve_link(link_ctx)), asyncio.create_task(serve_gateway(gw_ctx))]
    obs = await connected_bus(broker, "observer")
    health: dict[str, p.Health] = {}
    obs.subscribe("service.health", lambda m: health.__setitem__(m.params["service"], m.payload))

    async def inbound(method: str, url: str, token: str, body: object = None) -> tuple[int, object]:
        streams = await sim.open_inbound("127.0.0.1", inbound_port, pki.device_ca)
        return await request(streams, method, url, token, body)

    try:
        await backend.wait_connected("wb1", 15)  # through the CLS channel: SOCKS5 at the simulator
        assert "ocpp.operator.test:8080" in sim.stats.targets
        await wait_for(lambda: {"smgw-link", "ocpp-gateway"} <= set(health), 10)
        pids = {s: health[s].pid for s in ("smgw-link", "ocpp-gateway")}
        # an operator may not add an EVSE
        item = {"circuit": "grid", "modbus": {"profile": "alfen-eve", "host": "127.0.0.1", "port": free_port()},
                "upstream": {"charge_box_id": "HOUSE1-WB2"}}
        status, body = await inbound("PUT", "/v1/config/evses/wb2", OPERATOR_TOKEN, item)
        assert status == 403
        # the admin may: the running services apply it (wait_s: until they report the new version)
        status, body = await inbound("PUT", "/v1/config/evses/wb2?wait_s=15", ADMIN_TOKEN, item)
        assert status == 200, body
        assert isinstance(body, dict) and body["changed"]
        assert body["applied"] == {"smgw-link": True, "ocpp-gateway": True}, body
        await backend.wait_connected("HOUSE1-WB2", 15)
        await wait_for(lambda: backend.calls("HOUSE1-WB2", "BootNotification") != [], 10)
        boot = backend.calls("HOUSE1-WB2", "BootNotification")[0][2]
        assert boot["chargePointModel"] == "alfen-eve"
        # without any restart: same processes, the first charge point kept its one connection
        assert backend.connects["wb1"] == 1 and backend.connects["HOUSE1-WB2"] == 1
        assert all(not t.done() for t in tasks)
        assert {s: health[s].pid for s in pids} == pids
        assert health["ocpp-gateway"].config_version == body["version"] == load(path).digest()
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        await stop_context(gw_ctx)
        await stop_context(link_ctx)
        await obs.stop()
        await sim.stop()
        await backend.stop()
