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
