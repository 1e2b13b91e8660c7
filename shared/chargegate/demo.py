"""``chargegate demo``: the whole system against built-in simulators.

Writes a demo configuration (free ports, a generated PKI where needed) into ``--dir``, starts a
local Mosquitto, the simulators of every installed service (Modbus wallboxes and a grid meter,
OCPP wallboxes, the operator's OCPP backend, the SMGW and the operator's CLS.EEDI backend) and
all services, plugs cars in, and shows the live status (or, without a terminal, a line per
second with what flows through the broker). Each simulator is found by its module; a service
that is not installed is left out and the demo says so.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import structlog
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from chargegate import config as cfgmod
from chargegate import log as logsetup
from chargegate.broker import account_password, first_free, free_port, placement
from chargegate.config.store import atomic_write
from chargegate.runner import Proc, Supervisor, available_services

log = structlog.get_logger("chargegate.demo")

DEMO_OBSERVER_PASSWORD = "demo"  # read-only account, documented in the README, for MQTT explorers


def shown(path: Path) -> str:
    """``path`` as the user types it: relative to the working directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def cli_command() -> str:
    """How the user runs ``chargegate``: plain when it is on PATH, else the virtual environment's script."""
    script = Path(sys.executable).parent / "chargegate"
    found = shutil.which("chargegate")
    if not script.exists() or (found and Path(found).resolve() == script.resolve()):
        return "chargegate"
    return shown(script)


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@dataclass
class DemoPlan:
    config: dict[str, Any]
    sims: list[Proc]
    cars: list[dict[str, Any]]
    notes: list[str]
    sim_ports: dict[str, int]  # the simulators' ports worth knowing (the rest is in the configuration)


