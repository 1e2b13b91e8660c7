"""``chargegate status``: a live terminal view of the installation as the broker shows it."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from chargegate import config as cfgmod
from chargegate.broker import BrokerError, bus_settings
from chargegate.reasons import phases_drawn, reason_text


class Snapshot:
    """The latest payload per topic (thread-safe), fed by an observer connection."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.state: dict[str, dict[str, Any]] = {}
        self.messages = 0
        self.lock = threading.Lock()

    def feed(self, topic: str, payload: bytes) -> None:
        with self.lock:
            self.messages += 1
            if not payload:
                self.state.pop(topic, None)
                return
            try:
                data = json.loads(payload)
            except (ValueError, UnicodeDecodeError):
                return
            if isinstance(data, dict):
                self.state[topic] = data

    def select(self, middle: str, leaf: str) -> dict[str, dict[str, Any]]:
        """``{id: payload}`` for topics ``<root>/<middle>/<id>/<leaf>``."""
        out = {}
        prefix = f"{self.root}/{middle}/"
        with self.lock:
            for t, d in self.state.items():
                if t.startswith(prefix) and t.endswith("/" + leaf):
                    ident = t[len(prefix):-len(leaf) - 1]
                    if "/" not in ident:
                        out[ident] = d
        return dict(sorted(out.items()))

    def get(self, rel: str) -> dict[str, Any] | None:
        with self.lock:
            return self.state.get(f"{self.root}/{rel}")


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _parse_ts(ts: Any) -> datetime | None:
    if not isinstance(ts, str) or not ts:
        return None
    try:
        t = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _age(ts: str | None) -> str:
    if not ts:
        return "-"
    t = _parse_ts(ts)
    if t is None:
        return "?"
    return f"{(datetime.now(UTC) - t).total_seconds():.0f}s"


def _until(ts: Any) -> str:
    """``in 95s`` / ``12s ago`` / ``-`` for a timestamp, with the local clock time."""
    t = _parse_ts(ts)
    if t is None:
        return "-"
    left = (t - datetime.now(UTC)).total_seconds()
    span = abs(left)
    amount = f"{span:.0f}s" if span < 120 else (f"{span / 60:.0f} min" if span < 7200 else f"{span / 3600:.1f} h")
    return f"{t.astimezone():%H:%M:%S} ({'in ' + amount if left >= 0 else amount + ' ago'})"


def _amps(v: Any) -> str:
    if not isinstance(v, list):
        return "-"
    return "/".join(_fmt(x) for x in v) + " A"


def _limit_value(lim: dict[str, Any]) -> str:
    parts = []
    if lim.get("power_w") is not None:
        parts.append(f"{_fmt(lim['power_w'], 0)} W")
    if lim.get("current_a") is not None:
        parts.append(_amps(lim["current_a"]))
    return " + ".join(parts) or "-"


