"""Helpers for the ocpp-gateway tests: configurations, the gateway in-process or as a process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from chargegate import config as cfgmod
from chargegate.broker import free_port
from chargegate.runtime import ServiceContext, start_context, stop_context
from ocpp_gateway.service import Gateway

REPO = Path(__file__).resolve().parents[2]


def gateway_config(tmp: Path, broker_port: int, *, backend_url: str | None, local_port: int | None = None,
                   evses: str, ocpp_extra: str = "", backend_extra: str = "", queue_extra: str = "",
                   extra: str = "") -> tuple[cfgmod.Config, Path]:
    """A configuration with the given ``evses:`` YAML block."""
    local_port = local_port or free_port()
    backend = "  backend: {enabled: false}\n" if backend_url is None else (
        f"  backend:\n    enabled: true\n    url: {backend_url}\n    heartbeat_interval_s: 60\n"
        f"    reconnect_min_s: 0.2\n    reconnect_max_s: 1.0\n    call_timeout_s: 5\n{backend_extra}")
    text = f"""
site: {{name: ocpp-test}}
broker: {{port: {broker_port}}}
circuits:
  - id: grid
    fuse_a: 63
evses:
{evses}
ocpp:
  local:
    host: 127.0.0.1
    port: {local_port}
{ocpp_extra}
{backend}
  queue:
    retry_interval_s: 0.2
{queue_extra}
{extra}
"""
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "chargegate.yaml"
    path.write_text(text)
    cfg = cfgmod.load(path)
    return cfg, path


def share_broker_secrets(cfg: cfgmod.Config, broker_cfg: cfgmod.Config) -> None:
    """Use the test broker's generated account passwords."""
    src = broker_cfg.state_dir / "broker" / "secrets"
    dst = cfg.state_dir / "broker" / "secrets"
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_text(f.read_text())


class InProcessGateway:
    def __init__(self, cfg: cfgmod.Config, path: Path) -> None:
        self.cfg = cfg
        self.path = path
        self.ctx: ServiceContext | None = None
        self.gw: Gateway | None = None

    async def start(self) -> Gateway:
        self.ctx = await start_context("ocpp-gateway", self.cfg, self.path, connect_timeout=5)
        self.gw = Gateway(self.ctx, self.cfg)
        ctx = self.ctx
        ctx.bus.subscribe("evse.status", lambda m: self.gw.on_status(m))  # type: ignore[union-attr]
        ctx.bus.subscribe("evse.command_result", lambda m: self.gw.on_result(m))  # type: ignore[union-attr]
        ctx.bus.subscribe("evse.setpoint", lambda m: self.gw.on_setpoint(m))  # type: ignore[union-attr]
        await self.gw.start()
        return self.gw

    async def stop(self) -> None:
        if self.gw is not None:
            await self.gw.stop()
        if self.ctx is not None:
            await stop_context(self.ctx)


@contextlib.asynccontextmanager
async def running_gateway(cfg: cfgmod.Config, path: Path) -> AsyncIterator[Gateway]:
    g = InProcessGateway(cfg, path)
    gw = await g.start()
    try:
        yield gw
    finally:
        await g.stop()


class GatewayProcess:
    """The gateway as a real process (``python -m ocpp_gateway``), for SIGKILL tests."""

    def __init__(self, path: Path, log: Path) -> None:
        self.path = path
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, CHARGEGATE_HEALTH_INTERVAL_S="1")
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "ocpp_gateway", "--config", str(self.path),
                                          "--log-format", "json"], stdout=f, stderr=f, env=env, cwd=REPO,
                                         start_new_session=True)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


async def until(pred: Any, wait_s: float = 10.0, interval: float = 0.02, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        if pred():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not met within {wait_s} s")
        await asyncio.sleep(interval)


def make_pki(dirpath: Path, server_names: tuple[str, ...] = ("localhost",),
             clients: tuple[str, ...] = ()) -> dict[str, Path]:
    """A test CA, a server certificate (SAN: names and 127.0.0.1) and client certificates (CN = name)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    dirpath.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chargegate test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    out = {"ca": dirpath / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def issue(name: str, server: bool) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
             .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                   else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            sans: list[x509.GeneralName] = [x509.DNSName(n) for n in server_names]
            sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        c, k = dirpath / f"{name}.pem", dirpath / f"{name}.key"
        c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
        return c, k

    out["server_cert"], out["server_key"] = issue(server_names[0], True)
    for cl in clients:
        out[f"{cl}_cert"], out[f"{cl}_key"] = issue(cl, False)
    return out
