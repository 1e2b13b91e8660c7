"""TLS over asyncio streams with a memory BIO, for the server side.

asyncio's own SSL transport drops the connection on a failed handshake without flushing the
alert OpenSSL produced, so the peer sees a bare reset instead of "unknown CA" or "certificate
expired". Here every byte OpenSSL wants to send (alerts included) is written before closing, so a
refused peer learns why.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl


class TlsStream:
    """One TLS connection; acts as both the reader and the writer of a stream pair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: ssl.SSLContext,
                 server_side: bool, server_hostname: str | None = None) -> None:
        self.reader = reader
        self.writer = writer
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                server_hostname=server_hostname)
        self._eof = False

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def _fill(self) -> bool:
        chunk = await self.reader.read(65536)
        if not chunk:
            self.incoming.write_eof()
            return False
        self.incoming.write(chunk)
        return True

    async def handshake(self, limit_s: float) -> None:
        async def run() -> None:
            while True:
                try:
                    self.obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self._flush()
                    await self.writer.drain()
                    if not await self._fill():
                        raise ConnectionResetError("the peer closed the connection during the TLS handshake") from None
                except ssl.SSLError:
                    self._flush()  # the alert
                    with contextlib.suppress(Exception):
                        await self.writer.drain()
                    raise
            self._flush()
            await self.writer.drain()

        await asyncio.wait_for(run(), limit_s)

    # reader half
    async def read(self, n: int = 65536) -> bytes:
        while True:
            if self._eof:
                return b""
            try:
                data = self.obj.read(n)
                self._flush()
                return data
            except ssl.SSLWantReadError:
                self._flush()
                if not await self._fill():
                    continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self._eof = True
                return b""
            except ssl.SSLError:
                self._flush()
                raise

    async def readexactly(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = await self.read(n - len(buf))
            if not chunk:
                raise asyncio.IncompleteReadError(buf, n)
            buf += chunk
        return buf

    # writer half
    def write(self, data: bytes) -> None:
        self.obj.write(data)
        self._flush()

    async def drain(self) -> None:
        await self.writer.drain()

    def close(self) -> None:
        if not self.writer.is_closing():
            with contextlib.suppress(ssl.SSLError):
                self.obj.unwrap()
            self._flush()
            self.writer.close()

    def is_closing(self) -> bool:
        return self.writer.is_closing()

    async def wait_closed(self) -> None:
        await self.writer.wait_closed()

    def get_extra_info(self, name: str, default: object = None) -> object:
        if name == "ssl_object":
            return self.obj
        return self.writer.get_extra_info(name, default)

    @property
    def transport(self) -> asyncio.BaseTransport:
        return self.writer.transport
