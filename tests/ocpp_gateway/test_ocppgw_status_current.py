"""The bus status of an OCPP EVSE once the car has left, found by the system fault-injection suite
(tests/system):

* it reports no current, whatever the last MeterValues said: the status kept the currents of the last
  MeterValues (state ``available``, 6.2 A per phase) until the next session; the load controller
  subtracted that phantom current from the grid meter, underestimated the house load and overloaded
  the fuse for as long as it lasted;
* a 2.0.1 wallbox's StatusNotification ``Available`` may overtake its TransactionEvent ``Ended``
  (chargingState ``Idle``): the gateway then turned the connector back to ``Preparing`` (to the bus
  and to the backend) although no car was there."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from ocppgw_helpers import InProcessGateway, gateway_config, share_broker_secrets, until

from chargegate import payloads as p
from chargegate.bus import Bus
from conftest import BrokerHandle, connected_bus
from ocpp_gateway.backend_sim import BackendSim
from ocpp_gateway.sim.wallbox import SimConnector, WallboxSim

EVSES = """
  - id: cur16
    circuit: grid
    ocpp: {charge_box_id: CUR16, connector_id: 1}
  - id: cur201
    circuit: grid
    phase_rotation: [3, 1, 2]
    ocpp: {charge_box_id: CUR201, connector_id: 1, version: "2.0.1"}
"""


@pytest.fixture(scope="module")
async def rig(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory
              ) -> AsyncIterator[tuple[dict[str, p.EvseStatus], dict[str, WallboxSim]]]:
    tmp: Path = tmp_path_factory.mktemp("ocppgw-status-current")
    backend = BackendSim(tmp / "backend.sqlite")
    await backend.start()
    cfg, path = gateway_config(tmp / "gw", broker.port, backend_url=backend.url, evses=EVSES)
    share_broker_secrets(cfg, broker.config)
    g = InProcessGateway(cfg, path)
    await g.start()
    status: dict[str, p.EvseStatus] = {}
    obs: Bus = await connected_bus(broker, "observer")
    obs.subscribe("evse.status", lambda m: status.__setitem__(m.payload.evse_id, m.payload))
    url = f"ws://127.0.0.1:{cfg.ocpp.local.port}/ocpp"
    boxes = {"cur16": WallboxSim("CUR16", url, [SimConnector(1, "cur16")], meter_interval_s=0.3),
             "cur201": WallboxSim("CUR201", url, [SimConnector(1, "cur201", phase_rotation=[3, 1, 2])],
                                  version="2.0.1", meter_interval_s=0.3)}
    for w in boxes.values():
        w.start()
    for w in boxes.values():
        await until(w.booted.is_set, what="wallbox boot")
    try:
        yield status, boxes
    finally:
        for w in boxes.values():
            await w.stop()
        await g.stop()
        await obs.stop()
        await backend.stop()


@pytest.mark.parametrize("evse", ["cur16", "cur201"])
async def test_no_current_once_the_car_has_left(rig: tuple[dict[str, p.EvseStatus], dict[str, WallboxSim]],
                                                evse: str) -> None:
    status, boxes = rig
    w = boxes[evse]
    w.plug(1, phases=3, max_current_a=10)
    # charging on the wallbox's safe profile; the MeterValues bring its phase currents to the bus
    await until(lambda: evse in status and status[evse].state == p.EvseState.CHARGING
                and min(status[evse].current_a) > 5, 10, what="charging current on the bus")
    w.unplug(1)
    await until(lambda: status[evse].state == p.EvseState.AVAILABLE, 10, what=f"available ({status[evse]})")
    await until(lambda: w.pending_tx_messages() == 0, 10, what="transaction messages answered")
    st = status[evse]
    assert st.current_a == [0.0, 0.0, 0.0], st
    assert st.power_w in (None, 0.0)
    assert st.phases_in_use == 0


async def test_201_available_after_the_car_left(rig: tuple[dict[str, p.EvseStatus], dict[str, WallboxSim]]) -> None:
    status, boxes = rig
    w = boxes["cur201"]
    for _ in range(6):  # the race between StatusNotification and TransactionEvent, several times
        w.plug(1, phases=3, max_current_a=10)
        await until(lambda: "cur201" in status and status["cur201"].state == p.EvseState.CHARGING, 10,
                    what="charging")
        w.unplug(1)
        await until(lambda: w.pending_tx_messages() == 0, 10, what="transaction messages answered")
        await until(lambda: status["cur201"].state == p.EvseState.AVAILABLE, 5,
                    what=f"available after the car left ({status['cur201'].state})")
