"""Every number on the bus is a strict, finite JSON number within the range of its quantity.

For every payload model, a complete sample (every numeric field present, nested ones too) is taken
apart: each numeric value in turn is replaced by NaN, +-Infinity, 1e308, -0.0, a huge integer, a
boolean or a numeric string, published as JSON text the way a hostile or broken publisher would send
it, and the registry must refuse it with one warning naming the problem and count it. The same
values built in Python (our own publishers) are refused by the models themselves, except -0.0,
which a model turns into 0.0 so that none is ever published.
"""

from __future__ import annotations

import json
import math
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from chargegate import payloads as p
from chargegate import strict_json
from chargegate.topics import SPECS, Registry

NOW = p.utcnow()
LATER = NOW + timedelta(seconds=10)

FULL: dict[str, tuple[dict[str, str], p.Payload]] = {
    "evse.status": ({"evse_id": "wb1"}, p.EvseStatus(
        evse_id="wb1", online=True, state=p.EvseState.CHARGING, iec_state=p.IecState.C, raw_state=3,
        phases_in_use=3, current_a=[10, 10, 10], power_w=6900, energy_wh=1234,
        session=p.Session(id="s1", started=NOW, energy_start_wh=1000, energy_wh=234),
        applied=p.AppliedSetpoint(current_a=10, phases=3, seq=5))),
    "evse.setpoint": ({"evse_id": "wb1"}, p.Setpoint(evse_id="wb1", current_a=10, phases=3, valid_until=LATER, seq=7)),
    "evse.limit": ({"evse_id": "wb1"}, p.EvseLimit(evse_id="wb1", current_a=8, power_w=5000, phases=3,
                                                   valid_until=LATER)),
    "evse.command": ({"evse_id": "wb1"}, p.EvseCommand(evse_id="wb1", action=p.EvseCommandAction.STOP,
                                                       request_id="r1")),
    "evse.command_result": ({"evse_id": "wb1"}, p.EvseCommandResult(evse_id="wb1", request_id="r1", accepted=True)),
    "evse.mode": ({"evse_id": "wb1"}, p.ChargingMode(evse_id="wb1", mode=p.ChargingModeName.SOLAR_MIN,
                                                    target=p.SessionTarget(energy_wh=15000, by="07:00"),
                                                    max_current_a=10.0)),
    "evse.mode_set": ({"evse_id": "wb1"}, p.ModeCommand(evse_id="wb1", target=p.SessionTarget(energy_wh=9000,
                                                                                             by="06:30"),
                                                        max_current_a=12.0)),
    "history.session": ({"evse_id": "wb1"}, p.SessionRecord(
        evse_id="wb1", record_id=1, session_id="s1", started=NOW, energy_start_wh=10, energy_stop_wh=20,
        energy_wh=10, peak_power_w=11000, phases=3, cost=1.5, signed_values=2,
        tariffs=[p.TariffShare(level="low", start=NOW, energy_wh=10, price_ct_per_kwh=20, cost=0.2)])),
    "history.control": ({"kind": "limit"}, p.ControlRecord(record_id=1, kind=p.ControlKind.LIMIT, started=NOW,
                                                           power_w=4200, current_a=[6, 6, 6], effective_w=4200)),
    "meter.reading": ({"meter_id": "m1"}, p.MeterReading(
        meter_id="m1", current_a=[1, -2, 3], voltage_v=[230, 231, 229], power_w=-100, power_phase_w=[10, -20, 30],
        energy_import_wh=5, energy_export_wh=6)),
    "ext.message": ({"service": "my-service", "topic": "hello"},
                    p.ExtMessage(service="my-service", topic="hello", data={"text": "hi"})),
    "grid.limit": ({"source": "dso"}, p.GridLimit(source=p.LimitSource.DSO, active=True, power_w=4200,
                                                  current_a=[6, 6, 6], valid_until=LATER, failsafe_power_w=4200,
                                                  failsafe_duration_s=60)),
    "tariff.current": ({}, p.TariffCurrent(period=p.TariffPeriod(id="t1", level=p.TariffLevel.LOW, start=NOW,
                                                                 end=LATER, price_ct_per_kwh=20))),
    "tariff.schedule": ({}, p.TariffSchedule(periods=[p.TariffPeriod(id="t1", level=p.TariffLevel.LOW, start=NOW,
                                                                     price_ct_per_kwh=20)])),
    "link.smgw": ({}, p.SmgwLinkStatus(state=p.LinkState.UP, cert_days_left=30, bytes_tx=1, bytes_rx=2,
                                       channels={"ocpp": {"bytes": 10, "rate": 1.5}})),
    "controller.allocation": ({}, p.Allocation(cycle=1, solve_ms=0.5, limits={"grid": {"current_a": [35.0, 35, 35]}},
                                               evses=[p.EvseAllocation(evse_id="wb1", current_a=6, phases=3,
                                                                       bound_by="node:grid:L1")])),
    "service.health": ({"service": "evse-poller"}, p.Health(service="evse-poller", status=p.HealthStatus.ONLINE,
                                                            uptime_s=10, pid=42, counters={"x": 3},
                                                            task_restarts={"poll:evse:wb1": 2})),
    "service.log": ({"service": "evse-poller"}, p.LogRecord(service="evse-poller", level="warning", event="x",
                                                          fields={"device": "wb1", "current_a": 6.5, "n": 3})),
    "service.command": ({"service": "evse-poller"}, p.ServiceCommand(action="reload", request_id="x")),
}

