"""HAN TLS, SOCKS5 channels and the inbound channel, with real TLS and certificates made here."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from chargegate.broker import free_port, wait_port
from chargegate.config.smgw import Endpoint, Inbound, Smgw
from smgw_link.channel import HanConnector, InboundServer, Link
from smgw_link.pki import Pki, make_pki
from smgw_link.sim.smgw import SmgwSim, http_request
from smgw_link.tlsconf import TLS12_CIPHERS, LinkError, han_client_context


@pytest.fixture(scope="module")
def bp(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki-bp"), "brainpoolP256r1")


@pytest.fixture(scope="module")
def p256(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki-p256"), "P-256")


def smgw_cfg(pki: Pki, port: int, **gw: object) -> Smgw:
    gateway = {"host": "127.0.0.1", "port": port, "trust_anchor": str(pki.gateway_ca), "server_name": "smgw.local",
               "connect_timeout_s": 3, **gw}
    return Smgw(enabled=True, gateway=gateway, keepalive_s=5, reconnect_min_s=0.05, reconnect_max_s=0.2,
                endpoints=[Endpoint(name="echo", host="echo.operator.test", port=7, listen_port=free_port())])


async def echo_server() -> tuple[asyncio.Server, int]:
    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(1000):
            w.write(data)
            await w.drain()
        w.close()

    s = await asyncio.start_server(echo, "127.0.0.1", 0)
    return s, s.sockets[0].getsockname()[1]


async def start_sim(pki: Pki, groups: tuple[str, ...] | None = None, **kw: object) -> tuple[SmgwSim, asyncio.Server]:
    es, eport = await echo_server()
    args: dict[str, object] = {"cert": pki.gateway_cert, "key": pki.gateway_key, "client_ca": pki.device_ca,
                               "routes": {"echo.operator.test:7": ("127.0.0.1", eport)}, **kw}
    if groups:
        args["groups"] = groups
    sim = SmgwSim(**args)  # type: ignore[arg-type]
    await sim.start()
    return sim, es


async def roundtrip(c: HanConnector, ep: Endpoint, data: bytes = b"hello through the CLS channel") -> bytes:
    r, w = await c.open(ep)
    w.write(data)
    await w.drain()
    got = await asyncio.wait_for(r.readexactly(len(data)), 5)
    w.close()
    return got


async def test_brainpool_only_gateway_works(bp: Pki) -> None:
    sim, es = await start_sim(bp, groups=("brainpoolP256r1",))
    try:
        cfg = smgw_cfg(bp, sim.port)
        c = HanConnector(cfg, bp.client_cert, bp.client_key)
        assert await roundtrip(c, cfg.endpoints[0]) == b"hello through the CLS channel"
        assert c.tls_version == "TLSv1.2"
        assert c.cipher == "ECDHE-ECDSA-AES128-GCM-SHA256"
        # the control: Python's default client groups do not reach a brainpool-only gateway
        plain = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        plain.load_verify_locations(str(bp.gateway_ca))
        plain.load_cert_chain(str(bp.client_cert), str(bp.client_key))
        plain.set_ciphers(TLS12_CIPHERS)
        with pytest.raises(ssl.SSLError):
            r, _w = await asyncio.open_connection("127.0.0.1", sim.port, ssl=plain, server_hostname="smgw.local")
            await r.read(1)
    finally:
        await sim.stop()
        es.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_brainpool_only_openssl_s_server(bp: Pki, tmp_path: Path) -> None:
    """An independent TLS stack: `openssl s_server -groups brainpoolP256r1` with a brainpool certificate."""
    port = free_port()
    proc = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(bp.gateway_cert), "-key",
         str(bp.gateway_key), "-CAfile", str(bp.device_ca), "-Verify", "1", "-verify_return_error",
         "-groups", "brainpoolP256r1", "-cipher", TLS12_CIPHERS, "-quiet"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        await asyncio.get_running_loop().run_in_executor(None, wait_port, "127.0.0.1", port, 10)
        cfg = smgw_cfg(bp, port)
        cfg = cfg.model_copy(update={"proxy": "sni"})
        c = HanConnector(cfg, bp.client_cert, bp.client_key)
        _r, w = await c._tls(None)
        w.write(b"ping from chargegate\n")
        await w.drain()
        assert c.tls_version == "TLSv1.2"
        lines = []
        for _ in range(20):  # s_server prints its own notes first
            line = await asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline)  # type: ignore[union-attr]
            lines.append(line)
            if b"ping from chargegate" in line or not line:
                break
        assert any(b"ping from chargegate" in x for x in lines), lines
        w.close()
    finally:
        proc.kill()
        proc.wait(5)


async def test_p256_gateway_gets_tls13(p256: Pki) -> None:
    sim, es = await start_sim(p256)
    try:
        cfg = smgw_cfg(p256, sim.port)
        c = HanConnector(cfg, p256.client_cert, p256.client_key)
        assert await roundtrip(c, cfg.endpoints[0])
        assert c.tls_version == "TLSv1.3"
        cfg12 = cfg.model_copy(update={"tls_version": "1.2"})
        c12 = HanConnector(cfg12, p256.client_cert, p256.client_key)
        assert await roundtrip(c12, cfg.endpoints[0])
        assert c12.tls_version == "TLSv1.2"
    finally:
        await sim.stop()
        es.close()


async def test_auto_falls_back_to_tls12_for_a_brainpool_certificate_offering_tls13(bp: Pki) -> None:
    """A gateway that offers TLS 1.3 with a brainpool certificate cannot finish 1.3 on OpenSSL 3.0."""
    sim, es = await start_sim(bp, cap_brainpool=False)
    try:
        cfg = smgw_cfg(bp, sim.port)
        strict13 = HanConnector(cfg.model_copy(update={"tls_version": "1.3"}), bp.client_cert, bp.client_key)
        with pytest.raises(LinkError) as e:
            await strict13.probe()
        assert e.value.kind == "tls"
        c = HanConnector(cfg, bp.client_cert, bp.client_key)
        assert await roundtrip(c, cfg.endpoints[0]) == b"hello through the CLS channel"
        assert c.tls_version == "TLSv1.2"
    finally:
        await sim.stop()
        es.close()


@pytest.mark.parametrize("curve", ["brainpoolP256r1", "P-256"])
async def test_unknown_and_expired_client_certificates_refused(bp: Pki, p256: Pki, curve: str) -> None:
    pki = bp if curve.startswith("brainpool") else p256
    sim, es = await start_sim(pki)
    try:
        cfg = smgw_cfg(pki, sim.port)
        with pytest.raises(LinkError) as e:
            await HanConnector(cfg, pki.rogue_cert, pki.rogue_key).probe()
        assert e.value.kind == "tls" and "unknown ca" in str(e.value)
        with pytest.raises(LinkError) as e:
            await HanConnector(cfg, pki.expired_cert, pki.expired_key).probe()
        assert e.value.kind == "tls" and "certificate expired" in str(e.value)
        assert sim.stats.handshake_failed == 2
        assert sim.stats.accepted == 0
        await HanConnector(cfg, pki.client_cert, pki.client_key).probe()  # the right one still works
    finally:
        await sim.stop()
        es.close()


async def test_wrong_gateway_certificate_refused(bp: Pki, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other", "brainpoolP256r1")
    # 1) same CA, but another gateway's certificate: the name does not match
    sim, es = await start_sim(bp, cert=bp.gateway_other_cert, key=bp.gateway_other_key)
    try:
        with pytest.raises(LinkError) as e:
            await HanConnector(smgw_cfg(bp, sim.port), bp.client_cert, bp.client_key).probe()
        assert e.value.kind == "certificate"
        # 2) pinned fingerprint: the other certificate is not the pinned one
        cfg = smgw_cfg(bp, sim.port, trust_anchor=None, pinned_sha256=bp.gateway_fingerprint())
        with pytest.raises(LinkError) as e:
            await HanConnector(cfg, bp.client_cert, bp.client_key).probe()
        assert e.value.kind == "certificate" and "pinned" in str(e.value)
    finally:
        await sim.stop()
        es.close()
    # 3) a gateway certificate from a CA we do not trust
    sim, es = await start_sim(bp, cert=other.gateway_cert, key=other.gateway_key)
    try:
        with pytest.raises(LinkError) as e:
            await HanConnector(smgw_cfg(bp, sim.port), bp.client_cert, bp.client_key).probe()
        assert e.value.kind == "certificate" and "unable to get local issuer" in str(e.value)
        # pinned to exactly this certificate (no CA): accepted
        cfg = smgw_cfg(bp, sim.port, trust_anchor=None, pinned_sha256=other.gateway_fingerprint())
        await HanConnector(cfg, bp.client_cert, bp.client_key).probe()
    finally:
        await sim.stop()
        es.close()


async def test_tcp_refused_and_socks_failures_reported(bp: Pki) -> None:
    port = free_port()
    with pytest.raises(LinkError) as e:
        await HanConnector(smgw_cfg(bp, port), bp.client_cert, bp.client_key).probe()
    assert e.value.kind == "tcp" and "refused" in str(e.value)

    sim, es = await start_sim(bp, socks_reply=0x05)
    try:
        cfg = smgw_cfg(bp, sim.port)
        c = HanConnector(cfg, bp.client_cert, bp.client_key)
        with pytest.raises(LinkError) as e:
            await c.open(cfg.endpoints[0])
        assert e.value.kind == "socks" and e.value.code == 5 and "connection refused" in str(e.value)
        sim.socks_reply = None
        unrouted = Endpoint(name="x", host="not-routed.test", port=1, listen_port=1)
        with pytest.raises(LinkError) as e:
            await c.open(unrouted)
        assert e.value.code == 2 and "not allowed by ruleset" in str(e.value)
        # the route exists but nothing listens behind it
        sim.routes["dead.test:9"] = ("127.0.0.1", free_port())
        with pytest.raises(LinkError) as e:
            await c.open(Endpoint(name="d", host="dead.test", port=9, listen_port=1))
        assert e.value.code == 5
    finally:
        await sim.stop()
        es.close()


async def test_forwarder_link_state_counters_and_reconnect(bp: Pki) -> None:
    sim, es = await start_sim(bp)
    changes: list[str] = []
    try:
        cfg = smgw_cfg(bp, sim.port)
        link = Link(cfg, lambda: HanConnector(cfg, bp.client_cert, bp.client_key), lambda: changes.append("x"))
        await link.start_forwarders()
        prober = asyncio.create_task(link.run())
        await asyncio.wait_for(link.up_event.wait(), 5)
        ep = cfg.endpoints[0]
        r, w = await asyncio.open_connection(ep.listen_host, ep.listen_port)
        w.write(b"x" * 1000)
        await w.drain()
        assert await asyncio.wait_for(r.readexactly(1000), 5) == b"x" * 1000
        assert link.channels["echo"].bytes_tx == 1000
        w.close()
        # link loss: the gateway goes away; the state says so, with the reason
        await sim.pause()
        sim.drop_all()
        link._last_ok = 0
        link._wake.set()
        for _ in range(200):
            if link.state == "down":
                break
            await asyncio.sleep(0.02)
        assert link.state == "down" and link.error_kind == "tcp"
        # a local client is refused cleanly while the gateway is away
        r, w = await asyncio.open_connection(ep.listen_host, ep.listen_port)
        assert await asyncio.wait_for(r.read(10), 5) == b""
        assert link.channels["echo"].failed >= 1
        # back: reconnect with backoff
        await sim.resume()
        await asyncio.wait_for(link.up_event.wait(), 5)
        assert link.state == "up" and link.error is None
        prober.cancel()
        await link.stop_forwarders()
    finally:
        await sim.stop()
        es.close()


async def test_end_to_end_tls_through_the_channel(bp: Pki) -> None:
    """A TLS client keeps the endpoint's name (SNI, certificate) across the transparent channel."""

    async def tls_echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"operator:" + await r.readexactly(5))
        await w.drain()
        w.close()

    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    sctx.load_cert_chain(str(bp.operator_cert), str(bp.operator_key))
    names: list[str | None] = []
    sctx.sni_callback = lambda obj, name, ctx: names.append(name)  # type: ignore[assignment,misc,func-returns-value]
    op = await asyncio.start_server(tls_echo, "127.0.0.1", 0, ssl=sctx)
    sim, es = await start_sim(bp, routes={"mqtt.operator.test:8883": ("127.0.0.1", op.sockets[0].getsockname()[1])})
    try:
        cfg = smgw_cfg(bp, sim.port).model_copy(update={"endpoints": [
            Endpoint(name="op", host="mqtt.operator.test", port=8883, listen_port=free_port())]})
        link = Link(cfg, lambda: HanConnector(cfg, bp.client_cert, bp.client_key), lambda: None)
        await link.start_forwarders()
        cctx = ssl.create_default_context(cafile=str(bp.operator_ca))
        ep = cfg.endpoints[0]
        r, w = await asyncio.open_connection(ep.listen_host, ep.listen_port, ssl=cctx,
                                             server_hostname="mqtt.operator.test")
        w.write(b"hello")
        await w.drain()
        assert await asyncio.wait_for(r.read(100), 5) == b"operator:hello"
        assert names == ["mqtt.operator.test"]
        assert sim.stats.last_target == "mqtt.operator.test:8883"
        w.close()
        await link.stop_forwarders()
    finally:
        await sim.stop()
        es.close()
        op.close()


