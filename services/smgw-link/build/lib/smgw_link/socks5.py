"""SOCKS5 (RFC 1928) CONNECT with the no-authentication method, client and server side.

Inside the HAN TLS session the TLS client certificate is the authentication, so the client
offers only method 0x00. The server half is used by the SMGW simulator.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct

from smgw_link.tlsconf import LinkError

VERSION = 5
NO_AUTH = 0x00
NO_ACCEPTABLE = 0xFF
CMD_CONNECT = 0x01
ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 0x01, 0x03, 0x04

REPLIES = {
    0x00: "succeeded",
    0x01: "general SOCKS server failure",
    0x02: "connection not allowed by ruleset",
    0x03: "network unreachable",
    0x04: "host unreachable",
    0x05: "connection refused",
    0x06: "TTL expired",
    0x07: "command not supported",
    0x08: "address type not supported",
}


def reply_text(code: int) -> str:
    return REPLIES.get(code, f"unassigned reply 0x{code:02x}")


def encode_address(host: str, port: int) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raw = host.encode("idna")
        if not 0 < len(raw) < 256:
            raise ValueError(f"host name {host!r} cannot be sent in SOCKS5") from None
        return bytes([ATYP_DOMAIN, len(raw)]) + raw + struct.pack("!H", port)
    if ip.version == 4:
        return bytes([ATYP_IPV4]) + ip.packed + struct.pack("!H", port)
    return bytes([ATYP_IPV6]) + ip.packed + struct.pack("!H", port)


async def read_address(reader: asyncio.StreamReader, atyp: int) -> tuple[str, int]:
    if atyp == ATYP_IPV4:
        host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
    elif atyp == ATYP_IPV6:
        host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
    elif atyp == ATYP_DOMAIN:
        n = (await reader.readexactly(1))[0]
        host = (await reader.readexactly(n)).decode("ascii", errors="replace")
    else:
        raise ValueError(f"address type 0x{atyp:02x}")
    (port,) = struct.unpack("!H", await reader.readexactly(2))
    return host, port


async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, where: str) -> None:
    """Method negotiation only (also used as the link probe)."""
    writer.write(bytes([VERSION, 1, NO_AUTH]))
    await writer.drain()
    try:
        ver, method = await reader.readexactly(2)
    except asyncio.IncompleteReadError:
        raise LinkError("socks", f"{where}: the gateway closed the channel during SOCKS5 negotiation") from None
    if ver != VERSION:
        raise LinkError("socks", f"{where}: not a SOCKS5 proxy (version byte {ver})")
    if method != NO_AUTH:
        raise LinkError("socks", f"{where}: the proxy refuses the no-authentication method (0x{method:02x})")


async def connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int,
                  where: str) -> tuple[str, int]:
    """Negotiate and CONNECT to ``host:port``; returns the proxy's bound address. Raises LinkError."""
    await greet(reader, writer, where)
    writer.write(bytes([VERSION, CMD_CONNECT, 0]) + encode_address(host, port))
    await writer.drain()
    try:
        ver, rep, _rsv, atyp = await reader.readexactly(4)
        if ver != VERSION:
            raise LinkError("socks", f"{where}: bad SOCKS5 reply version {ver}")
        if rep != 0:
            raise LinkError("socks", f"{where}: SOCKS5 CONNECT to {host}:{port} failed: "
                                     f"reply 0x{rep:02x} {reply_text(rep)}", code=rep)
        return await read_address(reader, atyp)
    except asyncio.IncompleteReadError:
        raise LinkError("socks", f"{where}: the gateway closed the channel before the SOCKS5 reply") from None
    except ValueError as e:
        raise LinkError("socks", f"{where}: malformed SOCKS5 reply ({e})") from None


# -- server side (SMGW simulator) -------------------------------------------------------------------
class SocksRequestError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


async def serve_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[str, int]:
    """Read greeting and request; answer the method choice. Returns the CONNECT target."""
    ver, n = await reader.readexactly(2)
    if ver != VERSION:
        raise SocksRequestError(0x01, f"version {ver}")
    methods = await reader.readexactly(n)
    if NO_AUTH not in methods:
        writer.write(bytes([VERSION, NO_ACCEPTABLE]))
        await writer.drain()
        raise SocksRequestError(0xFF, "no acceptable method")
    writer.write(bytes([VERSION, NO_AUTH]))
    await writer.drain()
    ver, cmd, _rsv, atyp = await reader.readexactly(4)
    try:
        host, port = await read_address(reader, atyp)
    except ValueError:
        await send_reply(writer, 0x08)
        raise SocksRequestError(0x08, "address type not supported") from None
    if cmd != CMD_CONNECT:
        await send_reply(writer, 0x07)
        raise SocksRequestError(0x07, f"command {cmd}")
    return host, port


async def send_reply(writer: asyncio.StreamWriter, code: int, bound: tuple[str, int] = ("0.0.0.0", 0)) -> None:
    writer.write(bytes([VERSION, code, 0]) + encode_address(*bound))
    await writer.drain()
