"""An OCPP wallbox (1.6J or 2.0.1) with a car model, built on the ``ocpp`` library.

The wallbox connects to a central system, boots, reports its connectors' status, and when a car
is plugged in starts a transaction (StartTransaction / TransactionEvent Started), sends the energy
register periodically and stops the transaction when the car leaves. It obeys SetChargingProfile
(TxDefaultProfile, TxProfile, ChargePointMaxProfile; stack levels, validTo, numberPhases): the
car draws ``min(limit, car maximum)`` on ``min(car phases, EVSE phases, profile phases)`` phases,
nothing below 6 A, and the energy register integrates the draw (reported in whole Wh).

Transaction messages are queued in memory while the connection is down and sent in order, with
the same message id on a repeat, as a real wallbox does. Everything sent and received is kept in
``sent`` / ``received`` for tests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import ssl
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import ocpp.messages
from ocpp.charge_point import remove_nones, serialize_as_dict
from ocpp.routing import on
from ocpp.v16 import ChargePoint as CP16
from ocpp.v16 import call as call16
from ocpp.v16 import call_result as result16
from ocpp.v201 import ChargePoint as CP201
from ocpp.v201 import call as call201
from ocpp.v201 import call_result as result201
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from ocpp_gateway.sim import schema

logging.getLogger("ocpp").setLevel(logging.WARNING)
# the library validates every message in the default thread pool (two hand-overs of the GIL per message, each
# up to the 5 ms switch interval on a busy machine): 100 simulated wallboxes answering a burst of
# SetChargingProfile took seconds, in order, one after the other. Validated inline it is the same check.
ocpp.messages.ASYNC_VALIDATION = False
# and compiled: the library's interpreted jsonschema was most of the simulators' CPU (ocpp_gateway/sim/schema.py);
# the library's key conversions (camelCase <-> snake_case, regular expressions per key) remembered per key
schema.install()

NOMINAL_V = 230.0
IEC_MIN_A = 6.0


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _parse(s: str | None) -> datetime | None:
    if not s:
        return None
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


INTERVAL_16, MEASURANDS_16 = "MeterValueSampleInterval", "MeterValuesSampledData"
INTERVAL_201, MEASURANDS_201 = "TxUpdatedInterval", "TxUpdatedMeasurands"


def conv_num(x: float) -> str:
    """A configuration value as a wallbox writes it: whole seconds without a fraction."""
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass
class Car:
    plugged: bool = False
    phases: int = 3
    max_current_a: float = 16.0


@dataclass
class SimProfile:
    id: int
    stack: int
    purpose: str
    limit: float
    phases: int | None
    valid_to: datetime | None
    tx: str | None = None


@dataclass
class SimConnector:
    n: int
    evse_id: str
    phases: int = 3
    max_current_a: float = 16.0
    phase_rotation: list[int] = field(default_factory=lambda: [1, 2, 3])
    energy_wh: float = 0.0
    car: Car = field(default_factory=Car)
    profiles: list[SimProfile] = field(default_factory=list)
    tx_key: str | None = None  # the sim's own key of the running transaction
    remote_tag: str | None = None
    operative: bool = True
    status: str = "Available"
    finishing: bool = False

    def limit_a(self, now: datetime | None = None) -> tuple[float, int]:
        """The current the wallbox offers now (and the phase count) from its profiles."""
        now = now or datetime.now(UTC)
        # of each purpose the valid profile with the highest stack level (the first of equal ones), in one pass:
        # the simulators' physics asks this several times per wallbox and tick (a third of their CPU with lists)
        top: dict[str, SimProfile] = {}
        for x in self.profiles:
            if (x.valid_to is not None and now >= x.valid_to) or (x.purpose == "TxProfile" and self.tx_key is None):
                continue
            best = top.get(x.purpose)
            if best is None or x.stack > best.stack:
                top[x.purpose] = x
        tx = top.get("TxProfile") or top.get("TxDefaultProfile")
        mx = top.get("ChargePointMaxProfile")
        limit, phases = self.max_current_a, self.phases
        for prof in (tx, mx):
            if prof is not None:
                limit = min(limit, prof.limit)
                if prof.phases:
                    phases = min(phases, prof.phases)
        if not self.operative:
            limit = 0.0
        return max(0.0, limit), phases

    def draw(self) -> list[float]:
        """Per EVSE phase what the car draws."""
        if not self.car.plugged or self.tx_key is None or self.finishing:
            return [0.0, 0.0, 0.0]
        limit, phases = self.limit_a()
        if limit < IEC_MIN_A:
            return [0.0, 0.0, 0.0]
        a = min(limit, self.car.max_current_a)
        k = max(1, min(self.car.phases, phases, self.phases))
        return [a if i < k else 0.0 for i in range(3)]

    def grid_draw(self) -> list[float]:
        out = [0.0, 0.0, 0.0]
        for i, a in enumerate(self.draw()[: len(self.phase_rotation)]):
            out[self.phase_rotation[i] - 1] += a
        return out

    def register(self) -> int:
        return int(self.energy_wh)


@dataclass
class _TxMsg:
    action: str
    build: Callable[[], dict[str, Any]]
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    tx_key: str | None = None
    on_result: Callable[[dict[str, Any]], None] | None = None


class _Handlers16(CP16):
    sim: WallboxSim

    @on("SetChargingProfile")
    def on_set_profile(self, connector_id: int, cs_charging_profiles: dict[str, Any], **kw: Any) -> Any:
        self.sim.received.append(("SetChargingProfile", {"connectorId": connector_id,
                                                          "csChargingProfiles": cs_charging_profiles}))
        return result16.SetChargingProfile(status=self.sim.set_profile(connector_id, cs_charging_profiles))

    @on("ClearChargingProfile")
    def on_clear(self, **kw: Any) -> Any:
        self.sim.received.append(("ClearChargingProfile", kw))
        return result16.ClearChargingProfile(status=self.sim.clear_profiles(kw.get("id"), kw.get("connector_id")))

    @on("RemoteStartTransaction")
    def on_remote_start(self, id_tag: str, connector_id: int | None = None, **kw: Any) -> Any:
        self.sim.received.append(("RemoteStartTransaction", {"idTag": id_tag, "connectorId": connector_id}))
        return result16.RemoteStartTransaction(status=self.sim.remote_start(connector_id or 1, id_tag))

    @on("RemoteStopTransaction")
    def on_remote_stop(self, transaction_id: int, **kw: Any) -> Any:
        self.sim.received.append(("RemoteStopTransaction", {"transactionId": transaction_id}))
        return result16.RemoteStopTransaction(status=self.sim.remote_stop(str(transaction_id)))

    @on("Reset")
    def on_reset(self, type: str, **kw: Any) -> Any:
        self.sim.received.append(("Reset", {"type": type}))
        return result16.Reset(status="Accepted")

    @on("ChangeAvailability")
    def on_availability(self, connector_id: int, type: str, **kw: Any) -> Any:
        self.sim.received.append(("ChangeAvailability", {"connectorId": connector_id, "type": type}))
        return result16.ChangeAvailability(status=self.sim.availability(connector_id, type == "Operative"))

    @on("UnlockConnector")
    def on_unlock(self, connector_id: int, **kw: Any) -> Any:
        self.sim.received.append(("UnlockConnector", {"connectorId": connector_id}))
        ok = connector_id in self.sim.connectors
        return result16.UnlockConnector(status="Unlocked" if ok else "NotSupported")

    @on("GetConfiguration")
    def on_get_config(self, key: list[str] | None = None, **kw: Any) -> Any:
        self.sim.received.append(("GetConfiguration", {"key": key}))
        keys = key or list(self.sim.configuration)
        known = [{"key": k, "readonly": False, "value": self.sim.configuration[k]} for k in keys
                 if k in self.sim.configuration]
        unknown = [k for k in keys if k not in self.sim.configuration]
        return result16.GetConfiguration(configuration_key=known, unknown_key=unknown or None)

    @on("ChangeConfiguration")
    def on_change_config(self, key: str, value: str, **kw: Any) -> Any:
        self.sim.received.append(("ChangeConfiguration", {"key": key, "value": value}))
        if key not in self.sim.configuration:
            return result16.ChangeConfiguration(status="NotSupported")
        if key in self.sim.readonly:
            return result16.ChangeConfiguration(status="Rejected")
        self.sim.configuration[key] = value
        return result16.ChangeConfiguration(status="Accepted")

    @on("TriggerMessage")
    def on_trigger(self, requested_message: str, connector_id: int | None = None, **kw: Any) -> Any:
        self.sim.received.append(("TriggerMessage", {"requestedMessage": requested_message,
                                                     "connectorId": connector_id}))
        return result16.TriggerMessage(status=self.sim.trigger(requested_message, connector_id))

    @on("DataTransfer")
    def on_data(self, **kw: Any) -> Any:
        return result16.DataTransfer(status="UnknownVendorId")


class _Handlers201(CP201):
    sim: WallboxSim

    @on("SetChargingProfile")
    def on_set_profile(self, evse_id: int, charging_profile: dict[str, Any], **kw: Any) -> Any:
        self.sim.received.append(("SetChargingProfile", {"evseId": evse_id, "chargingProfile": charging_profile}))
        return result201.SetChargingProfile(status=self.sim.set_profile(evse_id, charging_profile))

    @on("ClearChargingProfile")
    def on_clear(self, **kw: Any) -> Any:
        self.sim.received.append(("ClearChargingProfile", kw))
        return result201.ClearChargingProfile(status=self.sim.clear_profiles(kw.get("charging_profile_id"), None))

    @on("RequestStartTransaction")
    def on_remote_start(self, id_token: dict[str, Any], remote_start_id: int, evse_id: int | None = None,
                        **kw: Any) -> Any:
        self.sim.received.append(("RequestStartTransaction", {"idToken": id_token, "evseId": evse_id}))
        return result201.RequestStartTransaction(status=self.sim.remote_start(evse_id or 1, id_token["id_token"]))

    @on("RequestStopTransaction")
    def on_remote_stop(self, transaction_id: str, **kw: Any) -> Any:
        self.sim.received.append(("RequestStopTransaction", {"transactionId": transaction_id}))
        return result201.RequestStopTransaction(status=self.sim.remote_stop(transaction_id))

    @on("Reset")
    def on_reset(self, type: str, **kw: Any) -> Any:
        self.sim.received.append(("Reset", {"type": type}))
        return result201.Reset(status="Accepted")

    @on("ChangeAvailability")
    def on_availability(self, operational_status: str, evse: dict[str, Any] | None = None, **kw: Any) -> Any:
        self.sim.received.append(("ChangeAvailability", {"operationalStatus": operational_status, "evse": evse}))
        n = (evse or {}).get("id", 0)
        return result201.ChangeAvailability(status=self.sim.availability(n, operational_status == "Operative"))

    @on("UnlockConnector")
    def on_unlock(self, evse_id: int, connector_id: int, **kw: Any) -> Any:
        self.sim.received.append(("UnlockConnector", {"evseId": evse_id, "connectorId": connector_id}))
        return result201.UnlockConnector(status="Unlocked" if evse_id in self.sim.connectors else "UnknownConnector")

    @on("GetVariables")
    def on_get_variables(self, get_variable_data: list[dict[str, Any]], **kw: Any) -> Any:
        self.sim.received.append(("GetVariables", {"getVariableData": get_variable_data}))
        out = []
        for item in get_variable_data:
            name = item["variable"]["name"]
            val = self.sim.configuration.get(name)
            r: dict[str, Any] = {"attribute_status": "Accepted" if val is not None else "UnknownVariable",
                                 "component": item["component"], "variable": item["variable"]}
            if val is not None:
                r["attribute_value"] = val
            out.append(r)
        return result201.GetVariables(get_variable_result=out)

    @on("SetVariables")
    def on_set_variables(self, set_variable_data: list[dict[str, Any]], **kw: Any) -> Any:
        self.sim.received.append(("SetVariables", {"setVariableData": set_variable_data}))
        out = []
        for item in set_variable_data:
            name = item["variable"]["name"]
            ok = name in self.sim.configuration
            if ok and name not in self.sim.readonly:
                self.sim.configuration[name] = item["attribute_value"]
            out.append({"attribute_status": ("Rejected" if name in self.sim.readonly else "Accepted") if ok
                        else "UnknownVariable",
                        "component": item["component"], "variable": item["variable"]})
        return result201.SetVariables(set_variable_result=out)

    @on("TriggerMessage")
    def on_trigger(self, requested_message: str, evse: dict[str, Any] | None = None, **kw: Any) -> Any:
        self.sim.received.append(("TriggerMessage", {"requestedMessage": requested_message, "evse": evse}))
        return result201.TriggerMessage(status=self.sim.trigger(requested_message, (evse or {}).get("id")))

    @on("DataTransfer")
    def on_data(self, **kw: Any) -> Any:
        return result201.DataTransfer(status="UnknownVendorId")


class WallboxSim:
    """One wallbox: ``connectors`` by connector (1.6) / EVSE (2.0.1) number."""

    def __init__(self, cbid: str, url: str, connectors: list[SimConnector], *, version: str = "1.6",
                 password: str | None = None, ssl_context: ssl.SSLContext | None = None,
                 meter_interval_s: float = 10.0, tick_s: float = 0.2, heartbeat_s: float = 300.0,
                 on_change: Callable[[SimConnector], None] | None = None, vendor: str = "chargegate-sim",
                 measurands: str = "Energy.Active.Import.Register,Power.Active.Import,Current.Import",
                 readonly: frozenset[str] = frozenset(), triggers: bool = True,
                 status_on_reconnect: bool = True) -> None:
        self.cbid = cbid
        self.url = url.rstrip("/") + "/" + cbid
        self.version = version
        self.password = password
        self.ssl_context = ssl_context
        self.connectors = {c.n: c for c in connectors}
        self.tick_s = tick_s
        self.vendor = vendor
        # 1.6 keys; a 2.0.1 wallbox has the sampling in SampledDataCtrlr's TxUpdatedInterval/TxUpdatedMeasurands
        interval_key, measurands_key = ((INTERVAL_16, MEASURANDS_16) if version == "1.6"
                                        else (INTERVAL_201, MEASURANDS_201))
        self.configuration: dict[str, str] = {interval_key: conv_num(meter_interval_s),
                                              measurands_key: measurands,
                                              "HeartbeatInterval": str(int(heartbeat_s)),
                                              "NumberOfConnectors": str(len(connectors))}
        self.readonly = readonly  # configuration keys it refuses to change (Rejected)
        self.triggers = triggers  # whether it sends MeterValues on TriggerMessage
        # whether it sends every connector's status after a reconnect (some send it only on a change)
        self.status_on_reconnect = status_on_reconnect
        self.on_change = on_change
        self.cp: _Handlers16 | _Handlers201 | None = None
        self.ws: ClientConnection | None = None
        self.connected = asyncio.Event()
        self.booted = asyncio.Event()
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.sent: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = []  # action, payload, answer
        self.tx_ids: dict[str, str] = {}  # sim tx key -> transaction id (1.6: from the central system)
        self._txq: deque[_TxMsg] = deque()
        self._tx_wake = asyncio.Event()
        self._seq: dict[str, int] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._bg: set[asyncio.Future[Any]] = set()
        self._stop = False
        self.connects = 0
        self.refused: str | None = None

    @property
    def meter_interval_s(self) -> float:
        try:
            x = float(self.configuration.get(INTERVAL_16) or self.configuration.get(INTERVAL_201) or "10")
        except ValueError:
            return 10.0
        return max(0.1, x) if x > 0 else 0.0  # 0: no periodic MeterValues

    def sends_currents(self) -> bool:
        have = self.configuration.get(MEASURANDS_16) or self.configuration.get(MEASURANDS_201) or ""
        return "Current.Import" in [m.strip() for m in have.split(",")]

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run()), asyncio.create_task(self._physics()),
                       asyncio.create_task(self._meter_loop())]

    async def stop(self) -> None:
        self._stop = True
        for t in self._tasks:
            t.cancel()
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def drop_connection(self) -> None:
        """Close the websocket (the wallbox reconnects by itself)."""
        if self.ws is not None:
            await self.ws.close()

    async def _run(self) -> None:
        delay = 0.2
        while not self._stop:
            headers = {}
            if self.password is not None:
                headers["Authorization"] = "Basic " + base64.b64encode(f"{self.cbid}:{self.password}".encode()).decode()
            proto = "ocpp1.6" if self.version == "1.6" else "ocpp2.0.1"
            try:
                ws = await connect(self.url, subprotocols=[proto], additional_headers=headers,  # type: ignore[list-item]
                                   proxy=None, ssl=self.ssl_context, open_timeout=5, ping_interval=None)
            except (OSError, InvalidHandshake, TimeoutError, ssl.SSLError) as e:
                self.refused = repr(e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.2
            self.refused = None
            self.connects += 1
            cls = _Handlers16 if self.version == "1.6" else _Handlers201
            cp = cls(self.cbid, ws, response_timeout=10)
            cp.sim = self
            self.cp, self.ws = cp, ws
            self.connected.set()
            reader = asyncio.create_task(cp.start())
            online = asyncio.create_task(self._online())
            try:
                await asyncio.wait({reader, online}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self.connected.clear()
                self.booted.clear()
                for t in (reader, online):
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError, ConnectionClosed, Exception):
                        await t
                self.cp = None
                with contextlib.suppress(Exception):
                    await ws.close()
            await asyncio.sleep(0.1)

    async def _online(self) -> None:
        if self.connects == 1 or not self.booted.is_set():
            if self.version == "1.6":
                await self.call("BootNotification", {"chargePointVendor": self.vendor, "chargePointModel": "sim",
                                                     "chargePointSerialNumber": self.cbid[:25],
                                                     "firmwareVersion": "1.0"})
            else:
                await self.call("BootNotification", {"reason": "PowerUp", "chargingStation": {
                    "vendorName": self.vendor, "model": "sim", "serialNumber": self.cbid[:25]}})
        self.booted.set()
        if self.connects == 1 or self.status_on_reconnect:
            for c in self.connectors.values():
                await self.send_status(c)
        hb = asyncio.create_task(self._heartbeat())
        try:
            await self._deliver()
        finally:
            hb.cancel()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(float(self.configuration.get("HeartbeatInterval", "300")))
            with contextlib.suppress(Exception):
                await self.call("Heartbeat", {})

    # -- calls ----------------------------------------------------------------------------------
    async def call(self, action: str, payload: dict[str, Any], unique_id: str | None = None) -> dict[str, Any]:
        cp = self.cp
        if cp is None:
            raise ConnectionError("not connected")
        mod = call16 if self.version == "1.6" else call201
        req = getattr(mod, action)(**schema.camel_to_snake_case(payload))
        res = await cp.call(req, suppress=False, unique_id=unique_id)
        answer = dict(schema.snake_to_camel_case(remove_nones(serialize_as_dict(res))))
        self.sent.append((action, payload, answer))
        return answer

    async def send_status(self, c: SimConnector, *, after_boot: bool = False) -> None:
        """Send connector ``c``'s status (once booted; ``after_boot``: wait up to 10 s for the boot)."""
        if after_boot and not self.booted.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.booted.wait(), 10.0)
        status = self._status16(c)
        c.status = status
        if not self.booted.is_set():
            return
        try:
            if self.version == "1.6":
                await self.call("StatusNotification", {"connectorId": c.n, "status": status, "errorCode": "NoError",
                                                       "timestamp": now_iso()})
            else:
                cs = {"Available": "Available", "Unavailable": "Unavailable", "Faulted": "Faulted"}.get(status,
                                                                                                       "Occupied")
                await self.call("StatusNotification", {"timestamp": now_iso(), "connectorStatus": cs, "evseId": c.n,
                                                       "connectorId": 1})
        except Exception:  # sent again after the next connect
            return

    def _status16(self, c: SimConnector) -> str:
        if not c.operative and c.tx_key is None:
            return "Unavailable"
        if not c.car.plugged:
            return "Available"
        if c.finishing or c.tx_key is None:
            return "Finishing" if c.finishing else "Preparing"
        if any(c.draw()):
            return "Charging"
        limit, _ = c.limit_a()
        return "SuspendedEVSE" if limit < IEC_MIN_A else "SuspendedEV"

    def _changed(self, c: SimConnector) -> None:
        self._status_changed(c)
        if self.on_change is not None:
            self.on_change(c)

    def _status_changed(self, c: SimConnector) -> bool:
        new = self._status16(c)
        if new == c.status:
            return False
        c.status = new
        self._spawn(self.send_status(c))
        if self.version != "1.6" and c.tx_key is not None and new in ("Charging", "SuspendedEV", "SuspendedEVSE"):
            self._charging_state_changed(c, new)
        return True

    # -- transaction messages (queued, in order) -------------------------------------------------
    def _queue(self, msg: _TxMsg) -> None:
        self._txq.append(msg)
        self._tx_wake.set()

    async def _deliver(self) -> None:
        while True:
            if not self._txq:
                self._tx_wake.clear()
                await self._tx_wake.wait()
                continue
            msg = self._txq[0]
            try:
                res = await self.call(msg.action, msg.build(), unique_id=msg.uid)
            except TimeoutError:
                continue
            except ConnectionClosed:
                return
            except Exception as e:  # a CALLERROR: the central system refused it
                self.sent.append((msg.action, {}, {"error": repr(e)}))
                await asyncio.sleep(0.5)
                continue
            self._txq.popleft()
            if msg.on_result is not None:
                msg.on_result(res)

    def _spawn(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    def _tx_id(self, key: str) -> Any:
        tid = self.tx_ids[key]
        return int(tid) if self.version == "1.6" else tid

    def pending_tx_messages(self) -> int:
        return len(self._txq)

    def _start_tx(self, c: SimConnector, tag: str, trigger: str = "Authorized") -> None:
        key = uuid.uuid4().hex
        c.tx_key = key
        c.finishing = False
        meter = c.register()
        ts = now_iso()
        if self.version == "1.6":
            payload = {"connectorId": c.n, "idTag": tag, "meterStart": meter, "timestamp": ts}

            def got(res: dict[str, Any]) -> None:
                self.tx_ids[key] = str(res["transactionId"])

            self._queue(_TxMsg("StartTransaction", lambda: payload, tx_key=key, on_result=got))
        else:
            self.tx_ids[key] = key
            self._seq[key] = 0
            payload2 = {"eventType": "Started", "timestamp": ts, "triggerReason": trigger, "seqNo": 0,
                        "transactionInfo": {"transactionId": key, "chargingState": "EVConnected"},
                        "idToken": {"idToken": tag, "type": "ISO14443"}, "evse": {"id": c.n, "connectorId": 1},
                        "meterValue": [{"timestamp": ts, "sampledValue": [{
                            "value": meter, "measurand": "Energy.Active.Import.Register",
                            "context": "Transaction.Begin", "unitOfMeasure": {"unit": "Wh"}}]}]}
            self._queue(_TxMsg("TransactionEvent", lambda: payload2, tx_key=key))
        self._changed(c)

    def _meter_tx(self, c: SimConnector, triggered: bool = False) -> None:
        # a value taken for a TriggerMessage has the context "Trigger" (1.6 ReadingContext, 2.0.1
        # ReadingContextEnumType; its TransactionEvent the triggerReason "Trigger")
        ctx = "Trigger" if triggered else "Sample.Periodic"
        key = c.tx_key
        if key is None:
            return
        ts = now_iso()
        draw = c.draw()
        meter = c.register()
        power = round(sum(draw) * NOMINAL_V, 1)
        if self.version == "1.6":
            values = [{"value": str(meter), "measurand": "Energy.Active.Import.Register", "unit": "Wh",
                       "context": ctx},
                      {"value": str(power), "measurand": "Power.Active.Import", "unit": "W",
                       "context": ctx}]
            values += [{"value": str(a), "measurand": "Current.Import", "unit": "A", "phase": f"L{i + 1}",
                        "context": ctx} for i, a in enumerate(draw[: c.phases]) if self.sends_currents()]
            self._queue(_TxMsg("MeterValues", lambda: {"connectorId": c.n, "transactionId": self._tx_id(key),
                                                       "meterValue": [{"timestamp": ts, "sampledValue": values}]},
                               tx_key=key))
        else:
            self._seq[key] += 1
            seq = self._seq[key]
            vals2 = [{"value": meter, "measurand": "Energy.Active.Import.Register", "context": ctx,
                      "unitOfMeasure": {"unit": "Wh"}},
                     {"value": power, "measurand": "Power.Active.Import", "context": ctx,
                      "unitOfMeasure": {"unit": "W"}}]
            vals2 += [{"value": a, "measurand": "Current.Import", "phase": f"L{i + 1}", "context": ctx,
                       "unitOfMeasure": {"unit": "A"}} for i, a in enumerate(draw[: c.phases]) if self.sends_currents()]
            state = "Charging" if any(draw) else "SuspendedEVSE"
            reason = "Trigger" if triggered else "MeterValuePeriodic"
            payload = {"eventType": "Updated", "timestamp": ts, "triggerReason": reason, "seqNo": seq,
                       "transactionInfo": {"transactionId": key, "chargingState": state},
                       "evse": {"id": c.n, "connectorId": 1},
                       "meterValue": [{"timestamp": ts, "sampledValue": vals2}]}
            self._queue(_TxMsg("TransactionEvent", lambda: payload, tx_key=key))

    def _charging_state_changed(self, c: SimConnector, status16: str) -> None:
        """2.0.1: a TransactionEvent Updated (ChargingStateChanged) without meter values, as stations send."""
        key = c.tx_key
        assert key is not None
        self._seq[key] += 1
        payload = {"eventType": "Updated", "timestamp": now_iso(), "triggerReason": "ChargingStateChanged",
                   "seqNo": self._seq[key], "transactionInfo": {"transactionId": key, "chargingState": status16},
                   "evse": {"id": c.n, "connectorId": 1}}
        self._queue(_TxMsg("TransactionEvent", lambda: payload, tx_key=key))

    def _stop_tx(self, c: SimConnector, reason: str) -> None:
        key = c.tx_key
        if key is None:
            return
        c.tx_key = None
        c.profiles = [x for x in c.profiles if x.purpose != "TxProfile"]
        meter = c.register()
        ts = now_iso()
        if self.version == "1.6":
            self._queue(_TxMsg("StopTransaction", lambda: {"transactionId": self._tx_id(key), "meterStop": meter,
                                                           "timestamp": ts, "reason": reason}, tx_key=key))
        else:
            self._seq[key] += 1
            reason2 = {"EVDisconnected": "EVDisconnected", "Remote": "Remote", "Local": "Local"}.get(reason, "Other")
            payload = {"eventType": "Ended", "timestamp": ts, "seqNo": self._seq[key],
                       "triggerReason": "RemoteStop" if reason == "Remote" else "EVCommunicationLost",
                       "transactionInfo": {"transactionId": key, "stoppedReason": reason2, "chargingState": "Idle"},
                       "evse": {"id": c.n, "connectorId": 1},
                       "meterValue": [{"timestamp": ts, "sampledValue": [{
                           "value": meter, "measurand": "Energy.Active.Import.Register",
                           "context": "Transaction.End", "unitOfMeasure": {"unit": "Wh"}}]}]}
            self._queue(_TxMsg("TransactionEvent", lambda: payload, tx_key=key))
        self._changed(c)

    # -- the car ----------------------------------------------------------------------------------
    def plug(self, n: int = 1, phases: int = 3, max_current_a: float = 16.0, id_tag: str | None = None) -> None:
        c = self.connectors[n]
        self._tick(c)
        c.car = Car(True, phases, max_current_a)
        c.finishing = False
        tag = c.remote_tag or id_tag or "SIMTAG"
        c.remote_tag = None
        if c.tx_key is None and c.operative:
            self._start_tx(c, tag, "CablePluggedIn")
        self._changed(c)

    def unplug(self, n: int = 1) -> None:
        c = self.connectors[n]
        self._tick(c)
        c.car = Car(False, c.car.phases, c.car.max_current_a)
        if c.tx_key is not None:
            self._stop_tx(c, "EVDisconnected")
        c.finishing = False
        self._changed(c)

    def _tick(self, c: SimConnector, dt: float | None = None) -> None:
        now = asyncio.get_running_loop().time()
        last = getattr(c, "_last", None)
        c._last = now  # type: ignore[attr-defined]
        if last is not None:
            c.energy_wh += sum(c.draw()) * NOMINAL_V * (now - last) / 3600.0

    async def _physics(self) -> None:
        # every tick: the energy integrates and the status follows the car; the draw observers (on_change) hear
        # of a tick only when what the wallbox offers may have changed (a profile ran out) or a second passed:
        # commands (profiles, plug, availability) notify them at once themselves. Calling them every tick for
        # 100 wallboxes cost the simulator process a fifth of a core, taken from the system it simulates for.
        loop = asyncio.get_running_loop()
        seen: dict[int, tuple[Any, float]] = {}
        while True:
            now = datetime.now(UTC)
            mono = loop.time()
            for c in self.connectors.values():
                self._tick(c)
                key = (c.limit_a(now), sum(1 for x in c.profiles if x.valid_to is None or now < x.valid_to),
                       c.car.plugged, c.car.phases, c.car.max_current_a, c.tx_key, c.finishing, c.operative,
                       self.connected.is_set())
                last = seen.get(c.n)
                if last is None or last[0] != key or mono - last[1] >= 1.0:
                    seen[c.n] = (key, mono)
                    self._changed(c)
                elif self._status_changed(c) and self.on_change is not None:
                    self.on_change(c)
            await asyncio.sleep(self.tick_s)

    async def _meter_loop(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            # short naps: a new interval (ChangeConfiguration/SetVariables) applies at once
            iv = self.meter_interval_s
            await asyncio.sleep(min(0.5, iv) if iv > 0 else 0.5)
            if iv <= 0 or loop.time() - last < iv - 1e-3:
                continue
            last = loop.time()
            for c in self.connectors.values():
                if c.tx_key is not None:
                    self._meter_tx(c)

    # -- commands from the central system --------------------------------------------------------
    def set_profile(self, n: int, d: dict[str, Any]) -> str:
        sched = d["charging_schedule"]
        if isinstance(sched, list):
            sched = sched[0]
        if sched["charging_rate_unit"] != "A":
            return "Rejected"
        periods = sorted(sched["charging_schedule_period"], key=lambda x: x["start_period"])
        first = periods[0]
        prof = SimProfile(id=int(d.get("charging_profile_id", d.get("id", 0))), stack=int(d["stack_level"]),
                          purpose=d["charging_profile_purpose"].replace("ChargingStation", "ChargePoint"),
                          limit=float(first["limit"]), phases=first.get("number_phases"),
                          valid_to=_parse(d.get("valid_to")))
        targets = list(self.connectors.values()) if n == 0 else ([self.connectors[n]] if n in self.connectors else [])
        if not targets:
            return "Rejected"
        for c in targets:
            self._tick(c)
            c.profiles = [x for x in c.profiles if x.id != prof.id and not (x.stack == prof.stack and
                                                                            x.purpose == prof.purpose)]
            c.profiles.append(prof)
            self._changed(c)
        return "Accepted"

    def clear_profiles(self, pid: int | None, n: int | None) -> str:
        found = False
        for c in self.connectors.values():
            if n not in (None, 0) and c.n != n:
                continue
            before = len(c.profiles)
            c.profiles = [x for x in c.profiles if pid is not None and x.id != pid]
            found = found or len(c.profiles) != before
            self._changed(c)
        return "Accepted" if found else "Unknown"

    def remote_start(self, n: int, tag: str) -> str:
        c = self.connectors.get(n)
        if c is None or c.tx_key is not None or not c.operative:
            return "Rejected"
        if c.car.plugged:
            asyncio.get_running_loop().call_soon(self._start_tx, c, tag, "RemoteStart")
        else:
            c.remote_tag = tag
        return "Accepted"

    def remote_stop(self, tid: str) -> str:
        for c in self.connectors.values():
            if c.tx_key is not None and self.tx_ids.get(c.tx_key) == tid:
                def stop(c: SimConnector = c) -> None:
                    self._stop_tx(c, "Remote")
                    c.finishing = c.car.plugged
                    self._changed(c)

                asyncio.get_running_loop().call_soon(stop)
                return "Accepted"
        return "Rejected"

    def availability(self, n: int, operative: bool) -> str:
        targets = list(self.connectors.values()) if n == 0 else ([self.connectors[n]] if n in self.connectors else [])
        if not targets:
            return "Rejected"
        scheduled = False
        for c in targets:
            c.operative = operative
            scheduled = scheduled or (c.tx_key is not None and not operative)
            self._changed(c)
        return "Scheduled" if scheduled else "Accepted"

    def trigger(self, what: str, n: int | None) -> str:
        targets = [self.connectors[n]] if n in self.connectors else list(self.connectors.values())
        loop = asyncio.get_running_loop()
        if what == "StatusNotification":
            # an accepted trigger is always followed by the message (OCPP 1.6 TriggerMessage, 2.0.1 F06), also when
            # it arrives before this side has read the answer to its own BootNotification
            for c in targets:
                loop.call_soon(lambda c=c: self._spawn(self.send_status(c, after_boot=True)))
            return "Accepted"
        if what == "MeterValues":
            if not self.triggers:
                return "Rejected"
            for c in targets:
                loop.call_soon(self._meter_tx, c, True)
            return "Accepted"
        if what == "Heartbeat":
            loop.call_soon(lambda: self._spawn(self.call("Heartbeat", {})))
            return "Accepted"
        return "NotImplemented"

    # -- for tests and the draw topic ---------------------------------------------------------
    def draw_state(self, c: SimConnector) -> dict[str, Any]:
        """The ``<root>/sim/<evse_id>/draw`` payload (same keys as evse-poller's simulators, plus OCPP ones)."""
        self._tick(c)
        limit, phases = c.limit_a()
        draw = c.draw()
        now = datetime.now(UTC)
        # a setpoint is a profile with an end; without one the wallbox runs on a safe/fallback profile
        setpoint = [x for x in c.profiles if x.stack > 0 and x.purpose == "TxDefaultProfile"
                    and x.valid_to is not None and now < x.valid_to]
        return {"evse_id": c.evse_id, "ts": now.isoformat(), "plugged": c.car.plugged,
                "car_phases": c.car.phases, "car_max_current_a": c.car.max_current_a,
                "state": "A" if not c.car.plugged else ("C" if any(draw) else "B"),
                "enabled": c.operative, "limit_a": round(limit, 3), "limit_phases": phases,
                "commanded_a": setpoint[-1].limit if setpoint else None, "fallback": not setpoint,
                "evse_current_a": [round(x, 3) for x in draw],
                "grid_current_a": [round(x, 3) for x in c.grid_draw()],
                "phase_rotation": list(c.phase_rotation), "energy_wh": round(c.energy_wh, 3),
                "power_w": round(sum(draw) * NOMINAL_V, 1),
                "transaction": self.tx_ids.get(c.tx_key) if c.tx_key else None, "online": self.connected.is_set(),
                "source": "ocpp-sim"}


def profile_valid_until(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()
