"""The variables API in the style of the reference product (FastAPI; OpenAPI at ``/openapi.json``).

Variables:

``AVAIL``  0..100 - percent of ``smgw.http_api.house_power_w`` available to the house connection.
                    AVAIL < 100 publishes a grid limit (scope grid) of house_power_w * AVAIL / 100.
``TARIF``  0 | 1  - tariff level: 0 normal, 1 reduced.

Both can carry ``duration_s``, after which they return to 100 / the schedule.

The same app is served twice: on the local network (``http_api.host:port``; origin ``local``,
limits under source ``local``) and behind the inbound CLS channel (origin ``inbound``, limits
under ``http_api.inbound_source``). Operator writes through the inbound channel need the
function switch (AVAIL: ``power_reduction``, TARIF and the schedule: ``tariffs``); when it is off
they are answered 403 "not supported" and logged. Every request needs a bearer token from
``http_api.tokens`` (compared in constant time); with no tokens configured the API refuses all.

Routes: ``GET /api/variables``, ``GET|PUT /api/variables/{name}``, ``GET|PUT /api/tariff/schedule``,
``GET /api/limits``, and for clients of the reference product ``GET|POST /cnf?cmd=set_cm_vars&name=N&val=V``
and ``GET /cnf?cmd=get_cm_vars``.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import structlog
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chargegate import payloads as p
from chargegate.config.smgw import Smgw
from chargegate.ratelog import LogLimiter
from chargegate.strict_numbers import StrictNumbers
from chargegate.topics import format_loc
from smgw_link.control import OperatorControl

log = structlog.get_logger("smgw_link.http")

Origin = Literal["local", "inbound"]
VARIABLES = ("AVAIL", "TARIF")
_bearer = HTTPBearer(auto_error=False)  # module level: annotations are resolved in module globals


class VariableIn(StrictNumbers):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    value: float = Field(description="AVAIL: 0..100 (%); TARIF: 0 normal, 1 reduced")
    duration_s: float | None = Field(default=None, gt=0, le=31 * 86400,
                                     description="return to the default after this many seconds")


class VariableOut(BaseModel):
    name: str
    value: float
    unit: str | None = None
    set_at: datetime | None = None
    until: datetime | None = None
    origin: str | None = None
    description: str


class ScheduleIn(StrictNumbers):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    periods: list[p.TariffPeriod] = Field(max_length=1000)


@dataclass
class ApiState:
    cfg: Smgw
    control: OperatorControl
    on_change: Callable[[], None]
    now: Callable[[], datetime]
    counters: Any


def make_app(state: ApiState, origin: Origin) -> FastAPI:
    app = FastAPI(title=f"chargegate variables API ({origin})", version="1",
                  description=__doc__ or "", docs_url="/docs", redoc_url=None,
                  redirect_slashes=False)  # a client that gets the path wrong gets a 404, not a redirect

    def count(key: str) -> None:
        state.counters[key] = state.counters.get(key, 0) + 1

    refusals = LogLimiter(log)  # unauthenticated requests: per client and minute, few per minute, summarised

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
        """FastAPI's 422 without the input echoed back (a NaN in it cannot even be written as JSON)."""
        count("http_invalid")
        errors = [{"loc": list(x.get("loc", ())), "msg": str(x.get("msg", "invalid")), "type": str(x.get("type", ""))}
                  for x in e.errors()]
        client = request.client.host if request.client else "?"
        refusals.warning(f"invalid:{client}", "variables API request refused: invalid input", subject="clients",
                         path=request.url.path,
                         errors="; ".join(f"{format_loc(tuple(x['loc']))}: {x['msg']}" for x in errors)[:500])
        return JSONResponse({"detail": errors}, status_code=422)

    def auth(request: Request,
             cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        tokens = []
        for t in state.cfg.http_api.tokens:
            try:
                tokens.append(t.reveal())
            except LookupError as e:
                log.error("API token not available", error=str(e))
        ok = cred is not None and cred.scheme.lower() == "bearer" and any(
            secrets.compare_digest(cred.credentials.encode(), t.encode()) for t in tokens)
        if not ok:
            count("http_unauthorized")
            client = request.client.host if request.client else None
            refusals.warning(f"{client}", "HTTP API request refused: missing or wrong token", subject="clients",
                             origin=origin, path=request.url.path[:200], client=client)
            raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})

    def function_on(name: str, var: str) -> None:
        if origin == "inbound" and not getattr(state.cfg.functions, name):
            count("http_not_supported")
            log.warning("operator command not supported: function switched off", function=name, variable=var)
            raise HTTPException(403, f"not supported: function {name} is switched off in the configuration")

    def describe(name: str) -> VariableOut:
        c = state.control
        now = state.now()
        if name == "AVAIL":
            a = c.avail.get(origin)
            binding = a is not None and a.binding(now)
            return VariableOut(name="AVAIL", value=a.percent if binding and a else 100.0, unit="%",
                               set_at=a.set_at if a else None, until=a.until if binding and a else None,
                               origin=origin,
                               description=f"percent of {state.cfg.http_api.house_power_w:g} W house power")
        t = c.tarif
        active = t is not None and (t.until is None or now < t.until)
        level = float(t.level) if active and t else (1.0 if c.tariff_now(now).period.level == p.TariffLevel.LOW
                                                     else 0.0)
        return VariableOut(name="TARIF", value=level, set_at=t.set_at if active and t else None,
                           until=t.until if active and t else None, origin=t.channel if active and t else None,
                           description="tariff level: 0 normal, 1 reduced")

    def set_var(name: str, body: VariableIn) -> VariableOut:
        name = name.upper()
        if name not in VARIABLES:
            raise HTTPException(404, f"unknown variable {name}; known: {', '.join(VARIABLES)}")
        now = state.now()
        if name == "AVAIL":
            function_on("power_reduction", name)
            if not 0 <= body.value <= 100:
                raise HTTPException(422, "AVAIL must be within 0..100")
            state.control.set_avail(origin, body.value, now, body.duration_s)
        else:
            function_on("tariffs", name)
            if body.value not in (0, 1):
                raise HTTPException(422, "TARIF must be 0 (normal) or 1 (reduced)")
            state.control.set_tarif(origin, int(body.value), now, body.duration_s)
        count(f"http_set_{name.lower()}")
        log.info("variable set", variable=name, value=body.value, duration_s=body.duration_s, origin=origin)
        state.on_change()
        return describe(name)

    deps = [Depends(auth)]

    @app.get("/api/variables", dependencies=deps)
    def list_variables() -> dict[str, VariableOut]:
        return {n: describe(n) for n in VARIABLES}

    @app.get("/api/variables/{name}", dependencies=deps)
    def get_variable(name: str) -> VariableOut:
        if name.upper() not in VARIABLES:
            raise HTTPException(404, f"unknown variable {name}")
        return describe(name.upper())

    @app.put("/api/variables/{name}", dependencies=deps)
    def put_variable(name: str, body: VariableIn) -> VariableOut:
        return set_var(name, body)

    @app.get("/api/tariff/schedule", dependencies=deps)
    def get_schedule() -> ScheduleIn:
        return ScheduleIn(periods=state.control.schedule)

    @app.put("/api/tariff/schedule", dependencies=deps)
    def put_schedule(body: ScheduleIn) -> ScheduleIn:
        function_on("tariffs", "schedule")
        ps = sorted(body.periods, key=lambda x: x.start)
        for a, b in itertools.pairwise(ps):
            if a.end is None or a.end > b.start:
                raise HTTPException(422, f"tariff periods {a.id} and {b.id} overlap")
        state.control.set_schedule(ps)
        count("http_set_schedule")
        log.info("tariff schedule set", periods=len(ps), origin=origin)
        state.on_change()
        return ScheduleIn(periods=state.control.schedule)

    @app.get("/api/limits", dependencies=deps)
    def limits() -> dict[str, Any]:
        out = state.control.outputs(state.now())
        return {"failsafe": out.failsafe, "limits": {k: v.model_dump(mode="json") for k, v in out.limits.items()},
                "tariff": out.tariff.model_dump(mode="json")}

    def cnf(cmd: Annotated[str, Query(max_length=32)], name: Annotated[str | None, Query(max_length=32)] = None,
            val: Annotated[str | None, Query(max_length=32)] = None) -> dict[str, Any]:
        """Compatibility with the reference product's ``/cnf?cmd=set_cm_vars&name=AVAIL&val=50``."""
        if cmd == "get_cm_vars":
            return {n: describe(n).value for n in VARIABLES}
        if cmd != "set_cm_vars":
            raise HTTPException(400, f"unsupported cmd {cmd!r} (set_cm_vars, get_cm_vars)")
        if name is None or val is None:
            raise HTTPException(422, "set_cm_vars needs name and val")
        try:
            body = VariableIn(value=float(val))
        except (ValueError, ValidationError):
            raise HTTPException(422, f"val {val!r} is not a number") from None
        out = set_var(name, body)
        return {out.name: out.value}

    for method in ("GET", "POST"):
        app.add_api_route("/cnf", cnf, methods=[method], dependencies=deps, operation_id=f"cnf_{method.lower()}")

    return app
