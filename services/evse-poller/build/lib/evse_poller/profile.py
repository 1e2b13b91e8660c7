"""Device profiles: one YAML file per wallbox or meter model, validated on load.

A profile says how a device is reached (transport defaults), which registers it has (table,
address as the vendor documents it, data type, word and byte order, scale), how its state code
maps to IEC 61851 states, how the maximum current is set, how charging is enabled and paused,
and which communication watchdog and failsafe current it offers. See ``profiles/README.md``.

Errors name the file, the path inside the document and what is wrong, e.g.::

    profiles/alfen-eve.yaml: registers.max_current.type: Input should be 'uint16', ... (got 'float')
"""

from __future__ import annotations

import math
import re
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from chargegate.payloads import EvseState, IecState
from chargegate.topics import format_loc
from evse_poller.codec import DType, width

PROFILE_DIR = Path(__file__).parent / "profiles"

Table = Literal["holding", "input", "coil", "discrete"]
Order = Literal["big", "little"]
Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=48)]

#: register names the poller understands, per device kind
EVSE_MEASUREMENTS = ("state", "current_l1", "current_l2", "current_l3", "voltage_l1", "voltage_l2", "voltage_l3",
                     "power", "energy", "applied_current")
#: the EVSE registers read every poll (voltages are not part of the EVSE status)
EVSE_POLLED = ("state", "current_l1", "current_l2", "current_l3", "power", "energy")
METER_MEASUREMENTS = ("current_l1", "current_l2", "current_l3", "voltage_l1", "voltage_l2", "voltage_l3",
                      "power", "power_l1", "power_l2", "power_l3", "energy_import", "energy_export")


_MEASUREMENT_LIKE = re.compile(r"^((current|voltage|power)_l\d|energy_(import|export)|applied_current)$")


class ProfileError(ValueError):
    """A profile that cannot be used. ``errors`` lists (path, message) pairs."""

    def __init__(self, source: str, errors: list[tuple[str, str]]) -> None:
        self.source = source
        self.errors = errors
        super().__init__("\n".join(f"{source}: {path or '(document)'}: {msg}" for path, msg in errors))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Register(_Strict):
    """One value in the device's register map."""

    table: Table
    address: int = Field(ge=0, le=65535, description="protocol address as the vendor documents it (0-based)")
    type: DType = DType.UINT16
    count: int | None = Field(default=None, ge=1, le=64, description="registers of a string")
    scale: float = Field(default=1.0, description="engineering value = raw * scale")
    scale_register: Name | None = Field(default=None, description="SunSpec: a sunssf register scaling this one")
    byte_order: Order | None = None
    word_order: Order | None = None
    mask: int | None = Field(default=None, ge=1, le=0xFFFF_FFFF, description="bits kept of an integer raw value")
    unavailable: list[int] = Field(default_factory=list, description="raw values meaning 'not available'")
    access: Literal["r", "rw", "w"] = "r"
    unit: str | None = None
    doc: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Register:
        if self.type is DType.STRING and self.count is None:
            raise ValueError("a string register needs count (number of registers)")
        if self.type is not DType.STRING and self.count is not None:
            raise ValueError("count is only for strings; the type sets the width")
        if self.table in ("coil", "discrete") and self.type is not DType.UINT16:
            raise ValueError("coils and discrete inputs are single bits: use type uint16 (0/1)")
        if self.table in ("input", "discrete") and self.access != "r":
            raise ValueError(f"{self.table} registers are read-only")
        if self.scale == 0 or not math.isfinite(self.scale):
            raise ValueError("scale must be a finite non-zero number")
        if self.mask is not None and self.type in (DType.FLOAT32, DType.FLOAT64, DType.STRING):
            raise ValueError("mask only applies to integer types")
        end = self.address + self.width - 1
        if end > 65535:
            raise ValueError(f"register ends beyond address 65535 ({end})")
        return self

    @property
    def width(self) -> int:
        return 1 if self.table in ("coil", "discrete") else width(self.type, self.count)


class TransportDefaults(_Strict):
    type: Literal["tcp", "rtu", "ascii", "rtu-over-tcp", "http"]
    port: int = Field(default=502, ge=1, le=65535)
    device_id: int = Field(default=1, ge=0, le=255)
    baudrate: int = Field(default=9600, ge=300, le=1_000_000)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8


class ReadOptions(_Strict):
    max_registers: int = Field(default=100, ge=1, le=125, description="largest single read")
    max_gap: int = Field(default=0, ge=0, le=100,
                         description="unused registers a read may span to merge two blocks (0: only adjacent)")
    repeat: int = Field(default=1, ge=1, le=3, description="send a read this often after the device was idle "
                                                           "(devices that wake up on the first request answer "
                                                           "the second)")
    idle_s: float = Field(default=5.0, ge=0, le=3600, description="with repeat: the device counts as idle after "
                                                                  "this long without a request")


