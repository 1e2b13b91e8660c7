"""The admin API through the SMGW stand-in: the simulator opens the inbound channel with the
gateway's brainpool certificate, and each request in it is authenticated on its own; the client
certificate switch-over with automatic fall-back against the simulator's HAN TLS; the local TLS
listener with client certificates mapped to roles."""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from admin_support import (
    ADMIN_TOKEN,
    OPERATOR_TOKEN,
    VARS_TOKEN,
    VIEWER_TOKEN,
    accounts_yaml,
    api,
    listen_port,
    request,
    running_link,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from chargegate import payloads as p
from chargegate.bus import Bus
from chargegate.config import load
from chargegate.runtime import ServiceContext
from conftest import BrokerHandle, connected_bus, make_config, wait_for
from smgw_link.certstore import CertStore
from smgw_link.pki import Issued, Pki, cert_pem, issue, key_pem, make_pki, new_key
from smgw_link.sim.smgw import SmgwSim


@dataclass
class Tls:
    ca: Path
    server_cert: Path
    server_key: Path
    operator: tuple[Path, Path]  # mapped by common name
    admin: tuple[Path, Path]  # mapped by fingerprint
    stranger: tuple[Path, Path]  # issued by the CA, mapped to nothing
    foreign: tuple[Path, Path]  # issued by another CA
    admin_sha256: str


@dataclass
class Rig:
    pki: Pki
    tls: Tls
    sim: SmgwSim
    ctx: ServiceContext
    observer: Bus
    admin_port: int
    inbound_port: int
    path: Path
    limits: dict[str, list[p.GridLimit]] = field(default_factory=dict)
    links: list[p.SmgwLinkStatus] = field(default_factory=list)

    async def inbound(self, method: str, path: str, token: str | None, body: Any = None) -> tuple[int, Any]:
        streams = await self.sim.open_inbound("127.0.0.1", self.inbound_port, self.pki.device_ca)
        return await request(streams, method, path, token, body)

    def client_tls(self, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.tls.ca))
        if cert is not None:
            ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        return ctx

    async def local(self, method: str, path: str, token: str | None = ADMIN_TOKEN, body: Any = None,
                    cert: tuple[Path, Path] | None = None) -> tuple[int, Any]:
        return await api(self.admin_port, method, path, token, body, tls=self.client_tls(cert))


def make_tls(out: Path) -> Tls:
    from smgw_link.tlsconf import fingerprint

    out.mkdir(parents=True, exist_ok=True)
    ca = issue("Admin clients CA", new_key("P-256"), ca=True, org="Installer")

    def save(name: str, item: Issued) -> tuple[Path, Path]:
        c, k = out / f"{name}.pem", out / f"{name}.key"
        c.write_bytes(cert_pem(item.cert))
        k.write_bytes(key_pem(item.key))
        return c, k

    (out / "ca.pem").write_bytes(cert_pem(ca.cert))
    server = save("server", issue("localhost", new_key("P-256"), ca, dns=("localhost",), ips=("127.0.0.1",),
                                  server=True))
    admin = issue("home-owner-laptop", new_key("P-256"), ca, client=True)
    return Tls(out / "ca.pem", server[0], server[1],
               save("ops", issue("dso-ops", new_key("P-256"), ca, client=True)), save("admin", admin),
               save("stranger", issue("stranger", new_key("P-256"), ca, client=True)),
               save("foreign", issue("dso-ops", new_key("P-256"), issue("Other CA", new_key("P-256"), ca=True),
                                     client=True)),
               fingerprint(admin.cert.public_bytes(serialization.Encoding.DER)))


