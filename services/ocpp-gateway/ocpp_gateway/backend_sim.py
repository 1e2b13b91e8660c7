"""An operator's OCPP backend for tests and demos, built on the ``ocpp`` library.

* accepts any charge box id (1.6J and 2.0.1 by subprotocol; optional Basic password and TLS),
  validates every message strictly against the OCPP schemas (the library does it) and answers,
* records every frame in and out in SQLite (``frames``) so that tests can check that every
  transaction arrived exactly once, in order, with exact meter values (:meth:`transactions`),
* handles a message once: a repeat with a message id it already answered (a charge point that
  lost the answer) gets the same answer again and is recorded as ``replay``, not handled twice,
* sends RemoteStart/Stop, SetChargingProfile, ... on request (:meth:`call`),
* can be told to go away (stop listening, drop every connection) and to come back.

Run: ``python -m ocpp_gateway.backend_sim --port 9000 --db backend.sqlite [--control-port 9001]``.
The control port answers plain HTTP GET: ``/status``, ``/down``, ``/up``, ``/messages?cp=ID``,
``/transactions?cp=ID`` (without ``cp``: of every charge point),
``/call?cp=ID&action=RemoteStartTransaction&payload={"idTag":"x","connectorId":1}``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import logging
import sqlite3
import ssl
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ocpp.messages
from ocpp.charge_point import camel_to_snake_case, remove_nones, serialize_as_dict, snake_to_camel_case
from ocpp.routing import on
from ocpp.v16 import ChargePoint as CP16
from ocpp.v16 import call as call16
from ocpp.v16 import call_result as result16
from ocpp.v201 import ChargePoint as CP201
from ocpp.v201 import call as call201
from ocpp.v201 import call_result as result201
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from chargegate.files import private_sqlite

logging.getLogger("ocpp").setLevel(logging.WARNING)
# the library validates every message in the default thread pool (two hand-overs of the GIL per message, each
# up to the 5 ms switch interval on a busy machine): 100 simulated wallboxes answering a burst of
# SetChargingProfile took seconds, in order, one after the other. Validated inline it is the same check.
ocpp.messages.ASYNC_VALIDATION = False

SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    cp TEXT NOT NULL,
    version TEXT NOT NULL,
    dir TEXT NOT NULL,           -- in (from the charge point) / out (to it)
    raw TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS frames_cp ON frames (cp, id);
CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT NOT NULL);
"""


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class Recorder:
    def __init__(self, path: Path | str) -> None:
        if str(path) != ":memory:":
            private_sqlite(Path(path))  # the frames hold idTags and meter values
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # a test tool: durable against its own crash is enough
        self.db.executescript(SCHEMA)

    def frame(self, cp: str, version: str, direction: str, raw: str) -> None:
        self.db.execute("INSERT INTO frames (ts, cp, version, dir, raw) VALUES (?, ?, ?, ?, ?)",
                        (time.time(), cp, version, direction, raw))

    def next_tx_id(self) -> int:
        row = self.db.execute("SELECT v FROM kv WHERE k = 'tx'").fetchone()
        n = int(row[0]) + 1 if row else 1
        self.db.execute("INSERT OR REPLACE INTO kv (k, v) VALUES ('tx', ?)", (str(n),))
        return n


class _Recording:
    """Mixin: record every frame in and out."""

    recorder: Recorder
    _ocpp_version: str
    id: str
    sim: BackendSim

    async def route_message(self, raw_msg: str) -> None:
        try:
            msg = json.loads(raw_msg)
        except ValueError:
            msg = None
        if isinstance(msg, list) and len(msg) == 4 and msg[0] == 2 and isinstance(msg[1], str):
            prev = self.sim.answered.get((self.id, msg[1]))
            if prev is not None:
                # a replay of a message already handled (same message id): answer it again, handle it once
                self.recorder.frame(self.id, self._ocpp_version, "replay", raw_msg)
                self.sim.replays += 1
                await super()._send(prev)  # type: ignore[misc]
                return
        self.recorder.frame(self.id, self._ocpp_version, "in", raw_msg)
        await super().route_message(raw_msg)  # type: ignore[misc]

    async def _send(self, message: str) -> None:
        self.recorder.frame(self.id, self._ocpp_version, "out", message)
        if message.startswith(("[3,", "[4,")):
            with contextlib.suppress(ValueError, IndexError):
                self.sim.answered[(self.id, json.loads(message)[1])] = message
        await super()._send(message)  # type: ignore[misc]


