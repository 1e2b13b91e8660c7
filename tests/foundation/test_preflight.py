"""What `config check` finds beyond the models, and what `run` refuses before it starts anything:
unresolvable secrets (named, never their values), missing TLS files, unknown device profiles, services
that are not installed, a broker port another program listens on. Neither prints a traceback; a
service that cannot use its configuration exits 2 and is not restarted in a loop."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chargegate import config as cfgmod
from chargegate.broker import BrokerPortInUse, LocalBroker, free_port, port_free
from chargegate.preflight import problems, service_problems
from chargegate.runner import CONFIG_ERROR_EXIT, Proc, Supervisor
from conftest import MINIMAL_CONFIG, make_config

CLI = [sys.executable, "-m", "chargegate.cli"]
SET_SECRET = "s3cr3t-value-never-printed"

SECRETS = """
broker:
  port: {port}
  accounts:
    observer: {{env: CG_TEST_PF_OBSERVER}}
    admin: {{file: {missing}}}
    sim: {{env: CG_TEST_PF_SET}}
ocpp:
  backend: {{enabled: true, url: "ws://127.0.0.1:1/ocpp", password: {{env: CG_TEST_PF_BACKEND}}, ca_file: {ca}}}
admin:
  enabled: false
  tokens: [{{name: x, role: admin, token: {{env: CG_TEST_PF_DISABLED}}}}]
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CG_TEST_PF_")}
    return {**env, "CG_TEST_PF_SET": SET_SECRET, **extra}


@pytest.fixture
def site(tmp_path: Path) -> Path:
    path = tmp_path / "site.yaml"
    doc = MINIMAL_CONFIG.replace("profile: alfen-eve", "profile: alfen-eve-pro") + SECRETS.format(
        port=free_port(), missing=tmp_path / "no-such-secret", ca=tmp_path / "no-such-ca.pem")
    path.write_text(doc)
    return path


