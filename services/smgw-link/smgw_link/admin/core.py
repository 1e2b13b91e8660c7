"""The admin API's state and operations, independent of HTTP.

:class:`AdminService` lives as long as the smgw-link process (it survives the restarts of the
link that a changed ``smgw`` section causes). It owns the configuration store, the audit log, the
view of the bus, the certificate switcher and the local listener; the running link object
(:class:`LinkService`, smgw-link's ``SmgwLink``) is looked up on every use.

A configuration change: build the new document from the current one, validate it with the same
models as ``chargegate config check`` (a failure changes nothing and names each error), refuse a
document that would lock every administrator out, write it atomically (the store keeps the last
``admin.keep_versions``), audit it, and send ``reload`` to every service
(``service/<name>/command``). Changes are serialised by one lock.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import structlog
import yaml

from chargegate import payloads as p
from chargegate.config import Config, ConfigError
from chargegate.config.store import AuditLog, ConfigStore
from chargegate.runtime import ServiceContext
from chargegate.topics import SERVICES
from smgw_link.admin import confdoc
from smgw_link.admin.busview import BusView
from smgw_link.admin.certs import LinkControl, Switcher
from smgw_link.certstore import CertInfo, CertStore
from smgw_link.control import OperatorControl

log = structlog.get_logger("smgw_link.admin")

UNAUTH_AUDIT_PER_MIN = 30


class ApiError(Exception):
    """An answer other than success: HTTP status, message and (path, message) errors."""

    def __init__(self, status: int, detail: str, errors: list[tuple[str, str]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors or []
        self.headers = headers


class LinkService(LinkControl, Protocol):
    """What the admin API uses of the running link (smgw-link's ``SmgwLink``)."""

    control: OperatorControl
    store: CertStore
    cert: CertInfo | None

    def changed(self) -> None: ...
    def link_status(self, now: datetime | None = None) -> p.SmgwLinkStatus: ...


class AdminService:
    def __init__(self, ctx: ServiceContext, link_of: Callable[[], LinkService | None]) -> None:
        self.ctx = ctx
        self.link_of = link_of
        self.view = BusView(ctx.config.admin.log_buffer)
        self.view_attached = False
        if ctx.config.admin.enabled:
            self.attach_view()
        self.lock = asyncio.Lock()
        self._audits: dict[Path, AuditLog] = {}
        self._unauth: list[float] = []
        self._version_cache: tuple[tuple[Any, ...], str | None] | None = None
        self.switcher = Switcher(self.cert_store, self._link_control, self._audit_switch,
                                 lambda: self.config.state_dir / "smgw" / "cert-switch.json")

    def attach_view(self) -> None:
        """Follow the bus for the admin API (once: the bus cannot unsubscribe). Only while the API is enabled:
        otherwise nothing reads the view, and keeping it meant parsing every setpoint, status, allocation and log
        record of the installation in smgw-link - 100 setpoints and 100 statuses on the CPU the curtail chain's
        other services needed right then (bench/curtail). Retained state arrives with the subscriptions."""
        if not self.view_attached:
            self.view_attached = True
            self.view.attach(self.ctx.bus)

    # -- configuration in force --------------------------------------------------------------------------
    @property
    def config(self) -> Config:
        return self.ctx.config

    def cert_store(self) -> CertStore:
        svc = self.link_of()
        return svc.store if svc is not None else CertStore.for_config(self.config)

    def _link_control(self) -> LinkControl | None:
        return self.link_of()

    def store(self) -> ConfigStore:
        path = self.ctx.config_path
        if path is None:
            raise ApiError(503, "smgw-link was not started from a configuration file: nothing to change")
        hist = self.config.admin.history_dir
        if hist is not None and not hist.is_absolute():
            hist = path.parent / hist
        return ConfigStore(path, hist, keep=self.config.admin.keep_versions)

    def file_version(self) -> str | None:
        """The version of the configuration file (None when it is not valid); cached by its stat."""
        try:
            store = self.store()
            st = store.path.stat()
            key = (str(store.path), st.st_mtime_ns, st.st_size, st.st_ino)
            if self._version_cache is not None and self._version_cache[0] == key:
                return self._version_cache[1]
            version: str | None = store.current().digest()
        except ConfigError:
            version = None
        except (ApiError, OSError):
            return None
        self._version_cache = (key, version)
        return version

    # -- audit -------------------------------------------------------------------------------------------
    def audit_log(self) -> AuditLog:
        path = self.config.admin.audit_file or (self.config.state_dir / "admin" / "audit.jsonl")
        if not path.is_absolute() and self.ctx.config_path is not None:
            path = self.ctx.config_path.parent / path
        a = self._audits.get(path)
        if a is None:
            a = self._audits[path] = AuditLog(path)
        return a

    async def audit(self, who: str, role: str, action: str, target: str, result: str, detail: Any = None) -> None:
        if who == "(unauthenticated)":
            now = asyncio.get_running_loop().time()
            self._unauth = [t for t in self._unauth if now - t < 60]
            if len(self._unauth) >= UNAUTH_AUDIT_PER_MIN:
                self.ctx.counters["admin_audit_suppressed"] += 1
                return
            self._unauth.append(now)
        try:
            await asyncio.to_thread(self.audit_log().record, who, role, action, target, result, detail)
        except OSError as e:  # a full disk must not hide the change: log it loudly
            self.ctx.counters["admin_audit_failed"] += 1
            log.error("audit log not writable", error=str(e), who=who, action=action, target=target, result=result)

    async def _audit_switch(self, result: str, target: str, detail: Any) -> None:
        by = detail.get("by") if isinstance(detail, dict) else None
        await self.audit(by or "smgw-link", "admin", "certificate.switch.result", target, result, detail)

    # -- configuration changes -----------------------------------------------------------------------
    def current_document(self) -> tuple[Config, dict[str, Any]]:
        store = self.store()
        try:
            return store.current(), store.data()
        except ConfigError as e:
            raise ApiError(409, "the configuration file is not valid now; replace it as a whole",
                           e.errors) from None
        except OSError as e:
            raise ApiError(503, f"the configuration file cannot be read: {e.strerror}") from None

    def _current_or_broken(self) -> tuple[str | None, dict[str, Any]]:
        """The current version and document; a file that is not valid (edited by hand) gives no version
        and whatever mapping it holds, so that a whole new configuration or a rollback can repair it."""
        try:
            cfg, data = self.current_document()
            return cfg.digest(), data
        except ApiError as e:
            if e.status != 409:
                raise
        try:
            raw = yaml.safe_load(self.store().text())
        except (yaml.YAMLError, OSError):
            raw = None
        return None, raw if isinstance(raw, dict) else {}

    async def change(self, action: str, target: str, build: Callable[[dict[str, Any]], str | dict[str, Any]], *,
                     base_version: str | None = None, wait_s: float = 0.0, repairs: bool = False) -> dict[str, Any]:
        """Apply ``build(current document)`` (a new document or YAML text) as the configuration.
        ``repairs``: allowed while the current file is not valid (replace, rollback)."""
        async with self.lock:
            store = self.store()
            if repairs:
                prev, data = await asyncio.to_thread(self._current_or_broken)
            else:
                before, data = await asyncio.to_thread(self.current_document)
                prev = before.digest()
            if base_version is not None and base_version != prev:
                raise ApiError(409, f"the configuration is at version {prev}, not {base_version}: read it again")
            new = build(data)
            if isinstance(new, dict):
                left = confdoc.contains_placeholder(new)
                if left:
                    raise ApiError(422, "the configuration is not valid",
                                   [(x, "a redacted secret that has no current value: give the secret")
                                    for x in left])
                text = yaml.safe_dump(new, sort_keys=False, allow_unicode=True)
            else:
                text = new
            try:
                cfg = store.parse(text, action)
            except ConfigError as e:
                raise ApiError(422, "the configuration is not valid", e.errors) from None
            why = confdoc.lockout(cfg)
            if why is not None:
                raise ApiError(422, "the configuration would lock the administrators out", [("admin", why)])
            version = cfg.digest()
            if version == prev:
                return {"action": action, "target": target, "version": version, "previous_version": prev,
                        "changed": False, "reload_sent_to": [], "applied": None}
            try:
                await asyncio.to_thread(store.replace, text, action)
            except ConfigError as e:
                raise ApiError(422, "the configuration is not valid", e.errors) from None
            except OSError as e:
                raise ApiError(503, f"the configuration cannot be written: {e.strerror}") from None
            log.info("configuration changed through the admin API", action=action, target=target,
                     version=version, previous=prev)
            # this service at once (the answer and the next request see it), the others over the bus
            sent = [svc for svc in SERVICES if svc != self.ctx.name]
            for svc in sent:
                self.send(svc, "reload", version)
        await self.ctx.reload()
        sent.append(self.ctx.name)
        applied = await self.wait_applied(version, wait_s) if wait_s > 0 else None
        return {"action": action, "target": target, "version": version, "previous_version": prev,
                "changed": True, "reload_sent_to": sent, "applied": applied}

    def send(self, service: str, action: str, version: str | None = None) -> str:
        rid = uuid.uuid4().hex[:16]
        self.ctx.bus.publish("service.command", p.ServiceCommand(action=action, request_id=rid,  # type: ignore[arg-type]
                                                                 config_version=version), service=service)
        return rid

    def send_all(self, action: str, version: str | None = None) -> list[str]:
        for svc in SERVICES:
            self.send(svc, action, version)
        return list(SERVICES)

    def running_services(self) -> list[str]:
        return [name for name, h in self.view.health.items() if h.status != p.HealthStatus.OFFLINE]

    async def wait_applied(self, version: str, timeout: float) -> dict[str, bool]:  # noqa: ASYNC109
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        names = self.running_services()

        def state() -> dict[str, bool]:
            return {n: (self.view.health[n].config_version == version) for n in names if n in self.view.health}

        while not all(state().values()) and loop.time() < deadline:
            await self.view.wait_health(max(0.01, deadline - loop.time()))
        return state()

    # -- limits ------------------------------------------------------------------------------------
    def link(self) -> LinkService:
        svc = self.link_of()
        if svc is None:
            raise ApiError(503, "the SMGW link service is restarting; try again")
        return svc

    def limit_inputs(self) -> dict[str, str]:
        smgw = self.config.smgw
        out = {"local": "avail-local"}
        out.setdefault(smgw.http_api.inbound_source, "avail-inbound")
        out[smgw.limit_source] = "lpc"
        return out

    def set_limit(self, source: str, power_w: float, active: bool, duration_s: float | None,
                  by: str) -> dict[str, Any]:
        svc = self.link()
        smgw = self.config.smgw
        kind = self.limit_inputs().get(source)
        if kind is None:
            raise ApiError(404, f"no input publishes grid/limit/{source} in this configuration "
                                f"(limit_source {smgw.limit_source}, http_api.inbound_source "
                                f"{smgw.http_api.inbound_source}, local)")
        if kind != "avail-local" and not smgw.functions.power_reduction:
            self.ctx.counters["admin_limit_not_supported"] += 1
            log.warning("operator limit refused: function power_reduction is switched off", source=source,
                        power_w=power_w, by=by)
            raise ApiError(409, f"not supported: an operator limit on source {source} needs function "
                                f"power_reduction, which is switched off in the configuration")
        now = datetime.now(UTC)
        control = svc.control
        percent: float | None = None
        until = now + timedelta(seconds=duration_s) if (duration_s and active) else None
        if kind == "lpc":
            control.set_limit(round(power_w), active, round(duration_s) if duration_s else None, now,
                              message_id=f"admin:{by}")
        else:
            house = smgw.http_api.house_power_w
            percent = round(min(100.0, power_w / house * 100), 3) if active else 100.0
            control.set_avail("inbound" if kind == "avail-inbound" else "local", percent, now,
                              duration_s if active else None)
        log.info("operator limit set through the admin API", source=source, power_w=power_w, active=active,
                 duration_s=duration_s, by=by)
        svc.changed()
        published = control.outputs(now).limits.get(source)
        return {"source": source, "input": kind, "percent": percent, "until": until, "published": published}

    def operator_state(self) -> dict[str, Any] | None:
        svc = self.link_of()
        if svc is None:
            return None
        c = svc.control
        now = datetime.now(UTC)
        lpc = c.lpc
        return {"failsafe": c.in_failsafe, "lpc_w": lpc.value_w if lpc else None,
                "lpc_active": bool(lpc and c.lpc_binding(now)), "lpc_until": lpc.ends if lpc else None,
                "lpc_by": lpc.message_id if lpc else None,
                "avail_percent": {ch: a.percent for ch, a in c.avail.items() if a.binding(now)}}
