"""Helpers for the smgw-link tests: the service run in this process, a minimal HTTP/1.1 client over real
TCP (optionally TLS, or an already open channel such as the SMGW simulator's inbound connection) and
configuration text."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from chargegate import config as cfgmod
from chargegate.broker import free_port
from chargegate.runtime import ServiceContext, start_context, stop_context
from conftest import BrokerHandle
from smgw_link.service import serve
from smgw_link.sim.smgw import http_request

ADMIN_TOKEN = "admin-token-0123456789abcdef"
OPERATOR_TOKEN = "operator-token-0123456789abcdef"
VIEWER_TOKEN = "viewer-token-0123456789abcdef"
VARS_TOKEN = "vars-token-0123456789"

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def running_link(cfg: cfgmod.Config, path: Path) -> AsyncIterator[ServiceContext]:
    """smgw-link in this process (its ``serve`` as a task) on ``cfg``; cancelled and stopped on exit."""
    ctx = await start_context("smgw-link", cfg, path, connect_timeout=5)
    task = asyncio.create_task(serve(ctx))
    try:
        yield ctx
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await stop_context(ctx)


def listen_port() -> int:
    """A free port for a test server (below the ephemeral range: see ``chargegate.broker.free_port``)."""
    return free_port()


async def request(streams: Streams, method: str, path: str, token: str | None = None, body: Any = None,
                  raw: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One request on ``streams`` (closed afterwards); the answer's JSON (or text)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    status, payload = await http_request(streams, method, path, token, data, headers=headers, read_timeout_s=30)
    try:
        return status, json.loads(payload) if payload else None
    except ValueError:
        return status, payload.decode(errors="replace")


async def api(port: int, method: str, path: str, token: str | None = ADMIN_TOKEN, body: Any = None,
              tls: ssl.SSLContext | None = None, **kw: Any) -> tuple[int, Any]:
    streams = await asyncio.open_connection("127.0.0.1", port, ssl=tls,
                                            server_hostname="localhost" if tls else None)
    return await request(streams, method, path, token, body, **kw)


def admin_yaml(port: int) -> str:
    return f"""
admin:
  enabled: true
  host: 127.0.0.1
  port: {port}
  keep_versions: 5
  switch_timeout_s: 3
  tokens:
    - {{name: alice, role: admin, token: "{ADMIN_TOKEN}"}}
    - {{name: olga, role: operator, token: "{OPERATOR_TOKEN}"}}
    - {{name: vera, role: viewer, token: "{VIEWER_TOKEN}"}}
"""


def accounts_yaml(broker: BrokerHandle, *names: str) -> str:
    accounts = {a: broker.password(a) for a in names}
    return f"broker:\n  port: {broker.port}\n  accounts: {json.dumps(accounts)}\n"
