"""The demo's plan without running it: a configuration that validates, every simulator process
runnable, distinct ports, the SMGW part wired (certificate selected, OCPP routed through the SMGW)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import yaml
from cryptography import x509

from chargegate import config as cfgmod
from chargegate.demo import plan
from chargegate.runner import available_services


def _load(tmp: Path, data: dict) -> cfgmod.Config:  # type: ignore[type-arg]
    path = tmp / "chargegate.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return cfgmod.load(path)


def test_demo_plan_is_valid_and_complete(tmp_path: Path) -> None:
    p = plan(tmp_path)
    cfg = _load(tmp_path, p.config)
    assert set(cfg.services) == set(available_services())
    assert {e.id for e in cfg.evses} == {"alfen", "webasto", "charx", "ocpp-1"}
    assert {c["evse"] for c in p.cars} == {e.id for e in cfg.evses}

    # every simulator is a runnable module or the mosquitto binary
    names = [s.name for s in p.sims]
    assert len(set(names)) == len(names)
    assert {"sim-modbus", "sim-backend", "sim-ocpp", "sim-operator-broker", "sim-smgw", "sim-operator"} <= set(names)
    for s in p.sims:
        if s.argv[1:2] == ["-m"]:
            assert importlib.util.find_spec(s.argv[2]) is not None, s.argv
        else:
            assert Path(s.argv[0]).name == "mosquitto" and Path(s.argv[2]).exists()

    # the SMGW part: functions on, the gateway trusted, the certificate imported and selected
    sm = cfg.smgw
    assert sm.enabled and sm.functions.ocpp_via_smgw and sm.functions.power_reduction and sm.functions.tariffs
    assert sm.gateway is not None and sm.gateway.trust_anchor is not None and sm.gateway.pinned_sha256
    assert sm.clseedi.enabled and sm.inbound.enabled and [t.reveal() for t in sm.http_api.tokens] == ["demo"]
    from smgw_link.certstore import CertStore

    store = CertStore.for_config(cfg)
    assert store.selected() == "demo-cls"
    stored = x509.load_pem_x509_certificate(store.cert_path("demo-cls").read_bytes())
    issued = x509.load_pem_x509_certificate((tmp_path / "pki" / "chargegate.pem").read_bytes())
    assert stored == issued

    # OCPP to the operator's backend through the SMGW, TLS end to end to the backend simulator
    be = cfg.ocpp.backend
    assert be.via_smgw and be.url == "wss://ocpp.operator.test/ocpp" and be.ca_file is not None
    ep = sm.route("ocpp.operator.test", 443)
    assert ep is not None and ep.purpose == "ocpp"
    backend = next(s for s in p.sims if s.name == "sim-backend")
    assert "--cert" in backend.argv and "--key" in backend.argv
    smgw = next(s for s in p.sims if s.name == "sim-smgw")
    routes = [smgw.argv[i + 1] for i, a in enumerate(smgw.argv) if a == "--route"]
    backend_port = backend.argv[backend.argv.index("--port") + 1]
    assert f"ocpp.operator.test:443=127.0.0.1:{backend_port}" in routes
    assert smgw.argv[smgw.argv.index("--groups") + 1] == "brainpoolP256r1"
    assert smgw.argv[smgw.argv.index("--tls") + 1] == "1.2"

    # every port the demo chose is distinct
    text = yaml.safe_dump(p.config) + " ".join(" ".join(s.argv) for s in p.sims)
    ports = {int(x) for x in re.findall(r"(?:port: |--port |--broker-port |--control-port |127\.0\.0\.1:)(\d+)", text)}
    listen = [e.listen_port for e in sm.endpoints] + [sm.inbound.port, sm.http_api.port, sm.gateway.port,
                                                      cfg.broker.port, cfg.ocpp.local.port]
    assert len(set(listen)) == len(listen) and set(listen) <= ports
    # the notes say where to look
    notes = "\n".join(p.notes)
    for needle in ("operator-record.jsonl", "Authorization: Bearer demo", "cert list", "/status"):
        assert needle in notes, needle


def test_demo_plan_starts_from_scratch(tmp_path: Path) -> None:
    """Operator state of an earlier run (AVAIL, schedule, limit) does not carry over into a new demo."""
    stale = tmp_path / "state" / "smgw" / "operator.json"
    stale.parent.mkdir(parents=True)
    stale.write_text('{"avail": {"local": {"percent": 10}}}')
    plan(tmp_path)
    assert not stale.exists()
    plan(tmp_path)  # twice in the same folder: the certificate is replaced, not refused


def test_second_demo_is_fresh_and_on_the_same_ports(tmp_path: Path) -> None:
    """A demo started again in the same folder: the same well-known ports (a port of the previous run in
    TIME-WAIT counts as free), and nothing of the previous run's transactions, queue, record, operator
    state or logs is left; a state folder outside the demo's folder is kept and named (not a real
    installation's state removed)."""
    import json
    import socket

    from chargegate.demo import demo_ports, previous_run_files, start_fresh

    first = plan(tmp_path)
    cfg = _load(tmp_path, first.config)
    ports1 = demo_ports(first, cfg)
    # the previous run's files, as the backend simulator, the gateway, the history and the services leave them
    state = cfg.state_dir
    left = [tmp_path / "backend.sqlite", tmp_path / "backend.sqlite-wal", tmp_path / "operator-record.jsonl",
            tmp_path / "logs" / "ocpp-gateway.log", state / "ocpp-queue.sqlite", state / "ocpp-queue.sqlite-shm",
            state / "history" / "history.db", state / "smgw" / "operator.json", state / "evse-poller" / "control.json",
            tmp_path / "ports"]
    for f in left:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("previous run")
    kept_cert = cfg.state_dir / "certs" / "selected"
    assert kept_cert.exists()
    lines = start_fresh(tmp_path, cfg)
    assert [f for f in left if f.exists()] == [] and kept_cert.exists()
    assert lines and lines[0].startswith(f"fresh start: removed {len(left)} files")
    assert start_fresh(tmp_path, cfg) == []  # nothing left to say

    # the web port in TIME-WAIT (a client connected, the server closed first), as after a stopped demo
    web = ports1["web"]
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", web))
    srv.listen()
    cli = socket.create_connection(("127.0.0.1", web))
    conn, _ = srv.accept()
    conn.close()  # the server side closes first: its end goes to TIME-WAIT
    cli.close()
    srv.close()
    second = plan(tmp_path)
    ports2 = demo_ports(second, _load(tmp_path, second.config))
    for name in ("broker", "web", "variables_api", "ocpp_backend_record"):
        assert ports2[name] == ports1[name], (name, ports1, ports2)
    assert ports1["variables_api"] in (8090, 8092, 8093, 8094) or ports1["variables_api"] >= 20000
    json.dumps(ports2)  # what state/demo/ports holds

    # the state folder elsewhere (CHARGEGATE_STATE_DIR): kept, and said so
    elsewhere = tmp_path.parent / f"{tmp_path.name}-real-state"
    (elsewhere / "history").mkdir(parents=True)
    (elsewhere / "history" / "history.db").write_text("a real installation's record")
    cfg.state_dir = elsewhere
    removed, kept = previous_run_files(tmp_path, cfg)
    assert kept == [elsewhere / "history" / "history.db"] and all(f.is_relative_to(tmp_path) or "broker" in str(f)
                                                                  for f in removed)
    assert "RESUMING" in start_fresh(tmp_path, cfg)[-1] and kept[0].exists()


def test_first_free_skips_a_listening_port_and_takes_a_time_wait_one() -> None:
    import socket

    from chargegate.broker import first_free, free_port

    busy, wait = free_port(), free_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", busy))
        listener.listen()
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", wait))
        srv.listen()
        cli = socket.create_connection(("127.0.0.1", wait))
        conn, _ = srv.accept()
        conn.close()
        cli.close()
        srv.close()
        assert first_free((busy, wait)) == wait
        other = first_free((busy,))
        assert other not in (busy, wait) and other >= 20000  # none free: a free one
