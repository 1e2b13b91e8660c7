"""The evse-poller service with the real broker: statuses and readings appear, setpoints from the
load controller are written, backend commands are answered, the simulators take plug commands
from the bus and the ``chargegate sim`` CLI."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from poller_support import eventually

from chargegate import config as cfgmod
from chargegate import payloads as p
from chargegate.broker import free_port
from chargegate.bus import Message
from chargegate.runtime import start_context, stop_context
from conftest import BrokerHandle, connected_bus
from evse_poller.service import serve
from evse_poller.sim import Simulators
from evse_poller.sim.runner import sim_bus


def _config(broker: BrokerHandle, tmp) -> tuple[cfgmod.Config, str]:
    port = free_port()
    text = f"""
site: {{name: service-test}}
state_dir: {broker.config.state_dir}
broker: {{port: {broker.port}}}
circuits:
  - id: grid
    fuse_a: 35
    meter: grid-meter
evses:
  - {{id: wb1, circuit: grid, modbus: {{profile: alfen-eve, host: 127.0.0.1, port: {port}, device_id: 1}}}}
  - {{id: wb2, circuit: grid, phases: 1, phase_rotation: [3],
      modbus: {{profile: webasto-next, host: 127.0.0.1, port: {port}, device_id: 7}}}}
meters:
  - {{id: grid-meter, modbus: {{profile: sdm630, transport: tcp, host: 127.0.0.1, port: {port}, device_id: 2}}}}
