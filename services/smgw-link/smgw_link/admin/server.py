"""Where the admin API is served: the local listener (``admin.host:port``, TLS with client
certificates when ``admin.tls`` is set) and, behind the SMGW's inbound channel, every path under
``/v1`` of the connection that the inbound TLS server hands to the local HTTP API
(:meth:`AdminServer.inbound_app`: the one place that routes by path).

The web framework (FastAPI, starlette, uvicorn) is imported when the admin API is first served or asked
for, not with the service: an smgw-link without ``admin.enabled`` never loads it (bench/footprint)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from chargegate.config import Config
from chargegate.runtime import ServiceContext
from smgw_link.admin.core import AdminService, LinkService

if TYPE_CHECKING:
    from smgw_link.admin.app import Audited, Receive, Scope, Send
    from smgw_link.httpserve import _HttpServer

log = structlog.get_logger("smgw_link.admin")

ADMIN_PREFIX = "/v1"


def admin_path(path: str) -> bool:
    return path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")


def tls_context(config: Config) -> ssl.SSLContext | None:
    t = config.admin.tls
    if t is None:
        return None
    from chargegate.httpserve import server_tls  # uvicorn only where an HTTP API is served

    ctx = server_tls(t.cert_file, t.key_file)
    if t.client_ca_file is not None:
        ctx.load_verify_locations(str(t.client_ca_file))
        ctx.verify_mode = ssl.CERT_OPTIONAL  # token users come without a certificate
    return ctx


class AdminServer:
    def __init__(self, ctx: ServiceContext, link_of: Callable[[], LinkService | None]) -> None:
        self.ctx = ctx
        self.service = AdminService(ctx, link_of)
        self._apps: tuple[Any, Audited, Audited] | None = None
        self.http: _HttpServer | None = None
        self._listen_key: tuple[Any, ...] | None = None
        self._restart: asyncio.Task[None] | None = None

    def _built(self) -> tuple[Any, Audited, Audited]:
        if self._apps is None:  # the first time the admin API is served: FastAPI is imported here
            from smgw_link.admin.app import Audited, make_app

            app = make_app(self.service)
            self._apps = (app, Audited(app, self.service, "local"), Audited(app, self.service, "inbound"))
        return self._apps

    @property
    def app(self) -> Any:
        """The admin API's FastAPI application."""
        return self._built()[0]

    @property
    def local_app(self) -> Audited:
        return self._built()[1]

    @property
    def inbound_admin(self) -> Audited:
        return self._built()[2]

    @property
    def port(self) -> int | None:
        return self.http.port if self.http is not None else None

    def inbound_app(self, variables_app: Any) -> Any:
        """The ASGI app behind the inbound channel: ``/v1/...`` to the admin API (when enabled),
        everything else to the variables API."""

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and admin_path(scope.get("path", "")) and self.ctx.config.admin.enabled:
                await self.inbound_admin(scope, receive, send)
            else:
                await variables_app(scope, receive, send)

        return app

    def _key(self, config: Config) -> tuple[Any, ...]:
        a = config.admin
        return (a.enabled, a.host, a.port, a.tls)

    async def start(self) -> None:
        self._listen_key = self._key(self.ctx.config)
        await self._listen(self.ctx.config)
        if self.ctx.config.smgw.enabled:
            self.service.switcher.resume()

    async def reconfigure(self, config: Config) -> None:
        """Apply admin settings: the listener restarts only when its own settings changed - in the
        background, so that the request that made the change (served by it) is answered first."""
        self.service.view.resize(config.admin.log_buffer)
        if config.admin.enabled:
            self.service.attach_view()
        key = self._key(config)
        if key == self._listen_key:
            return
        self._listen_key = key
        if self._restart is not None and not self._restart.done():
            self._restart.cancel()
        self._restart = asyncio.create_task(self._listen(config), name="smgw-link.admin-listener")

    async def _listen(self, config: Config) -> None:
        await self._stop_listener()
        a = config.admin
        if not a.enabled:
            return
        if not a.tokens and not a.clients:
            log.warning("admin API has no tokens or client certificates: every request will be refused")
        from smgw_link.httpserve import listen, serve_http

        try:
            ctx = tls_context(config)
            sock = listen(a.host, a.port)
        except (OSError, ssl.SSLError, ValueError) as e:
            self.ctx.counters["admin_listen_failed"] += 1
            log.error("admin API cannot listen", listen=f"{a.host}:{a.port}", error=str(e))
            return
        self.http = await serve_http(self.local_app, sock, ctx)
        log.info("admin API ready", listen=f"{a.host}:{self.http.port}", tls=ctx is not None,
                 client_certificates=len(a.clients))

    async def _stop_listener(self) -> None:
        if self.http is not None:
            with contextlib.suppress(Exception):
                await self.http.stop()
            self.http = None

    async def stop(self) -> None:
        await self.service.switcher.stop()
        if self._restart is not None and not self._restart.done():
            self._restart.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._restart
        await self._stop_listener()
