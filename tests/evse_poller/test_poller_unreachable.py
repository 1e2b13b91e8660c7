"""A reduction that cannot be written makes the device offline at once.

Found by the system fault-injection suite (tests/system): a wallbox that silently dropped off the
network while the grid operator lowered the limit kept drawing its old current; the load controller
believed the reduction and handed the difference to the other wallboxes, over the operator's limit,
until the poller reported the wallbox offline after ``offline_after_failures`` polls (3 s)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from poller_support import polling, setpoint, tcp_config

from chargegate import payloads as p
from evse_poller.poller import MemoryPublisher, Poller
from evse_poller.sim import Simulators


@pytest.fixture
async def rig(tmp_path) -> AsyncIterator[tuple[Simulators, Poller, MemoryPublisher]]:  # type: ignore[no-untyped-def]
    cfg, _ports = tcp_config(tmp_path)
    sims = Simulators(cfg)
    async with polling(cfg, sims) as rig:
        yield rig


async def _applied(poller: Poller) -> None:
    """Wait for the immediate setpoint writes the poller started."""
    if poller._apply_tasks:
        await asyncio.wait(list(poller._apply_tasks), timeout=10)


async def test_an_undeliverable_reduction_reports_the_device_offline_at_once(
        rig: tuple[Simulators, Poller, MemoryPublisher]) -> None:
    sims, poller, pub = rig
    sims.plug("webasto", phases=3, max_current_a=16)
    poller.set_setpoint(setpoint("webasto", 16.0, seq=1))
    await _applied(poller)
    await poller.poll_once()
    assert pub.statuses["webasto"].online and pub.statuses["webasto"].applied.current_a == 16.0
    await sims.set_network("webasto", False)
    poller.set_setpoint(setpoint("webasto", 8.0, seq=2))  # the reduction cannot reach the wallbox
    await _applied(poller)
    await poller.poll_once()
    st = pub.statuses["webasto"]
    assert not st.online and st.state == p.EvseState.OFFLINE
    assert st.applied is not None and st.applied.current_a == 16.0  # what it still runs on
    # an increase that cannot be written is not a reason (the device stays on less than allowed)
    await sims.set_network("webasto", True)
    for _ in range(20):  # the link reconnects with a backoff (0.5 s here)
        await poller.poll_once()
        if pub.statuses["webasto"].online:
            break
        await asyncio.sleep(0.2)
    assert pub.statuses["webasto"].online
    assert pub.statuses["webasto"].applied.current_a == 8.0
    await sims.set_network("webasto", False)
    poller.set_setpoint(setpoint("webasto", 12.0, seq=3))
    await _applied(poller)
    await poller.poll_once()
    assert pub.statuses["webasto"].online  # one failed poll is not yet offline
