"""A bug in the control loop does not stop the load controller: the loop is logged, counted in the
health's ``task_restarts`` and restarted, and it controls again (real broker)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from chargegate import payloads as p
from chargegate.bus import Message
from chargegate.runtime import start_context, stop_context
from conftest import BrokerHandle, connected_bus, health_seen, make_config, wait_for
from load_controller.service import LoadController

CONFIG = """
site: {name: lc-supervised}
circuits:
  - id: grid
    fuse_a: 35
    meter: grid-meter
evses:
  - id: wbs
    circuit: grid
    modbus: {profile: sim, host: 127.0.0.1, port: 1502}
meters:
  - id: grid-meter
    modbus: {profile: sdm630, host: 127.0.0.1, port: 1503}
controller:
  cycle_s: 0.2
  ramp_step_a: 50
  reclaim: false
  setpoint_validity_s: 10
"""


async def test_control_loop_comes_back_after_a_failure(broker: BrokerHandle, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, CONFIG, broker_port=broker.port)
    cfg.state_dir = broker.config.state_dir
    cfg.site.topic_root = broker.config.site.topic_root
    poller = await connected_bus(broker, "evse-poller")
    smgw = await connected_bus(broker, "smgw-link")
    observer = await connected_bus(broker, "observer")
    for src in ("dso", "supplier", "local", "failsafe"):
        smgw.clear("grid.limit", source=src)
    setpoints: list[p.Setpoint] = []
    observer.subscribe("evse.setpoint", lambda m: setpoints.append(m.payload), evse_id="wbs")  # type: ignore[arg-type]
    ctx = await start_context("load-controller", cfg, None, connect_timeout=5)
    ctx.bus.clear("evse.setpoint", evse_id="wbs")
    ctl = LoadController(ctx)
    task = asyncio.create_task(ctl.run(settle_s=0.1, tune=False))

    def status() -> None:
        poller.publish("evse.status", p.EvseStatus(evse_id="wbs", online=True, state=p.EvseState.CHARGING,
                                                   iec_state=p.IecState.C), evse_id="wbs")
        poller.publish("meter.reading", p.MeterReading(meter_id="grid-meter", current_a=[2.0, 2.0, 2.0]),
                       meter_id="grid-meter")

    def last(m: Message | None = None) -> float | None:
        return setpoints[-1].current_a if setpoints else None

    try:
        status()
        await wait_for(lambda: last() == 16)
        real, armed = ctl.publish_allocation, [True]

        def once(*a: Any, **kw: Any) -> Any:
            if armed and armed.pop():
                raise RuntimeError("injected")
            return real(*a, **kw)

        ctl.publish_allocation = once  # type: ignore[method-assign]
        await wait_for(lambda: not armed)
        status()  # still fresh for the restarted loop
        smgw.publish("grid.limit", p.GridLimit(source="dso", active=True, power_w=2000,
                                               valid_until=p.utcnow() + timedelta(minutes=5)), source="dso")
        await wait_for(lambda: last() is not None and last() < 16)  # controlling again: the limit is applied
        health = await health_seen(broker, ctx, lambda h: h.task_restarts)
        assert health.task_restarts == {"control-loop": 1}
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        smgw.clear("grid.limit", source="dso")
        await stop_context(ctx)
        for b in (poller, smgw, observer):
            await b.stop()