async def test_sni_routing_mode(bp: Pki) -> None:
    sim, es = await start_sim(bp, mode="sni")
    sim.routes["echo.operator.test"] = sim.routes["echo.operator.test:7"]
    try:
        cfg = smgw_cfg(bp, sim.port).model_copy(update={"proxy": "sni"})
        c = HanConnector(cfg, bp.client_cert, bp.client_key)
        assert await roundtrip(c, cfg.endpoints[0], b"sni") == b"sni"
    finally:
        await sim.stop()
        es.close()


async def test_inbound_accepts_only_the_gateway(bp: Pki, tmp_path: Path) -> None:
    async def http_like(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await w.drain()
        w.close()

    api = await asyncio.start_server(http_like, "127.0.0.1", 0)
    api_port = api.sockets[0].getsockname()[1]
    cfg = smgw_cfg(bp, 1).model_copy(update={"inbound": Inbound(enabled=True, host="127.0.0.1", port=free_port(),
                                                                allowed_sha256=[bp.gateway_fingerprint()])})
    inbound = InboundServer(cfg, bp.client_cert, bp.client_key,
                            lambda: asyncio.open_connection("127.0.0.1", api_port))
    await inbound.start()
    sim = SmgwSim(cert=bp.gateway_cert, key=bp.gateway_key, client_ca=bp.device_ca)
    try:
        status, body = await http_request(await sim.open_inbound("127.0.0.1", inbound.port, bp.device_ca),
                                          "GET", "/")
        assert (status, body) == (200, b"ok")
        # a certificate of the same gateway CA that is not the gateway's: refused after the handshake
        streams = await sim.open_inbound("127.0.0.1", inbound.port, bp.device_ca, bp.gateway_other_cert,
                                         bp.gateway_other_key)
        with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
            await http_request(streams, "GET", "/")
        # a certificate from an unknown CA: refused in the handshake, with an alert
        with pytest.raises((ssl.SSLError, ConnectionError)):
            rogue = await sim.open_inbound("127.0.0.1", inbound.port, bp.device_ca, bp.rogue_cert, bp.rogue_key)
            await http_request(rogue, "GET", "/")
        # no certificate at all
        ctx = ssl.create_default_context(cafile=str(bp.device_ca))
        ctx.check_hostname = False
        with pytest.raises((ssl.SSLError, ConnectionError)):
            r, w = await asyncio.open_connection("127.0.0.1", inbound.port, ssl=ctx)
            w.write(b"GET / HTTP/1.1\r\n\r\n")
            await w.drain()
            if not await r.read(10):
                raise ConnectionError("closed")
        assert inbound.stats["accepted"] == 1
        assert inbound.stats["refused"] == 3
    finally:
        await inbound.stop()
        api.close()


def test_client_context_without_brainpool_group_list_fallback(bp: Pki) -> None:
    ctx = han_client_context(cert=bp.client_cert, key=bp.client_key, trust_anchor=bp.gateway_ca, check_name=True)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    names = {c["name"] for c in ctx.get_ciphers()}
    assert {"ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-SHA256"} <= names
    assert not any("RSA" in n.split("-")[1] for n in names if n.startswith("ECDHE"))


async def test_channels_open_a_few_at_once_and_not_for_clients_that_hung_up(bp: Pki) -> None:
    """Many local clients at once (1000 OCPP charge points after a start): at most OPEN_AT_ONCE HAN
    handshakes run together, the others wait their turn; a client that hangs up while it waits costs no
    handshake (counted as abandoned), the others all get their channel."""
    from smgw_link import channel

    sim, es = await start_sim(bp)
    try:
        cfg = smgw_cfg(bp, sim.port)
        link = Link(cfg, lambda: HanConnector(cfg, bp.client_cert, bp.client_key), lambda: None)
        await link.start_forwarders()
        ep = cfg.endpoints[0]
        running, most = 0, 0
        real_open = HanConnector.open

        async def counting_open(self: HanConnector, e: Endpoint) -> object:
            nonlocal running, most
            running += 1
            most = max(most, running)
            try:
                return await real_open(self, e)
            finally:
                running -= 1

        HanConnector.open = counting_open  # type: ignore[assignment,method-assign]
        try:
            # every slot taken: the clients below wait; the first ones hang up while waiting
            for _ in range(channel.OPEN_AT_ONCE):
                await link._opening.acquire()
            gone = [await asyncio.open_connection(ep.listen_host, ep.listen_port) for _ in range(5)]
            for _r, w in gone:
                w.write(b"GET / HTTP/1.1\r\n\r\n")  # sent before hanging up: still buffered at the forwarder
                await w.drain()
                w.close()
            await asyncio.sleep(0.3)
            alive = [await asyncio.open_connection(ep.listen_host, ep.listen_port)
                     for _ in range(3 * channel.OPEN_AT_ONCE)]
            await asyncio.sleep(0.2)
            for _ in range(channel.OPEN_AT_ONCE):
                link._opening.release()
            for i, (_r, w) in enumerate(alive):
                w.write(f"client {i:03d}".encode())
                await w.drain()
            for i, (r, w) in enumerate(alive):
                assert await asyncio.wait_for(r.readexactly(10), 20) == f"client {i:03d}".encode()
                w.close()
        finally:
            HanConnector.open = real_open  # type: ignore[method-assign]
        stats = link.channels["echo"]
        assert stats.abandoned == 5 and stats.opened == len(alive) and stats.failed == 0
        assert 1 < most <= channel.OPEN_AT_ONCE
        await link.stop_forwarders()
    finally:
        await sim.stop()
        es.close()
