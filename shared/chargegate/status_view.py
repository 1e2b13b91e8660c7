"""``chargegate status``: a live terminal view of the installation as the broker shows it."""

from __future__ import annotations

import json
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


def _age(ts: str | None) -> str:
    if not ts:
        return "-"
    try:
        t = datetime.fromisoformat(ts)
    except ValueError:
        return "?"
    return f"{(datetime.now(UTC) - t).total_seconds():.0f}s"


def render(snap: Snapshot) -> Group:
    evses = Table(title="EVSEs", expand=True)
    for col in ("id", "state", "IEC", "online", "phases", "current A (L1/L2/L3)", "power W", "energy Wh",
                "setpoint", "flags", "age"):
        evses.add_column(col)
    setpoints = snap.select("evse", "setpoint")
    for ident, s in snap.select("evse", "status").items():
        cur = "/".join(_fmt(x) for x in s.get("current_a") or [])
        sp = setpoints.get(ident)
        applied = s.get("applied") or {}
        spt = f"{_fmt(sp.get('current_a'))} A x{sp.get('phases')}" if sp else "-"
        if applied:
            spt += f" (applied {_fmt(applied.get('current_a'))}{' fallback' if applied.get('fallback') else ''})"
        evses.add_row(ident, str(s.get("state")), str(s.get("iec_state") or "-"), "yes" if s.get("online") else "NO",
                      str(s.get("phases_in_use")), cur, _fmt(s.get("power_w"), 0), _fmt(s.get("energy_wh"), 0),
                      spt, ",".join(s.get("flags") or []), _age(s.get("ts")))
    meters = Table(title="Meters", expand=True)
    for col in ("id", "online", "current A", "power W", "import Wh", "age"):
        meters.add_column(col)
    for ident, m in snap.select("meter", "reading").items():
        meters.add_row(ident, "yes" if m.get("online", True) else "NO",
                       "/".join(_fmt(x) for x in m.get("current_a") or []), _fmt(m.get("power_w"), 0),
                       _fmt(m.get("energy_import_wh"), 0), _age(m.get("ts")))
    grid = Table(title="Grid limits, tariff, SMGW link", expand=True)
    for col in ("what", "value", "valid until / since"):
        grid.add_column(col)
    with snap.lock:
        limits = {t: d for t, d in snap.state.items() if t.startswith(f"{snap.root}/grid/limit/")}
    for t, lim in sorted(limits.items()):
        val = f"{_fmt(lim.get('power_w'), 0)} W" if lim.get("power_w") is not None else str(lim.get("current_a"))
        grid.add_row(f"limit ({t.rsplit('/', 1)[-1]})", f"{val} {'active' if lim.get('active') else 'inactive'}",
                     str(lim.get("valid_until")))
    tariff = snap.get("tariff/current")
    if tariff:
        per = tariff.get("period") or {}
        grid.add_row("tariff", f"{per.get('level')} ({per.get('id')})", str(per.get("end")))
    link = snap.get("link/smgw")
    if link:
        grid.add_row("SMGW link", f"{link.get('state')} {link.get('error') or ''}", str(link.get("since")))
    alloc = snap.get("controller/allocation")
    if alloc:
        grid.add_row("allocation", ", ".join(f"{e['evse_id']}={_fmt(e['current_a'])}A<{e['bound_by']}>"
                                             for e in alloc.get("evses", [])[:8]), _age(alloc.get("ts")))
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
    try:
        if once:
            time.sleep(timeout)
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
