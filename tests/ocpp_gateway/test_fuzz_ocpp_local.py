"""Fuzz of the local OCPP port (issue 14): what a clumsy or hostile wallbox sends over a real WebSocket
(1.6J and 2.0.1) - garbage text and bytes, JSON nested deeper than any parser goes, JSON that is no RPC
frame, wrong message type ids, unknown actions, central-system actions sent the wrong way, answers to
nothing, and CALLs of every wallbox-initiated action with schema-valid payloads mutated deep in their
structure (fuzz_support.mutated) - gets the answer OCPP-J prescribes, and the connection, the gateway and
its bounded structures survive.

The oracle is the specifications and the official schemas (the tests' own copies in
tests/ocpp_gateway/schemas, validated here with jsonschema directly, not with the gateway's code):

* a frame that is not JSON or no ``[type, id, ...]`` array: FormationViolation (1.6J section 4.2.3) /
  RpcFrameworkError (2.0.1 part 4 section 4.3), with the message id "-1" when none can be read;
* an unknown message type: FormationViolation / MessageTypeNotSupported;
* an unknown action: NotImplemented; an action only the central system sends: some CALLERROR;
* a payload against its schema: the code of one of its violations (a wrong type TypeConstraintViolation, a
  missing field or too many/few items the occurrence code, an unknown property the format code, anything
  else PropertyConstraintViolation, a "date-time" that is no RFC 3339 date-time included: the format JSON
  Schema draft 4 section 7.3.1 gives it, checked here by :func:`rfc3339`), with a description saying why;
* a schema-valid payload: a CALLRESULT, or a CALLERROR that is not a schema code;
* a CALLRESULT/CALLERROR for no CALL of the gateway: no answer at all.

Asserted too: every refusal is counted, no internal or handler error, a Heartbeat is answered after each
batch on the same connection, and the per-connection structures stay bounded after 1500 bad calls.
"""

from __future__ import annotations

import asyncio
import decimal
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft4Validator, FormatChecker
from ocpp_schema_strategies import load, payloads
from ocppgw_helpers import gateway_config, running_gateway, share_broker_secrets
from websockets.asyncio.client import ClientConnection, connect

from conftest import BrokerHandle
from fuzz_support import fuzz, largest, mutated
from ocpp_gateway.service import Gateway

EVSES = """
  - id: fz16
    circuit: grid
    ocpp: {charge_box_id: FZ16}
  - id: fz201
    circuit: grid
    ocpp: {charge_box_id: FZ201, version: "2.0.1"}
"""
CBID = {"1.6": "FZ16", "2.0.1": "FZ201"}
PROTO = {"1.6": "ocpp1.6", "2.0.1": "ocpp2.0.1"}

# the messages a charge point sends (OCPP 1.6 edition 2 §4, OCPP 2.0.1 part 2 "messages sent by the
# charging station"), those of them whose schema the gateway has
WALLBOX_ACTIONS = {
    "1.6": ["Authorize", "BootNotification", "DataTransfer", "DiagnosticsStatusNotification",
            "FirmwareStatusNotification", "Heartbeat", "MeterValues", "StartTransaction", "StatusNotification",
            "StopTransaction"],
    "2.0.1": ["Authorize", "BootNotification", "ClearedChargingLimit", "DataTransfer", "FirmwareStatusNotification",
              "Heartbeat", "LogStatusNotification", "MeterValues", "NotifyChargingLimit", "NotifyEVChargingNeeds",
              "NotifyEvent", "NotifyReport", "ReportChargingProfiles", "ReservationStatusUpdate",
              "SecurityEventNotification", "StatusNotification", "TransactionEvent"],
}
WRONG_WAY = {"1.6": "RemoteStartTransaction", "2.0.1": "RequestStartTransaction"}
FRAME = {"1.6": "FormationViolation", "2.0.1": "RpcFrameworkError"}
MTYPE = {"1.6": "FormationViolation", "2.0.1": "MessageTypeNotSupported"}
FORMAT = {"1.6": "FormationViolation", "2.0.1": "FormatViolation"}
OCCURRENCE = {"1.6": "OccurenceConstraintViolation", "2.0.1": "OccurrenceConstraintViolation"}  # 1.6 spells it so
SCHEMA_CODES = {v: {FORMAT[v], OCCURRENCE[v], "TypeConstraintViolation", "PropertyConstraintViolation"}
                for v in ("1.6", "2.0.1")}