Path = tuple[str | int, ...]


def numeric_paths(value: Any, path: Path = ()) -> list[Path]:
    """Every number in a JSON document (booleans are not numbers)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [path]
    if isinstance(value, dict):
        return [q for k, v in value.items() for q in numeric_paths(v, (*path, k))]
    if isinstance(value, list):
        return [q for i, v in enumerate(value) for q in numeric_paths(v, (*path, i))]
    return []


def schema_numeric_fields(schema: dict[str, Any]) -> set[str]:
    """Dotted names of every numeric property in a model's JSON schema (nested models too)."""
    defs = schema.get("$defs", {})
    out: set[str] = set()

    def walk(node: dict[str, Any], name: str, seen: frozenset[str]) -> None:
        if "$ref" in node:
            ref = node["$ref"].split("/")[-1]
            if ref not in seen:
                walk(defs[ref], name, seen | {ref})
            return
        for alt in node.get("anyOf", []) + node.get("allOf", []):
            walk(alt, name, seen)
        t = node.get("type")
        if t in ("number", "integer"):
            out.add(name)
        if t == "array" and isinstance(node.get("items"), dict):
            walk(node["items"], name, seen)
        if t == "object" and isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], name + ".*", seen)
        for k, v in node.get("properties", {}).items():
            walk(v, f"{name}.{k}" if name else k, seen)

    walk(schema, "", frozenset())
    return out


def dotted(path: Path, free_form: set[str]) -> str:
    parts: list[str] = []
    for x in path:
        if isinstance(x, int):
            continue
        name = ".".join(parts)
        parts.append("*" if f"{name}.*" in free_form else x)
    return ".".join(parts)


def sample_dict(name: str) -> dict[str, Any]:
    return json.loads(FULL[name][1].to_json())


def test_every_topic_has_a_full_sample_with_every_numeric_field() -> None:
    assert set(FULL) == {s.name for s in SPECS}
    for spec in SPECS:
        fields = schema_numeric_fields(spec.model.model_json_schema())
        free = {f for f in fields if f.endswith(".*")}
        present = {dotted(q, free) for q in numeric_paths(sample_dict(spec.name))}
        missing = {f for f in fields if f not in present}
        assert not missing, f"{spec.name}: the full sample lacks numeric fields {sorted(missing)}"


CASES = [(spec.name, q) for spec in SPECS for q in numeric_paths(sample_dict(spec.name))]
BAD_TEXT = ["NaN", "Infinity", "-Infinity", "1e308", "-1e308", "1e999", "-0.0", "-0", "123456789012345678901",
            "9" * 5000, "true", "false", '"5"', "9007199254740993"]


FREE_FORM = {"limits", "channels", "fields"}  # free-form JSON: booleans and strings are values there too
TAKES_TEXT = {"raw_state"}  # a device's own state code: a number or its text (at most 64 characters)
NOT_NUMBERS = {"true", "false", '"5"', True, "5"}


def free_form(path: Path) -> bool:
    return bool(path) and path[0] in FREE_FORM


def takes_text(path: Path) -> bool:
    return bool(path) and path[-1] in TAKES_TEXT


