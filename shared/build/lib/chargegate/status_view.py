"""``chargegate status``: a live terminal view of the installation as the broker shows it."""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from chargegate import config as cfgmod
from chargegate.broker import BrokerError, bus_settings


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
            details.append(f"{tls['version']} {tls.get('cipher') or ''}".strip())
        if link.get("certificate"):
            details.append(f"cert {link['certificate']} ({_fmt(link.get('cert_days_left'), 0)} days left)")
        eps = [f"{name} {'open' if c.get('active') else ('off' if not c.get('enabled') else 'idle')}"
               for name, c in ch.items() if isinstance(c, dict) and "target" in c]
        if eps:
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
        binding = sorted({e.get("bound_by") for e in alloc.get("evses") or [] if e.get("bound_by")})
        val = f"cycle {alloc.get('cycle')}; bound by {', '.join(binding) or '-'}"
        if warnings:
            val += "; " + "; ".join(str(w) for w in warnings[:3])
        rows.append(("allocation", val, _age(alloc.get("ts"))))
    return rows


def render(snap: Snapshot) -> Group:
    evses = Table(title="EVSEs", expand=True)
    for col in ("id", "state", "IEC", "online", "phases", "current A (L1/L2/L3)", "power W", "energy Wh",
                "setpoint", "allocated / bound by", "mode", "flags", "age"):
        evses.add_column(col)
    setpoints = snap.select("evse", "setpoint")
    modes = snap.select("evse", "mode")
    alloc = snap.get("controller/allocation") or {}
    allocated = {e.get("evse_id"): e for e in alloc.get("evses") or [] if isinstance(e, dict)}
    for ident, s in snap.select("evse", "status").items():
        cur = "/".join(_fmt(x) for x in s.get("current_a") or [])
        sp = setpoints.get(ident)
        applied = s.get("applied") or {}
        spt = f"{_fmt(sp.get('current_a'))} A x{sp.get('phases')}" if sp else "-"
        if applied:
            spt += f" (applied {_fmt(applied.get('current_a'))}{' fallback' if applied.get('fallback') else ''})"
        a = allocated.get(ident)
        alloc_txt = f"{_fmt(a.get('current_a'))} A x{a.get('phases')} {a.get('bound_by')}" if a else "-"
        md = modes.get(ident) or {}
        mode_txt = str(md.get("mode") or (a or {}).get("mode") or "rules")
        target = md.get("target")
        if isinstance(target, dict):
            mode_txt += f", {_fmt((target.get('energy_wh') or 0) / 1000)} kWh by {target.get('by')}"
        if a and str(a.get("bound_by", "")).startswith(("mode:", "rule:mode.")) and a.get("detail"):
            mode_txt += f" ({a.get('detail')})"  # the reason in words
        evses.add_row(ident, str(s.get("state")), str(s.get("iec_state") or "-"), "yes" if s.get("online") else "NO",
                      str(s.get("phases_in_use")), cur, _fmt(s.get("power_w"), 0), _fmt(s.get("energy_wh"), 0),
                      spt, alloc_txt, mode_txt, ",".join(s.get("flags") or []), _age(s.get("ts")))
    meters = Table(title="Meters", expand=True)
    for col in ("id", "online", "current A", "power W", "import Wh", "age"):
        meters.add_column(col)
    for ident, m in snap.select("meter", "reading").items():
        meters.add_row(ident, "yes" if m.get("online", True) else "NO",
                       "/".join(_fmt(x) for x in m.get("current_a") or []), _fmt(m.get("power_w"), 0),
                       _fmt(m.get("energy_import_wh"), 0), _age(m.get("ts")))
    grid = Table(title="Grid limits, tariff, SMGW link, allocation", expand=True)
    for col in ("what", "value", "valid until / since"):
        grid.add_column(col)
    for row in grid_rows(snap):
        grid.add_row(*row)
    services = Table(title="Services", expand=True)
    for col in ("service", "status", "version", "uptime s", "config", "invalid msgs", "detail"):
        services.add_column(col)
    for name, h in snap.select("service", "health").items():
        services.add_row(name, str(h.get("status")), str(h.get("version")), _fmt(h.get("uptime_s"), 0),
                         str(h.get("config_version")), str((h.get("counters") or {}).get("invalid_messages", 0)),
                         str(h.get("detail") or ""))
    return Group(evses, meters, grid, services)


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


def status(config_path: Path, once: bool = False, timeout: float = 3.0) -> int:
    try:
        cfg = cfgmod.load(config_path)
    except cfgmod.ConfigError as e:
        print(e)
        return 1
    snap = Snapshot(cfg.site.topic_root)
    try:
        client = connect_observer(cfg, snap)
    except BrokerError as e:
        print(f"chargegate status: {e}")
        return 1
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=160)  # a pipe or a file: wide enough for every column
    try:
        if once:
            wait_retained(snap, timeout)
            console.print(render(snap))
            return 0 if snap.messages else 1
        with Live(render(snap), console=console, refresh_per_second=2) as live:
            while True:
                time.sleep(0.5)
                live.update(render(snap))
    except KeyboardInterrupt:
        return 0
    finally:
        client.loop_stop()
        client.disconnect()
