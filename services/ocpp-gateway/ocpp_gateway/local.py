"""The local central system for OCPP wallboxes (1.6J and 2.0.1, ws or wss, Basic auth, client certs).

Only configured charge box ids are accepted. Each configured connector is an EVSE on the bus
(``evse/<id>/status``, ``source: ocpp-gateway``) and, when the backend is enabled, an upstream
charge point of its own; this module is the :class:`~ocpp_gateway.upstream.Driver` for it.

Setpoints become TxDefaultProfiles (A per phase, numberPhases): a stack level 0 profile with the
EVSE's safe current and no end, installed after every connect and boot, and a stack level 1
profile with the setpoint whose ``validTo`` is the setpoint's ``valid_until``; when it expires
the wallbox falls back to level 0 by itself, and the gateway also sends the safe current
explicitly.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import math
import random
import ssl
import time
import urllib.parse
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from chargegate import payloads as p
from chargegate import setpoints
from chargegate.bus import Bus
from chargegate.config import Config, Evse
from chargegate.ratelog import LogLimiter
from chargegate.supervise import Tasks
from ocpp_gateway import conv, passthrough
from ocpp_gateway.rpc import SUBPROTOCOL, SUBPROTOCOL_OF, OcppRpc, RpcError, Version, is_transaction_message
from ocpp_gateway.txqueue import TxQueue, TxRow
from ocpp_gateway.upstream import UpstreamCP

log = structlog.get_logger("ocpp_gateway.local")

BASE_PROFILE_ID = 1000
SETPOINT_PROFILE_ID = 2000
ACK_EMPTY_16 = {"SecurityEventNotification", "LogStatusNotification", "SignedFirmwareStatusNotification",
                "DiagnosticsStatusNotification", "FirmwareStatusNotification"}
ACK_EMPTY_201 = {"NotifyReport", "NotifyEvent", "SecurityEventNotification", "LogStatusNotification",
                 "FirmwareStatusNotification", "NotifyMonitoringReport", "NotifyChargingLimit",
                 "ClearedChargingLimit", "NotifyCustomerInformation", "NotifyDisplayMessages",
                 "PublishFirmwareStatusNotification", "ReportChargingProfiles", "NotifyEVChargingSchedule"}


AUTH_CACHE_S = 600.0  # a backend's Authorize answer is reused this long for the start that follows it
AUTH_CACHE_MAX = 256


@dataclass
class Box:
    """A configured OCPP wallbox (one charge box id, one or more connectors)."""

    cbid: str
    connectors: dict[int, Connector]
    password: str | None
    version: Version | None
    session: WallboxSession | None = None
    info: dict[str, str] = field(default_factory=dict)
    # the backend's recent answers to Authorize, by tag: (status, monotonic time); bounded (oldest out)
    auth_cache: OrderedDict[str, tuple[str, float]] = field(default_factory=OrderedDict)

    def remember_authorization(self, tag: str, status: str) -> None:
        self.auth_cache[tag] = (status, time.monotonic())
        self.auth_cache.move_to_end(tag)
        while len(self.auth_cache) > AUTH_CACHE_MAX:
            self.auth_cache.popitem(last=False)

    def cached_authorization(self, tag: str) -> str | None:
        """The backend's answer for ``tag`` when it is younger than AUTH_CACHE_S (the wallbox's Authorize
        right before its StartTransaction / TransactionEvent: asked once, not twice)."""
        hit = self.auth_cache.get(tag)
        if hit is None or time.monotonic() - hit[1] > AUTH_CACHE_S:
            return None
        return hit[0]


class Connector:
    """One connector of an OCPP wallbox = one EVSE: state on the bus, driver for the backend."""

    kind = "ocpp"

    def __init__(self, evse: Evse, csms: LocalCsms) -> None:
        assert evse.ocpp is not None
        self.evse = evse
        self.csms = csms
        self.cbid = evse.ocpp.charge_box_id
        self.n = evse.ocpp.connector_id
        self.up: UpstreamCP | None = None
        self.status16 = "Unavailable"
        self.error16 = "NoError"
        # the wallbox has told its status since the gateway started or it (re)connected: until then the status
        # on the bus says not reachable, so the load controller assumes it draws what it was last allowed
        self.confirmed = False
        self.status_reported_at = 0.0  # monotonic time of the wallbox's last own StatusNotification
        self.drawing = False  # MeterValues since the last StatusNotification show a car drawing current
        self.info: str | None = None
        self.charging_state: str | None = None  # 2.0.1
        self.energy_wh: Decimal | None = None
        self.power_w: Decimal | None = None
        self.current_a: list[float] = [0.0, 0.0, 0.0]
        self.measured_at = datetime.now(UTC)  # when current_a was measured (MeterValues) or known 0 (status)
        self.meter_values_at = time.monotonic()  # the last MeterValues with currents (or the status change)
        self._triggered_at: float | None = None
        self._watch: asyncio.Task[None] | None = None
        self.tx: str | None = None
        self.local_tx: dict[str, Any] | None = None  # session without upstream (backend disabled)
        self.signed: list[p.SignedMeterValue] = []  # the session's signed meter data (bus status)
        self.setpoint: p.Setpoint | None = None
        self.applied: p.AppliedSetpoint | None = None
        self.installed: tuple[float, int, datetime | None] | None = None  # (A, phases, validTo) at the wallbox
        self.base_installed = False
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._reject_logged = False
        self.log = log.bind(evse_id=evse.id, charge_box_id=self.cbid, connector_id=self.n)

    @property
    def box(self) -> Box:
        return self.csms.boxes[self.cbid]

    @property
    def online(self) -> bool:
        return self.box.session is not None

    def start(self) -> None:
        if self.up is not None:
            row = self.up.queue.open_tx(self.evse.id)
            self.tx = row.tx if row else None
        tasks, ids = self.csms.tasks, {"evse_id": self.evse.id, "charge_box_id": self.cbid}
        self._task = tasks.spawn(f"apply:{self.evse.id}", self._apply_loop, **ids)
        if self.csms.config.ocpp.local.meter_values_interval_s > 0:
            self._watch = tasks.spawn(f"meter-watch:{self.evse.id}", self._meter_watch, **ids)
        self.publish()

    def close(self) -> None:
        for t in (self._task, self._watch):
            if t is not None:
                t.cancel()

    # -- bus status -------------------------------------------------------------------------------
    def publish(self) -> None:
        connected = self.online
        online = connected and self.confirmed
        if not online:
            state, iec = p.EvseState.OFFLINE, None
        elif self.drawing and self.status16 != "Charging":
            # MeterValues show a car drawing current, whatever the last StatusNotification said
            state, iec = p.EvseState.CHARGING, p.IecState.C
        else:
            state, iec = conv.STATUS_16.get(self.status16, (p.EvseState.UNAVAILABLE, None))
        session = None
        row = self.up.queue.tx(self.tx) if (self.up is not None and self.tx) else None
        # the wallbox's numbers go to the backend as they are; on the bus only what is plausible (a negative
        # or absurd register is not an energy: left out, counted)
        energy_now = self._plausible(self.energy_wh, 0.0, p.MAX_ENERGY_WH)
        if row is not None or self.local_tx is not None:
            if row is not None:
                sid, started, e0_raw, tag = (row.local_id or row.tx), row.started, row.meter_start, row.id_tag
                last = row.meter_last
            else:
                assert self.local_tx is not None
                sid, started, e0_raw = str(self.local_tx["id"]), self.local_tx["started"], self.local_tx["meter_start"]
                tag, last = self.local_tx["id_tag"], None
            e0 = self._plausible(e0_raw, 0.0, p.MAX_ENERGY_WH)
            energy = energy_now if energy_now is not None else self._plausible(last, 0.0, p.MAX_ENERGY_WH)
            charged = min(p.MAX_ENERGY_WH, max(0.0, energy - e0)) if energy is not None and e0 is not None else 0.0
            session = p.Session(id=(sid or "-")[:64], started=_dt(started), energy_start_wh=e0, energy_wh=charged,
                                id_tag=tag[:64] if tag else None, signed_meter_values=list(self.signed))
        charging = state == p.EvseState.CHARGING
        phases_in_use = sum(1 for a in self.current_a if a > 0.5) if charging else 0
        # currents and power come from the last MeterValues, which may be a whole sample interval old:
        # an EVSE that is not charging draws nothing, whatever its last sample said (a load controller
        # that subtracts a stale current from its grid meter would underestimate the other loads)
        current = [max(0.0, min(1000.0, a)) if math.isfinite(a) else 1000.0 for a in self.current_a] \
            if charging else [0.0, 0.0, 0.0]
        power_now = self._plausible(self.power_w, -10_000_000.0, 10_000_000.0)
        power = (power_now if charging else 0.0) if power_now is not None else None
        st = p.EvseStatus(
            evse_id=self.evse.id, online=online, state=state, iec_state=iec,
            raw_state=self.status16 if online else None,
            phases_in_use=phases_in_use, current_a=current, measured_at=self.measured_at if charging else None,
            power_w=power,
            energy_wh=energy_now,
            session=session, applied=self.applied if online else None,
            reason=None if online else ("wallbox not connected" if not connected else
                                        "status not yet confirmed since the wallbox connected: asked it"),
            flags=[f"error:{self.error16}"] if self.error16 not in ("NoError", "") else [],
            source="ocpp-gateway")
        self.csms.publish_status(self.evse.id, st)

    def _plausible(self, x: Any, lo: float, hi: float) -> float | None:
        """``x`` as a float when it is a finite number in [lo, hi], else None (counted)."""
        if x is None:
            return None
        try:
            f = float(x)
        except (TypeError, ValueError, ArithmeticError):
            f = math.nan
        if math.isfinite(f) and lo <= f <= hi:
            return f
        self.csms.counters["implausible_meter_value"] += 1
        self.csms.log_once(f"implausible:{self.cbid}", "wallbox reports an implausible meter value: forwarded to the "
                           "backend as sent, left out of the bus status", charge_box_id=self.cbid, value=str(x)[:40],
                           range=[lo, hi])
        return None

    def set_status16(self, status16: str, error16: str = "NoError", info: str | None = None, *,
                     raw: dict[str, Any] | None = None, derived: bool = False) -> None:
        """The connector's status. ``raw``: the wallbox's StatusNotification (forwarded as it is to a backend
        of the same version); ``derived``: worked out here (from a 2.0.1 chargingState, a connector 0
        status): it goes up only to a backend of the other version, which needs it translated."""
        self.confirmed = True
        if raw is not None:
            self.status_reported_at = time.monotonic()
        self.drawing = False
        if status16 != "Charging":
            self.current_a = [0.0, 0.0, 0.0]  # no energy flows; the next MeterValues tells when it does again
            self.measured_at = datetime.now(UTC)
            self.meter_values_at = time.monotonic()
        self.status16, self.error16, self.info = status16, error16, info
        self.publish()
        if self.up is not None:
            if self.same_version():
                if raw is not None:
                    self.up.set_status(status16, error16, info,
                                       raw=passthrough.up(self.up.version, "StatusNotification", raw, self.n))
                elif not derived:
                    self.up.set_status(status16, error16, info)
            else:
                self.up.set_status(status16, error16, info)

    def keep_signed(self, samples: list[conv.Sample], *, new_session: bool = False) -> bool:
        """Keep the signed meter data of the session for the bus status (begin and end always, then the
        latest); the upstream queue keeps all of it, durably. True when there was some."""
        if new_session:
            self.signed = []
        found = conv.signed_values(samples)
        for d in found:
            try:
                sv = p.SignedMeterValue(**d)
            except ValueError:
                self.csms.counters["signed_meter_values_not_kept"] += 1
                continue
            self.signed.append(sv)
        while len(self.signed) > p.MAX_SIGNED_PER_SESSION:
            i = next((k for k, x in enumerate(self.signed)
                      if x.context not in ("Transaction.Begin", "Transaction.End")), 0)
            del self.signed[i]
        return bool(found)

    def update_readings(self, samples: list[conv.Sample]) -> None:
        r = conv.readings(samples)
        self.meter_values_at = time.monotonic()  # not late (with or without currents: a trigger gives no more)
        if r.energy_wh is not None:
            self.energy_wh = r.energy_wh
        if r.power_w is not None:
            self.power_w = r.power_w
        if any(a is not None for a in r.current_a):
            self.current_a = [float(a) if a is not None else 0.0 for a in r.current_a]
            self.measured_at = datetime.now(UTC)  # on arrival: the wallbox's clock may be off
            if max(self.current_a) >= DRAWING_A:
                self.drawing = True
                self.confirmed = True
        elif self.status16 == "Charging" and r.energy_wh is not None:
            self.csms.counters["meter_values_without_currents"] += 1
            self.csms.log_once(f"no-currents:{self.cbid}", "wallbox sends MeterValues without phase currents "
                               "(Current.Import): the load controller counts its draw as other load",
                               charge_box_id=self.cbid)

    async def _meter_watch(self) -> None:
        """While charging, the load controller needs the car's current every ``meter_values_interval_s``:
        when a wallbox's MeterValues are late (it ignored the interval asked for, or has none), ask for
        them with TriggerMessage, at most once per interval."""
        iv = self.csms.config.ocpp.local.meter_values_interval_s
        late_s = 1.5 * iv + 1.0
        while True:
            await asyncio.sleep(max(0.5, iv / 2))
            sess = self.box.session
            now = time.monotonic()
            if (sess is None or not sess.ready or self.status16 != "Charging" or now - self.meter_values_at < late_s
                    or (self._triggered_at is not None and now - self._triggered_at < iv)):
                continue
            self._triggered_at = now
            self.csms.counters["meter_values_triggered"] += 1
            try:
                res = str((await sess.rpc.call("TriggerMessage", _trigger_payload(sess.version, "MeterValues", self.n),
                                               timeout_s=max(1.0, min(10.0, iv)))).get("status"))
            except (RpcError, TimeoutError) as e:
                res = repr(e)
            except ConnectionClosed:
                continue
            if res != "Accepted":
                self.csms.counters["meter_values_trigger_refused"] += 1
                self.csms.log_once(f"trigger-refused:{self.cbid}", "wallbox sends its MeterValues late and does "
                                   "not send them on request: the load controller counts its draw as other load "
                                   "while they are old", charge_box_id=self.cbid, answer=res)

    # -- setpoints -> charging profiles -----------------------------------------------------------
    def on_setpoint(self, sp: p.Setpoint) -> None:
        now = datetime.now(UTC)
        if setpoints.clamped(sp, now):
            self.csms.counters["setpoints_from_the_future"] += 1
            self.log.warning("setpoint dated in the future: taken as of now", ts=sp.ts.isoformat(),
                             valid_until=sp.valid_until.isoformat())
        sp = setpoints.on_arrival(sp, now, self.csms.config.controller.setpoint_validity_s)
        if setpoints.out_of_order(sp, self.setpoint, now):
            self.csms.counters["setpoints_out_of_order"] += 1
            return  # older than what we have
        self.setpoint = sp
        self._dirty.set()

    def reapply(self) -> None:
        """After connect/boot: install both profiles again."""
        self.base_installed = False
        self.installed = None
        self._dirty.set()

    def desired(self, now: datetime) -> tuple[float, int, datetime | None, bool]:
        sp = self.setpoint
        if sp is not None and not sp.expired(now):
            amps = min(sp.current_a, self.evse.max_current_a)
            phases = 1 if self.evse.phases == 1 else sp.phases
            return amps, phases, sp.valid_until, False
        return self.evse.safe_current_a, self.evse.phases, None, True

    async def _apply_loop(self) -> None:
        while True:
            now = datetime.now(UTC)
            wait = 30.0
            sp = self.setpoint
            if sp is not None and not sp.expired(now):
                wait = max(0.05, min(wait, (sp.valid_until - now).total_seconds() + 0.01))
            if self.installed is not None and self.installed[2] is not None:
                # refresh before the installed profile runs out
                left = (self.installed[2] - now).total_seconds()
                wait = max(0.05, min(wait, left / 2))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), wait)
            # cleared before applying, not before waiting: a setpoint that arrives while a profile
            # is being installed sets the flag again and is applied on the next round, not lost
            self._dirty.clear()
            sess = self.box.session
            if sess is None or not sess.ready:
                continue
            try:
                await self._apply(sess)
            except asyncio.CancelledError:
                raise
            except ConnectionClosed:
                # the wallbox went away while its profile was being installed: nothing failed here, the
                # next connection gets the setpoint in force (installed is reset when a session starts)
                self.log.info("wallbox disconnected while its setpoint was applied")
                continue
            except Exception as e:  # logged, retried on the next round
                self.csms.counters["setpoint_apply_failed"] += 1
                if not self._reject_logged:
                    self._reject_logged = True
                    self.log.warning("could not apply the setpoint to the wallbox", error=repr(e))
                await asyncio.sleep(1.0)

    async def _apply(self, sess: WallboxSession) -> None:
        now = datetime.now(UTC)
        sp = self.setpoint  # the one installed now: a newer one may arrive while the wallbox answers
        amps, phases, until, fallback = self.desired(now)
        if not self.base_installed:
            ok = await sess.set_profile(self.n, BASE_PROFILE_ID + self.n, 0, self.evse.safe_current_a,
                                        self.evse.phases, None)
            self.base_installed = ok
        inst = self.installed
        need = inst is None or abs(inst[0] - _amps(amps)) > 1e-9 or inst[1] != phases or (
            inst[2] is None) != (until is None)
        if not need and inst is not None and until is not None and inst[2] is not None:
            # the same current with a later end: refresh the wallbox's profile once it has used up more than
            # REFRESH_USED of what the new setpoint gives. The controller refreshes a setpoint when half of
            # its validity is left, so with one half here a refresh that arrived a little early was skipped
            # and the profile ran on to its last second before the next: a wallbox slow to answer (500 on one
            # simulator) fell back to its safe current - 6 A for a paused one - before the new profile landed
            left = (inst[2] - now).total_seconds()
            total = (until - now).total_seconds()
            need = left < total * (1 - REFRESH_USED) or left < 2
        if not need:
            return
        ok = await sess.set_profile(self.n, SETPOINT_PROFILE_ID + self.n, 1, amps, phases, until)
        if ok:
            self.installed = (_amps(amps), phases, until)
            self._reject_logged = False
            # the sequence number of the setpoint this profile carries, not of one that came in meanwhile (its
            # own profile follows on the next round: the flag is set again)
            self.applied = p.AppliedSetpoint(current_a=_amps(amps), phases=phases,
                                             seq=sp.seq if sp is not None and not fallback else None,
                                             source=sp.source if sp is not None and not fallback else None,
                                             fallback=fallback)
            self.csms.counters["profiles_sent"] += 1
            self.publish()
        else:
            self.csms.counters["profiles_rejected"] += 1
            if not self._reject_logged:
                self._reject_logged = True
                self.log.warning("wallbox rejected the charging profile")
            await asyncio.sleep(1.0)
            self._dirty.set()

    # -- Driver (calls from the backend) -----------------------------------------------------------
    def _sess(self) -> WallboxSession:
        s = self.box.session
        if s is None:
            raise RpcError("GenericError", f"wallbox {self.cbid} is not connected")
        return s

    async def _call(self, action: str, payload: dict[str, Any]) -> dict[str, Any] | None:
        s = self.box.session
        if s is None:
            return None
        try:
            return await s.rpc.call(action, payload, timeout_s=min(20.0, self.csms.config.ocpp.local.call_timeout_s))
        except (RpcError, TimeoutError, ConnectionClosed) as e:
            self.log.warning("wallbox did not carry out a backend request", action=action, error=repr(e))
            return None

    async def remote_start(self, id_tag: str, remote_start_id: int | None = None) -> bool:
        """``remote_start_id``: the 2.0.1 backend's, passed on to a 2.0.1 wallbox unchanged (its Started
        then carries it back)."""
        s = self.box.session
        if s is None:
            return False
        if s.version == "1.6":
            res = await self._call("RemoteStartTransaction", {"connectorId": self.n, "idTag": id_tag[:20]})
        else:
            rsid = remote_start_id if remote_start_id is not None else random.randint(1, 2**31 - 1)
            res = await self._call("RequestStartTransaction", {
                "idToken": {"idToken": id_tag[:36], "type": "Central"}, "remoteStartId": rsid, "evseId": self.n})
        return bool(res and res.get("status") == "Accepted")

    async def remote_stop(self, tx: TxRow) -> bool:
        s = self.box.session
        if s is None or tx.local_id is None:
            return False
        if s.version == "1.6":
            if not tx.local_id.isdigit():
                return False
            res = await self._call("RemoteStopTransaction", {"transactionId": int(tx.local_id)})
        else:
            res = await self._call("RequestStopTransaction", {"transactionId": tx.local_id})
        return bool(res and res.get("status") == "Accepted")

    async def availability(self, operative: bool) -> str:
        s = self.box.session
        if s is None:
            return "Rejected"
        if s.version == "1.6":
            res = await self._call("ChangeAvailability", {"connectorId": self.n,
                                                          "type": "Operative" if operative else "Inoperative"})
        else:
            res = await self._call("ChangeAvailability", {"operationalStatus": "Operative" if operative else
                                                          "Inoperative", "evse": {"id": self.n}})
        return str(res["status"]) if res else "Rejected"

    async def reset(self, hard: bool) -> str:
        s = self.box.session
        if s is None:
            return "Rejected"
        if s.version == "1.6":
            res = await self._call("Reset", {"type": "Hard" if hard else "Soft"})
        else:
            res = await self._call("Reset", {"type": "Immediate" if hard else "OnIdle"})
        return str(res["status"]) if res else "Rejected"

    async def unlock(self) -> str:
        s = self.box.session
        if s is None:
            return "UnlockFailed"
        if s.version == "1.6":
            res = await self._call("UnlockConnector", {"connectorId": self.n})
        else:
            res = await self._call("UnlockConnector", {"evseId": self.n, "connectorId": 1})
        if not res:
            return "UnlockFailed"
        st = str(res["status"])
        return st if st in ("Unlocked", "UnlockFailed", "NotSupported") else "UnlockFailed"

    async def trigger(self, what: str) -> str | None:
        s = self.box.session
        if s is None:
            return "Rejected"
        if what not in known_trigger(s.version):
            return "NotImplemented"
        res = await self._call("TriggerMessage", _trigger_payload(s.version, what, self.n))
        return str(res["status"]) if res else "Rejected"

    @property
    def single(self) -> bool:
        """The wallbox has this one configured connector (then connector 0 is this charge point's too)."""
        return len(self.box.connectors) == 1

    def same_version(self) -> bool:
        """The wallbox speaks its upstream charge point's OCPP version: messages pass unchanged (see
        :mod:`ocpp_gateway.passthrough`)."""
        s = self.box.session
        return s is not None and self.up is not None and s.version == self.up.version

    async def forward(self, version: Version, action: str, payload: dict[str, Any]) -> dict[str, Any] | None:
        """A backend call for the wallbox, passed on as it was sent (connector / EVSE ids mapped), and the
        wallbox's answer as it gave it. None when the versions differ or the wallbox is not connected (the
        caller answers or translates); a CALLERROR of the wallbox is passed on as it is."""
        s = self.box.session
        if s is None or s.version != version or action not in passthrough.DOWN[version]:
            return None
        try:
            out = passthrough.down(version, action, payload, self.n, self.single)
        except passthrough.NoSuchConnector as e:
            raise RpcError("PropertyConstraintViolation", str(e)) from None
        try:
            res = await s.rpc.call(action, out, timeout_s=min(20.0, self.csms.config.ocpp.local.call_timeout_s))
        except TimeoutError:
            raise RpcError("GenericError", "the wallbox did not answer in time") from None
        except ConnectionClosed:
            raise RpcError("GenericError", "the wallbox disconnected") from None
        self.csms.counters["forwarded_to_wallbox"] += 1
        return passthrough.answer_up(version, action, res, self.n)

    async def passthrough(self, version: Version, action: str, payload: dict[str, Any]) -> dict[str, Any] | None:
        """Get/ChangeConfiguration, Get/SetVariables: forwarded when the versions match (None otherwise)."""
        if self.box.session is None:
            raise RpcError("GenericError", f"wallbox {self.cbid} is not connected")
        return await self.forward(version, action, payload)

    def boot_payload(self, version: Version) -> dict[str, Any] | None:
        """The wallbox's last BootNotification as it sent it, when it speaks ``version`` (kept durably)."""
        q = self.csms.queue.get_kv(f"boot-raw:{self.cbid}")
        if not q:
            return None
        import json

        try:
            saved = json.loads(q)
        except ValueError:
            return None
        return saved["payload"] if isinstance(saved, dict) and saved.get("version") == version else None

    def boot_info(self) -> dict[str, str]:
        info = dict(self.box.info)
        if not info:
            q = self.csms.queue.get_kv(f"boot:{self.cbid}")
            if q:
                import json

                info = json.loads(q)
        return info

    async def trigger_meter_values(self) -> None:
        await self.trigger("MeterValues")


DRAWING_A = 1.0  # a phase current from this on: a car is drawing
# a refreshed setpoint (same current, later end) is sent to the wallbox once its profile has used this share
# of what the new setpoint gives: with the controller refreshing at half the validity, every refresh goes out
# and the wallbox keeps about half the validity in hand (see Connector._apply)
REFRESH_USED = 0.4
STATUS_TRIGGER_RETRY_S = 2.0  # after a reconnect: the status trigger is repeated once when no status came


def _trigger_payload(version: Version, what: str, n: int) -> dict[str, Any]:
    """TriggerMessage for connector (1.6) / EVSE (2.0.1) ``n``."""
    payload: dict[str, Any] = {"requestedMessage": what}
    if version == "1.6":
        if what in ("StatusNotification", "MeterValues"):
            payload["connectorId"] = n
    elif what in ("StatusNotification", "MeterValues", "TransactionEvent"):
        payload["evse"] = {"id": n, "connectorId": 1} if what == "StatusNotification" else {"id": n}
    return payload


def _sampling_changes(interval: Any, measurands: Any, want: str) -> tuple[str | None, str | None]:
    """What to write so a wallbox samples at least every ``want`` seconds with the phase currents:
    (interval or None, measurand list or None). A wallbox that samples more often is left so (0 means
    never); a measurand list the wallbox did not report is left alone."""
    try:
        fast_enough = interval is not None and 0 < float(str(interval)) <= float(want)
    except ValueError:
        fast_enough = False
    new_measurands = None
    if isinstance(measurands, str):
        have = [m.strip() for m in measurands.split(",") if m.strip()]
        if conv.CURRENT not in have:
            new_measurands = ",".join([*have, conv.CURRENT])
    return (None if fast_enough else want), new_measurands


def _map_evse(item: dict[str, Any], to: int, only: int | None = None) -> dict[str, Any]:
    comp = item.get("component")
    if isinstance(comp, dict) and isinstance(comp.get("evse"), dict):
        ev = comp["evse"]
        if only is None or ev.get("id") == only:
            item = dict(item)
            item["component"] = dict(comp, evse=dict(ev, id=to))
    return item


def known_trigger(version: Version) -> set[str]:
    if version == "1.6":
        return {"BootNotification", "DiagnosticsStatusNotification", "FirmwareStatusNotification", "Heartbeat",
                "MeterValues", "StatusNotification"}
    return {"BootNotification", "LogStatusNotification", "FirmwareStatusNotification", "Heartbeat", "MeterValues",
            "SignChargingStationCertificate", "SignV2GCertificate", "StatusNotification", "TransactionEvent",
            "SignCombinedCertificate", "PublishFirmwareStatusNotification"}


def _amps(a: float) -> float:
    """1.6 limits are multiples of 0.1: round down so the wallbox never gets more than allowed."""
    return math.floor(a * 10 + 1e-9) / 10


def meter_values_digest(d: dict[str, Any]) -> str:
    """A 1.6 MeterValues' content (connector, transaction, every sampled value) as a short digest: the same
    message repeated by the wallbox has the same one, a new sample a different one."""
    text = json.dumps([d.get("connectorId"), d.get("transactionId"), d.get("meterValue")], sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _dt(s: str) -> datetime:
    try:
        d = datetime.fromisoformat(s.replace("Z", "+00:00"))
        return d if d.tzinfo else d.replace(tzinfo=UTC)
    except ValueError:
        return datetime.now(UTC)


class WallboxSession:
    """One connected OCPP wallbox."""

    def __init__(self, csms: LocalCsms, box: Box, ws: ServerConnection, version: Version) -> None:
        self.csms = csms
        self.box = box
        self.ws = ws
        self.version = version
        self.cbid = box.cbid
        self.booted = asyncio.Event()
        self.ready = False
        self.log = log.bind(charge_box_id=self.cbid, version=version)
        self.rpc = OcppRpc(ws, version, self.cbid, self.handle, counters=csms.counters,
                           rate=csms.config.ocpp.local.max_messages_per_s,
                           call_timeout=csms.config.ocpp.local.call_timeout_s, log=self.log)

    async def run(self) -> None:
        reader = asyncio.create_task(self.rpc.run())
        # per connection, but a failure must not leave the wallbox without its profiles (never "ready")
        starter = self.csms.tasks.spawn(f"start-profiles:{self.cbid}", self._start_profiles,
                                        expected=(ConnectionClosed,), charge_box_id=self.cbid)
        try:
            await reader
        finally:
            starter.cancel()

    async def _start_profiles(self) -> None:
        # a wallbox that reconnects without rebooting sends no BootNotification
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.booted.wait(), 2.0)
        self.ready = True
        for c in self.box.connectors.values():
            c.reapply()
        # what the gateway knew before (a restart, a reconnect) is not confirmed: ask at once
        asked_at = time.monotonic()
        asked = []
        for c in self.box.connectors.values():
            if not c.confirmed:
                self.csms.counters["status_triggered_on_connect"] += 1
                asked.append(c)
                answer = await c.trigger("StatusNotification")
                if answer != "Accepted" and not c.confirmed:
                    self.csms.log_once(f"status-trigger:{self.cbid}", "wallbox does not send its status on request: "
                                       "until it reports one, the load controller counts it at what it was last "
                                       "allowed", charge_box_id=self.cbid, answer=answer)
            if c.tx is not None or c.status16 == "Charging":
                await c.trigger("MeterValues")
        with contextlib.suppress(ConnectionClosed):
            await self.configure_sampling()
        # a wallbox that accepted the trigger but sent no StatusNotification (it lost it, e.g. while still
        # booting; MeterValues may have confirmed the state here, but the backend needs the wallbox's own
        # status): asked once more
        await asyncio.sleep(STATUS_TRIGGER_RETRY_S)
        for c in asked:
            if c.status_reported_at < asked_at and self.box.session is self:
                self.csms.counters["status_trigger_repeated"] += 1
                await c.trigger("StatusNotification")

    async def configure_sampling(self) -> dict[str, str]:
        """Ask the wallbox for MeterValues with the phase currents every ``meter_values_interval_s``.

        Reads the settings first and changes only what differs (1.6: MeterValueSampleInterval and
        MeterValuesSampledData; 2.0.1: SampledDataCtrlr TxUpdatedInterval and TxUpdatedMeasurands), so a
        wallbox that stores its configuration in flash is not written on every connect. Returns what was
        changed and the wallbox's answer; a refusal is logged once (the gateway then triggers MeterValues
        when they are late, see :meth:`Connector._meter_watch`)."""
        iv = self.csms.config.ocpp.local.meter_values_interval_s
        if iv <= 0:
            return {}
        want = str(max(1, round(iv)))
        timeout = min(20.0, self.csms.config.ocpp.local.call_timeout_s)
        done: dict[str, str] = {}
        try:
            if self.version == "1.6":
                res = await self.rpc.call("GetConfiguration",
                                          {"key": ["MeterValueSampleInterval", "MeterValuesSampledData"]},
                                          timeout_s=timeout)
                have = {str(k.get("key")): k.get("value") for k in res.get("configurationKey") or []
                        if isinstance(k, dict)}
                changes = _sampling_changes(have.get("MeterValueSampleInterval"), have.get("MeterValuesSampledData"),
                                            want)
                for key, value in (("MeterValueSampleInterval", changes[0]), ("MeterValuesSampledData", changes[1])):
                    if value is not None:
                        r = await self.rpc.call("ChangeConfiguration", {"key": key, "value": value}, timeout_s=timeout)
                        done[key] = str(r.get("status"))
            else:
                comp = {"name": "SampledDataCtrlr"}
                res = await self.rpc.call("GetVariables", {"getVariableData": [
                    {"component": comp, "variable": {"name": "TxUpdatedInterval"}},
                    {"component": comp, "variable": {"name": "TxUpdatedMeasurands"}}]}, timeout_s=timeout)
                have = {str(x["variable"]["name"]): x.get("attributeValue") for x in res.get("getVariableResult") or []
                        if isinstance(x, dict) and x.get("attributeStatus") == "Accepted"}
                changes = _sampling_changes(have.get("TxUpdatedInterval"), have.get("TxUpdatedMeasurands"), want)
                data = [{"component": comp, "variable": {"name": name}, "attributeValue": value}
                        for name, value in (("TxUpdatedInterval", changes[0]), ("TxUpdatedMeasurands", changes[1]))
                        if value is not None]
                if data:
                    r = await self.rpc.call("SetVariables", {"setVariableData": data}, timeout_s=timeout)
                    for x in r.get("setVariableResult") or []:
                        done[str(x["variable"]["name"])] = str(x.get("attributeStatus"))
        except (RpcError, TimeoutError, KeyError, TypeError, AttributeError, ValueError) as e:
            self.csms.counters["meter_sampling_not_configured"] += 1
            self.log.warning("could not set the wallbox's meter sampling; late MeterValues will be triggered",
                             error=repr(e), interval_s=want)
            return done
        refused = {k: v for k, v in done.items() if v not in ("Accepted", "RebootRequired")}
        if refused:
            self.csms.counters["meter_sampling_refused"] += 1
            self.log.warning("wallbox refused the meter sampling asked for; late MeterValues will be triggered",
                             answers=done, interval_s=want)
        elif done:
            self.log.info("wallbox meter sampling set", answers=done, interval_s=want)
        return done

    async def set_profile(self, n: int, pid: int, stack: int, amps: float, phases: int, until: datetime | None) -> bool:
        limit = _amps(amps)
        if self.version == "1.6":
            prof: dict[str, Any] = {
                "chargingProfileId": pid, "stackLevel": stack, "chargingProfilePurpose": "TxDefaultProfile",
                "chargingProfileKind": "Absolute",
                "chargingSchedule": {"chargingRateUnit": "A", "startSchedule": conv.iso(datetime.now(UTC) -
                                                                                       timedelta(seconds=1)),
                                     "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit,
                                                                 "numberPhases": phases}]}}
            if until is not None:
                prof["validTo"] = conv.iso(until)
            res = await self.rpc.call("SetChargingProfile", {"connectorId": n, "csChargingProfiles": prof})
        else:
            prof = {
                "id": pid, "stackLevel": stack, "chargingProfilePurpose": "TxDefaultProfile",
                "chargingProfileKind": "Absolute",
                "chargingSchedule": [{"id": pid, "chargingRateUnit": "A",
                                      "startSchedule": conv.iso(datetime.now(UTC) - timedelta(seconds=1)),
                                      "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit,
                                                                  "numberPhases": phases}]}]}
            if until is not None:
                prof["validTo"] = conv.iso(until)
            res = await self.rpc.call("SetChargingProfile", {"evseId": n, "chargingProfile": prof})
        return res.get("status") == "Accepted"

    # -- incoming --------------------------------------------------------------------------------
    def _connector(self, n: int | None) -> Connector | None:
        if n is None:
            return None
        c = self.box.connectors.get(n)
        if c is None:
            self.csms.counters["ocpp_unknown_connector"] += 1
            self.csms.log_once(f"unknown-connector:{self.cbid}:{n}", "message for a connector that is not configured",
                               charge_box_id=self.cbid, connector_id=n)
        return c

    async def handle(self, action: str, d: dict[str, Any]) -> dict[str, Any]:
        """The answer to the wallbox's ``action``. What it queued is on disk before the answer goes: its
        commits are fsynced by ``sync`` in a thread (with those of the other wallboxes waiting at the same
        time), not one by one on the event loop (:meth:`TxQueue.deferred_sync`)."""
        queue = self.csms.queue
        with queue.deferred_sync() as ticket:
            res = await self._dispatch(action, d)
        if ticket.written:
            await queue.sync(ticket.upto)  # its own commits (and all before them), not those that came after
        elif queue.unsynced and is_transaction_message(action, d):
            # a repeat answered from what is stored (nothing queued again): that may be a commit whose fsync
            # still runs (the first copy's, on a connection that dropped before its answer)
            await queue.sync()
        return res

    async def _dispatch(self, action: str, d: dict[str, Any]) -> dict[str, Any]:
        self.csms.counters[f"local_{action}"] += 1
        if action in passthrough.NOTIFY[self.version]:
            up = self._up_for(d)
            if up is not None:  # as the wallbox sent it; its answer (empty) is the gateway's, at once
                up.send_live(action, passthrough.up(self.version, action, d, up.evse_n))
            return {}
        if action in passthrough.ASK_OFFLINE[self.version]:
            up = self._up_for(d)
            res = await up.ask(action, passthrough.up(self.version, action, d, up.evse_n)) if up else None
            if res is None:
                self.csms.counters[f"answered_offline_{action}"] += 1
                return dict(passthrough.ASK_OFFLINE[self.version][action])
            return res
        if self.version == "1.6":
            return await self._handle16(action, d)
        return await self._handle201(action, d)

    def _up_for(self, d: dict[str, Any]) -> UpstreamCP | None:
        """The upstream charge point of the same version for a wallbox message that is not a connector's: the
        EVSE it names (``evseId``, ``connectorId``), else the wallbox's first connector's."""
        n = d.get("evseId", d.get("connectorId"))
        conns = [self.box.connectors[k] for k in sorted(self.box.connectors)]
        named = [c for c in conns if c.n == n]
        for c in named + conns:
            if c.up is not None and c.up.version == self.version:
                return c.up
        return None

    def _authorize_local(self, tag: str) -> str:
        lc = self.csms.config.ocpp.local
        if lc.free_charging or tag in lc.rfid_tags:
            return "Accepted"
        return "Invalid"

    async def _authorize(self, tag: str, *, cached: bool = False) -> str:
        """Local list first, then the backend. ``cached``: a recent answer of the backend for the same tag
        (the wallbox's own Authorize before a start) is the answer, without asking again."""
        status = self._authorize_local(tag)
        if status == "Accepted":
            return status
        if cached and (hit := self.box.cached_authorization(tag)) is not None:
            self.csms.counters["authorize_from_cache"] += 1
            return hit
        # not in the local list: ask the backend when it is there (as the wallbox's first EVSE)
        for c in self.box.connectors.values():
            up = c.up
            if up is not None and up.booted.is_set() and up.rpc is not None:
                try:
                    if up.version == "1.6":
                        res = await up.rpc.call("Authorize", {"idTag": tag[:20]}, timeout_s=10)
                        st = str(res["idTagInfo"]["status"])
                    else:
                        res = await up.rpc.call("Authorize", {"idToken": {"idToken": tag[:36], "type": "ISO14443"}},
                                                timeout_s=10)
                        st = str(res["idTokenInfo"]["status"])
                        st = st if st in ("Accepted", "Blocked", "Expired", "Invalid") else "Invalid"
                    self.box.remember_authorization(tag, st)
                    return st
                except (RpcError, TimeoutError, ConnectionClosed):
                    break
        return status

    async def _authorize_call(self, d: dict[str, Any]) -> dict[str, Any]:
        """The wallbox's Authorize. Accepted by the local list (``free_charging``, ``rfid_tags``): answered
        here. Otherwise it goes to the backend (as the wallbox's first EVSE) as the wallbox sent it, and the
        backend's answer is the wallbox's, as it gave it; across versions they are translated; without the
        backend the local list decides (README: authorization)."""
        key = "idTagInfo" if self.version == "1.6" else "idTokenInfo"
        tag = str(d["idTag"] if self.version == "1.6" else d["idToken"]["idToken"])
        status = self._authorize_local(tag)
        if status == "Accepted":
            return {key: {"status": status}}
        for c in [self.box.connectors[k] for k in sorted(self.box.connectors)]:
            up = c.up
            if up is None or not up.booted.is_set() or up.rpc is None:
                continue
            same = up.version == self.version
            if same:
                payload = d
            elif up.version == "1.6":
                payload = {"idTag": tag[:20]}
            else:
                payload = {"idToken": {"idToken": tag[:36], "type": "ISO14443"}}
            try:
                res = await up.rpc.call("Authorize", payload, timeout_s=10)
            except (RpcError, TimeoutError, ConnectionClosed):
                break
            st = str(res["idTagInfo" if up.version == "1.6" else "idTokenInfo"]["status"])
            if self.version == "1.6" and st not in ("Accepted", "Blocked", "Expired", "Invalid", "ConcurrentTx"):
                st = "Invalid"
            self.box.remember_authorization(tag, st)
            return res if same else {key: {"status": st}}
        return {key: {"status": status}}

    def _boot(self, info: dict[str, str], raw: dict[str, Any]) -> dict[str, Any]:
        import json

        self.box.info = {k: v for k, v in info.items() if v}
        self.csms.queue.set_kv(f"boot:{self.cbid}", json.dumps(self.box.info))
        self.csms.queue.set_kv(f"boot-raw:{self.cbid}", json.dumps({"version": self.version, "payload": raw}))
        for c in self.box.connectors.values():
            if c.up is not None and c.up.version == self.version:
                c.up.wallbox_booted(raw)
        self.log.info("wallbox booted", **self.box.info)
        self.booted.set()
        if self.ready:
            for c in self.box.connectors.values():
                c.reapply()
        return {"currentTime": conv.now_iso(), "interval": self.csms.config.ocpp.local.heartbeat_interval_s,
                "status": "Accepted"}

    async def _handle16(self, action: str, d: dict[str, Any]) -> dict[str, Any]:
        if action == "BootNotification":
            return self._boot({"vendor": d["chargePointVendor"], "model": d["chargePointModel"],
                               "serial": d.get("chargePointSerialNumber") or d.get("chargeBoxSerialNumber", ""),
                               "firmware": d.get("firmwareVersion", "")}, d)
        if action == "Heartbeat":
            return {"currentTime": conv.now_iso()}
        if action == "StatusNotification":
            n = d["connectorId"]
            if n == 0:
                for c in self.box.connectors.values():
                    if c.up is not None and c.same_version():
                        c.up.set_status(d["status"], raw0=d)  # the whole charge point: as the wallbox sent it
                if d["status"] in ("Unavailable", "Faulted"):
                    for c in self.box.connectors.values():
                        c.set_status16(d["status"], d["errorCode"], d.get("info"), derived=True)
                return {}
            c = self._connector(n)
            if c is not None:
                c.set_status16(d["status"], d["errorCode"], d.get("info"), raw=d)
            return {}
        if action == "Authorize":
            return await self._authorize_call(d)
        if action == "MeterValues":
            c = self._connector(d["connectorId"]) if d["connectorId"] != 0 else None
            if c is None:
                up = self._up_for({}) if d["connectorId"] == 0 and d.get("transactionId") is None else None
                if up is not None:  # the charge point's own meter (connector 0): as the wallbox sent it
                    up.send_live("MeterValues", d)
                return {}
            samples = conv.from_16(d["meterValue"])
            c.update_readings(samples)
            tid = d.get("transactionId")
            row = self.csms.queue.tx_by_local(c.evse.id, str(tid)) if tid is not None else None
            digest = meter_values_digest(d) if row is not None else None
            if row is not None and row.stopped is None and c.up is not None and row.last_digest == digest:
                # the wallbox repeats the MeterValues queued last (same content): its answer was lost with a
                # connection or a gateway that died after the commit. The RPC layer answers a repeated
                # message id only on the same connection; this digest is stored with the queued message.
                self.csms.counters["duplicate_meter_values"] += 1
                c.log.info("repeated MeterValues not forwarded again", local_transaction_id=tid)
            elif row is not None and row.stopped is None and c.up is not None:
                # forwarded whatever its timestamp: equal timestamps are normal (Transaction.Begin at the
                # start time, Sample.Clock next to Sample.Periodic)
                if row.last_ts is not None and samples[-1].timestamp < row.last_ts:
                    self.csms.counters["meter_values_out_of_order"] += 1
                c.up.meter_tx(row.tx, samples, digest=digest)
                c.keep_signed(samples)
                await _let_forward()
            elif c.up is not None and tid is None:
                c.up.send_live("MeterValues", passthrough.up("1.6", "MeterValues", d, c.n) if c.same_version()
                               else _live_meter(c.up.version, samples))
            elif tid is not None and (row is None or row.stopped is not None) and c.up is not None:
                self.csms.counters["unknown_transaction"] += 1
                self.csms.log_once(f"unknown-tx:{self.cbid}:{tid}", "MeterValues for an unknown or finished "
                                   "transaction, not forwarded", charge_box_id=self.cbid, transaction_id=tid)
            c.publish()
            return {}
        if action == "StartTransaction":
            return await self._start16(d)
        if action == "StopTransaction":
            return await self._stop16(d)
        if action == "DataTransfer":
            return {"status": "UnknownVendorId"}
        if action in ACK_EMPTY_16:
            return {}
        raise RpcError("NotSupported", f"{action} is not supported by this central system")

    async def _start16(self, d: dict[str, Any]) -> dict[str, Any]:
        c = self._connector(d["connectorId"])
        tag = d["idTag"]
        status = self._authorize_local(tag) if c is None else await self._authorize(tag, cached=True)
        queue = self.csms.queue
        if c is None:
            return {"transactionId": queue.next_local_id(), "idTagInfo": {"status": "Invalid"}}
        ts = d["timestamp"]
        meter = Decimal(d["meterStart"])
        if c.up is not None:
            row = queue.open_tx(c.evse.id)
            if row is not None and row.id_tag == tag and row.started == ts and row.meter_start == float(meter):
                self.csms.counters["duplicate_start"] += 1  # the wallbox repeats a start we already stored
                return {"transactionId": int(row.local_id or 0), "idTagInfo": {"status": "Accepted"}}
            if row is not None:
                # the wallbox started a new session while one is open here: close the old one first
                c.log.warning("new transaction while one is open; closing the open one", open_tx=row.tx)
                c.up.stop_tx(row.tx, meter_stop_wh=meter, timestamp=ts, reason16="Other", id_tag=row.id_tag)
            local_id = queue.next_local_id()
            c.tx = c.up.start_tx(id_tag=tag, meter_start_wh=meter, timestamp=ts, local_id=str(local_id),
                                 reservation_id=d.get("reservationId"),
                                 charging_state=conv.charging_state201_from16(c.status16)
                                 if c.confirmed and c.status16 in ("Preparing", "Charging", "SuspendedEV",
                                                                   "SuspendedEVSE") else None)
            c.keep_signed([], new_session=True)
        else:
            local_id = queue.next_local_id()
            c.local_tx = {"id": local_id, "meter_start": float(meter), "started": ts, "id_tag": tag}
            c.keep_signed([], new_session=True)
        c.energy_wh = meter
        c.publish()
        c.log.info("transaction started", local_transaction_id=local_id, meter_start_wh=d["meterStart"], id_tag=tag)
        return {"transactionId": local_id, "idTagInfo": {"status": status}}

    async def _stop16(self, d: dict[str, Any]) -> dict[str, Any]:
        tid = str(d["transactionId"])
        evse_ids = [c.evse.id for c in self.box.connectors.values()]
        row = self.csms.queue.tx_by_local_any(evse_ids, tid)
        meter = Decimal(d["meterStop"])
        answer: dict[str, Any] = {"idTagInfo": {"status": "Accepted"}} if d.get("idTag") else {}
        if row is None:
            for c in self.box.connectors.values():
                if c.local_tx is not None and str(c.local_tx["id"]) == tid:
                    c.local_tx = None
                    c.energy_wh = meter
                    c.publish()
                    return answer
            self.csms.counters["unknown_transaction"] += 1
            self.csms.log_once(f"unknown-tx:{self.cbid}:{tid}", "StopTransaction for an unknown transaction",
                               charge_box_id=self.cbid, transaction_id=tid)
            return answer
        c = next(x for x in self.box.connectors.values() if x.evse.id == row.evse_id)
        if row.stopped is not None:
            self.csms.counters["duplicate_stop"] += 1
            return answer
        samples = conv.from_16(d.get("transactionData") or [])
        if c.up is None:  # the EVSE no longer goes upstream (configuration changed): just close it
            self.csms.queue.mark_stopped(row.tx, d["timestamp"])
            c.tx = None
            c.energy_wh = meter
            c.publish()
            return answer
        if c.keep_signed(samples):
            c.publish()  # the session's end signed data on the bus while the session is still there
        c.up.stop_tx(row.tx, meter_stop_wh=meter, timestamp=d["timestamp"], reason16=d.get("reason"),
                     id_tag=d.get("idTag"), samples=samples,  # idTag only if the wallbox sent one
                     transaction_data=d.get("transactionData"))
        if c.tx == row.tx:
            c.tx = None
        c.energy_wh = meter
        c.publish()
        c.log.info("transaction stopped", local_transaction_id=tid, meter_stop_wh=d["meterStop"])
        return answer

    async def _handle201(self, action: str, d: dict[str, Any]) -> dict[str, Any]:
        if action == "BootNotification":
            cs = d["chargingStation"]
            return self._boot({"vendor": cs["vendorName"], "model": cs["model"], "serial": cs.get("serialNumber", ""),
                               "firmware": cs.get("firmwareVersion", "")}, d)
        if action == "Heartbeat":
            return {"currentTime": conv.now_iso()}
        if action == "StatusNotification":
            c = self._connector(d["evseId"]) if d["evseId"] != 0 else None
            if c is not None:
                s16 = conv.status16_from201(d["connectorStatus"], c.charging_state)
                c.set_status16(s16, "NoError" if s16 != "Faulted" else "OtherError", raw=d)
            return {}
        if action == "Authorize":
            return await self._authorize_call(d)
        if action == "MeterValues":
            c = self._connector(d["evseId"]) if d["evseId"] != 0 else None
            if c is not None:
                samples = conv.from_201(d["meterValue"])
                c.update_readings(samples)
                if c.up is not None:
                    c.up.send_live("MeterValues", passthrough.up("2.0.1", "MeterValues", d, c.n) if c.same_version()
                                   else _live_meter(c.up.version, samples))
                c.publish()
            elif d["evseId"] == 0 and (up := self._up_for({})) is not None:
                up.send_live("MeterValues", d)  # the station's own meter: as the wallbox sent it
            return {}
        if action == "TransactionEvent":
            return await self._tx_event(d)
        if action == "DataTransfer":
            return {"status": "UnknownVendorId"}
        if action in ACK_EMPTY_201:
            return {}
        raise RpcError("NotSupported", f"{action} is not supported by this central system")

    async def _tx_event(self, d: dict[str, Any]) -> dict[str, Any]:
        info = d["transactionInfo"]
        tid = info["transactionId"]
        seq = int(d["seqNo"])
        queue = self.csms.queue
        evse_ids = [c.evse.id for c in self.box.connectors.values()]
        row = queue.tx_by_local_any(evse_ids, tid)
        c: Connector | None
        if d.get("evse"):
            c = self._connector(d["evse"]["id"])
        elif row is not None:
            c = next((x for x in self.box.connectors.values() if x.evse.id == row.evse_id), None)
        else:
            c = next(iter(self.box.connectors.values())) if len(self.box.connectors) == 1 else None
        answer: dict[str, Any] = {}
        tag = (d.get("idToken") or {}).get("idToken")
        if tag:
            # the backend's answer to the wallbox's Authorize, else the local list (not "Invalid" for a tag the
            # backend accepted: a wallbox that stops on Invalid would end the session)
            answer["idTokenInfo"] = {"status": self.box.cached_authorization(tag) or self._authorize_local(tag)}
        if c is None:
            return answer
        samples = conv.from_201(d.get("meterValue") or [])
        if samples:
            c.update_readings(samples)
        if info.get("chargingState"):
            c.charging_state = info["chargingState"]
            # "Idle" (e.g. in the Ended event) does not say a car is there: after the wallbox reported the
            # connector Available (the StatusNotification may overtake the transaction message), keep it
            if c.status16 not in ("Unavailable", "Faulted") and not (c.status16 == "Available"
                                                                       and c.charging_state == "Idle"):
                c.set_status16(conv.status16_from201("Occupied", c.charging_state), derived=True)
        ev = d["eventType"]
        energy = conv.energy_of(samples)
        if row is not None and row.local_seq is not None and seq <= row.local_seq:
            self.csms.counters["duplicate_transaction_event"] += 1
            return answer
        if c.keep_signed(samples, new_session=row is None) and ev == "Ended":
            c.publish()  # the session's end signed data on the bus while the session is still there
        if c.up is None:
            if ev == "Started":
                c.local_tx = {"id": tid, "meter_start": float(energy or c.energy_wh or 0), "started": d["timestamp"],
                              "id_tag": tag}
            elif ev == "Ended":
                c.local_tx = None
            c.publish()
            return answer
        if c.up.version == "2.0.1" and self.version == "2.0.1":
            # as the wallbox sent it: its transactionId, seqNo, triggerReason, chargingState, idToken, meter
            # values (signed ones too), every optional field; only the EVSE id is mapped (README)
            if row is not None and row.stopped is not None:
                self.csms.counters["duplicate_transaction_event"] += 1
                return answer
            meter = energy if energy is not None else c.energy_wh
            tx = c.up.pass_event(passthrough.up("2.0.1", "TransactionEvent", d, c.n), row=row, meter_wh=meter,
                                 id_tag=tag or c.evse.id_tag or self.csms.config.ocpp.backend.id_tag)
            if row is None:
                c.log.info("transaction started", local_transaction_id=tid, id_tag=tag, first_event=ev)
            if ev == "Ended":
                c.tx = None if c.tx == tx else c.tx
                c.log.info("transaction stopped", local_transaction_id=tid, meter_stop_wh=str(meter))
            else:
                c.tx = tx
            if meter is not None:
                c.energy_wh = meter
            if ev == "Updated":
                await _let_forward()
            c.publish()
            return answer
        if row is None:
            if ev == "Ended" and seq > 0 and energy is None:
                self.csms.counters["unknown_transaction"] += 1
            meter = energy if energy is not None else (c.energy_wh if c.energy_wh is not None else Decimal(0))
            id_tag = tag or c.evse.id_tag or self.csms.config.ocpp.backend.id_tag
            rsid = info.get("remoteStartId")
            c.tx = c.up.start_tx(id_tag=id_tag, meter_start_wh=meter, timestamp=d["timestamp"], local_id=tid,
                                 trigger=d.get("triggerReason", "Authorized"), local_seq=seq,
                                 samples=samples if ev == "Started" else None,
                                 id_token=d.get("idToken") if tag else None,
                                 remote_start_id=rsid if isinstance(rsid, int) else None)
            c.log.info("transaction started", local_transaction_id=tid, meter_start_wh=str(meter), id_tag=id_tag)
            row = queue.tx(c.tx)
            if ev == "Started":
                c.publish()
                return answer
        assert row is not None
        if row.stopped is not None:
            self.csms.counters["duplicate_transaction_event"] += 1
            return answer
        if ev == "Ended":
            meter = energy if energy is not None else (c.energy_wh if c.energy_wh is not None else
                                                         Decimal(str(row.meter_last or 0)))
            reason = conv.STOP_REASON_201_TO_16.get(info.get("stoppedReason", "Local"), "Other")
            c.up.stop_tx(row.tx, meter_stop_wh=meter, timestamp=d["timestamp"], reason16=reason,
                         id_tag=tag, local_seq=seq, samples=samples)  # only if the wallbox sent one
            if c.tx == row.tx:
                c.tx = None
            c.energy_wh = meter
            c.log.info("transaction stopped", local_transaction_id=tid, meter_stop_wh=str(meter))
        elif samples:
            c.up.meter_tx(row.tx, samples, charging_state=info.get("chargingState"), local_seq=seq)
            await _let_forward()
        else:
            queue.add_seq_only(row.tx, seq)
        c.publish()
        return answer


