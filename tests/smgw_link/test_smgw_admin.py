"""The admin API on the local network: roles, configuration changes (validated, atomic, versioned,
rolled back), live reload, limits, logs, service commands and the audit log - real Mosquitto, the
real smgw-link service, real HTTP over TCP."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from admin_support import (
    ADMIN_TOKEN,
    OPERATOR_TOKEN,
    VIEWER_TOKEN,
    accounts_yaml,
    admin_yaml,
    api,
    listen_port,
    running_link,
)
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from chargegate import payloads as p
from chargegate.bus import Bus
from chargegate.config import load
from chargegate.runtime import ServiceContext
from conftest import BrokerHandle, connected_bus, make_config, wait_for
from fuzz_support import fuzz


@dataclass
class AdminRig:
    ctx: ServiceContext
    port: int
    path: Path
    observer: Bus
    commands: list[tuple[str, p.ServiceCommand]] = field(default_factory=list)
    limits: dict[str, list[p.GridLimit]] = field(default_factory=dict)
    health: list[p.Health] = field(default_factory=list)

    async def call(self, method: str, path: str, token: str | None = ADMIN_TOKEN, body: Any = None,
                   **kw: Any) -> tuple[int, Any]:
        return await api(self.port, method, path, token, body, **kw)

    async def audit(self) -> list[dict[str, Any]]:
        status, rows = await self.call("GET", "/v1/audit?limit=1000")
        assert status == 200, rows
        return rows  # type: ignore[no-any-return]


def rig_yaml(broker: BrokerHandle, port: int) -> str:
    return f"""
site: {{name: admin-test}}
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
    upstream: {{password: "wb1-backend-secret"}}
