"""The bus client's fast paths (``chargegate.bus._Client``): whole PUBLISH / PUBACK packets taken straight
from the read buffer (``_read_buffered``) and the lean QoS 1 publish (``publish_fast``) do exactly what paho's
own code does - the same messages in the same order, the same acknowledgements on the wire, the same bytes
of a PUBLISH and the same bookkeeping for a resend after a reconnect."""

from __future__ import annotations

import threading
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from chargegate.bus import _BufferedSocket, _Client, _FastInfo

TOPICS = [b"cg/evse/a/setpoint", b"cg/evse/" + b"x" * 200 + b"/status", b"t", b"cg/\xff\xfe/bad-utf8"]


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 127, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _publish(topic: bytes, payload: bytes, qos: int, retain: bool, mid: int) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + (mid.to_bytes(2, "big") if qos else b"") + payload
    return bytes([mqtt.PUBLISH | (qos << 1) | int(retain)]) + _length(len(body)) + body


packets = st.one_of(
    st.builds(_publish, st.sampled_from(TOPICS), st.binary(max_size=300), st.integers(0, 2), st.booleans(),
              st.integers(1, 65535)),
    st.builds(lambda mid: bytes([mqtt.PUBACK, 2]) + mid.to_bytes(2, "big"), st.integers(1, 65535)),
    st.just(bytes([mqtt.PINGRESP, 0])),
)


