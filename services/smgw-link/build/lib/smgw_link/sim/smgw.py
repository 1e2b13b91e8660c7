"""SMGW simulator: the HAN side of a Smart Meter Gateway, for tests and the demo.

* TLS server (TR-03116-3 suites; groups configurable, e.g. brainpoolP256r1 only) that requires a
  client certificate from the CLS device CA;
* SOCKS5 CONNECT proxy inside that TLS session (or SNI routing) to loopback endpoints, with a
  route table that maps the operator's host names to local ports;
* the inbound direction: :meth:`SmgwSim.open_inbound` connects to chargegate's inbound TLS
  server with the gateway's certificate (as an EMT-initiated channel would);
* fault injection: :meth:`drop_all` cuts every channel, :meth:`pause`/:meth:`resume` stop and
  restart accepting, ``socks_reply`` forces a SOCKS reply code.

Run: ``python -m smgw_link.sim.smgw --pki DIR [--curve brainpoolP256r1] --port 7443
--route mqtt.operator.test:8883=127.0.0.1:18883`` (``--make-pki`` writes the test PKI first).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import ssl
import sys
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from smgw_link import socks5
from smgw_link.channel import pipe
from smgw_link.tlsconf import HAN_GROUPS, han_client_context, han_server_context
from smgw_link.tlsstream import TlsStream

log = structlog.get_logger("smgw_link.sim.smgw")

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass
class SimStats:
    accepted: int = 0
    handshake_failed: int = 0
    socks_requests: int = 0
    socks_failed: int = 0
    active: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    last_target: str | None = None
    targets: list[str] = field(default_factory=list)


class SmgwSim:
    def __init__(self, *, cert: Path, key: Path, client_ca: Path, host: str = "127.0.0.1", port: int = 0,
                 groups: tuple[str, ...] = HAN_GROUPS, tls_version: str = "auto",
                 routes: dict[str, tuple[str, int]] | None = None, mode: str = "socks5",
                 socks_reply: int | None = None, cap_brainpool: bool = True) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self.host, self._port = host, port
        self.groups = groups
        self.tls_version = tls_version
        self.routes = dict(routes or {})
        self.mode = mode
        self.socks_reply = socks_reply
        self.cap_brainpool = cap_brainpool
        self.stats = SimStats()
        self.server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.ctx = self._context()

    def _context(self) -> ssl.SSLContext:
        ctx = han_server_context(cert=self.cert, key=self.key, client_ca=self.client_ca, tls_version=self.tls_version,
                                 groups=self.groups)
        brainpool_only = any(g.startswith("brainpool") for g in self.groups) and not any(
            g in ("P-256", "P-384") for g in self.groups)
        if brainpool_only or (self.cap_brainpool and _brainpool_key(self.cert)):
            # OpenSSL 3.0 has neither TLS 1.3 brainpool groups nor brainpool signature schemes
            # (RFC 8734 came with 3.2): such a gateway speaks TLS 1.2, as TR-03109 gateways do
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2

        def sni(obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            obj.requested_name = name  # type: ignore[attr-defined]

        ctx.sni_callback = sni
        return ctx

    @property
    def port(self) -> int:
        if self.server is None:
            return self._port
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, self.host, self._port)
        self._port = self.port
        log.info("SMGW simulator listening", port=self._port, groups=":".join(self.groups), mode=self.mode)

    async def pause(self) -> None:
        """Stop accepting (the port is closed: connection refused)."""
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1)
            self.server = None

    async def resume(self) -> None:
        if self.server is None:
            await self.start()

    def drop_all(self) -> None:
        """Cut every open channel (HAN link loss)."""
        for w in list(self._conns):
            w.transport.abort()
        self._conns.clear()

    async def stop(self) -> None:
        await self.pause()
        self.drop_all()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)

    def _route(self, host: str, port: int) -> tuple[str, int] | None:
        key = f"{host}:{port}"
        if key in self.routes:
            return self.routes[key]
        if host in ("localhost",):
            return ("127.0.0.1", port)
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(host).is_loopback:
                return (host, port)
        return None  # the simulator reaches nothing but loopback

    async def _handle(self, raw_reader: asyncio.StreamReader, raw_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._conns.add(raw_writer)
        tls = TlsStream(raw_reader, raw_writer, self.ctx, server_side=True)
        try:
            try:
                await tls.handshake(5)
            except (ssl.SSLError, ConnectionError, TimeoutError) as e:
                self.stats.handshake_failed += 1
                log.info("SMGW simulator refused a TLS client", error=str(e))
                return
            self.stats.accepted += 1
            await self._serve(tls, tls)  # type: ignore[arg-type]
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError):
            pass
        finally:
            self._conns.discard(raw_writer)
            tls.close()
            if task is not None:
                self._tasks.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "sni":
            obj = writer.get_extra_info("ssl_object")
            name = getattr(obj, "requested_name", None)
            target = self.routes.get(name or "") or (self.routes.get(f"{name}:443") if name else None)
            if target is None:
                return
            host, port = target
        else:
            try:
                host, port = await socks5.serve_request(reader, writer)
            except socks5.SocksRequestError:
                self.stats.socks_failed += 1
                return
            except asyncio.IncompleteReadError:
                return  # a probe: method negotiation only
            self.stats.socks_requests += 1
            self.stats.last_target = f"{host}:{port}"
            self.stats.targets.append(self.stats.last_target)
            if self.socks_reply is not None:
                self.stats.socks_failed += 1
                await socks5.send_reply(writer, self.socks_reply)
                return
            target = self._route(host, port)
            if target is None:
                self.stats.socks_failed += 1
                await socks5.send_reply(writer, 0x02)  # not allowed by ruleset
                return
            host, port = target
        try:
            up_r, up_w = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        except (ConnectionRefusedError, OSError, TimeoutError) as e:
            self.stats.socks_failed += 1
            if self.mode == "socks5":
                code = 0x05 if isinstance(e, ConnectionRefusedError) else 0x04
                await socks5.send_reply(writer, code)
            return
        if self.mode == "socks5":
            local = up_w.get_extra_info("sockname")
            await socks5.send_reply(writer, 0x00, (local[0], local[1]))
        self.stats.active += 1
        self._conns.add(up_w)

        def up(n: int) -> None:
            self.stats.bytes_up += n

        def down(n: int) -> None:
            self.stats.bytes_down += n

        try:
            await pipe((reader, writer), (up_r, up_w), up, down)
        finally:
            self.stats.active -= 1
            self._conns.discard(up_w)

    # -- inbound channel (EMT -> CLS device) -------------------------------------------------------------
    def inbound_context(self, device_ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        ctx = han_client_context(cert=cert or self.cert, key=key or self.key, trust_anchor=device_ca, check_name=False)
        return ctx

    async def open_inbound(self, host: str, port: int, device_ca: Path, cert: Path | None = None,
                           key: Path | None = None) -> Streams:
        """Open a channel to chargegate's inbound TLS server with the gateway's certificate."""
        ctx = self.inbound_context(device_ca, cert, key)
        return await asyncio.open_connection(host, port, ssl=ctx, server_hostname=None if _is_ip(host) else host)


def _brainpool_key(cert: Path) -> bool:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    key = x509.load_pem_x509_certificate(cert.read_bytes()).public_key()
    return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name.startswith("brainpool")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


async def http_request(streams: Streams, method: str, path: str, token: str | None = None,
                       body: bytes | None = None, host: str = "chargegate",
                       headers: dict[str, str] | None = None, read_timeout_s: float = 10) -> tuple[int, bytes]:
    """A minimal HTTP/1.1 request over an open channel (the inbound direction); the channel is
    closed afterwards. A chunked answer is decoded."""
    reader, writer = streams
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    if token:
        head.append(f"Authorization: Bearer {token}")
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + (body or b""))
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(-1), read_timeout_s)
    writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    parts = status_line.split()
    if len(parts) < 2:
        raise ConnectionError(f"no HTTP answer (got {raw[:80]!r})")
    head_block, _, payload = rest.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head_block.lower():
        payload = _unchunk(payload)
    return int(parts[1]), payload


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return out


def _parse_route(text: str) -> tuple[str, tuple[str, int]]:
    name, _, target = text.partition("=")
    host, _, port = target.rpartition(":")
    if not name or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"route must be NAME:PORT=HOST:PORT, got {text!r}")
    return name, (host, int(port))


async def _main(args: argparse.Namespace) -> None:
    from smgw_link.pki import make_pki

    pki_dir = Path(args.pki)
    if args.make_pki or not (pki_dir / "gateway.pem").exists():
        pki = make_pki(pki_dir, args.curve)
        print(f"test PKI ({args.curve}) written to {pki_dir}; gateway sha256 {pki.gateway_fingerprint()}",
              flush=True)
    groups = tuple(args.groups.split(":")) if args.groups else HAN_GROUPS
    sim = SmgwSim(cert=pki_dir / "gateway.pem", key=pki_dir / "gateway.key", client_ca=pki_dir / "device-ca.pem",
                  host=args.host, port=args.port, groups=groups, tls_version=args.tls, mode=args.mode,
                  routes=dict(args.route or []))
    await sim.start()
    print(f"SMGW simulator on {args.host}:{sim.port} ({args.mode}, groups {':'.join(groups)})", flush=True)
    if args.inbound:
        host, _, port = args.inbound.rpartition(":")
        streams = await sim.open_inbound(host, int(port), pki_dir / "device-ca.pem")
        status, body = await http_request(streams, args.inbound_method, args.inbound_path, args.token,
                                          args.inbound_body.encode() if args.inbound_body else None)
        print(status, body.decode(errors="replace"))
        await sim.stop()
        return
    try:
        await asyncio.Event().wait()
    finally:
        await sim.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m smgw_link.sim.smgw", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pki", default="state/sim-pki", help="test PKI directory (created when missing)")
    ap.add_argument("--make-pki", action="store_true", help="write a fresh test PKI first")
    ap.add_argument("--curve", default="brainpoolP256r1", help="curve of the test PKI")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7443)
    ap.add_argument("--groups", default=None, help="e.g. brainpoolP256r1 (default: all HAN groups)")
    ap.add_argument("--tls", choices=["1.2", "1.3", "auto"], default="auto")
    ap.add_argument("--mode", choices=["socks5", "sni"], default="socks5")
    ap.add_argument("--route", action="append", type=_parse_route, help="NAME:PORT=HOST:PORT (repeatable)")
    ap.add_argument("--inbound", default=None, help="HOST:PORT of chargegate's inbound server: send one request")
    ap.add_argument("--inbound-method", default="GET")
    ap.add_argument("--inbound-path", default="/api/variables")
    ap.add_argument("--inbound-body", default=None)
    ap.add_argument("--token", default=None)
    args = ap.parse_args(argv)
    try:
        asyncio.run(_main(args))
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