smgw:
  http_api: {{enabled: false}}
  limit_heartbeat_s: 1
  limit_hold_s: 5
{admin_yaml(port)}
"""


@pytest.fixture(scope="module")
async def rig(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[AdminRig]:
    from chargegate import log

    log.setup("smgw-link", fmt="console")  # structlog with the sink that forwards events to service/<name>/log
    tmp = tmp_path_factory.mktemp("smgw-admin")
    port = listen_port()
    cfg = make_config(tmp, rig_yaml(broker, port))
    observer = await connected_bus(broker, "observer")
    try:
        async with running_link(cfg, tmp / "chargegate.yaml") as ctx:
            r = AdminRig(ctx, port, tmp / "chargegate.yaml", observer)
            observer.subscribe("service.command", lambda msg: r.commands.append((msg.params["service"], msg.payload)))
            observer.subscribe("grid.limit",
                               lambda msg: r.limits.setdefault(msg.params["source"], []).append(msg.payload))
            observer.subscribe("service.health", lambda msg: r.health.append(msg.payload), service="smgw-link")

            async def up() -> bool:
                try:
                    return (await r.call("GET", "/v1/whoami"))[0] == 200
                except OSError:
                    return False

            for _ in range(200):
                if await up():
                    break
                await asyncio.sleep(0.05)
            yield r
    finally:
        await observer.stop()


async def test_roles_and_authentication(rig: AdminRig) -> None:
    for token, name, role in ((ADMIN_TOKEN, "alice", "admin"), (OPERATOR_TOKEN, "olga", "operator"),
                              (VIEWER_TOKEN, "vera", "viewer")):
        status, body = await rig.call("GET", "/v1/whoami", token)
        assert status == 200 and body == {"name": name, "role": role, "method": "token", "via": "local"}
    assert (await rig.call("GET", "/v1/status", None))[0] == 401
    assert (await rig.call("GET", "/v1/status", "wrong-token"))[0] == 401
    assert (await rig.call("GET", "/v1/audit", VIEWER_TOKEN))[0] == 403
    assert (await rig.call("GET", "/v1/audit", OPERATOR_TOKEN))[0] == 403
    # refused before the body is looked at: no credentials -> 401, wrong role -> 403, even with a broken body
    assert (await rig.call("PATCH", "/v1/config", None, raw=b"{not json"))[0] == 401
    assert (await rig.call("PATCH", "/v1/config", OPERATOR_TOKEN, raw=b"{not json"))[0] == 403


async def test_operator_sets_a_limit_but_cannot_change_the_configuration(rig: AdminRig) -> None:
    before = rig.path.read_bytes()
    status, body = await rig.call("PATCH", "/v1/config", OPERATOR_TOKEN, {"circuits": [{"id": "grid", "fuse_a": 63}]})
    assert status == 403 and "operator" in body["detail"]
    status, _ = await rig.call("PUT", "/v1/config/evses/wb7", OPERATOR_TOKEN, {"circuit": "garage"})
    assert status == 403
    assert rig.path.read_bytes() == before
    # numbers and booleans are strict: `true` is not 1 W, "6000" is not a number, "yes" is not true
    for bad in ({"power_w": True}, {"power_w": "6000"}, {"power_w": 6000, "active": "yes"},
                {"power_w": 6000, "duration_s": True}, {"power_w": 6000, "active": 1}):
        status, body = await rig.call("PUT", "/v1/limits/local", OPERATOR_TOKEN, bad)
        assert status == 422, (bad, status, body)
        assert body["errors"] and body["errors"][0]["path"].split(".")[-1] in bad, body
    # the viewer may not set limits
    assert (await rig.call("PUT", "/v1/limits/local", VIEWER_TOKEN, {"power_w": 5000}))[0] == 403
    # the operator may: grid/limit/local is published at once, with its duration
    status, body = await rig.call("PUT", "/v1/limits/local", OPERATOR_TOKEN, {"power_w": 6000, "duration_s": 600})
    assert status == 200, body
    assert body["input"] == "avail-local" and body["published"]["active"] and body["published"]["power_w"] == 6000
    await wait_for(lambda: bool(rig.limits.get("local")) and rig.limits["local"][-1].active
                   and rig.limits["local"][-1].power_w == 6000, 5)
    # the operator's own source needs function 2 (power_reduction), switched off here
    with capture_logs() as logs:
        status, body = await rig.call("PUT", "/v1/limits/dso", OPERATOR_TOKEN, {"power_w": 4200})
    assert status == 409 and "power_reduction" in body["detail"]
    assert any(e["log_level"] == "warning" and "power_reduction" in e["event"] and e.get("by") == "olga"
               for e in logs), logs
    status, body = await rig.call("DELETE", "/v1/limits/local", OPERATOR_TOKEN)
    assert status == 200 and not body["published"]["active"]
    await wait_for(lambda: not rig.limits["local"][-1].active, 5)
    status, view = await rig.call("GET", "/v1/limits", VIEWER_TOKEN)
    assert status == 200 and any(g["source"] == "local" for g in view["grid"])
    rows = await rig.audit()
    mine = [r for r in rows if r["who"] == "olga"]
    assert any(r["action"] == "PATCH patch_config" and r["result"].startswith("refused (403)") for r in mine)
    assert any(r["action"] == "PUT put_evse" and r["result"].startswith("refused (403)") for r in mine)
    assert any(r["action"] == "PUT put_limit" and r["result"] == "accepted" and r["detail"]["power_w"] == 6000
               for r in mine)
    assert any(r["who"] == "vera" and r["action"] == "PUT put_limit" and "403" in r["result"] for r in rows)


async def test_invalid_configuration_is_refused_with_its_reason_and_changes_nothing(rig: AdminRig) -> None:
    before = rig.path.read_bytes()
    _, cur = await rig.call("GET", "/v1/config")
    status, body = await rig.call("PATCH", "/v1/config", ADMIN_TOKEN,
                                  {"circuits": [{"id": "grid", "fuse_a": -5, "children": [{"id": "garage",
                                                                                          "fuse_a": 32}]}]})
    assert status == 422
    assert any(e["path"] == "circuits[0].fuse_a" for e in body["errors"]), body
    status, body = await rig.call("PUT", "/v1/config/evses/wb2", ADMIN_TOKEN,
                                  {"circuit": "attic", "ocpp": {"charge_box_id": "CB2"}})
    assert status == 422 and any("attic" in e["message"] for e in body["errors"]), body
    status, body = await rig.call("PATCH", "/v1/config", ADMIN_TOKEN, {"evses": [{"id": "wb1", "circuit": "garage",
                                                                                   "max_current_a": "lots"}]})
    assert status == 422 and any(e["path"] == "evses[0].max_current_a" for e in body["errors"]), body
    # a change that would lock every administrator out is refused too
    status, body = await rig.call("PATCH", "/v1/config", ADMIN_TOKEN, {"admin": {"tokens": []}})
    assert status == 422 and body["errors"][0]["path"] == "admin"
    assert rig.path.read_bytes() == before
    _, now = await rig.call("GET", "/v1/config")
    assert now["version"] == cur["version"]
    rows = await rig.audit()
    assert any(r["action"] == "PATCH patch_config" and "circuits[0].fuse_a" in r["result"] for r in rows)


async def test_secrets_are_redacted_and_kept(rig: AdminRig) -> None:
    status, cur = await rig.call("GET", "/v1/config", VIEWER_TOKEN)
    assert status == 200
    text = str(cur)
    assert ADMIN_TOKEN not in text and "wb1-backend-secret" not in text and "<redacted>" in text
    # the document sent back as it was read keeps every secret: same version, nothing written
    status, body = await rig.call("PUT", "/v1/config", ADMIN_TOKEN, cur["document"])
    assert status == 200 and body["changed"] is False and body["version"] == cur["version"]
    assert "wb1-backend-secret" in rig.path.read_text()


async def test_change_reload_rollback(rig: AdminRig) -> None:
    status, cur = await rig.call("GET", "/v1/config")
    v0 = cur["version"]
    # a stale base version is refused
    status, body = await rig.call("PATCH", "/v1/config?base_version=000000000000", ADMIN_TOKEN,
                                  {"circuits": [{"id": "grid", "fuse_a": 40}]})
    assert status == 409
    doc = cur["document"]
    doc["circuits"][0]["fuse_a"] = 40
    n_cmd = len(rig.commands)
    status, body = await rig.call("PUT", f"/v1/config?base_version={v0}&wait_s=10", ADMIN_TOKEN, doc)
    assert status == 200, body
    v1 = body["version"]
    assert body["changed"] and body["previous_version"] == v0 and v1 != v0
    assert body["applied"] == {"smgw-link": True}  # the only service running here picked it up, no restart
    assert set(body["reload_sent_to"]) == {"evse-poller", "ocpp-gateway", "load-controller", "smgw-link", "history",
                                           "web"}
    assert load(rig.path).root_circuit.fuse_a == 40 and load(rig.path).digest() == v1
    await wait_for(lambda: len(rig.commands) >= n_cmd + 5, 5)
    sent = {svc: c for svc, c in rig.commands[n_cmd:]}
    assert set(sent) == {"evse-poller", "ocpp-gateway", "load-controller", "history", "web"}  # smgw-link: at once
    assert all(c.action == "reload" and c.config_version == v1 for c in sent.values())
    assert rig.ctx.config.digest() == v1
    await wait_for(lambda: rig.health[-1].config_version == v1, 5)
    # add an EVSE, then remove it
    status, body = await rig.call("PUT", "/v1/config/evses/wb9?wait_s=10", ADMIN_TOKEN,
                                  {"circuit": "garage", "modbus": {"profile": "alfen-eve", "host": "127.0.0.1",
                                                                   "port": 1509}})
    assert status == 200, body
    v2 = body["version"]
    status, item = await rig.call("GET", "/v1/config/evses/wb9", VIEWER_TOKEN)
    assert status == 200 and item["modbus"]["port"] == 1509
    status, st = await rig.call("GET", "/v1/status", VIEWER_TOKEN)
    assert status == 200 and [e["id"] for e in st["evses"]] == ["wb1", "wb9"]
    assert (await rig.call("DELETE", "/v1/config/evses/nope"))[0] == 404
    status, body = await rig.call("DELETE", "/v1/config/evses/wb9")
    assert status == 200 and body["version"] == v1 != v2  # the same content is the same version
    assert (await rig.call("GET", "/v1/config/evses/wb9"))[0] == 404
    # every version is kept; roll back to the first one
    status, versions = await rig.call("GET", "/v1/config/versions", VIEWER_TOKEN)
    assert status == 200
    assert [v["version"] for v in versions][:2] == [v0, v1] and versions[-1]["current"]
    assert (await rig.call("POST", "/v1/config/rollback", OPERATOR_TOKEN, {"version": v0}))[0] == 403
    assert (await rig.call("POST", "/v1/config/rollback", ADMIN_TOKEN, {"version": "0123456789ab"}))[0] == 404
    status, body = await rig.call("POST", "/v1/config/rollback?wait_s=10", ADMIN_TOKEN, {"version": v0})
    assert status == 200 and body["version"] == v0 and body["applied"] == {"smgw-link": True}, body
    assert load(rig.path).root_circuit.fuse_a == 35
    status, old = await rig.call("GET", f"/v1/config/versions/{v1}", VIEWER_TOKEN)
    assert status == 200 and old["document"]["circuits"][0]["fuse_a"] == 40
    status, st = await rig.call("GET", "/v1/status", VIEWER_TOKEN)
    me = next(s for s in st["services"] if s["service"] == "smgw-link")
    assert st["config_version"] == v0 and me["config_version"] == v0 and me["applied"] is True
    rows = await rig.audit()
    done = [r for r in rows if r["who"] == "alice" and r["result"] == "accepted"]
    assert {"PUT put_config", "PUT put_evse", "DELETE delete_evse", "POST rollback"} <= {r["action"] for r in done}
    rb = next(r for r in done if r["action"] == "POST rollback")
    assert rb["detail"]["version"] == v0 and rb["detail"]["changed"] is True


async def test_check_without_writing(rig: AdminRig) -> None:
    before = rig.path.read_bytes()
    _, cur = await rig.call("GET", "/v1/config")
    doc = cur["document"]
    doc["circuits"][0]["fuse_a"] = 0
    status, body = await rig.call("POST", "/v1/config/check", ADMIN_TOKEN, doc)
    assert status == 200 and body["valid"] is False and body["errors"][0]["path"] == "circuits[0].fuse_a"
    doc["circuits"][0]["fuse_a"] = 50
    status, body = await rig.call("POST", "/v1/config/check", ADMIN_TOKEN, doc)
    assert status == 200 and body["valid"] is True
    assert rig.path.read_bytes() == before


async def test_service_commands_logs_and_audit(rig: AdminRig) -> None:
    n = len(rig.commands)
    status, body = await rig.call("POST", "/v1/services/evse-poller/restart", ADMIN_TOKEN)
    assert status == 200 and body["action"] == "restart"
    await wait_for(lambda: any(s == "evse-poller" and c.action == "restart" and c.request_id == body["request_id"]
                               for s, c in rig.commands[n:]), 5)
    assert (await rig.call("POST", "/v1/services/evse-poller/restart", OPERATOR_TOKEN))[0] == 403
    assert (await rig.call("POST", "/v1/services/nonsense/restart", ADMIN_TOKEN))[0] == 422
    wanted = {"configuration changed through the admin API", "service command sent through the admin API"}
    for _ in range(100):  # the events travel over the bus (service/smgw-link/log) into the ring buffer
        status, logs = await rig.call("GET", "/v1/logs?service=smgw-link&limit=500", VIEWER_TOKEN)
        assert status == 200
        if wanted <= {x["event"] for x in logs}:
            break
        await asyncio.sleep(0.05)
    assert wanted <= {x["event"] for x in logs}
    assert all(x["service"] == "smgw-link" for x in logs)
    status, errs = await rig.call("GET", "/v1/logs?level=error", VIEWER_TOKEN)
    assert status == 200 and all(x["level"] in ("error", "critical") for x in errs)
    rows = await rig.audit()
    # every request that is not a read is there: accepted and refused, with who, what, when, the result
    assert all({"ts", "who", "role", "action", "target", "result"} <= set(r) for r in rows)
    assert any(r["action"] == "POST command" and r["who"] == "alice" and r["target"] ==
               "/v1/services/evse-poller/restart" and r["result"] == "accepted" for r in rows)
    assert any(r["action"] == "POST command" and r["who"] == "olga" and "403" in r["result"] for r in rows)
    # the audit file is the durable record
    path = rig.ctx.config.state_dir / "admin" / "audit.jsonl"
    assert len(path.read_text().splitlines()) == len(rows)
    assert yaml.safe_load(path.read_text().splitlines()[-1])["action"]


async def test_oversized_body_is_refused_and_audited(rig: AdminRig) -> None:
    big = b'{"site": {"name": "' + b"x" * (1 << 20) + b'"}}'
    status, body = await rig.call("PATCH", "/v1/config", ADMIN_TOKEN, raw=big)
    assert status == 413 and "1048576" in body["detail"]
    rows = await rig.audit()
    assert rows[-1]["action"].startswith("PATCH") and rows[-1]["result"].startswith("refused (413)")
    assert rows[-1]["who"] == "alice" and rows[-1]["role"] == "admin"  # who sent it, not "(unauthenticated)"


async def raw_exchange(port: int, head: list[str], chunks: list[bytes] = (), chunked: bool = False,  # type: ignore[assignment]
                       ) -> tuple[int, bytes]:
    """Send a request head (and body ``chunks``, chunked or as they are) over real TCP; the answer's status
    line code and the whole answer. Nothing is sent after the head when ``chunks`` is empty."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        for c in chunks:
            writer.write(f"{len(c):x}\r\n".encode() + c + b"\r\n" if chunked else c)
            await writer.drain()
        if chunked and chunks:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
    return int(answer.split(b" ", 2)[1]), answer


