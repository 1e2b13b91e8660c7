"""Exports of the record (``chargegate history ...`` and ``/v1/history/...``): CSV and JSON.

CSV for spreadsheets (``style="de"``, the default): ``;`` between fields, decimal comma, times in the
site's time zone as ``YYYY-MM-DD HH:MM:SS`` (which German-locale LibreOffice and Excel read as a date and
time), UTF-8 with a byte-order mark (so Excel does not guess another encoding). ``style="intl"``: ``,`` and
decimal point, no BOM. Every row also carries the UTC times in ISO 8601, for machines.

The house-load export (``ts,node,l1_a,l2_a,l3_a``) is for ``chargegate simulate --load``: always ``,`` and
``.``, ``ts`` in ISO 8601 with its offset.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from datetime import datetime, tzinfo
from typing import Any

from chargegate import record as rec

SESSION_COLUMNS = (
    "record_id", "evse", "id_tag", "start", "stop", "duration_min", "energy_kwh", "meter_start_kwh",
    "meter_stop_kwh", "peak_kw", "phases", "cost", "currency", "tariffs", "signed_values", "start_utc", "stop_utc",
    "session_ids", "source", "stop_reason")
CONTROL_COLUMNS = (
    "record_id", "kind", "source", "scope", "start", "end", "duration_min", "power_kw", "current_a",
    "raised_to_14a_floor", "effective_kw", "valid_until", "limit_id", "answer", "detail", "start_utc", "end_utc")
SUMMARY_COLUMNS = ("month", "id_tag", "sessions", "energy_kwh", "cost", "currency")
HOUSE_LOAD_COLUMNS = ("ts", "node", "l1_a", "l2_a", "l3_a")


class Style:
    def __init__(self, style: str, tz: tzinfo) -> None:
        self.de = style == "de"
        self.delimiter = ";" if self.de else ","
        self.tz = tz

    def num(self, v: float | None, digits: int = 3) -> str:
        if v is None:
            return ""
        text = f"{v:.{digits}f}"
        return text.replace(".", ",") if self.de else text

    def time(self, v: datetime | None) -> str:
        return v.astimezone(self.tz).strftime("%Y-%m-%d %H:%M:%S") if v else ""

    @staticmethod
    def utc(v: datetime | None) -> str:
        return v.isoformat() if v else ""

    @staticmethod
    def yesno(v: bool | None) -> str:
        return "" if v is None else ("yes" if v else "no")


def _csv(header: Iterable[str], rows: Iterable[Iterable[Any]], delimiter: str, bom: bool) -> str:
    buf = io.StringIO()
    if bom:
        buf.write("\ufeff")
    w = csv.writer(buf, delimiter=delimiter, lineterminator="\r\n")
    w.writerow(header)
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def sessions_csv(rows: list[rec.SessionRow], style: str, tz: tzinfo, currency: str = "EUR") -> str:
    s = Style(style, tz)

    def row(x: rec.SessionRow) -> list[Any]:
        tariffs = "; ".join(f"{t.level}{f' {t.period_id}' if t.period_id else ''}: {s.num(t.energy_wh / 1000)} kWh"
                            + (f" x {s.num(t.price_ct_per_kwh, 2)} ct" if t.price_ct_per_kwh is not None else "")
                            for t in x.tariffs if t.energy_wh > 0)
        return [x.id, x.evse_id, x.id_tag or "", s.time(x.started), s.time(x.stopped),
                s.num(x.duration_s / 60, 1) if x.duration_s is not None else "", s.num(x.energy_wh / 1000),
                s.num(x.energy_start_wh / 1000 if x.energy_start_wh is not None else None),
                s.num(x.energy_stop_wh / 1000 if x.energy_stop_wh is not None else None),
                s.num(x.peak_power_w / 1000 if x.peak_power_w is not None else None), x.phases or "",
                s.num(x.cost, 2), currency, tariffs, len(x.signed), s.utc(x.started), s.utc(x.stopped),
                " ".join(x.session_ids), x.source or "", x.stop_reason or ""]

    return _csv(SESSION_COLUMNS, (row(x) for x in rows), s.delimiter, s.de)


def controls_csv(rows: list[rec.ControlRow], style: str, tz: tzinfo) -> str:
    s = Style(style, tz)

    def row(c: rec.ControlRow) -> list[Any]:
        return [c.id, c.kind, c.source or "", c.scope or "", s.time(c.started), s.time(c.ended),
                s.num(c.duration_s / 60, 1) if c.duration_s is not None else "",
                s.num(c.power_w / 1000 if c.power_w is not None else None),
                "/".join(s.num(a, 1) for a in c.current_a) if c.current_a else "", s.yesno(c.raised_to_floor),
                s.num(c.effective_w / 1000 if c.effective_w is not None else None), s.time(c.valid_until),
                c.limit_id or "", c.answer or "", c.detail or "", s.utc(c.started), s.utc(c.ended)]

    return _csv(CONTROL_COLUMNS, (row(c) for c in rows), s.delimiter, s.de)


def summary_csv(rows: list[rec.MonthSummary], style: str, tz: tzinfo, currency: str = "EUR") -> str:
    s = Style(style, tz)
    return _csv(SUMMARY_COLUMNS, ([m.month, m.id_tag or "", m.sessions, s.num(m.energy_wh / 1000), s.num(m.cost, 2),
                                   currency] for m in rows), s.delimiter, s.de)


def house_load_csv(rows: list[tuple[datetime, str, list[float]]], tz: tzinfo) -> str:
    return _csv(HOUSE_LOAD_COLUMNS, ([ts.astimezone(tz).isoformat(), node, *(f"{a:.3f}" for a in amps)]
                                     for ts, node, amps in rows), ",", False)


def to_json(rows: Iterable[Any]) -> str:
    return json.dumps(rec.rows_json(rows), ensure_ascii=False, indent=1) + "\n"


KINDS = ("sessions", "controls", "summary", "house-load")


def export(conn: Any, what: str, *, fmt: str = "csv", style: str = "de", tz: tzinfo, currency: str = "EUR",
           start: datetime | None = None, end: datetime | None = None, evse: str | None = None,
           id_tag: str | None = None, kind: str | None = None, node: str | None = None) -> str:
    """One export as text (the CLI and the admin API both call this). ``what``: one of :data:`KINDS`."""
    if what == "sessions":
        srows = rec.sessions(conn, start, end, evse, id_tag)
        return to_json(srows) if fmt == "json" else sessions_csv(srows, style, tz, currency)
    if what == "controls":
        crows = rec.controls(conn, start, end, kind=kind)
        return to_json(crows) if fmt == "json" else controls_csv(crows, style, tz)
    if what == "summary":
        mrows = rec.monthly_summary(conn, start, end, evse, id_tag, tz=tz)
        return to_json(mrows) if fmt == "json" else summary_csv(mrows, style, tz, currency)
    if what == "house-load":
        hrows = rec.house_load(conn, start, end, node)
        if fmt == "json":
            return json.dumps([{"ts": ts.astimezone(tz).isoformat(), "node": n, "l1_a": a[0], "l2_a": a[1],
                                "l3_a": a[2]} for ts, n, a in hrows], indent=1) + "\n"
        return house_load_csv(hrows, tz)
    raise ValueError(f"unknown export {what!r}; one of {', '.join(KINDS)}")


def parse_when(text: str | None, tz: tzinfo, end: bool = False) -> datetime | None:
    """``2026-03`` (a month), ``2026-03-02`` (a day, local), or an ISO 8601 time (local when it has no
    offset). With ``end``, a month or day means its end (the next month or day)."""
    if not text:
        return None
    from datetime import timedelta

    parts = text.split("-")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        y, m = int(parts[0]), int(parts[1])
        if end:
            y, m = (y + 1, 1) if m == 12 else (y, m + 1)
        return datetime(y, m, 1, tzinfo=tz)
    t = datetime.fromisoformat(text)
    if len(text) == 10:  # a date
        t = t.replace(tzinfo=tz)
        return t + timedelta(days=1) if end else t
    return t if t.tzinfo is not None else t.replace(tzinfo=tz)
