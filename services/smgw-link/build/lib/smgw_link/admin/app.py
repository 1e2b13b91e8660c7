"""The admin API (FastAPI, ``/v1/...``; OpenAPI at ``/v1/openapi.json``).

Roles: ``viewer`` reads status, configuration (secrets redacted), logs and certificates;
``operator`` also sets and lifts grid limits; ``admin`` does everything: configuration changes and
rollback, certificates, service restarts, and reads the audit log. Each operation names the role
it needs in ``x-required-role``.

Every request other than GET - accepted or refused, authenticated or not - is written to the
audit log (who, role, what, target, result) before the answer leaves (:class:`Audited`).
"""


import base64
import binascii
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import structlog
import yaml
from fastapi import Body, Depends, FastAPI, HTTPException, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from chargegate import payloads as p
from chargegate.config import ConfigError
from chargegate.config.store import merge_patch
from chargegate.topics import format_loc
from smgw_link.admin import confdoc
from smgw_link.admin import history as history_routes
from smgw_link.admin import models as m
from smgw_link.admin.auth import Principal, Role, by_certificate, by_token
from smgw_link.admin.certs import check
from smgw_link.admin.core import AdminService, ApiError
from smgw_link.certstore import CertExistsError, CertInfo, CertStoreError, CertValidityError
from smgw_link.httpserve import peer_certificate

log = structlog.get_logger("smgw_link.admin.http")

API_VERSION = "1.0.0"
_bearer = HTTPBearer(auto_error=False, description="a token from admin.tokens")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

ERR = {"model": m.ErrorOut}
COMMON: dict[int | str, dict[str, Any]] = {401: {**ERR, "description": "no valid credentials"},
                                           403: {**ERR, "description": "the role may not do this"},
                                           413: {**ERR, "description": "the body is larger than 1 MiB"},
                                           422: {**ERR, "description": "the request is not valid"}}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    texts = {404: "not found", 409: "conflicts with the current state", 503: "not available right now"}
    out = dict(COMMON)
    for c in codes:
        out[c] = {**ERR, "description": texts[c]}
    return out


def origin_of(request: Request) -> str:
    return str(request.scope.get("chargegate.origin", "local"))


def authenticate(service: AdminService, request: Request,
                 cred: HTTPAuthorizationCredentials | None) -> Principal | None:
    admin = service.config.admin
    origin = origin_of(request)
    via = "inbound" if origin == "inbound" else ("local-tls" if request.url.scheme == "https" else "local")
    if cred is not None and cred.scheme.lower() == "bearer":
        return by_token(admin, cred.credentials, via)  # type: ignore[arg-type]
    if via == "local-tls":
        client = request.client
        return by_certificate(admin, peer_certificate((client.host, client.port) if client else None))
    return None


def _bearer_from_headers(request: Request) -> HTTPAuthorizationCredentials | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if not scheme or not token:
        return None
    return HTTPAuthorizationCredentials(scheme=scheme, credentials=token.strip())


def cert_out(info: CertInfo | str, active: str | None) -> m.CertOut:
    if isinstance(info, str):
        return m.CertOut(name=info, pending_request=True)
    return m.CertOut(name=info.name, subject=info.subject, issuer=info.issuer, key_type=info.key_type, curve=info.curve,
                     not_before=info.not_before, not_after=info.not_after, days_left=round(info.days_left(), 2),
                     sha256=info.sha256, chain_len=info.chain_len, has_key=info.has_key, selected=info.selected,
                     active=info.name == active)


