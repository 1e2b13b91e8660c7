"""The evse-poller service: bus in, Modbus out.

Publishes ``evse/<id>/status`` for every Modbus EVSE and ``meter/<id>/reading`` for every meter;
consumes ``evse/<id>/setpoint`` and ``evse/<id>/command`` (answering ``evse/<id>/command/result``), each
subscribed per own EVSE.

With ``poller.instances`` the Modbus devices are split over several processes: ``python -m evse_poller
--instance garage`` (or ``CHARGEGATE_POLLER_INSTANCE=garage``) polls only the devices whose
``modbus.instance`` is ``garage``, as the service ``evse-poller.garage``: its own broker account (whose
ACL lets it write only those devices' topics), health topic and state folder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys

from chargegate import config as cfgmod
from chargegate import payloads as p
from chargegate.bus import Bus, Message
from chargegate.config import Config, instance_service
from chargegate.runtime import ServiceContext, run_service, tune_gc
from evse_poller.poller import Poller

NAME = "evse-poller"


class BusPublisher:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    def evse_status(self, status: p.EvseStatus) -> None:
        self.bus.publish("evse.status", status, evse_id=status.evse_id)

    def meter_reading(self, reading: p.MeterReading) -> None:
        self.bus.publish("meter.reading", reading, meter_id=reading.meter_id)

    def command_result(self, result: p.EvseCommandResult) -> None:
        self.bus.publish("evse.command_result", result, evse_id=result.evse_id)

    def clear_evse(self, evse_id: str) -> None:
        self.bus.clear("evse.status", evse_id=evse_id)  # removed from the configuration

    def clear_meter(self, meter_id: str) -> None:
        self.bus.clear("meter.reading", meter_id=meter_id)


def instance_of(service: str) -> str | None:
    """``evse-poller.garage`` -> ``garage``; the single ``evse-poller`` -> None."""
    return service.split(".", 1)[1] if service.startswith(NAME + ".") else None


async def serve(ctx: ServiceContext, tune: bool = False) -> None:
    holder: dict[str, Poller] = {}
    runner: dict[str, asyncio.Task[None]] = {}
    instance = instance_of(ctx.name)

    def start(config: Config) -> None:
        poller = Poller(config.for_poller(instance), BusPublisher(ctx.bus), ctx.log, ctx.counters, tasks=ctx.tasks,
                        name=ctx.name)
        holder["poller"] = poller
        ctx.counters["evses_polled"] = len(poller.evses)  # in the health: what this instance owns
        ctx.counters["meters_polled"] = len(poller.meters)
        runner["task"] = ctx.tasks.spawn("poller", poller.run)
        ctx.log.info("polling", evses=len(poller.evses), meters=len(poller.meters), broken=len(poller.broken),
                     links=len(poller.pool.links), interval_s=config.poller.poll_interval_s,
                     event_loop=type(asyncio.get_running_loop()).__module__)

    def on_setpoint(msg: Message) -> None:
        # synchronous: the bus calls it as it dispatches the message, and the poller starts the write at once
        # (a coroutine handler would cost a task and a turn of the loop per setpoint before that)
        sp = msg.payload
        assert isinstance(sp, p.Setpoint)
        poller = holder.get("poller")
        if poller is not None:
            poller.set_setpoint(sp)

    async def on_command(msg: Message) -> None:
        cmd = msg.payload
        assert isinstance(cmd, p.EvseCommand)
        poller = holder.get("poller")
        if poller is not None:
            await poller.command(cmd)

    async def on_reload(config: Config) -> None:
        try:
            await restart_or_reconfigure(config)
        finally:
            follow(config)

    async def restart_or_reconfigure(config: Config) -> None:
        current = holder.get("poller")
        if current is not None and await current.reconfigure(config.for_poller(instance)):
            return  # device by device: the others keep polling
        ctx.log.info("poller settings changed: restarting every device")
        old, task = holder.get("poller"), runner.get("task")
        setpoints = {k: d.setpoint for k, d in old.evses.items()} if old else {}
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        start(config)
        for sp in setpoints.values():
            if sp is not None:
                holder["poller"].set_setpoint(sp)

    def on_connect() -> None:
        poller = holder.get("poller")
        if poller is not None:
            poller.publish_broken()

    followed: set[str] = set()

    def follow(config: Config) -> None:
        """Subscribe to the setpoints and commands of this instance's own Modbus EVSEs, each by its own topic:
        the broker sends no other EVSE's (with 1000 EVSEs over several instances and the OCPP wallboxes, most
        of ``evse/+/setpoint`` is someone else's - each was read, parsed, validated and dropped here). The
        EVSEs of a reloaded configuration are followed, the removed ones no longer."""
        want = {e.id for e in config.for_poller(instance).evses if e.modbus is not None}
        for evse_id in sorted(want - followed):
            ctx.bus.subscribe("evse.setpoint", on_setpoint, evse_id=evse_id)
            ctx.bus.subscribe("evse.command", on_command, evse_id=evse_id)
        for evse_id in sorted(followed - want):
            ctx.bus.unsubscribe("evse.setpoint", evse_id=evse_id)
            ctx.bus.unsubscribe("evse.command", evse_id=evse_id)
        followed.clear()
        followed.update(want)

    start(ctx.config)
    follow(ctx.config)
    ctx.bus.on_connect(on_connect)
    ctx.on_reload(on_reload)
    if tune:
        # the devices' objects out of the cyclic collector's full passes (several ms with a hundred devices), which
        # would otherwise fall on a burst of setpoints now and then
        tune_gc()
    try:
        await asyncio.Event().wait()  # until cancelled
    finally:
        task = runner.get("task")
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def serve_tuned(ctx: ServiceContext) -> None:
    await serve(ctx, tune=True)


def use_fast_event_loop() -> bool:
    """Run on uvloop when it is installed: it costs about half the CPU per Modbus request."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def instance_problem(config: Config, instance: str | None) -> str | None:
    """Why this configuration cannot be polled by ``instance`` (None: it can)."""
    known = config.poller.instances
    if instance is None and known:
        return (f"poller.instances is given ({', '.join(known)}): start each instance with --instance NAME "
                f"(`chargegate run` does)")
    if instance is not None and instance not in known:
        return f"--instance {instance}: not one of poller.instances ({', '.join(known) or 'none'})"
    return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--instance", default=os.environ.get("CHARGEGATE_POLLER_INSTANCE") or None)
    ap.add_argument("--config", "-c", default=os.environ.get("CHARGEGATE_CONFIG", "chargegate.yaml"))
    args, _ = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    rest = [a for a in (sys.argv[1:] if argv is None else argv)]
    if "--instance" in rest:  # run_service does not know it
        i = rest.index("--instance")
        del rest[i:i + 2]
    rest = [a for a in rest if not a.startswith("--instance=")]
    name = instance_service(args.instance)
    try:
        why = instance_problem(cfgmod.load(args.config), args.instance)
    except cfgmod.ConfigError:
        why = None  # run_service reports it
    if why is not None:
        print(f"{name}: configuration error\n{why}", file=sys.stderr)
        sys.exit(2)  # a configuration error: `chargegate run` waits for the file to change
    use_fast_event_loop()
    run_service(name, serve_tuned, rest)