def plan(dirpath: Path) -> DemoPlan:
    """The demo's configuration and simulator processes (free ports chosen now)."""
    broker_port = first_free((1883, 1884))  # the same ports on every run when they are free
    services = available_services()
    notes: list[str] = []
    cfg: dict[str, Any] = {
        "version": 1,
        "site": {"name": "chargegate demo", "topic_root": "chargegate"},
        "state_dir": "state",
        "broker": {"port": broker_port, "accounts": {"observer": DEMO_OBSERVER_PASSWORD}},
        "logging": {"level": "info", "format": "json"},
        # sessions in the record are costed per tariff period (ct/kWh): the demo's operator announces a low tariff
        "history": {"prices": {"low": 22.0, "normal": 34.0, "high": 45.0, "currency": "EUR"}},
        "circuits": [{
            "id": "grid", "name": "house connection", "fuse_a": 35, "max_power_w": 24000, "meter": "grid-meter",
            "children": [
                {"id": "garage", "fuse_a": 25},
                {"id": "carport", "fuse_a": 20},
            ],
        }],
        "evses": [],
        "meters": [],
        "services": sorted(services),
    }
    sims: list[Proc] = []
    sim_ports: dict[str, int] = {}
    backend_sim: Proc | None = None
    cars: list[dict[str, Any]] = []
    cfg_file = str(dirpath / "chargegate.yaml")

    if "evse-poller" in services and _has("evse_poller.sim"):
        p1, p2, p3, pm = free_port(), free_port(), free_port(), free_port()
        cfg["evses"] += [
            {"id": "alfen", "name": "Alfen Eve (garage)", "circuit": "garage", "phases": 3,
             "max_current_a": 16, "priority": 1, "phase_switching": True,  # register 1215: 1 or 3 phases
             "modbus": {"profile": "alfen-eve", "host": "127.0.0.1", "port": p1, "device_id": 1}},
            {"id": "webasto", "name": "Webasto Next (garage)", "circuit": "garage", "phases": 3,
             "phase_rotation": [2, 3, 1], "max_current_a": 16,
             "modbus": {"profile": "webasto-next", "host": "127.0.0.1", "port": p2, "device_id": 255}},
            {"id": "charx", "name": "Phoenix CHARX (carport)", "circuit": "carport", "phases": 3,
             "max_current_a": 32,
             "modbus": {"profile": "phoenix-charx", "host": "127.0.0.1", "port": p3, "device_id": 1}},
        ]
        cfg["meters"].append({"id": "grid-meter", "name": "Eastron SDM630 at the house connection", "role": "grid",
                              "modbus": {"profile": "sdm630", "host": "127.0.0.1", "port": pm, "device_id": 1}})
        sims.append(Proc("sim-modbus", [sys.executable, "-m", "evse_poller.sim", "--config", cfg_file]))
        cars += [{"evse": "alfen", "phases": 3, "max_current_a": 16},
                 {"evse": "webasto", "phases": 3, "max_current_a": 11},
                 {"evse": "charx", "phases": 1, "max_current_a": 32}]
    else:
        notes.append("evse-poller is not installed: no Modbus wallboxes in this demo")
    if not cfg["meters"]:
        cfg["circuits"][0].pop("meter")

    if "ocpp-gateway" in services and _has("ocpp_gateway.sim"):
        local_port, backend_port = free_port(), free_port()
        control_port = first_free(range(8095, 8100))  # the backend's record (curl .../status)
        sim_ports |= {"ocpp_backend_sim": backend_port, "ocpp_backend_record": control_port}
        cfg["evses"].append({"id": "ocpp-1", "name": "OCPP wallbox (carport)", "circuit": "carport", "phases": 3,
                             "max_current_a": 16, "ocpp": {"charge_box_id": "DEMO-CB-1", "connector_id": 1}})
        cfg["ocpp"] = {
            "local": {"host": "127.0.0.1", "port": local_port},
            "backend": {"enabled": True, "url": f"ws://127.0.0.1:{backend_port}/ocpp"},
        }
        backend_sim = Proc("sim-backend", [sys.executable, "-m", "ocpp_gateway.backend_sim", "--port",
                                           str(backend_port), "--control-port", str(control_port),
                                           "--db", str(dirpath / "backend.sqlite")])
        sims.append(backend_sim)
        sims.append(Proc("sim-ocpp", [sys.executable, "-m", "ocpp_gateway.sim", "--config", cfg_file]))
        cars.append({"evse": "ocpp-1", "phases": 3, "max_current_a": 16})
        notes.append(f"operator's OCPP backend simulator: 127.0.0.1:{backend_port}; its record: "
                     f"curl http://127.0.0.1:{control_port}/status (and /messages?cp=alfen, "
                     f"/transactions?cp=alfen; all frames in {dirpath / 'backend.sqlite'})")
    else:
        notes.append("ocpp-gateway is not installed: no OCPP wallbox and no operator backend in this demo")

    if "smgw-link" in services and _has("smgw_link.demo"):
        demo_mod = importlib.import_module("smgw_link.demo")
        extra = demo_mod.demo_setup(dirpath, cfg)  # adds smgw config, returns simulator Procs and notes
        sims.extend(Proc(name, argv) for name, argv in extra["processes"])
        if backend_sim is not None:  # e.g. its TLS certificate: the backend is reached through the SMGW
            backend_sim.argv += list(extra.get("backend_args", []))
        notes.extend(extra.get("notes", []))
    else:
        notes.append("smgw-link demo parts are not installed: no SMGW simulator in this demo")

    if "web" in services and _has("web.demo"):  # the web page: its address is printed first
        web = importlib.import_module("web.demo").demo_setup(dirpath, cfg)
        notes[:0] = web.get("notes", [])

    if not cfg["evses"]:
        # a configuration needs nothing else, but make the demo visible: one Modbus EVSE as a placeholder
        notes.append("no wallbox simulators available; only service health flows")
    smgw = next((s for s in sims if s.name == "sim-smgw"), None)
    if smgw is not None and "--port" in smgw.argv:
        sim_ports["smgw_sim"] = int(smgw.argv[smgw.argv.index("--port") + 1])
    return DemoPlan(cfg, sims, cars, notes, sim_ports)


