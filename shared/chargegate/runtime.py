"""The service runtime: start-up, health heartbeat, last will, reload and clean shutdown.

A service is an ``async def serve(ctx: ServiceContext)`` that runs until cancelled::

    def main() -> None:
        run_service("evse-poller", serve)

``run_service`` parses ``--config``, sets up logging, connects the bus with the service's own
broker account and a last will (``service/<name>/health`` = offline), publishes health every
``HEALTH_INTERVAL_S`` with version, uptime, configuration version and counters, reloads the
configuration on ``service/<name>/command`` ``reload`` (or SIGHUP), and on SIGTERM/SIGINT
cancels ``serve``, publishes offline and disconnects.
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.sslproto
import contextlib
import gc
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from chargegate import __version__
from chargegate import config as cfgmod
from chargegate import log as logsetup
from chargegate import payloads as p
from chargegate.broker import bus_settings
from chargegate.bus import Bus, Message
from chargegate.lean import release_memory
from chargegate.supervise import Tasks
from chargegate.topics import Registry

HEALTH_INTERVAL_S = float(os.environ.get("CHARGEGATE_HEALTH_INTERVAL_S", "10"))

ReloadHook = Callable[[cfgmod.Config], Awaitable[None] | None]


class ServiceContext:
    """What a service gets: its configuration, the bus, a logger and counters."""

    def __init__(self, name: str, config: cfgmod.Config, config_path: Path | None, bus: Bus,
                 registry: Registry) -> None:
        self.name = name
        self.config = config
        self.config_path = config_path
        self.bus = bus
        self.registry = registry
        self.log = structlog.get_logger(name)
        self.counters: Counter[str] = Counter()
        # restarts of supervised long-lived tasks by task name (health ``task_restarts``)
        self.task_restarts: Counter[str] = Counter()
        self.tasks = Tasks(self.task_restarts, self.log)
        self.started = time.monotonic()
        self.status: p.HealthStatus = p.HealthStatus.ONLINE
        self.detail: str | None = None
        self._reload_hooks: list[ReloadHook] = []

    @property
    def state_dir(self) -> Path:
        return self.config.state_dir

    def on_reload(self, hook: ReloadHook) -> None:
        """``hook(new_config)`` runs after a new configuration was loaded and validated."""
        self._reload_hooks.append(hook)

    def health(self, status: p.HealthStatus | None = None) -> p.Health:
        counters = dict(self.counters)
        counters["invalid_messages"] = sum(self.registry.invalid.values())
        return p.Health(service=self.name, status=status or self.status, version=__version__,
                        uptime_s=round(time.monotonic() - self.started, 1), pid=os.getpid(),
                        config_version=self.config.digest(), counters=counters,
                        task_restarts=_at_most(self.task_restarts, 500), detail=self.detail)

    def publish_health(self) -> None:
        self.bus.publish("service.health", self.health(), service=self.name)

    async def reload(self) -> bool:
        if self.config_path is None:
            self.log.warning("reload requested but the configuration was not loaded from a file")
            return False
        try:
            new = cfgmod.load(self.config_path)
        except cfgmod.ConfigError as e:
            self.counters["config_rejected"] += 1
            self.log.error("new configuration rejected, keeping the current one", error=str(e))
            return False
        old_version = self.config.digest()
        self.config = new
        for hook in self._reload_hooks:
            res = hook(new)
            if asyncio.iscoroutine(res):
                await res
        self.log.info("configuration reloaded", old_version=old_version, version=new.digest())
        self.publish_health()
        return True


def _at_most(counts: Counter[str], n: int) -> dict[str, int]:
    """``counts`` with at most ``n`` keys: beyond that the most frequent ``n - 1`` and ``(others)``."""
    if len(counts) <= n:
        return dict(counts)
    top = counts.most_common(n - 1)
    return {**dict(top), "(others)": sum(counts.values()) - sum(v for _, v in top)}


def _parse_args(name: str, argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=name, description=f"chargegate {name} service")
    ap.add_argument("--config", "-c", default=os.environ.get("CHARGEGATE_CONFIG", "chargegate.yaml"),
                    help="configuration file (env CHARGEGATE_CONFIG)")
    ap.add_argument("--log-format", choices=["auto", "json", "console"], default=None)
    return ap.parse_args(argv)


TLS_READ_BUFFER = 4 * 1024


def small_tls_buffers(size: int = TLS_READ_BUFFER) -> None:
    """asyncio gives every TLS connection a 256 KiB read buffer (``SSLProtocol.max_size``), allocated and
    zeroed when it connects: 200 channels through smgw-link held 45 MB for it (3.2 MB at 16 KiB, 0.8 MB at
    4 KiB). The buffer only takes what the socket has; OpenSSL reassembles records across reads (a full
    record, 16 KiB of plaintext plus its overhead, takes five), so larger messages are just read in more
    calls; an OCPP or CLS.EEDI message (a few hundred bytes) takes one."""
    asyncio.sslproto.SSLProtocol.max_size = size


def run_service(name: str, serve: Callable[[ServiceContext], Awaitable[None]],
                argv: list[str] | None = None) -> None:
    """Entry point of every service process. Exits 2 on a configuration it cannot use (invalid, or a
    secret or file it needs is missing): ``chargegate run`` then waits for the file to change."""
    small_tls_buffers()
    args = _parse_args(name, argv)
    try:
        config = cfgmod.load(args.config)
        from chargegate.preflight import service_problems

        missing = service_problems(config, name)  # e.g. a secret's environment variable is not set
        if missing:
            raise cfgmod.ConfigError(str(args.config), missing)
    except cfgmod.ConfigError as e:
        logsetup.setup(name)
        print(f"{name}: configuration error\n{e}", file=sys.stderr)
        sys.exit(2)
    logsetup.setup(name, config.logging.level, args.log_format or config.logging.format)
    try:
        asyncio.run(_main(name, serve, config, Path(args.config)))
    except KeyboardInterrupt:
        pass


async def _main(name: str, serve: Callable[[ServiceContext], Awaitable[None]], config: cfgmod.Config,
                config_path: Path | None) -> None:
    ctx = await start_context(name, config, config_path)
    log = ctx.log
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: ctx.tasks.oneshot("reload", ctx.reload()))
    log.info("service starting", version=__version__, config_version=config.digest(), pid=os.getpid())
    task = asyncio.create_task(serve(ctx), name=f"{name}.serve")
    trimmer = ctx.tasks.spawn("release-memory", lambda: _release_memory_now_and_then(log))
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    failed: BaseException | None = None
    if task in done:
        failed = task.exception()
        if failed is not None:
            log.error("service failed", error=repr(failed), exc_info=failed)
    else:
        log.info("shutting down")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, 5)
    stopper.cancel()
    trimmer.cancel()
    await stop_context(ctx)
    if failed is not None:
        sys.exit(1)


async def start_context(name: str, config: cfgmod.Config, config_path: Path | None = None,
                        connect_timeout: float | None = None) -> ServiceContext:
    """Build the context (also used by tests to run a service in-process)."""
    registry = Registry(config.site.topic_root)
    health_topic = registry.topic("service.health", service=name)
    offline = p.Health(service=name, status=p.HealthStatus.OFFLINE, version=__version__,
                       detail="connection lost (last will)")
    bus = Bus(name, registry, bus_settings(config, name), will=offline, will_topic=health_topic)
    ctx = ServiceContext(name, config, config_path, bus, registry)

    async def on_command(msg: Message) -> None:
        cmd = msg.payload
        assert isinstance(cmd, p.ServiceCommand)
        if cmd.action == "reload":
            await ctx.reload()
        elif cmd.action == "restart":
            ctx.log.warning("restart requested over the bus", request_id=cmd.request_id)
            os.kill(os.getpid(), signal.SIGTERM)

    def forward_log(level: str, event: dict[str, Any]) -> None:
        level = {"exception": "error", "warn": "warning", "fatal": "critical", "msg": "info"}.get(level, level)
        if level not in ("info", "warning", "error", "critical") or not bus.connected.is_set():
            return
        text = str(event.pop("event", ""))[:2000]
        for k in ("level", "timestamp", "service", "exc_info"):
            event.pop(k, None)
        fields = {k: v if isinstance(v, int | float | bool | type(None)) else str(v)[:500]
                  for k, v in list(event.items())[:30]}
        rec = p.LogRecord(service=name, level=level, event=text, fields=fields)  # type: ignore[arg-type]
        bus.publish("service.log", rec, service=name)

    logsetup.add_sink(forward_log)
    ctx._log_sink = forward_log  # type: ignore[attr-defined]
    bus.on_connect(ctx.publish_health)
    bus.subscribe("service.command", on_command, service=name)
    await bus.start(wait=connect_timeout)
    ctx._heartbeat = ctx.tasks.spawn("health-heartbeat", lambda: _heartbeat(ctx))  # type: ignore[attr-defined]
    return ctx


async def stop_context(ctx: ServiceContext) -> None:
    logsetup.remove_sink(getattr(ctx, "_log_sink", None))
    hb: asyncio.Task[Any] | None = getattr(ctx, "_heartbeat", None)
    if hb is not None:
        hb.cancel()
    final = ctx.health(p.HealthStatus.OFFLINE)
    final.detail = "stopped"
    await ctx.bus.stop(final, ctx.registry.topic("service.health", service=ctx.name))


async def _heartbeat(ctx: ServiceContext) -> None:
    while True:
        await asyncio.sleep(HEALTH_INTERVAL_S)
        if ctx.bus.connected.is_set():
            ctx.publish_health()


RELEASE_FIRST_S = 5.0  # start-up: configuration validated, connections and channels coming up
RELEASE_EVERY_S = 30.0


async def _release_memory_now_and_then(log: Any) -> None:
    """Hand what start-up and bursts freed inside malloc's heaps back to the system
    (``chargegate.lean.release_memory``): soon after start-up, then every :data:`RELEASE_EVERY_S`. One call
    takes about a millisecond on a service's heap (25 MB)."""
    await asyncio.sleep(RELEASE_FIRST_S)
    while True:
        t = time.perf_counter()
        released = release_memory()
        log.debug("memory released to the system", released=released, ms=round((time.perf_counter() - t) * 1000, 2))
        await asyncio.sleep(RELEASE_EVERY_S)


def tune_gc() -> None:
    """For a long-running asyncio service once it is up: its many short-lived objects (messages, frames,
    rows) are freed by reference counting, yet they trigger the cyclic collector, whose full passes over
    everything alive (tens of ms with a few hundred connections) showed up as the p99 of forwarding and
    of a control cycle. Move what is alive after start-up out of its reach (``gc.freeze``) and let it run
    less often; cyclic garbage is still collected, only later."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
