"""The bus's cheaper paho I/O (``chargegate.bus._Client``, ``_BufferedSocket``, ``Bus._post``): bursts of
QoS 1 messages arrive complete and in order and are all acknowledged, with and without ``Bus.batch()``,
with an in-flight window smaller than the burst (messages wait for a slot); packets joined into one
write keep their bytes, their order and paho's bookkeeping (QoS 0 message info marked published); the
buffered socket hands out the byte stream unchanged; events from paho's thread reach the loop in order
and none is lost."""

from __future__ import annotations

import asyncio
import dataclasses

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from chargegate.broker import bus_settings
from chargegate.bus import Bus, BusSettings, _BufferedSocket, _Client
from chargegate.topics import Registry
from conftest import BrokerHandle, wait_for


async def _pair(broker: BrokerHandle, max_inflight: int | None = None) -> tuple[Bus, Bus]:
    reg = Registry(broker.config.site.topic_root)
    settings = bus_settings(broker.config, "load-controller")
    if max_inflight is not None:
        settings = dataclasses.replace(settings, max_inflight=max_inflight)
    pub = Bus("load-controller", reg, settings)
    sub = Bus("evse-poller", reg, bus_settings(broker.config, "evse-poller"))
    await pub.start(wait=5)
    await sub.start(wait=5)
    return pub, sub


@pytest.mark.parametrize(("batched", "max_inflight"), [(True, None), (False, None), (True, 7), (False, 7)])
async def test_burst_arrives_complete_in_order_and_acknowledged(broker: BrokerHandle, batched: bool,
                                                                max_inflight: int | None) -> None:
    pub, sub = await _pair(broker, max_inflight)
    root = broker.config.site.topic_root
    got: list[bytes] = []
    sub.subscribe_raw(f"{root}/evse/+/setpoint",
                      lambda t, payload, r: got.append(payload) if "/iotest" in t and not r else None)
    await wait_for(lambda: sub._client._sock is not None)
    await asyncio.sleep(0.2)  # the subscription is in place
    try:
        sent = [f'{{"n":{i}}}'.encode() for i in range(500)]
        if batched:
            with pub.batch():
                for i, data in enumerate(sent):
                    pub.publish_raw(f"{root}/evse/iotest{i % 3}/setpoint", data, qos=1)
        else:
            for i, data in enumerate(sent):
                pub.publish_raw(f"{root}/evse/iotest{i % 3}/setpoint", data, qos=1)
        await wait_for(lambda: len(got) >= len(sent), timeout=10)
        assert got == sent
        await wait_for(lambda: not pub._client._out_messages and pub._client._inflight_messages == 0)
        assert pub.dropped_publishes == 0
    finally:
        await pub.stop()
        await sub.stop()


class _Sock:
    """A socket that takes at most ``chunk`` bytes per send()."""

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.data = bytearray()
        self.sends = 0

    def close(self) -> None:
        pass

    def send(self, buf: bytes | bytearray | memoryview) -> int:
        self.sends += 1
        n = min(self.chunk, len(buf))
        self.data += bytes(buf[:n])
        return n


@pytest.mark.parametrize("chunk", [1, 7, 100, 1_000_000])
def test_joined_writes_keep_bytes_order_and_bookkeeping(chunk: int) -> None:
    from paho.mqtt.enums import CallbackAPIVersion

    c = _Client(CallbackAPIVersion.VERSION2, client_id="t")
    sock = _Sock(chunk)
    c._sock = sock  # type: ignore[assignment]
    expected = bytearray()
    infos = []
    # QoS 1 publishes and PUBACKs (joined), a QoS 0 publish (on its own: its info is marked published),
    # then more QoS 1
    for i in range(30):
        qos = 0 if i in (10, 11, 25) else 1
        cmd = mqtt.PUBACK if i % 4 == 3 else (mqtt.PUBLISH | (qos << 1))
        pkt = bytearray([cmd]) + f"packet-{i}-".encode() * 3
        info = mqtt.MQTTMessageInfo(i)
        infos.append((qos, cmd, info))
        c._out_packet.append({"command": cmd, "mid": i, "qos": qos, "pos": 0, "to_process": len(pkt),
                              "packet": pkt, "info": info})
        expected += pkt
    for _ in range(100_000):
        if not c._out_packet:
            break
        assert c._packet_write() == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
    assert not c._out_packet
    assert sock.data == expected
    for qos, cmd, info in infos:
        assert info.is_published() == ((cmd & 0xF0) == mqtt.PUBLISH and qos == 0)
    if chunk >= len(expected):
        assert sock.sends == 5  # [0-9] 10 [11-24] 25 [26-29]: QoS 0 publishes on their own