class _Wire:
    """The broker's side of the socket: hands out ``chunks`` (at most what is asked for per recv), then
    BlockingIOError; keeps what the client sends."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.sent = bytearray()

    def recv(self, n: int) -> bytes:
        if not self.chunks:
            raise BlockingIOError
        data = self.chunks.pop(0)
        if len(data) > n:
            data, rest = data[:n], data[n:]
            self.chunks.insert(0, rest)
        return data

    def send(self, data: Any) -> int:
        self.sent += bytes(data)
        return len(data)

    def close(self) -> None:
        pass

    def fileno(self) -> int:
        return -1

    def setblocking(self, flag: bool) -> None:
        pass


def _run(client: mqtt.Client, wire: _Wire, sock: Any) -> list[tuple[bytes, bytes, bool]]:
    got: list[tuple[bytes, bytes, bool]] = []
    client.on_message = lambda c, u, m: got.append((m._topic, bytes(m.payload), bool(m.retain)))
    if isinstance(client, _Client):
        client.on_publish_fast = lambda topic, payload, retain: got.append((topic.encode(), bytes(payload), retain))
    client._sock = sock
    client._state = mqtt._ConnectionState.MQTT_CS_CONNECTED
    for _ in range(100_000):
        assert client.loop_read() == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        if client._out_packet:
            client._packet_write()
        if not wire.chunks and not (isinstance(sock, _BufferedSocket) and sock.buffered()) \
                and client._in_packet["command"] == 0:
            break
    return got


@settings(max_examples=300, deadline=None)
@given(st.lists(packets, min_size=1, max_size=40), st.lists(st.integers(1, 400), min_size=1, max_size=40))
def test_buffered_packets_are_handled_as_paho_handles_them(stream: list[bytes], cuts: list[int]) -> None:
    data = b"".join(stream)
    chunks, pos = [], 0
    for c in cuts:
        if pos >= len(data):
            break
        chunks.append(data[pos:pos + c])
        pos += c
    if pos < len(data):
        chunks.append(data[pos:])
    ref_wire = _Wire(chunks)
    ref = mqtt.Client(CallbackAPIVersion.VERSION2)
    expected = _run(ref, ref_wire, ref_wire)
    ours_wire = _Wire(chunks)
    ours = _Client(CallbackAPIVersion.VERSION2)
    ours._thread = threading.current_thread()  # as in paho's network thread: packets queue without a wake-up
    got = _run(ours, ours_wire, _BufferedSocket(ours_wire))
    assert got == expected
    assert ours_wire.sent == ref_wire.sent  # the same PUBACKs (and PUBRECs) in the same order
    assert ours._in_messages.keys() == ref._in_messages.keys()  # QoS 2: paho's own handling


def test_the_fast_path_stands_aside_for_per_filter_callbacks() -> None:
    wire = _Wire([_publish(b"cg/evse/a/setpoint", b"{}", 1, False, 7)])
    c = _Client(CallbackAPIVersion.VERSION2)
    c._thread = threading.current_thread()
    filtered: list[str] = []
    c.message_callback_add("cg/evse/+/setpoint", lambda cl, u, m: filtered.append(m.topic))
    got = _run(c, wire, _BufferedSocket(wire))
    assert filtered == ["cg/evse/a/setpoint"] and got == []
    assert bytes(wire.sent) == bytes([mqtt.PUBACK, 2, 0, 7])


@pytest.mark.parametrize("retain", [False, True])
@pytest.mark.parametrize("size", [0, 5, 200, 20_000])
def test_publish_fast_queues_paho_s_packet_and_bookkeeping(retain: bool, size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    ref = _Client(CallbackAPIVersion.VERSION2)
    ours = _Client(CallbackAPIVersion.VERSION2)
    for c in (ref, ours):
        c._sock = _Wire([])
        c._thread = threading.current_thread()
    info = ref.publish("cg/evse/wb1/setpoint", payload, qos=1, retain=retain)
    assert ours.publish_fast("cg/evse/wb1/setpoint", payload, retain) == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
    (mid,) = ours._out_messages
    assert mid == info.mid
    assert [bytes(p["packet"]) for p in ours._out_packet] == [bytes(p["packet"]) for p in ref._out_packet]
    a, b = ref._out_messages[mid], ours._out_messages[mid]
    for attr in ("mid", "_topic", "payload", "qos", "retain", "dup", "state", "properties"):
        assert getattr(a, attr) == getattr(b, attr), attr
    assert ours._inflight_messages == ref._inflight_messages == 1
    assert isinstance(b.info, _FastInfo) and not b.info.is_published()
    # its PUBACK ends it
    ours._puback(mid)
    assert not ours._out_messages and ours._inflight_messages == 0 and b.info.is_published()
    # one still unacknowledged at a reconnect is sent again as a duplicate, as paho's own
    ours.publish_fast("cg/evse/wb1/setpoint", payload, retain)
    ref.publish("cg/evse/wb1/setpoint", payload, qos=1, retain=retain)
    (mid,) = ours._out_messages
    a, b = ref._out_messages[mid], ours._out_messages[mid]
    for c in (ref, ours):
        c._messages_reconnect_reset_out()
    assert (b.state, b.dup) == (a.state, a.dup) == (mqtt.mqtt_ms_publish, True)


def test_publish_fast_waits_for_an_in_flight_slot_and_respects_the_queue_limit() -> None:
    c = _Client(CallbackAPIVersion.VERSION2)
    c._sock = _Wire([])
    c._thread = threading.current_thread()
    c.max_inflight_messages_set(2)
    c.max_queued_messages_set(3)
    rcs = [c.publish_fast(f"cg/t/{i}", b"x", False) for i in range(4)]
    assert rcs[:3] == [mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS] * 3 and rcs[3] == mqtt.MQTTErrorCode.MQTT_ERR_QUEUE_SIZE
    states = [m.state for m in c._out_messages.values()]
    assert states == [mqtt.mqtt_ms_wait_for_puback] * 2 + [mqtt.mqtt_ms_queued]
    assert len(c._out_packet) == 2  # the third goes out when a PUBACK frees a slot
    c._puback(next(iter(c._out_messages)))
    assert len(c._out_packet) == 3 and c._inflight_messages == 2


@pytest.mark.parametrize("topic", ["", "cg/+/x", "cg/#"])
def test_publish_fast_refuses_what_paho_refuses(topic: str) -> None:
    c = _Client(CallbackAPIVersion.VERSION2)
    c._sock = _Wire([])
    c._thread = threading.current_thread()
    with pytest.raises(ValueError):
        c.publish_fast(topic, b"x", False)
