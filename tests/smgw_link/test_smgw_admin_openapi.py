"""The admin API's OpenAPI document: the committed copy is what FastAPI generates, every operation
says who may call it, and schema-driven fuzzing (schemathesis, from that document) of the real
smgw-link process over HTTP finds no server error, no undocumented status or body, and no crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import requests
import schemathesis
from admin_support import ADMIN_TOKEN, VIEWER_TOKEN, accounts_yaml, admin_yaml, listen_port
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import BrokerHandle
from smgw_link.admin.openapi import COMMITTED, render

DOC = json.loads(COMMITTED.read_text())
FUZZ = SchemathesisConfig.from_str("""
[generation]
max-examples = 12
mode = "all"
[phases.examples]
enabled = false
[phases.coverage]
enabled = false
[phases.stateful]
enabled = false
""")
SCHEMA = schemathesis.openapi.from_dict(DOC, config=FUZZ)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_committed_document_is_up_to_date() -> None:
    assert COMMITTED.read_text() == render(), \
        "services/smgw-link/openapi.json is stale: run `chargegate admin openapi --out services/smgw-link/openapi.json`"


def test_every_operation_is_versioned_authenticated_and_names_its_role() -> None:
    assert DOC["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    ops = [(path, method, op) for path, item in DOC["paths"].items() for method, op in item.items()]
    assert len(ops) >= 25
    for path, method, op in ops:
        assert path.startswith("/v1/"), path
        assert op["x-required-role"] in ("admin", "operator", "viewer"), (path, method)
        assert {"HTTPBearer": []} in op["security"], (path, method)
        assert {"401", "403", "422"} <= set(op["responses"]), (path, method)
        if method != "get":
            assert op["x-required-role"] in ("admin", "operator"), (path, method)
    roles = {(p, m): op["x-required-role"] for p, m, op in ops}
    assert roles[("/v1/limits/{source}", "put")] == "operator"
    assert roles[("/v1/config", "patch")] == "admin" and roles[("/v1/audit", "get")] == "admin"


def _yaml(broker: BrokerHandle, port: int) -> str:
    return f"""
site: {{name: fuzz}}
{accounts_yaml(broker, "smgw-link")}
circuits:
  - id: grid
    fuse_a: 35
evses:
  - id: wb1
    circuit: grid
    modbus: {{profile: alfen-eve, host: 127.0.0.1, port: 1502}}
smgw:
  http_api: {{enabled: false}}
{admin_yaml(port)}
"""


@pytest.fixture(scope="module")
def service(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """smgw-link as a real process (python -m smgw_link) with the admin API on a free port."""
    tmp = tmp_path_factory.mktemp("admin-fuzz")
    port = listen_port()
    path = tmp / "chargegate.yaml"
    path.write_text(_yaml(broker, port))
    log = (tmp / "smgw-link.log").open("wb")
    env = {**os.environ, "CHARGEGATE_LOG_FORMAT": "json", "CHARGEGATE_HEALTH_INTERVAL_S": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "smgw_link", "--config", str(path)], stdout=log, stderr=log, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if requests.get(f"{base}/v1/whoami", headers={"Authorization": f"Bearer {VIEWER_TOKEN}"},
                                timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, (tmp / "smgw-link.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "admin API did not come up"
            time.sleep(0.1)
        yield base
        # no crash: the process is still there and answers
        assert proc.poll() is None, (tmp / "smgw-link.log").read_text()[-3000:]
        assert requests.get(f"{base}/v1/status", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                            timeout=5).status_code == 200
        log_text = (tmp / "smgw-link.log").read_text()
        assert "admin API request failed" not in log_text, log_text[-3000:]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


# a restart request would stop the process under test (tested with an observer in test_smgw_admin.py)
@SCHEMA.exclude(path_regex=r"^/v1/services/\{service_name\}/\{action\}$").parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_as_admin(case: schemathesis.Case, service: str) -> None:
    case.call_and_validate(base_url=service, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, checks=CHECKS,
                           timeout=15)


@SCHEMA.parametrize()
@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_as_viewer(case: schemathesis.Case, service: str) -> None:
    response = case.call_and_validate(base_url=service, headers={"Authorization": f"Bearer {VIEWER_TOKEN}"},
                                      checks=CHECKS, timeout=15)
    if case.method != "GET":
        assert response.status_code in (401, 403, 422), response.text  # a viewer changes nothing


def test_the_configuration_survived_the_fuzzing(service: str) -> None:
    r = requests.get(f"{service}/v1/config", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=5)
    assert r.status_code == 200
    doc = r.json()["document"]
    assert doc["admin"]["enabled"] is True and any(t["role"] == "admin" for t in doc["admin"]["tokens"])
