"""The whole chargegate system as separate processes, with fault injection and an invariant monitor.

:class:`System` writes a complete configuration (free ports; a circuit tree with a sub-distribution;
Modbus wallboxes of several profiles, one with phase rotation and a 1-phase one; OCPP wallboxes
1.6J and 2.0.1; a grid meter that reads the house base load plus every simulated car), generates a
test PKI, and starts, each as its own process:

* the project's Mosquitto (the bus under test) and a *lab* Mosquitto that carries only the
  simulators' ``<root>/sim/...`` topics, so that the invariant monitor keeps sampling the simulated
  draws while the bus under test is killed (the simulators are lab equipment, not part of the
  system; their ``sim`` account and topics are the same as in the demo);
* the operator's side: its TLS Mosquitto with a CLS.EEDI backend (:class:`OperatorBackend`, in
  this process: it *is* the grid operator), the operator's OCPP backend simulator
  (``ocpp_gateway.backend_sim``, records every frame) and the SMGW simulator
  (``smgw_link.sim.smgw``: brainpool HAN TLS, SOCKS5 to both operator endpoints);
* the Modbus simulators (``evse_poller.sim``) and the OCPP wallbox simulators (``ocpp_gateway.sim``),
  each kind as ``Plan.sim_procs`` processes (``--shard K/N``; ``sim-modbus``, ``sim-modbus.1``, ...);
* the four services (``python -m <package>``), with OCPP to the backend through the SMGW channel and
  power reduction switched on; with ``Plan.poller_instances`` the Modbus devices are split over that many
  evse-poller instances (``poller.instances`` p0, p1, ...; processes ``evse-poller.p0``, ...):
  :attr:`System.services` lists the service processes.

Faults: :meth:`System.kill_broker` / :meth:`start_broker`, :meth:`kill_service` /
:meth:`start_service` (SIGKILL), :meth:`cut_smgw` / :meth:`restore_smgw` (the SMGW simulator
process killed and started again on its port), :meth:`network` (a Modbus wallbox or the grid
meter taken off the network: its TCP port closed), and :meth:`operator_limit` (a CLS.EEDI
consumption limit at the operator's backend, retried while it is refused, as an operator does).

:class:`Monitor` subscribes to everything (observer account, both brokers) and checks the safety
invariants every 50 ms against the simulated draws: the per-phase load of every circuit against
its fuse, the controllable power against every binding grid limit (raised to the §14a floor for
the sources the controller floors), and every wallbox without a valid setpoint against its safe
current. A breach that lasts longer than the grace (one control cycle plus the simulator ramp and
the draw sampling) is a violation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from chargegate import config as cfgmod
from chargegate.broker import LocalBroker, account_password, free_port, wait_port, write_broker_files
from chargegate.bus import _Client as BusClient
from chargegate.runner import Proc

SERVICES: dict[str, str] = {"evse-poller": "evse_poller", "load-controller": "load_controller",
                            "ocpp-gateway": "ocpp_gateway", "smgw-link": "smgw_link"}
OCPP_BACKEND_HOST = "ocpp.operator.test"
OCPP_BACKEND_PORT = 9000  # a name in the SMGW's route table; nothing listens on it locally
VOLTAGE = 230.0
WAKE_MIN_S = 0.01  # the monitor wakes its waiters at most this often (see Monitor._wake)
GZF = {2: 0.80, 3: 0.75, 4: 0.70, 5: 0.65, 6: 0.60, 7: 0.55, 8: 0.50}  # BK6-22-300; n >= 9: 0.45


def floor_14a_w(n_controllable: int) -> float:
    """§14a EnWG floor behind an energy management system: 4.2 kW + (n-1) x GZF x 4.2 kW."""
    if n_controllable <= 0:
        return 0.0
    if n_controllable == 1:
        return 4200.0
    return 4200.0 + (n_controllable - 1) * GZF.get(n_controllable, 0.45) * 4200.0


# -- the plan: what the configuration contains ----------------------------------------------------------
@dataclass
class Wallbox:
    id: str
    kind: str  # "modbus" | "ocpp"
    circuit: str
    phases: int = 3
    rotation: list[int] = field(default_factory=lambda: [1, 2, 3])
    max_a: float = 16.0
    safe_a: float = 6.0
    profile: str | None = None  # modbus
    device_id: int = 1
    port: int = 0
    version: str = "1.6"  # ocpp: the wallbox's OCPP version
    upstream_version: str | None = None  # how it appears at the operator's backend (None: 1.6)
    car_phases: int = 3
    car_max_a: float = 16.0
    controllable: bool = True  # §14a: over 4.2 kW

    @property
    def upstream_id(self) -> str:
        return self.id

    def register(self, energy_wh: float) -> float:
        """The wallbox's energy register for the simulator's energy (what a reader can get)."""
        if self.kind == "ocpp":
            return float(int(energy_wh))  # the OCPP simulator reports whole Wh (truncated)
        if self.profile == "alfen-eve":
            return energy_wh  # float64 Wh
        return float(round(energy_wh))  # integer Wh registers


@dataclass
class Circuit:
    id: str
    fuse_a: float
    parent: str | None = None


@dataclass
class Tuning:
    """Timing knobs (short ones keep the fault windows short in the tests)."""

    cycle_s: float = 1.0
    poll_interval_s: float = 1.0
    setpoint_validity_s: float = 4.0
    evse_timeout_s: float = 5.0
    meter_timeout_s: float = 4.0
    watchdog_timeout_s: float = 4.0  # programmed into devices with a watchdog (clamped to their range)
    link_loss_grace_s: float = 3.0
    failsafe_duration_s: float = 60.0
    meter_values_interval_s: float = 5.0
    health_interval_s: float = 5.0
    log_level: str = "info"
    min_charge_time_s: float = 5.0
    min_pause_s: float = 5.0
    imbalance_limit_a: float | None = None  # controller.imbalance_limit_a (None: the default, 20 A)


@dataclass
class Plan:
    dir: Path
    circuits: list[Circuit]
    wallboxes: list[Wallbox]
    base_load_a: tuple[float, float, float] = (2.0, 1.0, 3.0)
    tuning: Tuning = field(default_factory=Tuning)
    meter_port: int = 0
    broker_port: int = 0
    lab_port: int = 0
    local_ocpp_port: int = 0
    backend_port: int = 0
    backend_control_port: int = 0
    smgw_port: int = 0
    fwd_mqtt_port: int = 0
    fwd_ocpp_port: int = 0
    device_id: str = "house-1"
    grid_meter: bool = True  # a meter at the grid connection (the bus carries at most 1000 A per phase)
    # the Modbus devices split over this many evse-poller instances (poller.instances p0, p1, ...; 0: one
    # plain evse-poller), and each simulator kind run as this many processes (lab equipment, not under test)
    poller_instances: int = 0
    sim_procs: int = 1
    draw_interval_s: float = 1.0  # the simulators publish every draw at least this often (a change at once)

    def __post_init__(self) -> None:
        taken: set[int] = set()

        def port() -> int:
            while True:  # free_port() may hand out the same port twice in a row
                pt = free_port()
                if pt not in taken:
                    taken.add(pt)
                    return pt

        for name in ("meter_port", "broker_port", "lab_port", "local_ocpp_port", "backend_port",
                     "backend_control_port", "smgw_port", "fwd_mqtt_port", "fwd_ocpp_port"):
            if not getattr(self, name):
                setattr(self, name, port())
        for wb in self.wallboxes:
            if wb.kind == "modbus" and not wb.port:
                wb.port = port()

    def wallbox(self, evse_id: str) -> Wallbox:
        return next(w for w in self.wallboxes if w.id == evse_id)

    def subtree(self, circuit_id: str) -> set[str]:
        out = {circuit_id}
        changed = True
        while changed:
            changed = False
            for c in self.circuits:
                if c.parent in out and c.id not in out:
                    out.add(c.id)
                    changed = True
        return out

    @property
    def root(self) -> Circuit:
        return next(c for c in self.circuits if c.parent is None)

    @property
    def floor_w(self) -> float:
        return floor_14a_w(sum(1 for w in self.wallboxes if w.controllable))


def system_plan(tmp: Path) -> Plan:
    """The installation of the fault-injection suite: 3x35 A connection, a 3x25 A garage
    sub-distribution, three Modbus wallboxes (Alfen; Webasto with phase rotation; a 1-phase 3.7 kW
    CHARX, not controllable in the sense of §14a),
    two OCPP wallboxes (1.6J; 2.0.1 with phase rotation)."""
    return Plan(
        dir=tmp,
        circuits=[Circuit("grid", 35.0), Circuit("garage", 25.0, parent="grid")],
        wallboxes=[
            Wallbox("alfen", "modbus", "garage", profile="alfen-eve", upstream_version="2.0.1"),
            Wallbox("webasto", "modbus", "garage", rotation=[2, 3, 1], profile="webasto-next", device_id=255),
            Wallbox("charx", "modbus", "grid", phases=1, rotation=[3], max_a=16.0, safe_a=0.0,
                    profile="phoenix-charx", car_phases=1, car_max_a=16.0, controllable=False),
            Wallbox("ocpp16", "ocpp", "grid", version="1.6"),
            Wallbox("ocpp201", "ocpp", "grid", rotation=[3, 1, 2], safe_a=0.0, version="2.0.1"),
        ],
    )


def poller_instance_names(plan: Plan) -> list[str]:
    """``poller.instances`` of the plan (none: one plain evse-poller)."""
    return [f"p{k}" for k in range(plan.poller_instances)]


def service_processes(plan: Plan) -> dict[str, tuple[str, list[str]]]:
    """The service processes of the plan: name -> (package, extra arguments). The services of
    :data:`SERVICES`, with ``evse-poller`` replaced by ``evse-poller.<instance>`` per poller instance."""
    out: dict[str, tuple[str, list[str]]] = {}
    for name, pkg in SERVICES.items():
        if name == "evse-poller" and plan.poller_instances:
            for inst in poller_instance_names(plan):
                out[cfgmod.instance_service(inst)] = (pkg, ["--instance", inst])
        else:
            out[name] = (pkg, [])
    return out


def sim_process_names(plan: Plan, kind: str) -> list[str]:
    """``sim-modbus``, ``sim-modbus.1``, ... (``kind``: modbus or ocpp), one per simulator process."""
    return [f"sim-{kind}" + (f".{k}" if k else "") for k in range(max(1, plan.sim_procs))]


def config_dict(plan: Plan, pki_dir: Path, cert_store: Path) -> dict[str, Any]:
    t = plan.tuning
    children: dict[str | None, list[Circuit]] = {}
    for c in plan.circuits:
        children.setdefault(c.parent, []).append(c)

    def node(c: Circuit) -> dict[str, Any]:
        out: dict[str, Any] = {"id": c.id, "fuse_a": c.fuse_a}
        if c.parent is None and plan.grid_meter:
            out["meter"] = "grid-meter"
        kids = [node(k) for k in children.get(c.id, [])]
        if kids:
            out["children"] = kids
        return out

    evses: list[dict[str, Any]] = []
    instances = poller_instance_names(plan)
    n_modbus = 0
    for wb in plan.wallboxes:
        e: dict[str, Any] = {"id": wb.id, "circuit": wb.circuit, "phases": wb.phases, "phase_rotation": wb.rotation,
                             "max_current_a": wb.max_a, "safe_current_a": wb.safe_a, "controllable": wb.controllable}
        if wb.kind == "modbus":
            e["modbus"] = {"profile": wb.profile, "host": "127.0.0.1", "port": wb.port, "device_id": wb.device_id}
            if instances:  # round robin over the instances
                e["modbus"]["instance"] = instances[n_modbus % len(instances)]
            n_modbus += 1
        else:
            e["ocpp"] = {"charge_box_id": f"CB-{wb.id}", "connector_id": 1, "version": wb.version}
        if wb.upstream_version:
            e["upstream"] = {"version": wb.upstream_version}
        evses.append(e)
    return {
        "version": 1,
        "site": {"name": "chargegate system test"},
        "state_dir": "state",
        "broker": {"port": plan.broker_port},
        "logging": {"level": t.log_level, "format": "json"},
        "circuits": [node(plan.root)],
        "evses": evses,
        "meters": [{"id": "grid-meter", "role": "grid",
                    "modbus": {"profile": "sdm630", "host": "127.0.0.1", "port": plan.meter_port, "device_id": 1,
                               **({"instance": instances[0]} if instances else {})}}]
        if plan.grid_meter else [],
        "poller": {"poll_interval_s": t.poll_interval_s, "watchdog_timeout_s": t.watchdog_timeout_s,
                   # a big site's grid meter reads more than the default plausibility bound (1000 A)
                   "meter_max_current_a": max(1000.0, min(10000.0, 2 * plan.root.fuse_a)),
                   **({"instances": instances} if instances else {})},
        "controller": {"cycle_s": t.cycle_s, "setpoint_validity_s": t.setpoint_validity_s,
                       "evse_timeout_s": t.evse_timeout_s, "meter_timeout_s": t.meter_timeout_s,
                       "link_loss_grace_s": t.link_loss_grace_s, "min_charge_time_s": t.min_charge_time_s,
                       "min_pause_s": t.min_pause_s,
                       **({"imbalance_limit_a": t.imbalance_limit_a} if t.imbalance_limit_a is not None else {})},
        "ocpp": {
            "local": {"host": "127.0.0.1", "port": plan.local_ocpp_port},
            "backend": {"enabled": True, "url": f"ws://{OCPP_BACKEND_HOST}:{OCPP_BACKEND_PORT}/ocpp",
                        "via_smgw": True, "smgw_endpoint": "operator-ocpp",
                        "meter_values_interval_s": t.meter_values_interval_s,
                        "reconnect_min_s": 0.5, "reconnect_max_s": 2.0},
            "queue": {"retry_interval_s": 1.0},
        },
        "smgw": {
            "enabled": True,
            "gateway": {"host": "127.0.0.1", "port": plan.smgw_port, "trust_anchor": str(pki_dir / "gateway-ca.pem"),
                        "server_name": "smgw.local", "connect_timeout_s": 2},
            "cert_store": str(cert_store),
            "certificate": "cls",
            "keepalive_s": 1,
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 1.0,
            "functions": {"ocpp_via_smgw": True, "power_reduction": True},
            "endpoints": [
                {"name": "operator-mqtt", "host": "mqtt.operator.test", "port": 8883,
                 "listen_port": plan.fwd_mqtt_port, "purpose": "clseedi"},
                {"name": "operator-ocpp", "host": OCPP_BACKEND_HOST, "port": OCPP_BACKEND_PORT,
                 "listen_port": plan.fwd_ocpp_port, "purpose": "ocpp"},
            ],
            "clseedi": {"enabled": True, "endpoint": "operator-mqtt", "ca_file": str(pki_dir / "operator-ca.pem"),
                        "device_id": plan.device_id, "keepalive_s": 5},
            "http_api": {"enabled": False},
            "link_loss_grace_s": t.link_loss_grace_s,
            "failsafe_duration_s": t.failsafe_duration_s,
        },
    }


# -- the invariant monitor -------------------------------------------------------------------------------
@dataclass
class Episode:
    key: str
    start: float
    end: float | None = None
    peak: float = 0.0
    detail: str = ""

    def duration(self, now: float) -> float:
        return (self.end if self.end is not None else now) - self.start


@dataclass
class Fault:
    name: str
    start: float
    lenient: bool  # the actuation path itself is down: a new limit cannot act before it is back
    end: float | None = None


@dataclass
class Session:
    """A car's stay at a wallbox as the simulator saw it."""

    evse: str
    plugged_at: float
    plug_wh: float | None = None  # the energy register when the car arrived (frozen before: no car)
    first_wh: float | None = None  # the energy in the first draw with the car plugged in
    start_clean: bool = True  # the wallbox offered no current when the car arrived
    unplugged_at: float | None = None
    stop_wh: float | None = None  # the energy register after the car left (frozen)
    energy_by_ts: list[tuple[str, float]] = field(default_factory=list)  # (draw ts, energy) while plugged