class StateMap(_Strict):
    reg: Name = Field(alias="register")
    combine: list[Name] = Field(default_factory=list, max_length=3,
                                description="further registers whose raw values make up the state code with the "
                                            "first one, joined by '/' (e.g. charging state and cable state: '3/7')")
    codes: dict[str, IecState] = Field(min_length=1, description="raw state code -> IEC 61851 state")
    derived: dict[str, EvseState] = Field(default_factory=dict,
                                          description="raw code -> derived state where the IEC state says too little")

    @field_validator("codes", "derived", mode="before")
    @classmethod
    def _keys_as_text(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): val for k, val in v.items()}
        return v


class PauseControl(_Strict):
    """Devices that cannot be told 0 A: pausing writes ``paused`` to a register of its own, and every
    current written is preceded by ``running`` there (e.g. KEBA: 5004 takes 6..63 A only, 5014 0/1)."""

    reg: Name = Field(alias="register")
    paused: int
    running: int


class CurrentControl(_Strict):
    """How the maximum charging current is set."""

    reg: Name = Field(alias="register")
    pause: PauseControl | None = Field(default=None, description="pause through another register")
    min_a: float = Field(default=6.0, ge=0, le=80, description="lowest current the device accepts besides pause")
    max_a: float = Field(default=32.0, gt=0, le=80)
    pause_a: float = Field(default=0.0, ge=0, le=80, description="current written to pause charging")
    pause_raw: int | None = Field(default=None, description="raw value written to pause (instead of pause_a)")
    refresh_s: float | None = Field(default=None, gt=0, le=3600,
                                    description="rewrite the value at least this often (device keep-alive)")


class PhaseControl(_Strict):
    reg: Name = Field(alias="register")
    values: dict[Literal[1, 3], int] = Field(description="phase count -> raw value")


class EnableControl(_Strict):
    """Availability (operative / inoperative), e.g. a remote lock or an outlet enable."""

    reg: Name = Field(alias="register")
    operative: int = Field(description="raw value written to enable (ChangeAvailability operative)")
    inoperative: int = Field(description="raw value written to disable")


class Keepalive(_Strict):
    reg: Name = Field(alias="register")
    value: int | Literal["timeout"] = Field(description="raw value written, or 'timeout': the programmed watchdog "
                                                        "timeout, in the register's unit (a device whose keep-alive "
                                                        "is rewriting its timeout)")
    every_s: float | None = Field(default=None, gt=0, le=3600,
                                  description="default: half the programmed watchdog timeout")


class Watchdog(_Strict):
    """The device's own communication watchdog and failsafe current."""

    timeout_register: Name | None = Field(default=None, description="written at connect with the poller's "
                                                                    "watchdog_timeout_s (in the register's unit)")
    failsafe_register: Name | None = Field(default=None, description="written at connect with the EVSE's "
                                                                     "safe_current_a")
    timeout_min_s: float | None = Field(default=None, ge=0, description="shortest timeout the device accepts")
    timeout_max_s: float | None = Field(default=None, gt=0, description="longest timeout the device accepts")
    keepalive: Keepalive | None = None
    remaining_register: Name | None = Field(default=None, description="remaining validity of the written "
                                                                    "setpoint (s); rewritten before it runs out")
    builtin_s: float | None = Field(default=None, gt=0, le=86400,
                                    description="a validity time configured on the device itself (not writable "
                                                "over Modbus): the setpoint is refreshed well within it")
    note: str | None = None


class SafeCurrent(_Strict):
    """What the device accepts as the EVSE's ``safe_current_a``.

    Where the profile programs a failsafe register (``watchdog.failsafe_register``) this is the
    range of that register: the current the device falls back to by itself when chargegate is
    gone. Elsewhere it is the range of the current register, where the poller writes the safe
    current while it runs and has no valid setpoint. ``chargegate config check`` refuses a value
    outside it and says, from ``outside``, what the device would do instead.
    """

    min_a: float = Field(ge=0, le=80, description="lowest current besides off")
    max_a: float = Field(gt=0, le=80)
    zero_is_off: bool = Field(description="0 A is accepted and means: no charging")
    outside: str = Field(min_length=10, description="what the device does with a value outside the range")

    def allowed(self) -> str:
        rng = f"{self.min_a:g}..{self.max_a:g} A"
        return f"0 (off) or {rng}" if self.zero_is_off else rng

    def accepts(self, value_a: float) -> bool:
        if value_a == 0:
            return self.zero_is_off
        return self.min_a - 1e-9 <= value_a <= self.max_a + 1e-9