async def test_authentication_comes_before_the_size(rig: AdminRig) -> None:
    """A body over 1 MiB without credentials is a 401 (not 413), with a role that may not do it a 403, and
    with the right role a 413 audited under that account - declared (Content-Length) or found while
    reading a chunked body. Refused on the headers: the body is not waited for (Expect: 100-continue)."""
    big = b'{"site": {"name": "' + b"x" * (1 << 20) + b'"}}'
    status, body = await rig.call("PATCH", "/v1/config", None, raw=big)
    assert status == 401 and "credentials" in body["detail"], body
    assert (await rig.call("PATCH", "/v1/config", "wrong-token", raw=big))[0] == 401
    status, body = await rig.call("PATCH", "/v1/config", VIEWER_TOKEN, raw=big)
    assert status == 403 and "viewer" in body["detail"], body
    rows = await rig.audit()
    assert [(r["who"], r["result"][:13]) for r in rows[-3:]] == [
        ("(unauthenticated)", "refused (401)"), ("(unauthenticated)", "refused (401)"), ("vera", "refused (403)")]
    assert rows[-1]["action"] == "PATCH patch_config"
    # chunked, no length: the size is found while reading, after the credentials
    piece = b"x" * (64 << 10)
    head = ["PATCH /v1/config HTTP/1.1", "Host: chargegate", "Content-Type: application/json",
            "Transfer-Encoding: chunked", "Connection: close"]
    status, answer = await raw_exchange(rig.port, [*head, f"Authorization: Bearer {ADMIN_TOKEN}"],
                                        [piece] * 17, chunked=True)
    assert status == 413 and b"1048576" in answer, answer[:300]
    status, _ = await raw_exchange(rig.port, head, [piece] * 17, chunked=True)
    assert status == 401
    rows = await rig.audit()
    assert [(r["who"], r["result"][:13]) for r in rows[-2:]] == [("alice", "refused (413)"),
                                                                   ("(unauthenticated)", "refused (401)")]
    # a client that waits for 100 Continue before sending 2 MiB gets its 401 at once, and no 100
    status, answer = await raw_exchange(rig.port, [
        "PUT /v1/config HTTP/1.1", "Host: chargegate", "Content-Type: application/json",
        f"Content-Length: {2 << 20}", "Expect: 100-continue", "Connection: close"])
    assert status == 401 and b"100 Continue" not in answer, answer[:300]
    status, answer = await raw_exchange(rig.port, [
        "PUT /v1/config HTTP/1.1", "Host: chargegate", "Content-Type: application/json",
        f"Content-Length: {2 << 20}", "Expect: 100-continue", f"Authorization: Bearer {ADMIN_TOKEN}",
        "Connection: close"])
    assert status == 413 and b"100 Continue" not in answer, answer[:300]
    rows = await rig.audit()
    assert rows[-1]["who"] == "alice" and rows[-1]["result"].startswith("refused (413)")