class Backend16(_Recording, CP16):
    @on("BootNotification")
    def on_boot(self, **kw: Any) -> Any:
        return result16.BootNotification(current_time=_now(), interval=self.sim.heartbeat_s, status="Accepted")

    @on("Heartbeat")
    def on_heartbeat(self, **kw: Any) -> Any:
        return result16.Heartbeat(current_time=_now())

    @on("StatusNotification")
    def on_status(self, **kw: Any) -> Any:
        self.sim.status[self.id] = kw.get("status", "")
        return result16.StatusNotification()

    @on("Authorize")
    def on_authorize(self, id_tag: str, **kw: Any) -> Any:
        return result16.Authorize(id_tag_info={"status": self.sim.tag_status(id_tag)})

    @on("StartTransaction")
    def on_start(self, id_tag: str, **kw: Any) -> Any:
        return result16.StartTransaction(transaction_id=self.recorder.next_tx_id(),
                                         id_tag_info={"status": self.sim.tag_status(id_tag)})

    @on("StopTransaction")
    def on_stop(self, **kw: Any) -> Any:
        return result16.StopTransaction(id_tag_info={"status": "Accepted"} if kw.get("id_tag") else None)

    @on("MeterValues")
    def on_meter(self, **kw: Any) -> Any:
        return result16.MeterValues()

    @on("DataTransfer")
    def on_data(self, **kw: Any) -> Any:
        return result16.DataTransfer(status="UnknownVendorId")

    @on("DiagnosticsStatusNotification")
    def on_diag(self, **kw: Any) -> Any:
        return result16.DiagnosticsStatusNotification()

    @on("FirmwareStatusNotification")
    def on_fw(self, **kw: Any) -> Any:
        return result16.FirmwareStatusNotification()


class Backend201(_Recording, CP201):
    @on("BootNotification")
    def on_boot(self, **kw: Any) -> Any:
        return result201.BootNotification(current_time=_now(), interval=self.sim.heartbeat_s, status="Accepted")

    @on("Heartbeat")
    def on_heartbeat(self, **kw: Any) -> Any:
        return result201.Heartbeat(current_time=_now())

    @on("StatusNotification")
    def on_status(self, **kw: Any) -> Any:
        self.sim.status[self.id] = kw.get("connector_status", "")
        return result201.StatusNotification()

    @on("Authorize")
    def on_authorize(self, id_token: dict[str, Any], **kw: Any) -> Any:
        return result201.Authorize(id_token_info={"status": self.sim.tag_status(id_token["id_token"])})

    @on("TransactionEvent")
    def on_tx(self, **kw: Any) -> Any:
        tok = kw.get("id_token")
        return result201.TransactionEvent(
            id_token_info={"status": self.sim.tag_status(tok["id_token"])} if tok else None)

    @on("MeterValues")
    def on_meter(self, **kw: Any) -> Any:
        return result201.MeterValues()

    @on("NotifyReport")
    def on_report(self, **kw: Any) -> Any:
        return result201.NotifyReport()

    @on("NotifyEvent")
    def on_event(self, **kw: Any) -> Any:
        return result201.NotifyEvent()

    @on("SecurityEventNotification")
    def on_security(self, **kw: Any) -> Any:
        return result201.SecurityEventNotification()

    @on("FirmwareStatusNotification")
    def on_fw(self, **kw: Any) -> Any:
        return result201.FirmwareStatusNotification()

    @on("LogStatusNotification")
    def on_log(self, **kw: Any) -> Any:
        return result201.LogStatusNotification()

    @on("DataTransfer")
    def on_data(self, **kw: Any) -> Any:
        return result201.DataTransfer(status="UnknownVendorId")


