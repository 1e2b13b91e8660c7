"""The web page (``web:``) and Home Assistant's MQTT discovery (``homeassistant:``), both served by the web
service."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from chargegate.config.base import LocatedErrors, Port, Secret, Strict, twice

Role = Literal["admin", "operator", "viewer"]

# the networks "on the LAN" means by default: private IPv4, link-local, loopback, IPv6 unique-local
LAN_DEFAULT = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "127.0.0.0/8",
               "::1/128", "fc00::/7", "fe80::/10"]


class WebUser(Strict):
    """An account of the web page. Roles as in the admin API: ``viewer`` reads, ``admin`` also sets
    charging modes (``web.mode_role``)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@\-]*$")
    role: Role
    password: Secret


class WebTls(Strict):
    cert_file: Path
    key_file: Path


class Web(Strict):
    enabled: bool = True
    host: str = Field(default="127.0.0.1", description="address the page listens on (0.0.0.0: every interface)")
    port: Port = 8080
    tls: WebTls | None = Field(default=None, description="serve HTTPS; the session cookie is then Secure")
    users: list[WebUser] = Field(default_factory=list)
    admin_tokens: bool = Field(default=True, description="the admin API's tokens log in too (name and token)")
    view: Literal["login", "lan"] = Field(
        default="login", description="login: every page needs a login; lan: viewing is open from lan_networks "
                                     "(setting a mode still needs a login)")
    lan_networks: list[str] = Field(default_factory=lambda: list(LAN_DEFAULT))
    mode_role: Role = Field(default="admin", description="the role that may set a charging mode (as in the "
                                                         "admin API's PUT /v1/evses/{id}/mode)")
    session_hours: float = Field(default=24 * 30, gt=0, le=24 * 365, description="how long a login lasts")
    max_sessions: int = Field(default=1000, ge=1, le=100_000, description="logins kept at once (oldest go first)")
    max_clients: int = Field(default=64, ge=1, le=10_000, description="live (event stream) connections at once")
    login_attempts: int = Field(default=10, ge=1, le=1000,
                                description="failed logins per client address in 5 minutes before it must wait")

    @field_validator("lan_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for n in v:
            try:
                ipaddress.ip_network(n, strict=False)
            except ValueError as e:
                raise ValueError(f"{n!r} is not a network (e.g. 192.168.0.0/16): {e}") from None
        return v

    @model_validator(mode="after")
    def _unique(self) -> Web:
        errs = twice([(("users", j, "name"), u.name) for j, u in enumerate(self.users)], "web user name")
        if errs:
            raise LocatedErrors(errs)
        return self


class HomeAssistant(Strict):
    """MQTT discovery for Home Assistant, published by the web service."""

    enabled: bool = False
    discovery_prefix: str = Field(default="homeassistant", pattern=r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")
    node_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_\-]{1,64}$",
                                description="the discovery topics' node id and the prefix of every unique_id; "
                                            "default: site.topic_root with '/' as '_'")

    def node(self, topic_root: str) -> str:
        return self.node_id or topic_root.replace("/", "_")
