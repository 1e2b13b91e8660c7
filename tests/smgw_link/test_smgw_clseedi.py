"""The CLS.EEDI local device: acks, states and state changes, checked against the official schemas."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from chargegate import config as cfgmod
from chargegate import payloads as p
from smgw_link.clseedi import messages as m
from smgw_link.clseedi.device import ClsEediDevice
from smgw_link.control import OperatorControl
from smgw_link.measurements import Measurements

FIXTURES = Path(__file__).parent / "fixtures"
T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)

BASE = """
circuits:
  - id: grid
    fuse_a: 35
    meter: grid-meter
evses:
  - id: wb1
    circuit: grid
    modbus: {profile: alfen-eve, host: 127.0.0.1, port: 1502}
  - id: wb2
    circuit: grid
    phases: 1
    phase_rotation: [2]
    modbus: {profile: alfen-eve, host: 127.0.0.1, port: 1503}
meters:
  - id: grid-meter
    modbus: {profile: sdm630, host: 127.0.0.1, port: 1504}
smgw:
  functions: {power_reduction: %s}
  clseedi: {device_id: house-17}
"""


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def raw(obj: Any) -> bytes:
    return json.dumps(obj).encode()


class Env:
    def __init__(self, power_reduction: bool = True, controller: bool = True) -> None:
        self.config = cfgmod.loads(BASE % ("true" if power_reduction else "false"))
        self.control = OperatorControl.load(self.config.smgw, None, T0)
        self.measurements = Measurements(self.config)
        self.controller = controller
        self.changes = 0
        self.counters: dict[str, int] = {}

        def ok() -> tuple[bool, str]:
            return (True, "ok") if self.controller else (False, "the load-controller is offline")

        def changed() -> None:
            self.changes += 1

        self.device = ClsEediDevice(self.config.smgw, self.control, self.measurements, ok, changed, self.counters)

    def snapshot(self) -> Any:
        c = self.control
        return copy.deepcopy((c.lpc, c.failsafe_w, c.notify, c.avail, c.tarif, c.failsafe_since))

    def send(self, msg: Any, now: datetime = T0) -> list[dict[str, Any]]:
        replies = self.device.handle(msg if isinstance(msg, bytes) else raw(msg), now)
        for r in replies:
            assert m.schema_errors(r) == [], r  # everything we send is valid
            assert r["source"] == "chargegate/house-17"
        return replies


def ack_of(replies: list[dict[str, Any]]) -> tuple[int, str | None]:
    assert len(replies) == 1 and replies[0]["type"] == m.ACK
    return replies[0]["data"]["errorNumber"], replies[0].get("relation")


def test_fixtures_are_valid_or_invalid_as_named() -> None:
    for f in sorted(FIXTURES.glob("*.json")):
        errors = m.schema_errors(json.loads(f.read_text()))
        assert bool(errors) == f.name.startswith("invalid_"), (f.name, errors)


def test_limit_accepted_and_published_state() -> None:
    env = Env()
    msg = fixture("control_limit_with_duration.json")
    assert ack_of(env.send(msg)) == (0, msg["id"])
    assert env.changes == 1
    out = env.control.outputs(T0 + timedelta(seconds=1))
    gl = out.limits["dso"]
    assert gl.active and gl.power_w == 4200 and gl.scope == p.LimitScope.CONTROLLABLE
    assert gl.valid_until <= T0 + timedelta(seconds=900)
    assert gl.failsafe_power_w == 4200 and gl.failsafe_duration_s == 7200
    state = env.send(fixture("read_all.json"), T0 + timedelta(seconds=100))[0]
    assert state["type"] == m.STATE and state["relation"] == fixture("read_all.json")["id"]
    lim = state["data"]["limits"]["power"]["active"]["consumption"]
    assert lim == {"value": 4200, "active": True, "duration": 800}
    assert "lpc" in state["data"]["supportedEebusUseCases"]


def test_limit_with_duration_expires() -> None:
    env = Env()
    env.send(fixture("control_limit_with_duration.json"))
    env.control.tick(T0 + timedelta(seconds=899))
    assert env.control.outputs(T0 + timedelta(seconds=899)).limits["dso"].active
    env.control.tick(T0 + timedelta(seconds=900))
    assert not env.control.outputs(T0 + timedelta(seconds=900)).limits["dso"].active
    assert any("expired" in e for e in env.control.drain_events())
    state = env.send(fixture("read_selective.json"), T0 + timedelta(seconds=901))[0]
    assert state["data"]["limits"]["power"]["active"]["consumption"] == {"value": 4200, "active": False}
    assert set(state["data"]) == {"protocol", "timestamp", "limits", "failsafes"}


@pytest.mark.parametrize("name", sorted(x.name for x in FIXTURES.glob("invalid_*.json")))
def test_invalid_message_gets_error_1_and_changes_nothing(name: str) -> None:
    env = Env()
    env.send(fixture("control_limit_no_duration.json"))
    before, changes = env.snapshot(), env.changes
    number, relation = ack_of(env.send(fixture(name)))
    assert number == m.SCHEMA_ERROR
    assert relation == fixture(name).get("id")
    assert env.snapshot() == before and env.changes == changes


@pytest.mark.parametrize("payload", [b"{not json", b"\xff\xfe", b"[1,2]", b"null", b"42", b'"control"'])
def test_unparseable_gets_error_1_without_relation(payload: bytes) -> None:
    env = Env()
    assert ack_of(env.send(payload)) == (m.SCHEMA_ERROR, None)
    assert env.control.lpc is None


@pytest.mark.parametrize("name", ["protocol_major_2.json", "protocol_two_elements.json", "protocol_empty_control.json",
                                  "protocol_consumption_and_production.json", "protocol_zero_duration.json",
                                  "protocol_state_from_backend.json"])
def test_protocol_errors_get_2_and_change_nothing(name: str) -> None:
    env = Env()
    before = env.snapshot()
    assert ack_of(env.send(fixture(name))) == (m.PROTOCOL_ERROR, fixture(name)["id"])
    assert env.snapshot() == before and env.changes == 0


@pytest.mark.parametrize("watts", [10_000_001, 4_000_000_000])
def test_power_beyond_any_connection_gets_error_2_and_changes_nothing(watts: int) -> None:
    """Schema-valid (int64) but above the 10 MW any payload on the bus carries: refused, counted, logged; the
    limit and failsafe in force stay (was: accepted, then every output cycle failed building the grid limit)."""
    env = Env()
    env.send(fixture("control_limit_no_duration.json"))
    before = env.snapshot()
    limit = fixture("control_limit_no_duration.json")
    limit["id"] = "huge-limit"
    limit["data"]["limits"]["power"]["active"]["consumption"]["value"] = watts
    failsafe = fixture("control_failsafe.json")
    failsafe["id"] = "huge-failsafe"
    failsafe["data"]["failsafes"]["power"]["active"]["consumption"] = watts
    with capture_logs() as logs:
        for msg in (limit, failsafe):
            assert ack_of(env.send(msg)) == (m.PROTOCOL_ERROR, msg["id"])
    assert [e["reason"] for e in logs if e["event"] == "CLS.EEDI control refused"] == [
        f"limits: {watts} W is above the 10000000 W a site connection can carry",
        f"failsafes: {watts} W is above the 10000000 W a site connection can carry"]
    assert env.counters["clseedi_error_2"] == 2
    assert env.snapshot() == before
    assert env.control.outputs(T0).limits["dso"].power_w == 6000
    edge = fixture("control_limit_no_duration.json")
    edge["data"]["limits"]["power"]["active"]["consumption"]["value"] = 10_000_000
    assert ack_of(env.send(edge))[0] == m.OK and env.control.outputs(T0).limits["dso"].power_w == 10_000_000


def test_function_switch_off_answers_not_supported() -> None:
    env = Env(power_reduction=False)
    with capture_logs() as logs:
        for name in ("control_limit_with_duration.json", "control_failsafe.json"):
            assert ack_of(env.send(fixture(name))) == (m.NOT_SUPPORTED, fixture(name)["id"])
    # the operator believes it limits the site and it does not: a warning, not an info
    refused = [e for e in logs if e["event"] == "CLS.EEDI control refused"]
    assert [e["log_level"] for e in refused] == ["warning", "warning"], logs
    assert all("power_reduction" in e["reason"] for e in refused)
    assert env.control.lpc is None and env.control.failsafe_w is None
    out = env.control.outputs(T0)
    assert not out.limits["dso"].active and out.limits["dso"].failsafe_power_w is None
    state = env.send(fixture("read_all.json"))[0]["data"]
    assert "lpc" not in state["supportedEebusUseCases"] and "limits" not in state and "failsafes" not in state
    assert env.counters["clseedi_error_4"] == 2


def test_not_supported_elements() -> None:
    env = Env()
    with capture_logs() as logs:
        for name in ("control_production_limit.json", "control_trust_ski.json"):
            assert ack_of(env.send(fixture(name)))[0] == m.NOT_SUPPORTED
    assert [e["log_level"] for e in logs if e["event"] == "CLS.EEDI control refused"] == ["info", "info"]


def test_controller_offline_is_execution_error() -> None:
    env = Env(controller=False)
    assert ack_of(env.send(fixture("control_limit_no_duration.json")))[0] == m.EXECUTION_ERROR
    assert env.control.lpc is None
    env.controller = True
    assert ack_of(env.send(fixture("control_limit_no_duration.json")))[0] == m.OK
    assert env.control.lpc is not None and env.control.lpc.value_w == 6000


def test_failsafe_notify_and_release() -> None:
    env = Env()
    assert ack_of(env.send(fixture("control_failsafe.json")))[0] == 0
    assert env.control.failsafe_power_w == 4800
    assert ack_of(env.send(fixture("control_limit_no_duration.json")))[0] == 0
    assert ack_of(env.send(fixture("control_limit_release.json")))[0] == 0
    assert not env.control.outputs(T0).limits["dso"].active
    assert ack_of(env.send(fixture("control_notify.json")))[0] == 0
    assert env.control.notify is not None and env.control.notify.interval_s == 15


def test_reply_to_read_is_applied_without_ack_and_acks_are_not_answered() -> None:
    env = Env()
    assert env.send(fixture("reply_to_read_control.json")) == []
    assert env.control.lpc is not None and env.control.lpc.value_w == 5000
    assert env.control.failsafe_power_w == 4500
    assert env.send(fixture("ack_from_backend.json")) == []
    bad_ack = fixture("ack_from_backend.json")
    del bad_ack["data"]["errorNumber"]
    assert env.send(bad_ack) == []


def test_unknown_keys_are_ignored() -> None:
    env = Env()
    assert ack_of(env.send(fixture("unknown_keys_ignored.json")))[0] == 0
    assert env.control.lpc is not None and env.control.lpc.duration_s == 60


def test_redelivered_control_is_acked_again_but_applied_once() -> None:
    env = Env()
    msg = fixture("control_limit_with_duration.json")
    env.send(msg)
    first = env.control.lpc
    assert ack_of(env.send(msg, T0 + timedelta(seconds=30))) == (0, msg["id"])
    assert env.control.lpc is first and env.changes == 1


def test_state_measurements_from_bus_readings() -> None:
    env = Env()
    env.measurements.on_meter(p.MeterReading(
        meter_id="grid-meter", current_a=[10.5, 2, 3.25], voltage_v=[230.1, 229, 231], power_w=3456.7,
        power_phase_w=[2400, 460, 596.7], energy_import_wh=123456, energy_export_wh=10))
    env.measurements.on_evse(p.EvseStatus(evse_id="wb1", online=True, state=p.EvseState.CHARGING,
                                          current_a=[10, 10, 10], power_w=6900, energy_wh=1000))
    env.measurements.on_evse(p.EvseStatus(evse_id="wb2", online=True, state=p.EvseState.CHARGING,
                                          current_a=[16, 0, 0], power_w=3680, energy_wh=500))
    data = env.send(fixture("read_all.json"))[0]["data"]
    sets = {s["source"]: s for s in data["measurements"]}
    gcp = sets["gcp"]
    assert gcp["id"] == "grid-meter"
    assert gcp["power"]["total"]["value"] == {"number": 3457, "scale": 0}
    assert gcp["current"]["a"]["value"] == {"number": 1050, "scale": -2}
    assert gcp["voltage"]["a-n"]["value"] == {"number": 2301, "scale": -1}
    assert gcp["energy"]["consumed"]["value"] == {"number": 123456, "scale": 0}
    ctl = sets["controllable"]
    assert ctl["power"]["total"]["value"]["number"] == 10580
    # wb2 is single-phase on grid phase 2
    assert [ctl["current"][k]["value"]["number"] for k in "abc"] == [1000, 2600, 1000]
    assert set(data["supportedEebusUseCases"]) == {"lpc", "mgcp", "mpc"}
    # an offline meter is removed
    env.measurements.on_meter(p.MeterReading(meter_id="grid-meter", online=False))
    data = env.send(fixture("read_all.json"))[0]["data"]
    assert [s["source"] for s in data["measurements"]] == ["controllable"]
    # notification: only the sources asked for, and only known ones
    env.send(fixture("control_notify.json"))
    note = env.device.notification(T0)
    assert note is not None and m.schema_errors(note) == []
    assert [s["source"] for s in note["data"]["measurements"]] == ["controllable"]


# -- properties -----------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20)

VALID = [fixture(n) for n in ("control_limit_with_duration.json", "control_failsafe.json", "read_all.json",
                              "control_notify.json")]


def _mutate(msg: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(msg)
    node: Any = out
    for key in path[:-1]:
        if not isinstance(node, dict) or key not in node:
            return out
        node = node[key]
    if isinstance(node, dict):
        node[path[-1]] = value
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from(VALID),
       path=st.sampled_from([["type"], ["id"], ["specversion"], ["data"], ["data", "protocol"],
                             ["data", "limits"], ["data", "failsafes"], ["data", "notify"], ["data", "parameters"],
                             ["data", "limits", "power"], ["data", "failsafes", "power"]]),
       value=json_values)
def test_any_mutation_is_answered_per_spec_and_never_crashes(base: dict[str, Any], path: list[str], value: Any) -> None:
    env = Env()
    msg = _mutate(base, path, value)
    before = env.snapshot()
    replies = env.send(msg)
    assert len(replies) <= 1
    if m.schema_errors(msg):
        if msg.get("type") != m.ACK:
            assert ack_of(replies)[0] == m.SCHEMA_ERROR
        assert env.snapshot() == before and env.changes == 0
    for r in replies:
        if r["type"] == m.ACK and r["data"]["errorNumber"] != 0:
            assert env.snapshot() == before


@settings(max_examples=100, deadline=None)
@given(value=json_values)
def test_arbitrary_json_never_changes_state_unless_valid(value: Any) -> None:
    env = Env()
    replies = env.send(raw(value))
    assert len(replies) == 1 and replies[0]["data"]["errorNumber"] == m.SCHEMA_ERROR
    assert env.control.lpc is None and env.changes == 0