def test_config_check_finds_what_run_would_refuse(site: Path, tmp_path: Path) -> None:
    r = subprocess.run([*CLI, "config", "check", str(site)], capture_output=True, text=True, timeout=60, env=_env())
    assert r.returncode == 1, r.stdout
    err = r.stderr
    assert f"{site}: broker.accounts.observer: secret environment variable CG_TEST_PF_OBSERVER is not set" in err
    assert f"{site}: broker.accounts.admin: secret file {tmp_path / 'no-such-secret'} cannot be read" in err
    assert f"{site}: ocpp.backend.password: secret environment variable CG_TEST_PF_BACKEND is not set" in err
    assert f"{site}: ocpp.backend.ca_file: cannot read {tmp_path / 'no-such-ca.pem'}" in err
    # the unknown profile, with the ones there are
    assert f"{site}: evses[0].modbus.profile: unknown device profile 'alfen-eve-pro'; available: " in err
    assert "alfen-eve," in err
    # a switched-off section is not checked; a resolvable secret is not printed
    assert "CG_TEST_PF_DISABLED" not in err and "admin.tokens" not in err
    assert SET_SECRET not in err + r.stdout
    assert "Traceback" not in err

    # everything resolvable: ok
    (tmp_path / "no-such-secret").write_text("from-a-file\n")
    (tmp_path / "no-such-ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    site.write_text(site.read_text().replace("alfen-eve-pro", "alfen-eve"))
    env = _env(CG_TEST_PF_OBSERVER="o", CG_TEST_PF_BACKEND="b")
    r = subprocess.run([*CLI, "config", "check", str(site)], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr


def test_problems_are_scoped_to_the_services_run(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CG_TEST_PF_OBSERVER", raising=False)
    monkeypatch.delenv("CG_TEST_PF_BACKEND", raising=False)
    monkeypatch.setenv("CG_TEST_PF_SET", SET_SECRET)
    cfg = cfgmod.load(site)
    every = {p for p, _ in problems(cfg)}
    assert {"ocpp.backend.password", "evses[0].modbus.profile", "broker.accounts.observer"} <= every
    # run load-controller: the broker accounts (the runner writes them all), not the OCPP backend's
    only = {p for p, _ in problems(cfg, ["load-controller"])}
    assert "broker.accounts.observer" in only
    assert "ocpp.backend.password" not in only and "evses[0].modbus.profile" not in only
    # a service itself needs only its own broker account
    own = {p for p, _ in service_problems(cfg, "ocpp-gateway")}
    assert "ocpp.backend.password" in own and "broker.accounts.observer" not in own
    # a service that is not installed
    missing = problems(cfg, installed={"evse-poller": "evse_poller"})
    assert any(p == "services[1]" and "service ocpp-gateway is not installed; installed: evse-poller" in m
               for p, m in missing), missing


def test_run_refuses_a_configuration_problem_without_a_traceback(site: Path) -> None:
    t0 = time.monotonic()
    r = subprocess.run([*CLI, "run", "--config", str(site)], capture_output=True, text=True, timeout=60, env=_env())
    assert r.returncode == 1
    assert "broker.accounts.observer: secret environment variable CG_TEST_PF_OBSERVER is not set" in r.stderr
    assert "chargegate run: not started" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 30
    assert not (site.parent / "state" / "broker" / "mosquitto.log").exists()  # nothing was started


@pytest.fixture
def listener() -> Iterator[int]:
    """Another program listening on a port (as a second broker would)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    port = free_port()
    s.bind(("127.0.0.1", port))
    s.listen()
    try:
        yield port
    finally:
        s.close()


def test_run_stops_with_one_message_when_the_broker_port_is_taken(tmp_path: Path, listener: int) -> None:
    path = tmp_path / "chargegate.yaml"
    path.write_text(MINIMAL_CONFIG + f"\nbroker: {{port: {listener}}}\nservices: [load-controller]\n")
    r = subprocess.run([*CLI, "run", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"port {listener} on 127.0.0.1 is in use by another program" in r.stderr
    assert f"set broker.port in {path} to a free port" in r.stderr
    assert "broker started" not in r.stderr + r.stdout and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_port_probe_matches_a_server_bind(listener: int) -> None:
    assert not port_free(listener)
    # a port whose last connection is in TIME-WAIT (a server stopped a moment ago) counts as free
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    port = free_port()
    srv.bind(("127.0.0.1", port))
    srv.listen()
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.close()  # the server closes first: its side goes to TIME-WAIT
    cli.close()
    srv.close()
    assert port_free(port)


def test_broker_start_refuses_a_taken_port_and_restarts_with_backoff(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    port = free_port()
    b = LocalBroker.prepare(cfg, port=port)
    sup = Supervisor()
    sup.broker = b
    try:
        b.start()
        b.kill()
        other = socket.socket()  # another program takes the port while ours is down
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind(("127.0.0.1", port))
        other.listen()
        with pytest.raises(BrokerPortInUse, match=f"port {port} on 127.0.0.1 is in use"):
            b.start()
        t_end = time.monotonic() + 1.5
        while time.monotonic() < t_end:
            sup.tick()
            time.sleep(0.02)
        # 0.5 s, then 1 s: about 2 attempts in 1.5 s, not one per tick
        assert 1 <= sup._broker_failures <= 3, sup._broker_failures
        assert not b.alive()
        other.close()
        deadline = time.monotonic() + 10
        while not b.alive() and time.monotonic() < deadline:
            sup.tick()
            time.sleep(0.05)
        assert b.alive() and sup._broker_failures == 0
    finally:
        b.discard()


def test_a_service_without_its_secret_exits_2_and_waits_for_the_configuration(tmp_path: Path) -> None:
    path = tmp_path / "chargegate.yaml"
    path.write_text(MINIMAL_CONFIG + "\nbroker: {accounts: {load-controller: {env: CG_TEST_PF_UNSET}}}\n")
    r = subprocess.run([sys.executable, "-m", "load_controller", "--config", str(path)], capture_output=True,
                       text=True, timeout=60, env=_env())
    assert r.returncode == CONFIG_ERROR_EXIT
    assert "broker.accounts.load-controller: secret environment variable CG_TEST_PF_UNSET is not set" in r.stderr
    assert "Traceback" not in r.stderr

    marker = tmp_path / "starts"
    sup = Supervisor()
    sup.add(Proc("refuser", [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x'); raise SystemExit(2)"],
                 config_file=path))
    sup.start_all()
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            sup.tick()
            time.sleep(0.05)
        assert marker.read_text() == "x"  # not restarted while the configuration is the same
        os.utime(path, (time.time() + 5, time.time() + 5))  # the installer fixed it
        deadline = time.monotonic() + 10
        while len(marker.read_text()) < 2 and time.monotonic() < deadline:
            sup.tick()
            time.sleep(0.05)
        assert marker.read_text() == "xx"
    finally:
        sup.stop_all()


FALLBACK_SITE = """
site: {{name: test}}
circuits:
  - id: grid
    fuse_a: 35
    children:
      - id: garage
        fuse_a: {garage_fuse}
evses:
  - {{id: wb1, circuit: garage, safe_current_a: 10, modbus: {{profile: alfen-eve, host: 127.0.0.1, port: 1502}}}}
  - {{id: wb2, circuit: garage, safe_current_a: 10, modbus: {{profile: alfen-eve, host: 127.0.0.1, port: 1504}}}}
  - {{id: wb3, circuit: garage, phases: 1, phase_rotation: [2], safe_current_a: 6, ocpp: {{charge_box_id: CB1}}}}
  - {{id: wb4, circuit: grid, phases: 1, phase_rotation: [2], safe_current_a: {wb4_safe}, ocpp: {{charge_box_id: CB2}}}}
"""


def test_config_check_warns_when_the_safe_currents_of_a_circuit_exceed_its_fuse(tmp_path: Path) -> None:
    # the garage's EVSEs fall back to 10 + 10 A on L1/L3 and 10 + 10 + 6 A on L2 (wb3 is one-phase on L2): 26 A
    # on L2 fits the garage's 32 A fuse; with wb4 (on L2, below the 35 A root) 26 + 10 = 36 A does not fit the root
    cfg = make_config(tmp_path, FALLBACK_SITE.format(garage_fuse=32, wb4_safe=10))
    from chargegate.preflight import fallback_warnings, warnings

    found = fallback_warnings(cfg)
    assert [p for p, _ in found] == ["circuits[0]"], found
    assert "circuit grid: the safe currents of its 4 EVSEs add up to 36 A on L2, above its fuse of 35 A" in found[0][1]
    assert warnings(cfg) == found
    # a smaller garage fuse: the garage too (26 A on L2, 20 A on L1 and L3 against 25 A)
    cfg = make_config(tmp_path, FALLBACK_SITE.format(garage_fuse=25, wb4_safe=10))
    found = fallback_warnings(cfg)
    assert [p for p, _ in found] == ["circuits[0]", "circuits[0].children[0]"], found
    assert ("circuit garage: the safe currents of its 3 EVSEs add up to 26 A on L2, above its fuse of 25 A"
            in found[1][1])
    # safe current 0 (off) counts nothing; everything fits: no warning
    cfg = make_config(tmp_path, FALLBACK_SITE.format(garage_fuse=32, wb4_safe=0))
    assert fallback_warnings(cfg) == []

    # the command: a warning on stderr, still ok (exit 0); --strict makes it fail
    site = tmp_path / "site.yaml"
    site.write_text(FALLBACK_SITE.format(garage_fuse=32, wb4_safe=10))
    r = subprocess.run([*CLI, "config", "check", str(site)], capture_output=True, text=True, timeout=60, env=_env())
    assert r.returncode == 0 and r.stdout.startswith("ok") and "1 warning(s)" in r.stdout, (r.stdout, r.stderr)
    assert f"{site}: warning: circuits[0]: circuit grid: the safe currents of its 4 EVSEs add up to 36 A" in r.stderr
    r = subprocess.run([*CLI, "config", "check", "--strict", str(site)], capture_output=True, text=True, timeout=60,
                       env=_env())
    assert r.returncode == 1 and "warning: circuits[0]" in r.stderr, (r.stdout, r.stderr)