class InitWrite(_Strict):
    reg: Name = Field(alias="register")
    value: int


class SunSpec(_Strict):
    """A SunSpec device: register addresses are offsets inside the model (ID register = 0)."""

    model: int = Field(ge=1, le=65534)
    base_addresses: list[int] = Field(default=[40000, 0, 50000], min_length=1)


class HttpRequest(_Strict):
    """One HTTP GET whose answer is a JSON document."""

    path: str = Field(pattern=r"^/[A-Za-z0-9/._~%!$&'()*+,;=:@?-]*$", max_length=200,
                      description="path and query, e.g. /rpc/EM.GetStatus?id=0")


class JsonValue(_Strict):
    """One quantity taken from a JSON answer."""

    request: Name = Field(description="the request (http.requests) whose answer holds it")
    path: str = Field(pattern=r"^[A-Za-z0-9_:\-]+(\.[A-Za-z0-9_:\-]+)*$", max_length=120,
                      description="dotted path into the document; a number selects a list element (emeters.0.power)")
    scale: float = Field(default=1.0, description="engineering value = JSON number * scale")
    unit: str | None = None
    doc: str | None = None

    @model_validator(mode="after")
    def _finite(self) -> JsonValue:
        if self.scale == 0 or not math.isfinite(self.scale):
            raise ValueError("scale must be a finite non-zero number")
        return self


class HttpSpec(_Strict):
    """A device read over HTTP: the requests of one poll and where each quantity is in their answers."""

    requests: dict[Name, HttpRequest] = Field(min_length=1, max_length=8)
    values: dict[Name, JsonValue] = Field(min_length=1)
    max_body_bytes: int = Field(default=65536, ge=256, le=1_048_576, description="a longer answer is refused")

    @model_validator(mode="after")
    def _requests_known(self) -> HttpSpec:
        for n, v in self.values.items():
            if v.request not in self.requests:
                raise ValueError(f"values.{n}.request: unknown request {v.request!r}")
        return self


