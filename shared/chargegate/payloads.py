"""Pydantic models of every payload on the bus.

Each model is bound to its topic pattern in :mod:`chargegate.topics`. Every payload carries
``v`` (schema version) and ``ts`` (UTC, ISO 8601). Unknown keys are ignored so that a newer
publisher does not break an older consumer; known keys are validated strictly.

Numbers are strict and plausible: every number is a JSON number (``true`` or ``"5"`` is not one),
finite (no NaN or Infinity, which the bus's JSON parser refuses too) and within the range its
quantity can have (an energy register is not 1e308 Wh, a sequence number is not a 5000-digit
integer). The ranges are the types below; every numeric field uses one of them.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    field_validator,
    model_validator,
)

SCHEMA_VERSION = 1

MAX_INT = 2**53 - 1  # the largest integer every JSON reader keeps exactly


def _no_negative_zero(x: float) -> float:
    return x + 0.0  # -0.0 + 0.0 is 0.0: a model never holds a negative zero


def num(ge: float, le: float) -> Any:
    """A strict, finite float within ``[ge, le]`` (the unit is in the name of the type using it)."""
    return Annotated[float, Strict(), Field(ge=ge, le=le, allow_inf_nan=False), AfterValidator(_no_negative_zero)]


def count(le: int = MAX_INT) -> Any:
    """A strict, non-negative integer (not a bool, not a float)."""
    return Annotated[int, Strict(), Field(ge=0, le=le)]


Amps = num(0, 1000)
SignedAmps = num(-1000, 1000)
MAX_POWER_W = 10_000_000  # a site connection of up to 10 MW
Watts = num(-MAX_POWER_W, MAX_POWER_W)  # import positive
PositiveWatts = num(0, MAX_POWER_W)
MAX_ENERGY_WH = 1e12
WattHours = num(0, MAX_ENERGY_WH)  # an energy register (1 TWh: more than any meter behind an SMGW counts)
Volts = num(0, 1000)
Seconds = num(0, 10 * 365 * 86400)
Price = num(-1000, 1000)  # ct/kWh
Money = num(-1e9, 1e9)
Milliseconds = num(0, 3_600_000)
Days = num(-100_000, 100_000)
Count = count()


def _not_a_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError("a number is needed, not a boolean")
    return v


Phases = Annotated[Literal[1, 3], BeforeValidator(_not_a_bool)]
RawState = Annotated[int, Strict(), Field(ge=-MAX_INT, le=MAX_INT)] | Annotated[str, Field(max_length=64)]
Flag = Annotated[bool, Strict()]  # true or false, not 1 or "yes"
PhaseCurrents = Annotated[list[SignedAmps], Field(min_length=3, max_length=3)]
NonNegPhaseCurrents = Annotated[list[Amps], Field(min_length=3, max_length=3)]
Ident = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]


MEASURED_AT_TOLERANCE = timedelta(seconds=1)  # EvseStatus.measured_at may be this much after its ts


def utcnow() -> datetime:
    return datetime.now(UTC)


def _clean_json(value: Any, path: str, depth: int = 0) -> Any:
    """Free-form parts of a payload (``limits``, ``channels``, ``fields``) hold the same numbers: finite,
    not huge, and no negative zero."""
    if depth > 32:
        raise ValueError(f"{path}: nested too deeply")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{path}: {value!r} is not a finite number")
        if abs(value) > 1e15:
            raise ValueError(f"{path}: {value!r} is out of range")
        return value + 0.0
    if isinstance(value, int):
        if abs(value) > MAX_INT:
            raise ValueError(f"{path}: integer out of range")
        return value
    if isinstance(value, dict):
        return {k: _clean_json(v, f"{path}.{k}", depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean_json(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    return value


def _json_values(v: Any) -> Any:
    return _clean_json(v, "value")


JsonDict = Annotated[dict[str, Any], AfterValidator(_json_values)]


class Model(BaseModel):
    """Base of every model on the bus: unknown keys ignored, no NaN or Infinity in any float."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class Payload(Model):
    """Base of every bus payload."""

    model_config = ConfigDict(extra="ignore", frozen=False, allow_inf_nan=False)

    v: Annotated[Literal[1], BeforeValidator(_not_a_bool)] = SCHEMA_VERSION
    ts: AwareDatetime = Field(default_factory=utcnow)


    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=False).encode()


