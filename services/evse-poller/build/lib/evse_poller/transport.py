"""Modbus I/O: one connection ("link") per endpoint, shared by every device behind it.

Several devices on one RS485 line, or behind one Modbus TCP gateway, share a link; its lock
serialises their requests (a bus carries one request at a time). A link reconnects on demand with
exponential backoff. Every request has its own timeout; retries are the caller's choice.

Modbus TCP (MBAP framing) goes through the small client in :mod:`evse_poller.mbtcp` (about 55 % of
pymodbus' user CPU per request); RTU and ASCII, on a serial line or through a TCP gateway, through pymodbus.
``FAST_TCP = False`` puts Modbus TCP back on pymodbus (benchmark comparison).

A profile with ``transport: {type: http}`` (a meter's local JSON API) gets an :class:`~evse_poller.httpjson.HttpLink`
instead, with the same request lock, timeouts and error classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import structlog
from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ExceptionResponse

from chargegate.config import ModbusConnection
from evse_poller.mbtcp import ModbusExceptionResponse, ModbusProtocolError, ModbusTcpClient
from evse_poller.profile import Profile, Table

log = structlog.get_logger("evse-poller.transport")

TransportName = Literal["tcp", "rtu", "ascii", "rtu-over-tcp", "http"]


class LinkError(Exception):
    """The request did not get a valid answer (timeout, connection lost, exception response)."""


class DeviceRejected(LinkError):
    """The device answered with a Modbus exception (it is there, but refused the request)."""


@dataclass(frozen=True)
class Endpoint:
    """Where a link goes. Devices with equal endpoints share one link."""

    kind: Literal["tcp", "serial", "http"]
    framer: Literal["socket", "rtu", "ascii", "http"]
    host: str = ""
    port: int = 0
    device: str = ""
    baudrate: int = 9600
    parity: str = "N"
    stopbits: int = 1
    bytesize: int = 8

    def describe(self) -> str:
        if self.kind == "http":
            return f"http://{self.host}:{self.port}"
        if self.kind == "tcp":
            return f"{self.host}:{self.port}" + ("" if self.framer == "socket" else f" ({self.framer} over TCP)")
        return f"{self.device} {self.baudrate} {self.bytesize}{self.parity}{self.stopbits} ({self.framer})"


@dataclass(frozen=True)
class Target:
    """A resolved connection: the endpoint, the unit id and the request settings."""

    endpoint: Endpoint
    device_id: int
    timeout_s: float
    retries: int


def resolve(conn: ModbusConnection, profile: Profile) -> Target:
    """Merge the configuration with the profile's transport defaults."""
    t = profile.transport
    if t.type == "http" or conn.transport == "http":
        if t.type != "http":
            raise ValueError(f"profile {profile.name} speaks Modbus ({t.type}), not http")
        if conn.transport not in (None, "http"):
            raise ValueError(f"profile {profile.name} is read over http, not Modbus {conn.transport}")
        if not conn.host:
            raise ValueError("transport http needs modbus.host")
        return Target(Endpoint("http", "http", host=conn.host, port=conn.port or t.port), 0, conn.timeout_s,
                      conn.retries)
    serial_framing: Literal["rtu", "ascii"] = "ascii" if t.type == "ascii" else "rtu"
    transport = conn.transport
    if transport is None:
        if conn.host:
            # a host for a serial profile: the device sits behind a transparent TCP gateway
            transport = "tcp" if t.type == "tcp" else "rtu-over-tcp"
        else:
            transport = "ascii" if t.type == "ascii" else "rtu"
    device_id = conn.device_id if conn.device_id is not None else t.device_id
    if transport in ("rtu", "ascii") and t.type in ("rtu", "ascii") and transport != t.type:
        raise ValueError(f"profile {profile.name} speaks Modbus {t.type.upper()}, not {transport.upper()}")
    if transport in ("tcp", "rtu-over-tcp"):
        if not conn.host:
            raise ValueError(f"transport {transport} needs modbus.host")
        # rtu-over-tcp: serial frames tunnelled through a gateway; their framing follows the profile
        framer: Literal["socket", "rtu", "ascii", "http"] = "socket" if transport == "tcp" else serial_framing
        ep = Endpoint("tcp", framer, host=conn.host, port=conn.port or t.port)
    else:
        if conn.serial is None:
            raise ValueError(f"transport {transport} needs modbus.serial")
        s = conn.serial
        ep = Endpoint("serial", "ascii" if transport == "ascii" else "rtu", device=s.port, baudrate=s.baudrate,
                      parity=s.parity, stopbits=s.stopbits, bytesize=s.bytesize)
    return Target(ep, device_id, conn.timeout_s, conn.retries)


