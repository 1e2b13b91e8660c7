"""Live configuration of the load-controller service (real broker, reload over service/<name>/command
as the admin API sends it): a fuse change applies at the next cycle, an EVSE added by the admin is
served from the status the bus already carried, a removed EVSE's setpoint is cleared."""

from __future__ import annotations

import asyncio
from pathlib import Path

from chargegate import config as cfgmod
from chargegate import payloads as p
from chargegate.runtime import start_context, stop_context
from conftest import BrokerHandle, connected_bus, wait_for
from load_controller.service import LoadController

BASE = """
site: {{name: lc-reload}}
state_dir: {state}
broker: {{port: {port}}}
circuits:
  - id: grid
    fuse_a: 63
    children:
      - {{id: garage, fuse_a: {fuse}}}
evses:
{evses}
controller: {{cycle_s: 0.5, ramp_step_a: 50, reclaim: false, setpoint_validity_s: 10}}
"""
R1 = "  - {id: r1, circuit: garage, modbus: {profile: sim, host: 127.0.0.1, port: 1502}}\n"
R2 = "  - {id: r2, circuit: garage, modbus: {profile: sim, host: 127.0.0.1, port: 1503}}\n"
R3 = "  - {id: r3, circuit: garage, modbus: {profile: sim, host: 127.0.0.1, port: 1504}}\n"


async def test_fuse_new_and_removed_evses_apply_without_a_restart(broker: BrokerHandle, tmp_path: Path) -> None:
    path = tmp_path / "chargegate.yaml"

    def write(fuse: int, evses: str) -> str:
        path.write_text(BASE.format(state=broker.config.state_dir, port=broker.port, fuse=fuse, evses=evses))
        return cfgmod.load(path).digest()

    write(32, R1 + R2)
    poller = await connected_bus(broker, "evse-poller")
    admin = await connected_bus(broker, "admin")
    observer = await connected_bus(broker, "observer")
    setpoints: dict[str, p.Setpoint | None] = {}
    health: list[p.Health] = []

    def on_setpoint(topic: str, data: bytes, retained: bool) -> None:
        setpoints[topic.split("/")[-2]] = p.Setpoint.model_validate_json(data) if data else None

    observer.subscribe_raw("chargegate/evse/+/setpoint", on_setpoint)
    observer.subscribe("service.health", lambda m: health.append(m.payload), service="load-controller")
    ctx = await start_context("load-controller", cfgmod.load(path), path, connect_timeout=5)
    ctl = LoadController(ctx)
    task = asyncio.create_task(ctl.run(settle_s=0.1, tune=False))

    async def charging(*ids: str) -> None:
        while True:
            for i in ids:
                poller.publish("evse.status", p.EvseStatus(evse_id=i, online=True, state=p.EvseState.CHARGING,
                                                           iec_state=p.IecState.C), evse_id=i)
            await asyncio.sleep(0.5)

    feeder = asyncio.create_task(charging("r1", "r2"))

    def current(i: str) -> float | None:
        sp = setpoints.get(i)
        return sp.current_a if sp is not None else None

    try:
        await wait_for(lambda: current("r1") == 16 and current("r2") == 16, 10)
        # the fuse of the garage goes down to 16 A: shared at the next cycle
        version = write(16, R1 + R2)
        admin.publish("service.command", p.ServiceCommand(action="reload", request_id="f"), service="load-controller")
        await wait_for(lambda: current("r1") == 8 and current("r2") == 8, 5)
        await wait_for(lambda: any(h.config_version == version for h in health), 5)
        # r3's status is on the bus before the configuration names it (its publisher reloaded first)
        poller.publish("evse.status", p.EvseStatus(evse_id="r3", online=True, state=p.EvseState.CHARGING,
                                                   iec_state=p.IecState.C), evse_id="r3")
        await asyncio.sleep(0.3)
        assert "r3" not in setpoints
        write(24, R1 + R2 + R3)
        admin.publish("service.command", p.ServiceCommand(action="reload", request_id="a"), service="load-controller")
        await wait_for(lambda: current("r3") == 8 and current("r1") == 8 and current("r2") == 8, 5)
        # r2 is removed: its retained setpoint goes, the others share the garage
        write(24, R1 + R3)
        admin.publish("service.command", p.ServiceCommand(action="reload", request_id="d"), service="load-controller")
        await wait_for(lambda: "r2" in setpoints and setpoints["r2"] is None, 5)
        await wait_for(lambda: current("r1") == 12 and current("r3") == 12, 5)
        assert not task.done()
    finally:
        feeder.cancel()
        task.cancel()
        for b in (poller, admin, observer):
            await b.stop()
        await stop_context(ctx)
