"""The per-device decisions, as pure functions (no I/O, no clock: time is passed in).

* :func:`map_state` - raw state code -> IEC 61851 state and derived state.
* :func:`evaluate_evse` - decoded register values -> what the EVSE status says, with
  plausibility flags; implausible values are not trusted.
* :func:`decide_target` - the latest setpoint, the clock and the commands -> the current to apply.
* :func:`current_words` / :func:`needs_write` - what to write and whether to write it now.
* :func:`evaluate_meter` - decoded values -> a meter reading, with plausibility flags.
* :func:`grid_currents` - an EVSE's phase currents mapped onto the grid phases.
* :func:`status_changed` / :func:`status_refresh_s` / :func:`should_publish` - whether a poll's EVSE
  status goes on the bus.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Literal

from chargegate.config import Evse
from chargegate.payloads import MAX_ENERGY_WH, MAX_INT, EvseState, EvseStatus, IecState, Setpoint
from evse_poller.profile import CurrentControl, Profile
from evse_poller.registers import Value, encode_raw, encode_value, to_raw

NOMINAL_V = 230.0
MAX_V = 300.0
CURRENT_NOISE_A = 0.5  # below this a phase counts as not in use; small negatives are noise
ENERGY_SLACK_WH = 50.0
RESET_CONFIRMATIONS = 3


@dataclass(frozen=True)
class Limits:
    max_current_a: float = 80.0
    meter_max_current_a: float = 1000.0


# -- state mapping -----------------------------------------------------------------------------

@dataclass(frozen=True)
class StateInfo:
    iec: IecState | None
    derived: EvseState | None  # the profile's override, if any
    known: bool


def state_code(profile: Profile, values: dict[str, Value]) -> Value:
    """The raw state code of one poll: the state register's value or, with ``state.combine``, the
    values of the state register and the combined ones joined by '/' (None if any is missing)."""
    assert profile.state is not None
    raw = values.get(profile.state.reg)
    if not profile.state.combine:
        return raw
    parts = [raw, *(values.get(n) for n in profile.state.combine)]
    if any(v is None for v in parts):
        return None
    return "/".join(str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) for v in parts)


def map_state(profile: Profile, raw: Value) -> StateInfo:
    """Look the raw state code up in the profile (codes are compared as text)."""
    if profile.state is None or raw is None:
        return StateInfo(None, None, False)
    key = str(raw).strip()
    iec = profile.state.codes.get(key)
    if iec is None:
        return StateInfo(None, None, False)
    return StateInfo(iec, profile.state.derived.get(key), True)


def derive_state(info: StateInfo, *, offered_a: float, enabled: bool) -> EvseState:
    """The derived state from the IEC state, what the EVSE offers and the availability."""
    if not info.known or info.iec is None:
        return EvseState.FAULTED
    if info.iec in (IecState.E, IecState.F):
        return info.derived or EvseState.FAULTED
    if not enabled:
        return EvseState.UNAVAILABLE
    if info.derived is not None:
        return info.derived
    if info.iec is IecState.A:
        return EvseState.AVAILABLE
    if info.iec is IecState.B:
        return EvseState.PREPARING if offered_a > 0 else EvseState.SUSPENDED
    # C, D: the car asks for energy; with nothing offered (C1/D1) it is suspended by the EVSE
    return EvseState.CHARGING if offered_a > 0 else EvseState.SUSPENDED


# -- EVSE evaluation ---------------------------------------------------------------------------

@dataclass(frozen=True)
class EvseMemory:
    """What one evaluation hands to the next (last trusted values)."""

    energy_wh: float | None = None
    energy_at: float | None = None  # monotonic seconds of the trusted energy
    currents: tuple[float, float, float] | None = None
    backwards: tuple[float, ...] = ()  # consecutive readings below the trusted energy


@dataclass(frozen=True)
class EvseReading:
    iec: IecState | None
    state: EvseState
    raw_state: int | str | None
    phases_in_use: int
    current_a: list[float]
    power_w: float | None
    energy_wh: float | None
    plausible: bool
    flags: list[str] = field(default_factory=list)
    reason: str | None = None


def _num(v: Value) -> float | None:
    if v is None or isinstance(v, str):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def evaluate_evse(profile: Profile, values: dict[str, Value], memory: EvseMemory, *, now: float,
                  offered_a: float, offered_phases: int, enabled: bool, limits: Limits,
                  evse_phases: int = 3) -> tuple[EvseReading, EvseMemory]:
    """Turn one poll's decoded values into the EVSE's status fields.

    Implausible values are flagged and not trusted: a current above ``limits.max_current_a`` or
    below zero, negative power, an energy register that runs backwards or jumps further than the
    EVSE could have charged, a state code the profile does not know. An untrusted current is
    replaced by the last trusted one (or, without one, by what the EVSE was allowed while it
    charges): a device that cannot be read is assumed to draw what it was last allowed.
    """
    flags: list[str] = []
    reason: str | None = None
    assert profile.state is not None
    raw_state = state_code(profile, values)
    raw_out: int | str | None = raw_state if isinstance(raw_state, int | str) else None
    if isinstance(raw_state, float):
        raw_out = int(raw_state) if raw_state.is_integer() else str(raw_state)
    if isinstance(raw_out, int) and abs(raw_out) > MAX_INT:
        raw_out = str(raw_out)  # shown as it came; a number beyond 2**53 would not survive JSON readers
    if isinstance(raw_out, str):
        raw_out = raw_out[:64]
    info = map_state(profile, raw_state)
    if not info.known:
        flags.append("unknown_state")
        reason = f"unknown state code {raw_state!r}"
    state = derive_state(info, offered_a=offered_a, enabled=enabled)
    charging = info.iec in (IecState.C, IecState.D)

    # currents
    trusted_currents = True
    names = ("current_l1", "current_l2", "current_l3")
    measured = [name in profile.registers for name in names]
    raw_i = [_num(values.get(n)) for n in names]
    currents: list[float] = [0.0, 0.0, 0.0]
    if not any(measured) or all(x is None for x, m in zip(raw_i, measured, strict=True) if m):
        trusted_currents = False
        flags.append("current_not_measured")
    else:
        for i, (x, m) in enumerate(zip(raw_i, measured, strict=True)):
            if not m or x is None:
                continue
            if x < -CURRENT_NOISE_A or x > limits.max_current_a:
                trusted_currents = False
                flags.append(f"current_l{i + 1}_out_of_range")
            currents[i] = min(max(x, 0.0), 1000.0)
    if not trusted_currents:
        if memory.currents is not None and "current_not_measured" not in flags:
            currents = list(memory.currents)
        elif charging:
            allowed = min(max(offered_a, 0.0), limits.max_current_a)
            n = max(1, min(3, offered_phases or evse_phases))
            currents = [allowed if i < n else 0.0 for i in range(3)]
        else:
            currents = [0.0, 0.0, 0.0]
    phases_in_use = sum(1 for c in currents if c > CURRENT_NOISE_A) if charging else 0

    # power
    power = _num(values.get("power")) if "power" in profile.registers else None
    max_power = 3 * limits.max_current_a * MAX_V
    power_trusted = True
    if power is not None:
        if power < -50.0:
            flags.append("power_negative")
            power, power_trusted = None, False
        elif power > max_power:
            flags.append("power_out_of_range")
            power, power_trusted = None, False
        else:
            power = max(power, 0.0)

    # energy
    energy = _num(values.get("energy")) if "energy" in profile.registers else None
    new_mem = replace(memory, currents=tuple(currents) if trusted_currents else memory.currents)  # type: ignore[arg-type]
    energy_trusted = True
    if energy is not None:
        if energy < 0:
            flags.append("energy_negative")
            energy, energy_trusted = None, False
        elif energy > MAX_ENERGY_WH:
            flags.append("energy_out_of_range")
            energy, energy_trusted = None, False
        elif memory.energy_wh is not None and energy < memory.energy_wh - 0.5:
            seen = (*memory.backwards, energy)
            if len(seen) >= RESET_CONFIRMATIONS and all(b >= a for a, b in itertools.pairwise(seen)):
                # the register was reset (device replaced or firmware reset): the new count is the base
                flags.append("energy_reset")
                new_mem = replace(new_mem, energy_wh=energy, energy_at=now, backwards=())
            else:
                flags.append("energy_backwards")
                new_mem = replace(new_mem, backwards=seen[-RESET_CONFIRMATIONS:])
                energy, energy_trusted = None, False
        elif memory.energy_wh is not None and memory.energy_at is not None:
            dt_h = max(now - memory.energy_at, 0.0) / 3600.0
            possible = max_power * dt_h * 1.5 + ENERGY_SLACK_WH
            if energy - memory.energy_wh > possible:
                flags.append("energy_jump")
                energy, energy_trusted = None, False
            else:
                new_mem = replace(new_mem, energy_wh=energy, energy_at=now, backwards=())
        else:
            new_mem = replace(new_mem, energy_wh=energy, energy_at=now, backwards=())
    plausible = trusted_currents or flags == ["current_not_measured"]
    plausible = plausible and power_trusted and energy_trusted and info.known
    reading = EvseReading(iec=info.iec, state=state, raw_state=raw_out, phases_in_use=phases_in_use,
                          current_a=[round(c, 3) for c in currents], power_w=power, energy_wh=energy,
                          plausible=plausible, flags=flags, reason=reason)
    return reading, new_mem


# -- setpoints ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Control:
    """What the OCPP backend asked for: availability and remote start/stop."""

    enabled: bool = True  # ChangeAvailability operative / inoperative
    paused: bool = False  # RemoteStopTransaction until the next RemoteStartTransaction


@dataclass(frozen=True)
class Target:
    current_a: float  # per phase; 0 pauses charging
    phases: Literal[1, 3]
    fallback: bool
    seq: int | None
    source: str | None
    reason: str


def decide_target(setpoint: Setpoint | None, now: datetime, evse: Evse, control: Control,
                  cc: CurrentControl, *, can_switch_phases: bool, current_phases: Literal[1, 3] | None = None
                  ) -> Target:
    """The current to apply now.

    No setpoint, or an expired one (``valid_until``), gives the EVSE's ``safe_current_a`` with
    ``fallback`` set. Every value is capped by the EVSE's and the device's maximum; a value below
    the minimum the EVSE can deliver pauses charging (never rounded up).
    """
    phases: Literal[1, 3] = current_phases or evse.phases
    if not control.enabled:
        return Target(0.0, phases, False, None, "command", "disabled")
    if control.paused:
        return Target(0.0, phases, False, None, "command", "stopped")
    if setpoint is None or setpoint.expired(now):
        value = evse.safe_current_a
        why = "no setpoint" if setpoint is None else "setpoint expired"
        return _bounded(value, phases, True, None, None, why, evse, cc)
    if can_switch_phases and evse.phase_switching:
        phases = setpoint.phases
    return _bounded(setpoint.current_a, phases, False, setpoint.seq, setpoint.source, "setpoint", evse, cc)


def _bounded(value: float, phases: Literal[1, 3], fallback: bool, seq: int | None, source: str | None,
             why: str, evse: Evse, cc: CurrentControl) -> Target:
    if not math.isfinite(value) or value <= 0:
        return Target(0.0, phases, fallback, seq, source, why)
    cap = min(evse.max_current_a, cc.max_a)
    if value > cap:
        value, why = cap, f"{why} (capped at {cap:g} A)"
    floor = max(evse.min_current_a, cc.min_a)
    if value < floor:
        return Target(0.0, phases, fallback, seq, source, f"{why} (below minimum {floor:g} A: paused)")
    return Target(value, phases, fallback, seq, source, why)


def current_words(profile: Profile, target_a: float) -> tuple[list[int], float]:
    """The registers to write for ``target_a`` and the current they actually mean."""
    cc = profile.current
    assert cc is not None
    reg = profile.registers[cc.reg]
    if target_a <= 0:
        if cc.pause_raw is not None:
            return encode_raw(profile, reg, cc.pause_raw), 0.0
        target_a = cc.pause_a
    words = encode_value(profile, reg, target_a)
    applied = to_raw(reg, target_a) * reg.scale if reg.type.value.startswith(("uint", "int")) else target_a
    return words, math.floor(applied * 1000 + 1e-6) / 1000  # reported to the mA, never rounded up


def current_writes(profile: Profile, target_a: float) -> tuple[list[tuple[str, list[int]]], float]:
    """The writes that apply ``target_a``, in order, as (register name, words), and the current they mean.
    Usually one write to the current register; with ``current.pause`` a pause is one write to the pause
    register, and a current the pause register's 'running' value followed by the current."""
    cc = profile.current
    assert cc is not None
    if cc.pause is None:
        words, applied = current_words(profile, target_a)
        return [(cc.reg, words)], applied
    preg = profile.registers[cc.pause.reg]
    if target_a <= 0:
        return [(cc.pause.reg, encode_raw(profile, preg, cc.pause.paused))], 0.0
    words, applied = current_words(profile, target_a)
    return [(cc.pause.reg, encode_raw(profile, preg, cc.pause.running)), (cc.reg, words)], applied


