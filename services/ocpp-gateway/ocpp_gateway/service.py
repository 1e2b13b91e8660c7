"""The ocpp-gateway service: local central system, upstream charge points, durable queue."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from chargegate import payloads as p
from chargegate.bus import Message
from chargegate.config import Config
from chargegate.runtime import ServiceContext, run_service
from ocpp_gateway.local import LocalCsms
from ocpp_gateway.modbus import ModbusEvse
from ocpp_gateway.txqueue import TxQueue
from ocpp_gateway.upstream import UpstreamCP, upstream_target

NAME = "ocpp-gateway"


class Gateway:
    """Everything the service runs for one configuration."""

    def __init__(self, ctx: ServiceContext, config: Config) -> None:
        self.ctx = ctx
        self.config = config
        qpath = config.ocpp.queue.path or (config.state_dir / "ocpp-queue.sqlite")
        self.queue = TxQueue(qpath, max_messages=config.ocpp.queue.max_messages)
        self.local: LocalCsms | None = None
        self.modbus: dict[str, ModbusEvse] = {}
        self.upstreams: dict[str, UpstreamCP] = {}
        self._tasks: list[asyncio.Task[Any]] = []

    async def start(self) -> None:
        cfg, ctx = self.config, self.ctx
        if any(e.ocpp for e in cfg.evses):
            self.local = LocalCsms(cfg, ctx.bus, self.queue, ctx.counters)
        for evse in cfg.evses:
            if evse.modbus is not None:
                self.modbus[evse.id] = ModbusEvse(evse, cfg, ctx.bus, ctx.counters)
            try:
                target = upstream_target(cfg, evse)
            except ValueError as e:
                ctx.log.error("EVSE not connected to the backend", evse_id=evse.id, error=str(e))
                ctx.counters["upstream_misconfigured"] += 1
                continue
            if target is None:
                continue
            driver: Any = self.modbus.get(evse.id) or (self.local.connectors[evse.id] if self.local else None)
            up = UpstreamCP(evse=evse, target=target, queue=self.queue, driver=driver, config=cfg,
                            counters=ctx.counters, publish_limit=self._publish_limit)
            self.upstreams[evse.id] = up
            driver.up = up
            if isinstance(driver, ModbusEvse):
                driver.attach(up)
        if self.local is not None and cfg.ocpp.local.enabled:
            await self.local.start()
        for up in self.upstreams.values():
            self._tasks.append(asyncio.create_task(up.run(), name=f"upstream-{up.cbid}"))
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))
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

    async def stop(self) -> None:
        for up in self.upstreams.values():
            up.close()
        for m in self.modbus.values():
            m.close()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.local is not None:
            await self.local.stop()
        self.queue.close()


async def serve(ctx: ServiceContext) -> None:
    gw = Gateway(ctx, ctx.config)
    holder = {"gw": gw}

    # the subscriptions are registered once and dispatch to the current gateway
    ctx.bus.subscribe("evse.status", lambda m: holder["gw"].on_status(m))
    ctx.bus.subscribe("evse.command_result", lambda m: holder["gw"].on_result(m))
    ctx.bus.subscribe("evse.setpoint", lambda m: holder["gw"].on_setpoint(m))

    async def reload(new: Config) -> None:
        ctx.log.info("restarting the gateway with the new configuration")
        await holder["gw"].stop()
        holder["gw"] = Gateway(ctx, new)
        await holder["gw"].start()

    ctx.on_reload(reload)
    await gw.start()
    try:
        await asyncio.Event().wait()
    finally:
        await holder["gw"].stop()


def main() -> None:
    run_service(NAME, serve)
