"""Issue 12.9: after any reconnect the backend gets the wallbox's current connector status, never a
made-up ``Unavailable``: after a ``kill -9`` and restart of ocpp-gateway (the gateway as a real process),
and after the backend / SMGW channel was away and returns (the wallbox stays connected). Real processes
and WebSockets: the gateway process, the backend simulator, a simulated charging wallbox (1.6 and
2.0.1, each with a backend of its own version)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from ocppgw_helpers import GatewayProcess, gateway_config, share_broker_secrets, until

from conftest import BrokerHandle
from ocpp_gateway.backend_sim import BackendSim
from ocpp_gateway.sim.wallbox import SimConnector, WallboxSim

EVSES = """
  - id: rc16
    circuit: grid
    ocpp: {charge_box_id: RC16}
  - id: rc201
    circuit: grid
    ocpp: {charge_box_id: RC201, version: "2.0.1"}
    upstream: {version: "2.0.1"}
"""


def statuses(backend: BackendSim, cp: str, since: int) -> list[str]:
    """The connector statuses the backend got for ``cp`` (1.6 connector 1, 2.0.1 EVSE 1), from call ``since``."""
    out = []
    for _, _, pl in backend.calls(cp, "StatusNotification")[since:]:
        if pl.get("connectorId") == 1 and "status" in pl:
            out.append(pl["status"])
        elif pl.get("evseId") == 1 and "connectorStatus" in pl:
            out.append(pl["connectorStatus"])
    return out


CHARGING = {"rc16": "Charging", "rc201": "Occupied"}


class LosesFirstStatusTrigger(WallboxSim):
    """A wallbox that accepts the first TriggerMessage StatusNotification after a reconnect and sends nothing
    (seen with wallboxes still busy booting): the gateway must ask again."""

    lost = 0

    def trigger(self, what: str, n: int | None) -> str:
        if what == "StatusNotification" and self.connects >= 2 and not self.lost:
            self.lost += 1
            return "Accepted"
        return super().trigger(what, n)


@pytest.mark.timeout(120)
async def test_backend_gets_the_wallbox_status_after_a_crash_and_after_the_channel_returns(
        broker: BrokerHandle, tmp_path: Path) -> None:
    backend = BackendSim(tmp_path / "backend.sqlite")
    await backend.start()
    cfg, path = gateway_config(tmp_path / "gw", broker.port, backend_url=backend.url, evses=EVSES)
    share_broker_secrets(cfg, broker.config)
    gw = GatewayProcess(path, tmp_path / "gateway.log")
    url = f"ws://127.0.0.1:{cfg.ocpp.local.port}/ocpp"
    # wallboxes that send their status only on a change (and when asked), as many do
    wbs = {"rc16": LosesFirstStatusTrigger("RC16", url, [SimConnector(1, "rc16")], meter_interval_s=30.0,
                              status_on_reconnect=False),
           "rc201": WallboxSim("RC201", url, [SimConnector(1, "rc201")], version="2.0.1", meter_interval_s=30.0,
                               status_on_reconnect=False)}
    gw.start()
    try:
        for cp, wb in wbs.items():
            wb.start()
            await backend.wait_connected(cp, 20)
            await until(wb.booted.is_set, 10, what="wallbox booted")
            wb.plug(1, max_current_a=16)
        for cp in wbs:
            await until(lambda cp=cp: statuses(backend, cp, 0)[-1:] == [CHARGING[cp]], 15,  # type: ignore[misc]
                        what=f"{cp} charging at the backend")

        # 1. kill -9 of the gateway, restart: the wallboxes reconnect without a boot and without a status
        marks = {cp: len(backend.calls(cp, "StatusNotification")) for cp in wbs}
        gw.kill()
        gw.start()
        for cp, wb in wbs.items():
            await until(lambda wb=wb: wb.connects >= 2 and wb.connected.is_set(), 20,  # type: ignore[misc]
                        what=f"{cp} reconnected")
        for cp in wbs:
            await until(lambda cp=cp: CHARGING[cp] in statuses(backend, cp, marks[cp]), 5,  # type: ignore[misc]
                        what=f"{cp}: the backend gets the wallbox's status after the restart")
        await asyncio.sleep(2.5)  # the gateway's own fallback for a triggered status would come after 2 s
        assert wbs["rc16"].lost == 1  # rc16 lost the first trigger: the gateway asked again
        for cp in wbs:
            got = statuses(backend, cp, marks[cp])
            assert got and set(got) == {CHARGING[cp]}, (cp, got)  # never Unavailable while it charges

        # 2. the backend / SMGW channel goes away and returns; the wallboxes stay connected to the gateway
        marks = {cp: len(backend.calls(cp, "StatusNotification")) for cp in wbs}
        before = {cp: backend.connects.get(cp, 0) for cp in wbs}
        await backend.go_away()
        await asyncio.sleep(1.0)
        await backend.come_back()
        for cp in wbs:
            await until(lambda cp=cp: backend.connects.get(cp, 0) > before[cp], 20,  # type: ignore[misc]
                        what=f"{cp} reconnected upstream")
            await until(lambda cp=cp: CHARGING[cp] in statuses(backend, cp, marks[cp]), 5,  # type: ignore[misc]
                        what=f"{cp}: the backend gets the wallbox's status after the channel returned")
            got = statuses(backend, cp, marks[cp])
            assert set(got) == {CHARGING[cp]}, (cp, got)
        assert backend.errors_sent() == []
    finally:
        for wb in wbs.values():
            await wb.stop()
        gw.stop()
        await backend.stop()