class Monitor:
    """Samples every published setpoint, grid limit, status, health and simulated draw; checks the
    invariants continuously (every ``period_s``) and keeps each breach as an :class:`Episode`."""

    def __init__(self, plan: Plan, cfg: cfgmod.Config, grace_s: float, *, period_s: float = 0.05,
                 tol_a: float = 0.01, tol_w: float = 1.0, allocations: bool = True) -> None:
        self.plan = plan
        # controller/allocation: one message per control cycle naming every EVSE (270 kB at 1000 EVSEs, more bytes
        # than all the statuses of a limit round): the fault tests read it, bench/system does not
        self.keep_allocations = allocations
        self.cfg = cfg
        self.root = cfg.site.topic_root
        self.grace_s = grace_s
        self.period_s = period_s
        self.tol_a = tol_a
        self.tol_w = tol_w
        self.floor_sources = set(cfg.controller.floor_sources)
        self.lock = threading.RLock()
        self.draws: dict[str, dict[str, Any]] = {}
        self.draw_log: list[tuple[float, str, dict[str, Any]]] = []
        self.setpoints: dict[str, list[tuple[float, dict[str, Any]]]] = {}
        self.limits: dict[str, tuple[float, dict[str, Any]]] = {}
        self.limit_log: list[tuple[float, str, dict[str, Any]]] = []
        self.status: dict[str, tuple[float, dict[str, Any]]] = {}
        self.health: list[tuple[float, str, str, int | None]] = []
        self.links: list[tuple[float, dict[str, Any]]] = []
        self.allocation: tuple[float, dict[str, Any]] | None = None
        self.allocation_log: list[tuple[float, dict[str, Any]]] = []
        self.status_log: list[tuple[float, str, dict[str, Any]]] = []
        self.readings_log: list[tuple[float, str, dict[str, Any]]] = []
        self.ev_w_log: list[tuple[float, float]] = []  # (evaluation time, controllable W)
        self.readings: dict[str, tuple[float, dict[str, Any]]] = {}
        self.sessions: dict[str, list[Session]] = {}
        self.episodes: list[Episode] = []
        self.open: dict[str, Episode] = {}
        self.faults: list[Fault] = []
        self.evaluations = 0
        self.messages = 0
        self._circuit_of = {w.id: w.circuit for w in plan.wallboxes}
        self._controllable = {w.id: w.controllable for w in plan.wallboxes}
        self._safe_a = {w.id: w.safe_a for w in plan.wallboxes}
        self._subtrees = {c.id: plan.subtree(c.id) for c in plan.circuits}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._wake_pending = False
        self._stop = threading.Event()
        self._clients: list[mqtt.Client] = []
        self._thread: threading.Thread | None = None

    # -- connection ------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._event = asyncio.Event()
        pw = account_password(self.cfg, "observer")
        r = self.root
        # only what the monitor keeps (not the services' commands, logs, per-EVSE limits, tariffs ...): the broker
        # sends nothing else, nothing else is read and dropped here
        topics = [f"{r}/evse/+/setpoint", f"{r}/evse/+/status", f"{r}/grid/limit/+", f"{r}/service/+/health",
                  f"{r}/link/smgw", f"{r}/meter/+/reading"] + ([f"{r}/controller/allocation"]
                                                               if self.keep_allocations else [])
        main = self._client("monitor-main", pw, topics, self.plan.broker_port)
        lab = self._client("monitor-lab", pw, [f"{self.root}/sim/+/draw"], self.plan.lab_port)
        self._clients = [main, lab]
        self._thread = threading.Thread(target=self._ticker, name="invariant-monitor", daemon=True)
        self._thread.start()

    def _client(self, name: str, password: str, topics: list[str], port: int) -> mqtt.Client:
        # the services' paho client (chargegate.bus): buffered reads and joined PUBACKs, not three recv() and one
        # send() per message - with 1000 wallboxes a limit round brings 3000-4000 messages to this process
        c = BusClient(CallbackAPIVersion.VERSION2, client_id=f"{name}-{os.getpid()}")
        c.username_pw_set("observer", password)
        c.reconnect_delay_set(0.1, 0.5)
        # QoS 0: a clean session (paho's default) keeps nothing over a reconnect, so QoS 1 would only add a PUBACK
        # written back for every message (one send() each: a third of this client's time in a limit round)
        c.on_connect = lambda cl, u, f, rc, p: [cl.subscribe(t, qos=0) for t in topics] if not rc.is_failure else None
        c.on_message = self._on_message  # what the fast path leaves to paho (see chargegate.bus._Client)
        # whole PUBLISH packets straight from the read buffer: no MQTTMessage with its threading.Condition, no
        # callback lock and filter search per message (a fifth of this process's CPU in a 500 + 500 round)
        c.on_publish_fast = self._on_publish
        c.connect_async("127.0.0.1", port, keepalive=5)
        c.loop_start()
        return c

    def stop(self) -> None:
        self._stop.set()
        for c in self._clients:
            c.loop_stop()
            with contextlib.suppress(Exception):
                c.disconnect()
        if self._thread is not None:
            self._thread.join(2)

    def _wake(self) -> None:
        """Wake the waiters (:meth:`until`) for a new message: one wake-up of the event loop for all that
        arrive before it runs, not one per message (a burst of 1000 statuses and draws woke it 1000 times,
        each re-evaluating a predicate over every wallbox: the benchmark process fell behind the system), and
        at most one per ``WAKE_MIN_S`` (each is a write to the loop's self-pipe and a GIL hand-over: a tenth of
        this process's CPU in a 500 + 500 round). A waiter sees a message at most ``WAKE_MIN_S`` later; the
        figures come from the simulators' own timestamps, not from when a waiter woke."""
        if self._wake_pending or self._loop is None or self._event is None or self._loop.is_closed():
            return
        self._wake_pending = True
        try:
            self._loop.call_soon_threadsafe(self._woken)
        except RuntimeError:  # closed meanwhile
            self._wake_pending = False

    def _woken(self) -> None:
        if self._event is not None:
            self._event.set()
        seen = self.messages
        assert self._loop is not None
        self._loop.call_later(WAKE_MIN_S, self._rearm, seen)

    def _rearm(self, seen: int) -> None:
        self._wake_pending = False  # first: a message from now on schedules another wake-up
        if self.messages != seen and self._event is not None:
            self._event.set()  # what came in meanwhile

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._on_publish(msg.topic, msg.payload, bool(msg.retain))

    def _on_publish(self, topic: str, payload: bytes, retained: bool) -> None:
        if not payload:
            return
        t = time.monotonic()
        parts = topic[len(self.root) + 1:].split("/")  # only kept topics are subscribed (start)
        try:
            data = json.loads(payload)
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        with self.lock:
            self.messages += 1
            if parts[0] == "sim" and len(parts) == 3 and parts[2] == "draw":
                self.draws[parts[1]] = data
                self.draw_log.append((t, parts[1], data))
                self._sessions_seen(t, parts[1], data)
            elif parts[0] == "evse" and len(parts) == 3 and parts[2] == "setpoint":
                self.setpoints.setdefault(parts[1], []).append((t, data))
            elif parts[0] == "evse" and len(parts) == 3 and parts[2] == "status":
                self.status[parts[1]] = (t, data)
                self.status_log.append((t, parts[1], {k: data.get(k) for k in (
                    "state", "online", "current_a", "energy_wh", "applied", "ts")}))
            elif parts[0] == "grid" and len(parts) == 3 and parts[1] == "limit":
                prev = self.limits.get(parts[2])
                same = prev is not None and _limit_key(prev[1]) == _limit_key(data)
                self.limits[parts[2]] = (prev[0] if same and prev else t, data)
                self.limit_log.append((t, parts[2], data))
            elif parts[0] == "service" and len(parts) == 3 and parts[2] == "health":
                self.health.append((t, parts[1], str(data.get("status")), data.get("pid")))
            elif parts == ["link", "smgw"]:
                self.links.append((t, data))
            elif parts == ["controller", "allocation"]:
                self.allocation = (t, data)
                self.allocation_log.append((t, data))
            elif parts[0] == "meter" and len(parts) == 3 and parts[2] == "reading":
                self.readings[parts[1]] = (t, data)
                self.readings_log.append((t, parts[1], {k: data.get(k) for k in ("online", "current_a", "ts")}))
        self._wake()

    # -- sessions (what the simulators' energy registers said) -----------------------------------------
    def plugged(self, evse: str, t: float) -> None:
        with self.lock:
            d = self.draws.get(evse, {})
            self.sessions.setdefault(evse, []).append(Session(
                evse, t, plug_wh=float(d["energy_wh"]) if "energy_wh" in d else None,
                start_clean=float(d.get("limit_a") or 0.0) < 6.0))

    def unplugged(self, evse: str, t: float) -> None:
        with self.lock:
            s = self.sessions.get(evse, [])
            if s and s[-1].unplugged_at is None:
                s[-1].unplugged_at = t

    def _sessions_seen(self, t: float, evse: str, d: dict[str, Any]) -> None:
        for s in self.sessions.get(evse, [])[-1:]:
            if s.unplugged_at is None and t >= s.plugged_at and d.get("plugged"):
                if s.first_wh is None:
                    s.first_wh = float(d["energy_wh"])
                s.energy_by_ts.append((str(d.get("ts")), float(d["energy_wh"])))
            if s.unplugged_at is not None and t >= s.unplugged_at and not d.get("plugged"):
                s.stop_wh = float(d["energy_wh"])  # frozen after the car left: the last one counts

    # -- faults ----------------------------------------------------------------------------------------
    def fault_begin(self, name: str, lenient: bool) -> Fault:
        f = Fault(name, time.monotonic(), lenient)
        with self.lock:
            self.faults.append(f)
        return f

    @staticmethod
    def fault_end(f: Fault, at: float | None = None) -> None:
        f.end = at if at is not None else time.monotonic()

    # -- the invariants --------------------------------------------------------------------------------
    def _ticker(self) -> None:
        while not self._stop.wait(self.period_s):
            self.evaluate()

    def loads(self) -> dict[str, list[float]]:
        """Per circuit, per grid phase: what flows through it now (base load at the root)."""
        out: dict[str, list[float]] = {}
        with self.lock:
            draws = {k: v.get("grid_current_a", [0, 0, 0]) for k, v in self.draws.items()}
        for c in self.plan.circuits:
            total = list(self.plan.base_load_a) if c.parent is None else [0.0, 0.0, 0.0]
            below = self._subtrees[c.id]
            for evse, amps in draws.items():
                if self._circuit_of.get(evse) in below:
                    for k in range(3):
                        total[k] += float(amps[k])
            out[c.id] = total
        return out

    def controllable_w(self) -> float:
        """What the §14a controllable wallboxes draw now, in W."""
        with self.lock:
            return sum(float(a) for e, d in self.draws.items() if self._controllable.get(e)
                       for a in d.get("grid_current_a", [])) * VOLTAGE

    def all_ev_w(self) -> float:
        with self.lock:
            return sum(float(a) for d in self.draws.values() for a in d.get("grid_current_a", [])) * VOLTAGE

    def effective_limit(self, source: str, lim: dict[str, Any]) -> float | None:
        if lim.get("power_w") is None:
            return None
        w = float(lim["power_w"])
        return max(w, self.plan.floor_w) if source in self.floor_sources else w

    def binding_limits(self) -> list[tuple[str, float, dict[str, Any], float]]:
        """(source, effective W, payload, since) of every grid limit in force now."""
        now = datetime.now(UTC)
        out = []
        with self.lock:
            items = list(self.limits.items())
        for src, (since, lim) in items:
            if not lim.get("active"):
                continue
            try:
                if datetime.fromisoformat(lim["valid_until"]) <= now:
                    continue
            except (KeyError, ValueError):
                continue
            eff = self.effective_limit(src, lim)
            if eff is not None:
                out.append((src, eff, lim, since))
        return out

    def evaluate(self) -> None:
        t = time.monotonic()
        now = datetime.now(UTC)
        breaches: dict[str, tuple[float, str]] = {}  # key -> (excess, detail)
        loads = self.loads()
        for c in self.plan.circuits:
            load = loads[c.id]
            for k in range(3):
                if load[k] > c.fuse_a + self.tol_a:
                    breaches[f"fuse:{c.id}:L{k + 1}"] = (load[k] - c.fuse_a, f"{load[k]:.2f} A > fuse {c.fuse_a:g} A")
        base_w = sum(self.plan.base_load_a) * VOLTAGE
        ev_w = self.controllable_w()
        all_w = self.all_ev_w()
        self.ev_w_log.append((t, ev_w))
        for src, eff, lim, _since in self.binding_limits():
            scope = lim.get("scope") or self.cfg.controller.grid_limit_scope
            total = ev_w if scope == "controllable" else all_w + base_w
            if total > eff + self.tol_w:
                breaches[f"limit:{src}:{lim.get('power_w')}"] = (
                    total - eff, f"{total:.0f} W > {eff:.0f} W ({scope}, {src} {lim.get('power_w')} W, "
                                 f"§14a floor {self.plan.floor_w:.0f} W)")
        with self.lock:
            for evse, sps in self.setpoints.items():
                d = self.draws.get(evse)
                if not sps or d is None:
                    continue
                try:
                    vu = datetime.fromisoformat(sps[-1][1]["valid_until"])
                except (KeyError, ValueError):
                    continue
                expired_for = (now - vu).total_seconds()
                safe = self._safe_a[evse]  # (plan.wallbox() searches the list: 1000 x 1000 per evaluation)
                if expired_for > 0 and float(d.get("limit_a") or 0.0) > safe + self.tol_a:
                    breaches[f"fallback:{evse}"] = (float(d["limit_a"]) - safe,
                                                    f"no valid setpoint for {expired_for:.1f} s, offers "
                                                    f"{d['limit_a']} A > safe {safe:g} A")
            self.evaluations += 1
            for key, (excess, detail) in breaches.items():
                ep = self.open.get(key)
                if ep is None:
                    ep = self.open[key] = Episode(key, t)
                    self.episodes.append(ep)
                ep.peak = max(ep.peak, excess)
                ep.detail = detail
            for key in [k for k in self.open if k not in breaches]:
                self.open.pop(key).end = t

    # -- judging ---------------------------------------------------------------------------------------
    def allowed_until(self, ep: Episode) -> float:
        """When a breach must be over: one grace after it began; for a new grid limit during a fault
        that breaks the actuation path, one grace after that fault ended."""
        end = ep.start + self.grace_s
        if ep.key.startswith("limit:"):
            for f in self.faults:
                if f.start > ep.start + self.grace_s or (f.end is not None and f.end < ep.start):
                    continue
                if f.lenient:
                    end = max(end, (f.end if f.end is not None else float("inf")) + self.grace_s)
        return end

    def violations(self, since: float = 0.0) -> list[Episode]:
        now = time.monotonic()
        with self.lock:
            eps = [e for e in self.episodes if (e.end is None or e.end >= since)]
        return [e for e in eps if (e.end if e.end is not None else now) > self.allowed_until(e)]

    def breaches(self, since: float = 0.0) -> list[Episode]:
        with self.lock:
            return [e for e in self.episodes if e.end is None or e.end >= since]

    def describe(self, eps: list[Episode]) -> list[str]:
        now = time.monotonic()
        return [f"{e.key}: {e.duration(now):.2f} s (peak {e.peak:.2f}) {e.detail}" for e in eps]

    # -- waiting ---------------------------------------------------------------------------------------
    async def until(self, pred: Callable[[], Any], within_s: float, what: str) -> Any:
        """Wait for ``pred()`` to be true(thy), woken by every message (and every 0.2 s)."""
        assert self._event is not None
        deadline = time.monotonic() + within_s
        while True:
            with self.lock:
                value = pred()
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out after {within_s:g} s waiting for {what}")
            self._event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), min(left, 0.2))

    def health_online_since(self, service: str, t: float, not_pid: int | None = None) -> float | None:
        for at, svc, status, pid in self.health:
            if svc == service and at >= t and status == "online" and (not_pid is None or pid != not_pid):
                return at
        return None

    def dump(self, path: Path) -> None:
        """Everything the monitor saw (monotonic seconds), for a post-mortem of a failed run."""
        with self.lock:
            data = {
                "grace_s": self.grace_s,
                "draws": [(round(t, 3), e, d) for t, e, d in self.draw_log],
                "setpoints": {e: [(round(t, 3), d) for t, d in v] for e, v in self.setpoints.items()},
                "limits": [(round(t, 3), s, d) for t, s, d in self.limit_log],
                "health": self.health,
                "links": [(round(t, 3), d.get("state")) for t, d in self.links],
                "episodes": [e.__dict__ for e in self.episodes],
                "faults": [f.__dict__ for f in self.faults],
                "sessions": {e: [x.__dict__ for x in v] for e, v in self.sessions.items()},
                "allocations": [(round(t, 3), d) for t, d in self.allocation_log],
                "status": [(round(t, 3), e, d) for t, e, d in self.status_log],
                "readings": [(round(t, 3), e, d) for t, e, d in self.readings_log],
            }
        path.write_text(json.dumps(data, default=str))

    def last_setpoint(self, evse: str) -> dict[str, Any] | None:
        sps = self.setpoints.get(evse)
        return sps[-1][1] if sps else None


