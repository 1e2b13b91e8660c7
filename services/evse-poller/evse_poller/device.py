"""One polled device (an EVSE or a meter): the Modbus I/O around the pure logic.

A device reads its registers through its link, evaluates them with :mod:`evse_poller.logic`,
and (EVSEs) writes the current the logic decides. It counts consecutive failures, goes offline
after ``offline_after_failures`` with the reason (logged once), and comes back online with a
fresh initialisation (watchdog, failsafe current, init writes) when it answers again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any, Literal

import structlog

from chargegate import log as logsetup
from chargegate import payloads as p
from chargegate.config import Evse, Meter
from chargegate.config.poller import Poller as PollerSettings
from chargegate.ratelog import LogLimiter
from evse_poller import logic
from evse_poller.profile import Profile
from evse_poller.registers import ReadBlock, encode_raw, encode_value, extract, plan_reads
from evse_poller.transport import DeviceRejected, Link, LinkError, Target

SUNSPEC_MARKER = [0x5375, 0x6E53]  # "SunS"


class DeviceError(Exception):
    """The device cannot be used (its configuration or profile does not fit it)."""


class _Base:
    kind: str

    def __init__(self, ident: str, profile: Profile, link: Link, target: Target, settings: PollerSettings,
                 counters: Counter[str], log: Any, interval_s: float | None) -> None:
        self.id = ident
        self.profile = profile
        self.link = link
        self.target = target
        self.settings = settings
        self.counters = counters
        self.log = log or structlog.get_logger("evse-poller")
        self.interval_s = interval_s or settings.poll_interval_s
        self.limits = logic.Limits(settings.max_current_a, settings.meter_max_current_a)
        self.lock = asyncio.Lock()
        self.online = False
        self.ever_online = False
        self.failures = 0
        self.reason: str | None = "not polled yet"
        self.offline_since: float | None = None
        self._init_generation = -1
        self._offset = 0  # SunSpec model start
        # each warning once while remembered, at most 64 kinds per device (keys may carry error texts)
        self._warned = LogLimiter(self.log, interval_s=math.inf, max_keys=64)
        self._offline_warned = False
        self.last_poll_s = 0.0
        self._reads: list[ReadBlock] = []
        self._last_request: float | None = None

    # -- helpers -----------------------------------------------------------------------------
    def _warn_once(self, key: str, msg: str, **kw: Any) -> None:
        self._warned.warning(key, msg, **{self.kind: self.id, **kw})  # kw may name the device again

    async def _read_blocks(self, blocks: list[ReadBlock]) -> dict[tuple[Any, int], list[int]]:
        out: dict[tuple[Any, int], list[int]] = {}
        t = self.target
        opts = self.profile.read
        idle = self._last_request is None or time.monotonic() - self._last_request > opts.idle_s
        wake = opts.repeat - 1 if idle else 0
        for b in blocks:
            words: list[int] | None = None
            last_error: Exception | None = None
            for attempt in range(t.retries + 1):
                try:
                    for _ in range(wake):  # wake-up request of devices that sleep on an idle bus
                        try:
                            await self.link.read(b.table, b.address, b.count, t.device_id, t.timeout_s)
                        except DeviceRejected:
                            raise
                        except LinkError:
                            pass
                    words = await self.link.read(b.table, b.address, b.count, t.device_id, t.timeout_s)
                    break
                except DeviceRejected:
                    raise
                except LinkError as e:
                    last_error = e
                    if attempt < t.retries and self.link.connected:
                        continue
                    break
            if words is None:
                assert last_error is not None
                raise last_error
            out[(b.table, b.address)] = words
            self._last_request = time.monotonic()
        return out

    async def _write(self, name: str, words: list[int]) -> None:
        reg = self.profile.registers[name]
        t = self.target
        last: LinkError | None = None
        for _ in range(t.retries + 1):
            try:
                await self.link.write(reg.table, reg.address + self._offset, words, t.device_id, t.timeout_s,
                                      multiple=self.profile.write_multiple)
                self.counters["modbus_writes"] += 1
                return
            except DeviceRejected:
                self.counters["modbus_writes_rejected"] += 1
                raise
            except LinkError as e:
                last = e
                if not self.link.connected:
                    break
        assert last is not None
        raise last

    def _failed(self, error: Exception) -> None:
        self.failures += 1
        self.counters[f"{self.kind}_poll_failures"] += 1
        reason = str(error) or type(error).__name__
        if self.online or not self.ever_online:
            if self.failures >= self.settings.offline_after_failures:
                was_online = self.online
                self.online = False
                self.reason = reason
                self.offline_since = time.monotonic()
                self.counters[f"{self.kind}_offline_events"] += 1
                if was_online or not self._offline_warned:
                    self._offline_warned = True
                    self.log.warning("device offline", **{self.kind: self.id}, reason=reason,
                                     failures=self.failures, endpoint=self.target.endpoint.describe(),
                                     device_id=self.target.device_id)
            else:
                self.log.debug("poll failed", **{self.kind: self.id}, reason=reason, failures=self.failures)
        else:
            self.reason = reason

    def _succeeded(self) -> None:
        if not self.online:
            if self.ever_online or self._offline_warned:
                down = time.monotonic() - self.offline_since if self.offline_since else None
                self.log.info("device back online", **{self.kind: self.id},
                              offline_s=round(down, 1) if down is not None else None)
            else:
                self.log.info("device online", **{self.kind: self.id}, endpoint=self.target.endpoint.describe(),
                              device_id=self.target.device_id, profile=self.profile.name)
            self._offline_warned = False
        self.online = True
        self.ever_online = True
        self.failures = 0
        self.reason = None
        self.offline_since = None

    async def _discover_sunspec(self) -> None:
        ss = self.profile.sunspec
        if ss is None:
            return
        t = self.target
        for base in ss.base_addresses:
            try:
                head = await self.link.read("holding", base, 2, t.device_id, t.timeout_s)
            except DeviceRejected:
                continue
            if head != SUNSPEC_MARKER:
                continue
            addr = base + 2
            for _ in range(64):
                mid, length = await self.link.read("holding", addr, 2, t.device_id, t.timeout_s)
                if mid == 0xFFFF:
                    break
                if mid == ss.model:
                    self._offset = addr
                    return
                addr += 2 + length
            raise DeviceError(f"SunSpec model {ss.model} not found in the device's model chain at {base}")
        raise DeviceError(f"no SunSpec marker at {ss.base_addresses}")


class EvseDevice(_Base):
    kind = "evse"

    def __init__(self, evse: Evse, profile: Profile, link: Link, target: Target, settings: PollerSettings,
                 counters: Counter[str], log: Any = None, control: logic.Control | None = None) -> None:
        assert evse.modbus is not None
        super().__init__(evse.id, profile, link, target, settings, counters, log, evse.modbus.poll_interval_s)
        if profile.kind != "evse":
            raise DeviceError(f"profile {profile.name} is a {profile.kind} profile, not an EVSE profile")
        problem = profile.safe_current_problem(evse.safe_current_a)
        if problem is not None:
            raise DeviceError(f"safe_current_a: {problem}")
        self.evse = evse
        self.control = control or logic.Control()
        self.setpoint: p.Setpoint | None = None
        self.memory = logic.EvseMemory()
        self.applied: p.AppliedSetpoint | None = None
        self.last_target: logic.Target | None = None
        self._last_words: list[int] | None = None
        self._last_write_at: float | None = None
        self._phases: Literal[1, 3] = evse.phases
        self._keepalive_at: float | None = None
        self._in_fallback: bool | None = None
        self.last_status: p.EvseStatus | None = None
        # the car's stay as the poller saw it: when it arrived and the energy register then, so that a session
        # begun while ocpp-gateway was not running is still billed from the plug-in (status.session)
        self.session: p.Session | None = None
        names = [n for n in logic_names(profile, "evse") if n in profile.registers]
        if profile.watchdog is not None and profile.watchdog.remaining_register is not None:
            names.append(profile.watchdog.remaining_register)
        self._reads = plan_reads(profile, names)
        self._remaining_s: float | None = None
        self._last_ok: float | None = None
        self.watchdog_s = settings.watchdog_timeout_s
        wd = profile.watchdog
        if wd is not None and wd.timeout_register is not None:
            lo, hi = wd.timeout_min_s or 0.0, wd.timeout_max_s or float("inf")
            clamped = min(max(self.watchdog_s, lo), hi)
            if clamped != self.watchdog_s:
                self.log.warning("watchdog timeout adjusted to what the device accepts", evse=self.id,
                                 wanted_s=self.watchdog_s, programmed_s=clamped)
                self.watchdog_s = clamped

    @property
    def can_switch_phases(self) -> bool:
        return self.profile.phases is not None and self.evse.phase_switching

    # -- initialisation after (re)connect ----------------------------------------------------
    async def _ensure_init(self) -> None:
        generation = await self.link.connect()
        if self._init_generation == generation and self.online:
            return
        prof = self.profile
        wd = prof.watchdog
        if wd is not None and wd.timeout_register is not None:
            reg = prof.registers[wd.timeout_register]
            await self._init_write(wd.timeout_register, encode_value(prof, reg, self.watchdog_s))
        if wd is not None and wd.failsafe_register is not None:
            reg = prof.registers[wd.failsafe_register]
            # the range was checked when the device was set up (profile.safe_current)
            await self._init_write(wd.failsafe_register, encode_value(prof, reg, self.evse.safe_current_a))
        for w in prof.init:
            await self._init_write(w.reg, encode_raw(prof, prof.registers[w.reg], w.value))
        if prof.enable is not None and not self.control.enabled:
            await self._init_write(prof.enable.reg, encode_raw(prof, prof.registers[prof.enable.reg],
                                                               prof.enable.inoperative))
        # the device may have restarted: write the setpoint again
        self._last_words = None
        self._keepalive_at = None
        self._init_generation = generation

    async def _init_write(self, name: str, words: list[int]) -> None:
        try:
            await self._write(name, words)
        except DeviceRejected as e:
            self._warn_once(f"init:{name}", "device refused an initialisation write", register=name, error=str(e))

    # -- polling -----------------------------------------------------------------------------
    async def poll(self) -> p.EvseStatus:
        t0 = time.perf_counter()
        async with self.lock:
            try:
                await self._ensure_init()
                words = await self._read_blocks(self._reads)
                values, errors = extract(self.profile, words, self._reads)
                for e in errors:
                    self._warn_once(f"decode:{e}", "register value could not be decoded", error=e)
                now = time.monotonic()
                wd = self.profile.watchdog
                if wd is not None and wd.remaining_register is not None:
                    rem = values.get(wd.remaining_register)
                    self._remaining_s = float(rem) if isinstance(rem, int | float) else None
                if self._last_ok is not None and now - self._last_ok > 0.8 * self.watchdog_s:
                    # silent for about a watchdog period: the device may sit on its failsafe; rewrite
                    self._last_words = None
                await self._apply_locked(now)
                self._last_ok = now
            except (LinkError, DeviceError) as e:
                self._failed(e)
                self.last_poll_s = time.perf_counter() - t0
                if not self.online:
                    self.last_status = self._offline_status()
                    return self.last_status
                assert self.last_status is not None or not self.ever_online
                return self.last_status or self._offline_status()
            self._succeeded()
        reading, self.memory = logic.evaluate_evse(
            self.profile, values, self.memory, now=time.monotonic(),
            offered_a=self.applied.current_a if self.applied else 0.0,
            offered_phases=self.applied.phases if self.applied else self.evse.phases,
            enabled=self.control.enabled, limits=self.limits, evse_phases=self.evse.phases)
        if not reading.plausible:
            self.counters["implausible_readings"] += 1
            self._warn_once(f"implausible:{','.join(reading.flags)}", "implausible values, not trusted",
                            flags=reading.flags, raw_state=reading.raw_state)
        self._track_session(reading)
        self.last_status = p.EvseStatus(
            evse_id=self.id, online=True, state=reading.state, iec_state=reading.iec, raw_state=reading.raw_state,
            phases_in_use=reading.phases_in_use, current_a=reading.current_a, power_w=reading.power_w,
            energy_wh=reading.energy_wh, session=self.session, applied=self.applied, plausible=reading.plausible,
            flags=reading.flags, reason=reading.reason, source="evse-poller")
        self.last_poll_s = time.perf_counter() - t0
        return self.last_status

    def _track_session(self, reading: logic.EvseReading) -> None:
        """A car arrived (IEC B/C/D): remember when and the energy register; it left (A): forget it."""
        if reading.iec is p.IecState.A:
            self.session = None
            return
        if reading.iec not in (p.IecState.B, p.IecState.C, p.IecState.D) or reading.energy_wh is None:
            return  # E/F, an unknown state or no energy register: keep what we have
        if self.session is None:
            self.session = p.Session(id=uuid.uuid4().hex, started=datetime.now(UTC),
                                     energy_start_wh=reading.energy_wh, energy_wh=0.0)
        elif self.session.energy_start_wh is not None:
            self.session = self.session.model_copy(
                update={"energy_wh": max(0.0, reading.energy_wh - self.session.energy_start_wh)})

    def _offline_status(self) -> p.EvseStatus:
        return p.EvseStatus(evse_id=self.id, online=False, state=p.EvseState.OFFLINE, applied=self.applied,
                            plausible=True, reason=self.reason, source="evse-poller")

    # -- setpoints and commands --------------------------------------------------------------
    def decide(self, now: datetime | None = None) -> logic.Target:
        assert self.profile.current is not None
        return logic.decide_target(self.setpoint, now or datetime.now(UTC), self.evse, self.control,
                                   self.profile.current, can_switch_phases=self.can_switch_phases,
                                   current_phases=self._phases)

    async def apply_now(self) -> None:
        """Apply the current decision at once (a new setpoint or command); errors go to the next poll."""
        if not self.online:
            return
        async with self.lock:
            before = self.applied.current_a if self.applied is not None else None
            try:
                await self._apply_locked(time.monotonic())
            except LinkError as e:
                self.log.debug("immediate setpoint write failed", evse=self.id, error=str(e))
                if before is not None and self.decide().current_a < before - 1e-9:
                    # a reduction that did not reach the device: it runs on its old current, out of our
                    # control - report it offline now (the load controller then counts it at what it was
                    # allowed before) rather than after offline_after_failures polls
                    self.failures = max(self.failures, self.settings.offline_after_failures - 1)
                    self._failed(e)

    async def _apply_locked(self, now: float) -> None:
        prof = self.profile
        cc = prof.current
        assert cc is not None
        target = self.decide()
        if self._in_fallback is not target.fallback:
            if target.fallback:
                self.log.warning("no valid setpoint, applying the safe current", evse=self.id,
                                 safe_current_a=self.evse.safe_current_a, reason=target.reason)
                self.counters["fallbacks"] += 1
            elif self._in_fallback is not None:
                self.log.info("setpoint valid again", evse=self.id, seq=target.seq)
            self._in_fallback = target.fallback
        writes, applied_a = logic.current_writes(prof, target.current_a)
        words = [w for _, ws in writes for w in ws]  # what was applied, to compare with the last write
        wrote = False
        expiring = self._remaining_s is not None and self._remaining_s <= 2 * self.interval_s + 1
        if expiring or logic.needs_write(words, self._last_words, self._last_write_at, now, cc.refresh_s):
            self._remaining_s = None
            try:
                for name, ws in writes:
                    await self._write(name, ws)
            except DeviceRejected as e:
                self._warn_once(f"setpoint:{words}", "device refused the current setpoint", evse=self.id,
                                current_a=target.current_a, error=str(e))
            else:
                changed = words != self._last_words
                self._last_words, self._last_write_at = words, now
                wrote = True
                self.counters["setpoint_writes"] += 1
                if changed and logsetup.enabled(logging.INFO):  # (asked first: see chargegate.log.enabled)
                    self.log.info("current limit written", evse=self.id, current_a=applied_a, phases=target.phases,
                                  reason=target.reason, seq=target.seq)
        if self.can_switch_phases and prof.phases is not None and target.phases != self._phases:
            raw = prof.phases.values[target.phases]
            try:
                await self._write(prof.phases.reg, encode_raw(prof, prof.registers[prof.phases.reg], raw))
                self.log.info("phase count switched", evse=self.id, phases=target.phases)
                self._phases = target.phases
            except DeviceRejected as e:
                self._warn_once("phases", "device refused the phase switch", evse=self.id, error=str(e))
        if wrote or self.applied is None or self.last_target != target:
            if self._last_words == words:
                # built from values checked already (the validated setpoint, the profile's encoding): not validated
                # again, once per setpoint written
                self.applied = p.AppliedSetpoint.model_construct(current_a=applied_a, phases=self._phases,
                                                                 seq=target.seq, source=target.source,
                                                                 fallback=target.fallback)
        self.last_target = target
        await self._keepalive(now)

    async def _keepalive(self, now: float) -> None:
        wd = self.profile.watchdog
        if wd is None or wd.keepalive is None:
            return
        every = wd.keepalive.every_s or self.watchdog_s / 3
        if self._keepalive_at is not None and now - self._keepalive_at < every:
            return
        ka = wd.keepalive
        reg = self.profile.registers[ka.reg]
        words = (encode_value(self.profile, reg, self.watchdog_s) if ka.value == "timeout"
                 else encode_raw(self.profile, reg, ka.value))
        await self._write(ka.reg, words)
        self._keepalive_at = now

    async def command(self, cmd: p.EvseCommand) -> tuple[bool, str]:
        """Carry out a backend command. Returns (accepted, detail)."""
        if not self.online:
            return False, f"device offline: {self.reason}"
        before = self.control
        if cmd.action is p.EvseCommandAction.ENABLE:
            self.control = logic.Control(enabled=True, paused=before.paused)
        elif cmd.action is p.EvseCommandAction.DISABLE:
            self.control = logic.Control(enabled=False, paused=before.paused)
        elif cmd.action is p.EvseCommandAction.STOP:
            self.control = logic.Control(enabled=before.enabled, paused=True)
        else:  # start
            if not before.enabled:
                return False, "the EVSE is disabled (inoperative)"
            self.control = logic.Control(enabled=True, paused=False)
        prof = self.profile
        try:
            async with self.lock:
                if prof.enable is not None and before.enabled != self.control.enabled:
                    raw = prof.enable.operative if self.control.enabled else prof.enable.inoperative
                    await self._write(prof.enable.reg, encode_raw(prof, prof.registers[prof.enable.reg], raw))
                await self._apply_locked(time.monotonic())
        except LinkError as e:
            self.control = before
            return False, f"write failed: {e}"
        target = self.last_target
        detail = f"{cmd.action.value}: limit {self.applied.current_a if self.applied else 0:g} A"
        if target is not None:
            detail += f" ({target.reason})"
        return True, detail


class MeterDevice(_Base):
    kind = "meter"

    def __init__(self, meter: Meter, profile: Profile, link: Link, target: Target, settings: PollerSettings,
                 counters: Counter[str], log: Any = None) -> None:
        super().__init__(meter.id, profile, link, target, settings, counters, log, meter.modbus.poll_interval_s)
        if profile.kind != "meter":
            raise DeviceError(f"profile {profile.name} is an {profile.kind} profile, not a meter profile")
        self.meter = meter
        self.memory = logic.MeterMemory()
        self.last_reading: p.MeterReading | None = None
        self._names = [n for n in logic_names(profile, "meter") if n in profile.registers]
        self._reads = plan_reads(profile, self._names) if profile.http is None else []

    async def _ensure_init(self) -> None:
        generation = await self.link.connect()
        if self._init_generation == generation and self.online:
            return
        if self.profile.sunspec is not None:
            await self._discover_sunspec()
            self._reads = plan_reads(self.profile, self._names, offset=self._offset)
        self._init_generation = generation

    async def _read_http(self) -> tuple[dict[str, Any], list[str]]:
        """Every request of the profile's ``http`` section, retried like a Modbus read."""
        from evse_poller.httpjson import extract_json

        spec = self.profile.http
        assert spec is not None
        t = self.target
        docs: dict[str, Any] = {}
        for name, req in spec.requests.items():
            last: LinkError | None = None
            for _ in range(t.retries + 1):
                try:
                    docs[name] = await self.link.get_json(req.path, t.timeout_s, spec.max_body_bytes)
                    break
                except DeviceRejected:
                    raise
                except LinkError as e:
                    last = e
            if name not in docs:
                assert last is not None
                raise last
        self._last_request = time.monotonic()
        return extract_json(self.profile, docs)

    async def poll(self) -> p.MeterReading:
        t0 = time.perf_counter()
        async with self.lock:
            try:
                await self._ensure_init()
                if self.profile.http is not None:
                    values, errors = await self._read_http()
                else:
                    words = await self._read_blocks(self._reads)
                    values, errors = extract(self.profile, words, self._reads, offset=self._offset)
                for e in errors:
                    self._warn_once(f"decode:{e}", "register value could not be decoded", error=e)
            except (LinkError, DeviceError) as e:
                self._failed(e)
                self.last_poll_s = time.perf_counter() - t0
                if not self.online:
                    self.last_reading = p.MeterReading(meter_id=self.id, online=False, reason=self.reason)
                return self.last_reading or p.MeterReading(meter_id=self.id, online=False, reason=self.reason)
            self._succeeded()
        mv, self.memory = logic.evaluate_meter(values, self.memory, invert=self.meter.invert, limits=self.limits)
        if not mv.plausible:
            self.counters["implausible_readings"] += 1
            self._warn_once(f"implausible:{','.join(mv.flags)}", "implausible meter values, not trusted",
                            flags=mv.flags)
        self.last_reading = p.MeterReading(
            meter_id=self.id, online=True, current_a=mv.current_a, voltage_v=mv.voltage_v, power_w=mv.power_w,
            power_phase_w=mv.power_phase_w, energy_import_wh=mv.energy_import_wh,
            energy_export_wh=mv.energy_export_wh, plausible=mv.plausible, flags=mv.flags)
        self.last_poll_s = time.perf_counter() - t0
        return self.last_reading


def logic_names(profile: Profile, kind: str) -> list[str]:
    """The registers a poll reads: the measurements the logic uses (and the state)."""
    from evse_poller.profile import EVSE_POLLED, METER_MEASUREMENTS

    names = list(EVSE_POLLED if kind == "evse" else METER_MEASUREMENTS)
    extra: list[str] = [profile.state.reg, *profile.state.combine] if profile.state is not None else []
    for n in names:
        reg = profile.registers.get(n)
        if reg is not None and reg.scale_register is not None:
            extra.append(reg.scale_register)
    return names + extra
