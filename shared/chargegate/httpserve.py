"""uvicorn inside a service's event loop, on a socket the service bound, optionally with TLS.

Used by the services that serve HTTP (smgw-link's admin and variables APIs, the web page); imported
only by them, so the other services never load uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from dataclasses import dataclass
from typing import Any

import uvicorn


class EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside our loop: the service runtime owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def]
        yield


@dataclass
class HttpServer:
    server: EmbeddedUvicorn
    task: asyncio.Task[None]
    sock: socket.socket

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    async def stop(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(self.task, 5)
        self.sock.close()


def server_tls(cert_file: object, key_file: object) -> ssl.SSLContext:
    """A TLS server context (TLS 1.2 and newer) with the service's certificate chain and key."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


def listen(host: str, port: int, backlog: int = 64) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 when the host has a colon), bound as servers bind."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


async def serve_http(app: Any, sock: socket.socket, ssl_context: ssl.SSLContext | None = None, *,
                     http: Any = None, name: str = "http") -> HttpServer:
    """Serve ``app`` on ``sock`` (with ``ssl_context``: TLS; ``http``: a uvicorn HTTP protocol class)."""
    kwargs: dict[str, Any] = {}
    if ssl_context is not None:
        kwargs["ssl_context_factory"] = lambda _cfg, _default: ssl_context
    if http is not None:
        kwargs["http"] = http
    cfg = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=2,
                         **kwargs)
    server = EmbeddedUvicorn(cfg)
    task = asyncio.create_task(server.serve(sockets=[sock]), name=name)
    for _ in range(500):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    if task.done() and not task.cancelled() and task.exception() is not None:
        sock.close()
        raise task.exception()  # type: ignore[misc]
    return HttpServer(server, task, sock)
