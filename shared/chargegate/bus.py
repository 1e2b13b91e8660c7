"""The MQTT bus for asyncio services, on paho-mqtt 2.x.

paho's network thread does the I/O and reconnects with backoff; every callback is handed to the
asyncio loop (in order, through an inbox drained by ``call_soon_threadsafe``), so service code never
runs in paho's thread.
Subscriptions are remembered and restored on every (re)connect, which also brings retained
state back. Incoming payloads are validated by the topic registry; a bad one is logged, counted
and dropped before any service code sees it.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import ssl
import struct
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.matcher import MQTTMatcher

from chargegate import payloads as p
from chargegate.topics import Registry, TopicSpec

log = structlog.get_logger("chargegate.bus")

Handler = Callable[["Message"], Awaitable[None] | None]

JOIN_MAX_BYTES = 256 * 1024  # queued packets joined into one write (see _Client._packet_write)
RECV_CHUNK = 64 * 1024  # bytes read at once (see _BufferedSocket)
READ_MAX_TURNS = 1000  # extra reads of buffered packets per turn of paho's loop (see _Client.loop_read)
MATCH_CACHE_SIZE = 20_000  # topics whose matching subscriptions are remembered (see Bus._matching)


class _Filters(MQTTMatcher):
    """paho's table of per-filter message callbacks (``message_callback_add``), which it searches for every
    message received. Its ``iter_match`` builds a recursive closure each time: a reference cycle (function,
    cell, topic list) that only the cyclic collector frees - about 6 objects of garbage per message, which
    with the services' raised collector threshold (``runtime.tune_gc``) piled up to megabytes before each
    collection (bench/footprint). The bus registers no such callbacks: with none, nothing is searched."""

    def iter_match(self, topic: str) -> Iterator[Any]:
        if not self._root._children:
            return iter(())
        return super().iter_match(topic)


class _Client(mqtt.Client):
    """paho's client with cheaper I/O for bursts (a cycle's 200 setpoints, a poller's 200 statuses).

    paho 2.x, run by ``loop_start`` (its own network thread), spends most of a burst on per-packet
    overhead rather than on the messages: a syscall to wake its thread for every packet queued, one
    ``send()`` per packet, and a scan of all unacknowledged messages for every PUBACK. Each syscall
    also hands the GIL to the other thread and waits to get it back. These overrides keep paho's
    protocol handling and only cut that overhead; they rely on paho's internals (pinned in
    requirements.lock) and are covered by tests/foundation/test_bus_io.py."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_message_filtered = _Filters()
        self._holding: int | None = None  # thread id inside one_wakeup()
        self._wake_owed = False
        # (topic, payload, retained) of every PUBLISH read by the fast path (see _read_buffered); None: paho's way
        self.on_publish_fast: Callable[[str, bytes, bool], None] | None = None

    def _packet_queue(self, command: int, packet: bytes | bytearray, mid: int, qos: int,
                      info: mqtt.MQTTMessageInfo | None = None) -> mqtt.MQTTErrorCode:
        """Queue a packet; wake the network thread only when needed. The network thread itself needs
        no wake-up (it writes whatever is queued before it waits again: ``want_write``), and inside
        ``one_wakeup()`` the wake-up is owed until the block ends."""
        thread = self._thread
        if thread is None:  # not running a network thread: paho's own way
            return super()._packet_queue(command, packet, mid, qos, info)
        self._out_packet.append({"command": command, "mid": mid, "qos": qos, "pos": 0, "to_process": len(packet),
                                 "packet": packet, "info": info})
        ident = threading.get_ident()
        if ident == thread.ident:
            return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        if ident == self._holding:
            self._wake_owed = True
            return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        self._wake()
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def _wake(self) -> None:
        wake = self._sockpairW
        if wake is not None:
            try:
                wake.send(b"0")
            except OSError:  # full (the thread is awake anyway) or closed (stopping)
                pass

    @contextmanager
    def one_wakeup(self) -> Iterator[None]:
        """Packets queued by this thread within the block wake the network thread once, at the end."""
        if self._holding is not None:  # nested
            yield
            return
        self._holding = threading.get_ident()
        try:
            yield
        finally:
            self._holding = None
            if self._wake_owed:
                self._wake_owed = False
                self._wake()

    def _create_socket(self) -> Any:
        return _BufferedSocket(super()._create_socket())

    def _create_socket_connection(self) -> Any:
        """The TCP connection to the broker with Nagle's algorithm off: a setpoint is a small packet
        that must leave at once, not wait up to 40 ms for the broker's ACK of the previous one (the
        delayed-ACK stall seen on ~7 % of limit changes). Set before TLS wraps the socket."""
        sock = super()._create_socket_connection()
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        """paho reads at most one packet per turn of its loop while it has nothing unacknowledged (a
        turn is a select(), the read and a send() of the PUBACK): go on with what is already read, so
        a burst of incoming messages is handled, and acknowledged, in a few turns. Whole PUBLISH and
        PUBACK packets already read are taken straight from the buffer (``_read_buffered``)."""
        rc = super().loop_read(max_packets)
        sock = self._sock
        turns = 0
        while (rc == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS and isinstance(sock, _BufferedSocket) and sock.buffered()
               and self._sock is sock and turns < READ_MAX_TURNS):
            self._read_buffered(sock)
            if not sock.buffered():
                break
            rc = super().loop_read(max_packets)
            turns += 1
        return rc

    def _read_buffered(self, sock: _BufferedSocket) -> None:
        """Handle the whole QoS 0/1 PUBLISH and PUBACK packets at the head of ``sock``'s buffer without paho's
        per-packet machinery (three reads through its state dict, a decoder, an ``MQTTMessage`` with its
        ``threading.Condition``, callback locks and a filter search: about half of the network thread's time
        for a burst of setpoints). The message goes to ``on_publish_fast`` and its PUBACK is queued, as paho
        does it (callback first). Anything else - another packet type, QoS 2, MQTT 5, a packet not yet
        complete, a malformed or non-UTF-8 topic - is left in the buffer for paho's own reading, which also
        reports the errors."""
        handler = self.on_publish_fast
        if (handler is None or self._in_packet["command"] != 0 or self._protocol == mqtt.MQTTv5 or self._manual_ack
                or self._on_message_filtered._root._children or self._on_publish is not None):
            return
        buf, pos = sock._buf, sock._pos
        end = len(buf)
        handled = 0
        while pos + 2 <= end:
            cmd = buf[pos]
            kind = cmd & 0xF0
            if kind != mqtt.PUBLISH and kind != mqtt.PUBACK:
                break
            length, mult, i = 0, 1, pos + 1
            while i < end and i - pos <= 4:
                byte = buf[i]
                length += (byte & 127) * mult
                mult *= 128
                i += 1
                if not byte & 128:
                    break
            else:
                break  # remaining length incomplete, or longer than 4 bytes (paho refuses it)
            if buf[i - 1] & 128:
                break
            body_end = i + length
            if body_end > end:
                break
            if kind == mqtt.PUBACK:
                if cmd != mqtt.PUBACK or length != 2:
                    break
                if self._puback((buf[i] << 8) | buf[i + 1]) != mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break  # cannot happen with the checks above; paho's way then
            else:
                qos = (cmd >> 1) & 3
                if qos > 1 or length < 2:
                    break
                tlen = (buf[i] << 8) | buf[i + 1]
                start = i + 2 + tlen + (2 if qos else 0)
                if tlen == 0 or start > body_end:
                    break
                try:
                    topic = buf[i + 2:i + 2 + tlen].decode("utf-8")
                except UnicodeDecodeError:
                    break
                handler(topic, buf[start:body_end], bool(cmd & 1))
                if qos:
                    mid = (buf[start - 2] << 8) | buf[start - 1]
                    self._packet_queue(mqtt.PUBACK, _PUBACK.pack(mqtt.PUBACK, 2, mid), mid, 1)
            pos = body_end
            handled += 1
        if not handled:
            return
        if pos >= end:
            sock._buf, sock._pos = b"", 0
        else:
            sock._pos = pos
        with self._msgtime_mutex:
            self._last_bytes_received = mqtt.time_func()

    def publish_fast(self, topic: str, payload: bytes, retain: bool) -> mqtt.MQTTErrorCode:
        """A QoS 1 PUBLISH as ``publish`` queues it, for bursts: the same bookkeeping (message id, the
        message kept for a resend after a reconnect, the in-flight count), without paho's per-message
        extras - topic checks by regular expression, payload conversion, two debug log calls, a packet
        built byte by byte and a ``threading.Condition`` per message for ``wait_for_publish`` (nobody waits
        for these; use ``publish`` for that). MQTT 5, no connection or no network thread: ``publish``."""
        t = topic.encode("utf-8")
        if (self._protocol == mqtt.MQTTv5 or self._thread is None or self._sock is None or not t or b"+" in t
                or b"#" in t or len(t) > 65535 or len(payload) > 200_000_000):
            return self.publish(topic, payload, qos=1, retain=retain).rc
        mid = self._mid_generate()
        msg = mqtt.MQTTMessage.__new__(mqtt.MQTTMessage)
        msg.timestamp = mqtt.time_func()
        msg.state = mqtt.mqtt_ms_publish
        msg.dup = False
        msg.mid = mid
        msg._topic = t
        msg.payload = payload
        msg.qos = 1
        msg.retain = retain
        msg.info = _FastInfo(mid)
        msg.properties = None
        with self._out_message_mutex:
            if (self._max_queued_messages > 0 and len(self._out_messages) >= self._max_queued_messages) \
                    or mid in self._out_messages:
                return mqtt.MQTTErrorCode.MQTT_ERR_QUEUE_SIZE
            self._out_messages[mid] = msg
            if self._max_inflight_messages and self._inflight_messages >= self._max_inflight_messages:
                msg.state = mqtt.mqtt_ms_queued  # sent by paho as acknowledgements free slots
                return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
            self._inflight_messages += 1
            msg.state = mqtt.mqtt_ms_wait_for_puback
            head = self._pack_remaining_length(bytearray((mqtt.PUBLISH | 2 | (1 if retain else 0),)),
                                               4 + len(t) + len(payload))
            packet = b"".join((head, len(t).to_bytes(2, "big"), t, mid.to_bytes(2, "big"), payload))
            return self._packet_queue(mqtt.PUBLISH, packet, mid, 1, msg.info)

    def _handle_pubackcomp(self, cmd: Any) -> mqtt.MQTTErrorCode:
        """A 3.1.1 PUBACK with no ``on_publish`` callback (the bus sets none): paho decodes it into a
        ReasonCode and a Properties object (neither is in a 3.1.1 PUBACK) before it looks the message
        up. Same bookkeeping as paho's ``_do_on_publish``, without them; anything else goes to paho."""
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or self._protocol == mqtt.MQTTv5 or self._on_publish is not None or len(packet) != 2:
            return super()._handle_pubackcomp(cmd)
        return self._puback((packet[0] << 8) | packet[1])

    def _puback(self, mid: int) -> mqtt.MQTTErrorCode:
        with self._out_message_mutex:
            msg = self._out_messages.pop(mid, None)
            if msg is None:
                return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
            msg.info._set_as_published()
            if msg.qos > 0:
                self._inflight_messages -= 1
                if self._max_inflight_messages > 0:
                    return self._update_inflight()
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def _update_inflight(self) -> mqtt.MQTTErrorCode:
        """After every PUBACK paho looks through *all* unacknowledged messages for one waiting for a
        free in-flight slot: O(n^2) for a burst of n. When every unacknowledged message is in flight,
        none is waiting."""
        if self._inflight_messages >= len(self._out_messages):
            return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._update_inflight()

    def _packet_write(self) -> mqtt.MQTTErrorCode:
        """paho sends every queued packet with its own ``send()``. Runs of packets that need nothing
        done once written (everything but QoS 0 PUBLISH, whose message info is marked published, and
        DISCONNECT) are joined into one buffer first; paho then writes it as one packet, partial writes
        included."""
        out = self._out_packet
        if len(out) > 1:
            # only this thread takes from the left (and puts back there); others append on the right
            queued = [out.popleft() for _ in range(len(out))]
            groups: list[Any] = []
            run: list[Any] = []
            size = 0
            for pk in queued:
                cmd = pk["command"] & 0xF0
                if cmd == mqtt.DISCONNECT or (cmd == mqtt.PUBLISH and pk["qos"] == 0) or size >= JOIN_MAX_BYTES:
                    groups.append(_joined(run))
                    run, size = [], 0
                    if cmd == mqtt.DISCONNECT or (cmd == mqtt.PUBLISH and pk["qos"] == 0):
                        groups.append(pk)
                        continue
                run.append(pk)
                size += pk["to_process"]
            groups.append(_joined(run))
            out.extendleft(reversed([g for g in groups if g is not None]))
        return super()._packet_write()


