"""The services' small TLS read buffer (``chargegate.runtime.small_tls_buffers``: 4 KiB instead of asyncio's
256 KiB per connection): messages larger than the buffer and than a TLS record arrive whole, both ways."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from chargegate import runtime


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    crt, pem = tmp / "c.pem", tmp / "k.pem"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return crt, pem


async def test_large_messages_cross_a_small_tls_read_buffer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asyncio.sslproto.SSLProtocol, "max_size", asyncio.sslproto.SSLProtocol.max_size)
    runtime.small_tls_buffers()
    assert asyncio.sslproto.SSLProtocol.max_size == runtime.TLS_READ_BUFFER == 4096
    crt, key = _self_signed(tmp_path)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(crt, key)
    cctx = ssl.create_default_context(cafile=str(crt))
    blobs = [bytes([i % 251]) * n for i, n in enumerate((1, 300, 4095, 4096, 4097, 16384, 16385, 200_000))]

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for b in blobs:
            w.write(await r.readexactly(len(b)))
            await w.drain()
        w.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=sctx)
    port = server.sockets[0].getsockname()[1]
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=cctx, server_hostname="localhost")
    for b in blobs:
        w.write(b)
        await w.drain()
        assert await asyncio.wait_for(r.readexactly(len(b)), 10) == b
    w.close()
    server.close()
    await server.wait_closed()
