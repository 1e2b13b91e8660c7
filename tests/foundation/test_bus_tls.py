"""The bus over TLS (``broker.tls`` in the configuration): a Mosquitto with a TLS listener and a server
certificate issued in the test; the bus checks it against the test CA. The bus's buffered socket wraps
the TLS socket (``chargegate.bus._BufferedSocket``): a burst of QoS 1 messages arrives complete and in
order and is acknowledged, and a broker certificate from another CA is refused."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from chargegate.broker import LocalBroker, free_port
from chargegate.bus import Bus, BusSettings, _BufferedSocket
from chargegate.topics import Registry
from conftest import wait_for
from smgw_link.pki import cert_pem, issue, key_pem, new_key, write_private


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path, Path]]:
    d = tmp_path_factory.mktemp("bus-tls")
    ca = issue("bus test CA", new_key("P-256"), ca=True)
    other_ca = issue("some other CA", new_key("P-256"), ca=True)
    server = issue("localhost", new_key("P-256"), ca, server=True, dns=("localhost",), ips=("127.0.0.1",))
    (d / "ca.pem").write_bytes(cert_pem(ca.cert))
    (d / "other-ca.pem").write_bytes(cert_pem(other_ca.cert))
    (d / "server.pem").write_bytes(cert_pem(server.cert))
    write_private(d / "server.key", key_pem(server.key))
    port = free_port()
    lines = ["per_listener_settings false", "allow_anonymous true", f"listener {port} 127.0.0.1",
             f"certfile {d / 'server.pem'}", f"keyfile {d / 'server.key'}", "persistence false",
             "max_inflight_messages 1000", "log_dest stderr", "log_type error", "log_type warning"]
    if os.geteuid() == 0:
        lines.append("user root")  # the 0600 key stays readable
    (d / "mosquitto.conf").write_text("\n".join(lines) + "\n")
    broker = LocalBroker(conf=d / "mosquitto.conf", port=port, log_file=d / "mosquitto.log")
    broker.start()
    try:
        yield port, d / "ca.pem", d / "other-ca.pem"
    finally:
        broker.stop()


async def test_burst_over_tls_arrives_complete_and_in_order(tls_broker: tuple[int, Path, Path]) -> None:
    port, ca, _ = tls_broker
    reg = Registry("tlstest")
    settings = BusSettings(port=port, ca_file=str(ca))
    pub, sub = Bus("pub", reg, settings), Bus("sub", reg, settings)
    await pub.start(wait=5)
    await sub.start(wait=5)
    got: list[bytes] = []
    sub.subscribe_raw("tlstest/evse/+/setpoint", lambda t, payload, r: got.append(payload))
    await asyncio.sleep(0.2)  # the subscription is in place
    sock = sub._client._sock
    assert isinstance(sock, _BufferedSocket) and isinstance(sock._sock, ssl.SSLSocket)
    try:
        sent = [f'{{"n":{i},"pad":"{"x" * (i % 700)}"}}'.encode() for i in range(400)]
        with pub.batch():
            for i, data in enumerate(sent):
                pub.publish_raw(f"tlstest/evse/e{i % 5}/setpoint", data, qos=1)
        await wait_for(lambda: len(got) >= len(sent), timeout=10)
        assert got == sent
        await wait_for(lambda: not pub._client._out_messages and pub._client._inflight_messages == 0)
        assert pub.dropped_publishes == 0
    finally:
        await pub.stop()
        await sub.stop()


async def test_broker_certificate_from_another_ca_is_refused(tls_broker: tuple[int, Path, Path]) -> None:
    port, _, other_ca = tls_broker
    bus = Bus("pub", Registry("tlstest"), BusSettings(port=port, ca_file=str(other_ca)))
    await bus.start()
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(bus.connected.wait(), 1.5)
        assert bus.connections == 0
    finally:
        await bus.stop()
