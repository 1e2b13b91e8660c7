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
DECIMAL = {("GetCompositeSchedule", "response"), ("RemoteStartTransaction", "request"),
           ("SetChargingProfile", "request")}
FAST = [s for s in ALL if rpc.fast_validator(*s) is not None]  # type: ignore[arg-type]


def test_every_schema_has_a_fast_check() -> None:
    """The three 1.6 messages with ``multipleOf`` on decimals included (SetChargingProfile is every limit the
    gateway sends: it no longer takes the reference validator, nor imports jsonschema)."""
    assert len(ALL) == 206
    assert sorted(set(ALL) - set(FAST)) == []


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
    if version == "1.6" and (action, kind) in DECIMAL:  # multipleOf on decimals, with digits for any float
        payload = json.loads(json.dumps(payload), parse_float=decimal.Decimal)
    with decimal.localcontext() as ctx:
        ctx.prec = 800
        err = next(iter(sorted(ref.iter_errors(payload), key=lambda e: e.path)), None)
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


def test_multiple_of_fast_and_reference_on_every_limit() -> None:
    """The compiled check of 1.6 SetChargingProfile (multipleOf 0.1) against the reference on decimals, for the
    limits a gateway sends (0..80 A in 0.1 and 0.01 steps, as floats computed the way a controller does) and
    odd ones: the same verdict, except above 1.7e307 where the compiled check says invalid (its float quotient
    overflows) and the reference decides."""
    fast = rpc.fast_validator("1.6", "SetChargingProfile", "request")
    assert fast is not None
    values = [i / 10 for i in range(801)] + [i * 0.01 for i in range(8001)] + [i * 0.1 for i in range(801)]
    values += [1e300, -1e300, 1e-300, 5e-324, 2.0**70, 2**70, 10**40 + 1, 0.30000000000000004, 16, -15.4]
    disagree = []
    for limit in values:
        p = {"connectorId": 0, "csChargingProfiles": {
            "chargingProfileId": 1, "stackLevel": 3, "chargingProfilePurpose": "TxDefaultProfile",
            "chargingProfileKind": "Absolute", "chargingSchedule": {
                "chargingRateUnit": "A", "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit}]}}}
        if rpc._passes(fast, p) != (_reference("1.6", "SetChargingProfile", "request", p) is None):
            disagree.append(limit)
    assert disagree == []
    huge = {"connectorId": 0, "csChargingProfiles": {
        "chargingProfileId": 1, "stackLevel": 3, "chargingProfilePurpose": "TxDefaultProfile",
        "chargingProfileKind": "Absolute", "chargingSchedule": {
            "chargingRateUnit": "A", "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 1.7e308}]}}}
    assert not rpc._passes(fast, huge) and _reference("1.6", "SetChargingProfile", "request", huge) is None
    rpc.validate("1.6", "SetChargingProfile", "request", huge)  # the reference decides: valid
