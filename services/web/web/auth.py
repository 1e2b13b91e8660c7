"""Who is looking: web accounts and the admin API's tokens, login sessions, CSRF tokens, the LAN rule.

Roles as in the admin API (``viewer`` < ``operator`` < ``admin``). A login is a random session id in a
cookie (``HttpOnly``, ``SameSite=Strict``, ``Secure`` when the page is served over TLS) that maps, in this
process only, to the account and a CSRF token; every request that changes something must carry that token
(form field ``csrf`` or header ``X-CSRF-Token``) and, when the browser sends one, an ``Origin`` of the page
itself. The login form is protected the same way with a token bound to a pre-login cookie. Passwords and
tokens are compared in constant time against every account; failed logins are limited per client address.
"""

from __future__ import annotations

import ipaddress
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

import structlog

from chargegate.config import Config

log = structlog.get_logger("web.auth")

Role = Literal["admin", "operator", "viewer"]
RANK: dict[str, int] = {"viewer": 0, "operator": 1, "admin": 2}
SESSION_COOKIE = "cg_session"
PRE_COOKIE = "cg_login"
THROTTLE_WINDOW_S = 300.0


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role
    method: Literal["password", "token", "lan"]

    def may(self, role: str) -> bool:
        return RANK[self.role] >= RANK[role]

    @property
    def logged_in(self) -> bool:
        return self.method != "lan"


ANONYMOUS_LAN = Principal("(LAN)", "viewer", "lan")


def check_password(config: Config, name: str, password: str) -> Principal | None:
    """The account ``name`` / ``password`` from ``web.users`` (and the admin API's tokens: the token's name
    and the token), or None. Every account is compared, so the time does not tell which one matched."""
    found: Principal | None = None
    given_name, given_pw = name.encode(), password.encode()
    candidates: list[tuple[str, Role, str, Literal["password", "token"]]] = []
    for u in config.web.users:
        try:
            candidates.append((u.name, u.role, u.password.reveal(), "password"))
        except LookupError as e:
            log.error("web account password not available", account=u.name, error=str(e))
    if config.web.admin_tokens:
        for t in config.admin.tokens:
            try:
                candidates.append((t.name, t.role, t.token.reveal(), "token"))
            except LookupError as e:
                log.error("admin token not available", token_name=t.name, error=str(e))
    for cname, role, secret, method in candidates:
        ok_name = secrets.compare_digest(given_name, cname.encode())
        ok_pw = secrets.compare_digest(given_pw, secret.encode())
        if ok_name and ok_pw and secret and found is None:
            found = Principal(cname, role, method)
    return found


def on_lan(config: Config, host: str | None) -> bool:
    if not host:
        return False
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in ipaddress.ip_network(n, strict=False) for n in config.web.lan_networks)


@dataclass
class Session:
    principal: Principal
    csrf: str
    created: float
    expires: float


@dataclass
class Sessions:
    """Login sessions of this process (at most ``limit``; the oldest go first)."""

    limit: int = 1000
    ttl_s: float = 30 * 86400.0
    items: OrderedDict[str, Session] = field(default_factory=OrderedDict)

    def create(self, principal: Principal, now: float | None = None) -> tuple[str, Session]:
        now = time.monotonic() if now is None else now
        sid = secrets.token_urlsafe(32)
        s = Session(principal, secrets.token_urlsafe(32), now, now + self.ttl_s)
        self.items[sid] = s
        while len(self.items) > self.limit:
            self.items.popitem(last=False)
        return sid, s

    def get(self, sid: str | None, now: float | None = None) -> Session | None:
        if not sid:
            return None
        s = self.items.get(sid)
        if s is None:
            return None
        if (time.monotonic() if now is None else now) >= s.expires:
            self.items.pop(sid, None)
            return None
        return s

    def drop(self, sid: str | None) -> None:
        if sid:
            self.items.pop(sid, None)

    def drop_unknown(self, known: set[str]) -> int:
        """After a configuration change: end the sessions of accounts that no longer exist."""
        gone = [sid for sid, s in self.items.items() if s.principal.name not in known]
        for sid in gone:
            self.items.pop(sid, None)
        return len(gone)


@dataclass
class Throttle:
    """Failed logins per client address: at most ``limit`` in ``window_s``; the addresses remembered are
    bounded (an LRU of ``keys``)."""

    limit: int = 10
    window_s: float = THROTTLE_WINDOW_S
    keys: int = 4096
    failures: OrderedDict[str, list[float]] = field(default_factory=OrderedDict)

    def blocked(self, client: str, now: float | None = None) -> float:
        """Seconds the client still has to wait (0: it may try)."""
        now = time.monotonic() if now is None else now
        times = [t for t in self.failures.get(client, []) if now - t < self.window_s]
        if len(times) < self.limit:
            return 0.0
        return self.window_s - (now - times[0])

    def failed(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        times = [t for t in self.failures.pop(client, []) if now - t < self.window_s]
        times.append(now)
        self.failures[client] = times[-self.limit:]
        while len(self.failures) > self.keys:
            self.failures.popitem(last=False)

    def succeeded(self, client: str) -> None:
        self.failures.pop(client, None)


def same_origin(origin: str | None, host: str | None, scheme: str) -> bool:
    """A request from a page of this site: no ``Origin`` (a form post of an older browser, a script tool that
    already holds the CSRF token) or one that names this host."""
    if origin is None:
        return True
    if not host:
        return False
    return origin in (f"{scheme}://{host}",)
