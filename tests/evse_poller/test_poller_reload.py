"""Live configuration of the evse-poller service (real broker, Modbus TCP simulators): on ``reload``
a new EVSE and a new meter are polled, a removed EVSE stops and its retained status is cleared,
and the devices left unchanged keep polling on the same connection. The service subscribes to the
setpoints and commands of its own EVSEs only, by their own topics: a new EVSE's setpoints reach it
after the reload, a removed one's no longer."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
from poller_support import eventually

from chargegate import config as cfgmod
from chargegate import payloads as p
from chargegate.broker import free_port
from chargegate.runtime import start_context, stop_context
from conftest import BrokerHandle, connected_bus
from evse_poller.poller import MemoryPublisher, Poller
from evse_poller.service import serve
from evse_poller.sim import Simulators


def _text(broker: BrokerHandle, port: int, evses: str, meters: str) -> str:
    return f"""
site: {{name: reload-test}}
state_dir: {broker.config.state_dir}
broker: {{port: {broker.port}}}
poller: {{poll_interval_s: 0.2, reconnect_backoff_max_s: 0.5}}
controller: {{evse_timeout_s: 4}}  # statuses refreshed every poll (they are counted below)
circuits:
  - id: grid
    fuse_a: 35
evses:
{evses}
meters:
{meters}
"""


def _devices(port: int) -> tuple[str, str, str, str]:
    wb1 = (f"  - {{id: wb1, circuit: grid,\n"
           f"      modbus: {{profile: alfen-eve, host: 127.0.0.1, port: {port}, device_id: 1}}}}\n")
    wb2 = (f"  - {{id: wb2, circuit: grid, phases: 1, phase_rotation: [3],\n"
           f"      modbus: {{profile: webasto-next, host: 127.0.0.1, port: {port}, device_id: 7}}}}\n")
    m1 = f"  - {{id: m1, modbus: {{profile: sdm630, transport: tcp, host: 127.0.0.1, port: {port}, device_id: 2}}}}\n"
    m2 = f"  - {{id: m2, modbus: {{profile: sdm630, transport: tcp, host: 127.0.0.1, port: {port}, device_id: 3}}}}\n"
    return wb1, wb2, m1, m2


async def test_service_picks_up_new_devices_and_drops_removed_ones(broker: BrokerHandle, tmp_path: Path) -> None:
    port = free_port()
    wb1, wb2, m1, m2 = _devices(port)
    path = tmp_path / "chargegate.yaml"
    path.write_text(_text(broker, port, wb1 + wb2, m1 + m2))
    sims = Simulators(cfgmod.load(path))  # every device the configuration will ever name
    await sims.start()
    path.write_text(_text(broker, port, wb1, m1))
    cfg = cfgmod.load(path)
    ctx = await start_context("evse-poller", cfg, path, connect_timeout=5)
    task = asyncio.create_task(serve(ctx))
    obs = await connected_bus(broker, "observer")
    admin = await connected_bus(broker, "admin")
    lc = await connected_bus(broker, "load-controller")
    seq = iter(range(1, 1000))

    def setpoint(evse: str, amps: float) -> None:
        lc.publish("evse.setpoint", p.Setpoint(evse_id=evse, current_a=amps, phases=3, seq=next(seq),
                                               valid_until=p.utcnow() + timedelta(seconds=30)), evse_id=evse)

    def followed() -> set[str]:
        return {s.filter.split("/")[2] for s in ctx.bus._subs if s.name in ("evse.setpoint", "evse.command")}
    status: dict[str, p.EvseStatus | None] = {}
    readings: dict[str, p.MeterReading] = {}
    counts: dict[str, int] = {}

    def on_status(topic: str, data: bytes, retained: bool) -> None:
        ident = topic.split("/")[2]
        counts[ident] = counts.get(ident, 0) + 1
        status[ident] = p.EvseStatus.model_validate_json(data) if data else None

    obs.subscribe_raw("chargegate/evse/+/status", on_status)
    obs.subscribe("meter.reading", lambda m: readings.__setitem__(m.payload.meter_id, m.payload))
    try:
        await eventually(lambda: status.get("wb1") is not None and status["wb1"].online, 10)
        await eventually(lambda: "m1" in readings and readings["m1"].online, 10)
        assert "wb2" not in status and "m2" not in readings
        assert followed() == {"wb1"}  # its own EVSE's topics, no wildcard
        setpoint("wb1", 9)
        await eventually(lambda: sims.point("wb1").commanded_a == 9, 10)
        received = ctx.counters["setpoints_received"]
        setpoint("wb2", 7)  # not (yet) this poller's: the broker does not send it
        setpoint("wb1", 10)
        await eventually(lambda: sims.point("wb1").commanded_a == 10, 10)
        assert ctx.counters["setpoints_received"] == received + 1
        path.write_text(_text(broker, port, wb1 + wb2, m1 + m2))
        admin.publish("service.command", p.ServiceCommand(action="reload", request_id="r1"), service="evse-poller")
        await eventually(lambda: status.get("wb2") is not None and status["wb2"].online, 10)
        await eventually(lambda: "m2" in readings and readings["m2"].online, 10)
        assert followed() == {"wb1", "wb2"}
        setpoint("wb2", 8)  # the new EVSE's setpoints reach it now
        await eventually(lambda: sims.point("wb2").commanded_a == 8, 10)
        # remove wb2: it stops and its retained status is cleared
        path.write_text(_text(broker, port, wb1, m1 + m2))
        admin.publish("service.command", p.ServiceCommand(action="reload", request_id="r2"), service="evse-poller")
        await eventually(lambda: "wb2" in status and status["wb2"] is None, 10)
        n = counts["wb2"]
        before = counts["wb1"]
        await eventually(lambda: counts["wb1"] >= before + 3, 5)  # wb1 goes on polling
        assert counts["wb2"] == n and status["wb2"] is None
        assert followed() == {"wb1"}
        received = ctx.counters["setpoints_received"]
        setpoint("wb2", 6)
        setpoint("wb1", 11)
        await eventually(lambda: sims.point("wb1").commanded_a == 11, 10)
        assert ctx.counters["setpoints_received"] == received + 1 and sims.point("wb2").commanded_a == 8
        assert ctx.config.digest() == cfgmod.load(path).digest()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await stop_context(ctx)
        await obs.stop()
        await admin.stop()
        await lc.stop()
        await sims.stop()


async def test_unchanged_devices_keep_their_device_and_connection(tmp_path: Path) -> None:
    port = free_port()
    wb1, wb2, m1, m2 = _devices(port)
    path = tmp_path / "c.yaml"
    path.write_text(_text_plain(port, wb1 + wb2, m1 + m2))
    sims = Simulators(cfgmod.load(path))
    await sims.start()
    path.write_text(_text_plain(port, wb1 + wb2, m1))
    pub = MemoryPublisher()
    poller = Poller(cfgmod.load(path), pub)
    run = asyncio.create_task(poller.run())
    try:
        await eventually(lambda: "wb1" in pub.statuses and pub.statuses["wb1"].online and "wb2" in pub.statuses, 10)
        dev1, link1 = poller.evses["wb1"], poller.evses["wb1"].link
        gen = link1.generation
        # wb2 gets another maximum current (changed), m2 is new, m1 goes
        path.write_text(_text_plain(port, wb1 + wb2.replace("phases: 1", "phases: 1, max_current_a: 20"), m2))
        assert await poller.reconfigure(cfgmod.load(path))
        assert poller.evses["wb1"] is dev1 and dev1.link is link1 and link1.generation == gen
        assert poller.evses["wb2"].evse.max_current_a == 20
        assert set(poller.meters) == {"m2"} and "m1" not in pub.readings
        await eventually(lambda: "m2" in pub.readings and pub.readings["m2"].online, 10)
        # other poller settings: the caller has to restart the poller
        path.write_text(_text_plain(port, wb1, m2).replace("poll_interval_s: 0.2", "poll_interval_s: 0.5"))
        assert not await poller.reconfigure(cfgmod.load(path))
    finally:
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        await sims.stop()


def _text_plain(port: int, evses: str, meters: str) -> str:
    return f"""
poller: {{poll_interval_s: 0.2, reconnect_backoff_max_s: 0.5}}
circuits:
  - id: grid
    fuse_a: 35
evses:
{evses}
meters:
{meters}
"""