class _BufferedSocket:
    """A socket that reads what is there at once. paho reads a packet as 1 byte (type), 1-4 bytes
    (length) and the rest: three ``recv()`` syscalls for a 4-byte PUBACK, each giving up the GIL.
    ``pending()`` tells paho's loop that bytes are waiting here, so it reads them without waiting in
    select() (as for paho's own TLS and websocket sockets)."""

    __slots__ = ("_buf", "_pos", "_sock")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def recv(self, n: int) -> bytes:
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            data: bytes = self._sock.recv(max(n, RECV_CHUNK))
            if len(data) <= n:
                return data
            self._buf, self._pos = data, n
            return data[:n]
        end = pos + n
        if end >= len(buf):
            self._buf, self._pos = b"", 0
            return buf[pos:]
        self._pos = end
        return buf[pos:end]

    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def pending(self) -> int:
        inner = getattr(self._sock, "pending", None)
        return self.buffered() + (inner() if inner is not None else 0)

    def send(self, data: bytes | bytearray | memoryview) -> int:
        return self._sock.send(data)  # type: ignore[no-any-return]

    def close(self) -> None:
        self._sock.close()

    def fileno(self) -> int:
        return self._sock.fileno()  # type: ignore[no-any-return]

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def __getattr__(self, name: str) -> Any:  # anything else of the socket (getpeercert, ...)
        return getattr(self._sock, name)


