"""A bug in a device's poll loop does not stop that device for good: the loop is logged, counted in the
health's ``task_restarts`` and restarted (real broker, simulated meter)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from poller_support import eventually

from chargegate import config as cfgmod
from chargegate import payloads as p
from chargegate.broker import free_port
from chargegate.runtime import start_context, stop_context
from conftest import BrokerHandle, connected_bus, health_seen
from evse_poller import poller as pollermod
from evse_poller.service import serve
from evse_poller.sim import Simulators


async def test_a_crashed_poll_loop_comes_back(broker: BrokerHandle, tmp_path: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    path = tmp_path / "chargegate.yaml"
    path.write_text(f"""
site: {{name: supervised-poller}}
state_dir: {broker.config.state_dir}
broker: {{port: {broker.port}}}
poller: {{poll_interval_s: 0.1}}
circuits:
  - {{id: grid, fuse_a: 35, meter: grid-meter}}
evses: []
meters:
  - {{id: grid-meter, modbus: {{profile: sdm630, transport: tcp, host: 127.0.0.1, port: {port}, device_id: 2}}}}
""")
    cfg = cfgmod.load(path)
    sims = Simulators(cfg)
    await sims.start()
    readings: list[p.MeterReading] = []
    obs = await connected_bus(broker, "observer")
    obs.subscribe("meter.reading", lambda m: readings.append(m.payload), meter_id="grid-meter")  # type: ignore[arg-type]
    ctx = await start_context("evse-poller", cfg, None, connect_timeout=5)
    task = asyncio.create_task(serve(ctx))
    try:
        await eventually(lambda: any(r.online for r in readings), within_s=5)
        # the next scheduling step of the loop raises once (outside the per-poll error handling)
        real, armed = pollermod._grid_ceil, [True]

        def once(*a: Any) -> float:
            if armed and armed.pop():
                raise OverflowError("injected")
            return real(*a)

        monkeypatch.setattr(pollermod, "_grid_ceil", once)
        await eventually(lambda: not armed, within_s=3)
        n = len(readings)
        await eventually(lambda: len(readings) >= n + 3, within_s=3)  # polling again
        health = await health_seen(broker, ctx, lambda h: h.task_restarts)
        assert health.task_restarts == {"poll:meter:grid-meter": 1}
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await stop_context(ctx)
        await obs.stop()
        await sims.stop()