def needs_write(words: list[int], last_words: list[int] | None, last_write_at: float | None, now: float,
                refresh_s: float | None) -> bool:
    """Write when the value changed, was never written, or the device needs it refreshed."""
    if last_words is None or last_write_at is None or words != last_words:
        return True
    return refresh_s is not None and now - last_write_at >= refresh_s


# -- meters ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MeterMemory:
    energy_import_wh: float | None = None
    energy_export_wh: float | None = None


@dataclass(frozen=True)
class MeterValues:
    current_a: list[float] | None
    voltage_v: list[float] | None
    power_w: float | None
    power_phase_w: list[float] | None
    energy_import_wh: float | None
    energy_export_wh: float | None
    plausible: bool
    flags: list[str]


def evaluate_meter(values: dict[str, Value], memory: MeterMemory, *, invert: bool, limits: Limits
                   ) -> tuple[MeterValues, MeterMemory]:
    """Decoded meter values -> a reading. Positive is import. Currents take the sign of their
    phase power (many meters report magnitudes). ``invert`` flips a meter mounted reversed."""
    flags: list[str] = []
    sign = -1.0 if invert else 1.0
    p_phase = [_num(values.get(f"power_l{i}")) for i in (1, 2, 3)]
    power_phase = [sign * p for p in p_phase] if all(p is not None for p in p_phase) else None  # type: ignore[operator]
    power = _num(values.get("power"))
    if power is not None:
        power = sign * power
    elif power_phase is not None:
        power = sum(power_phase)
    raw_i = [_num(values.get(f"current_l{i}")) for i in (1, 2, 3)]
    currents: list[float] | None = None
    if all(x is not None for x in raw_i):
        currents = []
        for i, x in enumerate(raw_i):
            assert x is not None
            pp = p_phase[i]
            c = -x if pp is not None and x > 0 and pp < 0 else x  # magnitude meters: sign of the power
            c *= sign
            if abs(c) > limits.meter_max_current_a:
                flags.append(f"current_l{i + 1}_out_of_range")
            currents.append(round(c, 3))
        if any(f.startswith("current_l") for f in flags):
            currents = None
    elif any(x is not None for x in raw_i):
        flags.append("current_incomplete")
    volts = [_num(values.get(f"voltage_l{i}")) for i in (1, 2, 3)]
    voltage: list[float] | None = None
    if all(v is not None for v in volts):
        voltage = [round(v, 1) for v in volts]  # type: ignore[arg-type]
        if any(v < 0 or v > MAX_V * 1.5 for v in voltage):
            flags.append("voltage_out_of_range")
            voltage = None
    if power is not None and abs(power) > 3 * limits.meter_max_current_a * MAX_V:
        flags.append("power_out_of_range")
        power = None
    if power_phase is not None and any(abs(x) > limits.meter_max_current_a * MAX_V for x in power_phase):
        flags.append("power_phase_out_of_range")
        power_phase = None
    e_imp = _num(values.get("energy_import"))
    e_exp = _num(values.get("energy_export"))
    if invert:
        e_imp, e_exp = e_exp, e_imp
    new_mem = memory
    e_imp, new_mem, f1 = _monotonic(e_imp, memory.energy_import_wh, "energy_import", new_mem)
    e_exp, new_mem, f2 = _monotonic(e_exp, memory.energy_export_wh, "energy_export", new_mem)
    flags += f1 + f2
    plausible = not flags
    return MeterValues(currents, voltage, power, power_phase, e_imp, e_exp, plausible, flags), new_mem