async def _let_forward() -> None:
    """One turn of the event loop after a meter value was queued, before the wallbox's status is built and
    published: the upstream charge point's delivery loop (woken by ``kick``) sends it on now, not after the
    status (a pydantic model and a bus publish, ~0.2 ms) - the meter value may leave while its fsync runs
    (README, "Forwarding while the fsync runs"), the wallbox's answer still waits for it."""
    await asyncio.sleep(0)


def _live_meter(version: Version, samples: list[conv.Sample]) -> dict[str, Any]:
    if version == "1.6":
        return {"connectorId": 1, "meterValue": conv.to_16(samples)}
    return {"evseId": 1, "meterValue": conv.to_201(samples)}


class LocalCsms:
    """The websocket server and the configured wallboxes."""

    def __init__(self, config: Config, bus: Bus, queue: TxQueue, counters: Counter[str],
                 tasks: Tasks | None = None) -> None:
        self.config = config
        self.tasks = tasks or Tasks()
        self.bus = bus
        self.queue = queue
        self.counters = counters
        self.boxes: dict[str, Box] = {}
        self.connectors: dict[str, Connector] = {}
        self.server: Server | None = None
        # every rate-limited line of the central system (keys carry charge box ids, also unknown ones): at most
        # one per key and minute, three per event and minute, the rest summarised; 1024 keys remembered
        self.limiter = LogLimiter(log)
        # EVSE statuses built in this turn of the event loop, published together at its end (publish_status)
        self._outbox: list[tuple[str, p.EvseStatus]] = []
        for evse in config.evses:
            if evse.ocpp is None:
                continue
            cb = evse.ocpp.charge_box_id
            box = self.boxes.get(cb)
            if box is None:
                box = self.boxes[cb] = Box(cbid=cb, connectors={}, password=None, version=evse.ocpp.version)
            if evse.ocpp.password is not None and box.password is None:
                box.password = evse.ocpp.password.reveal()
            if evse.ocpp.version is not None:
                box.version = evse.ocpp.version
            conn = Connector(evse, self)
            box.connectors[evse.ocpp.connector_id] = conn
            self.connectors[evse.id] = conn

    def publish_status(self, evse_id: str, st: p.EvseStatus) -> None:
        """Publish an EVSE's status at the end of this turn of the event loop, together with the others of
        the turn: 100 wallboxes answering a burst of SetChargingProfile give 100 statuses within a few
        milliseconds, and one wake-up of the MQTT client's network thread each (a GIL hand-over, about
        0.5 ms apiece, in series) delayed the last wallbox's answer by tens of milliseconds. Built now, so
        the status is the one of this moment; per EVSE the order is kept."""
        self._outbox.append((evse_id, st))
        if len(self._outbox) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush_statuses)
            except RuntimeError:  # no event loop running (a test, shutting down): at once
                self.flush_statuses()

    def flush_statuses(self) -> None:
        """Hand the statuses waiting for the end of the turn to the MQTT client now (with one wake-up)."""
        out, self._outbox = self._outbox, []
        if out:
            with self.bus.batch():
                for evse_id, st in out:
                    self.bus.publish("evse.status", st, evse_id=evse_id)

    def log_once(self, key: str, event: str, *, subject: str = "wallboxes", **kw: Any) -> None:
        """A warning at most once per ``key`` and minute, and few per event (see chargegate.ratelog)."""
        self.limiter.warning(key, event, subject=subject, **kw)

    def ssl_context(self) -> ssl.SSLContext | None:
        lc = self.config.ocpp.local
        if lc.tls != "on":
            return None
        if not lc.cert_file or not lc.key_file:
            raise ValueError("ocpp.local.tls on needs cert_file and key_file")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(lc.cert_file), str(lc.key_file))
        if lc.client_ca_file:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(str(lc.client_ca_file))
        return ctx

    async def start(self) -> None:
        lc = self.config.ocpp.local
        for c in self.connectors.values():
            c.start()
        self.server = await serve(self._handler, lc.host, lc.port, ssl=self.ssl_context(),
                                  process_request=self._process_request, select_subprotocol=self._select,
                                  subprotocols=["ocpp1.6", "ocpp2.0.1"],  # type: ignore[list-item]
                                  ping_interval=60, ping_timeout=60, max_size=2**20, max_queue=32,
                                  # no permessage-deflate on the local network: its zlib state is about 40 KB
                                  # per wallbox (bench/footprint), for OCPP messages of a few hundred bytes
                                  compression=None, server_header="chargegate-ocpp-gateway")
        log.info("local OCPP central system listening", host=lc.host, port=self.port, tls=lc.tls,
                 wallboxes=len(self.boxes))

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(next(iter(self.server.sockets)).getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)
        for box in self.boxes.values():
            box.session = None
        for c in self.connectors.values():
            c.close()
            c.applied = None
            with contextlib.suppress(Exception):
                c.publish()  # offline: nobody reads these wallboxes any more
        self.flush_statuses()  # now: the bus stops after this
        self.limiter.close()  # what it suppressed is summarised now

    def _refuse(self, conn: ServerConnection, status: int, why: str, cbid: str | None) -> Response:
        self.counters["local_refused"] += 1
        peer = conn.remote_address[0] if conn.remote_address else "?"
        self.log_once(f"refuse:{cbid}:{status}", "wallbox connection refused", subject="charge box ids",
                      charge_box_id=cbid, reason=why, http_status=status, peer=peer)
        return conn.respond(status, why + "\n")

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = urllib.parse.urlsplit(request.path).path
        seg = [s for s in path.split("/") if s]
        cbid = urllib.parse.unquote(seg[-1]) if seg else ""
        box = self.boxes.get(cbid)
        if box is None:
            return self._refuse(conn, 404, f"unknown charge box id {cbid[:48]!r}", cbid[:48] or None)
        lc = self.config.ocpp.local
        if lc.client_ca_file and lc.tls == "on" and lc.check_client_cn:
            sslobj = conn.transport.get_extra_info("ssl_object") if conn.transport else None
            cert = sslobj.getpeercert() if sslobj is not None else None
            cn = _cert_cn(cert)
            if cn != cbid:
                return self._refuse(conn, 403, f"client certificate CN {cn!r} is not the charge box id", cbid)
        if lc.require_password or box.password is not None:
            if box.password is None:
                return self._refuse(conn, 401, "a password is required but none is configured for this box", cbid)
            if not _basic_ok(request.headers, cbid, box.password):
                resp = self._refuse(conn, 401, "HTTP Basic authentication failed", cbid)
                resp.headers["WWW-Authenticate"] = 'Basic realm="chargegate", charset="UTF-8"'
                return resp
        conn.cbid = cbid  # type: ignore[attr-defined]
        return None

    def _select(self, conn: ServerConnection, offered: Any) -> Any:
        box = self.boxes.get(getattr(conn, "cbid", ""))
        wanted = [SUBPROTOCOL_OF[box.version]] if box is not None and box.version else list(offered)
        for proto in wanted:
            if proto in offered and proto in SUBPROTOCOL:
                return proto
        self.counters["local_refused"] += 1
        self.log_once(f"subproto:{getattr(conn, 'cbid', '')}", "wallbox offers no supported OCPP version",
                      charge_box_id=getattr(conn, "cbid", None), offered=list(offered))
        from websockets.exceptions import NegotiationError

        raise NegotiationError("no supported OCPP subprotocol (ocpp1.6, ocpp2.0.1)")

    async def _handler(self, ws: ServerConnection) -> None:
        cbid: str = ws.cbid  # type: ignore[attr-defined]
        box = self.boxes[cbid]
        version = SUBPROTOCOL[ws.subprotocol or ""]
        old = box.session
        if old is not None:
            log.warning("wallbox connected again, closing its previous connection", charge_box_id=cbid)
            with contextlib.suppress(Exception):
                await old.ws.close(1001, "replaced by a new connection")
        sess = WallboxSession(self, box, ws, version)
        box.session = sess
        for c in box.connectors.values():
            c.confirmed = False  # its status is asked for once it has booted (or after 2 s without a boot)
            c.drawing = False
        self.counters["local_connects"] += 1
        log.info("wallbox connected", charge_box_id=cbid, version=version,
                 peer=ws.remote_address[0] if ws.remote_address else None)
        for c in box.connectors.values():
            c.publish()
        try:
            await sess.run()
        finally:
            if box.session is sess:
                box.session = None
                log.info("wallbox disconnected", charge_box_id=cbid)
                for c in box.connectors.values():
                    c.installed = None
                    c.base_installed = False
                    c.applied = None
                    c.publish()
                    if c.up is not None:
                        c.up.set_status("Unavailable", "NoError", "wallbox not connected")

    def on_setpoint(self, sp: p.Setpoint) -> None:
        c = self.connectors.get(sp.evse_id)
        if c is not None:
            c.on_setpoint(sp)


def _basic_ok(headers: Headers, user: str, password: str) -> bool:
    auth = headers.get("Authorization", "")
    if not auth.startswith("Basic "):
        return False
    try:
        raw = base64.b64decode(auth[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return False
    u, _, pw = raw.partition(":")
    return hmac.compare_digest(u.encode(), user.encode()) and hmac.compare_digest(pw.encode(), password.encode())


def _cert_cn(cert: Any) -> str | None:
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                return str(v)
    return None
