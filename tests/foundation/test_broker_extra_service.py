"""An extra service container's broker account (``broker.extra_services``, README "Adding a service"):
generated like the built-in ones, it reads everything and writes only ``ext/<name>/<topic>`` and its own
health and log - checked against a real Mosquitto with the generated password file and ACL."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from chargegate import config as cfgmod
from chargegate import payloads as p
from chargegate.broker import LocalBroker, account_password, free_port, render_acl
from chargegate.runtime import start_context, stop_context
from conftest import MINIMAL_CONFIG, wait_for


@pytest.fixture(scope="module")
def extra_broker(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("extra")
    port = free_port()
    path = tmp / "chargegate.yaml"
    path.write_text(MINIMAL_CONFIG + f"\nbroker: {{port: {port}, extra_services: [my-service, other-ext]}}\n")
    cfg = cfgmod.load(path)
    b = LocalBroker.prepare(cfg, port=port, persistence=False)
    b.start()
    try:
        yield cfg, port
    finally:
        b.discard()


def connect(cfg: cfgmod.Config, port: int, account: str, password: str | None = None) -> tuple[mqtt.Client, int]:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"x-{account}-{time.monotonic_ns()}")
    c.username_pw_set(account, password if password is not None else account_password(cfg, account))
    done = threading.Event()
    rc: dict[str, int] = {}

    def on_connect(cl: mqtt.Client, u: object, f: object, reason: mqtt.ReasonCode, pr: object) -> None:
        rc["v"] = reason.value
        done.set()

    c.on_connect = on_connect
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert done.wait(5)
    return c, rc["v"]


def test_account_generated_and_password_checked(extra_broker) -> None:  # type: ignore[no-untyped-def]
    cfg, port = extra_broker
    secret = cfg.state_dir / "broker" / "secrets" / "my-service"
    assert secret.exists() and secret.stat().st_mode & 0o777 == 0o600
    c, rc = connect(cfg, port, "my-service")
    assert rc == 0
    c.loop_stop()
    _, rc = connect(cfg, port, "my-service", "wrong")
    assert rc != 0


CASES = [
    ("ext/my-service/hello", True),
    ("service/my-service/health", True),
    ("service/my-service/log", True),
    ("ext/other-ext/hello", False),  # another extension's topics
    ("ext/my-service/a/b", False),  # one level below its name, as the registry's pattern says
    ("grid/limit/dso", False),
    ("evse/wb1/setpoint", False),
    ("service/evse-poller/health", False),
    ("service/evse-poller/command", False),
]


@pytest.mark.parametrize(("rel", "allowed"), CASES)
def test_writes_only_its_own_topics(extra_broker, rel: str, allowed: bool) -> None:  # type: ignore[no-untyped-def]
    cfg, port = extra_broker
    seen: list[bytes] = []
    obs, rc = connect(cfg, port, "observer")
    assert rc == 0
    sub = threading.Event()
    obs.on_subscribe = lambda *a: sub.set()
    obs.on_message = lambda cl, u, m: seen.append(m.payload)
    obs.subscribe("chargegate/#", qos=1)
    assert sub.wait(5)
    c, _ = connect(cfg, port, "my-service")
    probe = f"probe-{time.monotonic_ns()}".encode()
    c.publish(f"chargegate/{rel}", probe, qos=1).wait_for_publish(5)
    fence = f"fence-{time.monotonic_ns()}".encode()  # after the probe, from an allowed topic
    c.publish("chargegate/ext/my-service/fence", fence, qos=1).wait_for_publish(5)
    deadline = time.monotonic() + 5
    while fence not in seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fence in seen
    assert (probe in seen) is allowed
    for cl in (c, obs):
        cl.loop_stop()
        cl.disconnect()


async def test_extra_service_runs_on_the_runtime(extra_broker) -> None:  # type: ignore[no-untyped-def]
    """What the template's service does: run_service's context with its own account, health online,
    a validated ext message that a built-in service's registry parses."""
    cfg, _ = extra_broker
    got: list[p.Payload] = []
    ctx = await start_context("my-service", cfg, connect_timeout=5)
    watcher = await start_context("history", cfg, connect_timeout=5)
    try:
        watcher.bus.subscribe("ext.message", lambda m: got.append(m.payload), service="my-service")
        watcher.bus.subscribe("service.health", lambda m: got.append(m.payload), service="my-service")
        await wait_for(lambda: any(isinstance(x, p.Health) and x.status == "online" for x in got))
        ctx.bus.publish("ext.message", p.ExtMessage(service="my-service", topic="hello", data={"n": 1}),
                        service="my-service", topic="hello")
        await wait_for(lambda: any(isinstance(x, p.ExtMessage) and x.data == {"n": 1} for x in got))
    finally:
        await stop_context(ctx)
        await stop_context(watcher)


@pytest.mark.parametrize(("names", "error"), [
    (["evse-poller"], "built-in account"),
    (["observer"], "built-in account"),
    (["a", "b"], "extra_services[0]"),  # too short for a name
    (["My_Service"], "extra_services[0]"),
    (["x-1", "x-1"], "given twice"),
])
def test_bad_names_refused(tmp_path: Path, names: list[str], error: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(MINIMAL_CONFIG + f"\nbroker: {{extra_services: {names}}}\n")
    with pytest.raises(cfgmod.ConfigError) as e:
        cfgmod.load(path)
    assert error in str(e.value)


def test_acl_lines() -> None:
    acl = render_acl("site", extra_services=["my-service"])
    block = acl.split("user my-service\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert block == ["topic read site/#", "topic write site/service/my-service/health",
                     "topic write site/service/my-service/log", "topic write site/ext/my-service/+"]
    assert "my-service" not in render_acl("site")