def make_app(service: AdminService) -> FastAPI:
    app = FastAPI(title="chargegate admin API", version=API_VERSION, description=__doc__ or "",
                  openapi_url="/v1/openapi.json", docs_url="/v1/docs", redoc_url=None)

    def require(role: Role) -> Any:
        async def dependency(request: Request,
                             cred: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]) -> Principal:
            principal = authenticate(service, request, cred)
            if principal is None:
                service.ctx.counters["admin_unauthorized"] += 1
                raise HTTPException(401, "valid credentials are required (bearer token or client certificate)",
                                    headers={"WWW-Authenticate": "Bearer"})
            request.state.principal = principal
            if not principal.may(role):
                service.ctx.counters["admin_forbidden"] += 1
                raise HTTPException(403, f"role {principal.role} may not do this (needs {role})")
            return principal
        return Depends(dependency)

    def role(r: Role) -> dict[str, Any]:
        return {"openapi_extra": {"x-required-role": r}}

    Viewer = Annotated[Principal, require("viewer")]
    Operator = Annotated[Principal, require("operator")]
    Admin = Annotated[Principal, require("admin")]
    BaseVersion = Annotated[m.VersionId | None, Query(description="refuse (409) unless the configuration is "
                                                                  "still at this version")]
    WaitS = Annotated[float, Query(ge=0, le=60, description="wait up to this long for the running services to "
                                                          "report the new version")]

    # -- error answers (one shape everywhere: detail + errors) ------------------------------------------
    def error(request: Request, status: int, detail: str, errors: list[tuple[str, str]] | None = None,
              headers: dict[str, str] | None = None) -> JSONResponse:
        request.state.refusal = detail if not errors else f"{detail}: " + "; ".join(
            f"{a or '(document)'}: {b}" for a, b in errors[:10])
        body = m.ErrorOut(detail=detail, errors=[m.ErrorItem(path=a, message=b) for a, b in errors or []])
        return JSONResponse(body.model_dump(), status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return error(request, e.status, e.detail, e.errors, e.headers)

    def refused_first(request: Request) -> JSONResponse | None:
        """The body is parsed before the dependencies run: answer who-are-you and may-you first."""
        principal = authenticate(service, request, _bearer_from_headers(request))
        if principal is None:
            service.ctx.counters["admin_unauthorized"] += 1
            return error(request, 401, "valid credentials are required (bearer token or client certificate)",
                         headers={"WWW-Authenticate": "Bearer"})
        request.state.principal = principal
        route = request.scope.get("route")
        needed = (getattr(route, "openapi_extra", None) or {}).get("x-required-role", "admin")
        if not principal.may(needed):
            return error(request, 403, f"role {principal.role} may not do this (needs {needed})")
        return None

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 400 and request.scope.get("route") is not None:
            # a body that cannot even be parsed (not UTF-8, not JSON): an invalid request like any other
            return refused_first(request) or error(request, 422, "the request is not valid",
                                                   [("body", str(e.detail))])
        return error(request, e.status_code, str(e.detail), None, dict(e.headers) if e.headers else None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        refused = refused_first(request)
        if refused is not None:
            return refused
        errs = [(format_loc(x.get("loc", ())), str(x.get("msg", "invalid"))) for x in e.errors()]
        return error(request, 422, "the request is not valid", errs)

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception) -> JSONResponse:
        service.ctx.counters["admin_errors"] += 1
        log.exception("admin API request failed", path=request.url.path, error=repr(e))
        return error(request, 500, "internal error (logged)")

    def note(request: Request, **detail: Any) -> None:
        request.state.audit_detail = detail

    # -- who, status, services, logs -----------------------------------------------------------------------
    @app.get("/v1/whoami", responses=COMMON, **role("viewer"))
    async def whoami(who: Viewer) -> m.WhoAmI:
        """The name and role the credentials map to."""
        return m.WhoAmI(name=who.name, role=who.role, method=who.method, via=who.via)

    def services_view(version: str | None) -> list[m.ServiceView]:
        out = []
        for name in sorted({*service.config.services, *service.view.health}):
            h = service.view.health.get(name)
            if h is None:
                out.append(m.ServiceView(service=name))
                continue
            out.append(m.ServiceView(service=name, status=h.status, config_version=h.config_version,
                                     applied=(h.config_version == version) if version and h.config_version else None,
                                     version=h.version, uptime_s=h.uptime_s, pid=h.pid, detail=h.detail, seen=h.ts,
                                     counters=h.counters))
        return out

    def file_version() -> str | None:
        return service.file_version()

    def limits_view() -> m.LimitsView:
        now = datetime.now(UTC)
        v = service.view
        alloc = v.allocation
        op = service.operator_state()
        return m.LimitsView(
            grid=[m.GridLimitView(source=s, binding=g.binding(now), limit=g) for s, g in sorted(v.grid_limits.items())],
            evse=dict(sorted(v.evse_limits.items())), in_force=alloc.limits if alloc else {},
            operator=m.OperatorState(**op) if op else None, sources=service.limit_inputs())

    @app.get("/v1/status", responses=COMMON, **role("viewer"))
    async def status(who: Viewer) -> m.StatusOut:
        """Everything at a glance: EVSEs, meters, limits in force with their sources, tariff, SMGW link,
        each service's health and configuration version, recent errors."""
        cfg = service.config
        v = service.view
        allocs = {a.evse_id: a for a in v.allocation.evses} if v.allocation else {}
        evses = [m.EvseView(id=e.id, name=e.name, circuit=e.circuit,
                            driver="modbus" if e.modbus else ("ocpp" if e.ocpp else "none"),
                            upstream=cfg.ocpp.backend.enabled and (e.upstream is None or e.upstream.enabled),
                            status=v.evses.get(e.id), setpoint=v.setpoints.get(e.id), limit=v.evse_limits.get(e.id),
                            allocation=allocs.get(e.id)) for e in cfg.evses]
        meters = [m.MeterView(id=x.id, reading=v.meters.get(x.id)) for x in cfg.meters]
        svc = service.link_of()
        version = file_version()
        return m.StatusOut(ts=datetime.now(UTC), site=cfg.site.name, config_version=version, evses=evses,
                           meters=meters, limits=limits_view(), tariff=v.tariff, schedule=v.schedule,
                           smgw=svc.link_status() if svc is not None else v.link,
                           certificate_switch=m.SwitchOut(**service.switcher.status.as_dict()),
                           services=services_view(version), recent_errors=list(v.errors)[-50:])

    @app.get("/v1/services", responses=COMMON, **role("viewer"))
    async def services(who: Viewer) -> list[m.ServiceView]:
        """Each service's health and the configuration version it runs."""
        return services_view(file_version())

    @app.post("/v1/services/{service_name}/{action}", responses=COMMON, **role("admin"))
    async def command(who: Admin, request: Request, service_name: Annotated[m.ServiceName, Path()],
                      action: Annotated[Literal["restart", "reload"], Path()]) -> m.CommandOut:
        """Restart a service (it exits and its supervisor starts it again) or reload its configuration."""
        rid = service.send(service_name, action)
        log.warning("service command sent through the admin API", service=service_name, action=action, by=who.name)
        note(request, request_id=rid)
        return m.CommandOut(service=service_name, action=action, request_id=rid)

    @app.get("/v1/logs", responses=COMMON, **role("viewer"))
    async def logs(who: Viewer,
                   service_name: Annotated[m.ServiceName | None, Query(alias="service")] = None,
                   level: Annotated[Literal["info", "warning", "error", "critical"], Query()] = "info",
                   limit: Annotated[int, Query(ge=1, le=10_000)] = 200) -> list[p.LogRecord]:
        """Recent log events of the services (info and above, newest last)."""
        return service.view.recent_logs(service=service_name, min_level=level, limit=limit)

    @app.get("/v1/audit", responses=COMMON, **role("admin"))
    async def audit(who: Admin, limit: Annotated[int, Query(ge=1, le=100_000)] = 200) -> list[m.AuditEntry]:
        """The audit log, newest last: every change and every refused attempt."""
        rows = service.audit_log().read(limit)
        out = []
        for r in rows:
            try:
                out.append(m.AuditEntry.model_validate(r))
            except ValueError:
                continue
        return out

    # -- limits -------------------------------------------------------------------------------------------
    @app.get("/v1/limits", responses=COMMON, **role("viewer"))
    async def limits(who: Viewer) -> m.LimitsView:
        """Grid limits per source (binding or not), EVSE limits, what the controller applied, the operator state."""
        return limits_view()

    @app.put("/v1/limits/{source}", responses=responses(404, 409, 503), **role("operator"))
    async def put_limit(who: Operator, request: Request, source: Annotated[m.LimitSourceName, Path()],
                        body: m.LimitIn) -> m.LimitOut:
        """Set the limit of a source: ``grid/limit/<source>`` is published at once, with
        ``valid_until`` refreshed while it lasts. The operator's own source (``smgw.limit_source``) is the
        LPC limit (as CLS.EEDI sets it); the others are AVAIL inputs (power as a share of
        ``http_api.house_power_w``)."""
        note(request, power_w=body.power_w, active=body.active, duration_s=body.duration_s)
        return m.LimitOut(**service.set_limit(source, body.power_w, body.active, body.duration_s, who.name))

    @app.delete("/v1/limits/{source}", responses=responses(404, 409, 503), **role("operator"))
    async def delete_limit(who: Operator, source: Annotated[m.LimitSourceName, Path()]) -> m.LimitOut:
        """Lift the limit of a source."""
        return m.LimitOut(**service.set_limit(source, 0, False, None, who.name))

    # -- configuration --------------------------------------------------------------------------------------
    @app.get("/v1/config", responses=responses(409, 503), **role("viewer"))
    async def get_config(who: Viewer) -> m.ConfigOut:
        """The configuration file as a JSON document (inline secrets redacted)."""
        cfg, data = service.current_document()
        return m.ConfigOut(version=cfg.digest(), document=confdoc.redact(data))

    async def change(request: Request, action: str, target: str, build: Callable[[dict[str, Any]], Any],
                     base_version: str | None, wait_s: float, repairs: bool = False) -> m.ChangeOut:
        out = await service.change(action, target, build, base_version=base_version, wait_s=wait_s,
                                   repairs=repairs)
        note(request, version=out["version"], previous_version=out["previous_version"], changed=out["changed"])
        return m.ChangeOut(**out)

    @app.put("/v1/config", responses=responses(409, 503), **role("admin"))
    async def put_config(who: Admin, request: Request, document: Annotated[dict[str, Any], Body()],
                         base_version: BaseVersion = None, wait_s: WaitS = 0) -> m.ChangeOut:
        """Replace the whole configuration. ``<redacted>`` secrets keep their current value."""
        return await change(request, "config.replace", "config",
                            lambda cur: confdoc.unredact(document, cur), base_version, wait_s, repairs=True)

    @app.patch("/v1/config", responses=responses(409, 503), **role("admin"))
    async def patch_config(who: Admin, request: Request, patch: Annotated[dict[str, Any], Body()],
                           base_version: BaseVersion = None, wait_s: WaitS = 0) -> m.ChangeOut:
        """Change the configuration with an RFC 7386 JSON merge patch (``null`` deletes a key)."""
        note(request, patch=confdoc.redact(patch))
        return await change(request, "config.patch", "config",
                            lambda cur: confdoc.unredact(merge_patch(cur, patch), cur), base_version, wait_s)

    @app.post("/v1/config/check", responses=responses(409, 503), **role("admin"))
    async def check_config(who: Admin, document: Annotated[dict[str, Any], Body()]) -> m.CheckOut:
        """Validate a whole configuration without writing it."""
        _, cur = service.current_document()
        try:
            cfg = service.store().parse(json.dumps(confdoc.unredact(document, cur)), "check")
        except ConfigError as e:
            return m.CheckOut(valid=False, errors=[m.ErrorItem(path=a, message=b) for a, b in e.errors])
        why = confdoc.lockout(cfg)
        if why:
            return m.CheckOut(valid=False, errors=[m.ErrorItem(path="admin", message=why)])
        return m.CheckOut(valid=True, version=cfg.digest())

    @app.get("/v1/config/versions", responses=responses(503), **role("viewer"))
    async def versions(who: Viewer) -> list[m.ConfigVersionOut]:
        """The versions kept (oldest first); any of them can be rolled back to."""
        store = service.store()
        current = file_version()
        return [m.ConfigVersionOut(version=v.version, saved=v.saved, current=v.version == current)
                for v in store.versions()]

    @app.get("/v1/config/versions/{version}", responses=responses(404, 409, 503), **role("viewer"))
    async def get_version(who: Viewer, version: Annotated[m.VersionId, Path()]) -> m.ConfigOut:
        """A kept version (inline secrets redacted)."""
        for v in reversed(service.store().versions()):
            if v.version == version:
                try:
                    data = yaml.safe_load(v.path.read_text())
                except (OSError, yaml.YAMLError) as e:
                    raise ApiError(409, f"kept version {version} cannot be read: {e}") from None
                return m.ConfigOut(version=version, document=confdoc.redact(data if isinstance(data, dict) else {}))
        raise ApiError(404, f"no kept version {version}")

    @app.post("/v1/config/rollback", responses=responses(404, 409, 503), **role("admin"))
    async def rollback(who: Admin, request: Request, body: m.RollbackIn, wait_s: WaitS = 0) -> m.ChangeOut:
        """Make a kept version the configuration again (validated like any change)."""
        store = service.store()
        match = [v for v in store.versions() if v.version == body.version]
        if not match:
            raise ApiError(404, f"no kept version {body.version}")
        try:
            text = match[-1].path.read_text()
        except OSError as e:
            raise ApiError(409, f"kept version {body.version} cannot be read: {e.strerror}") from None
        return await change(request, "config.rollback", body.version, lambda cur: text, None, wait_s, repairs=True)

    def items(section: str) -> list[dict[str, Any]]:
        _, data = service.current_document()
        return [x for x in data.get(section) or [] if isinstance(x, dict)]

    def item_routes(section: str, kind: str, key: str) -> None:
        ItemId = Annotated[str, Path(alias=key, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]

        @app.get(f"/v1/config/{section}", responses=responses(409, 503), name=f"list_{section}",
                 operation_id=f"list_{section}", **role("viewer"))
        async def list_items(who: Viewer) -> list[dict[str, Any]]:
            return [confdoc.redact(x) for x in items(section)]

        @app.get(f"/v1/config/{section}/{{{key}}}", responses=responses(404, 409, 503), name=f"get_{kind}",
                 operation_id=f"get_{kind}", **role("viewer"))
        async def get_item(who: Viewer, ident: ItemId) -> dict[str, Any]:
            for x in items(section):
                if x.get("id") == ident:
                    return confdoc.redact(x)  # type: ignore[no-any-return]
            raise ApiError(404, f"no {kind} {ident}")

        @app.put(f"/v1/config/{section}/{{{key}}}", responses=responses(409, 503), name=f"put_{kind}",
                 operation_id=f"put_{kind}", **role("admin"))
        async def put_item(who: Admin, request: Request, ident: ItemId, item: Annotated[dict[str, Any], Body()],
                           base_version: BaseVersion = None, wait_s: WaitS = 0) -> m.ChangeOut:
            if "id" in item and item["id"] != ident:
                raise ApiError(422, "the request is not valid", [("body.id", f"differs from the path ({ident})")])

            def build(cur: dict[str, Any]) -> dict[str, Any]:
                new = {**item, "id": ident}
                lst = [x for x in cur.get(section) or [] if isinstance(x, dict)]
                old = next((x for x in lst if x.get("id") == ident), None)
                new = confdoc.unredact(new, old)
                lst = [new if x.get("id") == ident else x for x in lst] if old is not None else [*lst, new]
                return {**cur, section: lst}

            note(request, item=confdoc.redact(item))
            return await change(request, f"config.{kind}.put", ident, build, base_version, wait_s)

        @app.delete(f"/v1/config/{section}/{{{key}}}", responses=responses(404, 409, 503), name=f"delete_{kind}",
                    operation_id=f"delete_{kind}", **role("admin"))
        async def delete_item(who: Admin, request: Request, ident: ItemId, base_version: BaseVersion = None,
                              wait_s: WaitS = 0) -> m.ChangeOut:
            def build(cur: dict[str, Any]) -> dict[str, Any]:
                lst = [x for x in cur.get(section) or [] if isinstance(x, dict)]
                kept = [x for x in lst if x.get("id") != ident]
                if len(kept) == len(lst):
                    raise ApiError(404, f"no {kind} {ident}")
                return {**cur, section: kept}

            return await change(request, f"config.{kind}.delete", ident, build, base_version, wait_s)

    item_routes("evses", "evse", "evse_id")
    item_routes("meters", "meter", "meter_id")

    # -- SMGW client certificate ----------------------------------------------------------------------------
    def active_name() -> str | None:
        svc = service.link_of()
        if svc is not None and svc.cert is not None:
            return svc.cert.name
        return service.config.smgw.certificate or service.cert_store().selected()

    def anchors() -> list[Any]:
        s = service.config.smgw
        return [x for x in (s.gateway.trust_anchor if s.gateway else None, s.inbound.gateway_ca) if x is not None]

    def check_out(name: str) -> m.CertCheckOut:
        res = check(service.cert_store(), name, anchors())
        if res.info is None:
            raise ApiError(404, res.problems[0] if res.problems else f"no certificate {name}")
        base = cert_out(res.info, active_name()).model_dump()
        return m.CertCheckOut(**base, key_matches=res.key_matches, valid_now=res.valid_now, chain_ok=res.chain_ok,
                              anchored=res.anchored, usable=res.usable, problems=res.problems, validity=res.validity,
                              warnings=res.warnings)

    @app.get("/v1/smgw/certificates", responses=COMMON, **role("viewer"))
    async def certificates(who: Viewer) -> list[m.CertOut]:
        """The client certificates in the store; ``active`` is the one the link uses."""
        active = active_name()
        return [cert_out(x, active) for x in service.cert_store().list()]

    @app.post("/v1/smgw/certificates", status_code=201, responses=responses(409), **role("admin"))
    async def upload(who: Admin, request: Request, body: m.CertUpload) -> m.CertCheckOut:
        """Upload a client certificate with its private key (PEM, or PKCS#12 as base64) and check it."""
        note(request, name=body.name, format=body.format, replace=body.replace, force=body.force)
        store = service.cert_store()
        if body.replace and body.name == active_name():
            raise ApiError(409, f"{body.name} is the active certificate: upload under a new name and switch over")
        try:
            if body.format == "pem":
                store.import_pem_bytes(body.name, body.certificate.encode(), body.key.encode() if body.key else None,
                                       body.password, body.replace, force=body.force)
            else:
                try:
                    raw = base64.b64decode(body.certificate, validate=True)
                except (binascii.Error, ValueError):
                    raise ApiError(422, "the request is not valid",
                                   [("body.certificate", "not base64 (PKCS#12 is uploaded as base64)")]) from None
                store.import_pkcs12_bytes(body.name, raw, body.password, body.replace, force=body.force)
        except CertValidityError as e:
            raise ApiError(422, f"certificate not imported: {e} (\"force\": true stores it anyway)",
                           [("certificate", x) for x in e.problems]) from None
        except CertExistsError as e:
            raise ApiError(409, f"certificate not imported: {e}") from None
        except CertStoreError as e:  # a reserved or invalid name, no key, a key of another certificate, ...
            raise ApiError(422, f"certificate not imported: {e}") from None
        except (ValueError, TypeError, UnicodeError) as e:
            raise ApiError(422, f"certificate not imported: {e}") from None
        log.info("client certificate uploaded", certificate=body.name, by=who.name)
        return check_out(body.name)

    @app.get("/v1/smgw/certificates/{name}", responses=responses(404), **role("viewer"))
    async def get_certificate(who: Viewer, name: Annotated[m.Ident, Path()]) -> m.CertCheckOut:
        """A certificate with its check: key matches, valid now, chain, trust anchor."""
        return check_out(name)

    @app.post("/v1/smgw/certificates/{name}/activate", status_code=202, responses=responses(404, 409, 503),
              **role("admin"))
    async def activate(who: Admin, request: Request, name: Annotated[m.Ident, Path()],
                       body: Annotated[m.SwitchIn | None, Body()] = None) -> m.SwitchOut:
        """Switch the link over to this certificate. The link is rebuilt with it and probed at once;
        when it does not come up within the timeout, the previous certificate is restored
        (see ``GET /v1/smgw/certificate-switch``)."""
        smgw = service.config.smgw
        timeout = (body.timeout_s if body and body.timeout_s else None) or service.config.admin.switch_timeout_s
        force = bool(body and body.force)
        note(request, timeout_s=timeout, force=force)
        if not smgw.enabled:
            raise ApiError(409, "the SMGW link is switched off (smgw.enabled): nothing to verify the certificate with")
        if smgw.certificate:
            raise ApiError(409, f"smgw.certificate pins {smgw.certificate!r} in the configuration: remove it "
                                f"(PATCH /v1/config) to switch certificates here")
        if service.switcher.busy:
            raise ApiError(409, "a switch-over is in progress")
        res = check_out(name)
        dated = force and res.validity and set(res.problems) == set(res.validity)  # only its dates are wrong
        if not res.usable and not dated:
            hint = " (\"force\": true switches to it anyway)" if res.validity and set(res.problems) == set(
                res.validity) else ""
            raise ApiError(422, f"certificate {name} is not usable{hint}", [("certificate", x) for x in res.problems])
        previous = active_name()
        if previous == name:
            raise ApiError(409, f"{name} is already the active certificate")
        try:
            st = service.switcher.start(name, previous, who.name, timeout, force=force)
        except RuntimeError as e:
            raise ApiError(503, str(e)) from None
        except CertStoreError as e:
            raise ApiError(422, str(e)) from None
        return m.SwitchOut(**st.as_dict())

    @app.get("/v1/smgw/certificate-switch", responses=COMMON, **role("viewer"))
    async def switch_status(who: Viewer) -> m.SwitchOut:
        """The last certificate switch-over: switching, done, fell_back (the previous one is back) or failed."""
        return m.SwitchOut(**service.switcher.status.as_dict())

    history_routes.add_routes(app, service, Viewer, Admin, role, COMMON, responses)
    return app


class Audited:
    """ASGI wrapper: every non-GET request is audited before its answer is sent.

    Who asks comes first: the credentials (and the role the route needs) are checked on the request's
    headers before any of its body is read, so a request without valid credentials gets 401 and one whose
    role may not do it 403, whatever its size. Only then the size: a body declared (Content-Length) or
    found (chunked, while reading) larger than :data:`MAX_BODY` is refused with 413, audited under the
    account that sent it. Before a refusal the rest of the body is read and dropped (up to
    :data:`DRAIN_MAX`; not when the client waits for ``100 Continue``), so that a client that sends its
    body at once reads the answer instead of a reset connection."""

    def __init__(self, app: FastAPI, service: AdminService, origin: str | None = None) -> None:
        self.app = app
        self.service = service
        self.origin = origin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.origin is not None:
            scope["chargegate.origin"] = self.origin
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})
        state: dict[str, Any] = scope["state"]
        route = self._route_of(scope)
        request = Request(scope)
        principal = authenticate(self.service, request, _bearer_from_headers(request))
        counters = self.service.ctx.counters
        if principal is None:
            counters["admin_unauthorized"] += 1
            await self.refuse(scope, state, receive, send, 401,
                              "valid credentials are required (bearer token or client certificate)", route,
                              [(b"www-authenticate", b"Bearer")])
            return
        state["principal"] = principal
        needed = (getattr(route, "openapi_extra", None) or {}).get("x-required-role") if route is not None else None
        if needed is not None and not principal.may(needed):
            counters["admin_forbidden"] += 1
            await self.refuse(scope, state, receive, send, 403,
                              f"role {principal.role} may not do this (needs {needed})", route)
            return
        declared = _content_length(scope)
        if declared is not None and declared > MAX_BODY:
            counters["admin_too_large"] += 1
            await self.refuse(scope, state, receive, send, 413, f"the body is larger than {MAX_BODY} bytes", route)
            return
        body, too_big, ended = await _read_body(receive)
        if too_big:  # chunked, no length given: found while reading
            counters["admin_too_large"] += 1
            await self.refuse(scope, state, receive, send, 413, f"the body is larger than {MAX_BODY} bytes", route,
                              already=None if ended else MAX_BODY)
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect

        done = False

        async def audited_send(message: dict[str, Any]) -> None:
            nonlocal done
            if message["type"] == "http.response.start" and not done:
                done = True
                await self.record(scope, state, int(message["status"]))
            await send(message)

        await self.app(scope, replay, audited_send)

    def _route_of(self, scope: Scope) -> Any:
        """The route the app would run for this request (its required role), None when no route matches."""
        for route in self.app.router.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return route
        return None

    async def refuse(self, scope: Scope, state: dict[str, Any], receive: Receive, send: Send, status: int,
                     detail: str, route: Any, headers: list[tuple[bytes, bytes]] | None = None,
                     already: int | None = 0) -> None:
        """Answer ``status`` after dropping the rest of the body; ``already``: bytes of it read so far, None
        when it was read to its end."""
        state["refusal"] = detail
        if already is not None and not _expects_continue(scope):
            await _drain(receive, DRAIN_MAX - already)
        await self.record(scope, state, status, route)
        payload = m.ErrorOut(detail=detail).model_dump_json().encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode()), (b"connection", b"close"),
                                *(headers or [])]})
        await send({"type": "http.response.body", "body": payload})

    async def record(self, scope: Scope, state: dict[str, Any], status: int, route: Any = None) -> None:
        principal: Principal | None = state.get("principal")
        route = scope.get("route") or route
        action = getattr(route, "name", None) or "unknown"
        target = str(scope.get("path", ""))[:300]
        if 200 <= status < 300:
            result = "accepted"
        else:
            result = f"refused ({status}): {state.get('refusal') or 'see the status'}"[:2000]
        detail = state.get("audit_detail")
        if scope.get("chargegate.origin") == "inbound":
            detail = {**(detail or {}), "via": "inbound"}
        await self.service.audit(principal.name if principal else "(unauthenticated)",
                                 principal.role if principal else "-", f"{scope['method']} {action}", target,
                                 result, detail)


MAX_BODY = 1 << 20  # 1 MiB: a whole configuration or a certificate upload fits many times
DRAIN_MAX = 4 * MAX_BODY  # what is read and dropped before a refusal; beyond it the connection is just closed


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers") or []:
        if k.lower() == name:
            return bytes(v)
    return None


def _content_length(scope: Scope) -> int | None:
    raw = _header(scope, b"content-length")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _expects_continue(scope: Scope) -> bool:
    return (_header(scope, b"expect") or b"").lower() == b"100-continue"


async def _drain(receive: Receive, limit: int) -> bool:
    """Read and drop the rest of the request body, at most ``limit`` bytes; whether it ended."""
    size = 0
    while size <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return True  # the client went away
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
    return False


async def _read_body(receive: Receive) -> tuple[bytes, bool, bool]:
    """(the whole request body, False, True), or (b"", True, whether it ended) once it passes
    :data:`MAX_BODY`."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False, True  # the client went away
        chunk = message.get("body", b"")
        more = bool(message.get("more_body", False))
        size += len(chunk)
        if size > MAX_BODY:
            return b"", True, not more
        chunks.append(chunk)
        if not more:
            return b"".join(chunks), False, True
