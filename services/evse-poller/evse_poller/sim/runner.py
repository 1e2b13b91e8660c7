"""Simulators for a whole chargegate configuration, and their bus interface.

:class:`Simulators` starts one simulated device per Modbus EVSE and meter of a configuration,
where the configuration says they are (host/port/device_id; several devices may share a TCP port
as different unit ids; RTU/ASCII devices on a virtual serial line whose poller end is a symlink
at the configured serial port path). A grid meter reads a house base load plus every simulated
car's draw mapped through its EVSE's ``phase_rotation``; a circuit meter reads the EVSEs below
its circuit.

On the bus (account ``sim``) the simulators take ``<root>/sim/<evse_id>/command``
(``{"action": "plug"|"unplug", "phases": 1|3, "max_current_a": 16}``, and
``{"action": "network", "up": false}`` to take a device - EVSE or meter, by its id - off the
network: its TCP port is closed and every connection dropped; ``"up": true`` brings it back) and
publish retained ``<root>/sim/<evse_id>/draw`` on every change and every second. The draws of
configured EVSEs simulated elsewhere (OCPP wallboxes, ``ocpp_gateway.sim``) are read from the same
topics and counted by the meters above them, so that a grid meter sees every car.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chargegate.bus import Bus
from chargegate.config import Circuit, Config, Evse, Meter
from chargegate.topics import Registry, format_validation_error
from evse_poller.logic import grid_currents
from evse_poller.profile import load_profile
from evse_poller.sim.devices import EVSE_SIMS, HTTP_METER_SIMS, METER_SIMS, SimSettings
from evse_poller.sim.httpserver import HttpEndpoint
from evse_poller.sim.model import ChargePoint, MeterModel
from evse_poller.sim.regmap import RegisterMap
from evse_poller.sim.server import SerialEndpoint, TcpEndpoint
from evse_poller.transport import Endpoint, resolve

log = structlog.get_logger("evse-poller.sim")

DRAW_INTERVAL_S = 1.0


class SimCommand(BaseModel):
    """``<root>/sim/<evse_id>/command``."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["plug", "unplug", "network"]
    phases: Literal[1, 2, 3] = 3
    max_current_a: float = Field(default=16.0, gt=0, le=80)
    up: bool = True  # action "network": False takes the device off the network, True brings it back


@dataclass
class SimEvse:
    evse: Evse
    point: ChargePoint
    regmap: RegisterMap
    endpoint: TcpEndpoint | SerialEndpoint

    def grid_draw(self) -> list[float]:
        return grid_currents(self.point.draw(), list(self.evse.phase_rotation))

    def snapshot(self) -> dict[str, Any]:
        cp = self.point
        cp.tick()
        return {
            "evse_id": self.evse.id,
            "ts": datetime.now(UTC).isoformat(),
            "plugged": cp.car.plugged,
            "car_phases": cp.car.phases,
            "car_max_current_a": cp.car.max_current_a,
            "state": cp.iec(),
            "enabled": cp.enabled,
            "limit_a": round(cp.limit_a(), 3),
            "commanded_a": cp.commanded_a,
            "fallback": cp.watchdog_expired(),
            "evse_current_a": [round(x, 3) for x in cp.draw()],
            "grid_current_a": [round(x, 3) for x in self.grid_draw()],
            "phase_rotation": list(self.evse.phase_rotation),
            "energy_wh": round(cp.energy_wh, 3),
        }


