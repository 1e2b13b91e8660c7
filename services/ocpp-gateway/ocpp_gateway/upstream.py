"""One OCPP charge point at the supplier's backend per EVSE (1.6J, or 2.0.1 where configured).

The connection runs directly or through smgw-link's local forwarding listener (the TCP socket
goes to ``listen_host:listen_port`` while the URL's host stays in the HTTP Host header and in
TLS SNI and verification). After every (re)connect: BootNotification, the current status, then
the durable transaction queue is delivered in order. The EVSE behind the charge point is
reached through a :class:`Driver` (the OCPP wallbox, or the bus for Modbus EVSEs).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

from chargegate import payloads as p
from chargegate.config import Config, Evse
from chargegate.supervise import Tasks
from ocpp_gateway import conv, passthrough
from ocpp_gateway.profiles import MAX_PROFILE_A, MAX_PROFILE_W, Profile, effective
from ocpp_gateway.rpc import SUBPROTOCOL_OF, OcppRpc, RpcError, Version
from ocpp_gateway.txqueue import TX_ID_PLACEHOLDER, TxQueue, TxRow

log = structlog.get_logger("ocpp_gateway.upstream")


class Driver(Protocol):
    """What the backend can ask of the EVSE behind an upstream charge point."""

    kind: str

    async def remote_start(self, id_tag: str, remote_start_id: int | None = None) -> bool: ...
    async def remote_stop(self, tx: TxRow) -> bool: ...
    async def availability(self, operative: bool) -> str: ...  # Accepted / Rejected / Scheduled
    async def reset(self, hard: bool) -> str: ...  # Accepted / Rejected
    async def unlock(self) -> str: ...  # Unlocked / UnlockFailed / NotSupported
    async def trigger(self, what: str) -> str | None: ...  # None: the upstream charge point does it itself
    async def passthrough(self, version: Version, action: str, payload: dict[str, Any]) -> dict[str, Any] | None: ...
    def boot_info(self) -> dict[str, str]: ...


REMOTE_START_MATCH_S = 120.0  # a start this soon after the backend's RequestStartTransaction is its
TRIGGER_STATUS_WAIT_S = 2.0  # a triggered StatusNotification the wallbox does not send: ours after this
STATUS_UNKNOWN_GRACE_S = 30.0  # after a restart, the EVSE's status goes up once known, Unavailable after this


@dataclass
class Target:
    url: str  # full URL including the charge box id
    cbid: str
    password: str | None
    version: Version
    connect_host: str | None = None  # smgw-link forwarding listener
    connect_port: int | None = None
    ca_file: str | None = None


def upstream_target(config: Config, evse: Evse) -> Target | None:
    """Where ``evse`` connects upstream, or None when it does not (raises ValueError when misconfigured)."""
    be = config.ocpp.backend
    up = evse.upstream
    if not be.enabled or (up is not None and not up.enabled):
        return None
    base = (up.url if up and up.url else None) or be.url
    if not base:
        raise ValueError(f"EVSE {evse.id}: no upstream URL (ocpp.backend.url or evses[].upstream.url)")
    cbid = (up.charge_box_id if up and up.charge_box_id else None) or evse.id
    url = base.rstrip("/") + "/" + urllib.parse.quote(cbid, safe="")
    secret = (up.password if up and up.password else None) or be.password
    version: Version = (up.version if up and up.version else None) or be.version
    t = Target(url=url, cbid=cbid, password=secret.reveal() if secret else None, version=version,
               ca_file=str(be.ca_file) if be.ca_file else None)
    if be.via_smgw:
        smgw = config.smgw
        # smgw-link opens the forwarding listener of an OCPP endpoint only with the SMGW link on and
        # function 1 switched on: without them the channel does not exist, so say so instead of
        # retrying a dead port (and do not bypass the gateway the installer asked for)
        if not smgw.enabled:
            raise ValueError(f"EVSE {evse.id}: ocpp.backend.via_smgw is set but the SMGW link is off "
                             f"(smgw.enabled); set via_smgw: false to connect to the backend directly")
        if not smgw.functions.ocpp_via_smgw:
            raise ValueError(f"EVSE {evse.id}: ocpp.backend.via_smgw is set but function 1 (smgw.functions."
                             f"ocpp_via_smgw) is switched off; switch it on, or set via_smgw: false to connect "
                             f"directly")
        parsed = urllib.parse.urlsplit(base)
        port = parsed.port or (443 if parsed.scheme == "wss" else 80)
        ep = None
        if be.smgw_endpoint:
            ep = next((e for e in smgw.endpoints if e.name == be.smgw_endpoint), None)
            if ep is None:
                raise ValueError(f"EVSE {evse.id}: ocpp.backend.smgw_endpoint {be.smgw_endpoint!r} is not in "
                                 f"smgw.endpoints")
            if ep.purpose != "ocpp":
                raise ValueError(f"EVSE {evse.id}: smgw endpoint {ep.name} has purpose {ep.purpose}, not ocpp "
                                 f"(smgw-link opens it only for that purpose)")
        else:
            ep = smgw.route(parsed.hostname or "", port)
            ocpp_eps = [e for e in smgw.endpoints if e.purpose == "ocpp"]
            if ep is None and len(ocpp_eps) == 1:
                ep = ocpp_eps[0]
        if ep is None:
            raise ValueError(f"EVSE {evse.id}: ocpp.backend.via_smgw but no smgw.endpoints entry for "
                             f"{parsed.hostname}:{port}")
        t.connect_host, t.connect_port = ep.listen_host, ep.listen_port
    return t


TX_ACTIONS = {"start", "update", "stop"}
MAX_PROFILES = 32  # charging profiles from the backend per charge point (one per purpose and stack level)


# the compressor's memLevel (websockets' default for a client: 5). Its hash table and symbol buffer are
# 2 * 2**(memLevel + 7) + 4 * 2**(memLevel + 6) bytes, 16 KiB at 5 and 2 KiB at 2 - per upstream connection,
# next to the 2 * 2 * 2**window_bits of the LZ77 window. On OCPP messages of a few hundred bytes to a few KB
# it compresses as well (the same bytes on the bench's MeterValues, StatusNotifications) at the same speed;
# the offer and what is negotiated (window sizes, context takeover) are unchanged.
UPSTREAM_DEFLATE_MEM_LEVEL = 2


def upstream_deflate() -> ClientPerMessageDeflateFactory:
    """permessage-deflate towards the backend, offered as websockets offers it by default, with a smaller
    compressor (bench/footprint: 200 upstream connections held 7.4 MB of compressors at memLevel 5)."""
    return ClientPerMessageDeflateFactory(compress_settings={"memLevel": UPSTREAM_DEFLATE_MEM_LEVEL})


class UpstreamCP:
    """The charge point ``target.cbid`` at the backend, for EVSE ``evse``."""

    def __init__(self, *, evse: Evse, target: Target, queue: TxQueue, driver: Driver, config: Config,
                 counters: Counter[str], publish_limit: Any, tasks: Tasks | None = None) -> None:
        self.evse = evse
        self.tasks = tasks or Tasks()
        self.t = target
        self.cbid = target.cbid
        self.version: Version = target.version
        self.queue = queue
        self.driver = driver
        self.config = config
        self.counters = counters
        self.publish_limit = publish_limit  # (EvseLimit) -> None
        self.log = log.bind(evse_id=evse.id, charge_box_id=self.cbid)
        self.rpc: OcppRpc | None = None
        self.booted = asyncio.Event()
        self.connected = asyncio.Event()
        self._wake = asyncio.Event()
        self.heartbeat_s = float(config.ocpp.backend.heartbeat_interval_s)
        self.meter_interval_s = float(config.ocpp.backend.meter_values_interval_s)
        self._status: tuple[str, str, str | None] = ("Unavailable", "NoError", None)  # 1.6 status, error, info
        self._sent_status: tuple[str, str, str | None] | None = None
        self._status_triggered = False  # the backend asked for a StatusNotification: send the next one
        # the EVSE's status is known (a wallbox told it since the gateway started): until then nothing goes up
        # (after a restart the backend keeps what it had, rather than a made-up Unavailable), at most
        # STATUS_UNKNOWN_GRACE_S after the boot at the backend
        self._status_known = False
        self._status_raw: dict[str, Any] | None = None  # the wallbox's own StatusNotification (same version)
        self._status0_raw: dict[str, Any] | None = None  # ... for connector 0 (1.6)
        self._status0_sent = -1  # the connection (self.connects) it went up on
        self._remote_start: tuple[str, int, float] | None = None  # (idToken, remoteStartId, when) asked for
        self._profiles: list[Profile] = self._load_profiles()
        self._limit_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.connects = 0
        self._down_logged = False
        self.stopped = False
        self.last_latency_s: float | None = None

    # -- public API for the EVSE side ---------------------------------------------------------
    @property
    def evse_n(self) -> int:
        """The connector (1.6) / EVSE (2.0.1) of the wallbox that is connector 1 of this charge point."""
        return self.evse.ocpp.connector_id if self.evse.ocpp is not None else 1

    def wallbox_booted(self, payload: dict[str, Any]) -> None:
        """The wallbox (same version) sent a BootNotification: it goes up as it is (the backend learns of the
        reboot and gets the wallbox's own data). The backend answering anything but Accepted: this charge
        point reconnects and boots again, as after any reconnect (the boot loop waits as the answer says)."""
        if self.booted.is_set() and self.rpc is not None:
            self._spawn(self._reboot(self.rpc, payload))

    async def _reboot(self, rpc: OcppRpc, payload: dict[str, Any]) -> None:
        try:
            res = await rpc.call("BootNotification", payload)
        except (RpcError, TimeoutError, ConnectionClosed) as e:
            self.log.warning("backend did not take the wallbox's BootNotification", error=repr(e))
            return
        if res.get("status") == "Accepted":
            if float(res.get("interval") or 0) > 0:
                self.heartbeat_s = float(res["interval"])
            return
        self.log.info("backend answered the wallbox's BootNotification; registering again", status=res.get("status"))
        await rpc.ws.close(1000, "boot again")

    def set_status(self, status16: str, error16: str = "NoError", info: str | None = None, *,
                   raw: dict[str, Any] | None = None, raw0: dict[str, Any] | None = None) -> None:
        """The EVSE's current status (1.6 vocabulary); sent when it changes and after every boot.

        ``raw``: the StatusNotification exactly as a wallbox of this charge point's version sent it
        (connector id mapped): it goes up as it is, every time the wallbox sends one, and again after a
        reconnect. ``raw0``: its StatusNotification for connector 0 (1.6), forwarded the same way."""
        if raw0 is not None:
            self._status0_raw = raw0
            if self.booted.is_set():
                self._status0_sent = self.connects
                self._spawn(self._call_quiet("StatusNotification", raw0))
            return
        self._status = (status16, error16, info)
        self._status_known = True
        self._status_raw = raw
        if self.booted.is_set() and (raw is not None or self._sent_status != self._status or self._status_triggered):
            self._status_triggered = False
            self._spawn(self._send_status())

    def start_tx(self, *, id_tag: str, meter_start_wh: Decimal, timestamp: str, local_id: str | None,
                 trigger: str = "Authorized", local_seq: int | None = None,
                 samples: list[conv.Sample] | None = None, id_token: dict[str, Any] | None = None,
                 remote_start_id: int | None = None, reservation_id: int | None = None,
                 charging_state: str | None = "EVConnected") -> str:
        """Queue a transaction start (durably) and return the transaction key. ``samples``: the meter
        values the wallbox sent with its start (2.0.1 Started), signed data included: a 2.0.1 backend gets
        them as the Started event's meterValue, a 1.6 backend in a MeterValues right after the start."""
        ws = conv.wh_int(meter_start_wh)
        if self.version == "1.6":
            payload: dict[str, Any] = {"connectorId": 1, "idTag": id_tag[:20], "meterStart": ws, "timestamp": timestamp}
            if reservation_id is not None:
                payload["reservationId"] = reservation_id
            tx = self.queue.begin_tx(cp=self.cbid, evse_id=self.evse.id, version="1.6", action="StartTransaction",
                                     payload=payload, id_tag=id_tag, meter_start=float(meter_start_wh),
                                     started=timestamp, local_id=local_id, last_ts=timestamp, local_seq=local_seq)
            mv = conv.to_16(samples) if samples else []
            if mv:  # 1.6 StartTransaction has no meter values: they follow it, in order, in the queue
                self.queue.add(tx, "update", "MeterValues", {"connectorId": 1, "transactionId": TX_ID_PLACEHOLDER,
                                                             "meterValue": mv}, last_ts=timestamp)
        else:
            import uuid

            tx = uuid.uuid4().hex
            info: dict[str, Any] = {"transactionId": tx}
            if charging_state:
                info["chargingState"] = charging_state
            rs = self._remote_start
            if remote_start_id is None and rs is not None and rs[0] == id_tag and \
                    time.monotonic() - rs[2] < REMOTE_START_MATCH_S:
                remote_start_id = rs[1]  # the start the backend asked for (a 1.6 or Modbus EVSE has no id)
            if remote_start_id is not None:
                info["remoteStartId"] = remote_start_id
                self._remote_start = None
                trigger = "RemoteStart" if trigger == "Authorized" else trigger
            payload = {
                "eventType": "Started", "timestamp": timestamp, "triggerReason": trigger, "seqNo": 0,
                "transactionInfo": info,
                # the wallbox's own idToken (type included) when it sent one
                "idToken": id_token if id_token else {"idToken": id_tag[:36], "type": "Central"},
                "evse": {"id": 1, "connectorId": 1},
                **({"reservationId": reservation_id} if reservation_id is not None else {}),
                "meterValue": (conv.to_201(samples) if samples else None) or [
                    {"timestamp": timestamp, "sampledValue": [
                        {"value": conv.to_number(conv.num_str(meter_start_wh)), "measurand": conv.ENERGY,
                         "context": "Transaction.Begin", "unitOfMeasure": {"unit": "Wh"}}]}],
            }
            tx = self.queue.begin_tx(cp=self.cbid, evse_id=self.evse.id, version="2.0.1", action="TransactionEvent",
                                     payload=payload, id_tag=id_tag, meter_start=float(meter_start_wh),
                                     started=timestamp, local_id=local_id, tx=tx, backend_id=tx, seq_no=1,
                                     last_ts=timestamp, local_seq=local_seq)
        self.counters["tx_started"] += 1
        self.kick()
        return tx

    def meter_tx(self, tx: str, samples: list[conv.Sample], *, charging_state: str | None = None,
                 local_seq: int | None = None, digest: str | None = None) -> None:
        row = self.queue.tx(tx)
        if row is None or not samples:
            return
        energy = conv.energy_of(samples)
        last_ts = samples[-1].timestamp
        if self.version == "1.6":
            payload: dict[str, Any] = {"connectorId": 1, "transactionId": self._tx_ref(row),
                                       "meterValue": conv.to_16(samples, "Sample.Periodic")}
            if not payload["meterValue"]:
                return
            self.queue.add(tx, "update", "MeterValues", payload, meter=float(energy) if energy is not None else None,
                           last_ts=last_ts, local_seq=local_seq, digest=digest)
        else:
            mv201 = conv.to_201(samples, "Sample.Periodic")
            if not mv201:
                return
            info: dict[str, Any] = {"transactionId": row.backend_id or tx}
            if charging_state:
                info["chargingState"] = charging_state
            payload = {"eventType": "Updated", "timestamp": last_ts, "triggerReason": "MeterValuePeriodic",
                       "seqNo": self.queue.next_seq_no(tx), "transactionInfo": info,
                       "evse": {"id": 1, "connectorId": 1},
                       "meterValue": mv201}
            self.queue.add(tx, "update", "TransactionEvent", payload,
                           meter=float(energy) if energy is not None else None, last_ts=last_ts, local_seq=local_seq,
                           digest=digest)
        self.kick()

    def pass_event(self, payload: dict[str, Any], *, row: TxRow | None, meter_wh: Decimal | None, id_tag: str) -> str:
        """A 2.0.1 wallbox's TransactionEvent for this 2.0.1 charge point, queued (durably) as it is: the
        backend sees the wallbox's transactionId, seqNo and every field. The first event of a transaction
        the gateway did not know (a Started, or whatever came first) starts it here. Returns the tx key."""
        ev, ts, seq = payload["eventType"], payload["timestamp"], int(payload["seqNo"])
        tid = str(payload["transactionInfo"]["transactionId"])
        meter = float(meter_wh) if meter_wh is not None else None
        if row is None:
            tx = self.queue.begin_tx(cp=self.cbid, evse_id=self.evse.id, version="2.0.1", action="TransactionEvent",
                                     payload=payload, id_tag=id_tag, meter_start=meter if meter is not None else 0.0,
                                     started=ts, local_id=tid, backend_id=tid, seq_no=seq + 1, last_ts=ts,
                                     local_seq=seq)
            self.counters["tx_started"] += 1
            rs = self._remote_start
            if rs is not None and payload["transactionInfo"].get("remoteStartId") == rs[1]:
                self._remote_start = None
            if ev == "Ended":
                self.queue.mark_stopped(tx, ts)
        else:
            tx = row.tx
            self.queue.add(tx, "stop" if ev == "Ended" else "update", "TransactionEvent", payload, meter=meter,
                           stopped=ts if ev == "Ended" else None, last_ts=ts, local_seq=seq)
        if ev == "Ended":
            self.counters["tx_stopped"] += 1
            self._end_tx_profiles()
        self.kick()
        return tx

    def _end_tx_profiles(self) -> None:
        """TxProfiles end with their transaction."""
        before = len(self._profiles)
        self._profiles = [x for x in self._profiles if x.purpose != "TxProfile"]
        if len(self._profiles) != before:
            self._save_profiles()
            self._publish_limit()

    def stop_tx(self, tx: str, *, meter_stop_wh: Decimal, timestamp: str, reason16: str | None = "Local",
                id_tag: str | None = None, samples: list[conv.Sample] | None = None,
                local_seq: int | None = None, transaction_data: list[Any] | None = None) -> None:
        """``transaction_data``: a 1.6 wallbox's StopTransaction.transactionData as it sent it (to a 1.6
        backend it goes up as it is, an empty list too)."""
        row = self.queue.tx(tx)
        if row is None:
            return
        if self.version == "1.6":
            payload: dict[str, Any] = {"transactionId": self._tx_ref(row), "meterStop": conv.wh_int(meter_stop_wh),
                                       "timestamp": timestamp}
            if reason16 is not None:  # absent as the wallbox sent it (1.6: absent means Local)
                payload["reason"] = reason16
            if id_tag is not None:  # as the wallbox sent it (an empty one too)
                payload["idTag"] = id_tag[:20]
            if transaction_data is not None:
                payload["transactionData"] = transaction_data
            elif samples:
                data = conv.to_16(samples)
                if data:
                    payload["transactionData"] = data
            self.queue.add(tx, "stop", "StopTransaction", payload, meter=float(meter_stop_wh), stopped=timestamp,
                           local_seq=local_seq)
        else:
            reason16 = reason16 or "Local"
            end = [{"timestamp": timestamp, "sampledValue": [
                {"value": conv.to_number(conv.num_str(meter_stop_wh)), "measurand": conv.ENERGY,
                 "context": "Transaction.End", "unitOfMeasure": {"unit": "Wh"}}]}]
            mv = conv.to_201(samples) if samples else []
            if mv and samples and not any(v.raw_version == "2.0.1" for s in samples for v in s.values) and not any(
                    v.measurand == conv.ENERGY and v.context == "Transaction.End" and not v.is_signed
                    for s in samples for v in s.values):
                mv = mv + end  # a 1.6 wallbox's meterStop, which its transactionData need not repeat
            trig = {"Remote": "RemoteStop", "EVDisconnected": "EVCommunicationLost", "Local": "StopAuthorized",
                    "DeAuthorized": "Deauthorized"}.get(reason16, "AbnormalCondition")
            payload = {"eventType": "Ended", "timestamp": timestamp, "triggerReason": trig,
                       "seqNo": self.queue.next_seq_no(tx),
                       "transactionInfo": {"transactionId": row.backend_id or tx,
                                           "stoppedReason": conv.STOP_REASON_16_TO_201.get(reason16, "Other")},
                       "evse": {"id": 1, "connectorId": 1},
                       "meterValue": mv or end}
            self.queue.add(tx, "stop", "TransactionEvent", payload, meter=float(meter_stop_wh), stopped=timestamp,
                           local_seq=local_seq)
        self.counters["tx_stopped"] += 1
        self._end_tx_profiles()
        self.kick()

    def send_live(self, action: str, payload: dict[str, Any]) -> None:
        """A non-transaction message (sent now if connected, else dropped: it is state, re-sent on boot)."""
        if action == "MeterValues" and not payload.get("meterValue"):
            return
        if self.booted.is_set():
            self._spawn(self._call_quiet(action, payload))

    def kick(self) -> None:
        self._wake.set()

    def _tx_ref(self, row: TxRow) -> Any:
        if row.backend_id is not None:
            return int(row.backend_id) if row.backend_id.lstrip("-").isdigit() else row.backend_id
        return TX_ID_PLACEHOLDER

    # -- connection ---------------------------------------------------------------------------
    async def run(self) -> None:
        be = self.config.ocpp.backend
        delay = be.reconnect_min_s
        self._publish_limit()
        while not self.stopped:
            try:
                ws = await self._connect()
            except Exception as e:  # unreachable, refused, TLS, bad URL: all retried with backoff
                self.counters["upstream_connect_failed"] += 1
                if not self._down_logged:
                    self._down_logged = True
                    msg = f"HTTP {e.response.status_code}" if isinstance(e, InvalidStatus) else repr(e)
                    self.log.warning("backend not reachable, retrying", url=self.t.url, error=msg,
                                     queued=self.queue.count(self.cbid))
                await asyncio.sleep(delay)
                delay = min(delay * 2, be.reconnect_max_s)
                continue
            delay = be.reconnect_min_s
            self._down_logged = False
            self.connects += 1
            try:
                await self._session(ws)
            except Exception:
                self.counters["upstream_session_errors"] += 1
                self.log.exception("upstream session failed")
            finally:
                self.connected.clear()
                self.booted.clear()
                self._sent_status = None
                with contextlib.suppress(Exception):
                    await ws.close()
            if not self.stopped:
                self.log.warning("backend connection lost, reconnecting", queued=self.queue.count(self.cbid))
                await asyncio.sleep(min(delay, 1.0))

    async def _connect(self) -> ClientConnection:
        headers = {}
        if self.t.password is not None:
            token = base64.b64encode(f"{self.cbid}:{self.t.password}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        kwargs: dict[str, Any] = {}
        if self.t.url.startswith("wss://"):
            ctx = ssl.create_default_context(cafile=self.t.ca_file)
            kwargs["ssl"] = ctx
        if self.t.connect_host is not None:
            kwargs["host"] = self.t.connect_host
            kwargs["port"] = self.t.connect_port
        ws = await connect(self.t.url, subprotocols=[SUBPROTOCOL_OF[self.version]],  # type: ignore[list-item]
                           additional_headers=headers, proxy=None, open_timeout=10, ping_interval=30,
                           ping_timeout=30, max_size=2**20, extensions=[upstream_deflate()], **kwargs)
        if ws.subprotocol != SUBPROTOCOL_OF[self.version]:
            await ws.close()
            raise InvalidHandshake(f"backend did not accept subprotocol {SUBPROTOCOL_OF[self.version]}")
        return ws

    async def _session(self, ws: ClientConnection) -> None:
        rpc = OcppRpc(ws, self.version, self.cbid, self._handle, counters=self.counters,
                      call_timeout=self.config.ocpp.backend.call_timeout_s, log=self.log)
        self.rpc = rpc
        self.connected.set()
        reader = asyncio.create_task(rpc.run())
        worker = asyncio.create_task(self._online(rpc))
        try:
            done, _ = await asyncio.wait({reader, worker}, return_when=asyncio.FIRST_COMPLETED)
            for t in (worker, reader):  # a failure of either is logged by run(), not swallowed
                if t in done and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        finally:
            for t in (reader, worker):
                t.cancel()
            for t in (reader, worker):
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed, Exception):
                    await t
            self.rpc = None

    async def _online(self, rpc: OcppRpc) -> None:
        await self._boot(rpc)
        self.log.info("registered at the backend", version=self.version, queued=self.queue.count(self.cbid))
        self.booted.set()
        if self._status_known:
            await self._send_status()
        else:
            self._spawn(self._status_when_unknown())
        hb = self.tasks.spawn(f"backend-heartbeat:{self.evse.id}", lambda: self._heartbeat(rpc),
                              expected=(ConnectionClosed,), evse_id=self.evse.id, charge_box_id=self.cbid)
        try:
            await self._deliver(rpc)
        finally:
            hb.cancel()

    async def _boot(self, rpc: OcppRpc) -> None:
        info = self.driver.boot_info()
        be = self.config.ocpp.backend
        own = getattr(self.driver, "boot_payload", None)
        raw = own(self.version) if own is not None else None  # the wallbox's own BootNotification
        while True:
            if raw is not None:
                payload = raw
            elif self.version == "1.6":
                payload = {"chargePointVendor": info.get("vendor", be.vendor)[:20],
                           "chargePointModel": info.get("model", be.model)[:20]}
                if info.get("serial"):
                    payload["chargePointSerialNumber"] = info["serial"][:25]
                if info.get("firmware"):
                    payload["firmwareVersion"] = info["firmware"][:50]
            else:
                station: dict[str, Any] = {"vendorName": info.get("vendor", be.vendor)[:50],
                                           "model": info.get("model", be.model)[:20]}
                if info.get("serial"):
                    station["serialNumber"] = info["serial"][:25]
                if info.get("firmware"):
                    station["firmwareVersion"] = info["firmware"][:50]
                payload = {"reason": "PowerUp", "chargingStation": station}
            try:
                res = await rpc.call("BootNotification", payload)
            except RpcError as e:
                self.log.warning("backend refused BootNotification", error=str(e))
                await asyncio.sleep(min(60.0, self.heartbeat_s))
                continue
            interval = float(res.get("interval") or self.heartbeat_s)
            if res.get("status") == "Accepted":
                if interval > 0:
                    self.heartbeat_s = interval
                return
            self.log.info("backend answered BootNotification", status=res.get("status"), retry_s=interval)
            await asyncio.sleep(max(1.0, min(interval or 10.0, 300.0)))

    async def _heartbeat(self, rpc: OcppRpc) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            with contextlib.suppress(RpcError, TimeoutError):
                await rpc.call("Heartbeat", {})

    async def _status_after_trigger(self) -> None:
        await asyncio.sleep(TRIGGER_STATUS_WAIT_S)
        if self._status_triggered:  # the wallbox did not say it again: what we know goes up
            self._status_triggered = False
            self.counters["triggered_status_sent_by_gateway"] += 1
            await self._send_status()

    async def _status_when_unknown(self) -> None:
        await asyncio.sleep(STATUS_UNKNOWN_GRACE_S)
        if not self._status_known and self.booted.is_set():
            self.counters["status_unknown_sent_unavailable"] += 1
            self._status_known = True
            await self._send_status()

    async def _send_status(self) -> None:
        rpc = self.rpc
        if rpc is None:
            return
        status = self._status
        s16, err, info = status
        ts = conv.now_iso()
        try:
            if self._status_raw is not None:  # the wallbox's own (same version): as it sent it
                if self._status0_raw is not None and self._status0_sent != self.connects:
                    self._status0_sent = self.connects  # once per connection (and whenever the wallbox sends it)
                    await rpc.call("StatusNotification", self._status0_raw)
                await rpc.call("StatusNotification", self._status_raw)
            elif self.version == "1.6":
                if self._sent_status is None:
                    await rpc.call("StatusNotification", {"connectorId": 0, "status": "Available" if s16 not in (
                        "Unavailable", "Faulted") else s16, "errorCode": "NoError", "timestamp": ts})
                payload: dict[str, Any] = {"connectorId": 1, "status": s16, "errorCode": err, "timestamp": ts}
                if info:
                    payload["info"] = info[:50]
                await rpc.call("StatusNotification", payload)
            else:
                await rpc.call("StatusNotification", {"timestamp": ts, "connectorStatus": conv.connector201_from16(s16),
                                                      "evseId": 1, "connectorId": 1})
            self._sent_status = status
        except (RpcError, TimeoutError) as e:
            self.log.warning("StatusNotification not accepted", error=str(e))
        except ConnectionClosed:
            pass

    async def _call_quiet(self, action: str, payload: dict[str, Any]) -> None:
        rpc = self.rpc
        if rpc is None:
            return
        with contextlib.suppress(RpcError, TimeoutError, ConnectionClosed):
            await rpc.call(action, payload)

    async def _deliver(self, rpc: OcppRpc) -> None:
        """Send the queued transaction messages of this charge point, oldest first, one at a time."""
        retry = self.config.ocpp.queue.retry_interval_s
        while True:
            m = self.queue.head(self.cbid)
            if m is None:
                # nothing can queue a message between head() and clear() (no await, kick() runs on the loop)
                self._wake.clear()
                await self._wake.wait()
                continue
            wait = m.due_in()
            if wait > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                continue
            payload, text = m.payload, m.text
            # the placeholder can only be in the payload when its text holds it (the walk costs more than the test)
            if (text is None or TX_ID_PLACEHOLDER in text) and _has_placeholder(payload):
                text = None  # rewritten below: encoded anew
                row = self.queue.tx(m.tx)
                if row is None or row.backend_id is None:
                    n = self.queue.bury_tx(m.tx, "the backend never assigned a transaction id")
                    self.counters["tx_messages_dead"] += n
                    self.log.error("transaction without backend id, messages moved to the dead table",
                                   tx=m.tx, messages=n)
                    continue
                from ocpp_gateway.txqueue import fill_transaction_id
                payload = fill_transaction_id(payload, row.backend_id)
            if m.kind != "update" and self.queue.durable_after(m.seq):
                # a start or stop leaves the gateway only once it is on disk: a second StartTransaction after a
                # power cut would open a second transaction at a 1.6 backend (README, "Forwarding while the fsync
                # runs")
                await self.queue.until_durable(m.seq)
            elif self.queue.durable_after(m.seq):
                self.counters["tx_forwarded_before_fsync"] += 1
            t0 = asyncio.get_running_loop().time()
            try:
                res = await rpc.call(m.action, payload, unique_id=m.uid, payload_text=text)
            except TimeoutError:
                self.counters["tx_delivery_timeouts"] += 1
                continue  # same message, same id
            except RpcError as e:
                # a meter value may have gone out while its fsync still ran: nothing is done to the message
                # (retried, moved to dead, deleted below) before its insert is durable
                await self.queue.until_durable(m.seq)
                self.counters["tx_delivery_refused"] += 1
                dead = self.queue.failed(m.seq, f"{e.code}: {e.description}", retry)
                self.log.warning("backend refused a transaction message", action=m.action, error=str(e),
                                 attempt=m.attempts + 1, moved_to_dead=dead)
                if dead:
                    self.counters["tx_messages_dead"] += 1
                    if m.kind == "start" and self.version == "1.6":
                        self.counters["tx_messages_dead"] += self.queue.bury_tx(
                            m.tx, "its StartTransaction was refused")
                continue
            self.last_latency_s = asyncio.get_running_loop().time() - t0
            await self.queue.until_durable(m.seq)  # the delete never before the insert is on disk
            if m.kind == "start" and self.version == "1.6":
                backend_id = str(res["transactionId"])
                status = (res.get("idTagInfo") or {}).get("status")
                self.queue.delivered(m.seq, backend_id=backend_id, id_status=status)
                if status not in (None, "Accepted", "ConcurrentTx"):
                    self.log.warning("backend did not accept the idTag of a transaction", tx=m.tx, status=status)
            else:
                self.queue.delivered(m.seq)
            self.counters["tx_messages_delivered"] += 1

    def _spawn(self, coro: Any) -> None:
        t = self.tasks.oneshot(f"backend-send:{self.evse.id}", coro, evse_id=self.evse.id, charge_box_id=self.cbid)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # -- calls from the backend -----------------------------------------------------------------
    async def _handle(self, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        self.counters[f"backend_{action}"] += 1
        fwd = await self._forward(action, payload)
        if fwd is not None:
            return fwd
        if self.version == "1.6":
            return await self._handle16(action, payload)
        return await self._handle201(action, payload)

    async def _forward(self, action: str, d: dict[str, Any]) -> dict[str, Any] | None:
        """A call for a wallbox of the same version, passed on as the backend sent it and answered with the
        wallbox's answer (see :mod:`ocpp_gateway.passthrough` and the README's table of what changes).
        None: the gateway answers or translates it itself."""
        forward = getattr(self.driver, "forward", None)
        if forward is None or action not in passthrough.DOWN[self.version]:
            return None
        v = self.version
        if action in ("RemoteStartTransaction", "RequestStartTransaction"):
            if d.get("chargingProfile"):
                self._add_profile(d["chargingProfile"], tx_profile_ok=True)  # the gateway's: see README
            d = {k: x for k, x in d.items() if k != "chargingProfile"}
        elif action in ("RemoteStopTransaction", "RequestStopTransaction"):
            row = self.queue.tx_by_backend(self.cbid, str(d["transactionId"]))
            if row is None or row.stopped is not None or row.local_id is None:
                return None  # the gateway answers: Rejected
            local: Any = row.local_id
            if v == "1.6":
                if not row.local_id.isdigit():
                    return None
                local = int(row.local_id)
            d = {**d, "transactionId": local}
        elif action == "TriggerMessage" and d["requestedMessage"] == "Heartbeat":
            return None  # the upstream charge point's own heartbeat
        elif action == "ChangeConfiguration" and d["key"] in passthrough.PROTECTED_16:
            self.counters["backend_protected_setting_refused"] += 1
            return {"status": "Rejected"}
        elif action == "SetVariables":
            return await self._set_variables(forward, d)
        res = await forward(v, action, d)
        if res is None:
            return None
        if action == "TriggerMessage" and d["requestedMessage"] == "StatusNotification" and \
                res.get("status") == "Accepted":
            self._status_triggered = True
            self._spawn(self._status_after_trigger())
        if action == "RequestStartTransaction" and res.get("status") == "Accepted":
            self._remote_start = (d["idToken"]["idToken"], d["remoteStartId"], time.monotonic())
        return dict(res)

    async def _set_variables(self, forward: Any, d: dict[str, Any]) -> dict[str, Any] | None:
        """2.0.1 SetVariables: a setting of the wallbox's link to the gateway is refused here, the rest is
        forwarded; the results in the order asked."""
        items = d["setVariableData"]
        protected = [(x["component"]["name"], x["variable"]["name"]) in passthrough.PROTECTED_201 for x in items]
        if not any(protected):
            return await forward("2.0.1", "SetVariables", d)  # the wallbox's answer as it gave it
        results: list[dict[str, Any] | None] = [None] * len(items)
        rest = [x for x, prot in zip(items, protected, strict=True) if not prot]
        res: dict[str, Any] = {}
        if rest:
            got_res = await forward("2.0.1", "SetVariables", {**d, "setVariableData": rest})
            if got_res is None:
                return None
            res = dict(got_res)
            got = iter(res.get("setVariableResult") or [])
            for i, prot in enumerate(protected):
                if not prot:
                    results[i] = next(got, None)
        for i, prot in enumerate(protected):
            if prot or results[i] is None:
                self.counters["backend_protected_setting_refused"] += int(prot)
                results[i] = {"attributeStatus": "Rejected", "component": items[i]["component"],
                              "variable": items[i]["variable"],
                              **({"attributeType": items[i]["attributeType"]} if "attributeType" in items[i] else {})}
        return {**res, "setVariableResult": results}

    async def _handle16(self, action: str, d: dict[str, Any]) -> dict[str, Any]:
        if action == "RemoteStartTransaction":
            if d.get("chargingProfile"):
                self._add_profile(d["chargingProfile"], tx_profile_ok=True)
            ok = await self.driver.remote_start(d["idTag"])
            return {"status": "Accepted" if ok else "Rejected"}
        if action == "RemoteStopTransaction":
            row = self.queue.tx_by_backend(self.cbid, str(d["transactionId"]))
            if row is None or row.stopped is not None:
                return {"status": "Rejected"}
            return {"status": "Accepted" if await self.driver.remote_stop(row) else "Rejected"}
        if action == "Reset":
            st = await self.driver.reset(d["type"] == "Hard")  # a 2.0.1 wallbox may answer Scheduled
            return {"status": "Accepted" if st in ("Accepted", "Scheduled") else "Rejected"}
        if action == "ChangeAvailability":
            if d["connectorId"] not in (0, 1):
                return {"status": "Rejected"}
            return {"status": await self.driver.availability(d["type"] == "Operative")}
        if action == "UnlockConnector":
            if d["connectorId"] != 1:
                return {"status": "NotSupported"}
            return {"status": await self.driver.unlock()}
        if action == "TriggerMessage":
            return {"status": await self._trigger(d["requestedMessage"])}
        if action in ("GetConfiguration", "ChangeConfiguration"):
            res = await self.driver.passthrough("1.6", action, d)
            if res is not None:
                return res
            return self._own_configuration16(action, d)
        if action == "SetChargingProfile":
            if d["connectorId"] not in (0, 1):
                return {"status": "Rejected"}
            return {"status": "Accepted" if self._add_profile(d["csChargingProfiles"]) else "Rejected"}
        if action == "ClearChargingProfile":
            return {"status": "Accepted" if self._clear_profiles(d.get("id"), d.get("chargingProfilePurpose"),
                                                                 d.get("stackLevel")) else "Unknown"}
        if action == "DataTransfer":
            return {"status": "UnknownVendorId"}
        raise self._unsupported(action)

    async def _handle201(self, action: str, d: dict[str, Any]) -> dict[str, Any]:
        if action == "RequestStartTransaction":
            if d.get("chargingProfile"):
                self._add_profile(d["chargingProfile"], tx_profile_ok=True)
            rid = d.get("remoteStartId")
            ok = await self.driver.remote_start(d["idToken"]["idToken"], rid)
            if ok and isinstance(rid, int):
                self._remote_start = (d["idToken"]["idToken"], rid, time.monotonic())
            return {"status": "Accepted" if ok else "Rejected"}
        if action == "RequestStopTransaction":
            row = self.queue.tx_by_backend(self.cbid, str(d["transactionId"]))
            if row is None or row.stopped is not None:
                return {"status": "Rejected"}
            return {"status": "Accepted" if await self.driver.remote_stop(row) else "Rejected"}
        if action == "Reset":
            return {"status": await self.driver.reset(d["type"] == "Immediate")}
        if action == "ChangeAvailability":
            st = await self.driver.availability(d["operationalStatus"] == "Operative")
            return {"status": st}
        if action == "UnlockConnector":
            if d["evseId"] != 1 or d["connectorId"] != 1:
                return {"status": "UnknownConnector"}
            st = await self.driver.unlock()
            return {"status": "UnlockFailed" if st == "NotSupported" else st}
        if action == "TriggerMessage":
            return {"status": await self._trigger(d["requestedMessage"])}
        if action in ("GetVariables", "SetVariables"):
            res = await self.driver.passthrough("2.0.1", action, d)
            if res is not None:
                return res
            if action == "GetVariables":
                return {"getVariableResult": [
                    {"attributeStatus": "UnknownComponent", "component": v["component"], "variable": v["variable"]}
                    for v in d["getVariableData"]]}
            return {"setVariableResult": [
                {"attributeStatus": "UnknownComponent", "component": v["component"], "variable": v["variable"]}
                for v in d["setVariableData"]]}
        if action == "SetChargingProfile":
            if d["evseId"] not in (0, 1):
                return {"status": "Rejected"}
            return {"status": "Accepted" if self._add_profile(d["chargingProfile"]) else "Rejected"}
        if action == "ClearChargingProfile":
            crit = d.get("chargingProfileCriteria") or {}
            ok = self._clear_profiles(d.get("chargingProfileId"), crit.get("chargingProfilePurpose"),
                                      crit.get("stackLevel"))
            return {"status": "Accepted" if ok else "Unknown"}
        if action == "DataTransfer":
            return {"status": "UnknownVendorId"}
        raise self._unsupported(action)

    def _unsupported(self, action: str) -> RpcError:
        if action in passthrough.DOWN[self.version] and getattr(self.driver, "online", None) is False:
            return RpcError("GenericError", f"{action}: the wallbox is not connected to the gateway")
        return RpcError("NotSupported", f"{action} is not supported by the gateway")

    async def ask(self, action: str, payload: dict[str, Any]) -> dict[str, Any] | None:
        """A wallbox's request whose answer is the backend's (DataTransfer, Authorize, ...): sent now and the
        backend's answer returned as it is (a CALLERROR of the backend raises :class:`RpcError`); None when
        the backend is not connected or does not answer in time (the gateway answers then)."""
        rpc = self.rpc
        if rpc is None or not self.booted.is_set():
            return None
        try:
            return await rpc.call(action, payload, timeout_s=10)
        except (TimeoutError, ConnectionClosed):
            return None

    async def _trigger(self, what: str) -> str:
        """A triggered message is always sent to the backend. Heartbeat is this charge point's own; a
        StatusNotification the wallbox is asked for goes up even when it repeats the last one (and, if the
        wallbox does not send it within TRIGGER_STATUS_WAIT_S, the status known here goes up instead)."""
        if what == "Heartbeat":
            self._spawn(self._call_quiet("Heartbeat", {}))
            return "Accepted"
        res = await self.driver.trigger(what)
        if res is not None:
            if what == "StatusNotification" and res == "Accepted":
                self._status_triggered = True
                self._spawn(self._status_after_trigger())
            return res
        if what in ("StatusNotification",):
            self._sent_status = None
            self._spawn(self._send_status())
            return "Accepted"
        if what == "Heartbeat":
            self._spawn(self._call_quiet("Heartbeat", {}))
            return "Accepted"
        if what == "MeterValues":
            trig = getattr(self.driver, "trigger_meter_values", None)
            if trig is not None:
                self._spawn(trig())
                return "Accepted"
        if what == "BootNotification":
            return "Rejected"
        return "NotImplemented"

    def _own_configuration16(self, action: str, d: dict[str, Any]) -> dict[str, Any]:
        keys = {"HeartbeatInterval": (str(int(self.heartbeat_s)), False),
                "MeterValueSampleInterval": (conv.num_str(self.meter_interval_s), False),
                "NumberOfConnectors": ("1", True),
                "ConnectorPhaseRotation": ("1." + "".join("RST"[i - 1] for i in self.evse.phase_rotation)
                                           if len(self.evse.phase_rotation) == 3 else "1.NotApplicable", True),
                "ChargeProfileMaxStackLevel": ("8", True),
                "ChargingScheduleAllowedChargingRateUnit": ("Current,Power", True),
                "SupportedFeatureProfiles": ("Core,SmartCharging,RemoteTrigger", True)}
        if action == "GetConfiguration":
            want = d.get("key") or list(keys)
            known = [{"key": k, "readonly": keys[k][1], "value": keys[k][0]} for k in want if k in keys]
            unknown = [k for k in want if k not in keys]
            res: dict[str, Any] = {"configurationKey": known}
            if unknown:
                res["unknownKey"] = unknown
            return res
        key, value = d["key"], d["value"]
        if key not in keys:
            return {"status": "NotSupported"}
        if keys[key][1]:
            return {"status": "Rejected"}
        try:
            x = float(value)
        except ValueError:
            return {"status": "Rejected"}
        if key == "HeartbeatInterval" and x >= 10:
            self.heartbeat_s = x
            return {"status": "Accepted"}
        if key == "MeterValueSampleInterval" and x >= 1:
            self.meter_interval_s = x
            return {"status": "Accepted"}
        return {"status": "Rejected"}

    # -- limits ---------------------------------------------------------------------------------
    def _kv_key(self) -> str:
        return f"profiles:{self.cbid}"

    def _load_profiles(self) -> list[Profile]:
        raw = self.queue.get_kv(self._kv_key())
        if not raw:
            return []
        try:
            return [Profile.from_json(x) for x in json.loads(raw)]
        except (ValueError, KeyError, TypeError):
            return []

    def _save_profiles(self) -> None:
        self.queue.set_kv(self._kv_key(), json.dumps([x.to_json() for x in self._profiles]))

    def _add_profile(self, d: dict[str, Any], tx_profile_ok: bool = False) -> bool:
        prof = Profile.parse(d, self.version)
        why = prof.refusal()
        if why is not None:
            # schema-valid but not a limit this charge point can follow: refused (Rejected), the profiles in force stay
            self.counters["backend_profiles_refused"] += 1
            self.log.warning("backend charging profile refused", profile_id=prof.id, reason=why)
            return False
        if prof.purpose == "TxProfile" and not tx_profile_ok and self.queue.open_tx(self.evse.id) is None:
            return False  # OCPP: a TxProfile needs a transaction
        keep = [x for x in self._profiles
                if x.id != prof.id and not (x.purpose == prof.purpose and x.stack == prof.stack)]
        if len(keep) >= MAX_PROFILES:
            # bounded: refused rather than dropping an older one (it may be the limit that keeps the fuse)
            self.counters["backend_profiles_refused"] += 1
            self.log.warning("backend charging profile refused: too many profiles installed", profile_id=prof.id,
                             installed=len(keep), max_profiles=MAX_PROFILES)
            return False
        self._profiles = [*keep, prof]
        self._save_profiles()
        self.log.info("backend charging profile received", profile_id=prof.id, purpose=prof.purpose,
                      stack_level=prof.stack, unit=prof.unit)
        self._publish_limit()
        return True

    def _clear_profiles(self, pid: int | None, purpose: str | None, stack: int | None) -> bool:
        if purpose == "ChargingStationMaxProfile":
            purpose = "ChargePointMaxProfile"
        keep = [x for x in self._profiles if not (
            (pid is None or x.id == pid) and (purpose is None or x.purpose == purpose)
            and (stack is None or x.stack == stack))]
        changed = len(keep) != len(self._profiles)
        self._profiles = keep
        if changed:
            self._save_profiles()
            self._publish_limit()
        return changed

    def _publish_limit(self) -> None:
        if self._limit_timer is not None:
            self._limit_timer.cancel()
            self._limit_timer = None
        now = datetime.now(UTC)
        if not self._profiles:
            lim = None
        else:
            open_tx = self.queue.open_tx(self.evse.id)
            started = conv_dt(open_tx.started) if open_tx else None
            lim = effective(self._profiles, now, started)
        if lim is None:
            until = now + timedelta(hours=24)
            if self._profiles:
                nxt = min((x.evaluate(now)[1] for x in self._profiles), default=until)
                until = min(until, nxt)
            msg = p.EvseLimit(evse_id=self.evse.id, active=False, valid_until=until)
        else:
            until = lim.valid_until
            phases = lim.phases if lim.phases in (1, 3) else None
            # a limit above what any connection carries is no tighter than that maximum
            cur = None if lim.current_a is None else min(lim.current_a, MAX_PROFILE_A)
            pw = None if lim.power_w is None else min(lim.power_w, MAX_PROFILE_W)
            msg = p.EvseLimit(evse_id=self.evse.id, active=True, current_a=cur, power_w=pw,
                              phases=phases, valid_until=until, id=",".join(str(i) for i in lim.ids))
        self.publish_limit(msg)
        delay = max(0.5, (until - now).total_seconds())
        if self._profiles and delay < 86400:
            self._limit_timer = asyncio.get_running_loop().call_later(delay + 0.05, self._publish_limit)

    def close(self) -> None:
        self.stopped = True
        if self._limit_timer is not None:
            self._limit_timer.cancel()
        for t in list(self._tasks):
            t.cancel()


def conv_dt(s: str) -> datetime | None:
    try:
        return datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None


def _has_placeholder(d: Any) -> bool:
    if isinstance(d, dict):
        return any(_has_placeholder(v) for v in d.values())
    if isinstance(d, list):
        return any(_has_placeholder(v) for v in d)
    return d == TX_ID_PLACEHOLDER
