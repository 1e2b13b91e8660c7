"""The smgw-link service: link, channels, CLS.EEDI, variables API, and what goes on the bus."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chargegate import payloads as p
from chargegate.bus import Message
from chargegate.config import Config
from chargegate.files import private_dir
from chargegate.runtime import ServiceContext, run_service
from smgw_link.admin.server import AdminServer
from smgw_link.certstore import WARN_DAYS, CertInfo, CertStore, CertStoreError
from smgw_link.channel import HanConnector, InboundServer, Link, Streams
from smgw_link.clseedi.client import ClsEediClient
from smgw_link.clseedi.device import ClsEediDevice
from smgw_link.control import OperatorControl, same_limit
from smgw_link.measurements import Measurements
from smgw_link.tlsconf import LinkError

if TYPE_CHECKING:  # the web framework is imported only where an HTTP API is served (bench/footprint)
    from smgw_link.httpapi import ApiState
    from smgw_link.httpserve import _HttpServer

__all__ = ["SmgwLink", "_serve_http", "main", "serve"]


async def _serve_http(app: Any, sock: socket.socket, ssl_context: Any = None) -> _HttpServer:
    """:func:`smgw_link.httpserve.serve_http`, imported on first use (uvicorn stays out of an smgw-link
    that serves no HTTP API)."""
    from smgw_link.httpserve import serve_http

    return await serve_http(app, sock, ssl_context)


def _variables_api(state: ApiState, origin: Any) -> Any:
    from smgw_link.httpapi import make_app

    return make_app(state, origin)

STATUS_REFRESH_S = 10.0
CERT_CHECK_S = 30.0


def utcnow() -> datetime:
    return datetime.now(UTC)


class SmgwLink:
    def __init__(self, ctx: ServiceContext, inbound_wrap: Callable[[Any], Any] | None = None) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.cfg = ctx.config.smgw
        self.inbound_wrap = inbound_wrap  # routes the admin API's paths of the inbound channel
        self.log = ctx.log
        state = private_dir(ctx.state_dir / "smgw")  # the operator's limits, the switch-over state, a socket
        self.state_path = state
        self.control = OperatorControl.load(self.cfg, state / "operator.json", utcnow())
        self.measurements = Measurements(self.config)
        self.device = ClsEediDevice(self.cfg, self.control, self.measurements, self.controller_ok,
                                    on_change=self.changed, counters=ctx.counters)
        self.store = CertStore.for_config(self.config)
        self.cert: CertInfo | None = None
        self.cert_error: str | None = None
        self._cert_key: tuple[str, float] | None = None
        self.link: Link | None = None
        self.clseedi: ClsEediClient | None = None
        self.inbound: InboundServer | None = None
        self.http: list[_HttpServer] = []
        self.inbound_sock_path: Path | None = None
        self.controller_health: p.Health | None = None
        self.published: dict[str, p.GridLimit] = {}
        self.published_at: dict[str, float] = {}
        self.tariff_sig: tuple[Any, ...] | None = None
        self.schedule_sig: str | None = None
        self._status_dirty = True
        self._last_state: p.LinkState | None = None
        self._status_at = 0.0
        self._cert_checked = 0.0
        self._cert_warned = 0.0
        self._notify_at = 0.0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []

    # -- checks ------------------------------------------------------------------------------------------
    def controller_ok(self) -> tuple[bool, str]:
        if not self.ctx.bus.connected.is_set():
            return False, "the local bus is not connected"
        if self.cfg.clseedi.require_controller:
            h = self.controller_health
            if h is None:
                return False, "the load-controller has not reported (no health on the bus)"
            if h.status == p.HealthStatus.OFFLINE:
                return False, "the load-controller is offline"
        return True, "ok"

    def operator_link_up(self) -> bool:
        if not self.cfg.enabled:
            return False
        if self.cfg.clseedi.enabled:
            return self.clseedi is not None and self.clseedi.connected
        return self.link is not None and self.link.state == "up"

    # -- certificate -------------------------------------------------------------------------------------
    def check_certificate(self) -> bool:
        """(Re)read the active certificate; True when it changed."""
        self._cert_checked = time.monotonic()
        try:
            info = self.store.active(self.cfg.certificate)
            key = (info.name, self.store.cert_path(info.name).stat().st_mtime)
            self.cert_error = None
        except (CertStoreError, OSError) as e:
            changed = self.cert is not None or self.cert_error != str(e)
            self.cert, self.cert_error, self._cert_key = None, str(e), None
            if changed:
                self.log.error("no usable client certificate for the SMGW link", error=str(e))
                self._status_dirty = True
            return changed
        changed = key != self._cert_key
        self.cert, self._cert_key = info, key
        days = info.days_left()
        if days < 0:
            self.log.error("client certificate has expired", certificate=info.name,
                           not_after=info.not_after.isoformat())
        elif days < WARN_DAYS and (changed or time.monotonic() - self._cert_warned > 86400):
            self._cert_warned = time.monotonic()
            self.log.warning("client certificate expires soon", certificate=info.name, days_left=round(days, 1),
                             not_after=info.not_after.isoformat())
        if changed:
            self._status_dirty = True
        return changed

    def reload_certificate(self) -> int:
        """Re-read the active certificate now and rebuild the link with it (admin switch-over).
        Returns the link generation whose probe result tells whether it works."""
        self.check_certificate()
        if self.inbound is not None and self.cfg.inbound.certificate is None and self.cert is not None:
            try:
                self.inbound.use_certificate(self.store.cert_path(self.cert.name), self.store.key_path(self.cert.name))
            except Exception as e:  # the inbound server keeps its previous certificate
                self.log.error("inbound server keeps its certificate", certificate=self.cert.name, error=str(e))
        self._status_dirty = True
        self.changed()
        if self.link is None:
            return -1
        self.link.reset()
        return self.link.generation

    def probe_result(self, generation: int) -> tuple[bool | None, str | None]:
        """(True, None) once a probe of ``generation`` or later succeeded; (False, error) after a
        failed one; (None, None) while none has finished."""
        link = self.link
        if link is None:
            return False, "the SMGW link is not running"
        if link.ok_gen >= generation:
            return True, None
        if link.failed_gen >= generation:
            return False, link.error
        return None, None

    def reconfigure(self, config: Config) -> None:
        """A new configuration whose ``smgw`` section is unchanged: nothing to restart."""
        self.config = config
        self.measurements.config = config
        self._status_dirty = True
        self.changed()

    def make_connector(self) -> HanConnector:
        if self.cert is None:
            self.check_certificate()
        if self.cert is None:
            raise LinkError("setup", self.cert_error or "no client certificate")
        return HanConnector(self.cfg, self.store.cert_path(self.cert.name), self.store.key_path(self.cert.name))

    # -- bus inputs ------------------------------------------------------------------------------------
    def on_meter(self, msg: Message) -> None:
        assert isinstance(msg.payload, p.MeterReading)
        self.measurements.on_meter(msg.payload)

    def on_evse(self, msg: Message) -> None:
        assert isinstance(msg.payload, p.EvseStatus)
        self.measurements.on_evse(msg.payload)

    def on_health(self, msg: Message) -> None:
        assert isinstance(msg.payload, p.Health)
        before = self.controller_ok()[0]
        self.controller_health = msg.payload
        if self.controller_ok()[0] != before:
            self.log.info("load-controller availability changed", online=not before)
            self.send_state(["supportedEebusUseCases"])

    # -- CLS.EEDI ---------------------------------------------------------------------------------------
    def on_clseedi(self, payload: bytes) -> None:
        try:
            replies = self.device.handle(payload, utcnow())
        except Exception as e:  # never let one message take the service down
            self.ctx.counters["clseedi_errors"] += 1
            self.log.exception("CLS.EEDI message handling failed", error=repr(e))
            return
        for r in replies:
            if self.clseedi is not None:
                self.clseedi.publish(r)

    def on_clseedi_link(self, up: bool, error: str | None) -> None:
        self._status_dirty = True
        if up:
            from smgw_link.clseedi import messages as m

            self.send_state(None)
            if self.cfg.clseedi.read_on_connect and self.clseedi is not None:
                self.clseedi.publish(m.read(self.device.source))
        self.changed()

    def send_state(self, parameters: list[str] | None) -> None:
        if self.clseedi is not None and self.clseedi.connected:
            self.clseedi.publish(self.device.state(utcnow(), parameters))

    # -- outputs ----------------------------------------------------------------------------------------
    def changed(self) -> None:
        """Something changed: publish what differs now, and let the loop recompute its deadlines."""
        self.publish()
        self._wake.set()

    def publish(self, force: bool = False) -> None:
        bus = self.ctx.bus
        now = utcnow()
        self.control.set_link(self.operator_link_up(), now)
        self.control.tick(now)
        events = self.control.drain_events()
        out = self.control.outputs(now)
        mono = time.monotonic()
        # the limit goes to the bus first: the operator's state message (and the acknowledgement after it) are
        # each checked against the CLS.EEDI schema on the way out, about half a millisecond apiece, and the
        # load-controller need not wait for them
        logged: list[tuple[str, p.GridLimit]] = []
        for src, gl in out.limits.items():
            due = mono - self.published_at.get(src, 0) >= self.cfg.limit_heartbeat_s
            if force or due or not same_limit(self.published.get(src), gl):
                bus.publish("grid.limit", gl, source=src)
                if not same_limit(self.published.get(src), gl):
                    logged.append((src, gl))
                self.published[src] = gl
                self.published_at[src] = mono
        for ev in events:
            self.log.info("operator control: " + ev)
        for src, gl in logged:
            self.log.info("grid limit published", source=src, active=gl.active, power_w=gl.power_w,
                          scope=gl.scope, valid_until=gl.valid_until.isoformat(), reason=gl.reason)
        if any(ev.startswith(("limit", "failsafe")) for ev in events):
            self.send_state(["limits", "failsafes"])
        t = out.tariff
        sig = (t.period.id, t.period.level, t.period.end, t.source)
        if force or sig != self.tariff_sig:
            bus.publish("tariff.current", t)
            if self.tariff_sig is not None and sig != self.tariff_sig:
                self.log.info("tariff changed", level=t.period.level, period=t.period.id, source=t.source)
            self.tariff_sig = sig
        ssig = out.schedule.model_dump_json(exclude={"ts"})
        if force or ssig != self.schedule_sig:
            bus.publish("tariff.schedule", out.schedule)
            self.schedule_sig = ssig
        # link/smgw turns `down` in the same publish as the failsafe limit (both at link loss + grace)
        if (force or self._status_dirty or mono - self._status_at >= STATUS_REFRESH_S
                or any(ev.startswith("failsafe") for ev in events) or self.link_state(now) != self._last_state):
            self.publish_status(now)

    def link_state(self, now: datetime) -> p.LinkState:
        """What ``link/smgw`` says: ``connecting`` while lost for less than ``link_loss_grace_s``, then ``down``."""
        cfg = self.cfg
        if not cfg.enabled:
            return p.LinkState.DISABLED
        if self.link is None:
            return p.LinkState.CONNECTING
        if self.link.state == "up" and (not cfg.clseedi.enabled or self.operator_link_up()):
            return p.LinkState.UP
        lost = self.control.link_down_since
        late = lost is not None and now - lost >= timedelta(seconds=cfg.link_loss_grace_s)
        return p.LinkState.DOWN if late else p.LinkState.CONNECTING

    def link_status(self, now: datetime | None = None) -> p.SmgwLinkStatus:
        cfg = self.cfg
        now = now or utcnow()
        if not cfg.enabled:
            state, error, since = p.LinkState.DISABLED, None, None
        elif self.link is None:
            state, error, since = p.LinkState.CONNECTING, None, None
        else:
            # up: HAN link (and, with CLS.EEDI, the operator broker) up; connecting: lost for less
            # than link_loss_grace_s, reconnecting; down: lost for longer (the failsafe moment)
            error, since = self.link.error, datetime.fromtimestamp(self.link.since, UTC)
            state = self.link_state(now)
            if state != p.LinkState.UP:
                lost = self.control.link_down_since
                if self.link.state == "up":  # HAN up, operator broker not (yet) connected
                    error = error or "operator CLS.EEDI broker not connected"
                if lost is not None:
                    since = lost
        if error is None and self.cert_error and cfg.enabled:
            error = f"setup: {self.cert_error}"
        channels: dict[str, Any] = {}
        if self.link is not None:
            channels.update({k: v.as_dict() for k, v in self.link.channels.items()})
            c = self.link.connector
            if c is not None:
                channels["tls"] = {"version": c.tls_version, "cipher": c.cipher,
                                   "gateway_sha256": c.gateway_fingerprint}
            channels["error_kind"] = self.link.error_kind
        if self.inbound is not None:
            channels["inbound"] = dict(self.inbound.stats)
        if self.clseedi is not None:
            channels["clseedi"] = {"connected": self.clseedi.connected, "broker": f"{self.clseedi.host}:"
                                   f"{self.clseedi.port}", "sent": self.clseedi.sent}
        channels["failsafe"] = self.control.in_failsafe
        channels["operator_link"] = self.operator_link_up()
        cert = self.cert
        return p.SmgwLinkStatus(
            state=state, gateway=f"{cfg.gateway.host}:{cfg.gateway.port}" if cfg.gateway else None, since=since,
            error=error, certificate=cert.name if cert else None, cert_not_after=cert.not_after if cert else None,
            cert_days_left=round(cert.days_left(), 2) if cert else None,
            bytes_tx=self.link.bytes_tx if self.link else 0, bytes_rx=self.link.bytes_rx if self.link else 0,
            channels=channels)

    def publish_status(self, now: datetime | None = None) -> None:
        st = self.link_status(now)
        self._last_state = st.state
        self.ctx.bus.publish("link.smgw", st)
        self._status_dirty = False
        self._status_at = time.monotonic()

    def on_link_change(self) -> None:
        self._status_dirty = True
        self.changed()

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.cfg
        if cfg.failsafe_duration_s < 7200 or cfg.failsafe_duration_s > 86400:
            self.log.warning("failsafe_duration_s is outside the LPC range 2 h .. 24 h",
                             failsafe_duration_s=cfg.failsafe_duration_s)
        api: ApiState | None = None
        if cfg.http_api.enabled or (cfg.enabled and cfg.inbound.enabled):
            from smgw_link.httpapi import ApiState

            api = ApiState(cfg, self.control, self.changed, utcnow, self.ctx.counters)
        if cfg.http_api.enabled:
            assert api is not None
            if not cfg.http_api.tokens:
                self.log.warning("http_api has no tokens: every request will be refused")
            sock = socket.socket(socket.AF_INET6 if ":" in cfg.http_api.host else socket.AF_INET)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((cfg.http_api.host, cfg.http_api.port))
                sock.listen(64)
                self.http.append(await _serve_http(_variables_api(api, "local"), sock))
                self.log.info("variables API ready", listen=f"{cfg.http_api.host}:{cfg.http_api.port}")
            except OSError as e:
                sock.close()
                self.log.error("variables API cannot listen", listen=f"{cfg.http_api.host}:{cfg.http_api.port}",
                               error=e.strerror)
        if cfg.enabled:
            self.check_certificate()
            self.link = Link(cfg, self.make_connector, self.on_link_change)
            await self.link.start_forwarders()
            self._tasks.append(self.ctx.tasks.spawn("smgw-probe", self.link.run))
            if cfg.inbound.enabled:
                assert api is not None
                await self.start_inbound(api)
            if cfg.clseedi.enabled:
                await self.start_clseedi()
        self.publish(force=True)

    async def start_inbound(self, api: ApiState) -> None:
        path = self.state_path / "inbound-http.sock"
        if len(str(path)) > 100:
            path = Path(tempfile.mkdtemp(prefix="cg-smgw-")) / "inbound.sock"
        path.unlink(missing_ok=True)
        usock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        usock.bind(str(path))
        os.chmod(path, 0o600)
        usock.listen(64)
        self.inbound_sock_path = path
        inbound_app = _variables_api(api, "inbound")
        if self.inbound_wrap is not None:
            inbound_app = self.inbound_wrap(inbound_app)
        self.http.append(await _serve_http(inbound_app, usock))

        async def target() -> Streams:
            return await asyncio.open_unix_connection(str(path))

        name = self.cfg.inbound.certificate or (self.cert.name if self.cert else None)
        try:
            if name is None:
                raise LinkError("setup", self.cert_error or "no certificate for the inbound server")
            self.inbound = InboundServer(self.cfg, self.store.cert_path(name), self.store.key_path(name), target)
            await self.inbound.start()
        except (LinkError, OSError, Exception) as e:
            self.inbound = None
            self.log.error("inbound channel server not started", error=str(e))

    async def start_clseedi(self) -> None:
        ce = self.cfg.clseedi
        if ce.endpoint is not None:
            ep = self.cfg.endpoint(ce.endpoint)
            host, port, connect_to = ep.host, ep.port, (ep.listen_host, ep.listen_port)
        else:
            assert ce.host is not None and ce.port is not None
            host, port, connect_to = ce.host, ce.port, None
        client_cert = None
        if ce.client_certificate and self.cert is not None:
            client_cert = (self.store.cert_path(self.cert.name), self.store.key_path(self.cert.name))
        self.clseedi = ClsEediClient(ce, host=ce.server_name or host, port=port, connect_to=connect_to,
                                     on_message=self.on_clseedi, on_link=self.on_clseedi_link,
                                     client_cert=client_cert)
        await self.clseedi.start()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.clseedi is not None:
            await self.clseedi.stop()
        if self.inbound is not None:
            await self.inbound.stop()
        if self.link is not None:
            await self.link.stop_forwarders()
        for h in self.http:
            await h.stop()
        if self.inbound_sock_path is not None:
            self.inbound_sock_path.unlink(missing_ok=True)

    async def loop(self) -> None:
        """Expiry, failsafe, heartbeats, notifications and the link status, on time."""
        while True:
            self.publish()
            mono = time.monotonic()
            if mono - self._cert_checked >= CERT_CHECK_S and self.cfg.enabled:
                if self.check_certificate() and self.link is not None:
                    self.log.info("client certificate changed, reconnecting", certificate=self.cert and self.cert.name)
                    self.link.reset()
            n = self.control.notify
            if n is not None and self.clseedi is not None and self.clseedi.connected and mono >= self._notify_at:
                msg = self.device.notification(utcnow())
                if msg is not None:
                    self.clseedi.publish(msg)
                self._notify_at = mono + n.interval_s
            now = utcnow()
            waits = [self.cfg.limit_heartbeat_s, STATUS_REFRESH_S, CERT_CHECK_S]
            deadline = self.control.next_deadline(now)
            if deadline is not None:
                waits.append((deadline - now).total_seconds() + 0.001)
            if n is not None and n.end_time > now.timestamp():
                waits.append(self._notify_at - mono)
            if self.cfg.enabled and not self.operator_link_up():
                waits.append(1.0)  # the link state is also polled while down (failsafe timing)
                lost = self.control.link_down_since
                if lost is not None:
                    at = (lost - now).total_seconds() + self.cfg.link_loss_grace_s
                    if at > 0:
                        waits.append(at + 0.001)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.005, min(waits)))


def needs_restart(old: Config, new: Config) -> bool:
    """Whether the link, its channels and the variables API must restart for ``new``."""
    return old.smgw != new.smgw or old.state_dir != new.state_dir


async def serve(ctx: ServiceContext) -> None:
    reload = asyncio.Event()
    current: list[SmgwLink] = []  # the bus cannot unsubscribe: route to the live instance
    admin = AdminServer(ctx, lambda: current[0] if current else None)

    async def on_reload(new: Config) -> None:
        await admin.reconfigure(new)
        svc = current[0] if current else None
        if svc is not None and needs_restart(svc.config, new):
            reload.set()
        elif svc is not None:
            svc.reconfigure(new)
            ctx.log.info("configuration reloaded: smgw settings unchanged, link and channels keep running")

    ctx.on_reload(on_reload)

    def route(method: str) -> Any:
        def handler(*args: Any) -> None:
            if current:
                getattr(current[0], method)(*args)
        return handler

    bus = ctx.bus
    bus.subscribe("meter.reading", route("on_meter"))
    bus.subscribe("evse.status", route("on_evse"))
    bus.subscribe("service.health", route("on_health"), service="load-controller")
    bus.on_connect(lambda: current and current[0].publish(force=True))
    await admin.start()
    try:
        while True:
            svc = SmgwLink(ctx, admin.inbound_app)
            if current:
                svc.controller_health = current[0].controller_health
                svc.measurements.meters = current[0].measurements.meters
                svc.measurements.evses = current[0].measurements.evses
            current[:] = [svc]
            await svc.start()
            loop = ctx.tasks.spawn("control-loop", svc.loop)
            waiter = asyncio.create_task(reload.wait())
            try:
                await asyncio.wait({loop, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if loop.done():
                    loop.result()  # re-raise
            finally:
                loop.cancel()
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await loop
                await svc.stop()
            reload.clear()
            ctx.log.info("configuration reloaded: smgw-link restarted its link, channels and APIs")
    finally:
        await admin.stop()


def main() -> None:
    run_service("smgw-link", serve)