_FRAMERS = {"socket": FramerType.SOCKET, "rtu": FramerType.RTU, "ascii": FramerType.ASCII}
FAST_TCP = True  # Modbus TCP through evse_poller.mbtcp (False: through pymodbus)

Client = AsyncModbusTcpClient | AsyncModbusSerialClient | ModbusTcpClient


class Link:
    """One Modbus client connection with a request lock and reconnect backoff."""

    def __init__(self, endpoint: Endpoint, backoff_max_s: float = 30.0, connect_timeout_s: float = 2.0) -> None:
        self.endpoint = endpoint
        self.backoff_max_s = backoff_max_s
        self.connect_timeout_s = connect_timeout_s
        self.lock = asyncio.Lock()
        self.generation = 0  # increases with every successful (re)connect
        self.requests = 0
        self.failures = 0
        self._client: Client | None = None
        self._backoff = 0.0
        self._next_attempt = 0.0
        self._last_error: str | None = None

    def _make_client(self) -> Client:
        ep = self.endpoint
        if ep.kind == "tcp" and ep.framer == "socket" and FAST_TCP:
            return ModbusTcpClient(ep.host, ep.port, self.connect_timeout_s)
        common: dict[str, Any] = {"framer": _FRAMERS[ep.framer], "timeout": self.connect_timeout_s, "retries": 0,
                                  "reconnect_delay": 0}
        if ep.kind == "tcp":
            return AsyncModbusTcpClient(ep.host, port=ep.port, **common)
        return AsyncModbusSerialClient(ep.device, baudrate=ep.baudrate, parity=ep.parity, stopbits=ep.stopbits,
                                       bytesize=ep.bytesize, **common)

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    async def _ensure(self) -> Client:
        if self._client is not None and self._client.connected:
            return self._client
        now = time.monotonic()
        if now < self._next_attempt:
            raise LinkError(f"not connected to {self.endpoint.describe()} ({self._last_error}); "
                            f"next attempt in {self._next_attempt - now:.1f} s")
        self._drop()
        client = self._make_client()
        try:
            if isinstance(client, ModbusTcpClient):
                await client.connect()  # raises OSError (refused, unreachable) or TimeoutError
                ok = True
            else:
                ok = await asyncio.wait_for(client.connect(), self.connect_timeout_s + 0.5)
        except (TimeoutError, OSError, ModbusException) as e:
            ok = False
            self._last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        else:
            if not ok:
                self._last_error = "connection refused or unreachable"
        if not ok or not client.connected:
            client.close()
            self._backoff = min(self.backoff_max_s, max(0.5, self._backoff * 2))
            self._next_attempt = time.monotonic() + self._backoff
            raise LinkError(f"cannot connect to {self.endpoint.describe()}: {self._last_error}")
        self._client = client
        self._backoff = 0.0
        self._next_attempt = 0.0
        self.generation += 1
        return client

    async def connect(self) -> int:
        """Make sure the link is up; returns its generation (raises LinkError)."""
        if self._client is not None and self._client.connected:
            return self.generation
        async with self.lock:
            await self._ensure()
        return self.generation

    def _drop(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

    def close(self) -> None:
        self._drop()

    async def _call(self, coro_factory: Any, timeout_s: float, what: Callable[[], str]) -> Any:
        """Run one request under the link lock with a timeout. ``coro_factory(client)`` -> awaitable;
        ``what()`` names the request in errors."""
        async with self.lock:
            client = await self._ensure()
            self.requests += 1
            try:
                if type(client) is ModbusTcpClient:
                    rsp = await coro_factory(client)  # the fast client keeps the timeout itself, on a plain timer
                else:
                    async with asyncio.timeout(timeout_s):  # no extra task, unlike wait_for on 3.11
                        rsp = await coro_factory(client)
            except TimeoutError:
                self.failures += 1
                if self.endpoint.kind == "tcp" and self.endpoint.framer == "socket":
                    # a TCP device that stopped answering: start over with a fresh connection
                    self._drop()
                raise LinkError(f"{what()}: no answer within {timeout_s:g} s") from None
            except ModbusExceptionResponse as e:
                raise DeviceRejected(f"{what()}: Modbus exception {e.code}") from None
            except ModbusProtocolError as e:
                # a malformed answer or a lost connection: the stream may be out of step, start over
                self.failures += 1
                self._drop()
                raise LinkError(f"{what()}: {e}") from None
            except (ModbusException, OSError, asyncio.IncompleteReadError) as e:
                self.failures += 1
                self._drop()
                raise LinkError(f"{what()}: {type(e).__name__}: {e}") from None
        if rsp is None or isinstance(rsp, list):  # the fast TCP client: already checked
            return rsp
        if isinstance(rsp, ExceptionResponse) or rsp.isError():
            code = getattr(rsp, "exception_code", None)
            raise DeviceRejected(f"{what()}: Modbus exception {code}")
        return rsp

    async def read(self, table: Table, address: int, count: int, device_id: int, timeout_s: float) -> list[int]:
        def what() -> str:
            return f"read {table} {address}+{count} unit {device_id}"

        def call(c: Any) -> Any:
            if type(c) is ModbusTcpClient:
                return c.read(table, address, count, device_id, timeout_s)
            if table == "holding":
                return c.read_holding_registers(address, count=count, device_id=device_id)
            if table == "input":
                return c.read_input_registers(address, count=count, device_id=device_id)
            if table == "coil":
                return c.read_coils(address, count=count, device_id=device_id)
            return c.read_discrete_inputs(address, count=count, device_id=device_id)

        rsp = await self._call(call, timeout_s, what)
        if isinstance(rsp, list):
            return rsp
        if table in ("coil", "discrete"):
            bits = list(rsp.bits)[:count]
            if len(bits) < count:
                raise LinkError(f"{what()}: short answer ({len(bits)} bits)")
            return [int(b) for b in bits]
        regs = list(rsp.registers)
        if len(regs) != count:
            raise LinkError(f"{what()}: answer has {len(regs)} registers")
        return regs

    async def write(self, table: Table, address: int, values: list[int], device_id: int, timeout_s: float,
                    multiple: bool = False) -> None:
        """Write ``values``: one register with FC 06 unless ``multiple`` (FC 16 also for a single register)."""
        def what() -> str:
            return f"write {table} {address}={values} unit {device_id}"

        def call(c: Any) -> Any:
            if type(c) is ModbusTcpClient:
                if table == "coil":
                    return c.write_coil(address, bool(values[0]), device_id, timeout_s)
                if len(values) == 1 and not multiple:
                    return c.write_register(address, values[0], device_id, timeout_s)
                return c.write_registers(address, values, device_id, timeout_s)
            if table == "coil":
                return c.write_coil(address, bool(values[0]), device_id=device_id)
            if len(values) == 1 and not multiple:
                return c.write_register(address, values[0], device_id=device_id)
            return c.write_registers(address, values, device_id=device_id)

        if table not in ("holding", "coil"):
            raise ValueError(f"cannot write {table} registers")
        await self._call(call, timeout_s, what)


class LinkPool:
    """Links by endpoint, so that devices behind one endpoint share it."""

    def __init__(self, backoff_max_s: float = 30.0) -> None:
        self.backoff_max_s = backoff_max_s
        self.links: dict[Endpoint, Any] = {}

    def get(self, endpoint: Endpoint) -> Any:
        """The :class:`Link` (Modbus) or :class:`~evse_poller.httpjson.HttpLink` of ``endpoint``."""
        link = self.links.get(endpoint)
        if link is None and endpoint.kind == "http":
            from evse_poller.httpjson import HttpLink

            link = self.links[endpoint] = HttpLink(endpoint)
            return link
        if link is None:
            for other in self.links.values():
                if other.endpoint.kind == "serial" and other.endpoint.device == endpoint.device:
                    raise ValueError(f"serial line {endpoint.device} is configured twice with different settings "
                                     f"({other.endpoint.describe()} / {endpoint.describe()})")
            link = self.links[endpoint] = Link(endpoint, self.backoff_max_s)
        return link

    def close(self) -> None:
        for link in self.links.values():
            link.close()
