"""Several evse-poller instances (``poller.instances``, each device's ``modbus.instance``): two pollers run
against a real Mosquitto with the generated ACL and real Modbus TCP simulators. Each polls only its own
devices, has its own health topic and broker account, and the broker refuses a write of one instance to
the other's EVSE or meter. Also: the configuration's checks, the generated ACL, ``chargegate run``
starting one process per instance, and the entry point refusing to start without its instance."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from chargegate import config as cfgmod
from chargegate import payloads as p
from chargegate.broker import LocalBroker, accounts, free_port, render_acl
from chargegate.bus import Message
from chargegate.runner import build
from chargegate.runtime import ServiceContext, start_context, stop_context
from conftest import connected_bus, wait_for
from evse_poller.service import serve
from evse_poller.sim import Simulators


def config_text(state: Path, broker_port: int, sim_port: int) -> str:
    return f"""
site: {{name: instances-test}}
state_dir: {state}
broker: {{port: {broker_port}}}
circuits: [{{id: grid, fuse_a: 63}}]
poller: {{instances: [north, south]}}
evses:
  - {{id: n1, circuit: grid, modbus: {{profile: alfen-eve, host: 127.0.0.1, port: {sim_port}, device_id: 1,
                                      instance: north}}}}
  - {{id: s1, circuit: grid, modbus: {{profile: alfen-eve, host: 127.0.0.1, port: {sim_port}, device_id: 2,
                                      instance: south}}}}
  - {{id: oc1, circuit: grid, ocpp: {{charge_box_id: CB1}}}}
meters:
  - {{id: s-meter, modbus: {{profile: sdm630, transport: tcp, host: 127.0.0.1, port: {sim_port}, device_id: 3,
                            instance: south}}}}
