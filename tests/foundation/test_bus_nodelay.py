"""The services' own MQTT connections send small packets at once (TCP_NODELAY): without it a setpoint
can wait for the broker's delayed ACK of the previous packet (~40 ms on Linux), which was seen on about
7 % of limit changes."""
from __future__ import annotations

import socket

from chargegate.bus import _BufferedSocket
from conftest import BrokerHandle, connected_bus


async def test_bus_socket_has_nagle_off(broker: BrokerHandle) -> None:
    bus = await connected_bus(broker, "load-controller")
    try:
        sock = bus._client._sock
        assert isinstance(sock, _BufferedSocket)
        raw = sock._sock
        assert isinstance(raw, socket.socket)
        assert raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        await bus.stop()
