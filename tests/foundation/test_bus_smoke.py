from __future__ import annotations

from datetime import timedelta

from chargegate import payloads as p
from conftest import BrokerHandle, connected_bus, wait_for


async def test_publish_and_receive_typed(broker: BrokerHandle) -> None:
    ctl = await connected_bus(broker, "load-controller")
    poller = await connected_bus(broker, "evse-poller")
    got: list[p.Setpoint] = []
    poller.subscribe("evse.setpoint", lambda m: got.append(m.payload))
    await wait_for(lambda: poller.connections > 0)
    sp = p.Setpoint(evse_id="wb1", current_a=10, phases=3, valid_until=p.utcnow() + timedelta(seconds=10), seq=1)
    await __import__("asyncio").sleep(0.2)
    ctl.publish("evse.setpoint", sp, evse_id="wb1")
    await wait_for(lambda: len(got) >= 1)
    assert got[-1].current_a == 10
    await ctl.stop()
    await poller.stop()
