"""SMGW link settings: HAN TLS, CLS channels, operator control and the variables API."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from chargegate.config.base import Ident, Port, Secret, Strict


class Gateway(Strict):
    host: str = Field(description="the SMGW's HAN address (IP or host name)")
    port: Port = 443
    server_name: str | None = Field(default=None, description="expected name in the gateway certificate")
    trust_anchor: Path | None = Field(default=None, description="CA file for the gateway's certificate")
    pinned_sha256: str | None = Field(default=None, pattern=r"^[0-9A-Fa-f:]{64,95}$",
                                      description="SHA-256 fingerprint of the gateway certificate")

    @model_validator(mode="after")
    def _trust(self) -> Gateway:
        if self.trust_anchor is None and self.pinned_sha256 is None:
            raise ValueError("the gateway needs trust_anchor or pinned_sha256")
        return self


class Endpoint(Strict):
    """An external market participant's endpoint reached through the CLS proxy."""

    name: Ident
    host: str
    port: Port
    listen_port: Port = Field(description="local forwarding port on 127.0.0.1")
    listen_host: str = "127.0.0.1"


class Inbound(Strict):
    """The TLS server for channels opened by the operator through the SMGW."""

    enabled: bool = False
    host: str = "0.0.0.0"
    port: Port = 8443
    gateway_ca: Path | None = Field(default=None, description="CA of the SMGW certificate (client auth)")


class ClsEedi(Strict):
    enabled: bool = False
    endpoint: Ident | None = Field(default=None, description="the endpoint that carries the operator's MQTT")
    device_id: str = Field(default="chargegate", min_length=1, max_length=64)
    topic_to_device: str | None = Field(default=None, description="default clseedi/to-localdevice/<device_id>")
    topic_from_device: str | None = Field(default=None, description="default clseedi/from-localdevice/<device_id>")
    username: str | None = None
    password: Secret | None = None
    tls: bool = True
    ca_file: Path | None = None


class HttpApi(Strict):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 8090
    house_power_w: float = Field(default=24000, gt=0, description="AVAIL=100 means this much")
    tokens: list[Secret] = Field(default_factory=list, description="bearer tokens allowed to set variables")


class Functions(Strict):
    ocpp_via_smgw: bool = Field(default=False, description="function 1: OCPP through the SMGW")
    power_reduction: bool = Field(default=False, description="function 2: operator may reduce power")
    tariffs: bool = Field(default=True, description="function 3: tariff signals")


class Smgw(Strict):
    enabled: bool = False
    gateway: Gateway | None = None
    cert_store: Path | None = Field(default=None, description="default state_dir/certs")
    certificate: str | None = Field(default=None, description="name of the selected client certificate")
    proxy: Literal["socks5", "sni"] = "socks5"
    keepalive_s: float = Field(default=30.0, gt=0)
    functions: Functions = Field(default_factory=Functions)
    endpoints: list[Endpoint] = Field(default_factory=list)
    inbound: Inbound = Field(default_factory=Inbound)
    clseedi: ClsEedi = Field(default_factory=ClsEedi)
    http_api: HttpApi = Field(default_factory=HttpApi)
    limit_source: Literal["dso", "supplier"] = "dso"
    tls_version: Literal["1.2", "1.3", "auto"] = "auto"

    @model_validator(mode="after")
    def _gateway(self) -> Smgw:
        if self.enabled and self.gateway is None:
            raise ValueError("smgw.enabled needs smgw.gateway")
        names = [e.name for e in self.endpoints]
        if len(set(names)) != len(names):
            raise ValueError("smgw.endpoints has a duplicate name")
        if self.clseedi.enabled and self.clseedi.endpoint and self.clseedi.endpoint not in names:
            raise ValueError(f"clseedi.endpoint {self.clseedi.endpoint!r} is not in smgw.endpoints")
        return self