def rig_yaml(broker: BrokerHandle, pki: Pki, tls: Tls, sim_port: int, admin_port: int, inbound_port: int,
             store: Path) -> str:
    return f"""
site: {{name: admin-smgw-test}}
{accounts_yaml(broker, "smgw-link", "observer")}
circuits:
  - id: grid
    fuse_a: 35
    children:
      - {{id: garage, fuse_a: 32}}
evses:
  - id: wb1
    circuit: garage
    modbus: {{profile: alfen-eve, host: 127.0.0.1, port: 1502}}
smgw:
  enabled: true
  gateway: {{host: 127.0.0.1, port: {sim_port}, trust_anchor: {pki.gateway_ca}, server_name: smgw.local,
            connect_timeout_s: 2}}
  cert_store: {store}
  keepalive_s: 1
  reconnect_min_s: 0.1
  reconnect_max_s: 0.3
  functions: {{power_reduction: true}}
  inbound: {{enabled: true, host: 127.0.0.1, port: {inbound_port}, allowed_sha256: ["{pki.gateway_fingerprint()}"]}}
  http_api: {{host: 127.0.0.1, port: {listen_port()}, tokens: ["{VARS_TOKEN}"]}}
  limit_heartbeat_s: 1
  limit_hold_s: 3
admin:
  enabled: true
  host: 127.0.0.1
  port: {admin_port}
  switch_timeout_s: 5
  tls: {{cert_file: {tls.server_cert}, key_file: {tls.server_key}, client_ca_file: {tls.ca}}}
  tokens:
    - {{name: alice, role: admin, token: "{ADMIN_TOKEN}"}}
    - {{name: olga, role: operator, token: "{OPERATOR_TOKEN}"}}
    - {{name: vera, role: viewer, token: "{VIEWER_TOKEN}"}}
  clients:
    - {{name: dso-ops, role: operator, common_name: dso-ops}}
    - {{name: owner-laptop, role: admin, sha256: "{tls.admin_sha256}"}}
"""