class IecState(StrEnum):
    """IEC 61851-1 control pilot states."""

    A = "A"  # no vehicle
    B = "B"  # vehicle connected, not charging
    C = "C"  # charging
    D = "D"  # charging, ventilation required
    E = "E"  # no power / short circuit
    F = "F"  # EVSE fault


class EvseState(StrEnum):
    AVAILABLE = "available"
    PREPARING = "preparing"
    CHARGING = "charging"
    SUSPENDED = "suspended"
    FINISHING = "finishing"
    FAULTED = "faulted"
    UNAVAILABLE = "unavailable"
    OFFLINE = "offline"


class SignedMeterValue(Model):
    """Signed meter data of a session (German Eichrecht: usually an OCMF string), exactly as the wallbox
    sent it: 1.6 a sampled value with ``format: SignedData``, 2.0.1 ``signedMeterData``."""

    data: str = Field(min_length=1, max_length=10_000)
    format: str | None = Field(default=None, max_length=50)  # OCMF, or the 2.0.1 encodingMethod
    context: str | None = Field(default=None, max_length=50)  # Transaction.Begin, Sample.Periodic, ...
    measurand: str | None = Field(default=None, max_length=64)
    timestamp: str | None = Field(default=None, max_length=40)  # the sample's, as sent


MAX_SIGNED_PER_SESSION = 16


class Session(Model):

    id: str = Field(min_length=1, max_length=64)
    started: AwareDatetime
    energy_start_wh: WattHours | None = None
    energy_wh: WattHours = 0.0
    id_tag: str | None = Field(default=None, max_length=64)
    # the session's signed meter data so far (begin and end always kept, then the latest)
    signed_meter_values: list[SignedMeterValue] = Field(default_factory=list, max_length=MAX_SIGNED_PER_SESSION)


class AppliedSetpoint(Model):

    current_a: Amps
    phases: Phases
    seq: Count | None = None
    source: str | None = None
    fallback: Flag = False  # True when the safe current is applied (no valid setpoint)


class EvseStatus(Payload):
    """``evse/<evse_id>/status`` (retained)."""

    evse_id: Ident
    online: Flag
    state: EvseState
    iec_state: IecState | None = None
    raw_state: RawState | None = None
    phases_in_use: count(3) = 0
    current_a: NonNegPhaseCurrents = Field(default_factory=lambda: [0.0, 0.0, 0.0])
    # when current_a was measured, if it is not measured continuously: an OCPP wallbox's currents come
    # with its MeterValues (up to a sample interval old). None: as of ``ts`` (a polled device's status)
    measured_at: AwareDatetime | None = None
    power_w: Watts | None = None
    energy_wh: WattHours | None = None
    session: Session | None = None
    applied: AppliedSetpoint | None = None
    plausible: Flag = True
    flags: list[str] = Field(default_factory=list)
    reason: str | None = None  # why offline / faulted
    source: str | None = None  # the service that reads this EVSE

    @model_validator(mode="after")
    def _measured_before_published(self) -> EvseStatus:
        # a measurement newer than its status would stay "fresh" for as long as that clock is ahead
        if self.measured_at is not None and self.measured_at > self.ts + MEASURED_AT_TOLERANCE:
            raise ValueError(f"measured_at {self.measured_at.isoformat()} is after the status's ts "
                             f"{self.ts.isoformat()}")
        return self


class Setpoint(Payload):
    """``evse/<evse_id>/setpoint`` (retained). Written only by the load controller."""

    evse_id: Ident
    current_a: Amps  # per phase; 0 pauses charging
    phases: Phases = 3
    valid_until: AwareDatetime
    source: str = "load-controller"
    seq: Count
    reason: str | None = None

    def expired(self, now: datetime | None = None) -> bool:
        return (now or utcnow()) >= self.valid_until


