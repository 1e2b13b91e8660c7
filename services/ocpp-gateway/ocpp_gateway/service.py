"""The ocpp-gateway service: local central system, upstream charge points, durable queue."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from chargegate import payloads as p
from chargegate.bus import Message
from chargegate.config import Config, Evse
from chargegate.runtime import ServiceContext, run_service, tune_gc
from ocpp_gateway.local import Box, Connector, LocalCsms
from ocpp_gateway.modbus import ModbusEvse
from ocpp_gateway.rpc import Version, warm_up
from ocpp_gateway.txqueue import TxQueue
from ocpp_gateway.upstream import UpstreamCP, upstream_target

NAME = "ocpp-gateway"


class Gateway:
    """Everything the service runs for one configuration."""

    def __init__(self, ctx: ServiceContext, config: Config, watch: Subscriptions | None = None) -> None:
        self.ctx = ctx
        self.config = config
        self.watch = watch  # subscribes an EVSE's topics (see Subscriptions)
        qpath = config.ocpp.queue.path or (config.state_dir / "ocpp-queue.sqlite")
        self.queue = TxQueue(qpath, max_messages=config.ocpp.queue.max_messages)
        self.local: LocalCsms | None = None
        self.modbus: dict[str, ModbusEvse] = {}
        self.upstreams: dict[str, UpstreamCP] = {}
        self.up_tasks: dict[str, asyncio.Task[Any]] = {}
        self._tasks: list[asyncio.Task[Any]] = []

    def _connect_upstream(self, evse: Evse) -> None:
        """The EVSE's charge point at the backend (when it has one), bound to its driver."""
        cfg, ctx = self.config, self.ctx
        try:
            target = upstream_target(cfg, evse)
        except ValueError as e:
            ctx.log.error("EVSE not connected to the backend", evse_id=evse.id, error=str(e))
            ctx.counters["upstream_misconfigured"] += 1
            return
        if target is None:
            return
        driver: Any = self.modbus.get(evse.id) or (self.local.connectors.get(evse.id) if self.local else None)
        if driver is None:
            return
        up = UpstreamCP(evse=evse, target=target, queue=self.queue, driver=driver, config=cfg,
                        counters=ctx.counters, publish_limit=self._publish_limit, tasks=ctx.tasks)
        self.upstreams[evse.id] = up
        driver.up = up
        if isinstance(driver, ModbusEvse):
            driver.attach(up)

    def _run_upstream(self, evse_id: str) -> None:
        up = self.upstreams.get(evse_id)
        if up is not None:
            self.up_tasks[evse_id] = self.ctx.tasks.spawn(f"upstream:{evse_id}", up.run, evse_id=evse_id,
                                                          charge_box_id=up.cbid)

    async def start(self) -> None:
        cfg, ctx = self.config, self.ctx
        if any(e.ocpp for e in cfg.evses):
            self.local = LocalCsms(cfg, ctx.bus, self.queue, ctx.counters, ctx.tasks)
        for evse in cfg.evses:
            if evse.modbus is not None:
                self.modbus[evse.id] = ModbusEvse(evse, cfg, ctx.bus, ctx.counters, ctx.tasks)
                if self.watch is not None:
                    self.watch(evse.id)
            elif evse.ocpp is not None and self.watch is not None:
                self.watch.setpoints(evse.id)
            self._connect_upstream(evse)
        versions: set[Version] = {up.version for up in self.upstreams.values()}
        if self.local is not None:
            for box in self.local.boxes.values():
                versions |= {box.version} if box.version else {"1.6", "2.0.1"}
        warm_up(versions)  # before the first wallbox: its first messages are not the ones that wait
        if self.local is not None and cfg.ocpp.local.enabled:
            await self.local.start()
        for evse_id in self.upstreams:
            self._run_upstream(evse_id)
        self._tasks.append(ctx.tasks.spawn("housekeeping", self._housekeeping))
        ctx.log.info("ocpp gateway running", ocpp_evses=len(self.local.connectors) if self.local else 0,
                     modbus_evses=len(self.modbus), upstream=len(self.upstreams), queued=self.queue.count())

    def _publish_limit(self, lim: p.EvseLimit) -> None:
        self.ctx.bus.publish("evse.limit", lim, evse_id=lim.evse_id)

    def on_status(self, msg: Message) -> None:
        st = msg.payload
        assert isinstance(st, p.EvseStatus)
        m = self.modbus.get(st.evse_id)
        if m is not None:
            m.on_status(st)

    def on_result(self, msg: Message) -> None:
        res = msg.payload
        assert isinstance(res, p.EvseCommandResult)
        m = self.modbus.get(res.evse_id)
        if m is not None:
            m.on_result(res)

    def on_setpoint(self, msg: Message) -> None:
        sp = msg.payload
        assert isinstance(sp, p.Setpoint)
        if self.local is not None:
            self.local.on_setpoint(sp)

    async def _housekeeping(self) -> None:
        last_prune = float("-inf")
        down_since: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            if loop.time() - last_prune > 3600:
                last_prune = loop.time()
                self.queue.prune()  # finished, delivered transactions older than 60 days
            connected = sum(1 for u in self.upstreams.values() if u.booted.is_set())
            queued = self.queue.count()
            if self.upstreams and connected < len(self.upstreams):
                down_since = down_since or loop.time()
            else:
                down_since = None
            if down_since is not None and loop.time() - down_since >= 30:  # grace for (re)connecting
                self.ctx.status = p.HealthStatus.DEGRADED
                self.ctx.detail = (f"{len(self.upstreams) - connected} of {len(self.upstreams)} charge points not "
                                   f"registered at the backend; {queued} transaction messages queued")
            else:
                self.ctx.status = p.HealthStatus.ONLINE
                self.ctx.detail = None
            self.ctx.counters["queue_length"] = self.queue.count()
            self.ctx.counters["queue_dropped"] = self.queue.dropped
            self.ctx.counters["queue_dead"] = self.queue.dead_count()
            self.ctx.counters["upstream_connected"] = sum(1 for u in self.upstreams.values() if u.booted.is_set())
            if self.local is not None:
                self.ctx.counters["wallboxes_connected"] = sum(1 for b in self.local.boxes.values() if b.session)
            await asyncio.sleep(5)

    # -- live configuration ------------------------------------------------------------------------------
    @staticmethod
    def _shared(config: Config) -> tuple[Any, ...]:
        """What every EVSE's connection depends on: a change here restarts the whole gateway."""
        s = config.smgw
        return (config.ocpp, config.state_dir, config.site, s.enabled, s.functions, s.endpoints)

    async def reconfigure(self, new: Config) -> bool:
        """Apply ``new`` EVSE by EVSE: a new EVSE gets its charge point at the backend (and, for an OCPP
        wallbox, its charge box id is accepted locally), a removed one is disconnected, a changed one is
        reconnected; the others keep their connections. False when the change needs a full restart."""
        if self._shared(new) != self._shared(self.config):
            return False
        old = {e.id: e for e in self.config.evses}
        now = {e.id: e for e in new.evses}
        gone = [i for i in old if i not in now or old[i] != now[i]]
        added = [i for i in now if i not in old or old[i] != now[i]]
        for evse_id in gone:
            await self._drop(old[evse_id], clear=evse_id not in now)
        self.config = new
        ocpp_added = [now[i] for i in added if now[i].ocpp is not None]
        started_local = False
        if ocpp_added and self.local is None:
            # every OCPP EVSE of new
            self.local = LocalCsms(new, self.ctx.bus, self.queue, self.ctx.counters, self.ctx.tasks)
            started_local = True
        elif self.local is not None:
            self.local.config = new
            for evse in ocpp_added:
                self._add_connector(evse)
        for evse_id in added:
            evse = now[evse_id]
            if evse.modbus is not None:
                self.modbus[evse_id] = ModbusEvse(evse, new, self.ctx.bus, self.ctx.counters, self.ctx.tasks)
                if self.watch is not None:
                    self.watch(evse_id)
            elif evse.ocpp is not None and self.watch is not None:
                self.watch.setpoints(evse_id)
            self._connect_upstream(evse)
        if self.local is not None:
            if started_local and new.ocpp.local.enabled:
                await self.local.start()
            elif not started_local:
                for evse in ocpp_added:
                    self.local.connectors[evse.id].start()
        for evse_id in added:
            self._run_upstream(evse_id)
        for m in self.modbus.values():
            m.config = new
        if gone or added:
            self.ctx.log.info("gateway reconfigured", added=sorted(set(added) - set(gone)),
                              removed=sorted(set(gone) - set(added)), changed=sorted(set(gone) & set(added)),
                              upstream=len(self.upstreams))
        return True

    def _add_connector(self, evse: Evse) -> None:
        local = self.local
        assert local is not None and evse.ocpp is not None
        cb = evse.ocpp.charge_box_id
        box = local.boxes.get(cb)
        if box is None:
            box = local.boxes[cb] = Box(cbid=cb, connectors={}, password=None, version=evse.ocpp.version)
        # as LocalCsms does at start: the first password and the last version given for the box
        same = [e.ocpp for e in self.config.evses if e.ocpp is not None and e.ocpp.charge_box_id == cb]
        box.password = next((o.password.reveal() for o in same if o.password is not None), None)
        box.version = next((o.version for o in reversed(same) if o.version is not None), None)
        conn = Connector(evse, local)
        box.connectors[evse.ocpp.connector_id] = conn
        local.connectors[evse.id] = conn

    async def _drop(self, evse: Evse, clear: bool) -> None:
        """Disconnect ``evse`` (removed from the configuration, or changed and about to come back)."""
        up = self.upstreams.pop(evse.id, None)
        if up is not None:
            up.close()
        task = self.up_tasks.pop(evse.id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        m = self.modbus.pop(evse.id, None)
        if m is not None:
            m.close()
        if self.local is not None and evse.id in self.local.connectors:
            conn = self.local.connectors.pop(evse.id)
            conn.close()
            box = self.local.boxes.get(conn.cbid)
            if box is not None:
                box.connectors.pop(conn.n, None)
                if not box.connectors:
                    del self.local.boxes[conn.cbid]
                sess = box.session
                if sess is not None and (not box.connectors or not clear):
                    # the wallbox reconnects: it boots with its new settings and reports every connector
                    # afresh (or is refused when it is no longer configured)
                    with contextlib.suppress(Exception):
                        await sess.ws.close(1012, "configuration changed")
            if clear:
                self.local.flush_statuses()  # a status still waiting for the end of the turn goes first
                self.ctx.bus.clear("evse.status", evse_id=evse.id)  # nobody reports this EVSE any more
            else:
                conn.applied = None
        if clear:
            self.ctx.bus.clear("evse.limit", evse_id=evse.id)

    async def stop(self) -> None:
        for up in self.upstreams.values():
            up.close()
        for m in self.modbus.values():
            m.close()
        for t in [*self._tasks, *self.up_tasks.values()]:
            t.cancel()
        for t in [*self._tasks, *self.up_tasks.values()]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.local is not None:
            await self.local.stop()
        self.queue.close()


class Subscriptions:
    """The gateway's bus subscriptions, each dispatching to the ``current()`` gateway, per EVSE: calling it with a
    Modbus EVSE's id subscribes that EVSE's status and command results (the evse-poller's), ``setpoints(id)`` an
    OCPP EVSE's setpoints. Not wildcards: ``evse/+/status`` would bring back every status the gateway publishes
    for its own OCPP wallboxes, one MQTT message in, parsed and dropped, per MeterValues forwarded (bench/ocpp);
    ``evse/+/setpoint`` every Modbus EVSE's setpoint, which only the evse-poller drives (at 500 + 500 wallboxes
    half of every limit's burst, read, parsed, validated and dropped here). Subscribed once per id: the
    subscriptions outlive a restart of the gateway with a new configuration; a removed EVSE's messages are
    dropped by the gateway as before."""

    def __init__(self, ctx: ServiceContext, current: Callable[[], Gateway]) -> None:
        self.ctx = ctx
        self.current = current
        self.watched: set[str] = set()
        self.followed: set[str] = set()

    def __call__(self, evse_id: str) -> None:
        if evse_id in self.watched:
            return
        self.watched.add(evse_id)
        self.ctx.bus.subscribe("evse.status", lambda m: self.current().on_status(m), evse_id=evse_id)
        self.ctx.bus.subscribe("evse.command_result", lambda m: self.current().on_result(m), evse_id=evse_id)

    def setpoints(self, evse_id: str) -> None:
        if evse_id in self.followed:
            return
        self.followed.add(evse_id)
        self.ctx.bus.subscribe("evse.setpoint", lambda m: self.current().on_setpoint(m), evse_id=evse_id)


def subscribe(ctx: ServiceContext, current: Callable[[], Gateway]) -> Subscriptions:
    """The gateway's per-EVSE subscriptions (see :class:`Subscriptions`), made as the gateway meets its EVSEs."""
    return Subscriptions(ctx, current)


async def serve(ctx: ServiceContext, tune: bool = False) -> None:
    """``tune``: GC tuning once up (as its own process; off in tests that share the process)."""
    holder: dict[str, Gateway] = {}
    # the subscriptions are registered once and dispatch to the current gateway
    watch = subscribe(ctx, lambda: holder["gw"])
    gw = holder["gw"] = Gateway(ctx, ctx.config, watch)

    async def reload(new: Config) -> None:
        if await holder["gw"].reconfigure(new):
            return
        ctx.log.info("restarting the gateway with the new configuration (ocpp or smgw settings changed)")
        await holder["gw"].stop()
        holder["gw"] = Gateway(ctx, new, watch)
        await holder["gw"].start()

    ctx.on_reload(reload)
    await gw.start()
    if tune:
        tune_gc()  # its gen-2 passes over 400 connections' objects were the p99 of forwarding (bench/ocpp)
    try:
        await asyncio.Event().wait()
    finally:
        await holder["gw"].stop()


async def serve_tuned(ctx: ServiceContext) -> None:
    await serve(ctx, tune=True)


def main() -> None:
    run_service(NAME, serve_tuned)
