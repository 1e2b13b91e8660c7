"""uvicorn inside the service's event loop, on a socket we bound, optionally with TLS.

With TLS, :class:`PeerCertProtocol` remembers each connection's client certificate (verified by
the handshake) by the client address, so that the app can map it to a person
(:func:`peer_certificate`): ASGI scopes carry no TLS details.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

_PEERS: dict[tuple[str, int], bytes] = {}


class _Uvicorn(uvicorn.Server):
    """uvicorn inside our loop: the service runtime owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def]
        yield


class PeerCertProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    _peer_key: tuple[str, int] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        obj = transport.get_extra_info("ssl_object")
        addr = transport.get_extra_info("peername")
        der = obj.getpeercert(binary_form=True) if obj is not None else None
        if der and isinstance(addr, tuple) and len(addr) >= 2:
            self._peer_key = (str(addr[0]), int(addr[1]))
            _PEERS[self._peer_key] = der

    def connection_lost(self, exc: Exception | None) -> None:
        if self._peer_key is not None:
            _PEERS.pop(self._peer_key, None)
        super().connection_lost(exc)


def peer_certificate(client: tuple[str, int] | None) -> bytes | None:
    """The verified client certificate (DER) of the TLS connection from ``client``."""
    if client is None:
        return None
    return _PEERS.get((str(client[0]), int(client[1])))


@dataclass
class _HttpServer:
    server: _Uvicorn
    task: asyncio.Task[None]
    sock: socket.socket

    async def stop(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(self.task, 5)
        self.sock.close()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])


async def serve_http(app: Any, sock: socket.socket, ssl_context: ssl.SSLContext | None = None) -> _HttpServer:
    kwargs: dict[str, Any] = {}
    if ssl_context is not None:
        kwargs = {"ssl_context_factory": lambda _cfg, _default: ssl_context, "http": PeerCertProtocol}
    cfg = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=2,
                         **kwargs)
    server = _Uvicorn(cfg)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="smgw-link.http")
    for _ in range(200):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    return _HttpServer(server, task, sock)


def listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    return sock