def replace(doc: Any, path: Path, marker: str) -> Any:
    if not path:
        return marker
    doc = json.loads(json.dumps(doc))
    node = doc
    for x in path[:-1]:
        node = node[x]
    node[path[-1]] = marker
    return doc


def text_with(name: str, path: Path, bad: str) -> str:
    marker = "@@BAD@@"
    return json.dumps(replace(sample_dict(name), path, marker)).replace(f'"{marker}"', bad)


def test_the_cases_cover_every_model() -> None:
    assert {n for n, _ in CASES} >= {s.name for s in SPECS} - {"evse.command", "evse.command_result",
                                                                 "service.command"}
    assert len(CASES) > 60


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(CASES), bad=st.sampled_from(BAD_TEXT))
def test_a_bad_number_anywhere_is_refused_and_counted(case: tuple[str, Path], bad: str) -> None:
    name, path = case
    assume(not (free_form(path) and bad in NOT_NUMBERS))
    assume(not (takes_text(path) and bad.startswith('"')))
    params, _ = FULL[name]
    reg = Registry()
    topic = reg.topic(name, **params)
    assert reg.parse(topic, text_with(name, path, bad).encode()) is None, (name, path, bad)
    assert sum(reg.invalid.values()) == 1


@pytest.mark.parametrize(("bad", "error"), [
    ("NaN", "NaN is not a number"), ("Infinity", "Infinity is not a number"), ("1e999", "out of range"),
    ("-0.0", "negative zero"), ("9" * 5000, "5000 digits"), ("true", "valid number"), ('"5"', "valid number"),
    ("1e308", "less than or equal"),
])
def test_the_warning_says_what_was_wrong(bad: str, error: str, capsys: pytest.CaptureFixture[str]) -> None:
    from chargegate import log

    log.setup("test", fmt="json")
    reg = Registry()
    text = text_with("meter.reading", ("power_phase_w", 1), bad)
    assert reg.parse("chargegate/meter/m1/reading", text.encode()) is None
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and lines[0]["event"] == "invalid message dropped"
    assert error in lines[0]["error"], lines[0]["error"]
    assert lines[0]["topic"] == "chargegate/meter/m1/reading"
    assert reg.invalid["meter.reading"] == 1


PY_BAD = [math.nan, math.inf, -math.inf, 1e308, -1e308, 10**20, 2**53 + 1, True, "5"]


@settings(max_examples=300, deadline=None)
@given(case=st.sampled_from(CASES), bad=st.sampled_from(PY_BAD))
def test_models_built_in_python_refuse_them_too(case: tuple[str, Path], bad: Any) -> None:
    name, path = case
    assume(not (free_form(path) and bad in NOT_NUMBERS))
    assume(not (takes_text(path) and isinstance(bad, str)))
    model = FULL[name][1]
    doc = replace(sample_dict(name), path, "@@BAD@@")
    node = doc
    for x in path[:-1]:
        node = node[x]
    node[path[-1]] = bad
    with pytest.raises(ValidationError):
        type(model).model_validate(doc)


@settings(max_examples=100, deadline=None)
@given(case=st.sampled_from(CASES))
def test_a_negative_zero_built_in_python_becomes_zero(case: tuple[str, Path]) -> None:
    name, path = case
    model = FULL[name][1]
    doc = replace(sample_dict(name), path, "@@BAD@@")
    node = doc
    for x in path[:-1]:
        node = node[x]
    node[path[-1]] = -0.0
    try:
        got = type(model).model_validate(doc)
    except ValidationError:
        return  # a field where 0 is out of range (e.g. a target's energy)
    text = got.model_dump_json()
    assert "-0.0" not in text and "-0," not in text


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000,
                                  "[" * 100_000])
def test_deep_nesting_is_a_value_error_not_a_crash(text: str) -> None:
    with pytest.raises(ValueError, match="nested"):
        strict_json.loads(text)
    reg = Registry()
    assert reg.parse("chargegate/evse/wb1/status", text) is None
    assert reg.invalid["evse.status"] == 1


def test_plain_numbers_still_pass() -> None:
    assert strict_json.loads(b'{"a": 1, "b": -2.5, "c": 0, "d": 0.0, "e": 1e3, "f": [9007199254740991]}') == {
        "a": 1, "b": -2.5, "c": 0, "d": 0.0, "e": 1000.0, "f": [2**53 - 1]}
