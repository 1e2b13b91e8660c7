"""Serving simulated devices: Modbus TCP (socket, RTU or ASCII framing) and serial lines.

A :class:`VirtualSerialLine` is a null modem made of two pseudo-terminals: the simulator opens
one end, the poller the other (optionally through a symlink at the configured device path, e.g.
``/tmp/chargegate-rs485``), and bytes are copied between them as on an RS485 cable.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import termios
import tty
from pathlib import Path
from typing import Literal

import structlog
from pymodbus import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import SimDevice

from evse_poller.sim.regmap import RegisterMap

log = structlog.get_logger("evse-poller.sim")

Framing = Literal["socket", "rtu", "ascii"]
_FRAMERS = {"socket": FramerType.SOCKET, "rtu": FramerType.RTU, "ascii": FramerType.ASCII}


class TcpEndpoint:
    """A Modbus TCP server for one host:port, with one register map per unit id."""

    def __init__(self, host: str, port: int, framing: Framing = "socket") -> None:
        self.host = host
        self.port = port
        self.framing = framing
        self.maps: dict[int, RegisterMap] = {}
        self._server: ModbusTcpServer | None = None

    def add(self, device_id: int, regmap: RegisterMap) -> None:
        if device_id in self.maps:
            raise ValueError(f"{self.host}:{self.port} unit {device_id} is simulated twice")
        self.maps[device_id] = regmap

    def _devices(self) -> list[SimDevice]:
        return [m.sim_device(i) for i, m in sorted(self.maps.items())]

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        if self._server is not None:
            return
        server = ModbusTcpServer(self._devices(), framer=_FRAMERS[self.framing], address=(self.host, self.port))
        await server.serve_forever(background=True)
        self._server = server

    async def stop(self) -> None:
        """Stop listening and drop every connection (a device unplugged from the network)."""
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()


class VirtualSerialLine:
    """Two pseudo-terminals joined like a cable. ``device_path`` is the end for the poller."""

    def __init__(self, link_path: str | None = None) -> None:
        self._a_master, self._a_slave = os.openpty()
        self._b_master, self._b_slave = os.openpty()
        for fd in (self._a_slave, self._b_slave, self._a_master, self._b_master):
            tty.setraw(fd)
            attrs = termios.tcgetattr(fd)
            attrs[3] &= ~termios.ECHO
            termios.tcsetattr(fd, termios.TCSANOW, attrs)
        self.server_path = os.ttyname(self._a_slave)
        self.device_path = os.ttyname(self._b_slave)
        self.link_path = link_path
        self.bytes = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        if link_path:
            p = Path(link_path)
            if p.is_symlink() or p.exists():
                if not p.is_symlink():
                    raise FileExistsError(f"{link_path} exists and is not a symlink made by the simulator")
                p.unlink()
            p.symlink_to(self.device_path)
            self.device_path = link_path

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._a_master, self._copy, self._a_master, self._b_master)
        self._loop.add_reader(self._b_master, self._copy, self._b_master, self._a_master)

    def _copy(self, src: int, dst: int) -> None:
        try:
            data = os.read(src, 4096)
        except OSError:
            return
        if data:
            self.bytes += len(data)
            with contextlib.suppress(OSError):
                os.write(dst, data)

    def close(self) -> None:
        if self._loop is not None:
            for fd in (self._a_master, self._b_master):
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(fd)
        for fd in (self._a_master, self._b_master, self._a_slave, self._b_slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.link_path:
            with contextlib.suppress(OSError):
                p = Path(self.link_path)
                if p.is_symlink():
                    p.unlink()


class SerialEndpoint:
    """A Modbus RTU/ASCII server on a virtual serial line (several unit ids on one bus)."""

    def __init__(self, link_path: str | None = None, framing: Framing = "rtu", baudrate: int = 19200,
                 parity: str = "N", stopbits: int = 1, bytesize: int = 8) -> None:
        self.link_path = link_path
        self.framing = framing
        # a pseudo-terminal has no parity: pyserial cannot reconfigure a pty with parity enabled, so the
        # simulator end always opens it 8N1 (the poller end must be configured with parity N, too)
        self.settings = {"baudrate": baudrate, "parity": "N", "stopbits": stopbits, "bytesize": bytesize}
        self.configured_parity = parity
        self.maps: dict[int, RegisterMap] = {}
        self.line: VirtualSerialLine | None = None
        self._server: ModbusSerialServer | None = None

    def add(self, device_id: int, regmap: RegisterMap) -> None:
        if device_id in self.maps:
            raise ValueError(f"serial unit {device_id} is simulated twice")
        self.maps[device_id] = regmap

    @property
    def device_path(self) -> str:
        assert self.line is not None
        return self.line.device_path

    async def start(self) -> None:
        if self.line is None:
            self.line = VirtualSerialLine(self.link_path)
            self.line.start()
        devices = [m.sim_device(i) for i, m in sorted(self.maps.items())]
        server = ModbusSerialServer(devices, framer=_FRAMERS[self.framing], port=self.line.server_path,
                                    **self.settings)  # type: ignore[arg-type]
        await server.serve_forever(background=True)
        self._server = server

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()
        if self.line is not None:
            self.line.close()
            self.line = None