"""


class Site:
    def __init__(self, cfg: cfgmod.Config, path: Path, ctxs: dict[str, ServiceContext]) -> None:
        self.cfg = cfg
        self.path = path
        self.ctxs = ctxs
        self.status: dict[str, p.EvseStatus] = {}
        self.readings: dict[str, list[p.MeterReading]] = {}
        self.health: dict[str, p.Health] = {}


@pytest.fixture(scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    tmp = tmp_path_factory.mktemp("instances")
    path = tmp / "chargegate.yaml"
    path.write_text(config_text(tmp / "state", free_port(), free_port()))
    cfg = cfgmod.load(path)
    broker = LocalBroker.prepare(cfg, port=cfg.broker.port, persistence=False)
    broker.start()
    sims = Simulators(cfg)
    await sims.start()
    ctxs: dict[str, ServiceContext] = {}
    tasks: list[asyncio.Task[None]] = []
    obs = None
    try:
        for inst in cfg.poller.instances:
            ctx = await start_context(cfgmod.instance_service(inst), cfg, path, connect_timeout=5)
            ctxs[inst] = ctx
            tasks.append(asyncio.create_task(serve(ctx)))
        s = Site(cfg, path, ctxs)
        from conftest import BrokerHandle

        obs = await connected_bus(BrokerHandle(broker, cfg, path), "observer")

        def on_status(m: Message) -> None:
            s.status[m.params["evse_id"]] = m.payload  # type: ignore[assignment]

        def on_reading(m: Message) -> None:
            s.readings.setdefault(m.params["meter_id"], []).append(m.payload)  # type: ignore[arg-type]

        def on_health(m: Message) -> None:
            s.health[m.params["service"]] = m.payload  # type: ignore[assignment]

        obs.subscribe("evse.status", on_status)
        obs.subscribe("meter.reading", on_reading)
        obs.subscribe("service.health", on_health)
        await wait_for(lambda: all(e in s.status and s.status[e].online for e in ("n1", "s1")) and "s-meter" in
                       s.readings, 10, what="both instances' EVSEs online and the south meter read")
        yield s
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ctx in ctxs.values():
            await stop_context(ctx)
        if obs is not None:
            await obs.stop()
        await sims.stop()
        broker.discard()


async def test_each_instance_polls_its_own_devices_with_its_own_health(site: Site) -> None:
    for ctx in site.ctxs.values():
        ctx.publish_health()
    await wait_for(lambda: all("evses_polled" in getattr(site.health.get(f"evse-poller.{i}"), "counters", {})
                               for i in ("north", "south")), 5, what="health of both instances, polling")
    north, south = site.health["evse-poller.north"], site.health["evse-poller.south"]
    assert north.status == south.status == p.HealthStatus.ONLINE
    assert north.pid == south.pid  # in-process here; `chargegate run` starts separate processes (below)
    assert (north.counters["evses_polled"], north.counters["meters_polled"]) == (1, 0)
    assert (south.counters["evses_polled"], south.counters["meters_polled"]) == (1, 1)
    assert "oc1" not in site.status  # an OCPP EVSE is no poller's


async def test_setpoint_reaches_only_the_owning_instance(site: Site) -> None:
    from datetime import UTC, datetime, timedelta

    before = {i: ctx.counters["setpoints_received"] for i, ctx in site.ctxs.items()}
    ctl = await start_context("load-controller", site.cfg, site.path, connect_timeout=5)
    try:
        now = datetime.now(UTC)
        ctl.bus.publish("evse.setpoint", p.Setpoint(evse_id="s1", current_a=8.0, phases=3,
                                                     valid_until=now + timedelta(seconds=10), source="test", seq=1),
                        evse_id="s1")
        await wait_for(lambda: site.ctxs["south"].counters["setpoints_received"] > before["south"], 5,
                       what="the south instance took the setpoint of its EVSE")
        await wait_for(lambda: (site.status["s1"].applied is not None
                                and site.status["s1"].applied.current_a == 8.0), 5, what="s1 applied 8 A")
        assert site.ctxs["north"].counters["setpoints_received"] == before["north"]
    finally:
        await stop_context(ctl)


@pytest.mark.parametrize(("writer", "topic", "own"), [
    ("north", "evse.status", "n1"), ("south", "meter.reading", "s-meter")])
async def test_broker_refuses_writes_to_another_instances_devices(site: Site, writer: str, topic: str,
                                                                  own: str) -> None:
    """North writes a status for s1 (south's), south a reading for a meter it does not own... and each a
    fence message to its own device after it: the fence arrives, the cross-write never does."""
    bus = site.ctxs[writer].bus
    if topic == "evse.status":
        base: Any = site.status["n1"]
        probe = base.model_copy(update={"evse_id": "s1", "reason": "probe-cross-write"})
        fence = base.model_copy(update={"reason": "fence"})
        bus.publish("evse.status", probe, evse_id="s1")
        bus.publish("evse.status", fence, evse_id="n1")
        await wait_for(lambda: site.status["n1"].reason == "fence", 5, what="north's fence on its own EVSE")
        assert site.status["s1"].reason != "probe-cross-write"
        assert site.cfg.evse("s1").modbus.instance == "south"  # type: ignore[union-attr]
    else:
        reading: Any = site.readings["s-meter"][-1]
        foreign = reading.model_copy(update={"meter_id": "n-meter"})  # no such meter of south's
        n_before = len(site.readings.get("n-meter", []))
        bus.publish("meter.reading", foreign, meter_id="n-meter")
        fence_ts = reading.ts.replace(microsecond=(reading.ts.microsecond + 1) % 1_000_000)
        bus.publish("meter.reading", reading.model_copy(update={"ts": fence_ts}), meter_id=own)
        await wait_for(lambda: any(r.ts == fence_ts for r in site.readings["s-meter"]), 5,
                       what="south's fence on its own meter")
        assert len(site.readings.get("n-meter", [])) == n_before == 0


def test_acl_per_instance() -> None:
    acl = render_acl("site", poller_instances={"north": (["n1"], []), "south": (["s1"], ["m1"])})
    blocks = {b.splitlines()[0]: b.splitlines()[1:] for b in acl.split("\n\n") if b.startswith("user ")}
    north = blocks["user evse-poller.north"]
    assert "topic write site/evse/n1/status" in north and "topic write site/evse/n1/command/result" in north
    assert "topic write site/service/evse-poller.north/health" in north
    assert not [ln for ln in north if "s1" in ln or "m1" in ln or ("+" in ln.split()[-1] and "write" in ln)]
    assert "topic write site/meter/m1/reading" in blocks["user evse-poller.south"]
    plain = blocks["user evse-poller"]  # the single poller's account writes no device topics then
    assert [ln for ln in plain if ln.startswith("topic write")] == ["topic write site/service/evse-poller/health",
                                                                   "topic write site/service/evse-poller/log"]
    assert "topic write site/evse/+/status" in render_acl("site").split("user evse-poller\n")[1].split("\n\n")[0]


def test_accounts_and_runner(site: Site) -> None:
    assert {"evse-poller.north", "evse-poller.south"} <= set(accounts(site.cfg))
    sup = build(site.path)
    pollers = {p.name: p.argv for p in sup.procs if "evse_poller" in p.argv}
    assert set(pollers) == {"evse-poller.north", "evse-poller.south"}
    assert pollers["evse-poller.north"][-2:] == ["--instance", "north"]
    one = build(site.path, ["evse-poller.south"])
    assert [p.name for p in one.procs] == ["evse-poller.south"]


def test_entry_point_needs_a_known_instance(site: Site) -> None:
    for extra, says in (([], "start each instance with --instance"), (["--instance", "east"], "not one of")):
        r = subprocess.run([sys.executable, "-m", "evse_poller", "--config", str(site.path), *extra],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert says in r.stderr


@pytest.mark.parametrize(("edit", "error"), [
    (lambda t: t.replace("instance: north", "instance: east"), "unknown evse-poller instance 'east'"),
    (lambda t: t.replace(",\n                                      instance: north", ""), "name the instance"),
    (lambda t: t.replace("instances: [north, south]", "instances: [north, north]"), "given twice"),
    (lambda t: t.replace("poller: {instances: [north, south]}", "poller: {}"), "unknown evse-poller instance"),
])
def test_configuration_checks(tmp_path: Path, edit: Any, error: str) -> None:
    text = edit(config_text(tmp_path, 1883, 1502))
    with pytest.raises(cfgmod.ConfigError) as e:
        cfgmod.loads(text)
    assert error in str(e.value)


def test_one_poller_sees_everything_without_instances(tmp_path: Path) -> None:
    text = config_text(tmp_path, 1883, 1502).replace("poller: {instances: [north, south]}", "")
    text = re.sub(r",\s+instance: (north|south)", "", text)
    cfg = cfgmod.loads(text)
    assert cfg.for_poller(None) is cfg
    assert cfg.poller_devices(None) == (["n1", "s1"], ["s-meter"])
