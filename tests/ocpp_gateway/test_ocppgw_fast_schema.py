"""The compiled schema check (fastjsonschema) next to the reference (jsonschema, Draft 4) on every official
OCPP schema, 1.6J and 2.0.1, requests and responses: the same verdict for schema-valid payloads and for
mutations of them (wrong types, 1.0 for an integer, booleans, huge numbers, NaN, missing and extra keys,
bad date-times ...), the payload left as it came (no defaults filled in), and :func:`rpc.validate` raising
the reference's error (code and description) exactly when the reference finds one.

The fast check's "valid" is final in :func:`rpc.validate` (it skips the reference), so a payload it accepts
and the reference refuses would let a bad message through: that is what this test looks for."""

from __future__ import annotations

import decimal
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ocpp_schema_strategies import SCHEMAS, payloads

from fuzz_support import fuzz, mutated
from ocpp_gateway import rpc


def _all_schemas() -> list[tuple[rpc.Version, str, str]]:
    out: list[tuple[rpc.Version, str, str]] = []
    for f in sorted((SCHEMAS / "v16").glob("*.json")):
        kind = "response" if f.stem.endswith("Response") else "request"
        out.append(("1.6", f.stem.removesuffix("Response"), kind))
    for f in sorted((SCHEMAS / "v201").glob("*.json")):
        kind = "response" if f.stem.endswith("Response") else "request"
        out.append(("2.0.1", f.stem.removesuffix("Response").removesuffix("Request"), kind))
    return out


ALL = _all_schemas()
FAST = [s for s in ALL if rpc.fast_validator(*s) is not None]  # type: ignore[arg-type]


DECIMAL = [("1.6", "GetCompositeSchedule", "response"), ("1.6", "RemoteStartTransaction", "request"),
           ("1.6", "SetChargingProfile", "request")]  # the reference checks their multipleOf on decimals


def test_every_schema_has_a_fast_check() -> None:
    assert len(ALL) == 206
    assert sorted(set(ALL) - set(FAST)) == []
    assert set(DECIMAL) <= set(FAST)


def _drawn(version: str, action: str, kind: str) -> st.SearchStrategy[Any]:
    def variants(t: dict[str, Any]) -> st.SearchStrategy[bytes]:
        return st.one_of(st.just(json.dumps(t).encode()), mutated(t), mutated(t), mutated(t, max_changes=1))
    return payloads(version, action, kind).flatmap(variants)


def _reference(version: rpc.Version, action: str, kind: str, payload: Any) -> tuple[str, str] | None:
    """What the reference validator says: None, or (code, description) as rpc.validate words it."""
    if not isinstance(payload, dict):
        return rpc.code_for(version, "format"), "payload must be a JSON object"
    ref = rpc.validator(version, action, kind)  # type: ignore[arg-type]
    assert ref is not None
    if (version, action, kind) in DECIMAL:  # as rpc.validate hands them to the reference: numbers as decimals
        payload = json.loads(json.dumps(payload), parse_float=decimal.Decimal)
    with decimal.localcontext() as ctx:
        ctx.prec = rpc.DECIMAL_PRECISION
        errors = list(ref.iter_errors(payload))
    err = next(iter(sorted(errors, key=lambda e: e.path)), None)
    if err is None:
        return None
    where = "/".join(str(p) for p in err.absolute_path) or "(payload)"
    return rpc.schema_error_code(version, err), f"{where}: {err.message}"[:500]


@pytest.mark.parametrize(("version", "action", "kind"), FAST, ids=["-".join(s) for s in FAST])
def test_fast_check_agrees_with_the_reference(version: rpc.Version, action: str, kind: str) -> None:
    fast = rpc.fast_validator(version, action, kind)  # type: ignore[arg-type]
    assert fast is not None

    @fuzz(12)
    @given(raw=_drawn(version, action, kind))
    def check(raw: bytes) -> None:
        try:
            payload = json.loads(raw)
        except ValueError:
            return  # not JSON: never reaches a schema (the RPC layer answers it)
        before = json.dumps(payload, sort_keys=True)
        expected = _reference(version, action, kind, payload)
        assert rpc._passes(fast, payload) == (expected is None), (payload, expected)
        try:
            rpc.validate(version, action, kind, payload)  # type: ignore[arg-type]
            got = None
        except rpc.RpcError as e:
            got = (e.code, e.description)
        assert got == expected, payload
        assert json.dumps(payload, sort_keys=True) == before  # nothing filled in or changed

    check()


@pytest.mark.parametrize("version", ["1.6", "2.0.1"])  # 2.0.1's schemas say draft-06: 1.0 would be an integer
@pytest.mark.parametrize(("value", "valid"), [
    (1, True), (1.0, False), (0.0, False), (True, False), (2**70, True), ("1", False), (None, False)])
