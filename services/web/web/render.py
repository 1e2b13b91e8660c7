"""The page as HTML: every section rendered from the configuration, the live state and the record (pure:
no I/O; the service hands in what it read). Every value from outside is escaped."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from html import escape
from typing import Any

from chargegate import payloads as p
from chargegate import record as rec
from chargegate.config import Circuit, Config
from chargegate.reasons import phases_drawn
from web import words as w
from web.state import SECTIONS, LiveState

LIMIT_SOURCES = {"dso": "Grid operator", "supplier": "Energy supplier", "local": "Local (house power)",
                 "failsafe": "Failsafe"}
CONTROL_KINDS = {"limit": "limit", "evse_limit": "wallbox limit", "failsafe": "failsafe",
                 "link_outage": "SMGW link outage"}
HEALTH_SILENT_S = 35.0  # three heartbeats of 10 s and some


@dataclass(frozen=True)
class Audience:
    """Who a rendering is for: sections differ only in these (the live stream renders once per audience)."""

    logged_in: bool = False
    can_set: bool = False  # may set charging modes
    user: str | None = None
    csrf: str = ""  # filled into forms on a full page; the live stream sends "" and the script fills it


@dataclass
class Record:
    """What the page shows from the history record (read by the service)."""

    sessions: list[rec.SessionRow]
    controls: list[rec.ControlRow]
    available: bool = True  # False: no record yet (or it cannot be read)


def esc(v: Any) -> str:
    return escape(str(v), quote=True)


def _local(t: datetime | None, tz: tzinfo, now: datetime, with_date: bool | None = None) -> str:
    if t is None:
        return "–"
    lt = t.astimezone(tz)
    if with_date is None:
        with_date = lt.date() != now.astimezone(tz).date()
    return lt.strftime("%d.%m. %H:%M" if with_date else "%H:%M:%S")


def _when(t: datetime | None, tz: tzinfo, now: datetime, kind: str = "left") -> str:
    """A time with its distance from now; the script keeps the distance current (``data-rel``)."""
    if t is None:
        return '<span class="muted">no end given</span>'
    rel = w.time_left(t, now) if kind == "left" else _ago(t, now)
    return (f'<time datetime="{esc(t.isoformat())}" data-rel="{kind}">{esc(_local(t, tz, now))} '
            f'<span class="rel">({esc(rel)})</span></time>')


def _ago(t: datetime, now: datetime) -> str:
    s = (now - t).total_seconds()
    return f"{w.amount(s)} ago" if s >= 0 else f"in {w.amount(s)}"


def _kw(watts: float | None, digits: int = 1) -> str:
    return w.fmt_num(None if watts is None else watts / 1000, digits, "kW")


def _names(cfg: Config) -> dict[str, str]:
    return {c.id: c.name or c.id for c in cfg.all_circuits()}


# -- limits and tariff ---------------------------------------------------------------------------------
def limits_section(cfg: Config, st: LiveState, now: datetime, tz: tzinfo) -> str:
    rows = []
    alloc_limits = st.allocation.limits if st.allocation is not None else {}
    floor_w = alloc_limits.get("floor_14a_w")
    floor_used = False
    for source in ("dso", "supplier", "local", "failsafe"):
        lim = st.limits.get(source)
        label = LIMIT_SOURCES[source]
        if lim is None:
            continue
        if lim.binding(now):
            asked = []
            if lim.power_w is not None:
                asked.append(_kw(lim.power_w, 2))
            if lim.current_a is not None:
                asked.append("/".join(f"{a:g}" for a in lim.current_a) + " A")
            scope = {"grid": "the whole grid connection", "controllable": "the controllable devices (§14a)"}.get(
                lim.scope.value if lim.scope else cfg.controller.grid_limit_scope, "the default scope")
            applied = st.applied_limit(source) or {}
            how = ""
            if applied.get("raised_to_floor"):
                floor_used = True
                how = (f'<span class="floor">raised to the §14a minimum of '
                       f'{esc(_kw(applied.get("effective_w"), 2))}</span>')  # type: ignore[arg-type]
            elif applied.get("effective_w") is not None:
                how = f'applied as {esc(_kw(applied.get("effective_w"), 2))}'  # type: ignore[arg-type]
            extra = f' <span class="muted">{esc(lim.reason)}</span>' if lim.reason else ""
            rows.append(f'<li id="limit-{source}" class="limit on" data-active="yes">'
                        f'<b>{label}:</b> {esc(" + ".join(asked))} on {esc(scope)}, {_when(lim.valid_until, tz, now)}'
                        f'{" - " + how if how else ""}{extra}</li>')
        else:
            state = "expired" if lim.active else "none"
            rows.append(f'<li id="limit-{source}" class="limit off" data-active="no"><b>{label}:</b> {state}</li>')
    fs = alloc_limits.get("failsafe")
    if isinstance(fs, dict):
        until = _parse(fs.get("until"))
        raised = fs.get("raised_to_floor")
        floor_used = floor_used or bool(raised)
        rows.append(f'<li id="limit-controller-failsafe" class="limit on" data-active="yes"><b>Failsafe:</b> '
                    f'{esc(_kw(fs.get("power_w")))} ({esc(fs.get("cause") or "")}), {_when(until, tz, now)}'
                    f'{" - raised to the §14a minimum" if raised else ""}</li>')
    for evse_id, el in sorted(st.evse_limits.items()):
        if el.active and now < el.valid_until:
            val = f"{el.current_a:g} A" if el.current_a is not None else _kw(el.power_w)
            rows.append(f'<li class="limit on"><b>Backend limit {esc(evse_id)}:</b> {esc(val)}, '
                        f'{_when(el.valid_until, tz, now)}</li>')
    if not rows:
        rows.append('<li class="muted">no limit received</li>')
    floor = ""
    if floor_w is not None:
        n = alloc_limits.get("controllable_evses")
        floor = (f'<p id="floor" data-applies="{"yes" if floor_used else "no"}">§14a minimum for '
                 f'{esc(n)} controllable wallbox{"es" if n != 1 else ""}: <b>{esc(_kw(floor_w, 2))}</b> - '
                 f'{"<b>applies now</b>" if floor_used else "not needed now"}</p>')
    return (f"<h2>Limits in force</h2><ul class=\"limits\">{''.join(rows)}</ul>{floor}"
            f"{tariff_block(st, now, tz)}")


def _parse(v: Any) -> datetime | None:
    if not isinstance(v, str):
        return None
    try:
        t = datetime.fromisoformat(v)
    except ValueError:
        return None
    return t if t.tzinfo is not None else None


def _tariff_text(per: p.TariffPeriod) -> str:
    price = f", {per.price_ct_per_kwh:g} ct/kWh" if per.price_ct_per_kwh is not None else ""
    return f"{per.level.value}{price}"


def tariff_block(st: LiveState, now: datetime, tz: tzinfo) -> str:
    cur = st.tariff_current
    parts = []
    if cur is not None and cur.period.start <= now and (cur.period.end is None or now < cur.period.end):
        per = cur.period
        parts.append(f'<li id="tariff-now" data-level="{esc(per.level.value)}"><b>Tariff now:</b> '
                     f'{esc(_tariff_text(per))}, {_when(per.end, tz, now)}</li>')
    else:
        parts.append('<li id="tariff-now" data-level=""><b>Tariff now:</b> <span class="muted">not known</span></li>')
    nxt = None
    if st.tariff_schedule is not None:
        later = [x for x in st.tariff_schedule.periods if x.start > now]
        nxt = min(later, key=lambda x: x.start) if later else None
    if nxt is not None:
        parts.append(f'<li id="tariff-next"><b>Next:</b> {esc(_tariff_text(nxt))} from '
                     f'{_when(nxt.start, tz, now, "left")}</li>')
    else:
        parts.append('<li id="tariff-next"><b>Next:</b> <span class="muted">none announced</span></li>')
    return f"<ul class=\"tariff\">{''.join(parts)}</ul>"


# -- wallboxes -------------------------------------------------------------------------------------------
def evses_section(cfg: Config, st: LiveState, now: datetime, tz: tzinfo, aud: Audience) -> str:
    names = _names(cfg)
    cards = []
    for e in cfg.evses:
        s = st.statuses.get(e.id)
        g = st.granted(e.id)
        sp = st.setpoints.get(e.id)
        md = st.modes.get(e.id)
        stale = s is not None and (now - s.ts).total_seconds() > max(cfg.controller.evse_timeout_s * 3, 30)
        state = w.state_words(s)
        cls = "card"
        if s is None or not s.online or stale:
            cls += " warn"
        elif s.state.value == "charging":
            cls += " charging"
        drawn = "–"
        power = "–"
        if s is not None:
            n = e.phases
            drawn = " / ".join(f"{a:.1f}" for a in s.current_a[:n]) + " A"
            power = _kw(s.power_w, 2) if s.power_w is not None else "–"
        if g is not None:
            used = phases_drawn(s.current_a, g.phases) if s is not None else None
            granted = f"{g.current_a:g} A × {g.phases}" if g.current_a > 0 else "0 A (paused)"
            if used is not None and g.current_a > 0:  # the car draws on fewer phases than it may
                granted = f"{g.current_a:g} A × {used} (of {g.phases})"
            reason = w.reason_words(g.bound_by, g.detail, names, tz)
        elif sp is not None and not sp.expired(now):
            granted = f"{sp.current_a:g} A × {sp.phases}"
            reason = w.reason_words(sp.reason, None, names)
        else:
            granted, reason = "–", "no decision yet"
        mode = md.mode.value if md is not None else "rules"
        target = ""
        if md is not None and md.target is not None:
            target = f", {md.target.energy_wh / 1000:g} kWh by {esc(md.target.by)}"
        if md is not None and md.max_current_a is not None:
            target += f", at most {md.max_current_a:g} A"
        sess = st.sessions.get(e.id)
        session = ""
        if sess is not None and sess.stopped is None:
            cost = f", {sess.cost:.2f} {esc(sess.currency)}" if sess.cost is not None else ""
            session = (f'<div class="row"><span>Session</span><b class="session">{sess.energy_wh / 1000:.2f} kWh'
                       f'{cost}</b> <span class="muted">since {esc(_local(sess.started, tz, now))}</span></div>')
        age = (f'<span class="muted stale">last heard {_when(s.ts, tz, now, "ago")}</span>' if stale and s else "")
        cards.append(
            f'<article class="{cls}" id="evse-{esc(e.id)}" data-state="{esc(s.state.value if s else "")}" '
            f'data-mode="{esc(mode)}">'
            f'<h3>{esc(e.name or e.id)} <small>{esc(e.id)}</small></h3>'
            f'<div class="row"><span>State</span><b class="state">{esc(state)}</b> {age}</div>'
            f'<div class="row"><span>Drawing</span><b class="drawn">{esc(drawn)}</b> '
            f'<span class="power">{esc(power)}</span></div>'
            f'<div class="row"><span>Granted</span><b class="granted">{esc(granted)}</b></div>'
            f'<div class="row why"><span>Why</span><span class="reason">{esc(reason)}</span></div>'
            f'{session}'
            f'<div class="row"><span>Mode</span><b class="mode">{esc(w.MODE_WORDS.get(mode, mode))}</b>{target}</div>'
            f'{_mode_form(e.id, mode, aud)}</article>')
    if not cards:
        cards.append('<p class="muted">no wallbox configured</p>')
    return f"<h2>Wallboxes</h2><div class=\"cards\">{''.join(cards)}</div>"


def _mode_form(evse_id: str, mode: str, aud: Audience) -> str:
    if not aud.can_set:
        if aud.logged_in:
            return ""
        return '<p class="muted"><a href="/login">Log in</a> to change the mode.</p>'
    opts = "".join(f'<option value="{esc(m.value)}"{" selected" if m.value == mode else ""}>{esc(m.value)}</option>'
                   for m in p.ChargingModeName)
    return (f'<form class="mode-form" method="post" action="/evses/{esc(evse_id)}/mode">'
            f'<input type="hidden" name="csrf" value="{esc(aud.csrf)}">'
            f'<label>Set mode <select name="mode" aria-label="charging mode of {esc(evse_id)}">{opts}</select></label>'
            f'<button type="submit">Set</button><span class="result" role="status"></span></form>')


# -- circuit tree ------------------------------------------------------------------------------------------
def evse_phase_draw(cfg: Config, st: LiveState, node_ids: set[str]) -> list[float]:
    """What the EVSEs below these nodes draw per grid phase (each EVSE phase on its grid phase)."""
    out = [0.0, 0.0, 0.0]
    for e in cfg.evses:
        s = st.statuses.get(e.id)
        if e.circuit not in node_ids or s is None or not s.online:
            continue
        for i, grid_phase in enumerate(e.phase_rotation):
            out[grid_phase - 1] += s.current_a[i]
    return out


def _below(c: Circuit) -> set[str]:
    return {x.id for x in c.walk()}


def circuits_section(cfg: Config, st: LiveState, now: datetime) -> str:
    return f"<h2>Circuits</h2><ul class=\"tree\">{_node(cfg, st, cfg.root_circuit, now)}</ul>"


def _node(cfg: Config, st: LiveState, c: Circuit, now: datetime) -> str:
    limits = c.phase_limits()
    r = st.readings.get(c.meter) if c.meter else None
    fresh = r is not None and r.online and r.plausible and r.current_a is not None and \
        (now - r.ts).total_seconds() <= cfg.controller.meter_timeout_s
    if fresh:
        assert r is not None and r.current_a is not None
        load = [abs(a) for a in r.current_a]
        src = "measured"
    else:
        load = evse_phase_draw(cfg, st, _below(c))
        src = "wallboxes only" if not c.meter else "meter silent: wallboxes only"
    bars = []
    for k in range(3):
        lim = limits[k] if limits else None
        meter = (f'<meter min="0" max="{lim:g}" low="{0.8 * lim:g}" high="{0.95 * lim:g}" optimum="0" '
                 f'value="{min(load[k], lim):.2f}"></meter>') if lim else '<meter min="0" max="1" value="0"></meter>'
        of = f" / {lim:g}" if lim else ""
        bars.append(f'<div class="phase" data-phase="L{k + 1}" data-load="{load[k]:.2f}">'
                    f'<span class="ph">L{k + 1}</span>{meter}<span class="val">{load[k]:.1f}{of} A</span></div>')
    power = ""
    if fresh and r is not None and r.power_w is not None:
        power = f' <span class="muted">{esc(_kw(r.power_w, 2))}</span>'
    kids = "".join(_node(cfg, st, ch, now) for ch in c.children)
    warn = "" if fresh or not c.meter else " warn"
    return (f'<li class="node{warn}" id="node-{esc(c.id)}"><div class="node-head"><b>{esc(c.name or c.id)}</b> '
            f'<span class="muted">fuse {esc(format(c.fuse_a, "g") + " A" if c.fuse_a else "–")}, {esc(src)}</span>'
            f'{power}</div>{"".join(bars)}{"<ul>" + kids + "</ul>" if kids else ""}</li>')


# -- SMGW link and service health ---------------------------------------------------------------------------
def link_section(cfg: Config, st: LiveState, now: datetime, tz: tzinfo) -> str:
    lk = st.link
    if lk is None:
        body = '<p id="link-state" data-state="">no report from smgw-link</p>' if cfg.smgw.enabled else \
            '<p id="link-state" data-state="disabled">not used (smgw.enabled is off)</p>'
        return f"<h2>Smart Meter Gateway</h2>{body}"
    words = {"up": "connected", "down": "down", "connecting": "connecting", "disabled": "not used"}
    cls = {"up": "ok", "down": "bad", "connecting": "mid"}.get(lk.state.value, "")
    rows = [f'<div class="row"><span>Link</span><b id="link-state" data-state="{esc(lk.state.value)}" class="{cls}">'
            f'{esc(words.get(lk.state.value, lk.state.value))}</b>'
            f'{" since " + _when(lk.since, tz, now, "ago") if lk.since else ""}</div>']
    if lk.error:
        rows.append(f'<div class="row"><span>Error</span>{esc(lk.error)}</div>')
    if lk.gateway:
        rows.append(f'<div class="row"><span>Gateway</span>{esc(lk.gateway)}</div>')
    if lk.certificate or lk.cert_not_after:
        left = lk.cert_days_left
        if left is None and lk.cert_not_after is not None:
            left = (lk.cert_not_after - now).total_seconds() / 86400
        warn = " bad" if left is not None and left < 30 else ""
        expiry = lk.cert_not_after.astimezone(tz).strftime("%d.%m.%Y") if lk.cert_not_after else "–"
        rows.append(f'<div class="row"><span>Certificate</span>{esc(lk.certificate or "")} '
                    f'<b id="cert-expiry" class="{warn.strip()}">valid until {esc(expiry)}'
                    f'{f" ({left:.0f} days left)" if left is not None else ""}</b></div>')
    rows.append(f'<div class="row"><span>Traffic</span>{lk.bytes_tx / 1e6:.2f} MB out, {lk.bytes_rx / 1e6:.2f} MB in'
                f'</div>')
    return f"<h2>Smart Meter Gateway</h2>{''.join(rows)}"


def health_section(cfg: Config, st: LiveState, now: datetime, tz: tzinfo) -> str:
    rows = []
    for name in sorted({*cfg.services, *st.health}):
        h = st.health.get(name)
        if h is None:
            rows.append(f'<tr id="health-{esc(name)}" data-status="unknown"><td>{esc(name)}</td>'
                        f'<td class="bad">no report</td><td></td><td></td></tr>')
            continue
        status = h.status.value
        silent = status != "offline" and (now - h.ts).total_seconds() > HEALTH_SILENT_S
        shown = "silent" if silent else status
        cls = {"online": "ok", "degraded": "mid"}.get(shown, "bad")
        restarts = sum(h.task_restarts.values())
        detail = h.detail or ""
        if restarts:
            detail = (detail + "; " if detail else "") + f"{restarts} task restart{'s' if restarts != 1 else ''}"
        up = w.amount(h.uptime_s) if h.uptime_s is not None else "–"
        rows.append(f'<tr id="health-{esc(name)}" data-status="{esc(shown)}"><td>{esc(name)}</td>'
                    f'<td class="{cls}">{esc(shown)}</td><td>{esc(up)}</td><td>{esc(detail)}</td></tr>')
    return ("<h2>Services</h2><table class=\"health\"><thead><tr><th>service</th><th>status</th><th>up</th>"
            f"<th>detail</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


# -- the record ------------------------------------------------------------------------------------------------
def sessions_section(record: Record, now: datetime, tz: tzinfo, aud: Audience, currency: str) -> str:
    if not record.available:
        return '<h2>Charging sessions</h2><p class="muted">no record yet</p>'
    rows = []
    for s in reversed(record.sessions[-15:]):
        dur = "open" if s.stopped is None else w.amount(s.duration_s or 0)
        cost = f"{s.cost:.2f} {esc(currency)}" if s.cost is not None else "–"
        tag = esc(s.id_tag or "") if aud.logged_in else ("••••" if s.id_tag else "")
        rows.append(f'<tr data-evse="{esc(s.evse_id)}"><td>{esc(s.evse_id)}</td>'
                    f'<td>{esc(_local(s.started, tz, now, True))}</td><td>{esc(dur)}</td>'
                    f'<td>{s.energy_wh / 1000:.2f}</td><td>{cost}</td><td>{tag}</td></tr>')
    if not rows:
        rows.append('<tr><td colspan="6" class="muted">no session recorded</td></tr>')
    export = ('<p><a id="sessions-csv" href="/export/sessions.csv" download>Download all sessions (CSV)</a> · '
              '<a href="/export/summary.csv" download>monthly summary per card (CSV)</a></p>' if aud.logged_in else
              '<p class="muted"><a href="/login">Log in</a> for the CSV export.</p>')
    return ("<h2>Charging sessions</h2><div class=\"scroll\"><table class=\"sessions\"><thead><tr><th>wallbox</th>"
            "<th>start</th><th>duration</th><th>kWh</th><th>cost</th><th>card</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>{export}")


def controls_section(record: Record, now: datetime, tz: tzinfo, aud: Audience) -> str:
    if not record.available:
        return '<h2>Control actions</h2><p class="muted">no record yet</p>'
    rows = []
    for c in reversed(record.controls[-20:]):
        kind = CONTROL_KINDS.get(c.kind, c.kind)
        src = LIMIT_SOURCES.get(c.source or "", c.source or "")
        val = _kw(c.power_w, 2) if c.power_w is not None else (
            "/".join(f"{a:g}" for a in c.current_a) + " A" if c.current_a else "")
        floor = "yes" if c.raised_to_floor else ("no" if c.raised_to_floor is not None else "")
        end = "ongoing" if c.ended is None else _local(c.ended, tz, now, True)
        rows.append(f'<tr data-kind="{esc(c.kind)}" data-source="{esc(c.source or "")}"><td>{esc(kind)}</td>'
                    f'<td>{esc(src)}</td><td>{esc(_local(c.started, tz, now, True))}</td><td>{esc(end)}</td>'
                    f'<td>{esc(val)}</td><td>{floor}</td><td>{esc(c.answer or c.detail or "")}</td></tr>')
    if not rows:
        rows.append('<tr><td colspan="7" class="muted">no control action recorded</td></tr>')
    export = ('<p><a href="/export/controls.csv" download>Download the control log (CSV)</a></p>'
              if aud.logged_in else "")
    return ("<h2>Control actions</h2><div class=\"scroll\"><table class=\"controls\"><thead><tr><th>what</th>"
            "<th>from</th><th>start</th><th>end</th><th>value</th><th>§14a min.</th><th>answer</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>{export}")


# -- the page ------------------------------------------------------------------------------------------------
def section(name: str, cfg: Config, st: LiveState, record: Record, now: datetime, tz: tzinfo, aud: Audience) -> str:
    if name == "limits":
        return limits_section(cfg, st, now, tz)
    if name == "evses":
        return evses_section(cfg, st, now, tz, aud)
    if name == "circuits":
        return circuits_section(cfg, st, now)
    if name == "link":
        return link_section(cfg, st, now, tz)
    if name == "health":
        return health_section(cfg, st, now, tz)
    if name == "sessions":
        return sessions_section(record, now, tz, aud, cfg.history.prices.currency)
    if name == "controls":
        return controls_section(record, now, tz, aud)
    raise KeyError(name)


def page(cfg: Config, st: LiveState, record: Record, now: datetime, tz: tzinfo, aud: Audience,
         asset_version: str) -> str:
    secs = {name: section(name, cfg, st, record, now, tz, aud) for name in SECTIONS}
    nodes = "".join(f'<option value="{esc(c.id)}">{esc(c.name or c.id)}</option>' for c in cfg.all_circuits())
    who = (f'<span>{esc(aud.user)}</span> <form method="post" action="/logout" class="inline">'
           f'<input type="hidden" name="csrf" value="{esc(aud.csrf)}"><button type="submit">Log out</button></form>'
           if aud.logged_in else '<a href="/login">Log in</a>')
    plot = ('<section id="sec-plot"><h2>Last 24 hours <label><select id="plot-node" aria-label="circuit">'
            f'{nodes}</select></label></h2><div id="plot" role="img" aria-label="current per phase against the fuse">'
            '<p class="muted">the plot needs JavaScript</p></div><p class="legend"><span class="l1">L1</span> '
            '<span class="l2">L2</span> <span class="l3">L3</span> <span class="lim">limit in force</span> '
            '<span class="act">control action</span></p></section>')
    body = (f'<section id="sec-limits">{secs["limits"]}</section>'
            f'<section id="sec-evses">{secs["evses"]}</section>'
            f'<section id="sec-circuits">{secs["circuits"]}</section>{plot}'
            f'<section id="sec-link">{secs["link"]}</section>'
            f'<section id="sec-health">{secs["health"]}</section>'
            f'<section id="sec-sessions">{secs["sessions"]}</section>'
            f'<section id="sec-controls">{secs["controls"]}</section>')
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<meta name=\"csrf\" content=\"{esc(aud.csrf)}\">"
            f"<link rel=\"icon\" href=\"data:,\"><title>{esc(cfg.site.name)} - chargegate</title>"
            f"<link rel=\"stylesheet\" href=\"/static/style.css?v={asset_version}\">"
            f"<script src=\"/static/app.js?v={asset_version}\" defer></script></head>"
            f"<body><header><h1>{esc(cfg.site.name)}</h1><span id=\"live\" class=\"muted\" role=\"status\">"
            f"connecting…</span><nav>{who}</nav></header><main>{body}</main>"
            f"<footer class=\"muted\">chargegate · rendered {esc(_local(now, tz, now))}</footer></body></html>")


def login_page(cfg: Config, pre_token: str, error: str | None = None, status: str | None = None) -> str:
    err = f'<p class="bad" role="alert">{esc(error)}</p>' if error else ""
    note = f'<p class="muted">{esc(status)}</p>' if status else ""
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>Log in - {esc(cfg.site.name)}</title><link rel=\"icon\" href=\"data:,\">"
            "<link rel=\"stylesheet\" href=\"/static/style.css\">"
            f"</head><body class=\"login\"><main><h1>{esc(cfg.site.name)}</h1>{err}{note}"
            "<form method=\"post\" action=\"/login\"><label>Name <input name=\"name\" autocomplete=\"username\" "
            "required></label><label>Password <input name=\"password\" type=\"password\" "
            "autocomplete=\"current-password\" required></label>"
            f"<input type=\"hidden\" name=\"csrf\" value=\"{esc(pre_token)}\"><button type=\"submit\">Log in</button>"
            "</form></main></body></html>")


# -- the plot's data ------------------------------------------------------------------------------------------
def series_json(cfg: Config, node: str, samples: list[rec.NodeSample], controls: list[rec.ControlRow],
                start: datetime, end: datetime) -> dict[str, Any]:
    """The 24-hour plot of one circuit node: measured current and the limit in force per phase and minute,
    the node's fuse, and the control actions in the window (as spans)."""
    c = next((x for x in cfg.all_circuits() if x.id == node), None)
    pts = [{"t": s.ts.isoformat(), "m": s.measured_a, "l": s.limit_a} for s in samples if s.node == node]
    acts = []
    for a in controls:
        if a.kind not in ("limit", "failsafe", "link_outage"):
            continue
        a_end = a.ended or (a.valid_until if a.valid_until and a.valid_until < end else end)
        label = CONTROL_KINDS.get(a.kind, a.kind) + (f" {a.source}" if a.source else "")
        if a.power_w is not None:
            label += f" {a.power_w / 1000:g} kW"
        if a.raised_to_floor:
            label += " (§14a minimum)"
        acts.append({"start": max(a.started, start).isoformat(), "end": min(a_end, end).isoformat(), "label": label})
    return {"node": node, "start": start.isoformat(), "end": end.isoformat(),
            "fuse": c.phase_limits() if c is not None else None, "points": pts, "actions": acts}


def window(now: datetime, hours: float = 24) -> tuple[datetime, datetime]:
    return now - timedelta(hours=hours), now