def _monotonic(value: float | None, last: float | None, name: str, mem: MeterMemory
               ) -> tuple[float | None, MeterMemory, list[str]]:
    if value is None:
        return None, mem, []
    if value < 0:
        return None, mem, [f"{name}_negative"]
    if value > MAX_ENERGY_WH:
        return None, mem, [f"{name}_out_of_range"]
    if last is not None and value < last - 0.5:
        return None, mem, [f"{name}_backwards"]
    return value, replace(mem, **{f"{name}_wh": value}), []


# -- grid phases -------------------------------------------------------------------------------

def grid_currents(evse_currents: list[float], phase_rotation: list[int]) -> list[float]:
    """Map an EVSE's phase currents (L1, L2, L3 as the EVSE names them) onto the grid phases:
    EVSE phase i is connected to grid phase ``phase_rotation[i]``."""
    out = [0.0, 0.0, 0.0]
    for i, grid_phase in enumerate(phase_rotation):
        if i < len(evse_currents):
            out[grid_phase - 1] += evse_currents[i]
    return out


# -- publishing EVSE statuses ------------------------------------------------------------------

CURRENT_DEADBAND_A = 0.05  # below the 0.1 A resolution of most wallbox meters and of the controller's setpoints
POWER_DEADBAND_W = 50.0
MAX_REFRESH_S = 10.0


