"""The running load-controller service against the real Mosquitto (project ACL, own accounts):
statuses, readings and grid limits go in over MQTT; setpoints and the allocation come out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from chargegate import payloads as p
from chargegate.bus import Bus, Message
from chargegate.runtime import ServiceContext, start_context, stop_context
from conftest import BrokerHandle, connected_bus, make_config, wait_for
from load_controller.service import LoadController

CONFIG = """
site: {name: lc-service-test}
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
  cycle_s: 1
  ramp_step_a: 50
  reclaim: false
  setpoint_validity_s: 10
"""


@dataclass
class Env:
    ctl: LoadController
    poller: Bus
    smgw: Bus
    observer: Bus
    task: asyncio.Task[None] | None = None
    ctx: ServiceContext | None = None
    states: dict[str, dict[str, object]] = field(default_factory=dict)
    meter: list[float] | None = None
    setpoints: dict[str, list[p.Setpoint]] = field(default_factory=dict)
    allocations: list[p.Allocation] = field(default_factory=list)

    def last(self, evse_id: str) -> p.Setpoint | None:
        got = self.setpoints.get(evse_id)
        return got[-1] if got else None

    def status(self, evse_id: str, iec: str = "C", state: str = "charging", **kw: object) -> None:
        self.states[evse_id] = {"iec_state": iec, "state": state, **kw}
        self.publish_status(evse_id)

    def publish_status(self, evse_id: str) -> None:
        st = p.EvseStatus(evse_id=evse_id, online=True, **self.states[evse_id])  # type: ignore[arg-type]
        self.poller.publish("evse.status", st, evse_id=evse_id)

    async def poll(self) -> None:
        """Like a poller: every EVSE's status and the meter reading again every second."""
        while True:
            await asyncio.sleep(1.0)
            for evse_id in self.states:
                self.publish_status(evse_id)
            if self.meter is not None:
                self.reading(self.meter)

    def reading(self, current: list[float]) -> None:
        self.meter = current
        self.poller.publish("meter.reading", p.MeterReading(meter_id="grid-meter", current_a=current),
                            meter_id="grid-meter")

    def limit(self, source: str, **kw: object) -> None:
        kw.setdefault("valid_until", p.utcnow() + timedelta(minutes=10))
        self.smgw.publish("grid.limit", p.GridLimit(source=source, **kw), source=source)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
