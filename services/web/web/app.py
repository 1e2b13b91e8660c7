"""The HTTP side of the web service (Starlette, served by uvicorn inside the service's event loop).

``GET /`` the page (server-rendered), ``GET /events`` its live updates (Server-Sent Events),
``GET /api/series`` the 24-hour plot's data, ``GET /export/{sessions|controls|summary}.csv`` the record,
``POST /evses/{id}/mode`` set a charging mode, ``GET|POST /login``, ``POST /logout``, ``GET /static/...``,
``GET /healthz``. Every answer carries a strict Content-Security-Policy (scripts and styles from the page's
own files only) and is not cached, except the static files.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import ssl
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from chargegate import payloads as p
from chargegate import record as rec
from chargegate import record_export as rx
from chargegate.config import Config
from chargegate.httpserve import HttpServer, listen, serve_http, server_tls
from web import render
from web.auth import ANONYMOUS_LAN, PRE_COOKIE, SESSION_COOKIE, Principal, Session, check_password, on_lan, same_origin
from web.hub import stream

if TYPE_CHECKING:
    from web.service import WebService

log = structlog.get_logger("web.http")

MAX_FORM_BYTES = 4096
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


def _static() -> dict[str, bytes]:
    files = {}
    for entry in (Path(__file__).resolve().parent / "static").iterdir():
        if entry.name.endswith(tuple(STATIC_TYPES)):
            files[entry.name] = entry.read_bytes()
    return files


STATIC = _static()
ASSET_VERSION = hashlib.sha256(b"".join(STATIC[k] for k in sorted(STATIC))).hexdigest()[:10]


@dataclass
class Who:
    principal: Principal | None
    session_id: str | None
    session: Session | None


class Refused(Exception):
    def __init__(self, status: int, text: str) -> None:
        self.status, self.text = status, text


def make_app(svc: WebService) -> Starlette:
    def cfg() -> Config:
        return svc.config

    def tls() -> bool:
        return cfg().web.tls is not None

    def who(request: Request) -> Who:
        sid = request.cookies.get(SESSION_COOKIE)
        s = svc.sessions.get(sid)
        if s is not None:
            return Who(s.principal, sid, s)
        host = request.client.host if request.client else None
        if cfg().web.view == "lan" and on_lan(cfg(), host):
            return Who(ANONYMOUS_LAN, None, None)
        return Who(None, None, None)

    def audience(w: Who) -> render.Audience:
        pr = w.principal
        logged = pr is not None and pr.logged_in
        return render.Audience(logged_in=logged, can_set=logged and pr is not None and pr.may(cfg().web.mode_role),
                               user=pr.name if logged and pr is not None else None,
                               csrf=w.session.csrf if w.session is not None else "")

    def headers(extra: dict[str, str] | None = None, cache: bool = False) -> dict[str, str]:
        h = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
             "X-Frame-Options": "DENY", "Cache-Control": "public, max-age=86400" if cache else "no-store"}
        if tls():
            h["Strict-Transport-Security"] = "max-age=31536000"
        if extra:
            h.update(extra)
        return h

    def cookie(resp: Response, name: str, value: str, max_age: int | None) -> None:
        resp.set_cookie(name, value, max_age=max_age, path="/", secure=tls(), httponly=True, samesite="strict")

    async def form(request: Request) -> dict[str, str]:
        """A small urlencoded or JSON body (at most ``MAX_FORM_BYTES``)."""
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_FORM_BYTES):
            raise Refused(413, "request body too large")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise Refused(413, "request body too large")
        ctype = request.headers.get("content-type", "").split(";")[0].strip()
        if ctype == "application/json":
            from chargegate import strict_json

            try:
                data = strict_json.loads(body) if body else {}
            except ValueError as e:
                raise Refused(422, f"body is not valid JSON: {e}") from None
            if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
                raise Refused(422, "body must be a JSON object of strings")
            return {str(k): v for k, v in data.items()}
        if ctype in ("application/x-www-form-urlencoded", ""):
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                raise Refused(422, "body is not UTF-8") from None
            return {k: v[0] for k, v in parse_qs(text, keep_blank_values=True, max_num_fields=20).items()}
        raise Refused(415, f"unsupported content type {ctype}")

    def check_origin(request: Request) -> None:
        if not same_origin(request.headers.get("origin"), request.headers.get("host"), request.url.scheme):
            svc.ctx.counters["csrf_refused"] += 1
            raise Refused(403, "request from another site refused")

    def check_csrf(request: Request, w: Who, fields: dict[str, str]) -> None:
        check_origin(request)
        token = request.headers.get("x-csrf-token") or fields.get("csrf", "")
        if w.session is None or not token or not secrets.compare_digest(token.encode(), w.session.csrf.encode()):
            svc.ctx.counters["csrf_refused"] += 1
            raise Refused(403, "missing or wrong CSRF token (reload the page)")

    def refused(e: Refused, request: Request) -> Response:
        svc.ctx.counters[f"http_{e.status}"] += 1
        if e.status >= 500 or e.status in (413, 415, 422, 403):
            log.warning("request refused", path=request.url.path, status=e.status, reason=e.text)
        wants_json = "application/json" in request.headers.get("accept", "") or \
            request.headers.get("x-csrf-token") is not None
        if wants_json:
            return JSONResponse({"detail": e.text}, status_code=e.status, headers=headers())
        return PlainTextResponse(e.text, status_code=e.status, headers=headers())

    def viewer(request: Request) -> Who:
        w = who(request)
        if w.principal is None:
            raise Refused(401, "login required")
        return w

    # -- pages ---------------------------------------------------------------------------------------------
    async def index(request: Request) -> Response:
        w = who(request)
        if w.principal is None:
            return RedirectResponse("/login", 303, headers=headers())
        return HTMLResponse(svc.render_page(audience(w), ASSET_VERSION), headers=headers())

    def login_form(error: str | None = None, status_code: int = 200, note: str | None = None) -> Response:
        pre = secrets.token_urlsafe(24)
        resp = HTMLResponse(render.login_page(cfg(), pre, error, note), status_code=status_code, headers=headers())
        cookie(resp, PRE_COOKIE, pre, 3600)
        return resp

    async def login_get(request: Request) -> Response:
        return login_form()

    async def login_post(request: Request) -> Response:
        client = request.client.host if request.client else "?"
        try:
            check_origin(request)
            fields = await form(request)
        except Refused as e:
            return refused(e, request)
        pre = request.cookies.get(PRE_COOKIE, "")
        if not pre or not secrets.compare_digest(pre.encode(), fields.get("csrf", "").encode()):
            svc.ctx.counters["csrf_refused"] += 1
            return login_form("The form expired. Please try again.", 403)
        wait = svc.throttle.blocked(client)
        if wait > 0:
            svc.ctx.counters["logins_throttled"] += 1
            return login_form(f"Too many failed logins. Try again in {wait:.0f} s.", 429)
        principal = check_password(cfg(), fields.get("name", "")[:64], fields.get("password", "")[:1024])
        if principal is None:
            svc.throttle.failed(client)
            svc.ctx.counters["logins_failed"] += 1
            log.warning("login failed", client=client, account=fields.get("name", "")[:64])
            return login_form("Wrong name or password.", 401)
        svc.throttle.succeeded(client)
        sid, _ = svc.sessions.create(principal)
        svc.ctx.counters["logins"] += 1
        log.info("logged in", account=principal.name, role=principal.role, method=principal.method, client=client)
        resp = RedirectResponse("/", 303, headers=headers())
        cookie(resp, SESSION_COOKIE, sid, int(svc.sessions.ttl_s))
        resp.delete_cookie(PRE_COOKIE, path="/")
        return resp

    async def logout(request: Request) -> Response:
        w = who(request)
        try:
            check_csrf(request, w, await form(request))
        except Refused as e:
            return refused(e, request)
        if w.session_id:
            svc.sessions.drop(w.session_id)
            svc.hub.end_session(w.session_id)
        resp = RedirectResponse("/login", 303, headers=headers())
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    # -- live ----------------------------------------------------------------------------------------------
    async def events(request: Request) -> Response:
        try:
            w = viewer(request)
        except Refused as e:
            return refused(e, request)
        aud = audience(w)
        client = svc.hub.add(aud, w.session_id)
        if client is None:
            return refused(Refused(503, "too many live pages open"), request)
        first = svc.sections_event(set(render.SECTIONS), render.Audience(aud.logged_in, aud.can_set, aud.user))
        return StreamingResponse(stream(svc.hub, client, first), media_type="text/event-stream",
                                 headers=headers({"X-Accel-Buffering": "no"}))

    async def series(request: Request) -> Response:
        try:
            viewer(request)
        except Refused as e:
            return refused(e, request)
        node = request.query_params.get("node") or cfg().root_circuit.id
        if node not in {c.id for c in cfg().all_circuits()}:
            return refused(Refused(404, f"no circuit {node[:64]!r}"), request)
        try:
            hours = float(request.query_params.get("hours", "24"))
        except ValueError:
            hours = float("nan")
        if not 0.1 <= hours <= 24 * 7:
            return refused(Refused(422, "hours: a number from 0.1 to 168"), request)
        start, end = render.window(p.utcnow(), hours)
        samples = svc.record.read(rec.node_series, start, end, node) or []
        controls = svc.record.read(rec.controls, start, end) or []
        return JSONResponse(render.series_json(cfg(), node, samples, controls, start, end), headers=headers())

    # -- the record ---------------------------------------------------------------------------------------------
    async def export(request: Request) -> Response:
        w = who(request)
        if w.principal is None or not w.principal.logged_in:
            return refused(Refused(401, "login required for the export (it holds personal data)"), request)
        what = request.path_params["what"]
        if what not in ("sessions", "controls", "summary"):
            return refused(Refused(404, "no such export"), request)
        tz = svc.tz
        try:
            start = rx.parse_when(request.query_params.get("from"), tz)
            end = rx.parse_when(request.query_params.get("to"), tz, end=True)
        except ValueError as e:
            return refused(Refused(422, f"from/to: {e}"), request)
        text = svc.record.read(rx.export, what, fmt="csv", style=cfg().history.csv_style, tz=tz,
                               currency=cfg().history.prices.currency, start=start, end=end)
        if text is None:
            return refused(Refused(503, "the record cannot be read (none recorded yet?)"), request)
        svc.ctx.counters["exports"] += 1
        stamp = datetime.now(tz).strftime("%Y%m%d")
        return Response(text.encode("utf-8"), media_type="text/csv; charset=utf-8", headers=headers(
            {"Content-Disposition": f'attachment; filename="chargegate-{what}-{stamp}.csv"'}))

    # -- charging mode -------------------------------------------------------------------------------------
    async def set_mode(request: Request) -> Response:
        w = who(request)
        evse_id = request.path_params["evse_id"]
        try:
            if w.principal is None or not w.principal.logged_in:
                raise Refused(401, "login required to set a charging mode")
            fields = await form(request)
            check_csrf(request, w, fields)
            if not w.principal.may(cfg().web.mode_role):
                raise Refused(403, f"role {w.principal.role} may not set charging modes (needs {cfg().web.mode_role})")
            if evse_id not in {e.id for e in cfg().evses}:
                raise Refused(404, f"no wallbox {evse_id[:64]!r}")
            try:
                mode = p.ChargingModeName(fields.get("mode", ""))
            except ValueError:
                raise Refused(422, "mode: one of " + ", ".join(m.value for m in p.ChargingModeName)) from None
        except Refused as e:
            return refused(e, request)
        got = await svc.set_mode(evse_id, mode, w.principal.name)
        wants_json = request.headers.get("x-csrf-token") is not None or \
            "application/json" in request.headers.get("accept", "")
        if not wants_json:
            return RedirectResponse("/", 303, headers=headers())
        if got is None:
            return JSONResponse({"evse_id": evse_id, "mode": mode.value, "confirmed": False,
                                 "detail": "sent; the history service has not confirmed it yet"},
                                status_code=202, headers=headers())
        return JSONResponse({"evse_id": evse_id, "mode": got.mode.value, "confirmed": True, "set_by": got.set_by},
                            headers=headers())

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        data = STATIC.get(name)
        if data is None:
            return PlainTextResponse("not found", 404, headers=headers())
        ext = "." + name.rsplit(".", 1)[-1]
        return Response(data, media_type=STATIC_TYPES[ext], headers=headers(cache=True))

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok", headers=headers())

    async def not_found(request: Request, exc: Exception) -> Response:
        return PlainTextResponse("not found", 404, headers=headers())

    async def crash(request: Request, exc: Exception) -> Response:
        svc.ctx.counters["http_errors"] += 1
        log.error("request failed", path=request.url.path, error=repr(exc), exc_info=exc)
        return PlainTextResponse("internal error (logged)", 500, headers=headers())

    routes = [
        Route("/", index), Route("/login", login_get, methods=["GET"]), Route("/login", login_post, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]), Route("/events", events), Route("/api/series", series),
        Route("/export/{what}.csv", export), Route("/evses/{evse_id}/mode", set_mode, methods=["POST"]),
        Route("/static/{name}", static), Route("/healthz", healthz),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 500: crash})


def tls_context(config: Config) -> ssl.SSLContext | None:
    t = config.web.tls
    return None if t is None else server_tls(t.cert_file, t.key_file)


def listen_host(config: Config) -> str:
    """``web.host``, or ``CHARGEGATE_WEB_HOST`` (compose sets 0.0.0.0: inside a container the published port
    arrives on the container's own interface)."""
    return os.environ.get("CHARGEGATE_WEB_HOST") or config.web.host


async def serve(app: Any, config: Config) -> HttpServer:
    return await serve_http(app, listen(listen_host(config), config.web.port, backlog=128), tls_context(config),
                            name="web.http")
