"""Fuzz: arbitrary payloads on every topic the load-controller subscribes to, through the real broker (each
with an account the ACL lets write it), into the running service.

Asserted: every refused payload is counted (``invalid_messages``) and nothing logs an error; the control loop
keeps running (cycles go on, no task restart, health answers); refused payloads change no input; 2000
distinct unknown EVSE and meter ids leave every structure of the service bounded, write a bounded number of
warnings and make it publish nothing for them."""

from __future__ import annotations

import asyncio
import collections
import copy
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chargegate.runtime import ServiceContext, start_context, stop_context
from conftest import BrokerHandle, health_seen, make_config, wait_for
from fuzz_support import BusFuzz, Logs, Published, fuzz, largest, messages, template
from load_controller.service import LoadController

CONFIG = """
site: {name: lc-fuzz}
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
    modbus: {profile: sim, host: 127.0.0.1, port: 1502}
  - id: wb2
    circuit: garage
    phases: 1
    phase_rotation: [2]
    ocpp: {charge_box_id: CB1}
meters:
  - id: grid-meter
    modbus: {profile: sdm630, host: 127.0.0.1, port: 1503}
controller:
  cycle_s: 0.5
"""

EVSES = ["wb1", "wb2", "ghost", "Z9"]
TOPICS: dict[str, dict[str, list[str]]] = {
    "evse.status": {"evse_id": EVSES},
    "meter.reading": {"meter_id": ["grid-meter", "other-meter"]},
    "grid.limit": {"source": ["dso", "supplier", "local", "failsafe", "ocpp_backend"]},
    "evse.limit": {"evse_id": EVSES},
    "evse.mode": {"evse_id": EVSES},
    "tariff.current": {},
    "tariff.schedule": {},
    "link.smgw": {},
    "service.health": {"service": ["ocpp-gateway", "evse-poller", "history"]},
    "service.command": {"service": ["load-controller"]},
}


@dataclass
class Rig:
    ctx: ServiceContext
    ctl: LoadController
    task: asyncio.Task[None]
    fuzz: BusFuzz
    published: Published
    logs: Logs
    broker: BrokerHandle

    async def alive(self) -> None:
        assert not self.task.done(), self.task
        cycles = self.ctl.counters["cycles"]
        await wait_for(lambda: self.ctl.counters["cycles"] > cycles, 5, what="a control cycle")
        assert dict(self.ctx.task_restarts) == {}
        assert self.ctl.counters["cycle_errors"] == 0


@pytest.fixture(scope="module")
async def rig(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    tmp = tmp_path_factory.mktemp("lc-fuzz")
    cfg = make_config(tmp, CONFIG, broker_port=broker.port)
    cfg.state_dir = broker.config.state_dir
    logs = Logs()
    with logs.capture():
        ctx = await start_context("load-controller", cfg, None, connect_timeout=5)
        ctl = LoadController(ctx)
        task = asyncio.create_task(ctl.run(settle_s=0.1, tune=False))
        await wait_for(lambda: ctl.started, 10, what="the controller's first cycle")
        r = Rig(ctx, ctl, task, BusFuzz(broker, ctx), Published(broker, ctx), logs, broker)
        try:
            yield r
            await r.alive()
            health = await health_seen(broker, ctx, lambda h: h.counters.get("invalid_messages", 0) > 0)
            assert health.status.value in ("online", "degraded") and health.task_restarts == {}
        finally:
            r.fuzz.close()
            r.published.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await stop_context(ctx)


def snapshot(ctl: LoadController) -> str:
    inp = ctl.inputs
    return json.dumps({
        "statuses": {k: v.model_dump(mode="json") for k, v in inp.statuses.items()},
        "readings": {k: v.model_dump(mode="json") for k, v in inp.readings.items()},
        "grid": {k: v.model_dump(mode="json") for k, v in inp.grid_limits.items()},
        "evse_limits": {k: v.model_dump(mode="json") for k, v in inp.evse_limits.items()},
        "modes": {k: v.model_dump(mode="json") for k, v in inp.modes.items()},
        "tariff": [x.model_dump(mode="json") if x else None for x in (inp.tariff_current, inp.tariff_schedule)],
        "link": inp.link.model_dump(mode="json") if inp.link else None,
        "services": {k: v.model_dump(mode="json", exclude={"ts", "uptime_s"}) for k, v in inp.services.items()},
    }, sort_keys=True, default=str)


@fuzz(60)
@given(batch=st.lists(messages(TOPICS), min_size=1, max_size=6))
async def test_any_payload_on_any_topic(rig: Rig, batch: list) -> None:
    mark = rig.logs.mark()
    await rig.fuzz.send(batch)
    assert rig.logs.errors(mark) == []
    assert not rig.task.done() and dict(rig.ctx.task_restarts) == {}
    assert rig.ctl.counters["cycle_errors"] == 0


@fuzz(25)
@given(batch=st.lists(messages(TOPICS), min_size=1, max_size=6))
async def test_refused_payloads_change_nothing(rig: Rig, batch: list) -> None:
    before = snapshot(rig.ctl)
    held = copy.copy((rig.ctl.unconfigured_statuses, rig.ctl.unconfigured_readings, rig.ctl.unconfigured_limits))
    refused = [m for m, bad in zip(batch, [rig.fuzz.oracle.refused(rig.fuzz.oracle.topic(n, **pr), pl)
                                           for n, pr, pl in batch], strict=True) if bad]
    await rig.fuzz.send(refused)
    assert snapshot(rig.ctl) == before
    assert tuple(len(h) for h in held) == (len(rig.ctl.unconfigured_statuses), len(rig.ctl.unconfigured_readings),
                                           len(rig.ctl.unconfigured_limits))


async def test_unknown_ids_stay_bounded_and_quiet(rig: Rig) -> None:
    """More distinct unknown ids than any bound (1100 EVSEs and meters), then 1000 refused payloads on as
    many topics: bounded structures, a bounded number of warnings, nothing published for those ids."""
    ids = [f"fz{i}" for i in range(1100)]
    mark = rig.logs.mark()
    batch = [(name, {key: i}, json.dumps(template(name, **{key: i})).encode())
             for i in ids for name, key in (("evse.status", "evse_id"), ("meter.reading", "meter_id"),
                                            ("evse.limit", "evse_id"), ("evse.mode", "evse_id"))]
    batch += [("evse.status", {"evse_id": i}, b'{"evse_id": "' + i.encode() + b'", "online": "yes"}')
              for i in ids[:1000]]
    refused = await rig.fuzz.send(batch, timeout=60)
    assert sum(refused) == 1000
    await rig.alive()
    big = largest(rig.ctx)
    assert big[0][0] <= 1024, big  # the longest: an LRU of 1024 or the 1000 unconfigured devices kept
    warnings = rig.logs.since(mark)
    assert len(warnings) <= 30, collections.Counter(w["event"] for w in warnings).most_common(8)
    assert rig.published.mentioning(ids) == []
