"""SMGW link settings: HAN TLS, CLS channels, operator control and the variables API.

Owned by smgw-link (``services/smgw-link``). Other services use :meth:`Smgw.route` to find the
local forwarding port of an endpoint that is reached through the gateway's CLS proxy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from chargegate.config.base import Ident, Port, Secret, Strict

_FINGERPRINT = r"^([0-9A-Fa-f]{2}:?){31}[0-9A-Fa-f]{2}$"


def normalize_fingerprint(value: str) -> str:
    """``AB:cd:...`` or ``abcd...`` -> 64 lower-case hex digits."""
    return value.replace(":", "").strip().lower()


class Gateway(Strict):
    host: str = Field(description="the SMGW's HAN address (IP or host name)")
    port: Port = 443
    server_name: str | None = Field(
        default=None,
        description="expected name in the gateway certificate (checked against its SAN); "
                    "omit to trust any certificate the trust anchor issued")
    trust_anchor: Path | None = Field(default=None, description="CA file for the gateway's certificate")
    pinned_sha256: str | None = Field(default=None, pattern=_FINGERPRINT,
                                      description="SHA-256 fingerprint of the gateway certificate")
    connect_timeout_s: float = Field(default=5.0, gt=0, le=120)

    @field_validator("pinned_sha256")
    @classmethod
    def _norm(cls, v: str | None) -> str | None:
        return normalize_fingerprint(v) if v else v

    @model_validator(mode="after")
    def _trust(self) -> Gateway:
        if self.trust_anchor is None and self.pinned_sha256 is None:
            raise ValueError("the gateway needs trust_anchor or pinned_sha256")
        return self


class Endpoint(Strict):
    """An external market participant's endpoint reached through the CLS proxy."""

    name: Ident
    host: str = Field(min_length=1, max_length=255, description="host name or IP as the SMGW should reach it")
    port: Port
    listen_port: Port = Field(description="local forwarding port")
    listen_host: str = "127.0.0.1"
    purpose: Literal["ocpp", "clseedi", "other"] = Field(
        default="other", description="ocpp endpoints are only opened with functions.ocpp_via_smgw")


class Inbound(Strict):
    """The TLS server for channels opened by the operator through the SMGW."""

    enabled: bool = False
    host: str = "0.0.0.0"
    port: Port = 8443
    gateway_ca: Path | None = Field(default=None,
                                    description="CA of the SMGW client certificate (default: trust_anchor)")
    allowed_sha256: list[str] = Field(
        default_factory=list,
        description="fingerprints of the SMGW certificates accepted; default gateway.pinned_sha256 "
                    "(if neither is set, any certificate of gateway_ca whose name matches "
                    "gateway.server_name, or any of gateway_ca when that is unset)")
    certificate: str | None = Field(default=None, description="server certificate from the store; "
                                                              "default the selected client certificate")
    handshake_timeout_s: float = Field(default=10.0, gt=0, le=120)
    max_connections: int = Field(default=16, ge=1, le=1000)

    @field_validator("allowed_sha256")
    @classmethod
    def _fps(cls, v: list[str]) -> list[str]:
        import re

        out = []
        for fp in v:
            if not re.match(_FINGERPRINT, fp):
                raise ValueError(f"not a SHA-256 fingerprint: {fp!r}")
            out.append(normalize_fingerprint(fp))
        return out


class ClsEedi(Strict):
    enabled: bool = False
    endpoint: Ident | None = Field(default=None, description="the endpoint that carries the operator's MQTT")
    host: str | None = Field(default=None, description="operator broker reached directly (no SMGW); "
                                                       "only when endpoint is unset")
    port: Port | None = None
    server_name: str | None = Field(default=None, description="TLS name of the operator broker; "
                                                              "default the endpoint's host")
    device_id: str = Field(default="chargegate", min_length=1, max_length=64, pattern=r"^[^/#+]+$")
    source: str | None = Field(default=None, max_length=256,
                               description="CloudEvents source; default chargegate/<device_id>")
    topic_to_device: str | None = Field(default=None, description="default clseedi/to-localdevice/<id>")
    topic_from_device: str | None = Field(default=None, description="default clseedi/from-localdevice/<id>")
    client_id: str | None = Field(default=None, max_length=64, description="MQTT client id")
    username: str | None = None
    password: Secret | None = None
    tls: bool = True
    ca_file: Path | None = Field(default=None, description="CA of the operator broker; default system CAs")
    client_certificate: bool = Field(default=False,
                                     description="present the store certificate to the operator")
    qos: Literal[0, 1, 2] = 1
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    read_on_connect: bool = Field(default=True, description="send read on connect")
    require_controller: bool = Field(
        default=True, description="acknowledge a limit only while the load-controller reports online")
    gcp_meter_id: str | None = Field(default=None, max_length=256,
                                     description="id of the grid connection point")
    gcp_id_type: str | None = Field(default=None, max_length=64, description="e.g. DIN-43863-5")
    measurement_max_age_s: float = Field(default=60.0, gt=0)
    notify_min_interval_s: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _where(self) -> ClsEedi:
        if self.enabled and self.endpoint is None and (self.host is None or self.port is None):
            raise ValueError("clseedi needs endpoint (through the SMGW) or host and port")
        return self

    @property
    def to_device(self) -> str:
        return self.topic_to_device or f"clseedi/to-localdevice/{self.device_id}"

    @property
    def from_device(self) -> str:
        return self.topic_from_device or f"clseedi/from-localdevice/{self.device_id}"

    @property
    def event_source(self) -> str:
        return self.source or f"chargegate/{self.device_id}"