class Simulators:
    """Simulated devices for every Modbus EVSE and meter of ``config``."""

    def __init__(self, config: Config, *, base_load_a: tuple[float, float, float] = (1.0, 1.0, 1.0),
                 settings: dict[str, SimSettings] | None = None, host_override: str | None = None,
                 shard: tuple[int, int] = (0, 1), draw_interval_s: float = DRAW_INTERVAL_S) -> None:
        self.config = config
        self.base_load_a = list(base_load_a)
        self.draw_interval_s = draw_interval_s  # every draw at least this often (a change at once)
        self.evses: dict[str, SimEvse] = {}
        self.meters: dict[str, MeterModel] = {}
        self.meter_maps: dict[str, RegisterMap] = {}
        self.endpoints: dict[Any, TcpEndpoint | SerialEndpoint | HttpEndpoint] = {}
        self._meter_endpoints: dict[str, TcpEndpoint | SerialEndpoint | HttpEndpoint] = {}
        self.skipped: dict[str, str] = {}
        self.counters: Counter[str] = Counter()
        self.host_override = host_override
        self._bus: Bus | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._dirty: asyncio.Event | None = None
        self._dirty_ids: set[str] = set()  # EVSEs that said they changed since the draw loop last looked
        self._last_sent: dict[str, str] = {}
        # grid currents of configured EVSEs simulated elsewhere (OCPP wallbox simulators), from their draws
        self.external: dict[str, list[float]] = {}
        self._external_ids = {e.id for e in config.evses}
        self._evse_circuit = {e.id: e.circuit for e in config.evses}
        self.offline: set[str] = set()  # devices taken off the network
        self._net_tasks: set[asyncio.Future[None]] = set()
        settings = settings or {}
        for evse in config.evses:
            if evse.modbus is None:
                continue
            try:
                build = EVSE_SIMS[evse.modbus.profile]
            except KeyError:
                self._skip(evse.id, f"no simulator for profile {evse.modbus.profile!r}")
                continue
            try:
                ep, device_id = self._endpoint(evse.modbus.profile, evse.modbus)
            except (ValueError, OSError) as e:
                self._skip(evse.id, str(e))
                continue
            s = settings.get(evse.id) or SimSettings(safe_current_a=evse.safe_current_a)
            cp = ChargePoint(phases=evse.phases, max_current_a=evse.max_current_a)
            regmap = build(cp, s)
            ep.add(device_id, regmap)
            cp.on_change(lambda evse_id=evse.id: self._mark_dirty(evse_id))
            self.evses[evse.id] = SimEvse(evse, cp, regmap, ep)
        for meter in config.meters:
            name = meter.modbus.profile
            if name not in METER_SIMS and name not in HTTP_METER_SIMS:
                self._skip(meter.id, f"no simulator for profile {name!r}")
                continue
            try:
                ep, device_id = self._endpoint(name, meter.modbus)
            except (ValueError, OSError) as e:
                self._skip(meter.id, str(e))
                continue
            model = MeterModel(self._meter_source(meter))
            if isinstance(ep, HttpEndpoint):
                if name not in HTTP_METER_SIMS:
                    self._skip(meter.id, f"the simulator of {name!r} does not speak http")
                    continue
                if ep.routes:
                    self._skip(meter.id, f"{ep.host}:{ep.port} is simulated twice")
                    continue
                HTTP_METER_SIMS[name](model, ep)
            else:
                if name not in METER_SIMS:
                    self._skip(meter.id, f"the simulator of {name!r} does not speak Modbus")
                    continue
                self.meter_maps[meter.id] = METER_SIMS[name](model)
                ep.add(device_id, self.meter_maps[meter.id])
            self.meters[meter.id] = model
            self._meter_endpoints[meter.id] = ep
        if shard != (0, 1):
            self._keep_shard(*shard)

    def _keep_shard(self, k: int, n: int) -> None:
        """Keep the k-th of n shares of the endpoints (every n-th in the configuration's order, from the k-th),
        with the devices they serve; the meters stay in shard 0 (with their endpoints). Several processes
        started with 0/n .. n-1/n simulate the whole configuration together; an EVSE of another shard is
        external here (its draw is read from the bus like an OCPP wallbox's)."""
        meter_eps = {id(ep) for ep in self._meter_endpoints.values()}
        keep: dict[Any, TcpEndpoint | SerialEndpoint | HttpEndpoint] = {}
        j = 0
        for key, ep in self.endpoints.items():
            if id(ep) in meter_eps:
                if k == 0:
                    keep[key] = ep
                continue
            if j % n == k:
                keep[key] = ep
            j += 1
        kept = {id(ep) for ep in keep.values()}
        self.endpoints = keep
        self.evses = {i: se for i, se in self.evses.items() if id(se.endpoint) in kept}
        if k != 0:
            self.meters, self.meter_maps, self._meter_endpoints = {}, {}, {}

    def _skip(self, ident: str, why: str) -> None:
        self.skipped[ident] = why
        log.warning("device not simulated", device=ident, reason=why)

    def _endpoint(self, profile_name: str, conn: Any) -> tuple[TcpEndpoint | SerialEndpoint | HttpEndpoint, int]:
        target = resolve(conn, load_profile(profile_name))
        ep: Endpoint = target.endpoint
        if ep.kind == "http":
            host = self.host_override or ep.host
            key: Any = ("tcp", host, ep.port)
            existing = self.endpoints.get(key)
            if existing is None:
                existing = self.endpoints[key] = HttpEndpoint(host, ep.port)
            elif not isinstance(existing, HttpEndpoint):
                raise ValueError(f"{host}:{ep.port} is used for Modbus and for http")
            return existing, 0
        if ep.kind == "tcp":
            host = self.host_override or ep.host
            key = ("tcp", host, ep.port)
            existing = self.endpoints.get(key)
            if existing is None:
                existing = self.endpoints[key] = TcpEndpoint(host, ep.port, ep.framer)  # type: ignore[arg-type]
            elif isinstance(existing, HttpEndpoint):
                raise ValueError(f"{host}:{ep.port} is used for Modbus and for http")
            elif isinstance(existing, TcpEndpoint) and existing.framing != ep.framer:
                raise ValueError(f"{host}:{ep.port} is used with {existing.framing} and {ep.framer} framing")
            return existing, target.device_id
        key = ("serial", ep.device)
        existing = self.endpoints.get(key)
        if existing is None:
            existing = self.endpoints[key] = SerialEndpoint(
                ep.device, "ascii" if ep.framer == "ascii" else "rtu", baudrate=ep.baudrate, parity=ep.parity,
                stopbits=ep.stopbits, bytesize=ep.bytesize)
        return existing, target.device_id

    # -- meters ------------------------------------------------------------------------------
    def _circuit_of_meter(self, meter: Meter) -> Circuit | None:
        for c in self.config.all_circuits():
            if c.meter == meter.id:
                return c
        return self.config.root_circuit if meter.role == "grid" else None

    def _meter_source(self, meter: Meter) -> Any:
        circuit = self._circuit_of_meter(meter)
        if circuit is None:
            return lambda: [0.0, 0.0, 0.0]
        below = {c.id for c in circuit.walk()}
        is_root = circuit.id == self.config.root_circuit.id
        sign = -1.0 if meter.invert else 1.0

        def source() -> list[float]:
            total = list(self.base_load_a) if is_root else [0.0, 0.0, 0.0]
            for se in self.evses.values():
                if se.evse.circuit in below:
                    for i, a in enumerate(se.grid_draw()):
                        total[i] += a
            for evse_id, amps in self.external.items():
                if self._evse_circuit.get(evse_id) in below:
                    for i, a in enumerate(amps):
                        total[i] += a
            return [sign * x for x in total]

        return source

    def grid_current_a(self) -> list[float]:
        """Base load plus every simulated car (also those simulated elsewhere), per grid phase."""
        total = list(self.base_load_a)
        for se in self.evses.values():
            for i, a in enumerate(se.grid_draw()):
                total[i] += a
        for amps in self.external.values():
            for i, a in enumerate(amps):
                total[i] += a
        return total

    async def set_network(self, ident: str, up: bool) -> None:
        """Take a device (EVSE or meter) off the network or bring it back. Every device sharing its
        endpoint (same host:port or serial line) goes with it."""
        ep = self.endpoint_of(ident)
        if up:
            await ep.start()
            self.offline.discard(ident)
        else:
            await ep.stop()
            self.offline.add(ident)
        log.info("device network " + ("up" if up else "down"), device=ident)

    # -- cars --------------------------------------------------------------------------------
    def point(self, evse_id: str) -> ChargePoint:
        return self.evses[evse_id].point

    def plug(self, evse_id: str, phases: int = 3, max_current_a: float = 16.0) -> None:
        self.point(evse_id).plug(phases, max_current_a)
        log.info("car plugged in", evse=evse_id, phases=phases, max_current_a=max_current_a)

    def unplug(self, evse_id: str) -> None:
        self.point(evse_id).unplug()
        log.info("car unplugged", evse=evse_id)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._dirty = asyncio.Event()
        for ep in self.endpoints.values():
            await ep.start()
        for ident, ep in self.endpoints.items():
            log.info("simulator listening", endpoint=_describe(ident, ep), units=sorted(ep.maps))
        self._tasks.append(asyncio.create_task(self._draw_loop(), name="sim.draw"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        for ep in self.endpoints.values():
            with contextlib.suppress(Exception):
                await ep.stop()
        if self._bus is not None:
            await self._bus.stop()
            self._bus = None

    def endpoint_of(self, ident: str) -> TcpEndpoint | SerialEndpoint | HttpEndpoint:
        if ident in self.evses:
            return self.evses[ident].endpoint
        return self._meter_endpoints[ident]

    # -- bus ---------------------------------------------------------------------------------
    async def attach_bus(self, bus: Bus) -> None:
        """Take commands from and publish draws to ``bus`` (connected as account ``sim``)."""
        self._bus = bus
        root = bus.registry.root
        bus.subscribe_raw(f"{root}/sim/+/command", self._on_command)
        if self.meters:  # the other simulators' draws count only at a meter (without one: every draw, for nothing)
            bus.subscribe_raw(f"{root}/sim/+/draw", self._on_draw)
        bus.on_connect(self._mark_all)
        self._mark_all()

    def _mark_dirty(self, evse_id: str | None = None) -> None:
        if evse_id is not None:
            self._dirty_ids.add(evse_id)
        if self._dirty is not None:
            self._dirty.set()

    def _mark_all(self) -> None:
        self._last_sent.clear()
        self._dirty_ids.update(self.evses)
        self._mark_dirty()

    def _on_command(self, topic: str, payload: bytes, retained: bool) -> None:
        parts = topic.split("/")
        evse_id = parts[-2] if len(parts) >= 2 else ""
        if retained:
            return  # a command is an event, never state
        if evse_id not in self.evses and evse_id not in self.meters:
            if evse_id not in self._external_ids:  # an OCPP wallbox's simulator takes its own commands
                self.counters["sim_commands_unknown_evse"] += 1
                log.warning("sim command for an unknown EVSE dropped", topic=topic, evse=evse_id)
            return
        try:
            cmd = SimCommand.model_validate(json.loads(payload))
        except (ValueError, ValidationError) as e:
            self.counters["sim_commands_invalid"] += 1
            err = format_validation_error(e) if isinstance(e, ValidationError) else str(e)
            log.warning("invalid sim command dropped", topic=topic, error=err)
            return
        if cmd.action == "network":
            task = asyncio.ensure_future(self.set_network(evse_id, cmd.up))
            self._net_tasks.add(task)
            task.add_done_callback(self._network_done)
            self.counters["sim_commands"] += 1
            return
        if evse_id not in self.evses:
            self.counters["sim_commands_invalid"] += 1
            log.warning("sim command for a meter dropped (meters take only network)", topic=topic, action=cmd.action)
            return
        if cmd.action == "plug":
            self.plug(evse_id, cmd.phases, cmd.max_current_a)
        else:
            self.unplug(evse_id)
        self.counters["sim_commands"] += 1

    def _network_done(self, task: asyncio.Future[None]) -> None:
        self._net_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("network command failed", error=repr(task.exception()))

    def _on_draw(self, topic: str, payload: bytes, retained: bool) -> None:
        """The draw of an EVSE simulated elsewhere: its grid currents count at the meters above it."""
        parts = topic.split("/")
        evse_id = parts[-2] if len(parts) >= 2 else ""
        if evse_id in self.evses or evse_id not in self._external_ids:
            return
        if not payload:
            self.external.pop(evse_id, None)
            return
        try:
            amps = [float(x) for x in json.loads(payload)["grid_current_a"]]
            if len(amps) != 3 or any(not 0 <= a <= 1000 for a in amps):
                raise ValueError(f"grid_current_a {amps!r}")
        except (ValueError, KeyError, TypeError) as e:
            self.counters["sim_draws_invalid"] += 1
            log.warning("invalid draw of an external EVSE dropped", topic=topic, error=str(e))
            return
        for m in self.meters.values():
            m.tick()  # integrate energy up to the change
        self.external[evse_id] = amps

    def publish_draws(self) -> None:
        """Publish every EVSE's draw now."""
        if self._bus is None:
            return
        for evse_id, se in self.evses.items():
            self._send(evse_id, se.snapshot())

    def _send(self, evse_id: str, snap: dict[str, Any]) -> None:
        assert self._bus is not None
        root = self._bus.registry.root
        self._bus.publish_raw(f"{root}/sim/{evse_id}/draw", json.dumps(snap).encode(), qos=0, retain=True)
        self._last_sent[evse_id] = _change_key(snap)

    async def _draw_loop(self) -> None:
        """Every EVSE's draw once per ``draw_interval_s`` (a second); in between, within a quarter of a second,
        each one that changed: at once for those that said so (a write, a car), every quarter second looking
        at all of them (what changes by itself: a watchdog running out). A burst of writes to 500 wallboxes
        used to look at every one of them on every wake-up."""
        assert self._dirty is not None
        last_full = last_scan = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), DRAW_INTERVAL_S / 4)
            self._dirty.clear()
            dirty, self._dirty_ids = self._dirty_ids, set()
            now = time.monotonic()
            scan = now - last_scan >= DRAW_INTERVAL_S / 4
            if scan:
                last_scan = now
                for se in self.evses.values():
                    se.point.tick()
            for m in self.meters.values():
                m.tick()
            if self._bus is None:
                continue
            if now - last_full >= self.draw_interval_s:
                last_full = now
                self.publish_draws()
            else:
                self._publish_changed(None if scan else dirty)

    def _publish_changed(self, only: set[str] | None = None) -> None:
        """Publish the draw of every EVSE (of ``only``) whose draw changed since it was last published."""
        for evse_id in self.evses if only is None else only:
            se = self.evses.get(evse_id)
            if se is None:
                continue
            snap = se.snapshot()
            if self._last_sent.get(evse_id) != _change_key(snap):
                self._send(evse_id, snap)


