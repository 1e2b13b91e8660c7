"""Fuzz: arbitrary payloads on every topic ocpp-gateway subscribes to (statuses and command results of its
Modbus EVSEs, setpoints, its service commands), through the real broker, into the running service connected
to a real OCPP backend (the backend simulator over WebSocket).

Asserted: every refused payload is counted and nothing logs an error; no task restarts; refused payloads
change no status the gateway bridges and send the backend nothing; 1100 unknown EVSE ids leave every
structure bounded, the warnings few and nothing published for them; statuses and command results of EVSEs
that are not its Modbus ones (its own OCPP wallboxes', unknown ones) do not even reach it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ocppgw_helpers import gateway_config, share_broker_secrets

from chargegate.runtime import ServiceContext, start_context, stop_context
from conftest import BrokerHandle, wait_for
from fuzz_support import (
    BusFuzz,
    Logs,
    Published,
    any_payload_round,
    containers,
    fuzz,
    messages,
    refused_only,
    unknown_ids_round,
)
from ocpp_gateway.backend_sim import BackendSim
from ocpp_gateway.service import Gateway, serve

EVSES_YAML = """
  - id: cp1
    circuit: grid
    ocpp: {charge_box_id: CB-FUZZ}
  - id: mb1
    circuit: grid
    modbus: {profile: alfen-eve, host: 127.0.0.1, port: 1502}
