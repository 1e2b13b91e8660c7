"""Fuzz: arbitrary payloads on every topic the history service subscribes to, through the real broker, into
the running service and its SQLite record.

Asserted: every refused payload is counted and nothing logs an error; the record loop keeps running and no
task restarts; refused payloads write no row and publish nothing; 1100 unknown EVSE and meter ids leave
every structure bounded, the warnings few, the record without a row and the bus without a topic for them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chargegate import record as rec
from chargegate.runtime import ServiceContext, start_context, stop_context
from conftest import BrokerHandle, make_config, wait_for
from fuzz_support import BusFuzz, Logs, Published, any_payload_round, fuzz, messages, refused_only, unknown_ids_round
from history.service import History

CONFIG = """
site: {name: history-fuzz}
circuits:
  - id: grid
    fuse_a: 35
    meter: grid-meter
evses:
  - {id: wb1, circuit: grid, modbus: {profile: alfen-eve, host: 127.0.0.1, port: 1502}}
  - {id: wb2, circuit: grid, ocpp: {charge_box_id: CB2}}
meters:
  - {id: grid-meter, modbus: {profile: sdm630, host: 127.0.0.1, port: 1503}}
history:
  prices: {low: 20, normal: 30}
"""

EVSES = ["wb1", "wb2", "ghost"]
TOPICS: dict[str, dict[str, list[str]]] = {
    "evse.status": {"evse_id": EVSES},
    "evse.limit": {"evse_id": EVSES},
    "evse.mode_set": {"evse_id": EVSES},
    "meter.reading": {"meter_id": ["grid-meter", "other-meter"]},
    "grid.limit": {"source": ["dso", "supplier", "local"]},
    "tariff.current": {},
    "tariff.schedule": {},
    "link.smgw": {},
    "controller.allocation": {},
    "service.command": {"service": ["history"]},
}
TABLES = ("sessions", "session_tariffs", "signed_values", "controls", "modes")


@dataclass
class Rig:
    ctx: ServiceContext
    history: History
    task: asyncio.Task[None]
    fuzz: BusFuzz
    published: Published
    logs: Logs
    db: Path

    def rows(self) -> dict[str, list[tuple[object, ...]]]:
        c = rec.open_db(self.db, readonly=True)
        try:
            return {t: [tuple(r) for r in c.execute(f"SELECT * FROM {t} ORDER BY 1")] for t in TABLES}
        finally:
            c.close()

    async def alive(self) -> None:
        assert not self.task.done(), self.task
        assert dict(self.ctx.task_restarts) == {}
        assert self.ctx.counters["db_errors"] == 0
        n = len(self.logs.entries)
        self.history.second()  # what the loop does every second, now: it must not fail either
        assert self.logs.errors(n) == []


@pytest.fixture(scope="module")
async def rig(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    tmp = tmp_path_factory.mktemp("history-fuzz")
    cfg = make_config(tmp, CONFIG + f"broker: {{port: {broker.port}}}\n")
    cfg.state_dir = broker.config.state_dir  # the broker's generated account passwords
    cfg.history.db_file = tmp / "history.db"
    logs = Logs()
    with logs.capture():
        ctx = await start_context("history", cfg, None, connect_timeout=5)
        h = History(ctx)
        task = asyncio.create_task(h.run())
        await wait_for(lambda: h.bus.connected.is_set(), 5, what="the history bus")
        r = Rig(ctx, h, task, BusFuzz(broker, ctx), Published(broker, ctx), logs, h.path)
        try:
            yield r
            await r.alive()
        finally:
            r.fuzz.close()
            r.published.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await stop_context(ctx)


@fuzz(50)
@given(batch=st.lists(messages(TOPICS), min_size=1, max_size=6))
async def test_any_payload_on_any_topic(rig: Rig, batch: list) -> None:
    await any_payload_round(rig.fuzz, rig.logs, rig.ctx, rig.task, batch)
    rig.history.second()
    assert rig.logs.errors() == [] and rig.ctx.counters["db_errors"] == 0


@fuzz(20)
@given(batch=st.lists(messages(TOPICS), min_size=1, max_size=6))
async def test_refused_payloads_change_nothing(rig: Rig, batch: list) -> None:
    refused = refused_only(rig.fuzz, batch)
    rig.history.second()
    before, topics = rig.rows(), len(rig.published.topics)
    await rig.fuzz.send(refused)
    rig.history.second()
    assert rig.rows() == before
    assert rig.published.topics[topics:] == []


async def test_unknown_ids_stay_bounded_and_quiet(rig: Rig) -> None:
    ids = [f"fz{i}" for i in range(1100)]
    rig.history.second()
    before = rig.rows()
    await unknown_ids_round(rig.fuzz, rig.logs, rig.ctx, ids, (
        ("evse.status", "evse_id"), ("meter.reading", "meter_id"), ("evse.limit", "evse_id"),
        ("evse.mode_set", "evse_id")), refused_on=("evse.status", "evse_id"))
    await rig.alive()
    assert rig.rows() == before, "rows for EVSEs that are not configured"
    await asyncio.sleep(0.2)  # anything the service publishes for them would be on its way by now
    assert rig.published.mentioning(ids) == []
    json.dumps(rig.ctx.health().model_dump(mode="json"))  # the health still serialises
