"""The poller reports a car's stay (``status.session``): when it arrived and the energy register then.

Found by the system fault-injection suite (tests/system): a car plugged in while ocpp-gateway was not
running began charging at once; the gateway, back a few seconds later, started the backend session
from the energy register it saw then, and the energy charged before was never billed."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from poller_support import polling, setpoint, tcp_config

from chargegate import payloads as p
from evse_poller.poller import MemoryPublisher, Poller
from evse_poller.sim import Simulators


@pytest.fixture(scope="module")
async def rig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Simulators, Poller, MemoryPublisher]]:
    cfg, _ports = tcp_config(tmp_path_factory.mktemp("session"))
    sims = Simulators(cfg)
    for evse in ("alfen", "webasto", "charx"):
        sims.point(evse).energy_wh = 1234.4  # wallboxes that have charged before
    async with polling(cfg, sims) as rig:
        yield rig


@pytest.mark.parametrize("evse", ["alfen", "webasto", "charx"])
async def test_session_starts_at_the_plug_in_register_and_ends_with_the_car(
        rig: tuple[Simulators, Poller, MemoryPublisher], evse: str) -> None:
    sims, poller, pub = rig
    point = sims.point(evse)
    await poller.poll_once()
    assert pub.statuses[evse].session is None  # no car
    sims.plug(evse, phases=3, max_current_a=16)
    poller.set_setpoint(setpoint(evse, 16.0))
    await poller.poll_once()
    st = pub.statuses[evse]
    assert st.session is not None
    start = st.session.energy_start_wh
    assert start == st.energy_wh  # the register the poller read at the plug-in
    first_id = st.session.id
    point.energy_wh += 2.0  # the car charges
    await poller.poll_once()
    st = pub.statuses[evse]
    assert st.session is not None and st.session.id == first_id
    assert st.session.energy_start_wh == start  # still the plug-in register, not the current one
    assert st.session.energy_wh == pytest.approx(st.energy_wh - start)
    assert st.energy_wh is not None and st.energy_wh >= start + 1.5
    sims.unplug(evse)
    await poller.poll_once()
    assert pub.statuses[evse].iec_state == p.IecState.A and pub.statuses[evse].session is None
