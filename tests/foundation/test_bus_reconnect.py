"""The bus survives a broker restart: reconnects, restores subscriptions, gets retained state back."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from chargegate import payloads as p
from chargegate.bus import Message
from conftest import BrokerHandle, connected_bus, wait_for


async def test_reconnect_restores_subscriptions_and_retained_state(broker: BrokerHandle) -> None:
    ctl = await connected_bus(broker, "load-controller")
    poller = await connected_bus(broker, "evse-poller")
    got: list[Message] = []
    poller.subscribe("evse.setpoint", got.append, evse_id="wb9")
    await asyncio.sleep(0.1)  # let SUBACK arrive (no event for it in the typed API)
    sp = p.Setpoint(evse_id="wb9", current_a=8, phases=1, valid_until=p.utcnow() + timedelta(minutes=5), seq=1)
    ctl.publish("evse.setpoint", sp, evse_id="wb9")
    await wait_for(lambda: len(got) == 1)
    assert got[0].payload == sp

    broker.kill()  # SIGKILL: no clean disconnect
    await wait_for(lambda: not poller.connected.is_set() and not ctl.connected.is_set(), timeout=10)
    broker.start()
    await wait_for(lambda: poller.connections >= 2 and ctl.connections >= 2, timeout=10)
    # retained state comes back on the restored subscription (the broker persisted it)
    await wait_for(lambda: len(got) >= 2, timeout=5)
    assert got[-1].payload.current_a == 8
    # a newcomer gets it as retained state
    late = await connected_bus(broker, "observer")
    late_got: list[Message] = []
    late.subscribe("evse.setpoint", late_got.append, evse_id="wb9")
    await wait_for(lambda: len(late_got) == 1)
    assert late_got[0].retained and late_got[0].payload == sp
    await late.stop()
    # and new messages flow
    sp2 = sp.model_copy(update={"current_a": 12, "seq": 2})
    ctl.publish("evse.setpoint", sp2, evse_id="wb9")
    await wait_for(lambda: got[-1].payload.current_a == 12)
    ctl.clear("evse.setpoint", evse_id="wb9")
    await ctl.stop()
    await poller.stop()


async def test_bad_payload_never_reaches_the_handler(broker: BrokerHandle) -> None:
    obs = await connected_bus(broker, "load-controller")
    got: list[Message] = []
    obs.subscribe("evse.status", got.append)
    raw = await connected_bus(broker, "evse-poller")
    await asyncio.sleep(0.1)
    raw.publish_raw("chargegate/evse/wbx/status", b"{broken", qos=1)
    raw.publish_raw("chargegate/evse/wbx/status", b'{"evse_id": "wbx", "online": "maybe", "state": 3}', qos=1)
    good = p.EvseStatus(evse_id="wbx", online=True, state=p.EvseState.AVAILABLE)
    raw.publish("evse.status", good, evse_id="wbx")
    await wait_for(lambda: len(got) == 1)
    assert got[0].payload == good
    assert sum(obs.registry.invalid.values()) == 2
    raw.clear("evse.status", evse_id="wbx")
    await raw.stop()
    await obs.stop()


async def test_handler_exception_does_not_break_the_bus(broker: BrokerHandle) -> None:
    bus = await connected_bus(broker, "evse-poller")
    seen: list[int] = []

    def bad(msg: Message) -> None:
        seen.append(1)
        raise RuntimeError("handler bug")

    async def bad_async(msg: Message) -> None:
        seen.append(2)
        raise RuntimeError("async handler bug")

    bus.subscribe("evse.status", bad, evse_id="wbz")
    bus.subscribe("evse.status", bad_async, evse_id="wbz")
    await asyncio.sleep(0.1)
    st = p.EvseStatus(evse_id="wbz", online=True, state=p.EvseState.AVAILABLE)
    bus.publish("evse.status", st, evse_id="wbz")
    bus.publish("evse.status", st, evse_id="wbz")
    await wait_for(lambda: len(seen) == 4)
    bus.clear("evse.status", evse_id="wbz")
    await bus.stop()
