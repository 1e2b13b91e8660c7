"""The poller: every Modbus EVSE and meter of the configuration, polled concurrently.

Each device runs its own loop at its poll interval (default ``poller.poll_interval_s``, 1 s);
devices behind one endpoint share a link whose lock serialises their requests. Results go to a
:class:`Publisher` (the bus in the service, a list in tests and the benchmark).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import zlib
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import structlog

from chargegate import payloads as p
from chargegate import setpoints
from chargegate.config import Config, Evse, Meter
from chargegate.files import write_private
from chargegate.ratelog import LogLimiter
from chargegate.supervise import Tasks
from evse_poller import logic
from evse_poller.device import DeviceError, EvseDevice, MeterDevice
from evse_poller.profile import ProfileError, load_profile
from evse_poller.transport import LinkPool, resolve

SLOTS = 4  # poll time slots per interval


def _grid_ceil(t: float, interval: float, offset: float) -> float:
    """The first time ``>= t`` (within a microsecond) of the grid ``offset + k * interval``."""
    k = math.ceil((t - offset) / interval - 1e-6)
    return offset + k * interval


class Publisher(Protocol):
    def evse_status(self, status: p.EvseStatus) -> None: ...
    def meter_reading(self, reading: p.MeterReading) -> None: ...
    def command_result(self, result: p.EvseCommandResult) -> None: ...


class MemoryPublisher:
    """Keeps what would be published (tests, benchmark)."""

    def __init__(self) -> None:
        self.statuses: dict[str, p.EvseStatus] = {}
        self.readings: dict[str, p.MeterReading] = {}
        self.results: list[p.EvseCommandResult] = []
        self.count = 0

    def evse_status(self, status: p.EvseStatus) -> None:
        self.statuses[status.evse_id] = status
        self.count += 1

    def meter_reading(self, reading: p.MeterReading) -> None:
        self.readings[reading.meter_id] = reading
        self.count += 1

    def command_result(self, result: p.EvseCommandResult) -> None:
        self.results.append(result)

    def clear_evse(self, evse_id: str) -> None:
        self.statuses.pop(evse_id, None)

    def clear_meter(self, meter_id: str) -> None:
        self.readings.pop(meter_id, None)


class Poller:
    def __init__(self, config: Config, publisher: Publisher, log: Any = None,
                 counters: Counter[str] | None = None, state_dir: Path | None = None,
                 tasks: Tasks | None = None, name: str = "evse-poller") -> None:
        self.config = config
        self.tasks = tasks or Tasks(log=log)
        self.settings = config.poller
        self.publisher = publisher
        self.log = log or structlog.get_logger("evse-poller")
        self.error_log = LogLimiter(self.log)  # a crashing poll: once per device, error type and minute
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.pool = LinkPool(self.settings.reconnect_backoff_max_s)
        self.evses: dict[str, EvseDevice] = {}
        self.meters: dict[str, MeterDevice] = {}
        self.broken: dict[str, str] = {}  # device id -> why it cannot be polled
        self._apply_tasks: set[asyncio.Task[None]] = set()
        self._published: dict[str, object] = {}
        self._published_at: dict[str, float] = {}  # EVSE id -> monotonic time of its last published status
        self._control_file = (state_dir or config.state_dir) / name / "control.json"  # per instance
        self._running = False
        self.polls = 0  # device polls so far (benchmark)
        self._device_tasks: dict[str, asyncio.Task[None]] = {}  # "evse:<id>" / "meter:<id>"
        controls = self._load_controls()
        for evse in config.evses:
            if evse.modbus is not None:
                self._add_evse(evse, controls)
        for meter in config.meters:
            self._add_meter(meter)

    def _add_evse(self, evse: Evse, controls: dict[str, logic.Control]) -> EvseDevice | None:
        assert evse.modbus is not None
        try:
            prof = load_profile(evse.modbus.profile)
            target = resolve(evse.modbus, prof)
            link = self.pool.get(target.endpoint)
            dev = self.evses[evse.id] = EvseDevice(evse, prof, link, target, self.settings, self.counters, self.log,
                                                   control=controls.get(evse.id))
            return dev
        except (ProfileError, DeviceError, ValueError) as e:
            self._broken(evse.id, "evse", e)
            return None

    def _add_meter(self, meter: Meter) -> MeterDevice | None:
        try:
            prof = load_profile(meter.modbus.profile)
            target = resolve(meter.modbus, prof)
            link = self.pool.get(target.endpoint)
            dev = self.meters[meter.id] = MeterDevice(meter, prof, link, target, self.settings, self.counters,
                                                      self.log)
            return dev
        except (ProfileError, DeviceError, ValueError) as e:
            self._broken(meter.id, "meter", e)
            return None

    # -- live configuration ------------------------------------------------------------------------
    async def reconfigure(self, config: Config) -> bool:
        """Apply ``config`` device by device: new EVSEs and meters are polled, removed ones stop (their
        retained state is cleared), changed ones start over (keeping the EVSE's setpoint), the others go on
        untouched. False when the poller settings changed: then the caller starts a new poller."""
        if config.poller != self.config.poller or config.state_dir != self.config.state_dir:
            return False
        old_e = {e.id: e for e in self.config.evses if e.modbus is not None}
        new_e = {e.id: e for e in config.evses if e.modbus is not None}
        old_m = {m.id: m for m in self.config.meters}
        new_m = {m.id: m for m in config.meters}
        all_evses = {e.id for e in config.evses}
        setpoints: dict[str, p.Setpoint] = {}
        changed: list[str] = []
        for i, e in old_e.items():
            if new_e.get(i) != e:
                dev = self.evses.get(i)
                if dev is not None and dev.setpoint is not None and i in new_e:
                    setpoints[i] = dev.setpoint
                await self._drop("evse", i, clear=i not in all_evses)
                changed.append(f"evse {i}")
        for i, m in old_m.items():
            if new_m.get(i) != m:
                await self._drop("meter", i, clear=i not in new_m)
                changed.append(f"meter {i}")
        self.config = config
        controls = self._load_controls()
        for i, e in new_e.items():
            if old_e.get(i) != e:
                dev = self._add_evse(e, controls)
                if dev is not None:
                    if i in setpoints:
                        dev.setpoint = setpoints[i]
                    self._start(dev)
                elif self._running:
                    self.publish_broken(only=i)
                changed.append(f"evse {i}")
        for i, m in new_m.items():
            if old_m.get(i) != m:
                mdev = self._add_meter(m)
                if mdev is not None:
                    self._start(mdev)
                elif self._running:
                    self.publish_broken(only=i)
                changed.append(f"meter {i}")
        used = {d.link for d in [*self.evses.values(), *self.meters.values()]}
        for endpoint, link in list(self.pool.links.items()):
            if link not in used:
                link.close()
                del self.pool.links[endpoint]
        if changed:
            self.log.info("poller reconfigured", changes=sorted(set(changed)), evses=len(self.evses),
                          meters=len(self.meters))
        return True

    async def _drop(self, kind: str, ident: str, clear: bool) -> None:
        task = self._device_tasks.pop(f"{kind}:{ident}", None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        (self.evses if kind == "evse" else self.meters).pop(ident, None)  # type: ignore[attr-defined]
        self.broken.pop(ident, None)
        self._published.pop(ident if kind == "evse" else f"meter:{ident}", None)
        self._published_at.pop(ident if kind == "evse" else f"meter:{ident}", None)
        if clear:
            clearer = getattr(self.publisher, f"clear_{kind}", None)
            if clearer is not None:
                clearer(ident)

    def _start(self, dev: EvseDevice | MeterDevice) -> None:
        if self._running:
            kind = "evse" if isinstance(dev, EvseDevice) else "meter"
            self._device_tasks[f"{kind}:{dev.id}"] = self.tasks.spawn(f"poll:{kind}:{dev.id}", lambda: self._loop(dev),
                                                                      **{kind: dev.id})

    def _broken(self, ident: str, kind: str, e: Exception) -> None:
        self.broken[ident] = f"{kind} {ident}: {e}"
        self.counters["devices_misconfigured"] += 1
        self.log.error("device cannot be polled (configuration)", **{kind: ident}, error=str(e))

    # -- control state persistence (remote stop / availability survive restarts) -------------
    def _load_controls(self) -> dict[str, logic.Control]:
        try:
            data = json.loads(self._control_file.read_text())
            return {k: logic.Control(enabled=bool(v.get("enabled", True)), paused=bool(v.get("paused", False)))
                    for k, v in data.items() if isinstance(v, dict)}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as e:
            self.log.warning("ignoring unreadable control state", file=str(self._control_file), error=str(e))
            return {}

    def _save_controls(self) -> None:
        data = {k: {"enabled": d.control.enabled, "paused": d.control.paused} for k, d in self.evses.items()
                if d.control != logic.Control()}
        try:
            write_private(self._control_file, json.dumps(data, indent=1))
        except OSError as e:
            self.log.error("cannot store control state", file=str(self._control_file), error=str(e))

    # -- polling -----------------------------------------------------------------------------
    def status_refresh_s(self, dev: EvseDevice) -> float:
        """How long ``dev``'s unchanged status may go unpublished (:func:`logic.status_refresh_s`)."""
        return logic.status_refresh_s(interval_s=dev.interval_s, timeout_s=dev.target.timeout_s,
                                      retries=dev.target.retries,
                                      offline_after_failures=self.settings.offline_after_failures,
                                      evse_timeout_s=self.config.controller.evse_timeout_s)

    def _publish_evse(self, status: p.EvseStatus, dev: EvseDevice | None = None, force: bool = False) -> None:
        """Publish a poll's status when it says something new or the last one is due for a refresh
        (:func:`logic.should_publish`); ``force``: in any case."""
        ident = status.evse_id
        last = self._published.get(ident)
        if last is status:
            return  # a transient failure: the last status stays as it was
        now = time.monotonic()
        if not force and dev is not None and isinstance(last, p.EvseStatus) and not logic.should_publish(
                last, status, last_at=self._published_at.get(ident), now=now, refresh_s=self.status_refresh_s(dev),
                interval_s=dev.interval_s):
            self.counters["statuses_unchanged"] += 1
            return
        self._published[ident] = status
        self._published_at[ident] = now
        self.publisher.evse_status(status)

    def _publish_meter(self, reading: p.MeterReading) -> None:
        if self._published.get("meter:" + reading.meter_id) is reading:
            return
        self._published["meter:" + reading.meter_id] = reading
        self.publisher.meter_reading(reading)

    async def poll_evse(self, dev: EvseDevice, force: bool = False) -> None:
        self.polls += 1
        self._publish_evse(await dev.poll(), dev, force)

    async def poll_meter(self, dev: MeterDevice) -> None:
        self.polls += 1
        self._publish_meter(await dev.poll())

    async def poll_once(self) -> float:
        """Poll every device once, concurrently, and publish every status (the devices' own loops publish
        only what changed, and refreshes). Returns the wall time in seconds."""
        t0 = time.perf_counter()
        await asyncio.gather(*(self.poll_evse(d, force=True) for d in self.evses.values()),
                             *(self.poll_meter(d) for d in self.meters.values()))
        return time.perf_counter() - t0

    def publish_broken(self, only: str | None = None) -> None:
        for ident, why in self.broken.items():
            if only is not None and ident != only:
                continue
            if any(e.id == ident for e in self.config.evses):
                self.publisher.evse_status(p.EvseStatus(evse_id=ident, online=False, state=p.EvseState.OFFLINE,
                                                        reason=why, source="evse-poller"))
            else:
                self.publisher.meter_reading(p.MeterReading(meter_id=ident, online=False, reason=why))

    async def _loop(self, dev: EvseDevice | MeterDevice) -> None:
        loop = asyncio.get_running_loop()
        iv = dev.interval_s
        # Every device polls in a fixed one of SLOTS time slots per interval (by its id), on a grid common to all
        # devices: the devices of a slot wake up together, their requests go out together and their answers come
        # in together. Spread one by one over the interval instead, every poll costs a wake-up of its own with
        # cold caches - about twice the CPU per poll (bench/poller).
        offset = zlib.crc32(dev.id.encode()) % SLOTS * iv / SLOTS
        due = _grid_ceil(loop.time(), iv, offset)
        while True:
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                if isinstance(dev, EvseDevice):
                    await self.poll_evse(dev)
                else:
                    await self.poll_meter(dev)
            except Exception as e:  # a bug must not stop the other devices
                self.counters["poll_errors"] += 1
                self.error_log.error(f"{dev.id}:{type(e).__name__}", "poll crashed", subject="devices", device=dev.id,
                                     error=repr(e), exc_info=e)
            # the device's next slot at least one interval after this poll was due; at once when the poll took
            # longer than that (a device that does not answer fails as often as before, and a slow bus polls back
            # to back); never more often than once per interval
            due = _grid_ceil(due + iv, iv, offset)
            now = loop.time()
            if due < now:
                due = now

    async def run(self) -> None:
        """Poll until cancelled (devices added by :meth:`reconfigure` join in)."""
        self.publish_broken()
        self._running = True
        for d in [*self.evses.values(), *self.meters.values()]:
            self._start(d)
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    async def stop(self) -> None:
        self._running = False
        tasks = [*self._device_tasks.values(), *self._apply_tasks]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._device_tasks.clear()
        self.pool.close()

    # -- bus input ---------------------------------------------------------------------------
    def set_setpoint(self, sp: p.Setpoint) -> bool:
        """A new setpoint for one of our EVSEs; applied at once. False when it is not ours."""
        dev = self.evses.get(sp.evse_id)
        if dev is None:
            return False
        old = dev.setpoint
        now = datetime.now(UTC)
        if setpoints.clamped(sp, now):
            self.counters["setpoints_from_the_future"] += 1
            self.log.warning("setpoint dated in the future: taken as of now", evse=sp.evse_id, ts=sp.ts.isoformat(),
                             valid_until=sp.valid_until.isoformat())
        sp = setpoints.on_arrival(sp, now, self.config.controller.setpoint_validity_s)
        # a late duplicate from the same source (older timestamp and sequence) must not undo a newer one;
        # a restarted controller counts from 0 again but with a newer timestamp, so it is accepted
        if setpoints.out_of_order(sp, old, now):
            self.counters["setpoints_out_of_order"] += 1
            self.log.warning("older setpoint ignored", evse=sp.evse_id, seq=sp.seq, current_seq=old.seq)
            return True
        dev.setpoint = sp
        self.counters["setpoints_received"] += 1
        # eager: the write goes out now, not after the rest of a burst of setpoints has been handed over
        task = self.tasks.oneshot(f"apply-now:{dev.id}", dev.apply_now(), eager=True, evse=dev.id)
        self._apply_tasks.add(task)
        task.add_done_callback(self._apply_tasks.discard)
        return True

    async def command(self, cmd: p.EvseCommand) -> p.EvseCommandResult | None:
        dev = self.evses.get(cmd.evse_id)
        if dev is None:
            return None
        accepted, detail = await dev.command(cmd)
        self.counters[f"commands_{'accepted' if accepted else 'rejected'}"] += 1
        self.log.info("command carried out" if accepted else "command rejected", evse=cmd.evse_id,
                      action=cmd.action.value, request_id=cmd.request_id, detail=detail)
        if accepted:
            self._save_controls()
        result = p.EvseCommandResult(evse_id=cmd.evse_id, request_id=cmd.request_id, accepted=accepted,
                                     detail=detail)
        if accepted and dev.online:
            # the new state at once, and before the result: ocpp-gateway bills a remote stop with the energy
            # register of the last status it has when the result comes
            with contextlib.suppress(Exception):
                await self.poll_evse(dev, force=True)
        self.publisher.command_result(result)
        return result
