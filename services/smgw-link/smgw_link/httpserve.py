"""smgw-link's HTTP servers (chargegate.httpserve), and the client certificate of each TLS connection.

With TLS, :class:`PeerCertProtocol` remembers each connection's client certificate (verified by
the handshake) by the client address, so that the app can map it to a person
(:func:`peer_certificate`): ASGI scopes carry no TLS details.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from chargegate.httpserve import EmbeddedUvicorn as _Uvicorn
from chargegate.httpserve import HttpServer as _HttpServer
from chargegate.httpserve import listen
from chargegate.httpserve import serve_http as _serve

__all__ = ["PeerCertProtocol", "_HttpServer", "_Uvicorn", "listen", "peer_certificate", "serve_http"]

_PEERS: dict[tuple[str, int], bytes] = {}


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


async def serve_http(app: Any, sock: socket.socket, ssl_context: ssl.SSLContext | None = None) -> _HttpServer:
    """smgw-link's servers: with TLS, each connection's client certificate is kept (:func:`peer_certificate`)."""
    return await _serve(app, sock, ssl_context, http=PeerCertProtocol if ssl_context is not None else None,
                        name="smgw-link.http")
