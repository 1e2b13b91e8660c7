"""The load-controller service: bus in, pure ``step`` every cycle and on important changes, bus out.

Reads ``evse/+/status``, ``meter/+/reading``, ``grid/limit/+``, ``evse/+/limit``, ``tariff/current``,
``tariff/schedule``, ``link/smgw`` (and, once at start-up on a short-lived connection, its own
retained ``evse/+/setpoint``, to go on from the setpoints in force). Writes ``evse/<id>/setpoint``
(on change and before expiry) and ``controller/allocation`` (on change and every
``allocation_interval_s``).

A cycle runs every ``cycle_s`` and at once when something important changes: a grid limit, an EVSE
plugged or unplugged or going offline, an EVSE limit, the SMGW link, a tariff, a meter showing an
overdraw.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from json.encoder import encode_basestring as _json_str
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from chargegate import payloads as p
from chargegate.bus import Bus, Message
from chargegate.config import Config
from chargegate.ratelog import LogLimiter
from chargegate.reasons import reason_text
from chargegate.runtime import ServiceContext, run_service, tune_gc
from load_controller.controller import Decision, EvseDecision, Inputs, Memory, step, wants_power
from load_controller.solver import INF
from load_controller.topology import Topology

SERVICE = "load-controller"
FUTURE_TOLERANCE_S = 60.0  # a message stamped further ahead than this gets its arrival time
MAX_SEQ_AHEAD = 10**12  # a sequence number this far beyond our base (epoch ms at start) is not ours
UNCONFIGURED_KEPT = 1000  # devices not (yet) configured whose latest message is kept for a reload
DIRECT_CYCLE_MIN_S = 0.1  # a new grid limit runs a cycle at once, unless the last such cycle was this recent


@dataclass(slots=True)
class Published:
    current: float
    phases: int
    valid_until: datetime
    seq: int


class LoadController:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.bus = ctx.bus
        self.log = ctx.log
        self.counters = ctx.counters
        self.inputs = Inputs()
        self.memory = Memory()
        self.wake = asyncio.Event()
        self.wake_reasons: set[str] = set()
        self.published: dict[str, Published] = {}
        self.seq: dict[str, int] = {}
        self.seq_base = int(time.time()) * 1000  # keeps seq increasing over restarts without retained state
        # unknown ids and odd inputs: each key once while remembered (1024), at most three new ones per
        # message and minute, the rest summarised (chargegate.ratelog)
        self.logged_once = LogLimiter(self.log, interval_s=math.inf)
        self.error_log = LogLimiter(self.log)  # a failing cycle: once per error type and minute (cycle_errors counts)
        self.warnings: set[str] = set()
        self.started = False
        self.last_alloc_key: tuple[object, ...] | None = None
        self.last_alloc_at = 0.0
        self.last_decision: Decision | None = None
        self.limit_arrived: dict[str, float] = {}  # source -> perf_counter() when it arrived
        self.limit_logs: list[dict[str, Any]] = []  # "grid limit received" lines, written after the setpoints
        self.last_direct_cycle = -math.inf  # time.monotonic() of the last cycle run by a grid limit itself
        self.cycle_done = asyncio.Event()  # set after every cycle (tests)
        self.topics: dict[str, str] = {}
        self.tune = True  # GC tuning once running (off in tests that share the process)
        # the latest message of EVSEs and meters that are not configured: adopted when a reload adds them
        self.unconfigured_statuses: dict[str, p.EvseStatus] = {}
        self.unconfigured_readings: dict[str, p.MeterReading] = {}
        self.unconfigured_limits: dict[str, p.EvseLimit] = {}
        self.unconfigured_modes: dict[str, p.ChargingMode] = {}
        self.configure(ctx.config)

    # -- configuration -----------------------------------------------------------------------------------
    def configure(self, config: Config) -> None:
        old = getattr(self, "topo", None)
        self.config = config
        self.topo = Topology(config)
        self.circuit_names = {c.id: c.name for c in config.all_circuits() if c.name}
        try:
            self.tz = ZoneInfo(config.site.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            self.log.error("unknown time zone, using UTC for charging rules", timezone=config.site.timezone)
            self.tz = ZoneInfo("UTC")
        if old is not None and [n.id for n in old.nodes] != [n.id for n in self.topo.nodes]:
            # node-indexed memory (penalties, last known non-EV load) belongs to the old tree
            self.memory.penalties.clear()
            self.memory.non_ev.clear()
        if old is not None:
            self._adopt(old)
        self.trigger("config")

    def _adopt(self, old: Topology) -> None:
        """After a reload: EVSEs and meters that are new take the state the bus already told us about
        them; removed ones leave the inputs, and their retained setpoints are cleared."""
        inp = self.inputs
        for kind, known, held, live in (("evse", self.topo.evse_index, self.unconfigured_statuses, inp.statuses),
                                        ("evse", self.topo.evse_index, self.unconfigured_limits, inp.evse_limits),
                                        ("evse", self.topo.evse_index, self.unconfigured_modes, inp.modes),
                                        ("meter", self.topo.meters, self.unconfigured_readings, inp.readings)):
            for ident in [i for i in held if i in known]:
                live[ident] = held.pop(ident)  # type: ignore[index]
            for ident in [i for i in live if i not in known]:
                del live[ident]
            for ident in known:
                self.logged_once.forget(f"{kind}:{ident}")
        for evse_id in old.evse_index:
            if evse_id not in self.topo.evse_index:
                self.memory.evses.pop(evse_id, None)
                inp.setpoints.pop(evse_id, None)
                self.published.pop(evse_id, None)
                self.log.info("EVSE removed from the configuration: clearing its setpoint", evse_id=evse_id)
                self.bus.clear("evse.setpoint", evse_id=evse_id)

    def _hold(self, held: dict[str, Any], ident: str, payload: Any) -> None:
        """Keep the latest message of a device that is not configured (yet), bounded."""
        if ident in held or len(held) < UNCONFIGURED_KEPT:
            held[ident] = payload

    async def on_reload(self, config: Config) -> None:
        self.configure(config)
        self.log.info("load controller reconfigured", evses=len(self.topo.evses), nodes=len(self.topo.nodes),
                      floor_14a_w=round(self.topo.floor_w))

    # -- inputs ------------------------------------------------------------------------------------------
    def trigger(self, reason: str) -> None:
        self.wake_reasons.add(reason)
        self.wake.set()

    def _once(self, key: str, counter: str, msg: str, **kw: object) -> None:
        self.counters[counter] += 1
        self.logged_once.warning(key, msg, **kw)

    def _stamp(self, payload: p.Payload, topic: str) -> p.Payload:
        """A timestamp far in the future would keep a message fresh forever: use the arrival time."""
        now = p.utcnow()
        if (payload.ts - now).total_seconds() > FUTURE_TOLERANCE_S:
            self._once(f"future:{topic}", "future_timestamps", "message stamped in the future, using arrival time",
                       topic=topic, ts=payload.ts.isoformat())
            update: dict[str, object] = {"ts": now}
            if isinstance(payload, p.EvseStatus) and payload.measured_at is not None:
                update["measured_at"] = min(payload.measured_at, now)  # its measurement is no newer than that
            return payload.model_copy(update=update)
        return payload

    def on_status(self, msg: Message) -> None:
        st = msg.payload
        assert isinstance(st, p.EvseStatus)
        if st.evse_id not in self.topo.evse_index:
            self._once(f"evse:{st.evse_id}", "unknown_evse", "status of an EVSE that is not configured, ignored",
                       evse_id=st.evse_id, topic=msg.topic)
            self._hold(self.unconfigured_statuses, st.evse_id, self._stamp(st, msg.topic))
            return
        st = self._stamp(st, msg.topic)  # type: ignore[assignment]
        prev = self.inputs.statuses.get(st.evse_id)
        self.inputs.statuses[st.evse_id] = st
        if (prev is None or prev.online != st.online or wants_power(prev) != wants_power(st)
                or (prev.state in (p.EvseState.FAULTED, p.EvseState.UNAVAILABLE)) != (
                    st.state in (p.EvseState.FAULTED, p.EvseState.UNAVAILABLE))):
            self.trigger("evse")

    def on_reading(self, msg: Message) -> None:
        r = msg.payload
        assert isinstance(r, p.MeterReading)
        if r.meter_id not in self.topo.meters:
            self._once(f"meter:{r.meter_id}", "unknown_meter", "reading of a meter that is not configured, ignored",
                       meter_id=r.meter_id, topic=msg.topic)
            self._hold(self.unconfigured_readings, r.meter_id, self._stamp(r, msg.topic))
            return
        r = self._stamp(r, msg.topic)  # type: ignore[assignment]
        prev = self.inputs.readings.get(r.meter_id)
        self.inputs.readings[r.meter_id] = r
        if prev is None or prev.online != r.online:
            self.trigger("meter")
            return
        if r.current_a is not None:
            tol = self.config.controller.overdraw_tolerance_a
            for n, mid in self.topo.metered:
                if mid == r.meter_id:
                    lim = self.topo.nodes[n].limits
                    if any(lim[k] < INF and r.current_a[k] > lim[k] + tol for k in range(3)):
                        self.trigger("overdraw")

    def on_grid_limit(self, msg: Message) -> None:
        lim = msg.payload
        assert isinstance(lim, p.GridLimit)
        lim = self._stamp(lim, msg.topic)  # type: ignore[assignment]
        now = p.utcnow()
        if lim.valid_until <= now and not msg.retained:
            self.counters["limits_expired_on_arrival"] += 1
            self.log.warning("grid limit already expired on arrival", source=lim.source.value,
                             valid_until=lim.valid_until.isoformat(), active=lim.active)
        prev = self.inputs.grid_limits.get(lim.source.value)
        self.inputs.grid_limits[lim.source.value] = lim
        self.counters["grid_limits_received"] += 1
        if prev is None or prev.model_dump(exclude={"ts"}) != lim.model_dump(exclude={"ts"}) or not msg.retained:
            if self.started:
                self.limit_arrived[lim.source.value] = time.perf_counter()
            self.limit_logs.append(dict(source=lim.source.value, active=lim.active, power_w=lim.power_w,
                                        current_a=lim.current_a, scope=lim.scope.value if lim.scope else None,
                                        valid_until=lim.valid_until.isoformat()))
            self.trigger("grid_limit")
            mono = time.monotonic()
            if self.started and mono - self.last_direct_cycle >= DIRECT_CYCLE_MIN_S:
                # at once, in this handler: not after the control loop's wake-up (a task hand-over and turns of
                # the event loop); the loop then finds nothing left to do. At most one such cycle per
                # DIRECT_CYCLE_MIN_S: a burst of limits is left to the loop, which takes them in one cycle
                self.last_direct_cycle = mono
                self.cycle()
            self.write_limit_logs()  # (the cycle wrote them unless it failed)

    def write_limit_logs(self) -> None:
        logs, self.limit_logs = self.limit_logs, []
        for fields in logs:
            self.log.info("grid limit received", **fields)

    def on_evse_limit(self, msg: Message) -> None:
        lim = msg.payload
        assert isinstance(lim, p.EvseLimit)
        if lim.evse_id not in self.topo.evse_index:
            self._once(f"evse:{lim.evse_id}", "unknown_evse", "limit for an EVSE that is not configured, ignored",
                       evse_id=lim.evse_id, topic=msg.topic)
            self._hold(self.unconfigured_limits, lim.evse_id, self._stamp(lim, msg.topic))
            return
        lim = self._stamp(lim, msg.topic)  # type: ignore[assignment]
        if lim.valid_until <= p.utcnow() and not msg.retained:
            self.counters["limits_expired_on_arrival"] += 1
            self.log.warning("EVSE limit already expired on arrival", evse_id=lim.evse_id,
                             valid_until=lim.valid_until.isoformat())
        if lim.phases == 1 and not self.topo.evses[self.topo.evse_index[lim.evse_id]].switching:
            self._once(f"phases:{lim.evse_id}", "odd_inputs", "EVSE limit asks for 1 phase but the EVSE cannot "
                       "switch phases; the phase count is ignored", evse_id=lim.evse_id)
        self.inputs.evse_limits[lim.evse_id] = lim
        self.trigger("evse_limit")

    def on_tariff_current(self, msg: Message) -> None:
        assert isinstance(msg.payload, p.TariffCurrent)
        self.inputs.tariff_current = self._stamp(msg.payload, msg.topic)  # type: ignore[assignment]
        self.trigger("tariff")

    def on_tariff_schedule(self, msg: Message) -> None:
        assert isinstance(msg.payload, p.TariffSchedule)
        self.inputs.tariff_schedule = self._stamp(msg.payload, msg.topic)  # type: ignore[assignment]
        self.trigger("tariff")

    def on_link(self, msg: Message) -> None:
        link = msg.payload
        assert isinstance(link, p.SmgwLinkStatus)
        link = self._stamp(link, msg.topic)  # type: ignore[assignment]
        prev = self.inputs.link
        self.inputs.link = link
        if prev is None or prev.state != link.state:
            self.log.info("SMGW link state", state=link.state.value)
            self.trigger("link")

    def on_mode(self, msg: Message) -> None:
        """The charging mode of an EVSE (kept by the history service): chooses the rules that apply to it."""
        m = msg.payload
        assert isinstance(m, p.ChargingMode)
        if m.evse_id not in self.topo.evse_index:
            self._hold(self.unconfigured_modes, m.evse_id, m)  # kept (bounded) for a reload that adds it
            return
        prev = self.inputs.modes.get(m.evse_id)
        self.inputs.modes[m.evse_id] = m
        if prev is None or prev.mode != m.mode or prev.target != m.target or prev.max_current_a != m.max_current_a:
            self.log.info("charging mode", evse_id=m.evse_id, mode=m.mode.value,
                          target=m.target.model_dump() if m.target else None)
            self.trigger("mode")

    def on_health(self, msg: Message) -> None:
        """Health of the services that publish EVSE status only on events (OCPP): while one is alive, its
        statuses stay fresh; when it goes (last will), its EVSEs are unreachable at once."""
        h = msg.payload
        assert isinstance(h, p.Health)
        if h.service not in self.config.controller.event_driven_sources:
            return
        h = self._stamp(h, msg.topic)  # type: ignore[assignment]
        prev = self.inputs.services.get(h.service)
        self.inputs.services[h.service] = h
        if prev is None or (prev.status == p.HealthStatus.OFFLINE) != (h.status == p.HealthStatus.OFFLINE):
            self.trigger("publisher")

    def on_setpoint(self, msg: Message) -> None:
        """Our own retained setpoints: go on from them after a restart (sequence numbers, ramps)."""
        sp = msg.payload
        assert isinstance(sp, p.Setpoint)
        if sp.source != SERVICE:
            self._once(f"foreign-setpoint:{sp.evse_id}", "odd_inputs", "setpoint from another source seen",
                       evse_id=sp.evse_id, source=sp.source)
            return
        if sp.evse_id not in self.topo.evse_index:
            if msg.retained:
                self.log.info("clearing the retained setpoint of an EVSE no longer configured", evse_id=sp.evse_id)
                self.bus.clear("evse.setpoint", evse_id=sp.evse_id)
            return
        if sp.ts > datetime.now(UTC) + timedelta(seconds=2) or sp.seq > self.seq_base + MAX_SEQ_AHEAD:
            # not ours (someone with our account, or a clock far ahead): go on from our own numbers; the
            # EVSEs' drivers take our newer setpoints whatever its seq (chargegate.setpoints)
            self._once(f"implausible-setpoint:{sp.evse_id}", "odd_inputs", "setpoint with our source dated in the "
                       "future or with an implausible sequence number: not continued from", evse_id=sp.evse_id,
                       seq=sp.seq, ts=sp.ts.isoformat())
            return
        self.seq[sp.evse_id] = max(self.seq.get(sp.evse_id, 0), sp.seq)
        if not self.started:
            self.inputs.setpoints[sp.evse_id] = sp

    def on_connect(self) -> None:
        # a broker that lost its state: publish every setpoint again at once
        self.published.clear()
        self.last_alloc_key = None
        self.trigger("connect")

    def topic(self, evse_id: str) -> str:
        t = self.topics.get(evse_id)
        if t is None:
            t = self.topics[evse_id] = self.ctx.registry.topic("evse.setpoint", evse_id=evse_id)
        return t

    # -- the cycle ---------------------------------------------------------------------------------------
    def cycle(self) -> Decision | None:
        reasons = self.wake_reasons
        self.wake_reasons = set()
        now = p.utcnow()
        t0 = time.perf_counter()
        try:
            decision, memory = step(self.topo, self.config.controller, self.tz, self.inputs, self.memory, now)
        except Exception as e:  # never leave the loop: setpoints expire and the wallboxes fall back safely
            self.counters["cycle_errors"] += 1
            self.error_log.error(f"cycle:{type(e).__name__}", "control cycle failed; setpoints in force expire by "
                                 "themselves", subject="error types", error=repr(e), exc_info=e)
            return None
        solve_ms = (time.perf_counter() - t0) * 1000
        self.memory = memory
        self.started = True
        self.counters["cycles"] += 1
        if reasons - {"tick"}:
            self.counters["event_cycles"] += 1
        with self.bus.batch():  # one wake-up of the MQTT client's network thread for all of them
            changed = self.publish_setpoints(decision, now)
        done = time.perf_counter()
        # right behind the setpoints, serialised cheaply: measured best (deferring it made it collide
        # with the next burst, and CPU work while paho's thread writes holds the GIL its writes need)
        self.publish_allocation(decision, solve_ms)
        self.write_limit_logs()  # behind the setpoints: a log line is also a message on the bus (service.log)
        if "grid_limit" in reasons:
            for src, at in list(self.limit_arrived.items()):
                self.log.info("grid limit applied", source=src, latency_ms=round((done - at) * 1000, 2),
                              setpoints_changed=changed, solve_ms=round(solve_ms, 2))
            self.limit_arrived.clear()
        self.report_warnings(decision)
        self.last_decision = decision
        self.cycle_done.set()
        return decision

    def publish_setpoints(self, decision: Decision, now: datetime) -> int:
        validity = self.config.controller.setpoint_validity_s
        valid_until = now + timedelta(seconds=validity)
        refresh_before = now + timedelta(seconds=validity / 2)
        changed = 0
        ts = now.isoformat()
        until = valid_until.isoformat()
        # the logger is a lazy proxy that binds anew on every call, even for a filtered-out debug line:
        # resolve it once per cycle, not once per setpoint
        debug = self.log.debug
        published = self.published
        for d in publish_order(decision, published):
            last = published.get(d.evse_id)
            if last is not None and abs(last.current - d.current) < 1e-9 and last.phases == d.phases \
                    and last.valid_until > refresh_before:
                continue
            seq = max(self.seq.get(d.evse_id, 0), self.seq_base) + 1
            self.seq[d.evse_id] = seq
            self.bus.publish_raw(self.topic(d.evse_id), setpoint_json(d.evse_id, d.current, d.phases, until, seq,
                                                                      d.bound_by, ts), qos=1, retain=True)
            if last is None or abs(last.current - d.current) >= 1e-9 or last.phases != d.phases:
                changed += 1
                debug("setpoint", evse_id=d.evse_id, current_a=d.current, phases=d.phases, bound_by=d.bound_by)
            self.published[d.evse_id] = Published(d.current, d.phases, valid_until, seq)
            self.counters["setpoints_published"] += 1
        return changed

    def publish_allocation(self, decision: Decision, solve_ms: float) -> None:
        key = allocation_key(decision)
        mono = time.monotonic()
        if key == self.last_alloc_key and mono - self.last_alloc_at < self.config.controller.allocation_interval_s:
            return
        spec = self.ctx.registry.spec("controller.allocation")
        self.bus.publish_raw(self.ctx.registry.topic("controller.allocation"),
                             allocation_json(decision, solve_ms, p.utcnow().isoformat(), self.circuit_names, self.tz),
                             spec.qos, spec.retained)
        self.last_alloc_key = key
        self.last_alloc_at = mono
        self.counters["allocations_published"] += 1

    def report_warnings(self, decision: Decision) -> None:
        now_set = set(decision.warnings)
        for w in sorted(now_set - self.warnings):
            self.counters["warnings"] += 1
            self.log.warning("load controller: " + w)
        for w in sorted(self.warnings - now_set):
            self.log.info("load controller: no longer: " + w)
        self.warnings = now_set
        # health: degraded while the meters it needs are silent (it then assumes the worst). Unreachable
        # EVSEs are the device services' to report (their status says so); they are only counted here.
        stale = decision.limits.get("stale_meters") or []
        if time.monotonic() - self.ctx.started < self.config.controller.meter_timeout_s:
            stale = []  # start-up: the first readings may still be on their way (control assumes the worst anyway)
        status = p.HealthStatus.DEGRADED if stale else p.HealthStatus.ONLINE
        detail = ("meters silent, assuming the worst: " + ", ".join(str(m) for m in stale)) if stale else None
        if status != self.ctx.status or detail != self.ctx.detail:
            self.ctx.status, self.ctx.detail = status, detail
            if self.bus.connected.is_set():
                self.ctx.publish_health()

    # -- running -----------------------------------------------------------------------------------------
    def subscribe(self) -> None:
        b = self.bus
        b.subscribe("evse.status", self.on_status)
        b.subscribe("meter.reading", self.on_reading)
        b.subscribe("grid.limit", self.on_grid_limit)
        b.subscribe("evse.limit", self.on_evse_limit)
        b.subscribe("tariff.current", self.on_tariff_current)
        b.subscribe("tariff.schedule", self.on_tariff_schedule)
        b.subscribe("link.smgw", self.on_link)
        b.subscribe("service.health", self.on_health)
        b.subscribe("evse.mode", self.on_mode)
        b.on_connect(self.on_connect)

    async def recover_setpoints(self, settle_s: float) -> None:
        """Read our own retained setpoints once (sequence numbers, what is in force) on a short-lived
        connection, so that the setpoints we publish later are not echoed back to us."""
        tmp = Bus(SERVICE, self.ctx.registry, self.bus.settings)
        tmp.subscribe("evse.setpoint", self.on_setpoint)
        try:
            await tmp.start(wait=5)
            await asyncio.sleep(settle_s)
        except TimeoutError:
            self.log.warning("could not read the setpoints in force at start-up; starting from scratch")
        finally:
            await tmp.stop()

    async def run(self, settle_s: float = 0.3, tune: bool = True) -> None:
        self.tune = tune
        self.subscribe()
        self.ctx.on_reload(self.on_reload)
        await self.bus.connected.wait()
        # let retained state arrive before the first decision
        await asyncio.gather(self.recover_setpoints(settle_s), asyncio.sleep(settle_s))
        self.log.info("load controller running", evses=len(self.topo.evses), nodes=len(self.topo.nodes),
                      cycle_s=self.config.controller.cycle_s, floor_14a_w=round(self.topo.floor_w))
        for key in self.config.controller.ignored_settings:
            self.log.warning("setting ignored: smgw-link decides the link-loss failsafe (smgw.on_link_loss, "
                             "smgw.link_loss_grace_s) and the controller follows what it publishes",
                             setting=f"controller.{key}")
        if self.tune:
            tune_gc()
        await self.ctx.tasks.supervised("control-loop", self._loop)

    async def _loop(self) -> None:
        """A cycle every ``cycle_s`` and whenever something woke it (supervised: a failing cycle is logged,
        counted in the health's ``task_restarts`` and the loop goes on after a short backoff; setpoints
        expire meanwhile, so the wallboxes fall back to their safe current if it keeps failing)."""
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        while True:
            timeout = next_tick - loop.time()
            if timeout > 0 and not self.wake.is_set():
                try:
                    await asyncio.wait_for(self.wake.wait(), timeout)
                except TimeoutError:
                    pass
            self.wake.clear()
            if not self.wake_reasons and loop.time() < next_tick:
                continue  # what woke it was already handled (a grid limit's own cycle)
            if loop.time() >= next_tick:
                self.wake_reasons.add("tick")
                next_tick += self.config.controller.cycle_s
                if next_tick <= loop.time():
                    next_tick = loop.time() + self.config.controller.cycle_s
            self.cycle()
            await asyncio.sleep(0)  # let the bus deliver what arrived meanwhile


async def serve(ctx: ServiceContext) -> None:
    await LoadController(ctx).run()


def publish_order(decision: Decision, published: dict[str, Published]) -> list[EvseDecision]:
    """Decreases before increases: a wallbox told to give current back hears it first (safety rule 4)."""
    cuts = [d for d in decision.evses
            if (lp := published.get(d.evse_id)) is not None and d.current < lp.current - 1e-9]
    if not cuts:
        return decision.evses
    cut_ids = {d.evse_id for d in cuts}
    return cuts + [d for d in decision.evses if d.evse_id not in cut_ids]


def allocation_key(decision: Decision) -> tuple[object, ...]:
    """What makes an allocation new: it is republished whenever a grant, a binding constraint or its
    reason changes, or the limits in force do (a failsafe replacing an operator limit with the same
    grants and label), else every ``allocation_interval_s``."""
    lim = decision.limits
    return (tuple((d.evse_id, d.current, d.phases, d.bound_by, d.detail, d.mode) for d in decision.evses),
            json.dumps([lim.get("grid_limits"), lim.get("failsafe"), lim.get("stale_meters"), lim.get("penalties")],
                       sort_keys=True, default=str))


def allocation_json(decision: Decision, solve_ms: float, ts: str, names: dict[str, str] | None = None,
                    tz: tzinfo | None = None) -> bytes:
    """The ``Allocation`` payload, serialised directly (the tests check it validates). ``reason_text``: the
    code and detail in a sentence (:mod:`chargegate.reasons`); ``names``: circuit id -> name for it."""
    return json.dumps({
        "v": p.SCHEMA_VERSION, "ts": ts, "cycle": decision.cycle, "solve_ms": round(solve_ms, 3),
        "limits": decision.limits,
        "evses": [{"evse_id": d.evse_id, "current_a": d.current, "phases": d.phases, "wanted": d.wanted,
                   "bound_by": d.bound_by, "detail": d.detail,
                   "reason_text": reason_text(d.bound_by, d.detail, names, tz), "mode": d.mode}
                  for d in decision.evses],
    }, separators=(",", ":"), ensure_ascii=False, default=str).encode()


_SOURCE_JSON = json.dumps(SERVICE)
_VERSION_JSON = json.dumps(p.SCHEMA_VERSION)


def setpoint_json(evse_id: str, current: float, phases: int, valid_until: str, seq: int, reason: str,
                  ts: str) -> bytes:
    """A ``Setpoint`` payload, serialised directly (a cycle may publish hundreds at once; the tests check
    that it validates as :class:`chargegate.payloads.Setpoint`). The same bytes as ``json.dumps`` with
    ``separators=(",", ":"), ensure_ascii=False`` (strings escaped by json's own encoder, numbers as
    their repr), in a third of the time."""
    return (f'{{"v":{_VERSION_JSON},"ts":{_json_str(ts)},"evse_id":{_json_str(evse_id)},"current_a":{current!r},'
            f'"phases":{phases!r},"valid_until":{_json_str(valid_until)},"source":{_SOURCE_JSON},"seq":{seq!r},'
            f'"reason":{_json_str(reason)}}}').encode()


def main() -> None:
    run_service(SERVICE, serve)