class _CarDriver:
    """Plugs the demo's cars in once their simulators listen.

    A simulator command is not retained: one sent before the simulator has subscribed is lost
    (a slow start-up on a busy machine). So the plug command is repeated every ``retry_s`` until
    the simulator's own draw (``sim/<evse>/draw``, published by this run) says the car is plugged.
    """

    def __init__(self, cfg: cfgmod.Config, cars: list[dict[str, Any]], port: int, retry_s: float = 2.0,
                 give_up_s: float = 120.0) -> None:
        self.root = cfg.site.topic_root
        self.pending = {car["evse"]: car for car in cars}
        self.sent_at: dict[str, float] = {}
        self.plugged: dict[str, bool] = {}  # evse -> the last fresh draw's "plugged"
        self.retry_s, self.give_up_s = retry_s, give_up_s
        self.started = time.monotonic()
        self.since = datetime.now(UTC) - timedelta(seconds=2)
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"demo-driver-{os.getpid()}")
        self.client.username_pw_set("sim", account_password(cfg, "sim"))
        self.client.on_connect = lambda c, u, f, rc, pr: c.subscribe(f"{self.root}/sim/+/draw", qos=1)
        self.client.on_message = self._on_draw
        self.client.reconnect_delay_set(0.2, 2)
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()

    def _on_draw(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            d = json.loads(msg.payload)
            ts = datetime.fromisoformat(str(d.get("ts")).replace("Z", "+00:00"))
        except (ValueError, TypeError, AttributeError):
            return
        if ts.tzinfo is None or ts < self.since:
            return  # retained from an earlier run
        with self.lock:
            self.plugged[msg.topic.split("/")[-2]] = bool(d.get("plugged"))

    def __call__(self) -> None:
        if not self.pending:
            return
        now = time.monotonic()
        if now - self.started > self.give_up_s:
            log.warning("simulators never confirmed the cars", evses=sorted(self.pending))
            self.pending.clear()
            return
        with self.lock:
            plugged = dict(self.plugged)
        for evse, car in list(self.pending.items()):
            if plugged.get(evse) and evse in self.sent_at:
                del self.pending[evse]
                log.info("car plugged in", evse=evse, phases=car["phases"], max_current_a=car["max_current_a"])
                continue
            if evse in self.sent_at and now - self.sent_at[evse] < self.retry_s:
                continue
            payload = {"action": "plug", "phases": car["phases"], "max_current_a": car["max_current_a"]}
            self.client.publish(f"{self.root}/sim/{evse}/command", json.dumps(payload), qos=1)
            self.sent_at[evse] = now

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def summary(snap: Any) -> dict[str, Any]:
    """The installation in a few words per item (for the one-line-per-interval output without a terminal)."""
    alloc = snap.get("controller/allocation") or {}
    granted = {e.get("evse_id"): e for e in alloc.get("evses") or [] if isinstance(e, dict)}
    evses = {}
    for ident, st in snap.select("evse", "status").items():
        amps = "/".join(f"{x:g}" for x in st.get("current_a") or [])
        text = f"{st.get('state')} {amps} A"
        if ident in granted:
            from chargegate.status_view import granted_text

            g = granted[ident]
            text += f", granted {granted_text(g, st)} ({g.get('bound_by')}: {g.get('reason_text') or '-'})"
        evses[ident] = text
    meters = {ident: f"{m.get('power_w')} W" for ident, m in snap.select("meter", "reading").items()}
    limits = {}
    with snap.lock:
        raw = {t.rsplit("/", 1)[-1]: d for t, d in snap.state.items() if t.startswith(f"{snap.root}/grid/limit/")}
    for source, lim in sorted(raw.items()):
        limits[source] = (f"{lim.get('power_w')} W" if lim.get("power_w") is not None else
                          str(lim.get("current_a"))) + " active" if lim.get("active") else "inactive"
    tariff = (snap.get("tariff/current") or {}).get("period") or {}
    link = snap.get("link/smgw") or {}
    out: dict[str, Any] = {"evses": evses, "meters": meters, "grid_limits": limits}
    if tariff:
        out["tariff"] = f"{tariff.get('level')} ({tariff.get('id')})"
    if link:
        out["smgw_link"] = str(link.get("state")) + (f": {link['error']}" if link.get("error") else "")
    warnings = (alloc.get("limits") or {}).get("warnings") or []
    if warnings:
        out["controller_warnings"] = warnings[:3]
    return out


class _Ticker:
    """Without a terminal: one line per interval with the messages seen per topic family."""

    def __init__(self, cfg: cfgmod.Config, port: int, interval: float = 5.0) -> None:
        from chargegate.status_view import Snapshot, connect_observer

        self.snap = Snapshot(cfg.site.topic_root)
        self.client = connect_observer(cfg, self.snap)
        self.interval = interval
        self.next = time.monotonic() + 2.0
        self.port = port

    def __call__(self) -> None:
        if time.monotonic() < self.next:
            return
        self.next = time.monotonic() + self.interval
        with self.snap.lock:
            topics = list(self.snap.state)
            total = self.snap.messages
        families: dict[str, int] = {}
        for t in topics:
            parts = t.split("/")
            # evse/<id>/status -> evse/status; grid/limit/dso stays as it is
            keyed = len(parts) > 3 and parts[1] in ("evse", "meter", "sim", "service")
            fam = "/".join(parts[1:2] + parts[3:]) if keyed else "/".join(parts[1:])
            families[fam] = families.get(fam, 0) + 1
        health = {k: v.get("status") for k, v in self.snap.select("service", "health").items()}
        print(json.dumps({"demo": "broker", "messages_seen": total, "topics": families, "services": health,
                          **summary(self.snap)}, ensure_ascii=False), flush=True)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def write_demo_config(path: Path, config: dict[str, Any]) -> None:
    """The demo's configuration holds its tokens and passwords: 0600 like any configuration."""
    atomic_write(path, "# generated by `chargegate demo`; edit a copy, not this file\n"
                 + yaml.safe_dump(config, sort_keys=False))


def previous_run_files(dirpath: Path, cfg: cfgmod.Config) -> tuple[list[Path], list[Path]]:
    """What an earlier demo in ``dirpath`` left that a new one must not continue: the operator backend's
    and the OCPP queue's SQLite files (its transactions), the record, the operator's state, the broker's
    retained messages, the logs. Returns ``(below dirpath: removed, elsewhere: kept)``: a state folder
    outside the demo's folder (``CHARGEGATE_STATE_DIR``) may be a real installation's and is not touched."""
    state = cfg.state_dir
    candidates = [dirpath / "backend.sqlite", dirpath / "operator-record.jsonl", dirpath / "ports",
                  cfg.ocpp.queue.path or state / "ocpp-queue.sqlite", cfg.history.db_path(state),
                  state / "smgw" / "operator.json", state / "smgw" / "cert-switch.json",
                  state / "evse-poller" / "control.json", cfg.admin.audit_file or state / "admin" / "audit.jsonl"]
    found: list[Path] = []
    for c in candidates:
        found += [x for x in (c, c.with_name(c.name + "-wal"), c.with_name(c.name + "-shm"),
                              c.with_name(c.name + "-journal")) if x.exists()]
    if (dirpath / "logs").is_dir():
        found += sorted((dirpath / "logs").glob("*.log"))
    inside = [f for f in found if f.resolve().is_relative_to(dirpath.resolve())]
    kept = [f for f in found if f not in inside]
    data = placement(cfg).dir / "data"  # the broker's retained messages (perhaps under /run: this state's)
    if data.exists():
        inside.append(data)
    return inside, kept


def start_fresh(dirpath: Path, cfg: cfgmod.Config) -> list[str]:
    """Remove what an earlier demo left in ``dirpath`` (:func:`previous_run_files`); the lines to print."""
    removed, kept = previous_run_files(dirpath, cfg)
    for f in removed:
        if f.is_dir():
            shutil.rmtree(f, ignore_errors=True)
        else:
            f.unlink(missing_ok=True)
    lines = []
    if removed:
        lines.append(f"fresh start: removed {len(removed)} files of the previous run (transactions, queue, record, "
                     f"logs, retained messages)")
    if kept:
        lines.append(f"RESUMING: the state outside {shown(dirpath)} is kept: " + ", ".join(str(k) for k in kept))
    return lines


def demo_ports(p: DemoPlan, cfg: cfgmod.Config) -> dict[str, int]:
    """The ports worth knowing (``state/demo/ports``): the services' and the simulators' a user reaches."""
    from chargegate.status_view import ports_of

    return ports_of(cfg) | p.sim_ports


def demo(dirpath: Path, duration: float | None = None, status: bool = True) -> int:
    dirpath = dirpath.resolve()
    dirpath.mkdir(parents=True, exist_ok=True)
    p = plan(dirpath)
    cfg_path = dirpath / "chargegate.yaml"
    write_demo_config(cfg_path, p.config)
    cfg = cfgmod.load(cfg_path)
    fresh = start_fresh(dirpath, cfg)  # a demo starts from scratch: nothing of an earlier run carries over
    ports = demo_ports(p, cfg)
    atomic_write(dirpath / "ports", json.dumps(ports) + "\n", mode=0o644)
    logsetup.setup("demo", "info", "console" if sys.stderr.isatty() else "json")
    from chargegate.runner import build

    sup: Supervisor = build(cfg_path, logs_dir=dirpath / "logs")
    logs = dirpath / "logs"
    for s in p.sims:
        s.logfile = logs / f"{s.name}.log"
    # simulators first: the services find their devices at once
    sup.procs[:0] = p.sims
    port = cfg.broker.port
    print("\nchargegate demo")
    for line in fresh:
        print(f"  {line}")
    print(f"  configuration: {cfg_path}")
    print(f"  ports:         {json.dumps(ports)}  (in {shown(dirpath / 'ports')}; "
          f"`chargegate status --port broker` prints one)")
    print(f"  broker:        127.0.0.1:{port}  (read-only account: observer / {DEMO_OBSERVER_PASSWORD})")
    print(f"  watch it:      mosquitto_sub -h 127.0.0.1 -p {port} -u observer -P {DEMO_OBSERVER_PASSWORD} "
          f"-t 'chargegate/#' -v")
    cli, cfg_shown = cli_command(), shown(cfg_path)
    print(f"  live view:     {cli} status --config {cfg_shown}")
    print(f"  service logs:  {logs}/")
    if p.cars:
        print(f"  cars:          {cli} sim unplug {p.cars[0]['evse']} --config {cfg_shown}   "
              f"(and `sim plug`)")
    for n in p.notes:
        print(f"  note:          {n}")
    print("  stop:          Ctrl-C\n", flush=True)

    started = time.monotonic()
    driver: _CarDriver | None = None
    ticker: Any = None
    live_view = status and sys.stdout.isatty()

    def until() -> bool:
        return duration is not None and time.monotonic() - started > duration

    def on_tick() -> None:
        nonlocal driver, ticker
        if driver is None and p.cars:
            driver = _CarDriver(cfg, p.cars, port)
        if driver is not None:
            driver()
        if ticker is None and time.monotonic() - started > 1.0:
            ticker = _LiveView(cfg, ports) if live_view else _Ticker(cfg, port)
        if ticker is not None:
            ticker()

    try:
        sup.run(until=until, on_tick=on_tick)
    finally:
        if ticker is not None:
            ticker.close()
        if driver is not None:
            driver.close()
    return 0


class _LiveView:
    def __init__(self, cfg: cfgmod.Config, ports: dict[str, int]) -> None:
        from rich.live import Live

        from chargegate.status_view import Snapshot, connect_observer, render

        self.snap = Snapshot(cfg.site.topic_root)
        self.client = connect_observer(cfg, self.snap)
        self.render = lambda snap: render(snap, ports)
        self.live = Live(self.render(self.snap), refresh_per_second=2)
        self.live.start()
        self.next = 0.0

    def __call__(self) -> None:
        if time.monotonic() >= self.next:
            self.next = time.monotonic() + 0.5
            self.live.update(self.render(self.snap))

    def close(self) -> None:
        self.live.stop()
        self.client.loop_stop()
        self.client.disconnect()
