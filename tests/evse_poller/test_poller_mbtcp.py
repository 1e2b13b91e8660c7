"""The poller's own Modbus TCP client (evse_poller.mbtcp) and the Link on it, over real TCP.

Checked against pymodbus as the independent reference: a pymodbus server with a plain datastore, and a
pymodbus client reading back what the fast client wrote (and reading the same registers). Misbehaving
devices are raw asyncio servers: a late answer after a timeout, a wrong transaction or unit id, a wrong
function code, a short answer, garbage, a closed connection.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from chargegate.broker import free_port
from evse_poller import transport
from evse_poller.mbtcp import ModbusExceptionResponse, ModbusProtocolError, ModbusTcpClient
from evse_poller.transport import DeviceRejected, Endpoint, Link, LinkError

UNIT = 3


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[int]:
    """A pymodbus TCP server for unit 3: 200 registers/bits per table with distinct values."""
    dev = SimDevice(UNIT, simdata=(
        [SimData(0, values=[i % 2 == 0 for i in range(208)], datatype=DataType.BITS)],
        [SimData(0, values=[i % 3 == 0 for i in range(208)], datatype=DataType.BITS)],
        [SimData(0, values=[(i * 257) & 0xFFFF for i in range(200)], datatype=DataType.REGISTERS)],
        [SimData(0, values=[(60000 + i) & 0xFFFF for i in range(200)], datatype=DataType.REGISTERS)]))
    port = free_port()
    srv = ModbusTcpServer([dev], address=("127.0.0.1", port))
    await srv.serve_forever(background=True)
    try:
        yield port
    finally:
        await srv.shutdown()


async def reference(port: int) -> AsyncModbusTcpClient:
    c = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
    assert await c.connect()
    return c


async def test_reads_match_pymodbus(server: int) -> None:
    fast = ModbusTcpClient("127.0.0.1", server)
    await fast.connect()
    ref = await reference(server)
    try:
        for address, count in [(0, 1), (5, 10), (75, 125), (190, 10)]:
            hr = await ref.read_holding_registers(address, count=count, device_id=UNIT)
            assert await fast.read("holding", address, count, UNIT) == list(hr.registers)
            ir = await ref.read_input_registers(address, count=count, device_id=UNIT)
            assert await fast.read("input", address, count, UNIT) == list(ir.registers)
        for address, count in [(0, 1), (3, 8), (7, 17), (50, 100)]:
            co = await ref.read_coils(address, count=count, device_id=UNIT)
            assert await fast.read("coil", address, count, UNIT) == [int(b) for b in co.bits[:count]]
            di = await ref.read_discrete_inputs(address, count=count, device_id=UNIT)
            assert await fast.read("discrete", address, count, UNIT) == [int(b) for b in di.bits[:count]]
    finally:
        fast.close()
        ref.close()


async def test_writes_are_what_pymodbus_reads_back(server: int) -> None:
    fast = ModbusTcpClient("127.0.0.1", server)
    await fast.connect()
    ref = await reference(server)
    try:
        await fast.write_register(20, 0xBEEF, UNIT)
        assert list((await ref.read_holding_registers(20, count=1, device_id=UNIT)).registers) == [0xBEEF]
        await fast.write_registers(30, [1, 2, 0xFFFF, 0], UNIT)
        assert list((await ref.read_holding_registers(30, count=4, device_id=UNIT)).registers) == [1, 2, 0xFFFF, 0]
        for value in (True, False, True):
            await fast.write_coil(41, value, UNIT)
            assert (await ref.read_coils(41, count=1, device_id=UNIT)).bits[0] is value
    finally:
        fast.close()
        ref.close()


async def test_exception_answer_is_a_rejection_and_the_link_stays_up(server: int) -> None:
    fast = ModbusTcpClient("127.0.0.1", server)
    await fast.connect()
    try:
        with pytest.raises(ModbusExceptionResponse) as e:
            await fast.read("holding", 190, 20, UNIT)  # beyond the datastore
        assert e.value.code == 2  # illegal data address
        assert fast.connected
        assert len(await fast.read("holding", 0, 2, UNIT)) == 2
    finally:
        fast.close()
    link = Link(Endpoint("tcp", "socket", host="127.0.0.1", port=server))
    try:
        with pytest.raises(DeviceRejected, match="Modbus exception 2"):
            await link.read("holding", 190, 20, UNIT, 1.0)
        assert link.connected and link.failures == 0
        with pytest.raises(DeviceRejected):
            await link.write("holding", 250, [1], UNIT, 1.0)
    finally:
        link.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.sampled_from(["holding", "input", "coil", "discrete"]), address=st.integers(0, 150),
       count=st.integers(1, 50))
async def test_link_reads_equal_on_both_clients(server: int, table: str, address: int, count: int) -> None:
    """The same Link, once on pymodbus and once on the fast client, reads the same values."""
    results = []
    for fast in (False, True):
        transport.FAST_TCP = fast
        link = Link(Endpoint("tcp", "socket", host="127.0.0.1", port=server))
        try:
            results.append(await link.read(table, address, count, UNIT, 1.0))  # type: ignore[arg-type]
        finally:
            link.close()
            transport.FAST_TCP = True
    assert results[0] == results[1]
    assert len(results[1]) == count


# -- misbehaving devices -------------------------------------------------------------------------------

Responder = Callable[[int, int, bytes, asyncio.StreamWriter], None]


async def raw_device(respond: Responder) -> tuple[asyncio.Server, int]:
    """A TCP server that hands every request frame (tid, unit, pdu) to ``respond``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readexactly(7)
                tid, _proto, length, unit = struct.unpack(">HHHB", head)
                pdu = await reader.readexactly(length - 1)
                respond(tid, unit, pdu, writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    port = free_port()
    srv = await asyncio.start_server(handle, "127.0.0.1", port)
    return srv, port


def frame(tid: int, unit: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


def registers(pdu: bytes) -> bytes:
    """A read holding registers answer whose values are the register addresses."""
    _fc, address, count = struct.unpack(">BHH", pdu[:5])
    return struct.pack(f">BB{count}H", pdu[0], 2 * count, *range(address, address + count))


async def test_late_answer_after_a_timeout_is_not_taken_for_the_next() -> None:
    delayed: list[tuple[int, int, bytes]] = []

    def respond(tid: int, unit: int, pdu: bytes, w: asyncio.StreamWriter) -> None:
        if not delayed:  # the first request is answered only together with the second
            delayed.append((tid, unit, pdu))
            return
        old_tid, old_unit, old_pdu = delayed[0]
        w.write(frame(old_tid, old_unit, registers(old_pdu)) + frame(tid, unit, registers(pdu)))

    srv, port = await raw_device(respond)
    c = ModbusTcpClient("127.0.0.1", port)
    await c.connect()
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await c.read("holding", 100, 2, 1)
        assert await c.read("holding", 7, 3, 1) == [7, 8, 9]
        assert c.stale_answers == 1
    finally:
        c.close()
        srv.close()


async def test_own_timeout_and_answers_split_or_joined() -> None:
    """The client's own timer (what the Link uses), and answers that come in pieces or two at a time."""
    held: list[bytes] = []

    def respond(tid: int, unit: int, pdu: bytes, w: asyncio.StreamWriter) -> None:
        _fc, address, _count = struct.unpack(">BHH", pdu[:5])
        data = frame(tid, unit, registers(pdu))
        if address == 1:  # never answered
            held.append(data)
        elif address == 2:  # in three pieces
            w.write(data[:3])
            asyncio.get_running_loop().call_later(0.02, w.write, data[3:9])
            asyncio.get_running_loop().call_later(0.04, w.write, data[9:])
        else:  # the held answer first, then this one, in one segment
            w.write(b"".join(held) + data)
            held.clear()

    srv, port = await raw_device(respond)
    c = ModbusTcpClient("127.0.0.1", port)
    await c.connect()
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(TimeoutError):
            await c.read("holding", 1, 2, 1, timeout_s=0.15)
        assert 0.14 <= loop.time() - t0 < 1.0
        assert await c.read("holding", 2, 4, 1, timeout_s=1.0) == [2, 3, 4, 5]
        assert await c.read("holding", 9, 1, 1, timeout_s=1.0) == [9]
        assert c.stale_answers == 1  # the answer to the timed-out request
    finally:
        c.close()
        srv.close()


async def test_one_timer_per_connection_keeps_each_requests_own_deadline() -> None:
    """The connection's single timer (``_Protocol.arm``): armed for an earlier request's shorter deadline it must not
    fail a later request whose deadline has not come (it moves on to it); armed for a longer one it must not let a
    later, shorter deadline pass; it lapses when nothing is pending, and a request after that is timed again."""
    def respond(tid: int, unit: int, pdu: bytes, w: asyncio.StreamWriter) -> None:
        _fc, address, _count = struct.unpack(">BHH", pdu[:5])
        data = frame(tid, unit, registers(pdu))
        if address == 1:
            return  # never answered
        delay = {2: 0.0, 3: 0.25}.get(address, 0.0)
        asyncio.get_running_loop().call_later(delay, w.write, data)

    srv, port = await raw_device(respond)
    c = ModbusTcpClient("127.0.0.1", port)
    await c.connect()
    loop = asyncio.get_running_loop()
    try:
        # answered at once under a 0.1 s deadline: the timer stays armed for it; the next request (deadline 1 s,
        # answered after 0.25 s) is still pending when that timer fires, and must get its answer
        assert await c.read("holding", 2, 1, 1, timeout_s=0.1) == [2]
        t0 = loop.time()
        assert await c.read("holding", 3, 1, 1, timeout_s=1.0) == [3]
        assert 0.2 <= loop.time() - t0 < 0.9
        # armed for a 5 s deadline by an answered request: a silent device under 0.15 s is failed in time
        assert await c.read("holding", 2, 1, 1, timeout_s=5.0) == [2]
        t0 = loop.time()
        with pytest.raises(TimeoutError):
            await c.read("holding", 1, 1, 1, timeout_s=0.15)
        assert 0.14 <= loop.time() - t0 < 1.0
        # nothing pending: the timer lapses; the next silent request is timed by a new one
        await asyncio.sleep(0.3)
        assert c._proto is not None and c._proto.timer is None
        t0 = loop.time()
        with pytest.raises(TimeoutError):
            await c.read("holding", 1, 1, 1, timeout_s=0.15)
        assert 0.14 <= loop.time() - t0 < 1.0
        # without a deadline, an armed timer does not fail the request
        assert await c.read("holding", 2, 1, 1, timeout_s=0.05) == [2]
        assert await c.read("holding", 3, 1, 1) == [3]
    finally:
        c.close()
        srv.close()
    assert c._proto is None


@pytest.mark.parametrize(("answer", "error"), [
    (lambda tid, unit, pdu: frame(tid, unit + 1, registers(pdu)), "unit"),
    (lambda tid, unit, pdu: frame(tid, unit, b"\x04" + registers(pdu)[1:]), "function code 4"),
    (lambda tid, unit, pdu: frame(tid, unit, registers(pdu)[:-2]), "registers"),
    (lambda tid, unit, pdu: frame(tid, unit, b"\x03\x04\x00\x01"), "registers"),
    (lambda tid, unit, pdu: struct.pack(">HHHB", tid, 7, 3, unit) + b"\x03\x00", "not a Modbus TCP frame"),
])
async def test_malformed_answers_are_protocol_errors(answer: Callable[[int, int, bytes], bytes], error: str) -> None:
    srv, port = await raw_device(lambda tid, unit, pdu, w: w.write(answer(tid, unit, pdu)))
    c = ModbusTcpClient("127.0.0.1", port)
    await c.connect()
    try:
        with pytest.raises(ModbusProtocolError, match=error):
            async with asyncio.timeout(2):
                await c.read("holding", 10, 2, 5)
    finally:
        c.close()
        srv.close()
    # through a Link: a LinkError (not a rejection), counted, and the connection is dropped
    srv, port = await raw_device(lambda tid, unit, pdu, w: w.write(answer(tid, unit, pdu)))
    link = Link(Endpoint("tcp", "socket", host="127.0.0.1", port=port))
    try:
        with pytest.raises(LinkError) as e:
            await link.read("holding", 10, 2, 5, 2.0)
        assert not isinstance(e.value, DeviceRejected)
        assert link.failures == 1 and not link.connected
    finally:
        link.close()
        srv.close()


async def test_unit_zero_takes_any_unit_and_write_answers_are_checked() -> None:
    def respond(tid: int, unit: int, pdu: bytes, w: asyncio.StreamWriter) -> None:
        if pdu[0] == 3:
            w.write(frame(tid, 9, registers(pdu)))
        elif pdu[0] == 6:
            w.write(frame(tid, unit, pdu))  # echo
        else:
            w.write(frame(tid, unit, pdu[:3]))  # short answer to a write

    srv, port = await raw_device(respond)
    c = ModbusTcpClient("127.0.0.1", port)
    await c.connect()
    try:
        assert await c.read("holding", 1, 1, 0) == [1]  # pymodbus does not check the unit of unit 0 either
        await c.write_register(5, 6, 2)
        with pytest.raises(ModbusProtocolError, match="write answer"):
            await c.write_registers(5, [1, 2], 2)
    finally:
        c.close()
        srv.close()


async def test_connection_closed_by_the_device_fails_the_request_at_once() -> None:
    def respond(tid: int, unit: int, pdu: bytes, w: asyncio.StreamWriter) -> None:
        w.close()

    srv, port = await raw_device(respond)
    link = Link(Endpoint("tcp", "socket", host="127.0.0.1", port=port))
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(LinkError, match="connection lost"):
            await link.read("holding", 0, 1, 1, 5.0)
        assert loop.time() - t0 < 1.0  # not the 5 s timeout
        assert not link.connected
    finally:
        link.close()
        srv.close()


async def test_refused_connection_backs_off() -> None:
    port = free_port()  # nobody listens
    link = Link(Endpoint("tcp", "socket", host="127.0.0.1", port=port), backoff_max_s=5.0)
    with pytest.raises(LinkError, match="cannot connect"):
        await link.read("holding", 0, 1, 1, 1.0)
    with pytest.raises(LinkError, match="next attempt in"):
        await link.read("holding", 0, 1, 1, 1.0)


async def test_silent_device_times_out_and_the_link_reconnects() -> None:
    answer = {"on": False}

    def respond(tid: int, unit: int, pdu: bytes, w: asyncio.StreamWriter) -> None:
        if answer["on"]:
            w.write(frame(tid, unit, registers(pdu)))

    srv, port = await raw_device(respond)
    link = Link(Endpoint("tcp", "socket", host="127.0.0.1", port=port))
    try:
        with pytest.raises(LinkError, match=r"no answer within 0\.2 s"):
            await link.read("holding", 3, 2, 1, 0.2)
        assert not link.connected and link.failures == 1
        generation = link.generation
        answer["on"] = True
        assert await link.read("holding", 3, 2, 1, 0.5) == [3, 4]
        assert link.generation == generation + 1
    finally:
        link.close()
        srv.close()