@dataclass(frozen=True)
class Expect:
    """What the gateway must answer to one frame: ``uid`` None means no answer at all; ``codes`` None a
    CALLRESULT or a CALLERROR that is no schema code; ``ANY`` any CALLERROR."""

    uid: str | None
    codes: frozenset[str] | None


ANY = frozenset({"*"})


# RFC 3339 section 5.6, written out from its ABNF: full-date "T" partial-time time-offset, T and Z in any case
_DATE_TIME = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?"
                        r"([Zz]|[+-]([0-9]{2}):([0-9]{2}))")


def rfc3339(value: object) -> bool:
    """date-mday 01-28/29/30/31 by month and leap year, hour 00-23, minute 00-59, second 00-60; the offset's
    hour 00-23 and minute 00-59 (RFC 3339 section 5.6 and 5.7)."""
    if not isinstance(value, str):
        return True
    m = _DATE_TIME.fullmatch(value)
    if m is None:
        return False
    y, mo, d, h, mi, sec = (int(x) for x in m.groups()[:6])
    leap = y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)
    mdays = [31, 29 if leap else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
    ok = 1 <= mo <= 12 and 1 <= d <= mdays[mo - 1] and h <= 23 and mi <= 59 and sec <= 60
    return ok and (m.group(9) is None or (int(m.group(9)) <= 23 and int(m.group(10)) <= 59))


DATE_TIME = FormatChecker(formats=())
DATE_TIME.checks("date-time")(rfc3339)


def spec_codes(version: str, action: str, text: str) -> frozenset[str] | None:
    """The codes the schema allows for a CALL payload (None: the payload is valid). 1.6 numbers are read
    as decimals, as the specification's JSON has them."""
    doc = json.loads(text, parse_float=decimal.Decimal if version == "1.6" else float)
    if not isinstance(doc, dict):
        return frozenset({FORMAT[version]})
    schema = load(version, action, "request")
    schema.pop("$id", None)
    codes = set()
    for err in Draft4Validator(schema, format_checker=DATE_TIME).iter_errors(doc):
        kw = err.validator
        codes.add("TypeConstraintViolation" if kw == "type" else FORMAT[version] if kw == "additionalProperties"
                  else OCCURRENCE[version] if kw in ("required", "minItems", "maxItems") else
                  "PropertyConstraintViolation")
    return frozenset(codes) or None


def _utf8(b: bytes) -> bool:
    try:
        b.decode()
    except UnicodeDecodeError:
        return False
    return True


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


@st.composite
def frames(draw: st.DrawFn, version: str) -> tuple[str | bytes, Expect]:
    uid = draw(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=36))
    frame_err = Expect("-1", frozenset({FRAME[version]}))
    kind = draw(st.sampled_from(["garbage", "binary", "shape", "mtype", "unknown", "wrong_way", "stray",
                                 "action", "action", "action", "action"]))
    if kind == "garbage":
        text = draw(st.sampled_from(["", "[", "{}", "null", "42", '"x"', "[2]", "[]", "NaN", "[" * 3000,
                                     '{"a": [2, "x"]}']) |
                    st.text(max_size=40).filter(lambda t: not t.strip().startswith("[")))
        return text, frame_err
    if kind == "binary":
        return draw(st.binary(min_size=1, max_size=20).filter(lambda b: not _utf8(b))), frame_err
    if kind == "shape":  # a list, but no [type, id, action, {payload}]
        text = draw(st.sampled_from([json.dumps([2, uid]), json.dumps([2, 5, "Heartbeat", {}]),
                                     json.dumps([2, "", "Heartbeat", {}]), json.dumps([2, "x" * 37, "Heartbeat", {}]),
                                     json.dumps([2, uid, "Heartbeat"]), json.dumps([2, uid, "Heartbeat", []])]))
        msg = json.loads(text)
        mid = msg[1] if isinstance(msg[1], str) and msg[1] else "-1"
        return text, Expect(mid, frozenset({FRAME[version], FORMAT[version]}))
    if kind == "mtype":
        mtype = draw(st.sampled_from([0, 1, 5, 7, 9, -1, 2.5, "2", None, True]))
        return json.dumps([mtype, uid, {}]), Expect(uid, frozenset({MTYPE[version], FRAME[version]}))
    if kind == "unknown":
        action = draw(st.sampled_from(["FooBar", "heartbeat", "Heartbeat ", "", "../x", "RemoteStartTransactionX"]))
        return json.dumps([2, uid, action, {}]), Expect(uid, frozenset({"NotImplemented"}))
    if kind == "wrong_way":
        return json.dumps([2, uid, WRONG_WAY[version], {}]), Expect(uid, ANY)
    if kind == "stray":  # an answer to a CALL the gateway never made
        text = draw(st.sampled_from([json.dumps([3, uid, {}]), json.dumps([4, uid, "GenericError", "", {}])]))
        return text, Expect(None, None)
    action = draw(st.sampled_from(WALLBOX_ACTIONS[version]))
    valid = draw(payloads(version, action))
    text = draw(st.one_of(mutated(valid, 2), st.just(json.dumps(valid).encode()))).decode()
    frame = f'[2, {json.dumps(uid)}, "{action}", {text}]'
    if not _parses(text):  # e.g. a raw token or a 5000-digit number: no message id can be read
        return frame, frame_err
    return frame, Expect(uid, spec_codes(version, action, text))


