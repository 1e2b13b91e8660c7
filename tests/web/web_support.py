"""Helpers of the web service's tests: a broker whose ACL has Home Assistant's discovery in it, the web and
history services in-process, an HTTP client that logs in (blocking calls run in a thread: the services
share the test's event loop), and a reader of the page's Server-Sent Events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from chargegate import config as cfgmod
from chargegate.broker import LocalBroker, free_port
from chargegate.runtime import ServiceContext, start_context, stop_context
from conftest import BrokerHandle
from history.service import History
from web.service import WebService

CONFIG = """
site: {{name: web-test, timezone: Europe/Berlin}}
state_dir: {state}
broker: {{port: {broker}}}
circuits:
  - id: grid
    name: house connection
    fuse_a: 35
    meter: gm
    children:
      - {{id: garage, fuse_a: 25}}
evses:
  - {{id: w1, name: Garage, circuit: garage, max_current_a: 16,
     modbus: {{profile: alfen-eve, host: 127.0.0.1, port: 1502}}}}
  - {{id: w2, circuit: garage, phases: 1, phase_rotation: [2], ocpp: {{charge_box_id: CB2}}}}
meters:
  - {{id: gm, modbus: {{profile: sdm630, host: 127.0.0.1, port: 1503}}}}
web:
  port: {web}
  login_attempts: 3
  users:
    - {{name: anna, role: admin, password: secret-a}}
    - {{name: ben, role: viewer, password: secret-b}}
homeassistant: {{enabled: true}}
"""


def write_config(tmp: Path, broker_port: int, web_port: int, text: str = CONFIG, state: Path | None = None) -> Path:
    """The configuration file in ``tmp``; ``state``: the state folder (its generated broker passwords) of
    another configuration for the same broker."""
    path = tmp / "chargegate.yaml"
    path.write_text(text.format(state=state or tmp / "state", broker=broker_port, web=web_port))
    return path


def ha_broker(tmp: Path) -> tuple[LocalBroker, BrokerHandle]:
    """A real Mosquitto with the project's ACL for a configuration with Home Assistant discovery on."""
    port = free_port()
    path = write_config(tmp, port, free_port())
    cfg = cfgmod.load(path)
    b = LocalBroker.prepare(cfg, port=port, persistence=False)
    b.start()
    return b, BrokerHandle(b, cfg, path)


@dataclass
class Running:
    ctx: ServiceContext
    svc: Any
    task: asyncio.Task[None]

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await stop_context(self.ctx)


async def start_web(path: Path) -> Running:
    ctx = await start_context("web", cfgmod.load(path), path, connect_timeout=5)
    svc = WebService(ctx)
    task = asyncio.create_task(svc.run())
    for _ in range(500):
        if svc.http is not None or task.done():
            break
        await asyncio.sleep(0.01)
    if task.done():
        task.result()
    return Running(ctx, svc, task)


async def start_history(path: Path) -> Running:
    ctx = await start_context("history", cfgmod.load(path), path, connect_timeout=5)
    h = History(ctx)
    return Running(ctx, h, asyncio.create_task(h.run()))


class Client:
    """A browser-like HTTP client of the page (cookies kept) whose calls run in a thread."""

    def __init__(self, base: str, verify: Any = True) -> None:
        self.base = base.rstrip("/")
        self.s = requests.Session()
        self.verify = verify  # per request: REQUESTS_CA_BUNDLE in the environment would override the session's
        self.csrf = ""

    async def get(self, path: str, **kw: Any) -> requests.Response:
        return await asyncio.to_thread(self.s.get, self.base + path, allow_redirects=False, timeout=10,
                                       verify=self.verify, **kw)

    async def post(self, path: str, **kw: Any) -> requests.Response:
        return await asyncio.to_thread(self.s.post, self.base + path, allow_redirects=False, timeout=10,
                                       verify=self.verify, **kw)

    async def login(self, name: str, password: str) -> requests.Response:
        page = await self.get("/login")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token, page.text
        r = await self.post("/login", data={"name": name, "password": password, "csrf": token.group(1)})
        if r.status_code == 303:
            main = await self.get("/")
            m = re.search(r'<meta name="csrf" content="([^"]*)"', main.text)
            self.csrf = m.group(1) if m else ""
        return r


@dataclass
class EventReader:
    """Reads ``/events`` in a thread: every event's (name, data)."""

    client: Client
    events: list[tuple[str, Any]] = field(default_factory=list)
    status: int | None = None
    _thread: Any = None

    def start(self) -> EventReader:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            with self.client.s.get(self.client.base + "/events", stream=True, timeout=30,
                                   verify=self.client.verify) as r:
                self.status = r.status_code
                name, data = "message", []
                for raw in r.iter_lines(decode_unicode=True):
                    if raw is None:
                        continue
                    if raw == "":
                        if data:
                            self.events.append((name, json.loads("\n".join(data))))
                        name, data = "message", []
                    elif raw.startswith("event:"):
                        name = raw[6:].strip()
                    elif raw.startswith("data:"):
                        data.append(raw[5:].strip())
        except (requests.RequestException, ValueError, AttributeError):
            return

    def sections(self) -> dict[str, str]:
        """The latest HTML of every section received so far."""
        out: dict[str, str] = {}
        for name, data in list(self.events):
            if name == "sections":
                out.update(data)
        return out



async def until(what: str, cond: Any, timeout: float = 10.0) -> Any:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def events(client: Client, svc: Any) -> AsyncIterator[EventReader]:
    """The page's event stream while the block runs; at its end the server closes the stream (closing a
    response another thread is reading would wait for that read)."""
    r = EventReader(client).start()
    try:
        yield r
    finally:
        svc.hub.close_all()
        await asyncio.to_thread(r._thread.join, 10)
