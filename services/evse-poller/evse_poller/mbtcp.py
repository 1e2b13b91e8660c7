"""A small asyncio Modbus TCP client: the poller's fast path for wallboxes on their own TCP address.

Only what the poller sends: read coils / discrete inputs / holding / input registers (FC 1-4), write a
single coil (FC 5), a single register (FC 6) and several registers (FC 16), one request at a time (the
:class:`evse_poller.transport.Link` lock serialises them; the link also sets the timeout per request
and drops the connection after one). pymodbus does the same over its general transport, framer and
PDU class layers, at about 1.8 times the user CPU per request (54 against 30 µs through the Link,
bench/poller/README.md); it stays in use for RTU and ASCII (on a serial line or through a TCP gateway).

Answers are checked as strictly as pymodbus checks them: the transaction id and, for a non-zero unit
id, the unit id must match (a late answer to an earlier, timed-out request is dropped), the function
code must be the request's (or its exception code), and a read answer must carry exactly the registers
asked for. Anything malformed is a :class:`ModbusProtocolError` and the connection is dropped.
"""

from __future__ import annotations

import asyncio
import math
import struct
from typing import Literal, cast

from evse_poller.resolve import resolve

Table = Literal["holding", "input", "coil", "discrete"]

READ_FC: dict[str, int] = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}
_MBAP = struct.Struct(">HHHB")  # transaction id, protocol id (0), length (unit id + PDU), unit id
_REQ_READ = struct.Struct(">BHH")  # function code, address, count (also FC 5 and FC 6: address, value)
MAX_PDU = 253


class ModbusProtocolError(Exception):
    """A malformed or unexpected answer, or the connection went away during a request."""


class ModbusExceptionResponse(Exception):
    """The device answered with a Modbus exception (it is there, but refused the request)."""

    def __init__(self, function: int, code: int) -> None:
        super().__init__(f"function {function}: Modbus exception {code}")
        self.function = function
        self.code = code


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.tid = 0
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.stale = 0  # answers to no pending request (late answers after a timeout)
        self.lost: Exception | None = None
        # the pending request's deadline (loop time; inf: none) and the connection's one timer (see _check_deadline)
        self.deadline = math.inf
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = math.inf

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("connection closed by the device")
        self.transport = None
        self.disarm()
        self._fail(ModbusProtocolError(f"connection lost: {self.lost}"))

    def arm(self, loop: asyncio.AbstractEventLoop, timeout_s: float | None) -> None:
        """The deadline of the request being sent. One timer per connection, not one per request (a uvloop
        timer created and cancelled for every request: ~1.4 us of a request, timeit): it stays armed
        while requests follow each other and, when it fires, fails the pending request if that one's deadline
        has passed, or moves on to its deadline; with no request pending it lapses."""
        if timeout_s is None:
            self.deadline = math.inf
            return
        self.deadline = deadline = loop.time() + timeout_s
        if self.timer is None or self.timer_at > deadline:  # none armed, or armed too late for this one
            if self.timer is not None:
                self.timer.cancel()
            self.timer_at = deadline
            self.timer = loop.call_at(deadline, self._check_deadline, loop)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.timer_at = math.inf

    def _check_deadline(self, loop: asyncio.AbstractEventLoop) -> None:
        self.timer = None
        self.timer_at = math.inf
        w = self.waiter
        if w is None or w.done() or self.deadline == math.inf:
            return  # nothing pending (or no deadline): the next request arms it again
        if loop.time() >= self.deadline:
            w.set_exception(TimeoutError())
        else:
            self.timer_at = self.deadline
            self.timer = loop.call_at(self.deadline, self._check_deadline, loop)

    def _fail(self, exc: Exception) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(exc)

    def data_received(self, data: bytes) -> None:
        if not self.buf and len(data) >= 7:  # the usual case: exactly one whole answer
            tid, proto, length, unit = _MBAP.unpack_from(data)
            if proto == 0 and 2 <= length <= MAX_PDU + 1 and len(data) == 6 + length:
                w = self.waiter
                if w is not None and not w.done() and tid == self.tid:
                    w.set_result((unit, data[7:]))
                else:
                    self.stale += 1
                return
        buf = self.buf
        buf += data
        while len(buf) >= 7:
            tid, proto, length, unit = _MBAP.unpack_from(buf)
            if proto != 0 or not 2 <= length <= MAX_PDU + 1:
                self._fail(ModbusProtocolError(f"not a Modbus TCP frame (protocol {proto}, length {length})"))
                buf.clear()
                if self.transport is not None:
                    self.transport.abort()
                return
            end = 6 + length
            if len(buf) < end:
                return
            pdu = bytes(buf[7:end])
            del buf[:end]
            w = self.waiter
            if w is not None and not w.done() and tid == self.tid:
                w.set_result((unit, pdu))
            else:
                self.stale += 1