@dataclass
class Session:
    """One transaction as the backend saw it."""

    cp: str
    transaction_id: str
    id_tag: str | None = None
    meter_start: float | None = None
    meter_stop: float | None = None
    started: str | None = None
    stopped: str | None = None
    meter_values: list[float] = field(default_factory=list)  # Energy.Active.Import.Register in Wh, in arrival order
    messages: list[str] = field(default_factory=list)  # actions in arrival order
    problems: list[str] = field(default_factory=list)


class BackendSim:
    def __init__(self, db: Path | str, host: str = "127.0.0.1", port: int = 0, password: str | None = None,
                 ssl_context: ssl.SSLContext | None = None, heartbeat_s: int = 300) -> None:
        self.recorder = Recorder(db)
        self.host = host
        self.port = port
        self.password = password
        self.ssl_context = ssl_context
        self.heartbeat_s = heartbeat_s
        self.server: Server | None = None
        self.control: Server | None = None
        self.cps: dict[str, Backend16 | Backend201] = {}
        self.conns: dict[str, ServerConnection] = {}
        self.connected: dict[str, asyncio.Event] = {}
        self.status: dict[str, str] = {}
        self.rejected_tags: set[str] = set()
        self.connects: dict[str, int] = {}
        self.auth_users: dict[str, str | None] = {}
        self.hosts: dict[str, str | None] = {}  # HTTP Host header per charge point
        self.answered: dict[tuple[str, str], str] = {}  # (charge point, message id) -> answer frame
        self.replays = 0

    def tag_status(self, tag: str) -> str:
        return "Invalid" if tag in self.rejected_tags else "Accepted"

    @property
    def url(self) -> str:
        return f"{'wss' if self.ssl_context else 'ws'}://{self.host}:{self.port}/ocpp"

    async def start(self) -> None:
        self.server = await serve(self._handler, self.host, self.port, ssl=self.ssl_context,
                                  subprotocols=["ocpp1.6", "ocpp2.0.1"],  # type: ignore[list-item]
                                  process_request=self._auth, ping_interval=None)
        self.port = next(iter(self.server.sockets)).getsockname()[1]

    async def go_away(self) -> None:
        """Stop listening and drop every connection (the backend is unreachable)."""
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)
            self.server = None
        for ev in self.connected.values():
            ev.clear()

    async def come_back(self) -> None:
        if self.server is None:
            await self.start()

    async def stop(self) -> None:
        await self.go_away()
        if self.control is not None:
            self.control.close()
            await self.control.wait_closed()

    def _auth(self, conn: ServerConnection, request: Request) -> Response | None:
        auth = request.headers.get("Authorization", "")
        user = None
        pw = None
        if auth.startswith("Basic "):
            with contextlib.suppress(ValueError):
                user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
        cp = urllib.parse.unquote(request.path.rstrip("/").rsplit("/", 1)[-1])
        self.auth_users[cp] = user
        self.hosts[cp] = request.headers.get("Host")
        if self.password is not None and (pw != self.password or user != cp):
            return conn.respond(401, "bad credentials\n")
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        cp_id = urllib.parse.unquote(ws.request.path.rstrip("/").rsplit("/", 1)[-1]) if ws.request else "?"
        cls = Backend201 if ws.subprotocol == "ocpp2.0.1" else Backend16
        cp = cls(cp_id, ws, response_timeout=15)
        cp.recorder = self.recorder
        cp.sim = self
        self.cps[cp_id] = cp
        self.conns[cp_id] = ws
        self.connects[cp_id] = self.connects.get(cp_id, 0) + 1
        self.connected.setdefault(cp_id, asyncio.Event()).set()
        try:
            await cp.start()
        except ConnectionClosed:
            pass
        finally:
            if self.conns.get(cp_id) is ws:
                self.connected[cp_id].clear()
                self.conns.pop(cp_id, None)

    async def wait_connected(self, cp: str, wait_s: float = 10.0) -> None:
        await asyncio.wait_for(self.connected.setdefault(cp, asyncio.Event()).wait(), wait_s)

    async def call(self, cp_id: str, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Send ``action`` to charge point ``cp_id`` and return the answer (camelCase dict)."""
        cp = self.cps[cp_id]
        mod = call201 if isinstance(cp, Backend201) else call16
        req = getattr(mod, action)(**camel_to_snake_case(payload))
        res = await cp.call(req, suppress=False)
        return dict(snake_to_camel_case(remove_nones(serialize_as_dict(res))))

    # -- what was recorded -----------------------------------------------------------------------
    def frames(self, cp: str | None = None, direction: str | None = None) -> list[tuple[str, str, list[Any]]]:
        q = "SELECT cp, dir, raw FROM frames"
        cond, args = [], []
        if cp is not None:
            cond.append("cp = ?")
            args.append(cp)
        if direction is not None:
            cond.append("dir = ?")
            args.append(direction)
        if cond:
            q += " WHERE " + " AND ".join(cond)
        out = []
        for c, d, raw in self.recorder.db.execute(q + " ORDER BY id", args):
            try:
                out.append((c, d, json.loads(raw)))
            except ValueError:
                out.append((c, d, [None, None, raw]))
        return out

    def calls(self, cp: str | None = None, action: str | None = None) -> list[tuple[str, str, dict[str, Any]]]:
        """Incoming CALLs (cp, unique id, payload), in arrival order."""
        return [(c, m[1], m[3]) for c, _, m in self.frames(cp, "in")
                if isinstance(m, list) and len(m) == 4 and m[0] == 2 and (action is None or m[2] == action)]

    def errors_sent(self) -> list[list[Any]]:
        """CALLERRORs this backend sent (schema violations of the charge points)."""
        return [m for _, _, m in self.frames(direction="out") if isinstance(m, list) and m and m[0] == 4]

    def transactions(self, cp: str) -> list[Session]:
        """Reconstruct the sessions of ``cp`` from the recorded frames (1.6 and 2.0.1)."""
        frames = self.frames(cp)
        answers = {m[1]: m for _, d, m in frames if d == "out" and isinstance(m, list) and m and m[0] in (3, 4)}
        seen_ids: set[str] = set()
        sessions: dict[str, Session] = {}
        order: list[str] = []
        for _, d, m in frames:
            if d != "in" or not (isinstance(m, list) and len(m) == 4 and m[0] == 2):
                continue
            uid, action, pl = m[1], m[2], m[3]
            dup = uid in seen_ids
            seen_ids.add(uid)
            if action == "StartTransaction":
                ans = answers.get(uid)
                if not ans or ans[0] != 3:
                    continue
                tid = str(ans[2]["transactionId"])
                s = sessions[tid] = Session(cp, tid, pl.get("idTag"), pl.get("meterStart"), started=pl.get("timestamp"))
                s.messages.append(action)
                order.append(tid)
                if dup:
                    s.problems.append(f"StartTransaction message id {uid} received twice")
            elif action in ("MeterValues", "StopTransaction") and "transactionId" in pl:
                tid = str(pl["transactionId"])
                s = sessions.get(tid) or sessions.setdefault(tid, Session(cp, tid, problems=["no start"]))
                if dup:
                    s.problems.append(f"{action} message id {uid} received twice")
                if s.stopped is not None:
                    s.problems.append(f"{action} after StopTransaction")
                s.messages.append(action)
                values = pl.get("meterValue", []) if action == "MeterValues" else pl.get("transactionData", [])
                for mv in values:
                    for sv in mv.get("sampledValue", []):
                        if sv.get("measurand", "Energy.Active.Import.Register") == "Energy.Active.Import.Register" \
                                and not sv.get("phase") and action == "MeterValues":
                            s.meter_values.append(_wh(sv["value"], sv.get("unit")))
                if action == "StopTransaction":
                    s.meter_stop = pl["meterStop"]
                    s.stopped = pl["timestamp"]
            elif action == "TransactionEvent":
                info = pl["transactionInfo"]
                tid = str(info["transactionId"])
                ev = pl["eventType"]
                s = sessions.get(tid)
                if s is None:
                    s = sessions[tid] = Session(cp, tid, (pl.get("idToken") or {}).get("idToken"))
                    order.append(tid)
                    if ev != "Started":
                        s.problems.append("no Started event")
                if dup:
                    s.problems.append(f"TransactionEvent message id {uid} received twice")
                if s.stopped is not None:
                    s.problems.append("event after Ended")
                s.messages.append(f"TransactionEvent.{ev}")
                energy = [_wh(sv["value"], (sv.get("unitOfMeasure") or {}).get("unit"))
                          for mv in pl.get("meterValue", []) for sv in mv.get("sampledValue", [])
                          if sv.get("measurand", "Energy.Active.Import.Register") == "Energy.Active.Import.Register"
                          and not sv.get("phase")]
                if ev == "Started":
                    s.started = pl["timestamp"]
                    s.meter_start = energy[0] if energy else None
                elif ev == "Ended":
                    s.stopped = pl["timestamp"]
                    s.meter_stop = energy[-1] if energy else None
                else:
                    s.meter_values.extend(energy)
        for s in sessions.values():
            seq = [s.meter_start] + s.meter_values + ([s.meter_stop] if s.meter_stop is not None else [])
            nums = [x for x in seq if x is not None]
            if any(b < a for a, b in itertools.pairwise(nums)):
                s.problems.append(f"energy register not monotonic: {nums}")
        return [sessions[t] for t in order]

    # -- control over HTTP -----------------------------------------------------------------------
    async def start_control(self, port: int, host: str = "127.0.0.1") -> None:
        async def never(ws: ServerConnection) -> None:
            await ws.close()

        self.control = await serve(never, host, port, process_request=self._control)

    async def _control(self, conn: ServerConnection, request: Request) -> Response:
        u = urllib.parse.urlsplit(request.path)
        q = dict(urllib.parse.parse_qsl(u.query))
        try:
            if u.path == "/status":
                body: Any = {"port": self.port, "listening": self.server is not None,
                             "connected": sorted(k for k, v in self.connected.items() if v.is_set()),
                             "status": self.status}
            elif u.path == "/down":
                await self.go_away()
                body = {"listening": False}
            elif u.path == "/up":
                await self.come_back()
                body = {"listening": True}
            elif u.path == "/messages":
                body = [{"cp": c, "dir": d, "msg": m} for c, d, m in self.frames(q.get("cp"))]
            elif u.path == "/transactions":  # of one charge point (?cp=ID), else of every one, each with its cp
                cps = [q["cp"]] if q.get("cp") else sorted({c for c, _, _ in self.frames()})
                body = [s.__dict__ for c in cps for s in self.transactions(c)]
            elif u.path == "/call":
                missing = [k for k in ("cp", "action") if not q.get(k)]
                if missing:
                    return conn.respond(400, f"/call needs the query parameters {' and '.join(missing)}, e.g. "
                                             "/call?cp=ID&action=RemoteStartTransaction&payload={...}\n")
                body = await self.call(q["cp"], q["action"], json.loads(q.get("payload", "{}")))
            else:
                return conn.respond(404, "unknown path\n")
        except Exception as e:
            return conn.respond(400, f"{type(e).__name__}: {e}\n")
        resp = conn.respond(200, json.dumps(body, default=str) + "\n")
        resp.headers["Content-Type"] = "application/json"
        return resp


def _wh(value: Any, unit: str | None) -> float:
    x = float(value)
    return x * 1000 if unit == "kWh" else x


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="ocpp_gateway.backend_sim", description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--db", default="backend-sim.sqlite")
    ap.add_argument("--control-port", type=int, default=None, help="HTTP control (default: port + 1)")
    ap.add_argument("--password", default=None, help="require this Basic password from every charge point")
    ap.add_argument("--cert", default=None, help="TLS certificate (PEM); with --key: wss")
    ap.add_argument("--key", default=None)
    args = ap.parse_args(argv)
    ctx = None
    if args.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)

    async def run() -> None:
        sim = BackendSim(args.db, args.host, args.port, password=args.password, ssl_context=ctx)
        await sim.start()
        cport = args.control_port or args.port + 1
        await sim.start_control(cport, args.host)
        print(f"backend simulator on {sim.url}/<charge box id>, control http://{args.host}:{cport}/status",
              flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
