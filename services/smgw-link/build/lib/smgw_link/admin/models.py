"""Request and response bodies of the admin API (they make its OpenAPI document)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from chargegate import payloads as p
from chargegate.strict_numbers import StrictNumbers

Ident = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]
VersionId = Annotated[str, Field(pattern=r"^[0-9a-f]{12}$", description="a configuration version (digest)")]
ServiceName = Literal["evse-poller", "ocpp-gateway", "load-controller", "smgw-link", "history"]
LimitSourceName = Literal["dso", "supplier", "local"]


class In(StrictNumbers):
    """A request body: unknown keys are errors, numbers are numbers (not ``true``), booleans booleans."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ErrorItem(BaseModel):
    path: str = Field(description="where in the document or request, e.g. evses[1].max_current_a")
    message: str


class ErrorOut(BaseModel):
    detail: str
    errors: list[ErrorItem] = Field(default_factory=list)


class WhoAmI(BaseModel):
    name: str
    role: Literal["admin", "operator", "viewer"]
    method: Literal["token", "certificate"]
    via: Literal["local", "local-tls", "inbound"]


# -- status -------------------------------------------------------------------------------------------
class ServiceView(BaseModel):
    service: str
    status: p.HealthStatus | None = Field(default=None, description="None: never reported")
    config_version: str | None = None
    applied: bool | None = Field(default=None, description="runs the configuration version in the file")
    version: str | None = None
    uptime_s: float | None = None
    pid: int | None = None
    detail: str | None = None
    seen: datetime | None = None
    counters: dict[str, int] = Field(default_factory=dict)


class EvseView(BaseModel):
    id: str
    name: str | None = None
    circuit: str
    driver: Literal["modbus", "ocpp", "none"]
    upstream: bool = Field(description="appears as a charge point at the OCPP backend")
    status: p.EvseStatus | None = None
    setpoint: p.Setpoint | None = None
    limit: p.EvseLimit | None = None
    allocation: p.EvseAllocation | None = None


class MeterView(BaseModel):
    id: str
    reading: p.MeterReading | None = None


class GridLimitView(BaseModel):
    source: str
    binding: bool = Field(description="active and not expired now")
    limit: p.GridLimit


class OperatorState(BaseModel):
    failsafe: bool
    lpc_w: int | None = Field(default=None, description="the operator's consumption limit (CLS.EEDI or admin API)")
    lpc_active: bool = False
    lpc_until: datetime | None = None
    lpc_by: str | None = None
    avail_percent: dict[str, float] = Field(default_factory=dict, description="AVAIL per channel")


class LimitsView(BaseModel):
    grid: list[GridLimitView] = Field(default_factory=list)
    evse: dict[str, p.EvseLimit] = Field(default_factory=dict)
    in_force: dict[str, Any] = Field(default_factory=dict, description="what the load-controller applied last")
    operator: OperatorState | None = None
    sources: dict[str, str] = Field(default_factory=dict,
                                    description="which input publishes each settable source")


class SwitchOut(BaseModel):
    state: Literal["idle", "switching", "done", "fell_back", "failed"]
    to: str | None = None
    previous: str | None = None
    by: str | None = None
    started: datetime | None = None
    finished: datetime | None = None
    timeout_s: float | None = None
    error: str | None = None


class StatusOut(BaseModel):
    ts: datetime
    site: str
    config_version: str | None = Field(description="the version in the configuration file")
    evses: list[EvseView]
    meters: list[MeterView]
    limits: LimitsView
    tariff: p.TariffCurrent | None = None
    schedule: p.TariffSchedule | None = None
    smgw: p.SmgwLinkStatus | None = None
    certificate_switch: SwitchOut
    services: list[ServiceView]
    recent_errors: list[p.LogRecord]


# -- configuration ----------------------------------------------------------------------------------
class ConfigOut(BaseModel):
    version: str
    document: dict[str, Any] = Field(description="the configuration; inline secrets shown as <redacted>")


class ConfigVersionOut(BaseModel):
    version: str
    saved: str
    current: bool


class ChangeOut(BaseModel):
    action: str
    target: str
    version: str = Field(description="the configuration version now in the file")
    previous_version: str | None = None
    changed: bool
    reload_sent_to: list[str]
    applied: dict[str, bool] | None = Field(
        default=None, description="with wait_s: per running service, whether it reports the new version")


class CheckOut(BaseModel):
    valid: bool
    version: str | None = None
    errors: list[ErrorItem] = Field(default_factory=list)


class RollbackIn(In):
    version: VersionId


# -- limits -------------------------------------------------------------------------------------------
class LimitIn(In):
    power_w: float = Field(ge=0, le=10_000_000, description="the limit in W")
    active: bool = Field(default=True, description="false lifts the limit")
    duration_s: float | None = Field(default=None, ge=1, le=31 * 86400,
                                     description="the limit ends after this many seconds (default: until lifted)")


class LimitOut(BaseModel):
    source: str
    input: Literal["lpc", "avail-inbound", "avail-local"]
    percent: float | None = Field(default=None, description="AVAIL inputs: the percentage set")
    until: datetime | None = None
    published: p.GridLimit | None = None


# -- certificates -------------------------------------------------------------------------------------
class CertUpload(In):
    name: Ident = Field(description="name in the certificate store")
    format: Literal["pem", "pkcs12"]
    certificate: str = Field(min_length=1, max_length=262_144,
                             description="PEM text (certificate, chain, optionally the key) or base64 PKCS#12")
    key: str | None = Field(default=None, max_length=65_536, description="PEM private key (pem format)")
    password: str | None = Field(default=None, max_length=1024, description="of the key or the PKCS#12 file")
    replace: bool = Field(default=False, description="overwrite a certificate of that name (not the active one)")
    force: bool = Field(default=False, description="store it even when it (or its chain) has expired or is not "
                                                   "valid yet (refused with 422 otherwise)")


class CertOut(BaseModel):
    name: str
    subject: str | None = None
    issuer: str | None = None
    key_type: str | None = None
    curve: str | None = None
    not_before: datetime | None = None
    not_after: datetime | None = None
    days_left: float | None = None
    sha256: str | None = None
    chain_len: int | None = None
    has_key: bool = False
    selected: bool = False
    active: bool = False
    pending_request: bool = False


class CertCheckOut(CertOut):
    key_matches: bool
    valid_now: bool
    chain_ok: bool
    anchored: str | None = None
    usable: bool
    problems: list[str]
    validity: list[str] = Field(default_factory=list, description="those of the problems about the validity "
                                                                  "period (notBefore/notAfter): force overrides them")
    warnings: list[str]


class SwitchIn(In):
    timeout_s: float | None = Field(default=None, gt=0, le=3600,
                                    description="default admin.switch_timeout_s")
    force: bool = Field(default=False, description="switch to it even when it (or its chain) has expired or is "
                                                   "not valid yet; other problems are refused all the same")


# -- services, logs, audit ----------------------------------------------------------------------------
class CommandOut(BaseModel):
    service: str
    action: Literal["reload", "restart"]
    request_id: str


class AuditEntry(BaseModel):
    ts: str
    who: str
    role: str
    action: str
    target: str
    result: str
    detail: Any = None