async def test_a_broken_file_is_reported_and_can_be_replaced(rig: AdminRig) -> None:
    _, good = await rig.call("GET", "/v1/config")
    text = rig.path.read_text()
    rig.path.write_text(text.replace("fuse_a: 35", "fuse_a: -1"))  # someone edited it by hand
    try:
        status, body = await rig.call("GET", "/v1/config", VIEWER_TOKEN)
        assert status == 409 and body["errors"][0]["path"] == "circuits[0].fuse_a"
        assert (await rig.call("PATCH", "/v1/config", ADMIN_TOKEN, {"site": {"name": "x"}}))[0] == 409
        # a whole document repairs it; the secrets the broken file held are kept
        status, body = await rig.call("PUT", "/v1/config?wait_s=10", ADMIN_TOKEN, good["document"])
        assert status == 200 and body["version"] == good["version"] and body["previous_version"] is None, body
        assert load(rig.path).root_circuit.fuse_a == 35
    finally:
        if load_or_none(rig.path) is None:
            rig.path.write_text(text)


async def test_the_admin_listener_moves_after_the_answer(rig: AdminRig) -> None:
    new_port = listen_port()
    status, body = await rig.call("PATCH", "/v1/config", ADMIN_TOKEN, {"admin": {"port": new_port}})
    assert status == 200 and body["changed"]  # answered on the old listener
    old_port, rig.port = rig.port, new_port
    for _ in range(100):
        try:
            if (await rig.call("GET", "/v1/whoami", VIEWER_TOKEN))[0] == 200:
                break
        except OSError:
            await asyncio.sleep(0.05)
    assert (await rig.call("GET", "/v1/whoami", VIEWER_TOKEN))[0] == 200
    with pytest.raises(OSError):
        await api(old_port, "GET", "/v1/whoami", VIEWER_TOKEN)