def status_changed(old: EvseStatus, new: EvseStatus) -> bool:
    """Whether ``new`` tells a consumer something ``old`` did not.

    Everything but the measurements is compared exactly: online, the states and the raw state code, the
    phases in use, the applied setpoint, plausibility and flags, the reason, the session (its id, start
    and start register). A phase current counts when it moved more than ``CURRENT_DEADBAND_A``, the
    power more than ``POWER_DEADBAND_W``, both against the last published value (so a slow drift goes
    out too). The energy register (and the session energy counted from it) alone is no change: it goes
    out with every other publish and with the periodic refresh.
    """
    if (old.online != new.online or old.state != new.state or old.iec_state != new.iec_state
            or old.raw_state != new.raw_state or old.phases_in_use != new.phases_in_use
            or old.plausible != new.plausible or old.flags != new.flags or old.reason != new.reason
            or old.applied != new.applied or old.source != new.source or old.evse_id != new.evse_id):
        return True
    if (old.energy_wh is None) != (new.energy_wh is None):
        return True
    if old.power_w is None or new.power_w is None:
        if (old.power_w is None) != (new.power_w is None):
            return True
    elif abs(new.power_w - old.power_w) > POWER_DEADBAND_W:
        return True
    if len(old.current_a) != len(new.current_a) or any(
            abs(a - b) > CURRENT_DEADBAND_A for a, b in zip(old.current_a, new.current_a, strict=True)):
        return True
    a, b = old.session, new.session
    if a is None or b is None:
        return (a is None) != (b is None)
    return (a.id, a.started, a.energy_start_wh, a.id_tag) != (b.id, b.started, b.energy_start_wh, b.id_tag)