"""
    path = tmp / "chargegate.yaml"
    path.write_text(text)
    return cfgmod.load(path), str(path)


class Seen:
    def __init__(self) -> None:
        self.status: dict[str, p.EvseStatus] = {}
        self.readings: dict[str, p.MeterReading] = {}
        self.results: list[p.EvseCommandResult] = []
        self.draws: dict[str, dict] = {}


@pytest.fixture(scope="module")
async def service(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple]:
    tmp = tmp_path_factory.mktemp("svc")
    cfg, path = _config(broker, tmp)
    sims = Simulators(cfg, base_load_a=(3.0, 2.0, 1.0))
    await sims.start()
    sbus = sim_bus(cfg)
    await sbus.start(wait=5)
    await sims.attach_bus(sbus)
    ctx = await start_context("evse-poller", cfg, None, connect_timeout=5)
    task = asyncio.create_task(serve(ctx))
    seen = Seen()
    obs = await connected_bus(broker, "observer")

    def on_status(m: Message) -> None:
        seen.status[m.params["evse_id"]] = m.payload  # type: ignore[assignment]

    def on_reading(m: Message) -> None:
        seen.readings[m.params["meter_id"]] = m.payload  # type: ignore[assignment]

    def on_result(m: Message) -> None:
        seen.results.append(m.payload)  # type: ignore[arg-type]

    def on_draw(topic: str, payload: bytes, retained: bool) -> None:
        d = json.loads(payload)
        seen.draws[d["evse_id"]] = d

    obs.subscribe("evse.status", on_status)
    obs.subscribe("meter.reading", on_reading)
    obs.subscribe("evse.command_result", on_result)
    obs.subscribe_raw("chargegate/sim/+/draw", on_draw)
    lc = await connected_bus(broker, "load-controller")
    gw = await connected_bus(broker, "ocpp-gateway")
    try:
        yield ctx, sims, seen, lc, gw, path, sbus
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await stop_context(ctx)
        for b in (obs, lc, gw):
            await b.stop()
        await sims.stop()


async def test_statuses_and_readings_appear(service) -> None:
    _ctx, _sims, seen, *_ = service
    await eventually(lambda: {"wb1", "wb2"} <= set(seen.status) and "grid-meter" in seen.readings, within_s=8)
    st = seen.status["wb1"]
    assert st.online and st.source == "evse-poller" and st.state == p.EvseState.AVAILABLE
    assert st.applied is not None and st.applied.fallback
    assert seen.readings["grid-meter"].current_a == pytest.approx([3.0, 2.0, 1.0], abs=0.05)


async def test_plug_over_the_bus_and_setpoint_from_the_controller(service) -> None:
    _ctx, sims, seen, lc, _gw, _path, sbus = service
    sbus.publish_raw("chargegate/sim/wb1/command", json.dumps({"action": "plug", "phases": 3,
                                                                 "max_current_a": 16}).encode(), qos=1)
    await eventually(lambda: seen.draws.get("wb1", {}).get("plugged") is True, within_s=5)
    sp = p.Setpoint(evse_id="wb1", current_a=11.0, phases=3, seq=5,
                    valid_until=datetime.now(UTC) + timedelta(seconds=30))
    lc.publish("evse.setpoint", sp, evse_id="wb1")
    await eventually(lambda: sims.point("wb1").commanded_a == 11.0, within_s=5)
    await eventually(lambda: seen.status["wb1"].applied is not None and seen.status["wb1"].applied.seq == 5
                     and seen.status["wb1"].state == p.EvseState.CHARGING, within_s=5)
    assert seen.status["wb1"].current_a == [11.0, 11.0, 11.0]
    await eventually(lambda: seen.draws["wb1"]["grid_current_a"] == [11.0, 11.0, 11.0], within_s=3)
    await eventually(lambda: seen.readings["grid-meter"].current_a == pytest.approx([14.0, 13.0, 12.0], abs=0.05),
                     within_s=5)


async def test_backend_command_is_answered(service) -> None:
    _ctx, sims, seen, _lc, gw, *_ = service
    gw.publish("evse.command", p.EvseCommand(evse_id="wb1", action="stop", request_id="req-1"), evse_id="wb1")
    await eventually(lambda: any(r.request_id == "req-1" for r in seen.results), within_s=5)
    res = next(r for r in seen.results if r.request_id == "req-1")
    assert res.accepted and sims.point("wb1").commanded_a == 0.0
    gw.publish("evse.command", p.EvseCommand(evse_id="wb1", action="start", request_id="req-2"), evse_id="wb1")
    await eventually(lambda: sims.point("wb1").commanded_a == 11.0, within_s=5)


async def test_bad_messages_are_dropped_and_counted(service) -> None:
    ctx, sims, seen, lc, _gw, _path, sbus = service
    before = sum(ctx.registry.invalid.values())
    lc.publish_raw("chargegate/evse/wb1/setpoint", b'{"evse_id": "wb1", "current_a": -5}', qos=1, retain=False)
    lc.publish_raw("chargegate/evse/wb1/setpoint", b"not json", qos=1, retain=False)
    await eventually(lambda: sum(ctx.registry.invalid.values()) >= before + 2, within_s=5)
    sbus.publish_raw("chargegate/sim/wb1/command", b'{"action": "explode"}', qos=1)
    await eventually(lambda: sims.counters["sim_commands_invalid"] >= 1, within_s=5)
    assert sims.point("wb1").commanded_a == 11.0  # nothing changed
    assert seen.status["wb1"].online


async def test_sim_cli_plugs_and_unplugs(service) -> None:
    _ctx, sims, seen, _lc, _gw, path, _sbus = service
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chargegate.cli", "sim", "plug", "wb2", "--phases", "1", "--max-current-a", "10",
        "--config", path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    assert "wb2: car plugged in (1 phases, max 10 A)" in out.decode()
    assert sims.point("wb2").car.plugged and sims.point("wb2").car.max_current_a == 10
    # the 1-phase wb2 hangs on grid phase L3 (phase_rotation [3])
    await eventually(lambda: seen.draws.get("wb2", {}).get("grid_current_a", [0, 0, 0])[2] > 0, within_s=5)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chargegate.cli", "sim", "unplug", "wb2", "--config", path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0 and "wb2: car unplugged" in out.decode(), err.decode()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chargegate.cli", "sim", "plug", "nope", "--config", path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2 and "unknown simulated EVSE" in err.decode()


async def test_service_process_on_uvloop_publishes_and_stops_cleanly(service, broker: BrokerHandle, tmp_path) -> None:
    _ctx, _sims, seen, _lc, _gw, path, _sbus = service
    text = (await asyncio.to_thread(_read, path)).replace("id: wb1,", "id: wb9,").replace(
        "  - {id: wb2, circuit: grid, phases: 1, phase_rotation: [3],\n", "").replace(
        "      modbus: {profile: webasto-next", "#")
    cfg_path = tmp_path / "process.yaml"
    await asyncio.to_thread(cfg_path.write_text, "\n".join(
        line for line in text.splitlines() if not line.startswith("#") and "device_id: 7" not in line))
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "evse_poller", "--config", str(cfg_path),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await eventually(lambda: "wb9" in seen.status and seen.status["wb9"].online, within_s=15)
    finally:
        proc.terminate()
        _out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err.decode()[-2000:]


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()
