"""Fuzz: arbitrary payloads on every topic smgw-link subscribes to (its link's inputs and the admin API's
view of the bus), through the real broker, into the running service (admin API on).

Asserted: every refused payload is counted and nothing logs an error; no task restarts and the admin API
still answers; refused payloads write no state file and change neither the admin view nor the CLS.EEDI
measurements; 1100 unknown EVSE and meter ids leave every structure bounded and the warnings few."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from admin_support import ADMIN_TOKEN, accounts_yaml, admin_yaml, api, listen_port
from hypothesis import given
from hypothesis import strategies as st

from chargegate.runtime import ServiceContext, start_context, stop_context
from conftest import BrokerHandle, make_config, wait_for
from fuzz_support import (
    BusFuzz,
    Logs,
    any_payload_round,
    find,
    fuzz,
    messages,
    refused_only,
    state_files,
    unknown_ids_round,
)
from smgw_link.admin.busview import BusView
from smgw_link.service import SmgwLink, serve

EVSES = ["wb1", "ghost", "Z9"]
TOPICS: dict[str, dict[str, list[str]]] = {
    "evse.status": {"evse_id": EVSES},
    "evse.setpoint": {"evse_id": EVSES},
    "evse.limit": {"evse_id": EVSES},
    "meter.reading": {"meter_id": ["grid-meter", "other-meter"]},
    "grid.limit": {"source": ["dso", "local"]},
    "tariff.current": {},
    "tariff.schedule": {},
    "link.smgw": {},
    "controller.allocation": {},
    "service.health": {"service": ["load-controller", "evse-poller", "history"]},
    "service.command": {"service": ["smgw-link"]},
}


@dataclass
class Rig:
    ctx: ServiceContext
    task: asyncio.Task[None]
    fuzz: BusFuzz
    logs: Logs
    admin_port: int

    async def alive(self) -> None:
        assert not self.task.done(), self.task
        assert dict(self.ctx.task_restarts) == {}
        status, body = await api(self.admin_port, "GET", "/v1/status", ADMIN_TOKEN)
        assert status == 200, body


@pytest.fixture(scope="module")
async def rig(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    tmp = tmp_path_factory.mktemp("smgw-fuzz-mqtt")
    port = listen_port()
    text = f"""
site: {{name: smgw-fuzz}}
{accounts_yaml(broker, "smgw-link")}
circuits:
  - id: grid
    fuse_a: 35
    meter: grid-meter
evses:
  - id: wb1
    circuit: grid
    modbus: {{profile: alfen-eve, host: 127.0.0.1, port: 1502}}
meters:
  - id: grid-meter
    modbus: {{profile: sdm630, host: 127.0.0.1, port: 1503}}
smgw:
  http_api: {{enabled: false}}
{admin_yaml(port)}
"""
    cfg = make_config(tmp, text)
    logs = Logs()
    with logs.capture():
        ctx = await start_context("smgw-link", cfg, tmp / "chargegate.yaml", connect_timeout=5)
        task = asyncio.create_task(serve(ctx))
        await wait_for(lambda: not task.done() and _admin_up(port), 10, what="the admin API")
        r = Rig(ctx, task, BusFuzz(broker, ctx), logs, port)
        try:
            yield r
            await r.alive()
        finally:
            r.fuzz.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await stop_context(ctx)


def _admin_up(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def view(rig: Rig) -> str:
    """What the service knows from other services' topics: the admin API's bus view (its own limits, link
    status and health left out: they change by themselves) and the CLS.EEDI measurements."""
    bv = find(rig.ctx, BusView)
    ms = find(rig.ctx, SmgwLink).measurements
    dump = {name: {k: v.model_dump(mode="json") for k, v in getattr(bv, name).items()}
            for name in ("evses", "setpoints", "evse_limits", "meters")}
    dump["other"] = [x.model_dump(mode="json") if x else None for x in (bv.tariff, bv.schedule, bv.allocation)]
    dump["health"] = {k: v.model_dump(mode="json", exclude={"ts", "uptime_s", "counters"})
                      for k, v in bv.health.items() if k != "smgw-link"}
    dump["measured"] = {k: v[1].model_dump(mode="json") for k, v in [*ms.meters.items(), *ms.evses.items()]}
    return json.dumps(dump, sort_keys=True)


@fuzz(50)
@given(batch=st.lists(messages(TOPICS), min_size=1, max_size=6))
async def test_any_payload_on_any_topic(rig: Rig, batch: list) -> None:
    await any_payload_round(rig.fuzz, rig.logs, rig.ctx, rig.task, batch)


@fuzz(20)
@given(batch=st.lists(messages(TOPICS), min_size=1, max_size=6))
async def test_refused_payloads_change_nothing(rig: Rig, batch: list) -> None:
    refused = refused_only(rig.fuzz, batch)
    files = state_files(rig.ctx.state_dir)
    before = view(rig)
    await rig.fuzz.send(refused)
    assert state_files(rig.ctx.state_dir) == files
    assert view(rig) == before


async def test_unknown_ids_stay_bounded_and_quiet(rig: Rig) -> None:
    ids = [f"fz{i}" for i in range(1100)]
    await unknown_ids_round(rig.fuzz, rig.logs, rig.ctx, ids, (
        ("evse.status", "evse_id"), ("meter.reading", "meter_id"), ("evse.setpoint", "evse_id"),
        ("evse.limit", "evse_id")), refused_on=("evse.status", "evse_id"))
    await rig.alive()
