"""``python -m evse_poller.sim --config FILE`` as a process: every Modbus device of the config is
served where the config says (several unit ids on one TCP port, RTU on a virtual serial line)."""

from __future__ import annotations

import asyncio
import os
import sys

from poller_support import read_raw

from chargegate.broker import free_port, wait_port


def _exists(path: str) -> bool:
    return os.path.islink(path)


async def test_simulator_process_serves_the_configuration(tmp_path) -> None:
    port = free_port()
    serial = tmp_path / "rs485"
    cfg = tmp_path / "chargegate.yaml"
    cfg.write_text(f"""
state_dir: {tmp_path / 'state'}
circuits: [{{id: grid, fuse_a: 35, meter: m1}}]
evses:
  - {{id: a1, circuit: grid, modbus: {{profile: alfen-eve, host: 127.0.0.1, port: {port}, device_id: 1}}}}
  - {{id: a2, circuit: grid, modbus: {{profile: alfen-eve, host: 127.0.0.1, port: {port}, device_id: 2}}}}
  - {{id: h1, circuit: grid, modbus: {{profile: heidelberg-energy-control, serial: {{port: {serial}, parity: N}}}}}}
meters:
  - {{id: m1, modbus: {{profile: sunspec-meter, host: 127.0.0.1, port: {port}, device_id: 3}}}}
""")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "evse_poller.sim", "--config", str(cfg),
                                                "--no-bus", "--base-load-a", "4,5,6",
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await asyncio.to_thread(wait_port, "127.0.0.1", port, 15)
        # Alfen sockets as unit 1 and 2: mode 3 state "A" at 1201
        assert (await read_raw(port, "holding", 1201, 5, 1))[0] == ord("A") << 8
        assert (await read_raw(port, "holding", 1201, 5, 2))[0] == ord("A") << 8
        # SunSpec meter as unit 3: "SunS" at 40000, model 203 after the common model
        assert await read_raw(port, "holding", 40000, 2, 3) == [0x5375, 0x6E53]
        assert (await read_raw(port, "holding", 40069, 2, 3)) == [203, 105]
        # base load 4/5/6 A with scale factor -2 at AphA..AphC
        assert await read_raw(port, "holding", 40069 + 3, 3, 3) == [400, 500, 600]
        assert await asyncio.to_thread(_exists, str(serial))
    finally:
        proc.terminate()
        _out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert not await asyncio.to_thread(_exists, str(serial))  # the symlink is removed on exit