"""
EVSES = ["cp1", "mb1", "ghost"]
TOPICS: dict[str, dict[str, list[str]]] = {
    "evse.status": {"evse_id": ["mb1"]},  # the evse-poller's, for the Modbus EVSEs only
    "evse.command_result": {"evse_id": ["mb1"]},
    "evse.setpoint": {"evse_id": EVSES},
    "service.command": {"service": ["ocpp-gateway"]},
}


@dataclass
class Rig:
    ctx: ServiceContext
    task: asyncio.Task[None]
    backend: BackendSim
    fuzz: BusFuzz
    published: Published
    logs: Logs

    @property
    def gw(self) -> Gateway:
        gw = _gateway(self.ctx)
        assert gw is not None
        return gw

    def backend_frames(self) -> list[str]:
        """What the gateway sent the backend (its own Heartbeats left out: they come by the clock)."""
        rows = self.backend.recorder.db.execute("SELECT raw FROM frames WHERE dir = 'in' ORDER BY id").fetchall()
        return [r[0] for r in rows if '"Heartbeat"' not in r[0]]

    def bridged(self) -> str:
        return json.dumps({k: m.status.model_dump(mode="json") if m.status else None
                           for k, m in self.gw.modbus.items()}, sort_keys=True)

    async def alive(self) -> None:
        assert not self.task.done(), self.task
        assert dict(self.ctx.task_restarts) == {}
        assert self.gw.upstreams["mb1"].booted.is_set()


def _gateway(ctx: ServiceContext) -> Gateway | None:
    objs: list[object] = []
    containers(ctx, visited=objs)
    found = [o for o in objs if isinstance(o, Gateway)]
    return found[0] if len(found) == 1 else None


@pytest.fixture(scope="module")
async def rig(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    tmp = tmp_path_factory.mktemp("ocppgw-fuzz")
    backend = BackendSim(tmp / "backend.sqlite")
    await backend.start()
    cfg, path = gateway_config(tmp / "gw", broker.port, backend_url=backend.url, evses=EVSES_YAML)
    share_broker_secrets(cfg, broker.config)
    logs = Logs()
    with logs.capture():
        ctx = await start_context("ocpp-gateway", cfg, path, connect_timeout=5)
        task = asyncio.create_task(serve(ctx))
        await wait_for(lambda: (gw := _gateway(ctx)) is not None and "mb1" in gw.upstreams
                       and gw.upstreams["mb1"].booted.is_set(), 10, what="mb1 booted at the backend")
        r = Rig(ctx, task, backend, BusFuzz(broker, ctx), Published(broker, ctx), logs)
        try:
            yield r
            await r.alive()
        finally:
            r.fuzz.close()
            r.published.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await stop_context(ctx)
            await backend.stop()


@fuzz(150)
@given(batch=st.lists(messages(TOPICS), min_size=1, max_size=6))
async def test_any_payload_on_any_topic(rig: Rig, batch: list) -> None:
    await any_payload_round(rig.fuzz, rig.logs, rig.ctx, rig.task, batch)


@fuzz(20)
@given(batch=st.lists(messages(TOPICS), min_size=1, max_size=6))
async def test_refused_payloads_change_nothing(rig: Rig, batch: list) -> None:
    refused = refused_only(rig.fuzz, batch)
    await asyncio.sleep(0.1)  # what an earlier example sent the backend has arrived
    before, frames, topics = rig.bridged(), len(rig.backend_frames()), len(rig.published.topics)
    await rig.fuzz.send(refused)
    await asyncio.sleep(0.1)
    assert rig.bridged() == before
    assert rig.backend_frames()[frames:] == []
    assert [t for t in rig.published.topics[topics:] if t not in rig.fuzz.topics_sent] == []


async def test_unknown_ids_stay_bounded_and_quiet(rig: Rig) -> None:
    ids = [f"fz{i}" for i in range(1100)]
    # not subscribed to an unknown EVSE's setpoints (test_only_its_ocpp_evses_setpoints_reach_it): none to refuse
    await unknown_ids_round(rig.fuzz, rig.logs, rig.ctx, ids, (("evse.setpoint", "evse_id"),), refused_on=None)
    await rig.alive()
    await asyncio.sleep(0.2)
    assert [t for t in rig.published.mentioning(ids) if t not in rig.fuzz.topics_sent] == []


async def test_only_the_modbus_evses_statuses_reach_it(rig: Rig) -> None:
    """Payloads it would refuse, on the status and result topics of its OCPP wallbox and of an unknown EVSE,
    are not counted: it is not subscribed to them (a wildcard brought back every status it publishes itself,
    one per MeterValues). The same on the Modbus EVSE's topics are counted."""
    before = rig.fuzz.invalid()
    pub = rig.fuzz.publisher("evse-poller")
    for evse_id in ("cp1", "ghost", "fz1"):
        for name in ("evse.status", "evse.command_result"):
            pub.publish(rig.fuzz.oracle.topic(name, evse_id=evse_id), b"refused")
    for name in ("evse.status", "evse.command_result"):
        pub.publish(rig.fuzz.oracle.topic(name, evse_id="mb1"), b"refused")
    await pub.flush()
    await wait_for(lambda: rig.fuzz.invalid() >= before + 2, 10, what="the Modbus EVSE's two refused payloads")
    await asyncio.sleep(0.2)
    assert rig.fuzz.invalid() == before + 2
    rig.fuzz.expected_invalid += 2


async def test_only_its_ocpp_evses_setpoints_reach_it(rig: Rig) -> None:
    """Payloads it would refuse on the setpoint topics of the Modbus EVSE (the evse-poller's) and of unknown
    EVSEs are not counted: it subscribes to its OCPP wallboxes' setpoints only, each by its own topic (the
    wildcard brought it every Modbus EVSE's setpoint of a limit's burst to parse and drop). The same on its
    OCPP wallbox's topic is counted."""
    before = rig.fuzz.invalid()
    pub = rig.fuzz.publisher("load-controller")
    for evse_id in ("mb1", "ghost", "fz1"):
        pub.publish(rig.fuzz.oracle.topic("evse.setpoint", evse_id=evse_id), b"refused")
    pub.publish(rig.fuzz.oracle.topic("evse.setpoint", evse_id="cp1"), b"refused")
    await pub.flush()
    await wait_for(lambda: rig.fuzz.invalid() >= before + 1, 10, what="the OCPP EVSE's refused payload")
    await asyncio.sleep(0.2)
    assert rig.fuzz.invalid() == before + 1
    rig.fuzz.expected_invalid += 1
    assert {s.filter for s in rig.ctx.bus._subs if s.name == "evse.setpoint"} == {
        rig.fuzz.oracle.topic("evse.setpoint", evse_id="cp1")}