def _effective(alloc: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``source -> how the controller applied that grid limit`` from the allocation's ``limits``."""
    out: dict[str, dict[str, Any]] = {}
    for item in ((alloc or {}).get("limits") or {}).get("grid_limits") or []:
        if isinstance(item, dict) and isinstance(item.get("source"), str):
            out[item["source"]] = item
    return out


def grid_rows(snap: Snapshot) -> list[tuple[str, str, str]]:
    """(what, value, valid until / since) for the grid limits, tariff, SMGW link and allocation."""
    rows: list[tuple[str, str, str]] = []
    with snap.lock:
        limits = {t: d for t, d in snap.state.items() if t.startswith(f"{snap.root}/grid/limit/")}
    alloc = snap.get("controller/allocation")
    applied = _effective(alloc)
    for t, lim in sorted(limits.items()):
        source = str(lim.get("source") or t.rsplit("/", 1)[-1])
        expired = (_parse_ts(lim.get("valid_until")) or datetime.max.replace(tzinfo=UTC)) < datetime.now(UTC)
        if lim.get("active") and not expired:
            val = f"{_limit_value(lim)} active, scope {lim.get('scope') or 'default'}"
            eff = applied.get(source) or {}
            if eff.get("raised_to_floor"):
                val += f", applied {_fmt(eff.get('effective_w'), 0)} W (§14a floor)"
            if lim.get("reason"):
                val += f" - {lim['reason']}"
        else:
            val = "expired" if lim.get("active") else "inactive"
            if lim.get("reason"):
                val += f" ({lim['reason']})"
        rows.append((f"grid limit ({source})", val, _until(lim.get("valid_until"))))
    failsafe = ((alloc or {}).get("limits") or {}).get("failsafe")
    if isinstance(failsafe, dict):
        val = f"{_fmt(failsafe.get('power_w'), 0)} W active"
        if failsafe.get("raised_to_floor"):
            val += f", applied {_fmt(failsafe.get('effective_w'), 0)} W (§14a floor)"
        if failsafe.get("cause"):
            val += f" - {failsafe['cause']}"
        rows.append(("failsafe (controller)", val, _until(failsafe.get("until"))))
    tariff = snap.get("tariff/current")
    if tariff:
        per = tariff.get("period") or {}
        price = per.get("price_ct_per_kwh")
        val = f"{per.get('level')} ({per.get('id')}"
        val += f", {_fmt(price)} ct/kWh)" if price is not None else ")"
        val += f" from {tariff.get('source')}" if tariff.get("source") else ""
        rows.append(("tariff", val, _until(per.get("end")) if per.get("end") else "open end"))
    sched = snap.get("tariff/schedule")
    if sched:
        now = datetime.now(UTC)
        nxt = [per for per in sched.get("periods") or []
               if (_parse_ts(per.get("start")) or now) > now]
        if nxt:
            per = min(nxt, key=lambda x: _parse_ts(x.get("start")) or now)
            rows.append(("next tariff", f"{per.get('level')} ({per.get('id')})", f"starts {_until(per.get('start'))}"))
    link = snap.get("link/smgw")
    if link:
        ch = link.get("channels") or {}
        val = str(link.get("state"))
        if link.get("error"):
            val += f": {link['error']}"
        details = []
        if link.get("gateway"):
            details.append(f"gateway {link['gateway']}")
        tls = ch.get("tls") or {}
        if tls.get("version"):
            details.append(str(tls["version"]))  # the cipher is in the web page and on the bus
        if link.get("certificate"):
            details.append(f"cert {link['certificate']} ({_fmt(link.get('cert_days_left'), 0)} days left)")
        eps = [f"{name} {'open' if c.get('active') else ('off' if not c.get('enabled') else 'idle')}"
               for name, c in ch.items() if isinstance(c, dict) and "target" in c]
        if eps and all(e.endswith(" open") for e in eps):
            details.append(f"channels: {len(eps)} open")
        elif eps:
            details.append("channels: " + ", ".join(eps))
        if isinstance(ch.get("clseedi"), dict):
            details.append("CLS.EEDI " + ("connected" if ch["clseedi"].get("connected") else "not connected"))
        if ch.get("failsafe"):
            details.append("FAILSAFE")
        if details:
            val += " - " + "; ".join(details)
        rows.append(("SMGW link", val, f"since {_until(link.get('since'))}" if link.get("since") else ""))
    if alloc:
        warnings = ((alloc.get("limits") or {}).get("warnings")) or []
        # a limit raised to the §14a floor is on its own row ("applied ... (§14a floor)")
        shown_floor = any(item.get("raised_to_floor") for item in applied.values())
        warnings = [w for w in warnings if not (shown_floor and "raised to the §14a floor" in str(w))]
        binding = sorted({e.get("bound_by") for e in alloc.get("evses") or [] if e.get("bound_by")})
        val = f"cycle {alloc.get('cycle')}; bound by {', '.join(binding) or '-'}"
        if warnings:
            val += "; " + "; ".join(str(w) for w in warnings[:3])
        rows.append(("allocation", val, _age(alloc.get("ts"))))
    return rows


PORT_NAMES: dict[str, str] = {  # key in state/demo/ports -> what the user looks for
    "broker": "broker", "web": "web", "variables_api": "variables API", "admin_api": "admin API",
    "ocpp_local": "OCPP wallboxes", "ocpp_backend_record": "OCPP backend record", "smgw_sim": "SMGW sim",
}
HIDDEN_PORTS = {"ocpp_backend_sim"}  # in the ports file, not worth the view's room


def ports_of(cfg: cfgmod.Config, config_path: Path | None = None) -> dict[str, int]:
    """The ports of this installation that a user connects to, from its configuration, and from a
    ``ports`` file next to it (``chargegate demo`` writes one with its simulators' ports too)."""
    ports: dict[str, int] = {"broker": cfg.broker.port}
    if "web" in cfg.services and cfg.web.enabled:
        ports["web"] = cfg.web.port
    if "smgw-link" in cfg.services and cfg.smgw.enabled and cfg.smgw.http_api.enabled:
        ports["variables_api"] = cfg.smgw.http_api.port
    if "smgw-link" in cfg.services and cfg.admin.enabled:
        ports["admin_api"] = cfg.admin.port
    if "ocpp-gateway" in cfg.services and cfg.ocpp.local.enabled and any(e.ocpp for e in cfg.evses):
        ports["ocpp_local"] = cfg.ocpp.local.port
    if config_path is not None:
        try:
            written = json.loads((Path(config_path).parent / "ports").read_text())
        except (OSError, ValueError):
            written = {}
        if isinstance(written, dict):
            ports |= {k: v for k, v in written.items() if isinstance(k, str) and isinstance(v, int)
                      and not isinstance(v, bool) and 0 < v < 65536}
    return ports


def ports_line(ports: dict[str, int], host: str = "127.0.0.1") -> str:
    parts = [f"{PORT_NAMES.get(k, k)} {v}" for k, v in ports.items() if k not in HIDDEN_PORTS]
    return f"ports on {host}: " + " · ".join(parts) if parts else ""


def granted_text(a: dict[str, Any] | None, status: dict[str, Any] | None) -> str:
    """``6.0 A x3``, or ``6.0 A x1 (of 3)`` when the car draws on fewer phases than it was granted."""
    if not a:
        return "-"
    text = f"{_fmt(a.get('current_a'))} A x{a.get('phases')}"
    used = phases_drawn((status or {}).get("current_a"), a.get("phases"))
    if used is not None:
        text = f"{_fmt(a.get('current_a'))} A x{used} (of {a.get('phases')})"
    return text


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def render(snap: Snapshot, ports: dict[str, int] | None = None, host: str = "127.0.0.1") -> Group:
    """The whole view; 4 wallboxes, a meter, the limits and the services fit 100 columns by 30 lines."""
    head = f"chargegate · {datetime.now().astimezone():%H:%M:%S} · {snap.messages} messages seen"
    parts: list[Any] = [Text(head, style="bold", no_wrap=True, overflow="ellipsis")]
    if ports:
        parts.append(Text(ports_line(ports, host)))
    setpoints = snap.select("evse", "setpoint")
    modes = snap.select("evse", "mode")
    alloc = snap.get("controller/allocation") or {}
    allocated = {e.get("evse_id"): e for e in alloc.get("evses") or [] if isinstance(e, dict)}
    rows: list[tuple[str, str, str, str, str, str]] = []
    for ident, s in snap.select("evse", "status").items():
        cur = "/".join(_fmt(x) for x in s.get("current_a") or [])
        state = str(s.get("state")) if s.get("online") else "OFFLINE"
        ts = _parse_ts(s.get("ts"))
        if ts is not None and (datetime.now(UTC) - ts).total_seconds() > 30:
            state += f" ({_age(s.get('ts'))} old)"
        a = allocated.get(ident)
        granted = granted_text(a, s)
        sp = setpoints.get(ident) or {}
        applied = s.get("applied") or {}
        if applied and (applied.get("fallback") or (a and applied.get("current_a") != a.get("current_a"))):
            granted += f" (applied {_fmt(applied.get('current_a'))}{' fallback' if applied.get('fallback') else ''})"
        elif not a and sp:
            granted = f"{_fmt(sp.get('current_a'))} A x{sp.get('phases')}"
        why = "no decision yet"
        if a:
            why = str(a.get("reason_text") or reason_text(a.get("bound_by"), a.get("detail")))
        md = modes.get(ident) or {}
        mode = str(md.get("mode") or (a or {}).get("mode") or "rules")
        if mode != "rules":
            target = md.get("target")
            if isinstance(target, dict):
                mode += f" {_fmt((target.get('energy_wh') or 0) / 1000)} kWh by {target.get('by')}"
            why = f"mode {mode}: {why}"
        if s.get("flags"):
            why += "; flags " + ",".join(str(f) for f in s["flags"])
        kw = s.get("power_w")
        rows.append((ident, state, cur, f"{kw / 1000:.1f}" if isinstance(kw, int | float) else "-", granted, why))
    if rows:
        # one line of figures and one of words per EVSE: the reason gets the whole width
        head_row = ("EVSE", "state", "drawn A", "kW", "granted", "")
        widths = [max(len(r[i]) for r in [head_row, *rows]) for i in range(5)]

        def line(r: tuple[str, ...]) -> str:
            return "  ".join(c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths,
                                                                                                   strict=False)))
        parts.append(Text(line(head_row).rstrip() + "  (why, below each)", style="bold", no_wrap=True,
                          overflow="ellipsis"))
        for r in rows:
            parts.append(Text(line(r).rstrip(), no_wrap=True, overflow="ellipsis"))
            parts.append(Text(f"  ↳ {r[5]}", style="dim" if r[5] == "no decision yet" else "",
                              no_wrap=True, overflow="ellipsis"))
    grid = Table(box=box.MINIMAL, show_edge=False, expand=True, pad_edge=False)
    grid.add_column("grid and site", no_wrap=True, max_width=22, overflow="ellipsis")
    grid.add_column("value", ratio=1, overflow="fold")
    grid.add_column("until / since", no_wrap=True, max_width=22, overflow="ellipsis")
    for ident, m in snap.select("meter", "reading").items():
        val = f"{'/'.join(_fmt(x) for x in m.get('current_a') or [])} A, {_fmt(m.get('power_w'), 0)} W"
        val += f", import {_fmt(m.get('energy_import_wh'), 0)} Wh" if m.get("energy_import_wh") is not None else ""
        if not m.get("online", True):
            val = "OFFLINE " + val
        grid.add_row(f"meter {ident}", val, f"{_age(m.get('ts'))} old")
    for row in grid_rows(snap):
        grid.add_row(*row)
    parts.append(grid)
    health = snap.select("service", "health")
    if health:
        bad = {n: h for n, h in health.items() if h.get("status") != "online"}
        text = f"services: {len(health) - len(bad)} of {len(health)} online"
        if bad:
            text += "; " + "; ".join(f"{n} {h.get('status')}" + (f" ({h['detail']})" if h.get("detail") else "")
                                     for n, h in bad.items())
        else:
            text += f" ({', '.join(health)})"
        invalid = {n: (h.get("counters") or {}).get("invalid_messages", 0) for n, h in health.items()}
        invalid = {n: c for n, c in invalid.items() if c}
        if invalid:
            text += "; invalid messages dropped: " + ", ".join(f"{n} {c}" for n, c in invalid.items())
        parts.append(Text(text))
    return Group(*parts)


