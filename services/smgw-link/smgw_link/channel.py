"""The CLS channel through the SMGW.

* :class:`HanConnector` opens one HAN TLS session to the gateway per channel and, inside it,
  SOCKS5 CONNECT to the endpoint (``proxy: socks5``), or sends the endpoint's name as SNI
  (``proxy: sni``). Failures become :class:`LinkError` with a clear message.
* :class:`Link` watches the gateway (a probe: TLS handshake and SOCKS5 method negotiation every
  ``keepalive_s`` while idle, with exponential backoff while down), keeps the link state and byte
  counters, and runs one local forwarding listener per endpoint.
* :class:`InboundServer` is the TLS server for channels the operator opens through the SMGW: it
  accepts only the gateway's certificate and hands each connection to the local HTTP API.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from chargegate.config.smgw import Endpoint, Smgw
from chargegate.ratelog import LogLimiter
from smgw_link import socks5
from smgw_link.tlsconf import (
    CertificateMismatch,
    LinkError,
    check_peer,
    classify,
    han_client_context,
    han_server_context,
    peer_der,
    set_keepalive,
)
from smgw_link.tlsstream import TlsStream

log = structlog.get_logger("smgw_link.channel")

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]

# channels opened at once (HAN TLS handshake + SOCKS5 CONNECT); the others wait their turn. 1000 OCPP charge
# points connecting after a start opened 1000 brainpool handshakes together: each side's CPU shared among all
# of them, none finished within the connect timeout, every one was retried - and the link never came up
# (bench/system, 500 + 500 wallboxes). An SMGW, an embedded device, handshakes one after the other anyway.
OPEN_AT_ONCE = 8


class HanConnector:
    """Opens channels through the gateway with the client certificate ``cert``/``key``."""

    def __init__(self, smgw: Smgw, cert: Path, key: Path) -> None:
        gw = smgw.gateway
        if gw is None:
            raise LinkError("setup", "smgw.gateway is not configured")
        self.smgw = smgw
        self.gw = gw
        self.where = f"SMGW {gw.host}:{gw.port}"
        try:
            def make(version: str) -> ssl.SSLContext:
                return han_client_context(cert=cert, key=key, trust_anchor=gw.trust_anchor,
                                          check_name=gw.server_name is not None and smgw.proxy == "socks5",
                                          tls_version=version)

            self.ctx = make(smgw.tls_version)
            # "auto": TLS 1.3 where possible, 1.2 for a gateway that picks 1.3 but cannot finish it
            # (OpenSSL 3.0 gateways with brainpool certificates: no RFC 8734 signature schemes)
            self.ctx12 = make("1.2") if smgw.tls_version == "auto" else None
        except Exception as e:  # TlsSetupError and file problems
            raise LinkError("setup", str(e)) from None
        self.gateway_fingerprint: str | None = None
        self.tls_version: str | None = None
        self.cipher: str | None = None

    async def _tls(self, sni: str | None) -> Streams:
        gw = self.gw
        server_hostname = sni or gw.server_name or gw.host
        try:
            reader, writer = await self._handshake(self.ctx, server_hostname)
        except Exception as e:
            err = classify(e, self.where)
            if self.ctx12 is None or err.kind != "tls" or not any(
                    r in err.message for r in ("HANDSHAKE_FAILURE", "PROTOCOL_VERSION", "INSUFFICIENT_SECURITY",
                                               "ILLEGAL_PARAMETER", "DECODE_ERROR")):
                raise err from None
            try:
                reader, writer = await self._handshake(self.ctx12, server_hostname)
            except Exception as e2:
                raise classify(e2, self.where) from None
            log.info("gateway handshake works with TLS 1.2 only; keeping TLS 1.2 for it", gateway=self.where,
                     first_error=err.message)
            self.ctx, self.ctx12 = self.ctx12, None
        try:
            obj = writer.get_extra_info("ssl_object")
            # the name is checked here when OpenSSL did not (pinned-only, or SNI routing)
            name = gw.server_name if (gw.trust_anchor is None or self.smgw.proxy == "sni") else None
            self.gateway_fingerprint = check_peer(peer_der(obj), pins=[gw.pinned_sha256] if gw.pinned_sha256 else [],
                                                  name=name)
            self.tls_version = obj.version() if obj else None
            self.cipher = obj.cipher()[0] if obj and obj.cipher() else None
        except CertificateMismatch as e:
            writer.close()
            raise LinkError("certificate", f"{self.where}: wrong gateway certificate: {e}") from None
        set_keepalive(writer.get_extra_info("socket"), self.smgw.keepalive_s)
        return reader, writer

    async def _handshake(self, ctx: ssl.SSLContext, server_hostname: str) -> Streams:
        gw = self.gw
        return await asyncio.wait_for(
            asyncio.open_connection(gw.host, gw.port, ssl=ctx, server_hostname=server_hostname,
                                    ssl_handshake_timeout=gw.connect_timeout_s),
            gw.connect_timeout_s + 1)

    async def open(self, endpoint: Endpoint) -> Streams:
        """A channel to ``endpoint``; raises :class:`LinkError`."""
        if self.smgw.proxy == "sni":
            return await self._tls(endpoint.host)
        reader, writer = await self._tls(None)
        try:
            await asyncio.wait_for(socks5.connect(reader, writer, endpoint.host, endpoint.port, self.where),
                                   self.gw.connect_timeout_s)
        except BaseException as e:
            writer.close()
            if isinstance(e, asyncio.CancelledError):
                raise
            raise classify(e, self.where) from None
        return reader, writer

    async def probe(self) -> None:
        """TLS handshake (and SOCKS5 method negotiation) without opening a channel."""
        reader, writer = await self._tls(None)
        try:
            if self.smgw.proxy == "socks5":
                await asyncio.wait_for(socks5.greet(reader, writer, self.where), self.gw.connect_timeout_s)
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):
                raise
            raise classify(e, self.where) from None
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)


@dataclass
class ChannelStats:
    listen: str
    target: str
    enabled: bool = True
    active: int = 0
    opened: int = 0
    failed: int = 0
    abandoned: int = 0  # the local connection hung up while its channel waited for a slot (OPEN_AT_ONCE)
    bytes_tx: int = 0
    bytes_rx: int = 0
    last_error: str | None = None
    error_kind: str | None = None
    socks_reply: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


async def pipe(a: Streams, b: Streams, count_ab: Callable[[int], None], count_ba: Callable[[int], None]) -> None:
    """Copy both directions until one ends, then close both."""

    async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: Callable[[int], None]) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError, OSError, asyncio.IncompleteReadError):
            while True:
                data = await src.read(65536)
                if not data:
                    break
                dst.write(data)
                count(len(data))
                await dst.drain()

    t1 = asyncio.create_task(copy(a[0], b[1], count_ab))
    t2 = asyncio.create_task(copy(b[0], a[1], count_ba))
    try:
        await asyncio.wait({t1, t2}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (t1, t2):
            t.cancel()
        for w in (a[1], b[1]):
            w.close()
        for w in (a[1], b[1]):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.wait_closed(), 1)


class Link:
    """Link state, probing with backoff, and the forwarding listeners."""

    def __init__(self, smgw: Smgw, make_connector: Callable[[], HanConnector],
                 on_change: Callable[[], None]) -> None:
        self.smgw = smgw
        self.make_connector = make_connector
        self.on_change = on_change
        self.connector: HanConnector | None = None
        self.state = "connecting"
        self.since = time.time()
        self.error: str | None = None
        self.error_kind: str | None = None
        self.bytes_tx = 0
        self.bytes_rx = 0
        self.channels: dict[str, ChannelStats] = {}
        self.servers: dict[str, asyncio.Server] = {}
        self._wake = asyncio.Event()
        self._last_ok = 0.0
        self.up_event = asyncio.Event()
        # which connector (generation = number of resets) the last probe results were made with:
        # a certificate switch-over waits for a probe of its own generation
        self.generation = 0
        self.connector_gen = 0
        self.ok_gen = -1
        self.failed_gen = -1
        self._opening = asyncio.Semaphore(OPEN_AT_ONCE)

    # -- state -----------------------------------------------------------------------------------------
    def _set(self, state: str, error: LinkError | None = None) -> None:
        changed = state != self.state or (error is not None and str(error) != self.error)
        if state != self.state:
            self.since = time.time()
        self.state = state
        if state == "up":
            self.error = None
            self.error_kind = None
            self._last_ok = time.monotonic()
            self.up_event.set()
        else:
            self.up_event.clear()
        if error is not None:
            self.error = str(error)
            self.error_kind = error.kind
        if changed:
            if state == "up":
                c = self.connector
                log.info("SMGW link up", gateway=c.where if c else None, tls=c.tls_version if c else None,
                         cipher=c.cipher if c else None)
            else:
                log.warning("SMGW link " + state, error=self.error)
            self.on_change()

    def _connector(self) -> HanConnector:
        if self.connector is None:
            self.connector_gen = self.generation
            self.connector = self.make_connector()
        return self.connector

    def reset(self) -> None:
        """Rebuild the TLS context and probe with it at once (new certificate or configuration)."""
        self.connector = None
        self.generation += 1
        self._last_ok = 0.0
        self._wake.set()

    # -- probing -----------------------------------------------------------------------------------------
    async def run(self) -> None:
        delay = self.smgw.reconnect_min_s
        while True:
            idle = time.monotonic() - self._last_ok
            if self.state != "up" or idle >= self.smgw.keepalive_s:
                gen = self.generation
                try:
                    await self._connector().probe()
                    self.ok_gen = gen
                    self._set("up")
                    delay = self.smgw.reconnect_min_s
                except LinkError as e:
                    self.failed_gen = gen
                    self._set("down", e)
                    if e.kind == "setup":
                        self.connector = None
                except Exception as e:  # never let the prober die
                    self.failed_gen = gen
                    self._set("down", classify(e, "SMGW"))
            if self.state == "up":
                wait = max(0.05, self.smgw.keepalive_s - (time.monotonic() - self._last_ok))
            else:
                wait = delay
                delay = min(delay * 2, self.smgw.reconnect_max_s)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    # -- forwarding ----------------------------------------------------------------------------------------
    async def start_forwarders(self) -> None:
        for ep in self.smgw.endpoints:
            stats = ChannelStats(listen=f"{ep.listen_host}:{ep.listen_port}", target=f"{ep.host}:{ep.port}")
            self.channels[ep.name] = stats
            if ep.purpose == "ocpp" and not self.smgw.functions.ocpp_via_smgw:
                stats.enabled = False
                log.info("OCPP endpoint not opened: function ocpp_via_smgw is off", endpoint=ep.name)
                continue
            try:
                self.servers[ep.name] = await asyncio.start_server(
                    lambda r, w, ep=ep: self._forward(ep, (r, w)), ep.listen_host, ep.listen_port)
            except OSError as e:
                stats.enabled = False
                stats.last_error = f"cannot listen on {stats.listen}: {e.strerror}"
                log.error("forwarding listener failed", endpoint=ep.name, listen=stats.listen, error=e.strerror)
                continue
            log.info("forwarding listener ready", endpoint=ep.name, listen=stats.listen, target=stats.target)

    async def stop_forwarders(self) -> None:
        for s in self.servers.values():
            s.close()
        for s in self.servers.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 2)
        self.servers.clear()

    async def open_channel(self, ep: Endpoint, local: Streams | None = None) -> Streams:
        """A channel to ``ep`` for the ``local`` connection (none when it hung up while waiting its turn:
        raises :class:`ClientGone`)."""
        stats = self.channels.setdefault(ep.name, ChannelStats(f"{ep.listen_host}:{ep.listen_port}",
                                                               f"{ep.host}:{ep.port}"))
        try:
            async with self._opening:  # the connect timeout counts from the handshake's start, not the wait
                if local is not None and _hung_up(local[1]):
                    stats.abandoned += 1
                    raise ClientGone(ep.name)
                streams = await self._connector().open(ep)
        except LinkError as e:
            stats.failed += 1
            stats.last_error = str(e)
            stats.error_kind = e.kind
            stats.socks_reply = e.code
            log.warning("channel failed", endpoint=ep.name, target=stats.target, error=str(e), socks_reply=e.code)
            if e.kind == "socks":
                self._set("up")  # the gateway answered: the link itself works
                self.on_change()
            else:
                self._set("down", e)
                self._wake.set()
            raise
        stats.opened += 1
        stats.last_error = None
        stats.error_kind = None
        stats.socks_reply = None
        self._set("up")
        return streams

    async def _forward(self, ep: Endpoint, local: Streams) -> None:
        stats = self.channels[ep.name]
        try:
            remote = await self.open_channel(ep, local)
        except (LinkError, ClientGone):
            local[1].close()
            return
        except Exception as e:
            log.error("channel failed unexpectedly", endpoint=ep.name, error=repr(e))
            local[1].close()
            return
        stats.active += 1
        self.on_change()

        def tx(n: int) -> None:
            stats.bytes_tx += n
            self.bytes_tx += n

        def rx(n: int) -> None:
            stats.bytes_rx += n
            self.bytes_rx += n

        try:
            await pipe(local, remote, tx, rx)
        finally:
            stats.active -= 1
            self._last_ok = time.monotonic() if self.state == "up" else self._last_ok
            self.on_change()


class InboundServer:
    """TLS server on the HAN side: only the gateway's certificate; each connection is piped to
    ``target`` (the HTTP API's inbound socket)."""

    def __init__(self, smgw: Smgw, cert: Path, key: Path,
                 connect_target: Callable[[], Awaitable[Streams]]) -> None:
        gw = smgw.gateway
        ca = smgw.inbound.gateway_ca or (gw.trust_anchor if gw else None)
        if ca is None:
            raise LinkError("setup", "the inbound channel needs smgw.inbound.gateway_ca or gateway.trust_anchor")
        self.smgw = smgw
        self.client_ca = ca
        self.ctx = han_server_context(cert=cert, key=key, client_ca=ca, tls_version=smgw.tls_version)
        pins = list(smgw.inbound.allowed_sha256)
        if not pins and gw is not None and gw.pinned_sha256:
            pins = [gw.pinned_sha256]
        self.pins = pins
        self.name = gw.server_name if (gw is not None and not pins) else None
        self.connect_target = connect_target
        self.server: asyncio.Server | None = None
        self.stats: dict[str, Any] = {"accepted": 0, "refused": 0, "active": 0, "bytes_in": 0, "bytes_out": 0,
                                      "last_error": None}
        self._sem = asyncio.Semaphore(smgw.inbound.max_connections)
        self.refusals = LogLimiter(log)  # refused peers: once per peer, reason and minute, few per minute

    def use_certificate(self, cert: Path, key: Path) -> None:
        """Serve new connections with another certificate (open ones keep theirs)."""
        self.ctx = han_server_context(cert=cert, key=key, client_ca=self.client_ca, tls_version=self.smgw.tls_version)

    async def start(self) -> None:
        ib = self.smgw.inbound
        self.server = await asyncio.start_server(self._handle, ib.host, ib.port)
        log.info("inbound TLS server ready", listen=f"{ib.host}:{ib.port}", pinned=len(self.pins),
                 name=self.name)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, raw_reader: asyncio.StreamReader, raw_writer: asyncio.StreamWriter) -> None:
        peer = raw_writer.get_extra_info("peername")
        tls = TlsStream(raw_reader, raw_writer, self.ctx, server_side=True)
        reader, writer = tls, tls
        try:
            await tls.handshake(self.smgw.inbound.handshake_timeout_s)
            check_peer(peer_der(tls.obj), pins=self.pins, name=self.name)
        except (ssl.SSLError, ConnectionError, TimeoutError) as e:
            self.stats["refused"] += 1
            self.stats["last_error"] = f"{peer}: {classify(e, 'inbound').message}"
            self.refusals.warning(f"tls:{_host(peer)}", "inbound TLS handshake refused", subject="peers",
                                  peer=str(peer), error=self.stats["last_error"])
            tls.close()
            return
        except CertificateMismatch as e:
            self.stats["refused"] += 1
            self.stats["last_error"] = f"{peer}: {e}"
            self.refusals.warning(f"cert:{_host(peer)}", "inbound connection refused: not the gateway's certificate",
                                  subject="peers", peer=str(peer), error=str(e))
            writer.close()
            return
        if self._sem.locked():
            self.stats["refused"] += 1
            self.refusals.warning(f"busy:{_host(peer)}", "inbound connection refused: too many connections",
                                  subject="peers", peer=str(peer))
            writer.close()
            return
        async with self._sem:
            try:
                target = await self.connect_target()
            except OSError as e:
                log.error("inbound connection: HTTP API not reachable", error=str(e))
                writer.close()
                return
            self.stats["accepted"] += 1
            self.stats["active"] += 1
            log.info("inbound channel from the gateway", peer=str(peer))

            def cin(n: int) -> None:
                self.stats["bytes_in"] += n

            def cout(n: int) -> None:
                self.stats["bytes_out"] += n

            try:
                await pipe((reader, writer), target, cin, cout)  # type: ignore[arg-type]
            finally:
                self.stats["active"] -= 1


class ClientGone(Exception):
    """The local connection closed before its channel was opened (it gave up waiting)."""


def _hung_up(writer: asyncio.StreamWriter) -> bool:
    """The peer of ``writer`` closed its side (EOF), whatever is still buffered here: a peek at the socket
    (on a duplicate of it: asyncio's transport owns the original) reads nothing. A charge point whose
    connection timed out while its channel waited for a handshake slot costs no handshake."""
    if writer.transport.is_closing():
        return True
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    try:
        with sock.dup() as s:
            return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False  # open, nothing new
    except OSError:
        return True


def _host(peer: Any) -> str:
    """The address of a peer (``peername``: (host, port, ...)), for keys per peer."""
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
