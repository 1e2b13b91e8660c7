"""Fuzz: arbitrary payloads on every topic the evse-poller subscribes to (setpoints, backend commands, its
service commands), through the real broker, into the running service polling a simulated wallbox over real
Modbus TCP.

Asserted: every refused payload is counted and nothing logs an error; no task restarts and the wallbox is
still polled; refused payloads change neither the setpoint the poller holds nor the current written to the
wallbox, and publish no command result; 1100 unknown EVSE ids leave every structure bounded, the warnings
few and nothing published for them. The poller subscribes to its own EVSEs' setpoints and commands only: what
is published for any other EVSE id never reaches it (not counted, nothing changes)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chargegate.broker import free_port
from chargegate.runtime import ServiceContext, start_context, stop_context
from conftest import BrokerHandle, make_config, wait_for
from evse_poller.poller import Poller
from evse_poller.service import serve
from evse_poller.sim import Simulators
from fuzz_support import (
    HOSTILE_PAYLOADS,
    BusFuzz,
    Logs,
    Published,
    any_payload_round,
    containers,
    find,
    fuzz,
    messages,
    refused_only,
    template,
    unknown_ids_round,
)

EVSES = ["wb1"]  # the topics it subscribes to; any other EVSE's: test_only_its_own_evses_topics_reach_it
TOPICS: dict[str, dict[str, list[str]]] = {
    "evse.setpoint": {"evse_id": EVSES},
    "evse.command": {"evse_id": EVSES},
    "service.command": {"service": ["evse-poller"]},
}


@dataclass
class Rig:
    ctx: ServiceContext
    task: asyncio.Task[None]
    sims: Simulators
    fuzz: BusFuzz
    published: Published
    logs: Logs

    @property
    def poller(self) -> Poller:
        return find(self.ctx, Poller)

    async def alive(self) -> None:
        assert not self.task.done(), self.task
        assert dict(self.ctx.task_restarts) == {}
        dev = self.poller.evses["wb1"]
        last = dev.last_status
        await wait_for(lambda: dev.last_status is not last, 5, what="wb1 polled again")
        assert dev.online


@pytest.fixture(scope="module")
async def rig(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    tmp = tmp_path_factory.mktemp("poller-fuzz")
    port = free_port()
    cfg = make_config(tmp, f"""
site: {{name: poller-fuzz}}
poller: {{poll_interval_s: 0.2}}
circuits:
  - {{id: grid, fuse_a: 35}}
evses:
  - {{id: wb1, circuit: grid, modbus: {{profile: alfen-eve, host: 127.0.0.1, port: {port}, timeout_s: 0.5}}}}
meters: []
""", broker_port=broker.port)
    cfg.state_dir = broker.config.state_dir
    sims = Simulators(cfg)
    await sims.start()
    sims.plug("wb1", phases=3, max_current_a=16)
    logs = Logs()
    with logs.capture():
        ctx = await start_context("evse-poller", cfg, None, connect_timeout=5)
        task = asyncio.create_task(serve(ctx))
        await wait_for(lambda: _online(ctx), 10, what="wb1 online")
        r = Rig(ctx, task, sims, BusFuzz(broker, ctx), Published(broker, ctx), logs)
        try:
            yield r
            await r.alive()
        finally:
            r.fuzz.close()
            r.published.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await stop_context(ctx)
            await sims.stop()


def _online(ctx: ServiceContext) -> bool:
    objs: list[object] = []
    containers(ctx, visited=objs)  # the poller is reachable once the service has subscribed
    pollers = [o for o in objs if isinstance(o, Poller)]
    return len(pollers) == 1 and pollers[0].evses["wb1"].online


def held(rig: Rig) -> tuple[object, float | None]:
    sp = rig.poller.evses["wb1"].setpoint
    return (sp.model_dump(mode="json") if sp else None), rig.sims.point("wb1").commanded_a


@fuzz(150)
@given(batch=st.lists(messages(TOPICS), min_size=1, max_size=6))
async def test_any_payload_on_any_topic(rig: Rig, batch: list) -> None:
    await any_payload_round(rig.fuzz, rig.logs, rig.ctx, rig.task, batch)


@fuzz(20)
@given(batch=st.lists(messages(TOPICS), min_size=1, max_size=6))
async def test_refused_payloads_change_nothing(rig: Rig, batch: list) -> None:
    refused = refused_only(rig.fuzz, batch)
    await asyncio.sleep(0.05)  # an apply of an earlier example is done
    before, topics = held(rig), len(rig.published.topics)
    await rig.fuzz.send(refused)
    await asyncio.sleep(0.1)
    assert held(rig) == before
    assert [t for t in rig.published.topics[topics:] if t.endswith("/command/result")
            and t not in rig.fuzz.topics_sent] == []


async def test_unknown_ids_stay_bounded_and_quiet(rig: Rig) -> None:
    ids = [f"fz{i}" for i in range(1100)]
    await unknown_ids_round(rig.fuzz, rig.logs, rig.ctx, ids, (("evse.setpoint", "evse_id"),
                                                                ("evse.command", "evse_id")),
                            refused_on=None)
    await rig.alive()
    await asyncio.sleep(0.2)
    assert [t for t in rig.published.mentioning(ids) if t not in rig.fuzz.topics_sent] == []


async def test_only_its_own_evses_topics_reach_it(rig: Rig) -> None:
    """Payloads it would refuse and valid ones, on the setpoint and command topics of EVSEs it does not poll
    (an unknown one, an OCPP wallbox's, another instance's), are not counted and change nothing: it is not
    subscribed to them. The same refused payloads on its own EVSE's topics are counted."""
    await asyncio.sleep(0.05)
    before, invalid, received = held(rig), rig.fuzz.invalid(), rig.ctx.counters["setpoints_received"]
    topics = len(rig.published.topics)
    lc, gw = rig.fuzz.publisher("load-controller"), rig.fuzz.publisher("ocpp-gateway")
    for evse_id in ("ghost", "cp1", "fz1"):
        for payload in (*HOSTILE_PAYLOADS[:8], json.dumps(template("evse.setpoint", evse_id=evse_id)).encode()):
            lc.publish(rig.fuzz.oracle.topic("evse.setpoint", evse_id=evse_id), payload)
        gw.publish(rig.fuzz.oracle.topic("evse.command", evse_id=evse_id),
                   json.dumps(template("evse.command", evse_id=evse_id)).encode())
        gw.publish(rig.fuzz.oracle.topic("evse.command", evse_id=evse_id), b"refused")
    lc.publish(rig.fuzz.oracle.topic("evse.setpoint", evse_id="wb1"), b"refused")
    gw.publish(rig.fuzz.oracle.topic("evse.command", evse_id="wb1"), b"refused")
    await lc.flush()
    await gw.flush()
    await wait_for(lambda: rig.fuzz.invalid() >= invalid + 2, 10, what="its own EVSE's two refused payloads")
    await asyncio.sleep(0.2)
    assert rig.fuzz.invalid() == invalid + 2
    rig.fuzz.expected_invalid += 2
    assert rig.ctx.counters["setpoints_received"] == received and held(rig) == before
    assert [t for t in rig.published.topics[topics:] if t.endswith("/command/result")
            and t not in rig.fuzz.topics_sent] == []
