"""Helpers for the evse-poller tests: configurations with simulated devices, a raw Modbus client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pymodbus.client import AsyncModbusTcpClient

from chargegate import config as cfgmod
from chargegate import payloads as p
from chargegate.broker import free_port
from evse_poller.poller import MemoryPublisher, Poller
from evse_poller.sim import Simulators

EVSE_PROFILES = ["alfen-eve", "heidelberg-energy-control", "phoenix-charx", "webasto-next", "abl-emh"]
SHORT = {"alfen-eve": "alfen", "heidelberg-energy-control": "heidelberg", "phoenix-charx": "charx",
         "webasto-next": "webasto", "abl-emh": "abl"}


@contextlib.asynccontextmanager
async def polling(cfg: cfgmod.Config, sims: Simulators) -> AsyncIterator[tuple[Simulators, Poller, MemoryPublisher]]:
    """``sims`` started and a poller on ``cfg`` publishing into memory; both stopped on exit."""
    await sims.start()
    pub = MemoryPublisher()
    poller = Poller(cfg, pub)
    try:
        yield sims, poller, pub
    finally:
        await poller.stop()
        await sims.stop()


def tcp_config(tmp: Path, *, watchdog_s: float = 15.0, extra: str = "", broker_port: int | None = None
               ) -> tuple[cfgmod.Config, dict[str, int]]:
    """Every EVSE profile on its own TCP port (transport tcp), the two meters sharing one port."""
    ports = {SHORT[n]: free_port() for n in EVSE_PROFILES}
    ports["meters"] = free_port()
    evses = []
    for n in EVSE_PROFILES:
        s = SHORT[n]
        rot = "[2, 3, 1]" if s == "charx" else "[1, 2, 3]"
        evses.append(f"  - {{id: {s}, circuit: garage, max_current_a: 16, safe_current_a: 6, phase_rotation: {rot},"
                     f" phase_switching: {'true' if s == 'alfen' else 'false'},"
                     f" modbus: {{profile: {n}, transport: tcp, host: 127.0.0.1, port: {ports[s]}, timeout_s: 0.3,"
                     f" retries: 0}}}}")
    text = f"""
site: {{name: poller-test}}
state_dir: {tmp / 'state'}
poller:
  {{poll_interval_s: 1, offline_after_failures: 3, reconnect_backoff_max_s: 0.5, watchdog_timeout_s: {watchdog_s}}}
circuits:
  - id: grid
    fuse_a: 63
    meter: grid-meter
    children:
      - {{id: garage, fuse_a: 50, meter: garage-meter}}
evses:
{chr(10).join(evses)}
meters:
  - id: grid-meter
    role: grid
    modbus: {{profile: sdm630, transport: tcp, host: 127.0.0.1, port: {ports['meters']}, device_id: 1}}
  - id: garage-meter
    role: circuit
    modbus: {{profile: sunspec-meter, host: 127.0.0.1, port: {ports['meters']}, device_id: 2}}
{extra}
"""
    path = tmp / "chargegate.yaml"
    path.write_text(text)
    cfg = cfgmod.load(path)
    if broker_port is not None:
        cfg.broker.port = broker_port
    return cfg, ports


def setpoint(evse_id: str, current: float, valid_s: float = 30.0, seq: int = 1, phases: int = 3) -> p.Setpoint:
    return p.Setpoint(evse_id=evse_id, current_a=current, phases=phases,
                      valid_until=datetime.now(UTC) + timedelta(seconds=valid_s), seq=seq)


async def read_raw(port: int, table: str, address: int, count: int, device_id: int) -> list[int]:
    """Read registers with a plain pymodbus client (independent of the poller's code)."""
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
    await client.connect()
    try:
        if table == "holding":
            rsp = await client.read_holding_registers(address, count=count, device_id=device_id)
        else:
            rsp = await client.read_input_registers(address, count=count, device_id=device_id)
        assert not rsp.isError(), rsp
        return list(rsp.registers)
    finally:
        client.close()


async def eventually(predicate, within_s: float = 5.0, interval: float = 0.05) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        res = predicate()
        if asyncio.iscoroutine(res):
            res = await res
        if res:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met within timeout")
        await asyncio.sleep(interval)
