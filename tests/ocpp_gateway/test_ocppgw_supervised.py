"""A bug in an EVSE's periodic MeterValues loop does not stop it for good (issue 14: an energy register
of Infinity made number formatting raise OverflowError and the loop died without a log line): the loop
is logged, counted in the health's ``task_restarts`` and restarted (real broker, backend simulator)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ocppgw_helpers import InProcessGateway, gateway_config, share_broker_secrets, until
from structlog.testing import capture_logs

from chargegate import payloads as p
from conftest import BrokerHandle, connected_bus, health_seen
from ocpp_gateway.backend_sim import BackendSim
from ocpp_gateway.modbus import ModbusEvse

EVSES = """
  - id: mbs
    circuit: grid
    id_tag: TAG-MBS
    modbus: {profile: alfen-eve, host: 127.0.0.1, port: 1502}
"""


async def test_meter_loop_comes_back_after_a_failure(broker: BrokerHandle, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    backend = BackendSim(tmp_path / "backend.sqlite")
    await backend.start()
    cfg, path = gateway_config(tmp_path / "gw", broker.port, backend_url=backend.url, evses=EVSES,
                               backend_extra="    meter_values_interval_s: 0.2\n")
    share_broker_secrets(cfg, broker.config)
    g = InProcessGateway(cfg, path)
    gw = await g.start()
    poller = await connected_bus(broker, "evse-poller")
    try:
        await backend.wait_connected("mbs")
        poller.publish("evse.status", p.EvseStatus(
            evse_id="mbs", online=True, state=p.EvseState.CHARGING, iec_state=p.IecState.C, energy_wh=1000.0,
            power_w=3680.0, current_a=[16.0, 0.0, 0.0], phases_in_use=1, source="evse-poller"), evse_id="mbs")

        def meter_values() -> int:
            return len(backend.calls("mbs", "MeterValues"))

        await until(lambda: meter_values() >= 2, what="periodic MeterValues")
        real, armed = ModbusEvse.samples, [True]

        def once(self: ModbusEvse) -> Any:
            if armed and armed.pop():
                raise OverflowError("cannot convert float infinity to integer")
            return real(self)

        with capture_logs() as logs:
            monkeypatch.setattr(ModbusEvse, "samples", once)
            await until(lambda: not armed, what="the injected failure")
            n = meter_values()
            await until(lambda: meter_values() >= n + 2, what="MeterValues again after the failure")
        [line] = [e for e in logs if e["event"] == "task failed, restarting it"]
        assert line["task"] == "meter-loop:mbs" and line["evse_id"] == "mbs" and line["error_type"] == "OverflowError"
        assert g.ctx is not None
        health = await health_seen(broker, g.ctx, lambda h: h.task_restarts)
        assert health.task_restarts == {"meter-loop:mbs": 1}
        assert gw.modbus["mbs"].tx is not None  # the session goes on
    finally:
        await g.stop()
        await poller.stop()
        await backend.stop()
