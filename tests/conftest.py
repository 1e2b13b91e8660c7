"""Shared fixtures: a real Mosquitto broker on a free port with the project's configuration and ACL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from chargegate import config as cfgmod
from chargegate.broker import LocalBroker, account_password, free_port
from chargegate.bus import Bus
from chargegate.runtime import ServiceContext, start_context, stop_context
from chargegate.topics import Registry

MINIMAL_CONFIG = """
site: {name: test}
circuits:
  - id: grid
    fuse_a: 35
    meter: grid-meter
    children:
      - id: garage
        fuse_a: 32
evses:
  - id: wb1
    circuit: garage
    modbus: {profile: alfen-eve, host: 127.0.0.1, port: 1502}
  - id: wb2
    circuit: garage
    phases: 1
    phase_rotation: [2]
    ocpp: {charge_box_id: CB1}
meters:
  - id: grid-meter
    modbus: {profile: sdm630, host: 127.0.0.1, port: 1503}
"""


def make_config(tmp: Path, text: str = MINIMAL_CONFIG, broker_port: int | None = None) -> cfgmod.Config:
    """Write ``text`` as chargegate.yaml in ``tmp`` and load it (state_dir inside ``tmp``)."""
    path = tmp / "chargegate.yaml"
    path.write_text(text)
    cfg = cfgmod.load(path)
    if broker_port is not None:
        cfg.broker.port = broker_port
    return cfg


class BrokerHandle:
    def __init__(self, broker: LocalBroker, config: cfgmod.Config, config_path: Path) -> None:
        self.broker = broker
        self.config = config
        self.config_path = config_path
        self.port = broker.port

    def password(self, account: str) -> str:
        return account_password(self.config, account)

    def restart(self) -> None:
        self.broker.stop()
        self.broker.start()

    def kill(self) -> None:
        self.broker.kill()

    def start(self) -> None:
        self.broker.start()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerHandle]:
    """A real Mosquitto with the project's generated configuration, password file and ACL."""
    tmp = tmp_path_factory.mktemp("broker")
    port = free_port()
    cfg = make_config(tmp, broker_port=port)
    path = tmp / "chargegate.yaml"
    path.write_text(MINIMAL_CONFIG + f"\nbroker: {{port: {port}}}\n")
    b = LocalBroker.prepare(cfg, port=port, persistence=True)
    b.start()
    try:
        yield BrokerHandle(b, cfg, path)
    finally:
        b.discard()


async def connected_bus(handle: BrokerHandle, account: str, registry: Registry | None = None) -> Bus:
    from chargegate.broker import bus_settings

    bus = Bus(account, registry or Registry(handle.config.site.topic_root), bus_settings(handle.config, account))
    await bus.start(wait=5)
    return bus


@pytest.fixture
async def service_ctx(broker: BrokerHandle) -> AsyncIterator[ServiceContext]:
    ctx = await start_context("load-controller", broker.config, broker.config_path, connect_timeout=5)
    try:
        yield ctx
    finally:
        await stop_context(ctx)


async def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02, *,  # type: ignore[no-untyped-def]  # noqa: ASYNC109
                   what: str = "condition") -> None:
    """Wait until ``predicate()`` is true (polling an in-memory condition, not a sleep-based test)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        await asyncio.sleep(interval)


async def health_seen(handle: BrokerHandle, ctx: ServiceContext, predicate, timeout: float = 5.0):  # type: ignore[no-untyped-def]  # noqa: ASYNC109
    """``ctx``'s health payload as an observer receives it from the broker, once ``predicate(health)`` holds
    (the context publishes it now, and again until then)."""
    obs = await connected_bus(handle, "observer")
    got: asyncio.Queue = asyncio.Queue()
    obs.subscribe("service.health", lambda m: got.put_nowait(m.payload), service=ctx.name)
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        while True:
            ctx.publish_health()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise AssertionError(f"no health of {ctx.name} as expected within {timeout} s")
            try:
                health = await asyncio.wait_for(got.get(), min(left, 1.0))
            except TimeoutError:
                continue
            if predicate(health):
                return health
    finally:
        await obs.stop()
