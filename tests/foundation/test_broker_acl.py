"""The broker's accounts and ACL: each service writes only its own topics; anonymous is refused."""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from chargegate.broker import hash_password, render_acl
from conftest import BrokerHandle


def client(broker: BrokerHandle, user: str | None, password: str | None = None) -> tuple[mqtt.Client, int]:
    """Connect and return (client, reason code value); 0 = accepted."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"acl-{user}-{time.monotonic_ns()}")
    if user is not None:
        c.username_pw_set(user, password if password is not None else broker.password(user))
    done = threading.Event()
    result: dict[str, int] = {}

    def on_connect(cl: mqtt.Client, u: object, f: object, rc: mqtt.ReasonCode, p: object) -> None:
        result["rc"] = rc.value
        done.set()

    c.on_connect = on_connect
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    assert done.wait(5)
    if result["rc"] != 0:
        c.loop_stop()
    return c, result["rc"]


def test_anonymous_refused(broker: BrokerHandle) -> None:
    _, rc = client(broker, None)
    assert rc != 0


def test_wrong_password_refused(broker: BrokerHandle) -> None:
    _, rc = client(broker, "evse-poller", "wrong")
    assert rc != 0


# (account, topic relative to the root, allowed?)
CASES = [
    ("load-controller", "evse/wb1/setpoint", True),
    ("evse-poller", "evse/wb1/setpoint", False),
    ("ocpp-gateway", "evse/wb1/setpoint", False),
    ("smgw-link", "evse/wb1/setpoint", False),
    ("evse-poller", "evse/wb1/status", True),
    ("ocpp-gateway", "evse/wb1/status", True),
    ("load-controller", "evse/wb1/status", False),
    ("smgw-link", "grid/limit/dso", True),
    ("load-controller", "grid/limit/dso", False),
    ("ocpp-gateway", "grid/limit/dso", False),
    ("smgw-link", "tariff/current", True),
    ("evse-poller", "tariff/current", False),
    ("evse-poller", "meter/m1/reading", True),
    ("smgw-link", "meter/m1/reading", False),
    ("ocpp-gateway", "evse/wb1/limit", True),
    ("load-controller", "evse/wb1/limit", False),
    ("evse-poller", "service/evse-poller/health", True),
    ("evse-poller", "service/load-controller/health", False),
    ("observer", "evse/wb1/status", False),
    ("observer", "grid/limit/dso", False),
    ("admin", "service/evse-poller/command", True),
    ("smgw-link", "service/evse-poller/command", True),  # the admin API sends reload/restart
    ("smgw-link", "service/smgw-link/command", True),
    ("smgw-link", "service/evse-poller/health", False),  # health and logs stay per service
    ("smgw-link", "service/evse-poller/log", False),
    ("evse-poller", "service/ocpp-gateway/command", False),
    ("load-controller", "service/load-controller/command", False),
    ("admin", "grid/limit/dso", False),
    ("sim", "sim/wb1/command", True),
    ("sim", "evse/wb1/setpoint", False),
]


@pytest.fixture(scope="module")
def watcher(broker: BrokerHandle):  # type: ignore[no-untyped-def]
    got: list[tuple[str, bytes]] = []
    c, rc = client(broker, "observer")
    assert rc == 0
    sub = threading.Event()
    c.on_subscribe = lambda *a: sub.set()
    c.on_message = lambda cl, u, m: got.append((m.topic, m.payload))
    c.subscribe("chargegate/#", qos=1)
    assert sub.wait(5)
    yield got
    c.loop_stop()
    c.disconnect()


@pytest.mark.parametrize(("account", "rel", "allowed"), CASES)
def test_acl(broker: BrokerHandle, watcher: list[tuple[str, bytes]], account: str, rel: str, allowed: bool) -> None:
    c, rc = client(broker, account)
    assert rc == 0
    marker = f"acl-probe-{account}-{time.monotonic_ns()}".encode()
    topic = f"chargegate/{rel}"
    c.publish(topic, marker, qos=1).wait_for_publish(5)
    # a fence published by an allowed writer after the probe: once it arrives, the probe would have too
    fence = f"fence-{time.monotonic_ns()}".encode()
    f, _ = client(broker, "evse-poller")
    f.publish("chargegate/service/evse-poller/health", fence, qos=1).wait_for_publish(5)
    deadline = time.monotonic() + 5
    while not any(p == fence for _, p in watcher) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert any(p == fence for _, p in watcher)
    assert any(p == marker for _, p in watcher) is allowed
    for cl in (c, f):
        cl.publish(topic if cl is c else "chargegate/service/evse-poller/health", b"", retain=True)
        cl.loop_stop()
        cl.disconnect()


def test_acl_generated_from_registry() -> None:
    acl = render_acl("site")
    assert "user load-controller\ntopic read site/#\ntopic write site/evse/+/setpoint" in acl
    assert "topic write site/service/evse-poller/health" in acl
    assert "readwrite site/#" not in acl
    assert "user smgw-link\ntopic read site/#" in acl
    smgw = acl.split("user smgw-link\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert "topic write site/service/+/command" in smgw
    assert "topic write site/service/smgw-link/health" in smgw and "topic write site/service/+/health" not in smgw
    poller = acl.split("user evse-poller\n", 1)[1].split("\n\n", 1)[0]
    assert "command" not in poller.replace("evse/+/command/result", "")


def test_password_hash_format() -> None:
    h = hash_password("x", salt=b"0123456789ab")
    assert h.startswith("$7$101$") and h.count("$") == 4