@pytest.fixture(scope="module")
async def rig(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    tmp = tmp_path_factory.mktemp("smgw-admin-inbound")
    pki = make_pki(tmp / "pki", "brainpoolP256r1")
    tls = make_tls(tmp / "admin-tls")
    store = CertStore(tmp / "store")
    store.import_pem("cls", pki.client_cert, pki.client_key)
    store.select("cls")
    sim = SmgwSim(cert=pki.gateway_cert, key=pki.gateway_key, client_ca=pki.device_ca)
    await sim.start()
    admin_port, inbound_port = listen_port(), listen_port()
    cfg = make_config(tmp, rig_yaml(broker, pki, tls, sim.port, admin_port, inbound_port, tmp / "store"))
    observer = await connected_bus(broker, "observer")
    try:
        async with running_link(cfg, tmp / "chargegate.yaml") as ctx:
            r = Rig(pki, tls, sim, ctx, observer, admin_port, inbound_port, tmp / "chargegate.yaml")
            observer.subscribe("grid.limit",
                               lambda msg: r.limits.setdefault(msg.params["source"], []).append(msg.payload))
            observer.subscribe("link.smgw", lambda msg: r.links.append(msg.payload))
            await wait_for(lambda: bool(r.links) and r.links[-1].state == p.LinkState.UP, 15)
            yield r
    finally:
        await observer.stop()
        await sim.stop()


async def test_operator_through_the_smgw_sets_a_limit_but_cannot_change_a_fuse(rig: Rig) -> None:
    status, who = await rig.inbound("GET", "/v1/whoami", OPERATOR_TOKEN)
    assert status == 200 and who == {"name": "olga", "role": "operator", "method": "token", "via": "inbound"}
    # the gateway's TLS authenticates the channel, not the person: no token, no access
    assert (await rig.inbound("GET", "/v1/status", None))[0] == 401
    assert (await rig.inbound("PUT", "/v1/limits/dso", "not-a-token", {"power_w": 1}))[0] == 401
    before = rig.path.read_bytes()
    status, body = await rig.inbound("PATCH", "/v1/config", OPERATOR_TOKEN,
                                     {"circuits": [{"id": "grid", "fuse_a": 63}]})
    assert status == 403
    assert rig.path.read_bytes() == before and load(rig.path).root_circuit.fuse_a == 35
    status, body = await rig.inbound("PUT", "/v1/limits/dso", OPERATOR_TOKEN, {"power_w": 5000, "duration_s": 300})
    assert status == 200, body
    assert body["input"] == "lpc" and body["published"]["power_w"] == 5000
    await wait_for(lambda: bool(rig.limits.get("dso")) and rig.limits["dso"][-1].active
                   and rig.limits["dso"][-1].power_w == 5000, 5)
    gl = rig.limits["dso"][-1]
    assert gl.id == "admin:olga" and "olga" in (gl.reason or "") and gl.scope == p.LimitScope.CONTROLLABLE
    # the variables API still answers on the same channel
    status, vars_ = await rig.inbound("GET", "/api/variables", VARS_TOKEN)
    assert status == 200 and set(vars_) == {"AVAIL", "TARIF"}
    # an admin token through the same channel may change the fuse
    status, body = await rig.inbound("PATCH", "/v1/config", ADMIN_TOKEN, {"circuits": [
        {"id": "grid", "fuse_a": 40, "children": [{"id": "garage", "fuse_a": 32}]}]})
    assert status == 200 and body["changed"], body
    assert load(rig.path).root_circuit.fuse_a == 40
    # the link kept running: a circuit change does not touch the smgw section
    assert rig.links[-1].state == p.LinkState.UP
    status, body = await rig.inbound("DELETE", "/v1/limits/dso", OPERATOR_TOKEN)
    assert status == 200
    await wait_for(lambda: not rig.limits["dso"][-1].active, 5)
    status, rows = await rig.local("GET", "/v1/audit")
    assert status == 200
    inbound_rows = [r for r in rows if (r.get("detail") or {}).get("via") == "inbound"]
    assert any(r["who"] == "olga" and r["action"] == "PATCH patch_config" and "403" in r["result"]
               for r in inbound_rows)
    assert any(r["who"] == "olga" and r["action"] == "PUT put_limit" and r["result"] == "accepted"
               for r in inbound_rows)
    assert any(r["who"] == "(unauthenticated)" and "401" in r["result"] for r in inbound_rows)
    assert any(r["who"] == "alice" and r["action"] == "PATCH patch_config" and r["result"] == "accepted"
               for r in inbound_rows)


async def test_local_tls_listener_maps_client_certificates_to_roles(rig: Rig) -> None:
    status, who = await rig.local("GET", "/v1/whoami", None, cert=rig.tls.operator)
    assert status == 200 and who == {"name": "dso-ops", "role": "operator", "method": "certificate",
                                     "via": "local-tls"}
    status, who = await rig.local("GET", "/v1/whoami", None, cert=rig.tls.admin)
    assert status == 200 and who["name"] == "owner-laptop" and who["role"] == "admin"
    # a certificate of the CA that no mapping names, and no certificate at all: refused
    assert (await rig.local("GET", "/v1/whoami", None, cert=rig.tls.stranger))[0] == 401
    assert (await rig.local("GET", "/v1/whoami", None))[0] == 401
    # a bearer token works over TLS without a certificate
    status, who = await rig.local("GET", "/v1/whoami", VIEWER_TOKEN)
    assert status == 200 and who["via"] == "local-tls" and who["method"] == "token"
    assert (await rig.local("PATCH", "/v1/config", None, {"site": {"name": "x"}}, cert=rig.tls.operator))[0] == 403
    # a certificate from another CA does not even get through the handshake
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await rig.local("GET", "/v1/whoami", None, cert=rig.tls.foreign)
    # the plain-HTTP port does not exist: TLS only
    with pytest.raises((ConnectionError, ValueError, OSError)):
        await api(rig.admin_port, "GET", "/v1/whoami", VIEWER_TOKEN)


async def test_certificate_upload_check_and_switch_over(rig: Rig) -> None:
    pem = rig.pki.client_cert.read_text()
    key = rig.pki.client_key.read_text()
    status, out = await rig.local("POST", "/v1/smgw/certificates", ADMIN_TOKEN,
                                  {"name": "cls-renewed", "format": "pem", "certificate": pem, "key": key})
    assert status == 201, out
    assert out["usable"] and out["key_matches"] and out["valid_now"] and out["chain_ok"] and not out["active"]
    # viewer and operator may not upload
    assert (await rig.local("POST", "/v1/smgw/certificates", OPERATOR_TOKEN,
                            {"name": "x", "format": "pem", "certificate": pem, "key": key}))[0] == 403
    # a key that does not belong to the certificate is refused with the reason
    other_key = rig.pki.rogue_key.read_text()
    status, out = await rig.local("POST", "/v1/smgw/certificates", ADMIN_TOKEN,
                                  {"name": "mismatch", "format": "pem", "certificate": pem, "key": other_key})
    assert status == 422 and "does not belong" in out["detail"]
    # PKCS#12 with a password
    cert = __import__("cryptography.x509", fromlist=["x"]).load_pem_x509_certificate(pem.encode())
    pkey = serialization.load_pem_private_key(key.encode(), None)
    p12 = pkcs12.serialize_key_and_certificates(b"cls", pkey, cert, None,  # type: ignore[arg-type]
                                                serialization.BestAvailableEncryption(b"secret"))
    status, out = await rig.local("POST", "/v1/smgw/certificates", ADMIN_TOKEN,
                                  {"name": "cls-p12", "format": "pkcs12", "certificate": base64.b64encode(p12).decode(),
                                   "password": "secret"})
    assert status == 201 and out["key_matches"], out
    status, out = await rig.local("POST", "/v1/smgw/certificates", ADMIN_TOKEN,
                                  {"name": "cls-p12b", "format": "pkcs12", "password": "wrong",
                                   "certificate": base64.b64encode(p12).decode()})
    assert status == 422 and "password" in out["detail"]
    # an expired certificate is refused, naming its notAfter; with force it is stored but cannot be switched to
    expired = {"name": "old", "format": "pem", "certificate": rig.pki.expired_cert.read_text(),
               "key": rig.pki.expired_key.read_text()}
    status, out = await rig.local("POST", "/v1/smgw/certificates", ADMIN_TOKEN, expired)
    assert status == 422 and "has expired: notAfter" in out["detail"] and "force" in out["detail"], out
    assert out["errors"][0]["path"] == "certificate" and "notAfter" in out["errors"][0]["message"]
    assert (await rig.local("GET", "/v1/smgw/certificates/old", VIEWER_TOKEN))[0] == 404  # nothing stored
    status, out = await rig.local("POST", "/v1/smgw/certificates", ADMIN_TOKEN, {**expired, "force": True})
    assert status == 201 and not out["usable"] and not out["valid_now"] and "expired" in out["problems"][0]
    assert out["validity"] == out["problems"]
    status, out = await rig.local("POST", "/v1/smgw/certificates/old/activate", ADMIN_TOKEN)
    assert status == 422 and "expired" in out["errors"][0]["message"] and "force" in out["detail"]
    # switch over to the renewed certificate: the link comes up with it
    status, out = await rig.local("POST", "/v1/smgw/certificates/cls-renewed/activate", ADMIN_TOKEN, {})
    assert status == 202 and out["state"] == "switching" and out["previous"] == "cls", out
    await wait_switch(rig, "done")
    await wait_for(lambda: rig.links[-1].certificate == "cls-renewed" and rig.links[-1].state == p.LinkState.UP, 5)
    status, certs = await rig.local("GET", "/v1/smgw/certificates", VIEWER_TOKEN)
    assert [c["name"] for c in certs if c["active"]] == ["cls-renewed"]


async def test_certificate_switch_falls_back_when_the_link_does_not_come_up(rig: Rig) -> None:
    # a certificate the gateway does not trust (another CA): the handshake fails
    status, out = await rig.local("POST", "/v1/smgw/certificates", ADMIN_TOKEN,
                                  {"name": "rogue", "format": "pem", "certificate": rig.pki.rogue_cert.read_text(),
                                   "key": rig.pki.rogue_key.read_text()})
    assert status == 201 and out["usable"], out  # locally nothing is wrong with it
    assert any("trust anchor" in w for w in out["warnings"])
    status, out = await rig.local("POST", "/v1/smgw/certificates/rogue/activate", ADMIN_TOKEN, {"timeout_s": 2})
    assert status == 202 and out["previous"] == "cls-renewed"
    assert (await rig.local("POST", "/v1/smgw/certificates/cls/activate", ADMIN_TOKEN))[0] == 409  # in progress
    sw = await wait_switch(rig, "fell_back")
    assert sw["to"] == "rogue" and sw["error"]
    # the previous certificate is back and the link is up with it
    await wait_for(lambda: rig.links[-1].certificate == "cls-renewed" and rig.links[-1].state == p.LinkState.UP, 10)
    assert CertStore(rig.ctx.config.smgw.cert_store or Path()).selected() == "cls-renewed"
    status, rows = await rig.local("GET", "/v1/audit")
    results = [r for r in rows if r["action"] == "certificate.switch.result"]
    assert [(r["target"], r["result"]) for r in results][-2:] == [("cls-renewed", "accepted"), ("rogue", "failed")]
    assert results[-1]["detail"]["state"] == "fell_back" and results[-1]["who"] == "alice"


async def wait_switch(rig: Rig, state: str, timeout: float = 10) -> dict[str, Any]:  # noqa: ASYNC109
    """Poll ``GET /v1/smgw/certificate-switch`` until the switch-over reaches ``state``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        status, sw = await rig.local("GET", "/v1/smgw/certificate-switch", VIEWER_TOKEN)
        assert status == 200
        if sw["state"] == state:
            return sw  # type: ignore[no-any-return]
        assert loop.time() < deadline, f"switch-over stays {sw}"
        await asyncio.sleep(0.1)


async def test_a_certificate_under_a_reserved_name_is_refused_with_the_reason(rig: Rig) -> None:
    """``selected`` is the file in which the store keeps its choice: uploading a certificate under that name
    is a 422 naming the problem (it was a 500, FileExistsError), and the selection is untouched."""
    store = CertStore(rig.ctx.config.smgw.cert_store or Path())
    chosen = store.selected()
    for name in ("selected", "Selected"):
        status, out = await rig.local("POST", "/v1/smgw/certificates", ADMIN_TOKEN,
                                      {"name": name, "format": "pem", "certificate": rig.pki.client_cert.read_text(),
                                       "key": rig.pki.client_key.read_text()})
        assert status == 422, out
        assert "reserved" in out["detail"] and name in out["detail"], out
    assert store.selected() == chosen and (store.root / "selected").is_file()
    status, out = await rig.local("GET", "/v1/smgw/certificates/selected", VIEWER_TOKEN)
    assert status == 404 and "reserved" in out["detail"]
    status, rows = await rig.local("GET", "/v1/audit")
    assert any(r["action"] == "POST upload" and "422" in r["result"] and "reserved" in r["result"] for r in rows)
    assert rig.ctx.counters["admin_errors"] == 0


def dated_client(days_from: float, days_to: float) -> tuple[str, str]:
    """A client certificate valid from/to these many days from now (PEM, key PEM)."""
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    ca = issue("Some device CA", new_key("brainpoolP256r1"), ca=True)
    item = issue("chargegate-cls", new_key("brainpoolP256r1"), ca, client=True,
                 not_before=now + timedelta(days=days_from), not_after=now + timedelta(days=days_to))
    return cert_pem(item.cert).decode(), key_pem(item.key).decode()


async def test_certificates_outside_their_validity_need_force(rig: Rig) -> None:
    """Upload refuses a certificate that is not valid yet (naming notBefore) or has expired; ``force`` stores
    it; activate refuses it unless ``force``, and a forced switch to an expired one falls back by itself."""
    pem, key = dated_client(2, 30)
    future = {"name": "future", "format": "pem", "certificate": pem, "key": key}
    status, out = await rig.local("POST", "/v1/smgw/certificates", ADMIN_TOKEN, future)
    assert status == 422 and "not valid yet: notBefore" in out["detail"], out
    status, out = await rig.local("POST", "/v1/smgw/certificates", ADMIN_TOKEN, {**future, "force": True})
    assert status == 201 and not out["valid_now"] and "notBefore" in out["validity"][0], out
    status, out = await rig.local("POST", "/v1/smgw/certificates/future/activate", ADMIN_TOKEN, {})
    assert status == 422 and "force" in out["detail"] and "notBefore" in out["errors"][0]["message"]
    # forced: the switch-over is tried, the gateway refuses the handshake, the previous one comes back
    active = [c["name"] for c in (await rig.local("GET", "/v1/smgw/certificates", VIEWER_TOKEN))[1] if c["active"]]
    status, out = await rig.local("POST", "/v1/smgw/certificates", ADMIN_TOKEN,
                                  {"name": "stale", "format": "pem", "certificate": rig.pki.expired_cert.read_text(),
                                   "key": rig.pki.expired_key.read_text(), "force": True})
    assert status == 201
    status, out = await rig.local("POST", "/v1/smgw/certificates/stale/activate", ADMIN_TOKEN,
                                  {"force": True, "timeout_s": 1})
    assert status == 202 and out["previous"] == active[0], out
    sw = await wait_switch(rig, "fell_back")
    assert sw["to"] == "stale"
    assert CertStore(rig.ctx.config.smgw.cert_store or Path()).selected() == active[0]
    # a certificate with another problem is not switched to, force or not
    status, out = await rig.local("POST", "/v1/smgw/certificates/selected/activate", ADMIN_TOKEN, {"force": True})
    assert status == 404