def status_refresh_s(*, interval_s: float, timeout_s: float, retries: int, offline_after_failures: int,
                     evse_timeout_s: float) -> float:
    """How long an unchanged status may go unpublished.

    The load controller takes a status for stale ``evse_timeout_s`` after its timestamp. The refresh
    leaves room for the device to fail right after it for ``offline_after_failures`` polls of up to
    ``timeout_s * (retries + 1)`` each (then it is published offline) plus a second for the bus, so the
    controller sees the device reported offline, not its status going stale. Never more than
    ``MAX_REFRESH_S``; no less than the poll interval (then every poll is published).
    """
    worst_poll_s = max(interval_s, timeout_s * (retries + 1))
    budget = evse_timeout_s - offline_after_failures * worst_poll_s - 1.0
    return max(interval_s, min(MAX_REFRESH_S, budget))


def should_publish(last: EvseStatus | None, new: EvseStatus, *, last_at: float | None, now: float,
                   refresh_s: float, interval_s: float) -> bool:
    """Publish a poll's status when it changed (:func:`status_changed`), when nothing was published yet,
    or when waiting for the next poll (``interval_s`` later) would leave the last publish more than
    ``refresh_s`` behind: published statuses are never further apart than ``refresh_s`` while the device
    answers (with ``refresh_s`` equal to the interval, every poll is published)."""
    if last is None or last_at is None or now - last_at + interval_s > refresh_s + 1e-3:
        return True
    return status_changed(last, new)
