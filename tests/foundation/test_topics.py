"""Topic registry: building topics, round trips of every model, invalid payloads dropped and counted."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chargegate import payloads as p
from chargegate.topics import SPECS, Registry, TopicError

NOW = p.utcnow()
LATER = NOW + timedelta(seconds=10)

SAMPLES: dict[str, tuple[dict[str, str], p.Payload]] = {
    "evse.status": ({"evse_id": "wb1"}, p.EvseStatus(evse_id="wb1", online=True, state=p.EvseState.CHARGING,
                                                     iec_state=p.IecState.C, raw_state=3, phases_in_use=3,
                                                     current_a=[10, 10, 10], power_w=6900, energy_wh=1234)),
    "evse.setpoint": ({"evse_id": "wb1"}, p.Setpoint(evse_id="wb1", current_a=10, phases=3, valid_until=LATER, seq=7)),
    "evse.limit": ({"evse_id": "wb1"}, p.EvseLimit(evse_id="wb1", current_a=8, valid_until=LATER)),
    "evse.command": ({"evse_id": "wb1"}, p.EvseCommand(evse_id="wb1", action=p.EvseCommandAction.STOP,
                                                       request_id="r1")),
    "evse.command_result": ({"evse_id": "wb1"}, p.EvseCommandResult(evse_id="wb1", request_id="r1", accepted=True)),
    "meter.reading": ({"meter_id": "m1"}, p.MeterReading(meter_id="m1", current_a=[1, -2, 3], power_w=-100)),
    "grid.limit": ({"source": "dso"}, p.GridLimit(source=p.LimitSource.DSO, active=True, power_w=4200,
                                                  valid_until=LATER)),
    "tariff.current": ({}, p.TariffCurrent(period=p.TariffPeriod(id="t1", level=p.TariffLevel.LOW, start=NOW,
                                                                 end=LATER))),
    "tariff.schedule": ({}, p.TariffSchedule(periods=[])),
    "link.smgw": ({}, p.SmgwLinkStatus(state=p.LinkState.UP)),
    "controller.allocation": ({}, p.Allocation(cycle=1, evses=[p.EvseAllocation(evse_id="wb1", current_a=6, phases=3,
                                                                                 bound_by="node:grid:L1")])),
    "evse.mode": ({"evse_id": "wb1"}, p.ChargingMode(evse_id="wb1", mode=p.ChargingModeName.SOLAR_MIN,
                                                    target=p.SessionTarget(energy_wh=15000, by="07:00"))),
    "evse.mode_set": ({"evse_id": "wb1"}, p.ModeCommand(evse_id="wb1", mode=p.ChargingModeName.NOW)),
    "history.session": ({"evse_id": "wb1"}, p.SessionRecord(evse_id="wb1", record_id=1, session_id="s1", started=NOW,
                                                            tariffs=[p.TariffShare(level="low", start=NOW,
                                                                                   energy_wh=10)])),
    "history.control": ({"kind": "limit"}, p.ControlRecord(record_id=1, kind=p.ControlKind.LIMIT, started=NOW)),
    "service.health": ({"service": "evse-poller"}, p.Health(service="evse-poller", status=p.HealthStatus.ONLINE)),
    "service.log": ({"service": "evse-poller"}, p.LogRecord(service="evse-poller", level="warning", event="x",
                                                          fields={"device": "wb1"})),
    "service.command": ({"service": "evse-poller"}, p.ServiceCommand(action="reload", request_id="x")),
    "ext.message": ({"service": "my-service", "topic": "hello"}, p.ExtMessage(service="my-service", topic="hello",
                                                                               data={"count": 3})),
}


def test_every_topic_has_a_sample() -> None:
    assert set(SAMPLES) == {s.name for s in SPECS}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip(name: str) -> None:
    reg = Registry("site-a/chargegate")
    params, model = SAMPLES[name]
    topic = reg.topic(name, **params)
    assert topic.startswith("site-a/chargegate/")
    parsed = reg.parse(topic, model.to_json())
    assert parsed is not None
    spec, got_params, got = parsed
    assert spec.name == name and got_params == params
    assert got == model
    assert not reg.invalid


def test_topic_builder_rejects_bad_segments() -> None:
    reg = Registry()
    for bad in ("", "a/b", "+", "#", "a b", "x" * 65):
        with pytest.raises(TopicError):
            reg.topic("evse.status", evse_id=bad)
    with pytest.raises(TopicError):
        reg.topic("evse.status")
    with pytest.raises(TopicError):
        reg.topic("no.such.topic")
    with pytest.raises(TopicError):
        Registry("bad/+/root")


@pytest.mark.parametrize(
    ("topic", "payload", "error"),
    [
        ("chargegate/evse/wb1/setpoint", b"not json", "not JSON"),
        ("chargegate/evse/wb1/setpoint", b"[1, 2]", "JSON object"),
        ("chargegate/evse/wb1/setpoint", b'{"evse_id": "wb1", "current_a": -5, "valid_until": "2030-01-01T00:00:00Z",'
                                         b' "seq": 1}', "current_a"),
        ("chargegate/evse/wb1/setpoint", b'{"evse_id": "wb1", "current_a": 5, "seq": 1}', "valid_until"),
        ("chargegate/evse/wb1/setpoint", b'{"evse_id": "wb2", "current_a": 5, "valid_until": "2030-01-01T00:00:00Z",'
                                         b' "seq": 1}', "does not match the topic"),
        ("chargegate/evse/wb1/setpoint", b'{"evse_id": "wb1", "current_a": 5, "valid_until": "2030-01-01T00:00:00",'
                                         b' "seq": 1}', "timezone"),
        ("chargegate/grid/limit/dso", b'{"source": "dso", "active": true, "valid_until": "2030-01-01T00:00:00Z"}',
         "needs power_w or current_a"),
        ("chargegate/grid/limit/martians", b'{"source": "martians", "active": false, '
                                           b'"valid_until": "2030-01-01T00:00:00Z"}', "source"),
        ("chargegate/nothing/here", b"{}", "unknown topic"),
        ("chargegate/meter/m1/reading", b'{"meter_id": "m1", "current_a": [1, 2]}', "current_a"),
        ("chargegate/evse/wb1/status", b'{"evse_id": "wb1", "online": true, "state": "flying"}', "state"),
        ("chargegate/evse/wb1/status", b"\xff\xfe", "not JSON"),
        ("chargegate/evse/wb1/status", b'{"evse_id": "wb1", "online": true, "state": "charging", "ts": '
                                       b'"2030-01-01T00:00:00Z", "measured_at": "2030-01-01T00:05:00Z"}',
         "measured_at 2030-01-01T00:05:00+00:00 is after the status's ts"),
        ("chargegate/evse/wb1/status", b'{"evse_id": "wb1", "online": true, "state": "charging", '
                                       b'"measured_at": "2030-01-01T00:05:00"}', "timezone"),
    ],
)
def test_invalid_payload_dropped_logged_and_counted(topic: str, payload: bytes, error: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from chargegate import log

    log.setup("test", fmt="json")
    reg = Registry()
    assert reg.parse(topic, payload) is None
    assert sum(reg.invalid.values()) == 1
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert len(lines) == 1, lines
    assert lines[0]["event"] == "invalid message dropped"
    assert lines[0]["topic"] == topic
    assert error in lines[0]["error"]


def test_empty_retained_message_is_not_an_error() -> None:
    reg = Registry()
    assert reg.parse("chargegate/evse/wb1/status", b"") is None
    assert not reg.invalid


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([s.name for s in SPECS]), st.one_of(st.binary(max_size=200), st.dictionaries(
    st.text(max_size=10), st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=10),
                                    st.lists(st.floats(), max_size=4)), max_size=8).map(
    lambda d: json.dumps(d).encode())))
def test_parse_never_raises(name: str, payload: bytes) -> None:
    reg = Registry()
    spec = reg.spec(name)
    params = {k: "x1" for k in spec.params}
    result = reg.parse(reg.topic(name, **params), payload)
    assert result is None or isinstance(result[2], spec.model)


def test_readme_topic_table_is_what_chargegate_topics_prints() -> None:
    """Every topic of `chargegate topics` (the registry, the ACL's accounts, the simulators') is in the README's
    table with the same writers and retained flag, and the table has no topic the registry does not know."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from chargegate.topics import SERVICES

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    documented: dict[str, tuple[str, set[str]]] = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`") or cells[1] not in ("yes", "no"):
            continue
        writers = {w.strip() for w in cells[2].split(",")}
        if writers == {"each service"}:
            writers = set(SERVICES)
        for topic in re.findall(r"`([^`]+)`", cells[0]):
            documented[re.sub(r"<[a-z_]+>", "*", topic)] = (cells[1], writers)
    out = subprocess.run([sys.executable, "-m", "chargegate.cli", "topics"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0].split() == ["topic", "model", "retained", "qos", "written", "by"]
    printed: dict[str, tuple[str, set[str]]] = {}
    for line in out[1:]:
        topic, _model, retained, _qos, writers = re.split(r"\s{2,}", line.strip(), maxsplit=4)
        key = re.sub(r"\{[a-z_]+\}", "*", topic.removeprefix("chargegate/"))
        printed[key] = (retained, {w.strip() for w in writers.split(",")} if not writers.startswith("extra")
                        else {"extra services"})
    assert "sim/*/command" in printed and "admin" in printed["service/*/command"][1]
    assert printed == documented


def test_resolve_is_cached_bounded_and_hands_out_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    import chargegate.topics as topics

    monkeypatch.setattr(topics, "RESOLVE_CACHE_SIZE", 10)
    reg = Registry("site")
    for i in range(25):
        topic = reg.topic("evse.setpoint", evse_id=f"wb{i}")
        for _ in range(2):  # the first answer and the remembered one are the same
            got = reg.resolve(topic)
            assert got is not None and got[0].name == "evse.setpoint" and got[1] == {"evse_id": f"wb{i}"}
        got[1]["evse_id"] = "changed by a caller"
        assert reg.resolve(topic) == (got[0], {"evse_id": f"wb{i}"})
        assert len(reg._resolved) <= 10
    assert reg.resolve("other/evse/wb1/setpoint") is None and reg.resolve("site/evse/wb1/nothing") is None
    assert reg.resolve("site/evse/wb3/status") == (reg.spec("evse.status"), {"evse_id": "wb3"})


def test_subscription_parameters_are_topic_segments() -> None:
    """A fixed parameter of a subscription is one topic segment: no wildcard or level separator widening it,
    and only the topic's own parameters."""
    reg = Registry()
    assert reg.subscription("evse.setpoint", evse_id="wb1") == f"{reg.root}/evse/wb1/setpoint"
    assert reg.subscription("evse.setpoint") == f"{reg.root}/evse/+/setpoint"
    for bad in ("+", "#", "a/b", "", "wb1/#"):
        with pytest.raises(TopicError):
            reg.subscription("evse.setpoint", evse_id=bad)
    with pytest.raises(TopicError):
        reg.subscription("evse.setpoint", meter_id="m1")