class HttpApi(Strict):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 8090
    house_power_w: float = Field(default=24000, gt=0, le=10_000_000, description="AVAIL=100 means this much")
    tokens: list[Secret] = Field(default_factory=list, description="bearer tokens allowed to use the API")
    inbound_source: Literal["dso", "supplier"] = Field(
        default="supplier", description="whose limit AVAIL set through the inbound channel is")


class Functions(Strict):
    """Operator functions of the reference product; all off until the installer switches them on."""

    ocpp_via_smgw: bool = Field(default=False, description="function 1: OCPP through the SMGW")
    power_reduction: bool = Field(default=False, description="function 2: operator may reduce power")
    tariffs: bool = Field(default=False, description="function 3: operator tariff signals")


class Smgw(Strict):
    enabled: bool = False
    gateway: Gateway | None = None
    cert_store: Path | None = Field(default=None, description="default state_dir/certs")
    certificate: str | None = Field(default=None, description="client certificate in the store; "
                                                              "default: `chargegate cert select`")
    proxy: Literal["socks5", "sni"] = "socks5"
    tls_version: Literal["1.2", "1.3", "auto"] = Field(
        default="auto", description="auto: TLS 1.3 when the gateway offers it, else 1.2")
    keepalive_s: float = Field(default=30.0, gt=0, le=3600, description="link probe interval while idle")
    reconnect_min_s: float = Field(default=0.5, gt=0, le=60)
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600)
    functions: Functions = Field(default_factory=Functions)
    endpoints: list[Endpoint] = Field(default_factory=list)
    inbound: Inbound = Field(default_factory=Inbound)
    clseedi: ClsEedi = Field(default_factory=ClsEedi)
    http_api: HttpApi = Field(default_factory=HttpApi)
    limit_source: Literal["dso", "supplier"] = "dso"
    limit_scope: Literal["grid", "controllable"] = Field(
        default="controllable", description="what an LPC limit bounds (AVAIL: always grid)")
    failsafe_power_w: float = Field(default=4200, ge=0, le=10_000_000,
                                    description="LPC failsafe consumption limit until the operator sets one")
    failsafe_duration_s: float = Field(default=7200, ge=1, le=86400,
                                       description="LPC failsafe duration minimum (LPC: 2 h .. 24 h)")
    on_link_loss: Literal["failsafe", "keep"] = Field(
        default="failsafe", description="with power_reduction on: what a lost operator link means")
    link_loss_grace_s: float = Field(default=120, ge=0, le=3600,
                                     description="how long the operator link may be lost before failsafe")
    limit_heartbeat_s: float = Field(default=30, gt=0, le=600,
                                     description="grid limits are republished this often")
    limit_hold_s: float = Field(default=120, gt=0, le=3600,
                                description="valid_until of a republished limit (now + this)")

    @model_validator(mode="after")
    def _gateway(self) -> Smgw:
        if self.enabled and self.gateway is None:
            raise ValueError("smgw.enabled needs smgw.gateway")
        names = [e.name for e in self.endpoints]
        if len(set(names)) != len(names):
            raise ValueError("smgw.endpoints has a duplicate name")
        listens = [(e.listen_host, e.listen_port) for e in self.endpoints]
        if len(set(listens)) != len(listens):
            raise ValueError("two smgw.endpoints use the same listen_host:listen_port")
        if self.clseedi.enabled and self.clseedi.endpoint and self.clseedi.endpoint not in names:
            raise ValueError(f"clseedi.endpoint {self.clseedi.endpoint!r} is not in smgw.endpoints")
        if (self.clseedi.enabled and self.inbound.enabled
                and self.http_api.inbound_source == self.limit_source):
            raise ValueError("http_api.inbound_source must differ from limit_source when CLS.EEDI and the "
                             "inbound channel are both on (each source publishes one limit)")
        if self.limit_hold_s <= self.limit_heartbeat_s:
            raise ValueError("limit_hold_s must be longer than limit_heartbeat_s")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s is below reconnect_min_s")
        return self

    def endpoint(self, name: str) -> Endpoint:
        for e in self.endpoints:
            if e.name == name:
                return e
        raise KeyError(name)

    def route(self, host: str, port: int) -> Endpoint | None:
        """The endpoint for ``host:port`` when it must be reached through the SMGW (else ``None``).

        Connect to ``listen_host:listen_port`` instead, and keep ``host`` for TLS (SNI and the
        certificate check) and the HTTP Host header: the channel is transparent.
        """
        if not self.enabled:
            return None
        for e in self.endpoints:
            if e.host.lower() == host.lower() and e.port == port:
                if e.purpose == "ocpp" and not self.functions.ocpp_via_smgw:
                    return None
                return e
        return None