def _limit_key(lim: dict[str, Any]) -> tuple[Any, ...]:
    return (lim.get("active"), lim.get("power_w"), lim.get("scope"), lim.get("id"))


# -- the system ------------------------------------------------------------------------------------------
@dataclass
class LimitResult:
    watts: int
    sent_at: float
    acks: list[int]
    on_bus_at: float | None = None  # when grid/limit/dso with this value reached the bus
    compliant_at: float | None = None  # when the simulated draws were within it


class System:
    def __init__(self, plan: Plan, grace_s: float | None = None, monitor_period_s: float = 0.05,
                 monitor_allocations: bool = True) -> None:
        from smgw_link.certstore import CertStore
        from smgw_link.pki import make_pki

        self.plan = plan
        self.dir = plan.dir
        self.pki_dir = self.dir / "pki"
        self.pki = make_pki(self.pki_dir, "brainpoolP256r1")
        store = CertStore(self.dir / "certs")
        store.import_pem("cls", self.pki.client_cert, self.pki.client_key)
        self.cfg_path = self.dir / "chargegate.yaml"
        self.cfg_path.write_text("# generated by tests/system/harness.py\n" + yaml.safe_dump(
            config_dict(plan, self.pki_dir, self.dir / "certs"), sort_keys=False))
        self.cfg = cfgmod.load(self.cfg_path)
        t = plan.tuning
        # one control cycle + the poller's cycle (setpoint written, simulator ramps) + draw sampling
        self.grace_s = grace_s if grace_s is not None else t.cycle_s + t.poll_interval_s + 1.0
        self.monitor = Monitor(plan, self.cfg, self.grace_s, period_s=monitor_period_s, allocations=monitor_allocations)
        self.logs = self.dir / "logs"
        self.broker = LocalBroker.prepare(self.cfg, persistence=True)
        lab_conf = write_broker_files(self.cfg, self.dir / "lab-broker", port=plan.lab_port, persistence=False)
        self.lab_broker = LocalBroker(conf=lab_conf, port=plan.lab_port,
                                      log_file=self.dir / "lab-broker" / "mosquitto.log")
        self.procs: dict[str, Proc] = {}
        self.down: set[str] = set()  # processes stopped on purpose (a fault in progress)
        self.crashes: list[tuple[float, str, int | None]] = []  # unexpected exits (restarted like `chargegate run`)
        self._watch: asyncio.Task[None] | None = None
        self.operator: Any = None
        self.op_broker: Any = None
        self.sim_client: mqtt.Client | None = None
        py = sys.executable
        sim_env = {"CHARGEGATE_BROKER_PORT": str(plan.lab_port)}
        svc_env = {"CHARGEGATE_HEALTH_INTERVAL_S": str(t.health_interval_s)}
        self._add("backend-sim", [py, "-m", "ocpp_gateway.backend_sim", "--port", str(plan.backend_port),
                                  "--db", str(self.dir / "backend.sqlite"), "--control-port",
                                  str(plan.backend_control_port)])
        n = max(1, plan.sim_procs)
        extra = ["--draw-interval", str(plan.draw_interval_s)] if plan.draw_interval_s != 1.0 else []
        self.sims = [*sim_process_names(plan, "modbus"), *sim_process_names(plan, "ocpp")]
        for k, name in enumerate(sim_process_names(plan, "modbus")):
            self._add(name, [py, "-m", "evse_poller.sim", "--config", str(self.cfg_path), "--base-load-a",
                             ",".join(str(x) for x in plan.base_load_a), *(["--shard", f"{k}/{n}"] if n > 1 else []),
                             *extra],
                      sim_env)
        for k, name in enumerate(sim_process_names(plan, "ocpp")):
            self._add(name, [py, "-m", "ocpp_gateway.sim", "--config", str(self.cfg_path), "--meter-interval",
                             str(t.meter_values_interval_s), *(["--shard", f"{k}/{n}"] if n > 1 else []), *extra],
                      sim_env)
        # the service processes (health names): SERVICES, or an evse-poller per instance
        self.services: list[str] = []
        for name, (pkg, extra) in service_processes(plan).items():
            self._add(name, [py, "-m", pkg, *extra, "--config", str(self.cfg_path), "--log-format", "json"], svc_env)
            self.services.append(name)

    def _add(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.procs[name] = Proc(name, argv, env=dict(env or {}), logfile=self.logs / f"{name}.log")

    def _smgw_argv(self, op_port: int) -> list[str]:
        return [sys.executable, "-m", "smgw_link.sim.smgw", "--pki", str(self.pki_dir), "--port",
                str(self.plan.smgw_port), "--route", f"mqtt.operator.test:8883=127.0.0.1:{op_port}",
                "--route", f"{OCPP_BACKEND_HOST}:{OCPP_BACKEND_PORT}=127.0.0.1:{self.plan.backend_port}"]

    # -- start and stop --------------------------------------------------------------------------------
    async def start(self, ready_within_s: float = 90.0) -> float:
        """Start everything; returns the seconds until the system was ready."""
        from smgw_link.sim.operator import OperatorBackend, OperatorBroker

        t0 = time.monotonic()
        os.environ.pop("CHARGEGATE_BROKER_PORT", None)
        self.broker.start()
        self.lab_broker.start()
        self.op_broker = OperatorBroker(self.dir / "operator", self.pki.operator_cert, self.pki.operator_key)
        self.op_broker.start()
        self._add("smgw-sim", self._smgw_argv(self.op_broker.port))
        self.monitor.start(asyncio.get_running_loop())
        self.operator = OperatorBackend("127.0.0.1", self.op_broker.port, self.pki.operator_ca,
                                        device_id=self.plan.device_id)
        await self.operator.start()
        self.sim_client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-driver-{os.getpid()}")
        self.sim_client.username_pw_set("sim", account_password(self.cfg, "sim"))
        self.sim_client.connect("127.0.0.1", self.plan.lab_port)
        self.sim_client.loop_start()
        for name in ("backend-sim", "smgw-sim", *self.sims, *self.services):
            self.procs[name].start()
        self._watch = asyncio.create_task(self._watchdog())
        await self.ready(ready_within_s)
        return time.monotonic() - t0

    async def _watchdog(self) -> None:
        """Like ``chargegate run``: a process that exits without being told to is restarted (after
        0.5 s); every such exit is recorded, because it is a crash the suite must report."""
        while True:
            await asyncio.sleep(0.2)
            for name, p in self.procs.items():
                if name in self.down or p.popen is None or p.alive():
                    continue
                self.crashes.append((time.monotonic(), name, p.popen.returncode))
                tail = ""
                if p.logfile is not None and p.logfile.exists():
                    tail = p.logfile.read_text(errors="replace")[-600:]
                print(f"[system] {name} exited unexpectedly (code {p.popen.returncode}), restarting it: {tail}")
                await asyncio.sleep(0.5)
                p.start()

    async def ready(self, within_s: float) -> None:
        m = self.monitor
        ids = [w.id for w in self.plan.wallboxes]

        def all_ready() -> bool:
            healthy = all(self.health_state(s) == "online" for s in self.services)
            link = bool(m.links) and m.links[-1][1].get("state") == "up"
            online = all(m.status.get(e, (0, {}))[1].get("online") for e in ids)
            draws = all(e in m.draws for e in ids)
            return healthy and link and online and draws

        try:
            await m.until(all_ready, within_s, "all services online, the SMGW link up, every EVSE online")
            await self.until_backend_connected(within_s)
        except TimeoutError:
            raise TimeoutError(self.why_not_ready()) from None

    def why_not_ready(self) -> str:
        m = self.monitor
        return json.dumps({
            "health": {s: self.health_state(s) for s in self.services},
            "link": m.links[-1][1].get("state") if m.links else None,
            "evse_online": {w.id: m.status.get(w.id, (0, {}))[1].get("online") for w in self.plan.wallboxes},
            "draws": sorted(m.draws),
            "dead": [n for n, p in self.procs.items() if not p.alive()],
        })

    async def until_backend_connected(self, within_s: float, ids: list[str] | None = None) -> None:
        want = set(ids or [w.upstream_id for w in self.plan.wallboxes])
        deadline = time.monotonic() + within_s
        while True:
            st = await self.backend("/status")
            if want <= set(st.get("connected", [])):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"backend: connected {st.get('connected')}, want {sorted(want)}")
            await asyncio.sleep(0.2)

    def health_state(self, service: str) -> str | None:
        with self.monitor.lock:
            for _, svc, status, _pid in reversed(self.monitor.health):
                if svc == service:
                    return status
        return None

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        ocpp_sims = sim_process_names(self.plan, "ocpp")
        modbus_sims = sim_process_names(self.plan, "modbus")
        for name in (*ocpp_sims, *self.services, *modbus_sims, "backend-sim", "smgw-sim"):
            p = self.procs.get(name)
            if p is not None and p.alive():
                assert p.popen is not None
                p.popen.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            if p.popen is None:
                continue
            try:
                await asyncio.to_thread(p.popen.wait, 8)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                await asyncio.to_thread(p.popen.wait, 5)
        if self.operator is not None:
            with contextlib.suppress(Exception):
                await self.operator.stop()
        if self.sim_client is not None:
            self.sim_client.loop_stop()
            self.sim_client.disconnect()
        self.monitor.stop()
        with contextlib.suppress(OSError):
            self.monitor.dump(self.dir / "monitor.json")
        if self.op_broker is not None:
            self.op_broker.stop()
        self.lab_broker.stop()
        self.broker.discard()

    # -- the operator's OCPP backend -------------------------------------------------------------------
    async def backend(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.plan.backend_control_port}{path}"

        def get() -> Any:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read())

        try:
            return await asyncio.to_thread(get)
        except OSError:
            return {}

    async def transactions(self, evse: str) -> list[dict[str, Any]]:
        out = await self.backend(f"/transactions?cp={self.plan.wallbox(evse).upstream_id}")
        return out if isinstance(out, list) else []

    # -- cars ------------------------------------------------------------------------------------------
    def _sim(self, evse: str, payload: dict[str, Any]) -> None:
        assert self.sim_client is not None
        info = self.sim_client.publish(f"{self.cfg.site.topic_root}/sim/{evse}/command", json.dumps(payload), qos=1)
        info.wait_for_publish(5)

    def plug(self, evse: str) -> None:
        wb = self.plan.wallbox(evse)
        self.monitor.plugged(evse, time.monotonic())
        self._sim(evse, {"action": "plug", "phases": wb.car_phases, "max_current_a": wb.car_max_a})

    async def plug_when_idle(self, evse: str, within_s: float = 10.0) -> bool:
        """Plug a car in once the wallbox offers no current (the controller's answer to an empty
        wallbox), so that the energy register is still when the session starts. False: it did not
        get there in time (the car is plugged in anyway)."""
        m = self.monitor
        try:
            await m.until(lambda: evse in m.draws and float(m.draws[evse].get("limit_a") or 0) < 6.0
                          and not m.draws[evse].get("plugged"), within_s, f"{evse} idle")
            ok = True
        except TimeoutError:
            ok = False
        self.plug(evse)
        return ok

    def unplug(self, evse: str) -> None:
        self.monitor.unplugged(evse, time.monotonic())
        self._sim(evse, {"action": "unplug"})

    # -- faults ----------------------------------------------------------------------------------------
    def kill_broker(self) -> None:
        self.broker.kill()

    def start_broker(self) -> None:
        self.broker.start()

    def pid(self, name: str) -> int | None:
        p = self.procs[name].popen
        return p.pid if p is not None else None

    def kill_service(self, name: str) -> int:
        p = self.procs[name]
        assert p.popen is not None and p.alive(), f"{name} is not running"
        pid = p.popen.pid
        self.down.add(name)
        p.popen.send_signal(signal.SIGKILL)
        p.popen.wait(5)
        return pid

    def start_service(self, name: str) -> None:
        self.procs[name].start()
        self.down.discard(name)

    def cut_smgw(self) -> None:
        self.kill_service("smgw-sim")

    def restore_smgw(self) -> None:
        self.start_service("smgw-sim")
        wait_port("127.0.0.1", self.plan.smgw_port, 10)

    def network(self, device: str, up: bool) -> None:
        """A Modbus wallbox or the grid meter (``grid-meter``) off the network / back."""
        self._sim(device, {"action": "network", "up": up})

    async def operator_limit(self, watts: int, *, retry_for_s: float = 0.0, ack_within_s: float = 3.0) -> LimitResult:
        """Send a CLS.EEDI consumption limit; while it is refused (or not answered), send it again every
        second for ``retry_for_s``. The backend also answers the device's next ``read`` with it."""
        op = self.operator
        op.read_reply = {"limits": {"power": {"active": {"consumption": {"value": watts, "active": True}}}}}
        res = LimitResult(watts, time.monotonic(), [])
        deadline = res.sent_at + retry_for_s
        while True:
            mid = op.limit(watts)
            try:
                r = await op.wait_reply(mid, ack_within_s)
                res.acks.append(int(r.msg["data"]["errorNumber"]))
            except TimeoutError:
                res.acks.append(-1)  # no answer
            if res.acks[-1] == 0 or time.monotonic() >= deadline:
                return res
            await asyncio.sleep(1.0)

    async def limit_applied(self, res: LimitResult, within_s: float) -> LimitResult:
        """Wait until grid/limit/dso carries ``res.watts`` and the simulated draws are within it."""
        m = self.monitor
        src = self.cfg.smgw.limit_source

        def on_bus() -> float | None:
            cur = m.limits.get(src)
            if cur is not None and cur[1].get("active") and cur[1].get("power_w") == res.watts:
                return cur[0]
            return None

        res.on_bus_at = await m.until(on_bus, within_s, f"grid/limit/{src} = {res.watts} W")
        eff = m.effective_limit(src, {"power_w": res.watts}) or 0.0

        on_bus_at = res.on_bus_at

        def compliant() -> float | None:
            # the monitor's own evaluations (every period_s) sum the draws: asked on every message, this looks at
            # the newest of them, not at the 1000 draws again (that sum, on every batch of messages, was as much
            # CPU as receiving them: bench/system README)
            log = m.ev_w_log
            if log and log[-1][0] >= on_bus_at and log[-1][1] <= eff + m.tol_w:
                # the first evaluation at or after the limit reached the bus that found the draws within it
                return next(t for t, w in log if t >= on_bus_at and w <= eff + m.tol_w)
            return None

        res.compliant_at = await m.until(compliant, within_s, f"draws within {eff:.0f} W")
        return res

    async def healthy_again(self, services: list[str], since: float, within_s: float = 10.0,
                            old_pids: dict[str, int] | None = None) -> dict[str, float]:
        """Seconds from ``since`` until each service published health online (a new pid where given)."""
        m = self.monitor
        old_pids = old_pids or {}
        out: dict[str, float] = {}

        def all_back() -> bool:
            for s in services:
                if s not in out:
                    at = m.health_online_since(s, since, old_pids.get(s))
                    if at is not None:
                        out[s] = at - since
            return len(out) == len(services)

        with contextlib.suppress(TimeoutError):
            await m.until(all_back, within_s, "health online")
        return out
