"""The OCPP wallbox simulator's compiled schema checks (ocpp_gateway/sim/schema.py) give the verdict of the
``ocpp`` library's own check: on every schema of both versions it compiles, a valid message passes, and what
the library refuses (a limit off the 1.6 multipleOf 0.1, a wrong type, a missing field, an unknown field) the
compiled check refuses too; through the installed check the library's error is raised."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import ocpp
import ocpp.charge_point
import ocpp.messages
import pytest
from ocpp.exceptions import OCPPError
from ocpp.messages import Call, CallResult

import ocpp_gateway.sim.wallbox  # noqa: F401  (installs the compiled check)
from ocpp_gateway.sim import schema

P16: dict[str, Any] = {"connectorId": 1, "csChargingProfiles": {
    "chargingProfileId": 7, "stackLevel": 1, "chargingProfilePurpose": "TxDefaultProfile",
    "chargingProfileKind": "Absolute", "validTo": "2026-12-07T16:00:00Z", "chargingSchedule": {
        "chargingRateUnit": "A", "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 7.5, "numberPhases": 3}]}}}
PERIOD: dict[str, Any] = {"startPeriod": 0, "limit": 7.5, "numberPhases": 3}
P201: dict[str, Any] = {"evseId": 1, "chargingProfile": {
    "id": 7, "stackLevel": 1, "chargingProfilePurpose": "TxDefaultProfile", "chargingProfileKind": "Absolute",
    "validTo": "2026-12-07T16:00:00Z",
    "chargingSchedule": [{"id": 1, "chargingRateUnit": "A", "chargingSchedulePeriod": [PERIOD]}]}}


def library_passes(msg: Call | CallResult, version: str) -> bool:
    try:
        ocpp.messages._validate_payload(copy.deepcopy(msg), version)
    except OCPPError:
        return False
    return True


def with_limit(payload: dict[str, Any], version: str, limit: Any) -> dict[str, Any]:
    out = copy.deepcopy(payload)
    sched = out["csChargingProfiles"]["chargingSchedule"] if version == "1.6" else \
        out["chargingProfile"]["chargingSchedule"][0]
    sched["chargingSchedulePeriod"][0]["limit"] = limit
    return out


def test_every_schema_of_the_library_compiles() -> None:
    root = Path(ocpp.__file__).parent
    for version, folder in (("1.6", "v16"), ("2.0.1", "v201")):
        files = sorted((root / folder / "schemas").glob("*.json"))
        assert len(files) > 50
        for f in files:
            name = f.stem
            if name.endswith("Response"):
                kind, action = 3, name[: -len("Response")]
            else:
                kind, action = 2, name[: -len("Request")] if version == "2.0.1" else name
            assert schema.compiled(kind, action, version) is not None, f


@pytest.mark.parametrize("version", ["1.6", "2.0.1"])
def test_set_charging_profile_same_verdict_as_the_library(version: str) -> None:
    base = P16 if version == "1.6" else P201
    limits: list[Any] = [x / 10 for x in range(0, 800, 7)] + [x / 100 for x in range(0, 800, 13)]
    limits += [21.4, 4.11, 6, 16, 0.30000000000000004, -1.0, "7.5", None, True]
    verdicts = []
    for limit in limits:
        msg = Call("u1", "SetChargingProfile", with_limit(base, version, limit))
        lib = library_passes(msg, version)
        assert schema.passes(msg, version) == lib, (version, limit, lib)
        verdicts.append(lib)
    assert True in verdicts and False in verdicts
    broken: list[dict[str, Any]] = []
    missing = copy.deepcopy(base)
    missing.pop("connectorId" if version == "1.6" else "evseId")
    extra = {**copy.deepcopy(base), "surprise": 1}
    wrong = copy.deepcopy(base)
    wrong["connectorId" if version == "1.6" else "evseId"] = "one"
    broken += [missing, extra, wrong]
    for pl in broken:
        msg = Call("u1", "SetChargingProfile", pl)
        assert not library_passes(msg, version) and not schema.passes(msg, version), pl
    ok = CallResult("u1", {"status": "Accepted"})
    ok.action = "SetChargingProfile"
    bad = CallResult("u1", {"status": "Fine"})
    bad.action = "SetChargingProfile"
    assert schema.passes(ok, version) and library_passes(ok, version)
    assert not schema.passes(bad, version) and not library_passes(bad, version)


def test_the_installed_check_raises_the_librarys_error() -> None:
    assert ocpp.charge_point.validate_payload is schema.validate_payload
    good = Call("u1", "SetChargingProfile", with_limit(P16, "1.6", 21.4))
    asyncio.run(schema.validate_payload(good, "1.6"))
    off = Call("u1", "SetChargingProfile", with_limit(P16, "1.6", 4.11))
    with pytest.raises(OCPPError) as lib_err:
        ocpp.messages._validate_payload(copy.deepcopy(off), "1.6")
    with pytest.raises(type(lib_err.value)):
        asyncio.run(schema.validate_payload(off, "1.6"))


def _property_names(node: Any, out: set[str]) -> set[str]:
    if isinstance(node, dict):
        props = node.get("properties")
        if isinstance(props, dict):
            out.update(props)
        for v in node.values():
            _property_names(v, out)
    elif isinstance(node, list):
        for v in node:
            _property_names(v, out)
    return out


def test_key_conversions_are_the_librarys() -> None:
    import json

    root = Path(ocpp.__file__).parent
    names: set[str] = set()
    for folder in ("v16", "v201"):
        for f in (root / folder / "schemas").glob("*.json"):
            _property_names(json.loads(f.read_text(encoding="utf-8-sig")), names)
    assert len(names) > 200
    doc = {"outer": [{n: {n: [1, {n: "x"}]} for n in sorted(names)}], "ocppCSMSURL": 1, "socLimitReached": True}
    assert schema.camel_to_snake_case(doc) == schema._LIB_CAMEL_TO_SNAKE(doc)
    snake = schema._LIB_CAMEL_TO_SNAKE(doc)
    assert schema.snake_to_camel_case(snake) == schema._LIB_SNAKE_TO_CAMEL(snake)
    assert ocpp.charge_point.camel_to_snake_case is schema.camel_to_snake_case
