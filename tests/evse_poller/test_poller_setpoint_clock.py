"""A setpoint from the future must not lock the poller (issue: the fuse holds whatever the inputs).

Published with the load controller's account, a setpoint dated 2099 with a huge ``seq`` made the
evse-poller refuse every later controller setpoint as "older" and never expire: the wallbox kept
16 A on a 25 A sub-fuse. Now its timestamps are clamped on arrival (``ts`` to now, ``valid_until``
to now + ``controller.setpoint_validity_s``): the controller's next setpoint is taken, and without
one the safe current takes over after the validity."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from poller_support import eventually

from chargegate import config as cfgmod
from chargegate import payloads as p
from chargegate import setpoints
from chargegate.broker import free_port
from chargegate.runtime import start_context, stop_context
from conftest import BrokerHandle, connected_bus
from evse_poller.service import serve
from evse_poller.sim import Simulators
from evse_poller.sim.runner import sim_bus

FAR = datetime(2099, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
async def service(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple]:
    tmp = tmp_path_factory.mktemp("clock")
    port = free_port()
    path = tmp / "chargegate.yaml"
    path.write_text(f"""
site: {{name: clock-test}}
state_dir: {broker.config.state_dir}
broker: {{port: {broker.port}}}
controller: {{setpoint_validity_s: 2}}
circuits:
  - {{id: grid, fuse_a: 25}}
evses:
  - {{id: wbc, circuit: grid, safe_current_a: 6,
      modbus: {{profile: alfen-eve, host: 127.0.0.1, port: {port}, device_id: 1}}}}
""")
    cfg = cfgmod.load(path)
    sims = Simulators(cfg)
    await sims.start()
    sbus = sim_bus(cfg)
    await sbus.start(wait=5)
    await sims.attach_bus(sbus)
    ctx = await start_context("evse-poller", cfg, None, connect_timeout=5)
    task = asyncio.create_task(serve(ctx))
    lc = await connected_bus(broker, "load-controller")
    try:
        sbus.publish_raw("chargegate/sim/wbc/command", json.dumps({"action": "plug", "phases": 3,
                                                                     "max_current_a": 16}).encode(), qos=1)
        yield ctx, sims, lc
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await stop_context(ctx)
        await lc.stop()
        await sbus.stop()
        await sims.stop()


def setpoint(current: float, seq: int, ts: datetime | None = None, until: datetime | None = None) -> p.Setpoint:
    now = datetime.now(UTC)
    return p.Setpoint(evse_id="wbc", current_a=current, phases=3, seq=seq, ts=ts or now,
                      valid_until=until or now + timedelta(seconds=2))


async def test_a_setpoint_from_the_future_does_not_block_the_controllers_next_one(service) -> None:
    ctx, sims, lc = service
    lc.publish("evse.setpoint", setpoint(10, 5), evse_id="wbc")
    await eventually(lambda: sims.point("wbc").commanded_a == 10.0, within_s=5)
    lc.publish("evse.setpoint", setpoint(16, p.MAX_INT, ts=FAR, until=FAR), evse_id="wbc")
    await eventually(lambda: sims.point("wbc").commanded_a == 16.0, within_s=5)
    assert ctx.counters["setpoints_from_the_future"] >= 1
    # the controller's next setpoint, with a lower seq but as of now, is taken at once
    lc.publish("evse.setpoint", setpoint(8, 6), evse_id="wbc")
    await eventually(lambda: sims.point("wbc").commanded_a == 8.0, within_s=3)


async def test_a_setpoint_from_the_future_expires_after_the_configured_validity(service) -> None:
    _ctx, sims, lc = service
    lc.publish("evse.setpoint", setpoint(16, p.MAX_INT, ts=FAR, until=FAR), evse_id="wbc")
    await eventually(lambda: sims.point("wbc").commanded_a == 16.0, within_s=5)
    t0 = asyncio.get_running_loop().time()
    # with no controller any more: the safe current after validity (2 s) + margin, not 16 A for good
    await eventually(lambda: sims.point("wbc").commanded_a == 6.0, within_s=2 + setpoints.VALIDITY_MARGIN_S + 3)
    assert asyncio.get_running_loop().time() - t0 >= 1.5


NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


@given(ts=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)),
       until_s=st.floats(-1e6, 1e9), seq=st.integers(0, p.MAX_INT), validity=st.floats(1, 600))
def test_on_arrival_never_keeps_a_time_from_the_future(ts: datetime, until_s: float, seq: int,
                                                      validity: float) -> None:
    sp = p.Setpoint(evse_id="wbc", current_a=16, phases=3, seq=seq, ts=ts,
                    valid_until=min(NOW + timedelta(seconds=until_s), datetime(2300, 1, 1, tzinfo=UTC)))
    got = setpoints.on_arrival(sp, NOW, validity)
    assert got.ts <= NOW
    assert got.valid_until <= NOW + timedelta(seconds=validity + setpoints.VALIDITY_MARGIN_S)
    assert got.current_a == sp.current_a and got.seq == sp.seq
    # the controller's next setpoint (seq 1, as of a moment later) is never out of order against it
    later = NOW + timedelta(seconds=1)
    nxt = setpoints.on_arrival(p.Setpoint(evse_id="wbc", current_a=6, phases=3, seq=1, ts=later,
                                          valid_until=NOW + timedelta(seconds=11)), later, validity)
    assert not setpoints.out_of_order(nxt, got, NOW + timedelta(seconds=1))


def test_a_late_copy_of_an_older_setpoint_is_still_out_of_order() -> None:
    new = setpoints.on_arrival(setpoint(10, 7, ts=NOW), NOW, 10)
    late = setpoints.on_arrival(setpoint(16, 6, ts=NOW - timedelta(seconds=1), until=NOW + timedelta(seconds=9)),
                                NOW + timedelta(seconds=0.1), 10)
    assert setpoints.out_of_order(late, new, NOW + timedelta(seconds=0.1))