class EvseCommandAction(StrEnum):
    START = "start"  # authorise / start charging (remote start)
    STOP = "stop"  # stop the session (remote stop)
    ENABLE = "enable"  # ChangeAvailability operative
    DISABLE = "disable"  # ChangeAvailability inoperative


class EvseCommand(Payload):
    """``evse/<evse_id>/command`` (not retained): remote start/stop and availability."""

    evse_id: Ident
    action: EvseCommandAction
    request_id: str = Field(min_length=1, max_length=64)
    id_tag: str | None = Field(default=None, max_length=64)
    source: str = "ocpp-backend"


class EvseCommandResult(Payload):
    """``evse/<evse_id>/command/result`` (not retained): the answer to an :class:`EvseCommand`."""

    evse_id: Ident
    request_id: str
    accepted: Flag
    detail: str | None = None


class MeterReading(Payload):
    """``meter/<meter_id>/reading`` (retained). Positive power is import (consumption)."""

    meter_id: Ident
    online: Flag = True
    current_a: PhaseCurrents | None = None
    voltage_v: Annotated[list[Volts], Field(min_length=3, max_length=3)] | None = None
    power_w: Watts | None = None
    power_phase_w: Annotated[list[Watts], Field(min_length=3, max_length=3)] | None = None
    energy_import_wh: WattHours | None = None
    energy_export_wh: WattHours | None = None
    plausible: Flag = True
    flags: list[str] = Field(default_factory=list)
    reason: str | None = None


class LimitSource(StrEnum):
    DSO = "dso"
    SUPPLIER = "supplier"
    OCPP_BACKEND = "ocpp_backend"
    LOCAL = "local"
    FAILSAFE = "failsafe"


class LimitScope(StrEnum):
    GRID = "grid"  # the whole grid connection
    CONTROLLABLE = "controllable"  # the sum of the controllable devices (§14a)


class GridLimit(Payload):
    """``grid/limit/<source>`` (retained), written only by smgw-link.

    ``power_w`` and/or ``current_a`` (per phase) bound the scope while ``active`` and before
    ``valid_until``. An inactive limit or one that has expired binds nothing.
    """

    source: LimitSource
    active: Flag
    power_w: PositiveWatts | None = None
    current_a: NonNegPhaseCurrents | None = None
    scope: LimitScope | None = None  # None: the controller's configured default
    valid_until: AwareDatetime
    id: str | None = Field(default=None, max_length=128)
    reason: str | None = Field(default=None, max_length=256)
    failsafe_power_w: PositiveWatts | None = None
    failsafe_duration_s: Seconds | None = None

    @model_validator(mode="after")
    def _needs_a_bound(self) -> GridLimit:
        if self.active and self.power_w is None and self.current_a is None:
            raise ValueError("an active limit needs power_w or current_a")
        return self

    def binding(self, now: datetime | None = None) -> bool:
        return self.active and (now or utcnow()) < self.valid_until


class EvseLimit(Payload):
    """``evse/<evse_id>/limit`` (retained): a per-EVSE limit, e.g. from the OCPP backend's
    SetChargingProfile. Written only by ocpp-gateway. ``current_a`` is per phase."""

    evse_id: Ident
    source: LimitSource = LimitSource.OCPP_BACKEND
    active: Flag = True
    current_a: Amps | None = None
    power_w: PositiveWatts | None = None
    phases: Phases | None = None
    valid_until: AwareDatetime
    id: str | None = None


class TariffLevel(StrEnum):
    LOW = "low"  # reduced tariff (TARIF=1 in the reference product)
    NORMAL = "normal"
    HIGH = "high"


class TariffPeriod(Model):

    id: str = Field(min_length=1, max_length=128)
    level: TariffLevel
    start: AwareDatetime
    end: AwareDatetime | None = None
    price_ct_per_kwh: Price | None = None

    @model_validator(mode="after")
    def _end_after_start(self) -> TariffPeriod:
        if self.end is not None and self.end <= self.start:
            raise ValueError("tariff period end must be after its start")
        return self


