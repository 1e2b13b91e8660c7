"""Every service runs asyncio TLS with 16 KiB read buffers instead of 256 KiB (chargegate.runtime.small_tls_buffers):
memory per connection drops, and messages larger than the buffer still arrive whole, over real TLS."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import hashlib
import os
import ssl
from pathlib import Path

from chargegate.runtime import TLS_READ_BUFFER, small_tls_buffers
from smgw_link.pki import make_pki


async def test_large_messages_cross_small_tls_buffers(tmp_path: Path) -> None:
    small_tls_buffers()
    assert asyncio.sslproto.SSLProtocol.max_size == TLS_READ_BUFFER == 16 * 1024
    pki = make_pki(tmp_path / "pki", "P-256")
    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    sctx.load_cert_chain(str(pki.operator_cert), str(pki.operator_key))
    cctx = ssl.create_default_context(cafile=str(pki.operator_ca))
    cctx.check_hostname = False
    buffers: list[int] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        proto = writer.transport.get_protocol()
        ssl_proto = getattr(writer.transport, "_ssl_protocol", proto)
        buffers.append(len(getattr(ssl_proto, "_ssl_buffer", b"")))
        n = int.from_bytes(await reader.readexactly(4), "big")
        data = await reader.readexactly(n)
        writer.write(hashlib.sha256(data).digest() + data[-10:])
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=sctx)
    port = server.sockets[0].getsockname()[1]
    try:
        payload = os.urandom(300_000)  # many TLS records, many buffer fills
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=cctx)
        writer.write(len(payload).to_bytes(4, "big") + payload)
        await writer.drain()
        answer = await asyncio.wait_for(reader.readexactly(42), 10)
        writer.close()
        assert answer == hashlib.sha256(payload).digest() + payload[-10:]
        assert buffers == [TLS_READ_BUFFER]  # the server side's connection buffer, not 256 KiB
    finally:
        server.close()
        await server.wait_closed()