def connect_observer(cfg: cfgmod.Config, snap: Snapshot) -> mqtt.Client:
    settings = bus_settings(cfg, "observer")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"status-{int(time.time())}")
    client.username_pw_set(settings.username, settings.password)
    if settings.ca_file:
        client.tls_set(ca_certs=settings.ca_file)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{cfg.site.topic_root}/#", qos=0)
    client.on_message = lambda c, u, m: snap.feed(m.topic, m.payload)
    client.connect_async(settings.host, settings.port)
    client.loop_start()
    return client


def wait_retained(snap: Snapshot, timeout: float, quiet: float = 0.5) -> None:
    """Wait until the retained state has arrived: no new message for ``quiet`` s, at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    seen, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = snap.messages
        if n != seen:
            seen, since = n, time.monotonic()
        elif n and time.monotonic() - since >= quiet:
            return
        time.sleep(0.05)


def status(config_path: Path, once: bool = False, timeout: float = 3.0, size: tuple[int, int] | None = None,
           port: str | None = None) -> int:
    """The live view (``once``: one snapshot). ``size``: columns and lines to fit (else the terminal's, or
    ``COLUMNS``/``LINES``; 100 x 30 for a pipe). ``port``: print only that port (e.g. ``broker``) and exit."""
    try:
        cfg = cfgmod.load(config_path)
    except cfgmod.ConfigError as e:
        print(e)
        return 1
    ports = ports_of(cfg, config_path)
    if port is not None:
        if port not in ports:
            print(f"chargegate status: no port {port!r} here; known: {', '.join(ports)}", file=sys.stderr)
            return 1
        print(ports[port])
        return 0
    try:
        settings = bus_settings(cfg, "observer")
    except BrokerError as e:
        print(f"chargegate status: {e}")
        return 1
    snap = Snapshot(cfg.site.topic_root)
    client = connect_observer(cfg, snap)
    console = Console()
    if size is not None:
        console = Console(width=size[0], height=size[1])
    elif not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=100)  # a pipe or a file: the width the view is made for
    host = settings.host if settings.host not in ("localhost", "::1") else "127.0.0.1"

    def view() -> Group:
        return render(snap, ports, host)
    try:
        if once:
            wait_retained(snap, timeout)
            if not snap.messages:
                print(f"chargegate status: nothing from the broker at {settings.host}:{settings.port} within "
                      f"{timeout:g} s (is the demo or `chargegate run` running? --timeout waits longer)",
                      file=sys.stderr)
                return 1
            console.print(view())
            return 0
        with Live(view(), console=console, refresh_per_second=2) as live:
            while True:
                time.sleep(0.5)
                live.update(view())
    except KeyboardInterrupt:
        return 0
    finally:
        client.loop_stop()
        client.disconnect()