class TariffCurrent(Payload):
    """``tariff/current`` (retained): the tariff in force now."""

    period: TariffPeriod
    source: LimitSource = LimitSource.SUPPLIER
    valid_until: AwareDatetime | None = None


class TariffSchedule(Payload):
    """``tariff/schedule`` (retained): announced tariff periods."""

    periods: list[TariffPeriod] = Field(default_factory=list, max_length=1000)
    source: LimitSource = LimitSource.SUPPLIER


class LinkState(StrEnum):
    DISABLED = "disabled"
    CONNECTING = "connecting"
    UP = "up"
    DOWN = "down"


class SmgwLinkStatus(Payload):
    """``link/smgw`` (retained)."""

    state: LinkState
    gateway: str | None = None
    since: AwareDatetime | None = None
    error: str | None = None
    certificate: str | None = None
    cert_not_after: AwareDatetime | None = None
    cert_days_left: Days | None = None
    bytes_tx: Count = 0
    bytes_rx: Count = 0
    channels: JsonDict = Field(default_factory=dict)


class EvseAllocation(Model):

    evse_id: Ident
    current_a: Amps
    phases: Phases
    wanted: Flag = True
    bound_by: str  # the limit or rule that bound it, e.g. "node:garage:L2", "grid_limit:dso", "evse_max"
    detail: str | None = None
    reason_text: str | None = None  # bound_by and detail in a sentence for people (chargegate.reasons)
    mode: str | None = None  # the charging mode in force (evse/<id>/mode), None: rules (the default)


class Allocation(Payload):
    """``controller/allocation`` (retained): the last decision and why."""

    cycle: Count
    evses: list[EvseAllocation] = Field(default_factory=list)
    limits: JsonDict = Field(default_factory=dict)  # limits in force with their sources
    solve_ms: Milliseconds | None = None


class ChargingModeName(StrEnum):
    """What the household wants for one EVSE (``evse/<evse_id>/mode``). A mode never overrides safety or
    grid-operator limits: it only chooses among what the fuses, limits and §14a leave."""

    OFF = "off"  # do not charge
    NOW = "now"  # as fast as the installation allows (the configured rules are lifted)
    RULES = "rules"  # the configured charging rules (the default)
    SOLAR = "solar"  # from measured export (surplus) only
    SOLAR_MIN = "solar+min"  # the minimum current from the grid, the rest from surplus


