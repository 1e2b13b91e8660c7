"""Serial lines over pseudo-terminal pairs: two devices sharing one RS485 line (Modbus RTU, requests
serialised), the ABL eMH on its own line with Modbus ASCII framing, and RTU through a TCP gateway."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from poller_support import polling, setpoint

from chargegate import config as cfgmod
from chargegate import payloads as p
from chargegate.broker import free_port
from evse_poller.poller import MemoryPublisher, Poller
from evse_poller.sim import Simulators
from evse_poller.sim.server import SerialEndpoint, TcpEndpoint


def _is_symlink(path: str) -> bool:
    return os.path.islink(path)


def _config(tmp: Path, gw_port: int) -> cfgmod.Config:
    # parity N: a pseudo-terminal cannot be configured with parity (the devices use 8E1 on a real line)
    text = f"""
state_dir: {tmp / 'state'}
circuits: [{{id: grid, fuse_a: 35, meter: grid-meter}}]
evses:
  - id: hd1
    circuit: grid
    modbus: {{profile: heidelberg-energy-control, device_id: 1, timeout_s: 0.5,
              serial: {{port: {tmp / 'rs485'}, baudrate: 19200, parity: N}}}}
  - id: abl1
    circuit: grid
    modbus: {{profile: abl-emh, device_id: 1, timeout_s: 0.5,
              serial: {{port: {tmp / 'abl-bus'}, baudrate: 38400, parity: N}}}}
  - id: hd2
    circuit: grid
    modbus: {{profile: heidelberg-energy-control, host: 127.0.0.1, port: {gw_port}, device_id: 3}}
meters:
  - id: grid-meter
    modbus: {{profile: sdm630, transport: rtu, device_id: 2, timeout_s: 0.5,
              serial: {{port: {tmp / 'rs485'}, baudrate: 19200, parity: N}}}}
"""
    path = tmp / "chargegate.yaml"
    path.write_text(text)
    return cfgmod.load(path)


@pytest.fixture(scope="module")
async def serial_rig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Simulators, Poller,
                                                                                      MemoryPublisher]]:
    tmp = tmp_path_factory.mktemp("rtu")
    cfg = _config(tmp, free_port())
    sims = Simulators(cfg)
    async with polling(cfg, sims) as rig:
        yield rig


async def test_two_devices_share_one_rs485_line(serial_rig) -> None:
    sims, poller, pub = serial_rig
    line = sims.endpoint_of("hd1")
    assert isinstance(line, SerialEndpoint) and line is sims.endpoint_of("grid-meter")
    assert _is_symlink(line.device_path)  # the configured port path points at the pty
    # one link (one serial connection) for both devices on the line
    assert poller.evses["hd1"].link is poller.meters["grid-meter"].link
    assert poller.evses["hd1"].link.endpoint.framer == "rtu"
    sims.plug("hd1", phases=3, max_current_a=16)
    poller.set_setpoint(setpoint("hd1", 8.0))
    for _ in range(2):
        await poller.poll_once()
    st = pub.statuses["hd1"]
    assert st.online and st.iec_state == p.IecState.C and st.applied.current_a == 8.0, st
    assert sims.point("hd1").commanded_a == 8.0
    assert st.current_a == [8.0, 8.0, 8.0]
    reading = pub.readings["grid-meter"]
    assert reading.online and reading.current_a == pytest.approx([9.0, 9.0, 9.0], abs=0.05)
    assert line.line is not None and line.line.bytes > 0


async def test_abl_speaks_modbus_ascii(serial_rig) -> None:
    sims, poller, pub = serial_rig
    assert poller.evses["abl1"].link.endpoint.framer == "ascii"
    sims.plug("abl1", phases=1, max_current_a=32)
    poller.set_setpoint(setpoint("abl1", 13.0))
    for _ in range(2):
        await poller.poll_once()
    st = pub.statuses["abl1"]
    assert st.online and st.raw_state == 0xC2 and st.iec_state == p.IecState.C, st
    assert st.applied.current_a == pytest.approx(12.96)  # duty cycle 21.6 %
    assert st.current_a == pytest.approx([13.0, 0.0, 0.0], abs=0.05) and st.phases_in_use == 1
    # every read goes out twice (the eMH may sleep through the first)
    assert sims.evses["abl1"].regmap.reads >= 2 * 2


async def test_rtu_through_a_tcp_gateway(serial_rig) -> None:
    sims, poller, pub = serial_rig
    gw = sims.endpoint_of("hd2")
    assert isinstance(gw, TcpEndpoint) and gw.framing == "rtu"
    assert poller.evses["hd2"].link.endpoint.describe().endswith("(rtu over TCP)")
    await poller.poll_once()
    st = pub.statuses["hd2"]
    assert st.online and st.state == p.EvseState.AVAILABLE, st