def test_integer_as_the_reference_sees_it(version: rpc.Version, value: Any, valid: bool) -> None:
    key = "connectorId" if version == "1.6" else "evseId"
    p = {key: value, "meterValue": [{"timestamp": "2026-12-07T12:00:00Z", "sampledValue": [{"value": 1}]}]}
    if version == "1.6":
        p["meterValue"][0]["sampledValue"][0]["value"] = "1"
    fast = rpc.fast_validator(version, "MeterValues", "request")
    assert fast is not None
    assert rpc._passes(fast, p) is valid
    assert (_reference(version, "MeterValues", "request", p) is None) is valid


@pytest.mark.parametrize(("ts", "valid"), [
    ("2026-12-07T12:00:00Z", True), ("2026-12-07T12:00:00.123+01:00", True), ("2026-12-07T12:00:00z", True),
    ("2026-12-07T12:00:00", False), ("2026-13-07T12:00:00Z", False), ("yesterday", False), ("", False)])
def test_date_time_as_the_reference_sees_it(ts: str, valid: bool) -> None:
    p = {"connectorId": 1, "meterValue": [{"timestamp": ts, "sampledValue": [{"value": "1"}]}]}
    fast = rpc.fast_validator("1.6", "MeterValues", "request")
    assert fast is not None
    assert rpc._passes(fast, p) is valid
    assert (_reference("1.6", "MeterValues", "request", p) is None) is valid


@pytest.mark.parametrize(("limit", "valid"), [("1e300", True), ("1.7e308", True), ("-15.4", True), ("16", True),
                                              ("15.43", False), ("1e-300", False)])
def test_multiple_of_on_huge_and_tiny_decimals(limit: str, valid: bool) -> None:
    """1.6's limit is a multiple of 0.1, checked on decimals: 1e300 / 0.1 once raised decimal's
    DivisionImpossible out of the check (28 digits) instead of a verdict."""
    from chargegate import strict_json

    d = strict_json.loads('{"connectorId": 0, "csChargingProfiles": {"chargingProfileId": 1, "stackLevel": 3, '
                          '"chargingProfilePurpose": "TxDefaultProfile", "chargingProfileKind": "Absolute", '
                          '"chargingSchedule": {"chargingRateUnit": "A", "chargingSchedulePeriod": '
                          f'[{{"startPeriod": 0, "limit": {limit}}}]}}}}}}')
    if valid:
        rpc.validate("1.6", "SetChargingProfile", "request", d)
    else:
        with pytest.raises(rpc.RpcError) as e:
            rpc.validate("1.6", "SetChargingProfile", "request", d)
        assert e.value.code == "PropertyConstraintViolation" and "is not a multiple of 0.1" in str(e.value)


def _profile16(limit: Any) -> dict[str, Any]:
    return {"connectorId": 1, "csChargingProfiles": {
        "chargingProfileId": 101, "stackLevel": 1, "chargingProfilePurpose": "TxDefaultProfile",
        "chargingProfileKind": "Absolute", "validTo": "2026-12-07T12:00:10Z",
        "chargingSchedule": {"chargingRateUnit": "A", "startSchedule": "2026-12-07T12:00:00Z",
                             "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit, "numberPhases": 3}]}}}


@pytest.mark.parametrize("step", [0.1, 0.01])
def test_fast_set_charging_profile_16_limits_as_the_reference(step: float) -> None:
    """The gateway's own 1.6 SetChargingProfile (every setpoint to a 1.6 wallbox) takes the compiled check: the
    same verdict as the reference's decimal check for every limit 0..80 A in 0.1 and 0.01 steps, floats as the
    gateway builds them (round(x, 1)) and as arithmetic leaves them (0.1 * k), and odd numbers."""
    fast = rpc.fast_validator("1.6", "SetChargingProfile", "request")
    assert fast is not None
    values: list[Any] = []
    for k in range(round(80 / step) + 1):
        values += [round(k * step, 2), k * step]
    values += [1e300, 1.7e308, 1e-300, 2**70, 7, -15.4, 15.43, 0.30000000000000004, 19.01, 1e16 + 2]
    for v in values:
        p = _profile16(v)
        expected = _reference("1.6", "SetChargingProfile", "request", p)
        if rpc._passes(fast, p):
            assert expected is None, (v, expected)  # "valid" is final: never one the reference refuses
        else:
            # invalid or undecided: rpc.validate asks the reference
            assert not (v == round(v, 1) and isinstance(v, float) and abs(v) < 1e15 and expected is None), v
        try:
            rpc.validate("1.6", "SetChargingProfile", "request", p)
            got = None
        except rpc.RpcError as e:
            got = (e.code, e.description)
        assert got == expected, v
