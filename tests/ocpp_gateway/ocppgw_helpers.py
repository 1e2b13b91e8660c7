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
from ocpp_gateway.service import Gateway, subscribe

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
        watch = subscribe(self.ctx, lambda: self.gw)  # type: ignore[arg-type,return-value]
        self.gw = Gateway(self.ctx, self.cfg, watch)  # the service's own subscriptions
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
    """A test CA, a server certificate (SAN: names and 127.0.0.1) and client certificates (CN = name),
    P-256, issued with smgw-link's test PKI helpers."""
    from smgw_link.pki import cert_pem, issue, key_pem, new_key

    dirpath.mkdir(parents=True, exist_ok=True)
    ca = issue("chargegate test CA", new_key("P-256"), ca=True)
    out = {"ca": dirpath / "ca.pem"}
    out["ca"].write_bytes(cert_pem(ca.cert))

    def save(name: str, server: bool) -> tuple[Path, Path]:
        item = issue(name, new_key("P-256"), ca, server=server, client=not server,
                     dns=server_names if server else (), ips=("127.0.0.1",) if server else ())
        c, k = dirpath / f"{name}.pem", dirpath / f"{name}.key"
        c.write_bytes(cert_pem(item.cert))
        k.write_bytes(key_pem(item.key))
        return c, k

    out["server_cert"], out["server_key"] = save(server_names[0], True)
    for cl in clients:
        out[f"{cl}_cert"], out[f"{cl}_key"] = save(cl, False)
    return out