def load_or_none(path: Path) -> object | None:
    try:
        return load(path)
    except ValueError:
        return None


async def test_meters_are_added_changed_and_removed(rig: AdminRig) -> None:
    meter = {"modbus": {"profile": "sdm630", "host": "127.0.0.1", "port": 1600}}
    status, body = await rig.call("PUT", "/v1/config/meters/m-garage", ADMIN_TOKEN, meter)
    assert status == 200 and body["changed"], body
    status, got = await rig.call("GET", "/v1/config/meters", VIEWER_TOKEN)
    assert status == 200 and [m["id"] for m in got] == ["m-garage"]
    meter["modbus"]["port"] = 1601  # type: ignore[index]
    status, body = await rig.call("PUT", "/v1/config/meters/m-garage", ADMIN_TOKEN, meter)
    assert status == 200 and body["changed"]
    assert load(rig.path).meters[0].modbus.port == 1601
    # a circuit that names the meter keeps it from being removed: refused with the reason
    status, body = await rig.call("PATCH", "/v1/config", ADMIN_TOKEN, {"circuits": [
        {"id": "grid", "fuse_a": 35, "meter": "m-garage", "children": [{"id": "garage", "fuse_a": 32}]}]})
    assert status == 200, body
    status, body = await rig.call("DELETE", "/v1/config/meters/m-garage", ADMIN_TOKEN)
    assert status == 422 and any("m-garage" in e["message"] for e in body["errors"]), body
    status, body = await rig.call("PATCH", "/v1/config", ADMIN_TOKEN, {"circuits": [
        {"id": "grid", "fuse_a": 35, "meter": None, "children": [{"id": "garage", "fuse_a": 32}]}]})
    assert status == 200, body
    status, body = await rig.call("DELETE", "/v1/config/meters/m-garage", ADMIN_TOKEN)
    assert status == 200 and load(rig.path).meters == []
    # the id in the body must be the one in the path
    status, body = await rig.call("PUT", "/v1/config/meters/m1", ADMIN_TOKEN, {**meter, "id": "m2"})
    assert status == 422 and body["errors"][0]["path"] == "body.id"


