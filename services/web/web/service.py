"""The web service: the bus into a live state, the page over HTTP(S) with Server-Sent Events, charging modes
through the history service's command topic, and Home Assistant's MQTT discovery (``homeassistant.enabled``).

It adds no logic of its own: it shows what the services publish and the history record holds, and it
writes only ``evse/<id>/mode/set`` (as the household's other tools do) and its discovery documents.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from chargegate import payloads as p
from chargegate import record as rec
from chargegate.config import Config
from chargegate.runtime import ServiceContext, run_service
from web import render
from web.auth import Sessions, Throttle
from web.ha import Discovery, encode
from web.hub import Hub, sse
from web.state import SECTIONS, LiveState

SERVICE = "web"
RENDER_S = 0.25  # changed sections go out at most this often
TIME_SECTIONS_S = 5.0  # sections whose words depend on the clock (time left, silent services) are redone
SERIES_EVENT_S = 60.0  # the plot is told to reload (a new minute of the series)
RECORD_DAYS = 90  # the sessions and control actions the page lists come from this far back
SUBSCRIBED = ("evse.status", "evse.setpoint", "evse.mode", "evse.limit", "meter.reading", "grid.limit",
              "controller.allocation", "tariff.current", "tariff.schedule", "link.smgw", "service.health",
              "history.session", "history.control")


class RecordReader:
    """Read-only access to the history record (opened when it exists; reopened after an error)."""

    def __init__(self, path: Path, counters: Any) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None
        self.counters = counters

    def _open(self) -> sqlite3.Connection | None:
        if self.conn is None:
            try:
                self.conn = rec.open_db(self.path, readonly=True)
            except (rec.RecordError, sqlite3.Error):
                return None
        return self.conn

    def read(self, fn: Any, *args: Any, **kw: Any) -> Any:
        conn = self._open()
        if conn is None:
            return None
        try:
            return fn(conn, *args, **kw)
        except sqlite3.Error:
            self.counters["record_read_errors"] += 1
            self.close()
            return None

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self.conn.close()
            self.conn = None


class WebService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.bus = ctx.bus
        self.log = ctx.log
        self.state = LiveState()
        self.dirty: set[str] = set()
        self.sessions = Sessions(ctx.config.web.max_sessions, ctx.config.web.session_hours * 3600)
        self.throttle = Throttle(ctx.config.web.login_attempts)
        self.hub = Hub(ctx.config.web.max_clients, ctx.counters)
        self.record = RecordReader(ctx.config.history.db_path(ctx.state_dir), ctx.counters)
        self.record_cache: render.Record | None = None
        self.wake = asyncio.Event()
        self.mode_waiters: dict[str, list[asyncio.Future[p.ChargingMode]]] = {}
        self.ha_published: set[str] = set()  # discovery topics we published (retained) in this run
        self.ha_seen: set[str] = set()  # our discovery topics found retained on the broker
        self.ha_filters: tuple[str, str] | None = None  # (prefix, node) subscribed to
        self.http: Any = None
        self.url: str | None = None

    @property
    def config(self) -> Config:
        return self.ctx.config

    @property
    def tz(self) -> ZoneInfo:
        try:
            return ZoneInfo(self.config.site.timezone)
        except (KeyError, ValueError):
            return ZoneInfo("UTC")

    # -- the bus -------------------------------------------------------------------------------------------
    def subscribe(self) -> None:
        for name in SUBSCRIBED:
            self.bus.subscribe_raw(self.ctx.registry.subscription(name),
                                   lambda topic, data, retained, name=name: self.on_message(name, topic, data))
        self.subscribe_ha()

    def subscribe_ha(self) -> None:
        ha = self.config.homeassistant
        if ha.enabled and self.ha_filters != (ha.discovery_prefix, ha.node(self.config.site.topic_root)):
            self.ha_filters = (ha.discovery_prefix, ha.node(self.config.site.topic_root))
            self.bus.subscribe_raw(f"{ha.discovery_prefix}/status", self.on_ha_status)
            self.bus.subscribe_raw(Discovery(self.config).own_filter, self.on_ha_config)

    def on_message(self, name: str, topic: str, data: bytes) -> None:
        reg = self.ctx.registry
        if not data:  # an empty retained message: the state is gone
            resolved = reg.resolve(topic)
            if resolved is not None and resolved[0].name == name:
                self.mark(self.state.cleared(name, resolved[1]))
            return
        parsed = reg.parse(topic, data)  # validated (a bad payload is logged once and counted)
        if parsed is None or parsed[0].name != name:
            return
        _spec, params, payload = parsed
        self.mark(self.state.apply(name, params, payload))
        if name in ("history.session", "history.control"):
            self.record_cache = None
            if name == "history.control":
                self.hub.send(lambda aud: sse("series", {}))
        if name == "evse.mode":
            assert isinstance(payload, p.ChargingMode)
            for fut in self.mode_waiters.pop(payload.evse_id, []):
                if not fut.done():
                    fut.set_result(payload)

    def mark(self, sections: tuple[str, ...] | set[str]) -> None:
        if sections:
            self.dirty.update(sections)
            self.wake.set()

    # -- rendering -----------------------------------------------------------------------------------------
    def read_record(self) -> render.Record:
        if self.record_cache is not None:
            return self.record_cache
        since = p.utcnow() - timedelta(days=RECORD_DAYS)
        sessions = self.record.read(rec.sessions, start=since, details=True)
        controls = self.record.read(rec.controls, start=since)
        if sessions is None or controls is None:
            return render.Record([], [], available=False)
        self.record_cache = render.Record(sessions, controls)
        return self.record_cache

    def render_section(self, name: str, aud: render.Audience) -> str:
        record = self.read_record() if name in ("sessions", "controls") else render.Record([], [])
        return render.section(name, self.config, self.state, record, p.utcnow(), self.tz, aud)

    def render_page(self, aud: render.Audience, asset_version: str) -> str:
        self.ctx.counters["page_views"] += 1
        return render.page(self.config, self.state, self.read_record(), p.utcnow(), self.tz, aud, asset_version)

    def sections_event(self, names: set[str], aud: render.Audience) -> str:
        return sse("sections", {n: self.render_section(n, aud) for n in SECTIONS if n in names})

    async def render_loop(self) -> None:
        """Send what changed, at most every ``RENDER_S``; the clock-dependent sections every
        ``TIME_SECTIONS_S``; the plot a reload every ``SERIES_EVENT_S`` (supervised)."""
        last_time = last_series = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), TIME_SECTIONS_S)
            self.wake.clear()
            mono = time.monotonic()
            if mono - last_time >= TIME_SECTIONS_S:
                last_time = mono
                self.dirty.update({"limits", "evses", "health", "link", "circuits"})
            if mono - last_series >= SERIES_EVENT_S:
                last_series = mono
                self.hub.send(lambda aud: sse("series", {}))
            if self.dirty and self.hub.clients:
                names, self.dirty = set(self.dirty), set()
                self.hub.send(lambda aud, names=names: self.sections_event(names, aud))  # type: ignore[misc]
            elif not self.hub.clients:
                self.dirty.clear()
            self.ctx.counters["sse_clients"] = len(self.hub.clients)
            await asyncio.sleep(RENDER_S)

    # -- charging modes ------------------------------------------------------------------------------------
    async def set_mode(self, evse_id: str, mode: p.ChargingModeName, who: str, wait_s: float = 3.0
                       ) -> p.ChargingMode | None:
        """Send the mode command as the history service takes it (``evse/<id>/mode/set``); the mode in force
        once the history service confirms it (None: not within ``wait_s``)."""
        source = f"web:{who}"[:64]
        cmd = p.ModeCommand(evse_id=evse_id, mode=mode, source=source, request_id=uuid.uuid4().hex[:16])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        self.bus.publish("evse.mode_set", cmd, evse_id=evse_id)
        self.ctx.counters["modes_sent"] += 1
        self.log.info("charging mode sent", evse_id=evse_id, mode=mode.value, source=source,
                      request_id=cmd.request_id)
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return None
            fut: asyncio.Future[p.ChargingMode] = loop.create_future()
            self.mode_waiters.setdefault(evse_id, []).append(fut)
            try:
                got = await asyncio.wait_for(fut, left)
            except TimeoutError:
                waiting = self.mode_waiters.get(evse_id, [])
                if fut in waiting:
                    waiting.remove(fut)
                return None
            if got.mode is mode and got.set_by == source:
                return got

    # -- Home Assistant ------------------------------------------------------------------------------------
    def publish_discovery(self, reason: str) -> None:
        ha = self.config.homeassistant
        if not ha.enabled:
            self.clear_discovery(set(), reason)
            return
        docs = Discovery(self.config).documents()
        with self.bus.batch():
            for topic, doc in docs.items():
                self.bus.publish_raw(topic, encode(doc), qos=1, retain=True)
        self.clear_discovery(set(docs), reason)
        self.ha_published = set(docs)
        self.ctx.counters["ha_discovery_published"] += 1
        self.log.info("Home Assistant discovery published", documents=len(docs), reason=reason,
                      prefix=ha.discovery_prefix)

    def clear_discovery(self, keep: set[str], reason: str) -> None:
        """Empty retained documents for every discovery topic of ours that is no longer configured."""
        stale = (self.ha_published | self.ha_seen) - keep
        for topic in sorted(stale):
            self.bus.publish_raw(topic, b"", qos=1, retain=True)
        if stale:
            self.ctx.counters["ha_discovery_removed"] += len(stale)
            self.log.info("Home Assistant discovery removed", documents=len(stale), reason=reason)
        self.ha_seen -= stale
        self.ha_published -= stale

    def on_ha_status(self, topic: str, data: bytes, retained: bool) -> None:
        if topic != f"{self.config.homeassistant.discovery_prefix}/status":
            return  # a prefix of an earlier configuration
        text = data.decode("utf-8", "replace").strip()
        if text == "online":
            self.publish_discovery("Home Assistant online")
        elif text != "offline":
            self.ctx.counters["ha_status_invalid"] += 1
            self.log.warning("unexpected Home Assistant status ignored", topic=topic, payload=text[:40])

    def on_ha_config(self, topic: str, data: bytes, retained: bool) -> None:
        d = Discovery(self.config)
        if not d.is_own(topic):
            return
        if data:
            self.ha_seen.add(topic)
            if retained and self.ha_published and topic not in self.ha_published:
                self.clear_discovery(self.ha_published, "left from an earlier configuration")
        else:
            self.ha_seen.discard(topic)

    # -- lifecycle -----------------------------------------------------------------------------------------
    def on_reload(self, config: Config) -> None:
        known = {u.name for u in config.web.users} | ({t.name for t in config.admin.tokens}
                                                      if config.web.admin_tokens else set())
        gone = self.sessions.drop_unknown(known)
        if gone:
            self.log.info("logins of removed accounts ended", sessions=gone)
        self.record_cache = None
        self.mark(set(SECTIONS))
        self.subscribe_ha()
        if config.homeassistant.enabled or self.ha_published or self.ha_seen:
            self.publish_discovery("configuration reloaded")

    def on_connect(self) -> None:
        if self.config.homeassistant.enabled:
            self.publish_discovery("connected")

    async def run(self) -> None:
        from web.app import listen_host, make_app, serve

        self.subscribe()
        self.bus.on_connect(self.on_connect)
        self.ctx.on_reload(self.on_reload)
        if self.bus.connected.is_set():
            self.on_connect()
        renderer = self.ctx.tasks.spawn("render-loop", self.render_loop)
        app = make_app(self)
        try:
            if self.config.web.enabled:
                self.http = await serve(app, self.config)
                scheme = "https" if self.config.web.tls else "http"
                self.url = f"{scheme}://{listen_host(self.config)}:{self.http.port}/"
                self.log.info("web page ready", url=self.url, tls=self.config.web.tls is not None,
                              view=self.config.web.view, accounts=len(self.config.web.users))
            await asyncio.Event().wait()
        finally:
            renderer.cancel()
            self.hub.close_all()
            if self.http is not None:
                await self.http.stop()
            self.record.close()


async def serve(ctx: ServiceContext) -> None:
    await WebService(ctx).run()


def main() -> None:
    run_service(SERVICE, serve)