async def env(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    tmp: Path = tmp_path_factory.mktemp("lc")
    cfg = make_config(tmp, CONFIG, broker_port=broker.port)
    cfg.state_dir = broker.config.state_dir  # the broker's generated account passwords
    # the broker's ACL is generated for the default root; use its root
    cfg.site.topic_root = broker.config.site.topic_root
    poller = await connected_bus(broker, "evse-poller")
    smgw = await connected_bus(broker, "smgw-link")
    observer = await connected_bus(broker, "observer")
    # start clean: no retained state from other test modules for our EVSEs and limits
    for eid in ("wb1", "wb2"):
        poller.clear("evse.status", evse_id=eid)
    for src in ("dso", "supplier", "local", "failsafe"):
        smgw.clear("grid.limit", source=src)
    smgw.clear("link.smgw")
    await asyncio.sleep(0.2)
    ctx = await start_context("load-controller", cfg, None, connect_timeout=5)
    for eid in ("wb1", "wb2", "ghost"):
        ctx.bus.clear("evse.setpoint", evse_id=eid)
    ctl = LoadController(ctx)
    e = Env(ctl, poller, smgw, observer)

    def on_sp(m: Message) -> None:
        assert isinstance(m.payload, p.Setpoint)
        e.setpoints.setdefault(m.payload.evse_id, []).append(m.payload)

    def on_alloc(m: Message) -> None:
        assert isinstance(m.payload, p.Allocation)
        e.allocations.append(m.payload)

    observer.subscribe("evse.setpoint", on_sp)
    observer.subscribe("controller.allocation", on_alloc)
    await asyncio.sleep(0.2)
    e.ctx = ctx
    e.task = asyncio.create_task(ctl.run(settle_s=0.1, tune=False))
    polling = asyncio.create_task(e.poll())
    try:
        yield e
    finally:
        polling.cancel()
        if e.task is not None:
            e.task.cancel()
        for b in (poller, smgw, observer):
            await b.stop()
        if e.ctx is not None:
            await stop_context(e.ctx)


async def test_statuses_and_reading_give_setpoints(env: Env) -> None:
    env.reading([2.0, 2.0, 2.0])
    env.status("wb1")
    env.status("wb2")
    await wait_for(lambda: (s := env.last("wb1")) is not None and s.current_a == 16
                   and (t := env.last("wb2")) is not None and t.current_a == 16, timeout=5)
    assert env.ctl.ctx.status == p.HealthStatus.ONLINE, env.ctl.ctx.detail
    sp1, sp2 = env.last("wb1"), env.last("wb2")
    assert sp1 is not None and sp2 is not None
    assert sp1.phases == 3 and sp2.phases == 1
    assert sp1.source == "load-controller" and sp1.reason == "evse_max"
    assert 8 <= (sp1.valid_until - sp1.ts).total_seconds() <= 10.5
    seqs = [s.seq for s in env.setpoints["wb1"]]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    await wait_for(lambda: any({a.evse_id: a.current_a for a in al.evses} == {"wb1": 16, "wb2": 16}
                               for al in env.allocations))


async def test_dso_limit_is_applied_at_once_with_the_14a_floor(env: Env) -> None:
    before = len(env.setpoints.get("wb1", []))
    t0 = asyncio.get_running_loop().time()
    env.limit("dso", active=True, power_w=2000)
    # two controllable EVSEs: floor 7560 W = 32.87 A over 3 + 1 phase-conductors -> 8.2 A each
    await wait_for(lambda: (s := env.last("wb1")) is not None and s.current_a == 8.2
                   and (t := env.last("wb2")) is not None and t.current_a == 8.2, timeout=3, interval=0.002)
    elapsed = asyncio.get_running_loop().time() - t0
    assert elapsed < 0.5, elapsed  # an event cycle, not the next tick
    assert len(env.setpoints["wb1"]) > before
    assert env.last("wb1").reason == "§14a_floor"  # type: ignore[union-attr]
    await wait_for(lambda: any(
        {a.evse_id: (a.current_a, a.bound_by) for a in al.evses} == {"wb1": (8.2, "§14a_floor"),
                                                                     "wb2": (8.2, "§14a_floor")}
        and al.limits["grid_limits"][0]["raised_to_floor"] for al in env.allocations))


async def test_allocation_is_republished_when_only_the_reason_changes(env: Env) -> None:
    """The supplier's limit replaces the operator's, both raised to the same §14a floor: the grants and
    the binding label stay equal, the reason and the limits in force change. The allocation says so at
    once, not at its next periodic republish (allocation_interval_s, 10 s)."""
    await wait_for(lambda: any(a.bound_by == "§14a_floor" for al in env.allocations[-1:] for a in al.evses))
    n = len(env.allocations)
    t0 = asyncio.get_running_loop().time()
    env.limit("supplier", active=True, power_w=1500)
    env.limit("dso", active=False)
    await wait_for(lambda: any("supplier" in (a.detail or "") for al in env.allocations[n:] for a in al.evses)
                   and not any(g.get("active") is True and g.get("source") == "dso" and not g.get("expired")
                               for g in env.allocations[-1].limits["grid_limits"]
                               if g.get("raised_to_floor") is not None), timeout=3)
    assert asyncio.get_running_loop().time() - t0 < 3
    assert {a.evse_id: a.current_a for a in env.allocations[-1].evses} == {"wb1": 8.2, "wb2": 8.2}
    env.limit("supplier", active=False)
    env.limit("dso", active=True, power_w=2000)


async def test_a_higher_limit_and_its_end(env: Env) -> None:
    env.limit("dso", active=True, power_w=9200)  # 40 A over 4 conductors = 10 A each
    await wait_for(lambda: (s := env.last("wb1")) is not None and s.current_a == 10.0
                   and s.reason == "grid_limit:dso")
    env.limit("dso", active=False)  # the operator ends it: no failsafe
    await wait_for(lambda: (s := env.last("wb1")) is not None and s.current_a == 16)
    assert env.ctl.last_decision is not None and env.ctl.last_decision.limits["failsafe"] is None


async def test_unplug_is_immediate(env: Env) -> None:
    t0 = asyncio.get_running_loop().time()
    env.status("wb2", iec="A", state="available")
    await wait_for(lambda: (s := env.last("wb2")) is not None and s.current_a == 0, timeout=3, interval=0.002)
    assert asyncio.get_running_loop().time() - t0 < 0.5
    assert env.last("wb2").reason == "not_connected"  # type: ignore[union-attr]
    env.status("wb2")
    await wait_for(lambda: (s := env.last("wb2")) is not None and s.current_a == 16)


async def test_odd_inputs_are_counted_and_survived(env: Env) -> None:
    counters = env.ctl.counters
    unknown0 = counters["unknown_evse"]
    expired0 = counters["limits_expired_on_arrival"]
    future0 = counters["future_timestamps"]
    # a status of an EVSE that is not configured (valid payload, unknown id)
    env.poller.publish("evse.status", p.EvseStatus(evse_id="ghost", online=True, state="charging"), evse_id="ghost")
    # a limit that ended before it arrived, and an extreme but valid one
    env.limit("local", active=True, power_w=1000, valid_until=p.utcnow() - timedelta(hours=1))
    env.limit("supplier", active=True, power_w=10_000_000, current_a=[1000, 1000, 1000])
    # a reading stamped far in the future
    env.poller.publish("meter.reading", p.MeterReading(meter_id="grid-meter", current_a=[2, 2, 2],
                                                       ts=p.utcnow() + timedelta(days=365)), meter_id="grid-meter")
    # a limit for an EVSE that is not configured (written by the OCPP gateway's account)
    gw = await connected_bus_for(env, "ocpp-gateway")
    gw.publish("evse.limit", p.EvseLimit(evse_id="ghost", current_a=6, valid_until=p.utcnow() + timedelta(minutes=1)),
               evse_id="ghost")
    await wait_for(lambda: counters["unknown_evse"] >= unknown0 + 2 and counters["limits_expired_on_arrival"] > expired0
                   and counters["future_timestamps"] > future0)
    assert "ghost" not in env.ctl.inputs.statuses
    # still deciding: the huge supplier limit binds nothing, the past one nothing either
    cycles = counters["cycles"]
    await wait_for(lambda: counters["cycles"] > cycles + 1)
    assert env.last("wb1").current_a == 16  # type: ignore[union-attr]
    assert counters["cycle_errors"] == 0
    assert env.ctl.inputs.readings["grid-meter"].ts < p.utcnow() + timedelta(seconds=5)
    # a status stamped in the future (its clock ahead), its measurement too: both taken as of arrival, so the
    # measurement ages from now on
    ahead = p.utcnow() + timedelta(days=365)
    st = env.ctl._stamp(p.EvseStatus(evse_id="wb2", online=True, state="charging", current_a=[6, 6, 6],
                                     measured_at=ahead, ts=ahead), "chargegate/evse/wb2/status")
    assert isinstance(st, p.EvseStatus) and st.measured_at is not None
    assert st.measured_at <= st.ts < p.utcnow() + timedelta(seconds=5)
    await gw.stop()
    env.smgw.clear("grid.limit", source="local")
    env.smgw.clear("grid.limit", source="supplier")


async def connected_bus_for(env: Env, account: str) -> Bus:
    from chargegate.broker import bus_settings

    bus = Bus(account, env.ctl.ctx.registry, bus_settings(env.ctl.config, account))
    await bus.start(wait=5)
    return bus


async def test_setpoints_are_refreshed_before_they_expire(env: Env) -> None:
    first = env.last("wb1")
    assert first is not None
    # nothing changes; within half the validity a fresh setpoint with a later valid_until arrives
    await wait_for(lambda: (s := env.last("wb1")) is not None and s.valid_until > first.valid_until, timeout=8)
    s = env.last("wb1")
    assert s is not None and s.current_a == first.current_a and s.seq > first.seq


async def test_reload_applies_the_new_configuration(env: Env) -> None:
    cfg = env.ctl.config.model_copy(deep=True)
    cfg.evses[0].max_current_a = 10
    await env.ctl.on_reload(cfg)
    await wait_for(lambda: (s := env.last("wb1")) is not None and s.current_a == 10 and s.reason == "evse_max")
    await env.ctl.on_reload(env.ctl.config.model_copy(update={"evses": [
        e.model_copy(update={"max_current_a": 16}) for e in env.ctl.config.evses]}))
    await wait_for(lambda: (s := env.last("wb1")) is not None and s.current_a == 16)


async def test_smgw_link_owns_the_link_loss_failsafe_and_the_controller_follows_it(env: Env) -> None:
    """One owner: smgw-link decides the link-loss failsafe (its grace, its duration) and publishes it as
    the operator's limit (id failsafe); the controller applies it and ends it when smgw-link does. A
    `down` link status, republished every few seconds during a long outage, never starts or restarts a
    failsafe of the controller's own (it used to, with its own grace, so the failsafe never ended)."""
    env.limit("dso", active=False)
    env.smgw.publish("link.smgw", p.SmgwLinkStatus(state=p.LinkState.UP))
    await wait_for(lambda: (s := env.last("wb1")) is not None and s.current_a == 16)
    lost = p.utcnow() - timedelta(seconds=300)  # lost long ago: past any grace
    env.smgw.publish("link.smgw", p.SmgwLinkStatus(state=p.LinkState.DOWN, since=lost))
    await asyncio.sleep(0.3)
    assert env.last("wb1").current_a == 16  # type: ignore[union-attr]  # link/smgw alone: no failsafe
    # smgw-link enters its failsafe: 4.2 kW, raised to the floor for two controllable EVSEs (7.56 kW): 8.2 A each
    env.limit("dso", active=True, power_w=4200, id="failsafe", scope=p.LimitScope.CONTROLLABLE,
              reason="failsafe: operator link lost")
    await wait_for(lambda: (s := env.last("wb1")) is not None and s.current_a == 8.2, timeout=3)
    assert env.ctl.last_decision is not None and env.ctl.last_decision.limits["failsafe"] is None
    applied = env.ctl.last_decision.limits["grid_limits"]
    assert any(g.get("source") == "dso" and g.get("raised_to_floor") for g in applied), applied
    for _ in range(3):  # the outage goes on: smgw-link republishes `down`
        env.smgw.publish("link.smgw", p.SmgwLinkStatus(state=p.LinkState.DOWN, since=lost))
    # smgw-link ends its failsafe (its duration is over): the controller follows at once
    env.limit("dso", active=False, reason="no operator limit")
    await wait_for(lambda: (s := env.last("wb1")) is not None and s.current_a == 16, timeout=3)
    env.smgw.publish("link.smgw", p.SmgwLinkStatus(state=p.LinkState.DOWN, since=lost))
    await asyncio.sleep(0.3)
    assert env.last("wb1").current_a == 16  # type: ignore[union-attr]
    assert env.ctl.last_decision is not None and env.ctl.last_decision.limits["failsafe"] is None
    env.smgw.publish("link.smgw", p.SmgwLinkStatus(state=p.LinkState.UP))


async def test_restart_goes_on_from_the_retained_state(env: Env, broker: BrokerHandle) -> None:
    # a DSO limit in force, then the controller is restarted
    env.limit("dso", active=True, power_w=9200)
    await wait_for(lambda: (s := env.last("wb1")) is not None and s.current_a == 10.0)
    last_seq = env.last("wb1").seq  # type: ignore[union-attr]
    assert env.task is not None and env.ctx is not None
    env.task.cancel()
    await stop_context(env.ctx)
    env.ctx = None
    cfg = env.ctl.config
    ctx = await start_context("load-controller", cfg, None, connect_timeout=5)
    env.ctx = ctx
    ctl = LoadController(ctx)
    env.ctl = ctl
    env.task = asyncio.create_task(ctl.run(settle_s=0.3, tune=False))
    # statuses, the reading and the limit come back as retained messages
    await wait_for(lambda: ctl.started and "dso" in ctl.inputs.grid_limits and len(ctl.inputs.statuses) == 2)
    await wait_for(lambda: (s := env.last("wb1")) is not None and s.seq > last_seq)
    s = env.last("wb1")
    assert s is not None and s.current_a == 10.0 and s.reason == "grid_limit:dso"
    assert ctl.seq["wb1"] > last_seq
    env.limit("dso", active=False)


async def test_a_silent_grid_meter_degrades_health_and_falls_back(env: Env) -> None:
    env.ctl.ctx.started -= 60  # past the start-up grace
    meter, env.meter = env.meter, None  # the meter goes silent
    try:
        await wait_for(lambda: env.ctl.ctx.status == p.HealthStatus.DEGRADED, timeout=15)
        assert "grid-meter" in (env.ctl.ctx.detail or "")
        await wait_for(lambda: (s := env.last("wb1")) is not None and s.current_a == 0 and s.reason == "stale_meter")
    finally:
        env.meter = meter
    env.reading(meter or [2.0, 2.0, 2.0])
    await wait_for(lambda: env.ctl.ctx.status == p.HealthStatus.ONLINE, timeout=5)


async def test_event_driven_ocpp_status_stays_fresh_while_the_gateway_lives(env: Env) -> None:
    gw = await connected_bus_for(env, "ocpp-gateway")
    env.states.pop("wb2", None)  # the fake poller no longer refreshes wb2: the OCPP gateway speaks for it
    gw.publish("service.health", p.Health(service="ocpp-gateway", status=p.HealthStatus.ONLINE),
               service="ocpp-gateway")
    gw.publish("evse.status", p.EvseStatus(evse_id="wb2", online=True, state=p.EvseState.CHARGING,
                                           source="ocpp-gateway", ts=p.utcnow() - timedelta(seconds=60)),
               evse_id="wb2")

    def wb2() -> tuple[str, bool] | None:
        d = env.ctl.last_decision
        x = next((e for e in d.evses if e.evse_id == "wb2"), None) if d else None
        return (x.bound_by, x.online) if x else None

    # a minute old, yet fresh: its publisher is alive
    await wait_for(lambda: (w := wb2()) is not None and w[1] and w[0] != "evse_offline")
    gw.publish("service.health", p.Health(service="ocpp-gateway", status=p.HealthStatus.OFFLINE),
               service="ocpp-gateway")
    await wait_for(lambda: (w := wb2()) is not None and w[0] == "evse_offline" and not w[1], timeout=3)
    await gw.stop()
    env.status("wb2")


async def test_a_grid_limit_runs_its_cycle_in_its_own_handler(env: Env) -> None:
    """A new grid limit is acted on inside the bus handler that took it (no wake-up of the control loop
    first), the loop then finds nothing to do (no cycle without a reason), and a second limit within
    DIRECT_CYCLE_MIN_S is left to the loop - and applied all the same."""
    from load_controller.service import DIRECT_CYCLE_MIN_S

    ctl = env.ctl
    await wait_for(lambda: ctl.started)
    calls: list[set[str]] = []
    real = ctl.cycle

    def recording() -> Any:
        calls.append(set(ctl.wake_reasons))
        return real()

    ctl.cycle = recording  # type: ignore[method-assign]
    try:
        await asyncio.sleep(DIRECT_CYCLE_MIN_S)
        spec = ctl.ctx.registry.spec("grid.limit")
        topic = ctl.ctx.registry.topic("grid.limit", source="local")

        def limit(w: int) -> Message:
            lim = p.GridLimit(source=p.LimitSource.LOCAL, active=True, power_w=w,
                              valid_until=p.utcnow() + timedelta(minutes=10))
            return Message(topic, spec, {"source": "local"}, lim, False)

        before = len(calls)
        ctl.on_grid_limit(limit(50_000))
        assert len(calls) == before + 1 and "grid_limit" in calls[-1]  # in the handler itself
        assert not ctl.wake_reasons
        ctl.on_grid_limit(limit(40_000))  # too soon for another cycle of its own: the loop's
        assert len(calls) == before + 1 and ctl.wake_reasons == {"grid_limit"}
        await wait_for(lambda: not ctl.wake_reasons, timeout=2)
        assert ctl.last_decision is not None
        assert any(g.get("power_w") == 40_000 for g in ctl.last_decision.limits["grid_limits"])
        await asyncio.sleep(0.2)
        assert all(reasons for reasons in calls[before:]), calls[before:]  # no cycle woken for nothing
    finally:
        ctl.cycle = real  # type: ignore[method-assign]
        env.smgw.clear("grid.limit", source="local")
        ctl.inputs.grid_limits.pop("local", None)
        ctl.trigger("test")
