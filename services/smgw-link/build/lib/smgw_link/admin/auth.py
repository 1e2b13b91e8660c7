"""Who is asking: bearer tokens and client certificates mapped to roles.

Every request is authenticated on its own. A bearer token from ``admin.tokens`` works on every
listener; a client certificate from ``admin.clients`` only on the local TLS listener (through the
SMGW's inbound channel the TLS peer is the gateway, which authenticates the channel, not the
person). Tokens are compared in constant time against every configured token.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Literal

import structlog
from cryptography import x509
from cryptography.x509.oid import NameOID

from chargegate.config import Admin
from smgw_link.tlsconf import fingerprint

log = structlog.get_logger("smgw_link.admin.auth")

Role = Literal["admin", "operator", "viewer"]
Via = Literal["local", "local-tls", "inbound"]
RANK: dict[str, int] = {"viewer": 0, "operator": 1, "admin": 2}


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role
    method: Literal["token", "certificate"]
    via: Via

    def may(self, role: Role) -> bool:
        return RANK[self.role] >= RANK[role]


def by_token(admin: Admin, token: str | None, via: Via) -> Principal | None:
    if not token:
        return None
    found: Principal | None = None
    given = token.encode()
    for t in admin.tokens:
        try:
            secret = t.token.reveal()
        except LookupError as e:
            log.error("admin token not available", token_name=t.name, error=str(e))
            continue
        # compare with every token (no early exit): the time does not tell which one matched
        if secrets.compare_digest(given, secret.encode()) and found is None and secret:
            found = Principal(t.name, t.role, "token", via)
    return found


def by_certificate(admin: Admin, der: bytes | None) -> Principal | None:
    """The client certificate (already verified against ``admin.tls.client_ca_file`` by the TLS
    handshake) mapped to a role by fingerprint or subject common name."""
    if der is None or not admin.clients:
        return None
    fp = fingerprint(der)
    cn: str | None = None
    try:
        attrs = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(attrs[0].value) if attrs else None
    except ValueError:
        return None
    for c in admin.clients:
        if (c.sha256 is not None and secrets.compare_digest(c.sha256, fp)) or (
                c.common_name is not None and cn is not None and c.common_name == cn):
            return Principal(c.name, c.role, "certificate", "local-tls")
    return None