class _RecvSock:
    """Hands out ``chunks`` one per recv() (at most the size asked for), then raises BlockingIOError."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.calls = 0

    def recv(self, n: int) -> bytes:
        self.calls += 1
        if not self.chunks:
            raise BlockingIOError
        data = self.chunks.pop(0)
        if len(data) > n:
            data, rest = data[:n], data[n:]
            self.chunks.insert(0, rest)
        return data


@given(st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=8),
       st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=60))
def test_buffered_socket_hands_out_the_stream_unchanged(chunks: list[bytes], sizes: list[int]) -> None:
    sock = _BufferedSocket(_RecvSock(chunks))
    stream = b"".join(chunks)
    got = b""
    for n in sizes:
        try:
            data = sock.recv(n)
        except BlockingIOError:
            assert got == stream and sock.pending() == 0
            break
        assert 0 < len(data) <= n
        got += data
        assert sock.pending() == sock.buffered()
        assert stream.startswith(got)
    if len(got) == len(stream):
        assert sock.pending() == 0


def test_buffered_socket_reads_a_burst_with_one_recv() -> None:
    pubacks = b"".join(bytes([0x40, 2, 0, i]) for i in range(200))
    raw = _RecvSock([pubacks])
    sock = _BufferedSocket(raw)
    got = b""
    for _ in range(200):  # paho: type byte, length byte, then the rest
        got += sock.recv(1) + sock.recv(1) + sock.recv(2)
    assert got == pubacks and raw.calls == 1 and sock.pending() == 0


async def test_events_from_paho_thread_run_in_order_and_none_is_lost() -> None:
    import asyncio
    import threading

    bus = Bus("load-controller", Registry(), BusSettings())
    bus._loop = asyncio.get_running_loop()
    got: list[tuple[int, int]] = []

    def post(t: int) -> None:
        for i in range(2000):
            bus._post(lambda t=t, i=i: got.append((t, i)))

    threads = [threading.Thread(target=post, args=(t,)) for t in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    await wait_for(lambda: len(got) == 6000)
    for t in range(3):
        assert [i for tt, i in got if tt == t] == list(range(2000))
    assert not bus._inbox



def _received(topic: str) -> mqtt.MQTTMessage:
    msg = mqtt.MQTTMessage(mid=1, topic=topic.encode())
    msg.payload = b"{}"
    return msg


def _garbage_of(client: mqtt.Client, topic: str, n: int = 50) -> int:
    """Objects the cyclic collector frees after ``client`` handled ``n`` received messages."""
    import gc

    gc.collect()
    gc.disable()
    try:
        for _ in range(n):
            client._handle_on_message(_received(topic))
        return gc.collect()
    finally:
        gc.enable()


def test_a_received_message_leaves_no_cyclic_garbage() -> None:
    """paho searches its per-filter callbacks for every message with a recursive closure, a reference cycle
    per message; the bus's client has none to search and leaves nothing for the collector."""
    got: list[str] = []
    plain = mqtt.Client(CallbackAPIVersion.VERSION2)
    plain.on_message = lambda c, u, m: got.append(m.topic)
    assert _garbage_of(plain, "cg/evse/a/setpoint") >= 50  # paho's own: the cycle this avoids
    ours = _Client(CallbackAPIVersion.VERSION2)
    ours.on_message = lambda c, u, m: got.append(m.topic)
    assert _garbage_of(ours, "cg/evse/a/setpoint") == 0
    assert got == ["cg/evse/a/setpoint"] * 100


def test_per_filter_callbacks_still_work() -> None:
    ours = _Client(CallbackAPIVersion.VERSION2)
    general: list[str] = []
    filtered: list[str] = []
    ours.on_message = lambda c, u, m: general.append(m.topic)
    ours.message_callback_add("cg/evse/+/setpoint", lambda c, u, m: filtered.append(m.topic))
    ours._handle_on_message(_received("cg/evse/a/setpoint"))
    ours._handle_on_message(_received("cg/evse/a/status"))
    assert filtered == ["cg/evse/a/setpoint"] and general == ["cg/evse/a/status"]
    ours.message_callback_remove("cg/evse/+/setpoint")
    ours._handle_on_message(_received("cg/evse/a/setpoint"))
    assert general == ["cg/evse/a/status", "cg/evse/a/setpoint"]