class ModbusTcpClient:
    """One Modbus TCP connection. Not safe for concurrent requests: the caller serialises them."""

    def __init__(self, host: str, port: int, connect_timeout_s: float = 2.0) -> None:
        self.host = host
        self.port = port
        self.connect_timeout_s = connect_timeout_s
        self._proto: _Protocol | None = None

    @property
    def connected(self) -> bool:
        p = self._proto
        return p is not None and p.transport is not None and not p.transport.is_closing()

    @property
    def stale_answers(self) -> int:
        return self._proto.stale if self._proto is not None else 0

    async def connect(self) -> None:
        """Open the connection (raises OSError or TimeoutError)."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout_s):
            addr = await resolve(self.host, self.port, self.connect_timeout_s)
            _, proto = await loop.create_connection(_Protocol, addr, self.port)
        self._proto = proto

    def close(self) -> None:
        p = self._proto
        self._proto = None
        if p is not None:
            if p.transport is not None:
                p.transport.abort()
            p.disarm()
            p._fail(ModbusProtocolError("connection closed"))

    async def request(self, unit: int, pdu: bytes, timeout_s: float | None = None) -> bytes:
        """Send one request PDU; returns the answer's PDU (function code first). Without an answer within
        ``timeout_s``: TimeoutError (the connection should then be dropped; a late answer is discarded
        anyway). The deadline is kept on the connection's one loop timer (``_Protocol.arm``): ``asyncio.timeout``
        was the biggest item of a request's Python time."""
        p = self._proto
        if p is None or p.transport is None or p.transport.is_closing():
            raise ModbusProtocolError("not connected")
        p.tid = p.tid + 1 if p.tid < 0xFFFF else 1
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[tuple[int, bytes]] = loop.create_future()
        p.waiter = waiter
        p.transport.write(_MBAP.pack(p.tid, 0, len(pdu) + 1, unit) + pdu)
        p.arm(loop, timeout_s)
        try:
            r_unit, answer = await waiter
        finally:
            p.waiter = None
        if unit and r_unit != unit:
            raise ModbusProtocolError(f"answer from unit {r_unit} to a request to unit {unit}")
        fc = pdu[0]
        if answer[0] == fc | 0x80:
            raise ModbusExceptionResponse(fc, answer[1] if len(answer) > 1 else 0)
        if answer[0] != fc:
            raise ModbusProtocolError(f"answer has function code {answer[0]}, request {fc}")
        return answer

    async def read(self, table: Table, address: int, count: int, unit: int, timeout_s: float | None = None
                   ) -> list[int]:
        """Registers (0..65535) or bits (0/1) from ``address`` on."""
        fc = READ_FC[table]
        answer = await self.request(unit, _REQ_READ.pack(fc, address, count), timeout_s)
        n = answer[1] if len(answer) > 1 else -1
        if fc >= 3:
            if n != 2 * count or len(answer) != 2 + n:
                raise ModbusProtocolError(f"answer has {max(n, 0) // 2} registers")
            return list(struct.unpack_from(f">{count}H", answer, 2))
        if n != (count + 7) // 8 or len(answer) != 2 + n:
            raise ModbusProtocolError(f"short answer ({max(n, 0) * 8} bits)")
        data = answer[2:]
        return [(data[i >> 3] >> (i & 7)) & 1 for i in range(count)]

    async def write_register(self, address: int, value: int, unit: int, timeout_s: float | None = None) -> None:
        answer = await self.request(unit, _REQ_READ.pack(6, address, value), timeout_s)
        if len(answer) != 5:
            raise ModbusProtocolError(f"write answer of {len(answer)} bytes")

    async def write_registers(self, address: int, values: list[int], unit: int, timeout_s: float | None = None
                              ) -> None:
        n = len(values)
        answer = await self.request(unit, struct.pack(f">BHHB{n}H", 16, address, n, 2 * n, *values), timeout_s)
        if len(answer) != 5:
            raise ModbusProtocolError(f"write answer of {len(answer)} bytes")

    async def write_coil(self, address: int, value: bool, unit: int, timeout_s: float | None = None) -> None:
        answer = await self.request(unit, _REQ_READ.pack(5, address, 0xFF00 if value else 0), timeout_s)
        if len(answer) != 5:
            raise ModbusProtocolError(f"write answer of {len(answer)} bytes")
