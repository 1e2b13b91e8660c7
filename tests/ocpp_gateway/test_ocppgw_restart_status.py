"""After a crash (kill -9) of ocpp-gateway, a charging wallbox that reconnects without a BootNotification
and without a StatusNotification (it sends its status only on a change, as many do) must not be
reported as unavailable with 0 A: the load controller would then budget nothing for a car drawing
16 A. Until the wallbox has told its status, its EVSE is reported not reachable (the controller
assumes it draws what it was last allowed); the gateway asks it at once (TriggerMessage), and the
bus and the backend show the wallbox's real status within seconds."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from ocppgw_helpers import GatewayProcess, gateway_config, share_broker_secrets, until

from chargegate import payloads as p
from chargegate.bus import Message
from conftest import BrokerHandle, connected_bus
from ocpp_gateway.backend_sim import BackendSim
from ocpp_gateway.sim.wallbox import SimConnector, WallboxSim

EVSES = """
  - id: wbR
    circuit: grid
    ocpp: {charge_box_id: CB-R}
"""


async def test_a_charging_wallbox_is_not_reported_idle_after_a_crash(broker: BrokerHandle, tmp_path: Path) -> None:
    backend = BackendSim(tmp_path / "backend.sqlite")
    await backend.start()
    cfg, path = gateway_config(tmp_path / "gw", broker.port, backend_url=backend.url, evses=EVSES,
                               backend_extra="    meter_values_interval_s: 1\n")
    share_broker_secrets(cfg, broker.config)
    gw = GatewayProcess(path, tmp_path / "gateway.log")
    statuses: list[tuple[float, p.EvseStatus]] = []
    obs = await connected_bus(broker, "observer")

    def on_status(m: Message) -> None:
        assert isinstance(m.payload, p.EvseStatus)
        if m.payload.evse_id == "wbR" and not m.retained:
            statuses.append((time.monotonic(), m.payload))

    obs.subscribe("evse.status", on_status)
    wb = WallboxSim("CB-R", f"ws://127.0.0.1:{cfg.ocpp.local.port}/ocpp", [SimConnector(1, "wbR")],
                    meter_interval_s=30.0, status_on_reconnect=False)
    gw.start()
    try:
        wb.start()
        await backend.wait_connected("wbR", 20)
        await until(wb.booted.is_set, 10, what="wallbox booted")
        wb.plug(1, max_current_a=16)
        await until(lambda: bool(statuses) and statuses[-1][1].state == p.EvseState.CHARGING, 15, what="charging")
        gw.kill()
        t_kill = time.monotonic()
        gw.start()
        await until(lambda: wb.connects >= 2 and wb.connected.is_set(), 20, what="wallbox reconnected")
        t_back = time.monotonic()

        def charging_again() -> bool:
            return any(t > t_kill and st.online and st.state == p.EvseState.CHARGING for t, st in statuses)

        await until(charging_again, 5, what="the bus shows the charging wallbox again")
        assert time.monotonic() - t_back < 5
        after = [st for t, st in statuses if t > t_kill]
        # never reachable-and-idle while its car charges: either not reachable (worst case) or charging
        assert all((not st.online) or st.state == p.EvseState.CHARGING for st in after), \
            [(st.online, st.state, st.reason) for st in after]
        assert any(not st.online and "not yet confirmed" in (st.reason or "") for st in after)
        assert ("TriggerMessage", {"requestedMessage": "StatusNotification", "connectorId": 1}) in wb.received

        def backend_sees_charging() -> bool:
            calls = [pl for _, _, pl in backend.calls("wbR", "StatusNotification") if pl.get("connectorId") == 1]
            return bool(calls) and calls[-1]["status"] == "Charging"

        await until(backend_sees_charging, 20, what="the backend sees the wallbox charging")
        assert backend.errors_sent() == []
    finally:
        await wb.stop()
        gw.stop()
        await obs.stop()
        await backend.stop()
        await asyncio.sleep(0)