class _FastInfo(mqtt.MQTTMessageInfo):
    """The message info of ``publish_fast``: its state without the ``threading.Condition`` that paho makes
    for every message (``wait_for_publish`` is not for these messages)."""

    __slots__ = ()

    def __init__(self, mid: int) -> None:
        self.mid = mid
        self._published = False
        self.rc = mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        self._iterpos = 0

    def _set_as_published(self) -> None:
        self._published = True

    def is_published(self) -> bool:
        if self.rc == mqtt.MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise ValueError("Message is not queued due to ERR_QUEUE_SIZE")
        if self.rc != mqtt.MQTTErrorCode.MQTT_ERR_AGAIN and self.rc > 0:
            raise RuntimeError(f"Message publish failed: {mqtt.error_string(self.rc)}")
        return self._published

    def wait_for_publish(self, timeout: float | None = None) -> None:
        raise RuntimeError("wait_for_publish() is not available for a message of publish_fast()")


_PUBACK = struct.Struct("!BBH")


def _joined(run: list[Any]) -> Any:
    """One queued packet for a run of packets that need nothing done once written."""
    if len(run) <= 1:
        return run[0] if run else None
    data = b"".join(memoryview(pk["packet"])[pk["pos"]:] for pk in run)
    first = run[0]
    return {"command": first["command"], "mid": first["mid"], "qos": first["qos"], "pos": 0, "to_process": len(data),
            "packet": data, "info": None}


