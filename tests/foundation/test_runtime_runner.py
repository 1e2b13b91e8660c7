"""Service runtime (health, last will, reload, clean stop) and the process supervisor."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chargegate import payloads as p
from chargegate.broker import LocalBroker, free_port
from chargegate.runner import Proc, Supervisor
from conftest import MINIMAL_CONFIG, BrokerHandle, connected_bus, make_config, wait_for

SERVICE_SNIPPET = (
    "import asyncio, sys\n"
    "from chargegate.runtime import run_service\n"
    "async def serve(ctx):\n"
    "    ctx.counters['ticks'] += 1\n"
    "    await asyncio.Event().wait()\n"
    "run_service('evse-poller', serve, sys.argv[1:])\n"
)


async def test_health_last_will_and_clean_stop(broker: BrokerHandle) -> None:
    obs = await connected_bus(broker, "observer")
    health: list[p.Health] = []
    obs.subscribe("service.health", lambda m: health.append(m.payload), service="evse-poller")
    env = {**os.environ, "CHARGEGATE_HEALTH_INTERVAL_S": "0.5"}
    proc = subprocess.Popen([sys.executable, "-c", SERVICE_SNIPPET, "--config", str(broker.config_path)], env=env)
    try:
        await wait_for(lambda: any(h.status == "online" for h in health), timeout=15)
        h = next(h for h in health if h.status == "online")
        assert h.version and h.pid == proc.pid and h.config_version and h.counters["ticks"] == 1
        await wait_for(lambda: sum(x.status == "online" for x in health) >= 3, timeout=10)  # heartbeat
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        await wait_for(lambda: health[-1].status == "offline", timeout=10)
        assert "last will" in (health[-1].detail or "")
        # a clean stop publishes offline itself
        proc = subprocess.Popen([sys.executable, "-c", SERVICE_SNIPPET, "--config", str(broker.config_path)],
                                env=env)
        await wait_for(lambda: health[-1].status == "online", timeout=15)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        await wait_for(lambda: health[-1].status == "offline" and health[-1].detail == "stopped", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
        obs.clear("service.health", service="evse-poller")
        await obs.stop()


def test_bad_config_exits_2_with_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("circuits: []\n")
    r = subprocess.run([sys.executable, "-c", SERVICE_SNIPPET, "--config", str(bad)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2
    assert f"{bad}: circuits" in r.stderr


async def test_reload_command(broker: BrokerHandle, tmp_path: Path) -> None:
    from chargegate.runtime import start_context, stop_context

    cfg_path = tmp_path / "chargegate.yaml"
    cfg_path.write_text(broker.config_path.read_text())
    cfg = make_config(tmp_path, cfg_path.read_text())
    cfg.state_dir = broker.config.state_dir
    ctx = await start_context("load-controller", cfg, cfg_path, connect_timeout=5)
    seen: list[str] = []
    ctx.on_reload(lambda new: seen.append(new.digest()))
    admin = await connected_bus(broker, "admin")
    await asyncio.sleep(0.1)
    # an invalid new configuration changes nothing
    cfg_path.write_text("circuits: nope\n")
    admin.publish("service.command", p.ServiceCommand(action="reload", request_id="r1"), service="load-controller")
    await wait_for(lambda: ctx.counters["config_rejected"] == 1)
    assert not seen
    new_text = MINIMAL_CONFIG.replace("fuse_a: 32", "fuse_a: 25")
    cfg_path.write_text(new_text + f"\nstate_dir: {broker.config.state_dir}\n")
    admin.publish("service.command", p.ServiceCommand(action="reload", request_id="r2"), service="load-controller")
    await wait_for(lambda: len(seen) == 1)
    assert ctx.config.root_circuit.children[0].fuse_a == 25
    await admin.stop()
    await stop_context(ctx)


def test_supervisor_restarts_crashed_process_and_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import chargegate.runner as runner

    monkeypatch.setattr(runner, "BACKOFF_MIN_S", 0.1)
    cfg = make_config(tmp_path)
    cfg.broker.port = free_port()
    sup = Supervisor()
    sup.broker = LocalBroker.prepare(cfg, port=cfg.broker.port)
    marker = tmp_path / "starts"
    sup.add(Proc("crasher", [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x'); raise SystemExit(3)"]))
    sup.start_all()
    try:
        deadline = time.monotonic() + 20
        while (not marker.exists() or len(marker.read_text()) < 3) and time.monotonic() < deadline:
            sup.tick()
            time.sleep(0.05)
        assert len(marker.read_text()) >= 3  # restarted with backoff
        sup.broker.kill()
        assert not sup.broker.alive()
        sup.tick()
        assert sup.broker.alive()
    finally:
        sup.stop_all()
        sup.broker.discard()
    assert not sup.broker.alive()


async def test_service_logs_reach_the_bus_redacted(broker: BrokerHandle) -> None:
    from chargegate import log as logsetup
    from chargegate.runtime import start_context, stop_context

    logsetup.setup("test", fmt="json")
    obs = await connected_bus(broker, "observer")
    got: list[p.LogRecord] = []
    obs.subscribe("service.log", lambda m: got.append(m.payload), service="ocpp-gateway")
    await asyncio.sleep(0.1)
    ctx = await start_context("ocpp-gateway", broker.config, broker.config_path, connect_timeout=5)
    ctx.log.warning("backend refused", charge_box="CB1", password="hunter2")
    await wait_for(lambda: any(r.event == "backend refused" for r in got))
    rec = next(r for r in got if r.event == "backend refused")
    assert rec.level == "warning" and rec.fields["charge_box"] == "CB1"
    assert "hunter2" not in rec.model_dump_json()
    await stop_context(ctx)
    await obs.stop()
