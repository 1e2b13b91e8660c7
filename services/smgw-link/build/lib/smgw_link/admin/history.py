"""``/v1/history/...`` and ``/v1/evses/<id>/mode``: the record kept by the history service (read from its
database, read-only) and the charging mode (sent over the bus to the history service, which keeps it)."""


import asyncio
import uuid
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from chargegate import payloads as p
from chargegate import record as rec
from chargegate import record_export as rx
from chargegate.strict_numbers import StrictNumbers
from smgw_link.admin.core import AdminService, ApiError

HistoryKind = Literal["sessions", "controls", "summary", "house-load"]


class ModeIn(StrictNumbers):
    mode: p.ChargingModeName | None = Field(default=None, description="off, now, rules, solar, solar+min; "
                                                                      "omitted: keep the mode")
    target_kwh: float | None = Field(default=None, gt=0, le=500, description="session target: this much energy ...")
    by: str | None = Field(default=None, pattern=r"^([01]\d|2[0-3]):[0-5]\d$", description="... by this local time")
    clear_target: bool = False


class ModeOut(BaseModel):
    evse_id: str
    request_id: str
    sent: p.ModeCommand


class ModeView(BaseModel):
    evse_id: str
    mode: str
    target: dict[str, Any] | None = None
    set_by: str | None = None
    set_at: str | None = None


def add_routes(app: FastAPI, service: AdminService, viewer: Any, admin: Any, role: Any, common: Any,
               responses: Any) -> None:
    def open_record() -> Any:
        cfg = service.config
        path = cfg.history.db_path(cfg.state_dir)
        if not path.exists():  # nothing recorded yet: an empty record, not an error
            return rec.open_empty()
        try:
            return rec.open_db(path, readonly=True)
        except rec.RecordError as e:
            raise ApiError(503, str(e)) from None

    csv_or_json = {"content": {"text/csv": {"schema": {"type": "string"}},
                               "application/json": {"schema": {"type": "array", "items": {"type": "object"}}}},
                   "description": "the rows, oldest first"}

    @app.get("/v1/history/{what}", responses={**responses(503), 200: csv_or_json}, **role("viewer"),
             response_class=Response)
    async def history(who: viewer, what: Annotated[HistoryKind, Path()],  # type: ignore[valid-type]
                      start: Annotated[str | None, Query(alias="from", description="2026-03, 2026-03-01, ISO")] = None,
                      end: Annotated[str | None, Query(alias="to", description="inclusive month/day, ISO")] = None,
                      evse: Annotated[str | None, Query(max_length=64)] = None,
                      id_tag: Annotated[str | None, Query(max_length=64)] = None,
                      kind: Annotated[str | None, Query(max_length=32)] = None,
                      node: Annotated[str | None, Query(max_length=64)] = None,
                      format: Annotated[Literal["csv", "json"], Query()] = "json",
                      style: Annotated[Literal["de", "intl"] | None, Query()] = None) -> Response:
        """The record as the history service keeps it: sessions (with tariff parts, cost and signed meter
        data in JSON), control actions, the monthly summary per idTag, the house load per node. CSV columns
        as in the README (``style=de``: ``;`` and decimal comma)."""
        cfg = service.config
        tz = ZoneInfo(cfg.site.timezone)
        try:
            t0, t1 = rx.parse_when(start, tz), rx.parse_when(end, tz, end=True)
        except ValueError as e:
            raise ApiError(422, f"from/to: {e}") from None

        def run() -> str:
            conn = open_record()
            try:
                return rx.export(conn, what, fmt=format, style=style or cfg.history.csv_style, tz=tz,
                                 currency=cfg.history.prices.currency, start=t0, end=t1, evse=evse, id_tag=id_tag,
                                 kind=kind, node=node)
            finally:
                conn.close()

        text = await asyncio.to_thread(run)
        media = "application/json" if format == "json" else "text/csv; charset=utf-8"
        headers = {} if format == "json" else {"Content-Disposition": f'attachment; filename="{what}.csv"'}
        return Response(text, media_type=media, headers=headers)

    @app.get("/v1/modes", responses=responses(503), **role("viewer"))
    async def modes(who: viewer) -> list[ModeView]:  # type: ignore[valid-type]
        """The charging mode of every EVSE (``rules`` where none was set)."""
        def run() -> dict[str, rec.ModeRow]:
            conn = open_record()
            try:
                return rec.modes(conn)
            finally:
                conn.close()

        rows = await asyncio.to_thread(run)
        out = []
        for e in service.config.evses:
            r = rows.get(e.id)
            out.append(ModeView(evse_id=e.id, mode=r.mode if r else "rules", target=r.target if r else None,
                                set_by=r.set_by if r else None, set_at=r.set_at.isoformat() if r else None))
        return out

    @app.put("/v1/evses/{evse_id}/mode", status_code=202, responses=responses(404, 503), **role("admin"))
    async def set_mode(who: admin, request: Request, evse_id: Annotated[str, Path(max_length=64)],  # type: ignore[valid-type]
                       body: ModeIn) -> ModeOut:
        """Set the charging mode and/or the session target of an EVSE. Sent to the history service, which
        keeps it and publishes ``evse/<id>/mode`` (the load controller honours it at its next cycle)."""
        if evse_id not in {e.id for e in service.config.evses}:
            raise ApiError(404, f"no EVSE {evse_id!r}")
        if (body.target_kwh is None) != (body.by is None):
            raise ApiError(422, "a session target needs both target_kwh and by")
        target = p.SessionTarget(energy_wh=body.target_kwh * 1000, by=body.by) if body.target_kwh and body.by else None
        if not service.ctx.bus.connected.is_set():
            raise ApiError(503, "the broker is not connected")
        rid = uuid.uuid4().hex[:16]
        cmd = p.ModeCommand(evse_id=evse_id, mode=body.mode, target=target, clear_target=body.clear_target,
                            request_id=rid, source=f"admin:{who.name}"[:64])
        service.ctx.bus.publish("evse.mode_set", cmd, evse_id=evse_id)
        request.state.audit_detail = {"mode": body.mode.value if body.mode else None, "target_kwh": body.target_kwh,
                                      "by": body.by, "request_id": rid}
        return ModeOut(evse_id=evse_id, request_id=rid, sent=cmd)