@dataclass(frozen=True)
class Message:
    topic: str
    spec: TopicSpec
    params: dict[str, str]
    payload: p.Payload
    retained: bool


@dataclass
class _Sub:
    filter: str
    name: str | None  # registry name; None = raw
    handler: Handler | None = None
    queue: asyncio.Queue[Any] | None = None
    order: int = 0  # position among the bus's subscriptions (handlers run in subscription order)

    @property
    def exact(self) -> bool:
        """A filter without wildcards matches exactly one topic: itself."""
        return "+" not in self.filter and "#" not in self.filter


SUBSCRIBE_CHUNK = 200  # filters per SUBSCRIBE packet on (re)connect


@dataclass
class BusSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False
    keepalive: int = 15
    reconnect_min_s: float = 0.2
    reconnect_max_s: float = 2.0
    extra: dict[str, Any] = field(default_factory=dict)
    # QoS 1 messages in flight at once. paho's default (20) paces a burst - the load controller's
    # 200 setpoints after a grid limit, a poller's 200 statuses - by round trips to the broker.
    max_inflight: int = 1000


class Bus:
    """A typed MQTT connection for one service."""

    def __init__(self, service: str, registry: Registry, settings: BusSettings,
                 will: p.Payload | None = None, will_topic: str | None = None) -> None:
        self.service = service
        self.registry = registry
        self.settings = settings
        self.connected = asyncio.Event()
        self.connections = 0  # successful connects so far
        self.dropped_publishes = 0
        self._subs: list[_Sub] = []
        self._added = 0  # subscriptions added so far (their ``order``)
        # filters without wildcards (a service's per-EVSE subscriptions: hundreds at a car park) by their topic,
        # and the others: a topic seen for the first time is tried against the wildcard filters only
        self._exact: dict[str, list[_Sub]] = {}
        self._wild: list[_Sub] = []
        # topic -> the subscriptions it matches, filled on first sight with paho's own matcher (exact MQTT
        # semantics: +, #, $-topics) and dropped whenever the subscriptions change
        self._matches: dict[str, tuple[_Sub, ...]] = {}
        # paho's thread -> asyncio loop: events in order, one wake-up of the loop per batch (see _post)
        self._inbox: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._drain_scheduled = False
        # last retained payload per topic published by this bus: republished after a reconnect, so
        # state survives a broker that lost it (SIGKILL before its autosave)
        self._retained: dict[str, tuple[bytes, int]] = {}
        self._on_connect: list[Callable[[], Awaitable[None] | None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._logged_down = False
        client_id = f"{service}-{uuid.uuid4().hex[:8]}"
        self._client = _Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        self._client.max_queued_messages_set(10_000)
        self._client.max_inflight_messages_set(max(1, settings.max_inflight))
        self._client.reconnect_delay_set(min_delay=1, max_delay=max(1, int(settings.reconnect_max_s)))
        if settings.username:
            self._client.username_pw_set(settings.username, settings.password)
        if settings.ca_file or settings.cert_file:
            self._client.tls_set(ca_certs=settings.ca_file, certfile=settings.cert_file,
                                 keyfile=settings.key_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            self._client.tls_insecure_set(settings.tls_insecure)
        if will is not None and will_topic is not None:
            self._client.will_set(will_topic, will.to_json(), qos=1, retain=True)
        self._client.on_connect = self._paho_connect
        self._client.on_disconnect = self._paho_disconnect
        self._client.on_message = self._paho_message
        self._client.on_publish_fast = self._paho_fast

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, wait: float | None = None) -> None:
        """Connect in the background (retrying until the broker is there)."""
        self._loop = asyncio.get_running_loop()
        # events posted for a previous loop went with it (as its call_soon_threadsafe callbacks would)
        self._inbox.clear()
        self._drain_scheduled = False
        self._client.connect_async(self.settings.host, self.settings.port, keepalive=self.settings.keepalive)
        self._client.loop_start()
        if wait is not None:
            await asyncio.wait_for(self.connected.wait(), wait)

    async def stop(self, final: p.Payload | None = None, final_topic: str | None = None) -> None:
        """Publish ``final`` (e.g. health offline) if connected, then disconnect cleanly."""
        self._closing = True
        if final is not None and final_topic is not None and self.connected.is_set():
            info = self._client.publish(final_topic, final.to_json(), qos=1, retain=True)
            await asyncio.get_running_loop().run_in_executor(None, lambda: info.wait_for_publish(1.0))
        self._client.disconnect()
        await asyncio.get_running_loop().run_in_executor(None, self._client.loop_stop)

    def on_connect(self, fn: Callable[[], Awaitable[None] | None]) -> None:
        """Run ``fn`` after every (re)connect, e.g. to republish state."""
        self._on_connect.append(fn)

    # -- publishing --------------------------------------------------------------------------
    def publish(self, name: str, payload: p.Payload, **params: str) -> None:
        spec = self.registry.spec(name)
        if not isinstance(payload, spec.model):
            raise TypeError(f"{name} takes {spec.model.__name__}, not {type(payload).__name__}")
        self.publish_raw(self.registry.topic(name, **params), payload.to_json(), spec.qos, spec.retained)

    def publish_raw(self, topic: str, data: bytes, qos: int = 0, retain: bool = False) -> None:
        if retain:
            if data:
                self._retained[topic] = (data, qos)
            else:
                self._retained.pop(topic, None)
        # QoS 1 (setpoints, state) through the lean path: the same bookkeeping at a fraction of the cost
        rc = (self._client.publish_fast(topic, data, retain) if qos == 1
              else self._client.publish(topic, data, qos=qos, retain=retain).rc)
        if rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            self.dropped_publishes += 1
            log.warning("publish failed", topic=topic, rc=mqtt.error_string(rc))

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Publish a burst (e.g. a cycle's setpoints) with one wake-up of the MQTT client's network
        thread instead of one per message. The burst may wait until the block ends; keep it short and
        free of awaits."""
        with self._client.one_wakeup():
            yield

    def clear(self, name: str, **params: str) -> None:
        """Remove a retained state topic (empty retained message)."""
        self.publish_raw(self.registry.topic(name, **params), b"", 1, True)

    # -- subscribing -------------------------------------------------------------------------
    def subscribe(self, name: str, handler: Handler, **params: str) -> None:
        """Call ``handler(message)`` for every valid message of topic ``name``. Parameters given are fixed
        (``evse_id="wb1"``: that EVSE's topic only; the broker sends no other), the others are ``+``."""
        self._add(_Sub(self.registry.subscription(name, **params), name, handler=handler))

    def unsubscribe(self, name: str, **params: str) -> int:
        """Drop every subscription ``subscribe(name, ..., **params)`` made (e.g. of an EVSE no longer
        configured); the broker is told when no other subscription of this bus uses the same filter. Returns
        how many were dropped."""
        topic_filter = self.registry.subscription(name, **params)
        gone = [s for s in self._subs if s.filter == topic_filter and s.name == name]
        if not gone:
            return 0
        self._subs = [s for s in self._subs if not (s.filter == topic_filter and s.name == name)]
        self._index()
        if self.connected.is_set() and all(s.filter != topic_filter for s in self._subs):
            self._client.unsubscribe(topic_filter)
        return len(gone)

    def subscribe_raw(self, topic_filter: str, handler: Callable[[str, bytes, bool], Any]) -> None:
        """Unvalidated access for tools such as the status view (``handler(topic, payload, retained)``)."""
        self._add(_Sub(topic_filter, None, handler=handler))  # type: ignore[arg-type]

    async def messages(self, name: str, **params: str) -> AsyncIterator[Message]:
        """Iterate over valid messages of topic ``name``."""
        q: asyncio.Queue[Message] = asyncio.Queue(maxsize=10_000)
        self._add(_Sub(self.registry.subscription(name, **params), name, queue=q))
        while True:
            yield await q.get()

    def _add(self, sub: _Sub) -> None:
        sub.order = self._added
        self._added += 1
        self._subs.append(sub)
        if sub.exact:
            self._exact.setdefault(sub.filter, []).append(sub)
        else:
            self._wild.append(sub)
        self._matches = {}
        if self.connected.is_set():
            self._client.subscribe(sub.filter, qos=1)

    def _index(self) -> None:
        self._exact = {}
        self._wild = []
        for s in self._subs:
            if s.exact:
                self._exact.setdefault(s.filter, []).append(s)
            else:
                self._wild.append(s)
        self._matches = {}

    def _subscribe_all(self, client: mqtt.Client, filters: Iterable[str]) -> None:
        """Subscribe ``filters`` with a few SUBSCRIBE packets (a car park's per-EVSE filters: hundreds)."""
        todo = sorted(filters)
        for i in range(0, len(todo), SUBSCRIBE_CHUNK):
            client.subscribe([(f, 1) for f in todo[i:i + SUBSCRIBE_CHUNK]])

    # -- paho callbacks (paho's thread) ------------------------------------------------------
    def _paho_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            if not self._logged_down:
                log.warning("broker refused connection", reason=str(reason), host=self.settings.host,
                            port=self.settings.port)
                self._logged_down = True
            return
        done = {s.filter for s in list(self._subs)}
        self._subscribe_all(client, done)
        assert self._loop is not None
        self._post(self._connected, done)

    def _paho_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._post(self._disconnected, str(reason))

    def _paho_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._post(self._dispatch, msg.topic, msg.payload, bool(msg.retain))

    def _paho_fast(self, topic: str, payload: bytes, retained: bool) -> None:
        self._post(self._dispatch, topic, payload, retained)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        """Hand ``fn(*args)`` to the asyncio loop, in order. One ``call_soon_threadsafe`` (a syscall to
        wake the loop, a GIL hand-over) per batch instead of per message: events queue up in the
        inbox and one drain runs all that are there."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        self._inbox.append((fn, args))
        if not self._drain_scheduled:
            self._drain_scheduled = True
            try:
                loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # closed meanwhile
                self._drain_scheduled = False

    # -- asyncio side ------------------------------------------------------------------------
    def _drain(self) -> None:
        # reset first: an event posted from now on schedules another drain, so none is left behind
        self._drain_scheduled = False
        inbox = self._inbox
        for _ in range(len(inbox)):  # what is there now; later ones have their own drain
            fn, args = inbox.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("bus event failed", handler=getattr(fn, "__qualname__", str(fn)))

    def _connected(self, subscribed: set[str] | None = None) -> None:
        self.connections += 1
        self._logged_down = False
        self.connected.set()
        # subscriptions added on the loop between paho's connect callback and this point were not
        # sent (``connected`` was not set yet): send them now, or they would be lost until a reconnect
        if subscribed is not None:
            self._subscribe_all(self._client, {s.filter for s in self._subs} - subscribed)
        log.info("bus connected", host=self.settings.host, port=self.settings.port, connections=self.connections)
        if self.connections > 1:
            for topic, (data, qos) in list(self._retained.items()):
                self._client.publish(topic, data, qos=qos, retain=True)
        for fn in self._on_connect:
            self._run(fn)

    def _disconnected(self, reason: str) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if was and not self._closing:
            log.warning("bus disconnected, reconnecting", reason=reason)

    def _matching(self, topic: str) -> tuple[_Sub, ...]:
        """The subscriptions ``topic`` matches, in subscription order. paho's ``topic_matches_sub``
        builds a matcher on every call; with many subscriptions and a burst of messages that showed in
        the profile, so the answer is kept per topic (bounded: cleared when full)."""
        subs = self._matches.get(topic)
        if subs is None:
            found = [*self._exact.get(topic, ()), *(s for s in self._wild if mqtt.topic_matches_sub(s.filter, topic))]
            found.sort(key=lambda s: s.order)
            subs = tuple(found)
            if len(self._matches) >= MATCH_CACHE_SIZE:
                self._matches.clear()
            self._matches[topic] = subs
        return subs

    def _dispatch(self, topic: str, payload: bytes, retained: bool) -> None:
        parsed: tuple[TopicSpec, dict[str, str], p.Payload] | None = None
        tried = False
        for sub in self._matching(topic):
            if sub.name is None:
                self._run(sub.handler, topic, payload, retained)  # type: ignore[arg-type]
                continue
            if not tried:
                parsed = self.registry.parse(topic, payload)
                tried = True
            if parsed is None or parsed[0].name != sub.name:
                continue
            msg = Message(topic, parsed[0], parsed[1], parsed[2], retained)
            if sub.queue is not None:
                try:
                    sub.queue.put_nowait(msg)
                except asyncio.QueueFull:
                    log.warning("subscriber queue full, message dropped", topic=topic)
            elif sub.handler is not None:
                self._run(sub.handler, msg)

    def _run(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            res = fn(*args)
        except Exception:
            log.exception("bus handler failed", handler=getattr(fn, "__qualname__", str(fn)))
            return
        if res is not None and inspect.isawaitable(res):  # (a synchronous handler returns None: no look-up)
            task = asyncio.ensure_future(res)
            task.add_done_callback(_log_task_error)


def _log_task_error(task: asyncio.Future[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("bus handler failed", error=repr(exc), exc_info=exc)