HHMM = Annotated[str, Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")]


class SessionTarget(Model):
    """A per-session target: ``energy_wh`` charged in the session by local time ``by`` (HH:MM). It ends
    with the session it was set in."""


    energy_wh: Annotated[float, Strict(), Field(gt=0, le=500_000, allow_inf_nan=False)]
    by: HHMM
    session_id: str | None = Field(default=None, max_length=64, description="the session it belongs to")


class ModeCommand(Payload):
    """``evse/<evse_id>/mode/set`` (not retained): set the charging mode and/or the session target.
    Written by the ``user`` account (household, web page, Home Assistant) and smgw-link's admin API."""

    evse_id: Ident
    mode: ChargingModeName | None = None  # None: keep the mode (e.g. only a target)
    target: SessionTarget | None = None
    clear_target: Flag = False
    # the household's cap on this EVSE's current per phase (Home Assistant's number, the web page); it only
    # ever lowers what the controller grants, never above the EVSE's configured maximum
    max_current_a: Amps | None = None
    clear_max_current: Flag = False
    request_id: str | None = Field(default=None, max_length=64)
    source: str = Field(default="user", max_length=64)


class ChargingMode(Payload):
    """``evse/<evse_id>/mode`` (retained): the mode in force, written by the history service, which keeps
    it across restarts; the load controller honours it."""

    evse_id: Ident
    mode: ChargingModeName = ChargingModeName.RULES
    target: SessionTarget | None = None
    max_current_a: Amps | None = None  # the household's cap per phase (None: the EVSE's configured maximum)
    set_by: str | None = Field(default=None, max_length=64)
    set_at: AwareDatetime | None = None


class TariffShare(Model):
    """The part of a session charged in one tariff period, at the price configured for its level."""


    period_id: str | None = Field(default=None, max_length=128)  # None: no tariff known at the time
    level: str = Field(max_length=16)  # low / normal / high / unknown
    start: AwareDatetime
    end: AwareDatetime | None = None
    energy_wh: WattHours
    price_ct_per_kwh: Price | None = None
    cost: Money | None = None  # in the configured currency


class SessionRecord(Payload):
    """``history/session/<evse_id>`` (retained): the EVSE's last recorded session, as the history
    service keeps it (open while ``stopped`` is None)."""

    evse_id: Ident
    record_id: Count
    session_id: str = Field(max_length=64)
    started: AwareDatetime
    stopped: AwareDatetime | None = None
    id_tag: str | None = Field(default=None, max_length=64)
    energy_start_wh: WattHours | None = None
    energy_stop_wh: WattHours | None = None
    energy_wh: WattHours = 0.0
    peak_power_w: Watts | None = None
    phases: count(3) = 0
    cost: Money | None = None
    currency: str = "EUR"
    tariffs: list[TariffShare] = Field(default_factory=list, max_length=500)
    signed_values: Count = 0  # signed meter data kept with it (OCMF etc.)


class ControlKind(StrEnum):
    LIMIT = "limit"  # a grid-operator or supplier limit (grid/limit/<source>)
    EVSE_LIMIT = "evse_limit"  # a per-EVSE limit from the OCPP backend (evse/<id>/limit)
    FAILSAFE = "failsafe"  # a failsafe period
    LINK_OUTAGE = "link_outage"  # the SMGW link was down


class ControlRecord(Payload):
    """``history/control/<kind>`` (retained): the latest recorded control action of that kind."""

    record_id: Count
    kind: ControlKind
    source: str | None = Field(default=None, max_length=64)
    scope: str | None = Field(default=None, max_length=64)
    started: AwareDatetime
    ended: AwareDatetime | None = None
    valid_until: AwareDatetime | None = None
    power_w: Watts | None = None
    current_a: Annotated[list[SignedAmps], Field(max_length=3)] | None = None
    raised_to_floor: Flag | None = None
    effective_w: Watts | None = None
    limit_id: str | None = Field(default=None, max_length=128)
    answer: str | None = Field(default=None, max_length=256)
    detail: str | None = Field(default=None, max_length=512)


class HealthStatus(StrEnum):
    ONLINE = "online"
    DEGRADED = "degraded"
    OFFLINE = "offline"


class Health(Payload):
    """``service/<name>/health`` (retained; the last will is the ``offline`` form)."""

    service: Ident
    status: HealthStatus
    version: str | None = None
    uptime_s: Seconds | None = None
    pid: count(2**32) | None = None
    config_version: str | None = None
    counters: dict[str, Count] = Field(default_factory=dict)
    # restarts of the service's supervised long-lived tasks after a failure, by task name (see
    # chargegate.supervise); empty while none failed
    task_restarts: dict[str, Count] = Field(default_factory=dict)
    detail: str | None = None

    @field_validator("counters", "task_restarts")
    @classmethod
    def _bounded(cls, v: dict[str, int]) -> dict[str, int]:
        if len(v) > 500:
            raise ValueError("too many counters")
        return v


class ServiceCommand(Payload):
    """``service/<name>/command`` (not retained): e.g. reload the configuration."""

    action: Literal["reload", "restart"]
    request_id: str = Field(min_length=1, max_length=64)
    config_version: str | None = None


class ExtMessage(Payload):
    """``ext/<service>/<topic>``: what an extra service container publishes (README "Adding a service");
    its own content goes into ``data``. Only that service's broker account may write under ``ext/<service>/``."""

    service: Ident
    topic: Ident
    data: JsonDict = Field(default_factory=dict)


class LogRecord(Payload):
    """``service/<name>/log`` (not retained): a service's log events (info and above), so that
    recent logs can be read remotely. Secrets are redacted before they get here."""

    service: Ident
    level: Literal["debug", "info", "warning", "error", "critical"]
    event: str = Field(max_length=2000)
    fields: JsonDict = Field(default_factory=dict)