def _change_key(snap: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in snap.items() if k not in ("ts", "energy_wh")}, sort_keys=True)


def _describe(key: Any, ep: TcpEndpoint | SerialEndpoint | HttpEndpoint) -> str:
    if isinstance(ep, HttpEndpoint):
        return f"http {ep.host}:{ep.port} ({len(ep.routes)} routes)"
    if isinstance(ep, TcpEndpoint):
        return f"tcp {ep.host}:{ep.port} ({ep.framing})"
    return f"serial {ep.device_path if ep.line else key[1]} ({ep.framing})"


def sim_bus(config: Config) -> Bus:
    from chargegate.broker import bus_settings

    return Bus("sim", Registry(config.site.topic_root), bus_settings(config, "sim"))


async def run(config: Config, *, base_load_a: tuple[float, float, float] = (1.0, 1.0, 1.0),
              use_bus: bool = True, stop: asyncio.Event | None = None, shard: tuple[int, int] = (0, 1),
              draw_interval_s: float = DRAW_INTERVAL_S) -> int:
    """Run the simulators of ``config`` until ``stop`` is set (or cancelled); ``shard`` (K, N): only the
    K-th of N shares of the endpoints (see :class:`Simulators`)."""
    sims = Simulators(config, base_load_a=base_load_a, shard=shard, draw_interval_s=draw_interval_s)
    if not sims.evses and not sims.meters and shard == (0, 1):
        log.error("nothing to simulate: no Modbus EVSE or meter with a simulator in the configuration",
                  skipped=sims.skipped)
        return 1
    await sims.start()
    if use_bus:
        bus = sim_bus(config)
        await bus.start()
        await sims.attach_bus(bus)
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        await sims.stop()
    return 0
