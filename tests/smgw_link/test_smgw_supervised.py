"""A bug in smgw-link's control loop (limits, failsafe, link status on time) does not stop it: the loop is
logged, counted in the health's ``task_restarts`` and restarted, and it publishes again (real broker,
the local variables API over HTTP)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from admin_support import listen_port, running_link

from chargegate import payloads as p
from conftest import BrokerHandle, connected_bus, health_seen, make_config, wait_for
from smgw_link.control import OperatorControl
from smgw_link.sim.smgw import http_request

TOKEN = "vars-token-0123456789"


async def test_control_loop_comes_back_after_a_failure(broker: BrokerHandle, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    port = listen_port()
    cfg = make_config(tmp_path, f"""
site: {{name: smgw-supervised}}
broker: {{port: {broker.port}}}
state_dir: {broker.config.state_dir}
circuits:
  - {{id: grid, fuse_a: 35}}
evses:
  - {{id: wb1, circuit: grid, modbus: {{profile: alfen-eve, host: 127.0.0.1, port: 1502}}}}
smgw:
  enabled: false
  functions: {{power_reduction: true}}
  http_api: {{host: 127.0.0.1, port: {port}, house_power_w: 24000, tokens: ["{TOKEN}"]}}
  limit_heartbeat_s: 0.2
  limit_hold_s: 3
""")
    limits: list[p.GridLimit] = []
    obs = await connected_bus(broker, "observer")
    obs.subscribe("grid.limit", lambda m: limits.append(m.payload), source="local")  # type: ignore[arg-type]
    try:
        async with running_link(cfg, tmp_path / "chargegate.yaml") as ctx:
            await wait_for(lambda: any(not gl.active for gl in limits))  # the loop runs: no limit in force
            real, armed = OperatorControl.next_deadline, [True]

            def once(self: OperatorControl, *a: Any) -> Any:
                if armed and armed.pop():
                    raise RuntimeError("injected")
                return real(self, *a)

            monkeypatch.setattr(OperatorControl, "next_deadline", once)
            streams = await asyncio.open_connection("127.0.0.1", port)  # a change wakes the loop
            status, _ = await http_request(streams, "PUT", "/api/variables/AVAIL", TOKEN, b'{"value": 50}')
            assert status == 200
            await wait_for(lambda: not armed)
            n = len(limits)
            # the restarted loop repeats the limit in force every limit_heartbeat_s
            await wait_for(lambda: len(limits) >= n + 3 and limits[-1].active and limits[-1].power_w == 12000)
            health = await health_seen(broker, ctx, lambda h: h.task_restarts)
            assert health.task_restarts == {"control-loop": 1}
            streams = await asyncio.open_connection("127.0.0.1", port)
            await http_request(streams, "PUT", "/api/variables/AVAIL", TOKEN, b'{"value": 100}')
            await wait_for(lambda: not limits[-1].active)
    finally:
        await obs.stop()