# -- raw HTTP fuzz (issue 14): request lines, headers and bodies as a clumsy or hostile client sends them ------

_PATHS = ["/v1/status", "/v1/config", "/v1/config/check", "/v1/config/evses/wb1", "/v1/limits/dso", "/v1/audit",
          "/v1/smgw/certificates/selected", "/v1/history/sessions", "/v1/evses/wb1/mode", "/v1/../etc/passwd",
          "/v1/%00", "/v1/config?x=" + "a" * 300, "/" + "v" * 5000, "*", "http://evil/v1/status", ""]
_TOKENS = [None, "", "wrong", VIEWER_TOKEN, OPERATOR_TOKEN, "x" * 10_000]  # never the admin's: nothing may change
_CTYPES = ["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
           "application/json; charset=latin-1", "", "\x01"]


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "get",
                                   "BREW", "GET GET", ""]))
    path = draw(st.sampled_from(_PATHS) | st.text(max_size=20).map(lambda t: "/v1/" + t))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/9", ""]))
    body = draw(st.sampled_from([b"", b"{}", b"{not json", b'{"site": {"name": 1}}', b"[]", b"null",
                                 b'{"a": ' + b"[" * 3000 + b"]" * 3000 + b"}", b'{"v": ' + b"9" * 5000 + b"}"])
                | st.binary(max_size=64))
    head = [f"{method} {path} {version}".strip(), "Host: chargegate"]
    tok = draw(st.sampled_from(_TOKENS))
    if tok is not None:
        head.append(draw(st.sampled_from([f"Authorization: Bearer {tok}", f"Authorization: Basic {tok}",
                                          f"Authorization: {tok}"])))
    head.append("Content-Type: " + draw(st.sampled_from(_CTYPES)))
    length = draw(st.sampled_from(["ok", "ok", "none", "-1", "abc", "99999999999999999999", "2", "ok,ok",
                                   "chunked"]))
    if length == "ok":
        head.append(f"Content-Length: {len(body)}")
    elif length == "ok,ok":
        head += [f"Content-Length: {len(body)}", f"Content-Length: {len(body) + 1}"]
    elif length == "chunked":
        head.append("Transfer-Encoding: chunked")
        body = (f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n") if body else b"0\r\n\r\n"
    elif length != "none":
        head.append(f"Content-Length: {length}")
    head += draw(st.lists(st.sampled_from(["X-Forwarded-For: 1.2.3.4", "Expect: 100-continue", "Origin: http://evil",
                                           "Cookie: " + "c" * 9000, "Header-Without-Colon", " leading: space",
                                           "Transfer-Encoding: gzip", "Connection: upgrade", "Upgrade: websocket"]),
                          max_size=2))
    head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


async def _exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()  # a body shorter than its Content-Length ends here
        return await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()


@fuzz(80)
@given(data=raw_requests())
async def test_any_raw_request_gets_an_answer_below_500_and_changes_nothing(rig: AdminRig, data: bytes) -> None:
    before = rig.path.read_bytes()
    answer = await _exchange(rig.port, data)
    if answer:  # a request the HTTP parser cannot read may be closed without an answer
        line = answer.split(b"\r\n", 1)[0]
        assert line.startswith(b"HTTP/1."), answer[:200]
        code = int(line.split(b" ")[1])
        assert code < 500, (data[:300], answer[:300])
        assert b"Traceback" not in answer and ADMIN_TOKEN.encode() not in answer
    assert rig.path.read_bytes() == before  # no account that may change the configuration was used
    status, _ = await rig.call("GET", "/v1/status", VIEWER_TOKEN)
    assert status == 200  # the server answers the next client