@dataclass
class Rig:
    gw: Gateway
    port: int

    def counter(self, name: str) -> int:
        return int(self.gw.ctx.counters.get(name, 0))  # type: ignore[attr-defined]

    def bad(self) -> int:
        return sum(v for k, v in self.gw.ctx.counters.items() if k.startswith("ocpp_bad_"))  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
async def rig(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    cfg, path = gateway_config(tmp_path_factory.mktemp("ocppgw-fuzz"), broker.port, backend_url=None,
                               evses=EVSES, ocpp_extra="    max_messages_per_s: 100000\n")
    share_broker_secrets(cfg, broker.config)
    async with running_gateway(cfg, path) as gateway:
        yield Rig(gateway, cfg.ocpp.local.port)


@pytest.fixture(scope="module")
async def sockets(rig: Rig) -> AsyncIterator[dict[str, ClientConnection]]:
    """One connection per version for the whole module (a dropped one fails the survival check)."""
    out = {}
    for version in ("1.6", "2.0.1"):
        out[version] = await connect(f"ws://127.0.0.1:{rig.port}/ocpp/{CBID[version]}",
                                     subprotocols=[PROTO[version]],  # type: ignore[list-item]
                                     proxy=None, open_timeout=5, max_size=2**22)
    try:
        yield out
    finally:
        for ws in out.values():
            await ws.close()


async def answer_to(ws: ClientConnection, uid: str, frame: str | bytes, wait_s: float = 5.0) -> list[Any]:
    """The gateway's answer with message id ``uid``. Its own CALLs in between (after a boot or a status it
    configures the wallbox) get a plain answer; any other answer is one the gateway must not have sent
    (e.g. to a stray CALLRESULT)."""
    try:
        async with asyncio.timeout(wait_s):
            while True:
                m = list(json.loads(await ws.recv()))
                if m[0] == 2:
                    await ws.send(json.dumps([3, m[1], {"status": "Accepted"} if m[2] != "GetConfiguration"
                                              else {"configurationKey": []}]))
                    continue
                assert m[1] == uid[:36], f"answer {m} while waiting for {uid!r} (after {str(frame)[:200]})"
                return m
    except TimeoutError:
        raise AssertionError(f"no answer to {str(frame)[:300]}") from None


async def check(rig: Rig, ws: ClientConnection, version: str, batch: list[tuple[str | bytes, Expect]]) -> None:
    bad, refused = rig.bad(), 0
    for frame, expect in batch:
        await ws.send(frame)
        if expect.uid is None:
            continue
        got = await answer_to(ws, expect.uid, frame)
        if expect.codes is None:
            assert got[0] in (3, 4), (frame, got)
            if got[0] == 4:  # valid by the schema, refused by the gateway for what it says
                assert got[2] not in SCHEMA_CODES[version] | {FRAME[version], "InternalError"}, (frame, got)
            continue
        assert got[0] == 4, (frame, got)
        assert isinstance(got[3], str) and got[3], got  # the description says why
        if expect.codes is not ANY:
            assert got[2] in expect.codes, (frame, expect.codes, got)
            refused += 1
    assert rig.bad() >= bad + refused  # every refusal counted
    await ws.send(json.dumps([2, "hb", "Heartbeat", {}]))
    hb = await answer_to(ws, "hb", "Heartbeat")
    assert hb[0] == 3 and "currentTime" in hb[2], hb  # the connection survives
    assert ws.close_code is None
    assert rig.counter("ocpp_internal_errors") == 0
    assert rig.counter("ocpp_handler_errors") == 0


@pytest.mark.parametrize("version", ["1.6", "2.0.1"])
@fuzz(100)
@given(data=st.data())
async def test_every_frame_gets_the_specified_answer(rig: Rig, sockets: dict[str, ClientConnection],
                                                     version: str, data: st.DataObject) -> None:
    batch = data.draw(st.lists(frames(version), min_size=1, max_size=5))
    await check(rig, sockets[version], version, batch)


@pytest.mark.parametrize("stamp", ["", "2026-01-01 00:00:00Z", "2026-01-01T00:00:00+0100", "20260101T000000Z",
                                   "2026-01-01T00:00Z", "2026-01-01T00:00:00", "2025-02-29T00:00:00Z",
                                   "2026-01-01T00:00:00+00:60", "\uff12026-01-01T00:00:00Z"])
async def test_a_date_time_that_is_no_rfc3339_gets_property_constraint_violation(
        rig: Rig, sockets: dict[str, ClientConnection], stamp: str) -> None:
    """Python's fromisoformat takes all of these but the last three; the schemas' "date-time" is RFC 3339's."""
    assert not rfc3339(stamp)
    ok = ["2024-02-29T23:59:60Z", "2026-01-01t00:00:00.1234567z", "2026-01-01T00:00:00-14:00"]
    assert all(rfc3339(x) for x in ok)
    calls = {"1.6": ("StatusNotification", "timestamp",
                     {"connectorId": 1, "errorCode": "NoError", "status": "Available"}),
             "2.0.1": ("NotifyReport", "generatedAt", {"requestId": 1, "seqNo": 0})}
    for version, (action, key, body) in calls.items():
        batch = [(json.dumps([2, "bad", action, {**body, key: stamp}]),
                  Expect("bad", frozenset({"PropertyConstraintViolation"})))]
        batch += [(json.dumps([2, f"ok{i}", action, {**body, key: x}]), Expect(f"ok{i}", None))
                  for i, x in enumerate(ok)]
        await check(rig, sockets[version], version, batch)


async def test_refusals_counted_and_memory_bounded(rig: Rig, sockets: dict[str, ClientConnection]) -> None:
    """After the fuzz: the gateway counted what it refused by kind, kept its per-connection structures
    bounded under 1500 bad calls, and still serves both wallboxes."""
    ws = sockets["1.6"]
    for i in range(1500):
        await ws.send(json.dumps([2, f"m{i}", "FooBar", {}]))
    for i in range(1500):  # in order; the gateway's own CALLs in between get their plain answer
        await answer_to(ws, f"m{i}", "FooBar")
    big = largest(rig.gw)
    assert big[0][0] <= 1024, big
    await check(rig, ws, "1.6", [("[", Expect("-1", frozenset({FRAME["1.6"]}))),  # on its own too
                                 ('[2, "b", "BootNotification", {}]', Expect("b", frozenset({OCCURRENCE["1.6"]})))])
    assert rig.counter("ocpp_bad_frame") > 0 and rig.counter("ocpp_bad_schema") > 0, rig.gw.ctx.counters  # type: ignore[attr-defined]
    for version, w in sockets.items():
        await check(rig, w, version, [])
