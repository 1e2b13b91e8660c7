"""A small HTTP/1.1 server for simulated devices with a local JSON API (e.g. the Shelly Pro 3EM).

Routes map a path (query included, as the device documents it) to a function returning the JSON
document. Anything else is 404. Each answer closes the connection, as the poller asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import structlog

log = structlog.get_logger("evse-poller.sim")

Route = Callable[[], Any]


class HttpEndpoint:
    """One host:port answering GET requests from ``routes``."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.framing = "http"
        self.routes: dict[tuple[str, tuple[tuple[str, str], ...]], Route] = {}
        self.maps: dict[int, Any] = {}  # for the runner's bookkeeping (unit ids do not exist over HTTP)
        self.requests = 0
        self.status_override: int | None = None  # tests: answer every request with this status
        self.body_override: bytes | None = None  # tests: answer every request with this body
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def route(self, target: str, fn: Route) -> None:
        key = _key(target)
        if key in self.routes:
            raise ValueError(f"{self.host}:{self.port} {target} is simulated twice")
        self.routes[key] = fn

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            for w in list(self._writers):
                w.close()
            with contextlib.suppress(Exception):
                await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split(" ")
            self.requests += 1
            if len(parts) != 3 or parts[0] != "GET":
                status, body = 405, b'{"code":405,"message":"only GET"}'
            elif self.status_override is not None:
                status, body = self.status_override, b'{"code":-1,"message":"simulated"}'
            elif self.body_override is not None:
                status, body = 200, self.body_override
            else:
                fn = self.routes.get(_key(parts[1]))
                if fn is None:
                    status, body = 404, b'{"code":404,"message":"No handler"}'
                else:
                    status, body = 200, json.dumps(fn()).encode()
            reason = {200: "OK", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed"}.get(status, "Error")
            writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _key(target: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    u = urlsplit(target)
    return u.path, tuple(sorted(parse_qsl(u.query)))
