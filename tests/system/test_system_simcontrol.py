"""The simulator controls the system suite relies on: a Modbus device taken off the network over the
sim bus (port closed, connections dropped, back on command), and a grid meter that also counts the
draws of wallboxes simulated elsewhere (the OCPP wallbox simulators)."""

from __future__ import annotations

import asyncio
import json
import struct

import pytest
from pymodbus import FramerType
from pymodbus.client import AsyncModbusTcpClient

from chargegate.broker import free_port
from chargegate.bus import Bus, BusSettings
from chargegate.topics import Registry
from conftest import BrokerHandle, connected_bus, make_config, wait_for
from evse_poller.sim.runner import Simulators

pytestmark = pytest.mark.system


async def _read_input(port: int, address: int, count: int, device_id: int = 1,
                      framer: FramerType = FramerType.RTU, holding: bool = False) -> list[int] | None:
    """Input (or holding) registers, or None when the device does not answer (port closed)."""
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0, framer=framer)
    try:
        if not await client.connect():
            return None
        read = client.read_holding_registers if holding else client.read_input_registers
        rsp = await read(address, count=count, device_id=device_id)
        return None if rsp.isError() else list(rsp.registers)
    except Exception:
        return None
    finally:
        client.close()


def _f32(words: list[int]) -> float:
    return float(struct.unpack(">f", struct.pack(">HH", *words))[0])


async def test_network_command_and_external_draws(broker: BrokerHandle, tmp_path) -> None:  # type: ignore[no-untyped-def]
    wb_port, meter_port = free_port(), free_port()
    cfg = make_config(tmp_path, f"""
state_dir: {tmp_path / 'state'}
circuits: [{{id: grid, fuse_a: 35, meter: gm}}]
evses:
  - {{id: wb, circuit: grid, modbus: {{profile: webasto-next, host: 127.0.0.1, port: {wb_port}, device_id: 255}}}}
  - {{id: ext, circuit: grid, ocpp: {{charge_box_id: CB-EXT}}}}
meters:
  - {{id: gm, modbus: {{profile: sdm630, host: 127.0.0.1, port: {meter_port}, device_id: 1}}}}
""")
    sims = Simulators(cfg, base_load_a=(1.0, 2.0, 3.0))
    await sims.start()
    bus = Bus("sim", Registry("chargegate"), BusSettings(port=broker.port, username="sim",
                                                          password=broker.password("sim")))
    await bus.start(wait=5)
    await sims.attach_bus(bus)
    driver: Bus = await connected_bus(broker, "sim")
    try:
        assert await _read_input(meter_port, 0x06, 6) is not None
        # an OCPP wallbox's draw (as ocpp_gateway.sim publishes it) shows up in the grid meter
        driver.publish_raw("chargegate/sim/ext/draw", json.dumps(
            {"evse_id": "ext", "grid_current_a": [10.0, 0.0, 5.5], "source": "ocpp-sim"}).encode(), 1, True)
        await wait_for(lambda: sims.external.get("ext") == [10.0, 0.0, 5.5], 5)
        words = await _read_input(meter_port, 0x06, 6)
        assert words is not None
        assert [round(_f32(words[i:i + 2]), 3) for i in (0, 2, 4)] == [11.0, 2.0, 8.5]
        # a malformed external draw is counted and dropped; the last good one stays
        driver.publish_raw("chargegate/sim/ext/draw", b'{"grid_current_a": [1, "x"]}', 1, True)
        await wait_for(lambda: sims.counters["sim_draws_invalid"] == 1, 5)
        assert sims.external["ext"] == [10.0, 0.0, 5.5]

        # the meter off the network: nothing answers; back on: it answers again
        driver.publish_raw("chargegate/sim/gm/command", json.dumps({"action": "network", "up": False}).encode(), 1)
        await wait_for(lambda: "gm" in sims.offline, 5)
        assert await _read_input(meter_port, 0x06, 6) is None
        driver.publish_raw("chargegate/sim/gm/command", json.dumps({"action": "network", "up": True}).encode(), 1)
        await wait_for(lambda: "gm" not in sims.offline, 5)
        assert await _read_input(meter_port, 0x06, 6) is not None
        # the same for a wallbox (by its EVSE id); the meter stays reachable meanwhile
        driver.publish_raw("chargegate/sim/wb/command", json.dumps({"action": "network", "up": False}).encode(), 1)
        await wait_for(lambda: "wb" in sims.offline, 5)
        assert await _read_input(wb_port, 1000, 2, 255, FramerType.SOCKET, holding=True) is None
        assert await _read_input(meter_port, 0x06, 6) is not None
        driver.publish_raw("chargegate/sim/wb/command", json.dumps({"action": "network", "up": True}).encode(), 1)
        await wait_for(lambda: "wb" not in sims.offline, 5)
        await asyncio.sleep(0.1)
        assert await _read_input(wb_port, 1000, 2, 255, FramerType.SOCKET, holding=True) is not None
        # plug/unplug on a meter is refused without harm
        before = sims.counters["sim_commands_invalid"]
        driver.publish_raw("chargegate/sim/gm/command", json.dumps({"action": "plug"}).encode(), 1)
        await wait_for(lambda: sims.counters["sim_commands_invalid"] == before + 1, 5)
    finally:
        await driver.stop()
        await sims.stop()