class Profile(_Strict):
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9\-]*$", max_length=64)]
    kind: Literal["evse", "meter"]
    vendor: str
    model: str
    source: str = Field(min_length=10, description="the vendor document the register facts come from")
    transport: TransportDefaults
    byte_order: Order = "big"
    word_order: Order = "big"
    read: ReadOptions = Field(default_factory=ReadOptions)
    write_multiple: bool = Field(default=False, description="write single registers with FC 16 too (devices "
                                                            "that do not support FC 06)")
    sunspec: SunSpec | None = None
    registers: dict[Name, Register] = Field(default_factory=dict, description="Modbus registers")
    http: HttpSpec | None = Field(default=None, description="transport http: the JSON requests and values")
    state: StateMap | None = None
    current: CurrentControl | None = None
    phases: PhaseControl | None = None
    enable: EnableControl | None = None
    watchdog: Watchdog | None = None
    safe_current: SafeCurrent | None = None
    init: list[InitWrite] = Field(default_factory=list)
    notes: str | None = None

    @model_validator(mode="after")
    def _references(self) -> Profile:
        errs: list[str] = []
        regs = self.registers

        def need(name: str | None, where: str, writable: bool = False) -> None:
            if name is None:
                return
            r = regs.get(name)
            if r is None:
                errs.append(f"{where}: unknown register {name!r}")
            elif writable and r.access == "r":
                errs.append(f"{where}: register {name!r} is read-only (access r)")

        for n, r in regs.items():
            if r.scale_register is not None:
                need(r.scale_register, f"registers.{n}.scale_register")
                sf = regs.get(r.scale_register)
                if sf is not None and sf.type is not DType.SUNSSF:
                    errs.append(f"registers.{n}.scale_register: {r.scale_register!r} is not of type sunssf")
        known = EVSE_MEASUREMENTS if self.kind == "evse" else METER_MEASUREMENTS
        if self.transport.type == "http":
            if self.http is None:
                errs.append("http: a profile with transport http says what it requests (http.requests, http.values)")
            if regs:
                errs.append("registers: a profile with transport http has no Modbus registers")
            if self.kind != "meter":
                errs.append("transport.type: http is supported for meters only")
            if self.sunspec is not None:
                errs.append("sunspec: only for Modbus profiles")
        else:
            if self.http is not None:
                errs.append("http: only for transport http")
            if not regs:
                errs.append("registers: a Modbus profile needs at least one register")
        if self.kind == "evse":
            if self.state is None:
                errs.append("state: an EVSE profile needs a state mapping")
            if self.current is None:
                errs.append("current: an EVSE profile needs current control")
            if self.state is not None:
                need(self.state.reg, "state.register")
                for i, c in enumerate(self.state.combine):
                    need(c, f"state.combine[{i}]")
            if self.current is not None:
                need(self.current.reg, "current.register", writable=True)
                if self.current.pause is not None:
                    need(self.current.pause.reg, "current.pause.register", writable=True)
                if self.current.min_a > self.current.max_a:
                    errs.append("current: min_a is above max_a")
            if self.safe_current is None:
                errs.append("safe_current: an EVSE profile declares the safe/failsafe current range it accepts")
            elif self.safe_current.min_a > self.safe_current.max_a:
                errs.append("safe_current: min_a is above max_a")
            if self.phases is not None:
                need(self.phases.reg, "phases.register", writable=True)
            if self.enable is not None:
                need(self.enable.reg, "enable.register", writable=True)
            if self.watchdog is not None:
                need(self.watchdog.timeout_register, "watchdog.timeout_register", writable=True)
                need(self.watchdog.failsafe_register, "watchdog.failsafe_register", writable=True)
                need(self.watchdog.remaining_register, "watchdog.remaining_register")
                if self.watchdog.keepalive is not None:
                    need(self.watchdog.keepalive.reg, "watchdog.keepalive.register", writable=True)
        else:
            for section in ("state", "current", "phases", "enable", "watchdog", "safe_current"):
                if getattr(self, section) is not None:
                    errs.append(f"{section}: a meter profile has no {section} section")
            if not any(k in self.quantities() for k in ("current_l1", "power")):
                errs.append("registers: a meter needs at least current_l1 or power")
        for i, w in enumerate(self.init):
            need(w.reg, f"init[{i}].register", writable=True)
        for n in self.quantities():
            if _MEASUREMENT_LIKE.match(n) and n not in known:
                errs.append(f"registers.{n}: not a {self.kind} measurement; known: {', '.join(known)}")
        if self.transport.type in ("rtu", "ascii") and self.transport.port != 502:
            errs.append("transport.port: only for TCP transports")
        if errs:
            raise ValueError("; ".join(errs))
        return self

    # -- helpers -------------------------------------------------------------------------------
    def quantities(self) -> list[str]:
        """Names of everything the device can be read for: Modbus registers or HTTP values."""
        return list(self.http.values) if self.http is not None else list(self.registers)

    @property
    def programs_failsafe(self) -> bool:
        """The device is told the safe current and applies it by itself when chargegate is silent."""
        return self.watchdog is not None and self.watchdog.failsafe_register is not None

    def safe_current_problem(self, value_a: float) -> str | None:
        """Why ``value_a`` cannot be this device's ``safe_current_a`` (None: it can)."""
        sc = self.safe_current
        if sc is None or sc.accepts(value_a):
            return None
        what = ("failsafe current (programmed into the device, applied by it when chargegate is silent)"
                if self.programs_failsafe else "safe current (written by the poller when no valid setpoint arrives)")
        return f"{value_a:g} A is outside the {what} that {self.name} accepts: {sc.allowed()}; {sc.outside}"

    def order(self, reg: Register) -> tuple[str, str]:
        return (reg.byte_order or self.byte_order, reg.word_order or self.word_order)


def _format(e: ValidationError) -> list[tuple[str, str]]:
    out = []
    for err in e.errors():
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown key"
        inp = err.get("input")
        if inp is not None and not isinstance(inp, dict | list):
            msg = f"{msg} (got {inp!r})"
        out.append((format_loc(err.get("loc", ())), msg))
    return out


def parse_profile(data: Any, source: str) -> Profile:
    if not isinstance(data, dict):
        raise ProfileError(source, [("", f"a profile must be a mapping, got {type(data).__name__}")])
    try:
        return Profile.model_validate(data)
    except ValidationError as e:
        raise ProfileError(source, _format(e)) from None


def load_profile_file(path: str | Path) -> Profile:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ProfileError(str(path), [("", f"cannot read: {e.strerror}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ProfileError(str(path), [(where, f"not valid YAML: {getattr(e, 'problem', e)}")]) from None
    prof = parse_profile(data, str(path))
    if prof.name != path.stem:
        raise ProfileError(str(path), [("name", f"name {prof.name!r} must match the file name {path.stem!r}")])
    return prof


def available() -> list[str]:
    """Names of the built-in profiles."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


@cache
def load_profile(name: str) -> Profile:
    """A built-in profile by name (``modbus.profile`` in the configuration)."""
    path = PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ProfileError(name, [("", f"unknown device profile {name!r}; available: {', '.join(available())}")])
    return load_profile_file(path)
