"""Fuzz of the local OCPP port (issue 14): what a clumsy or hostile wallbox sends over a real WebSocket -
garbage text and bytes, JSON that is no RPC frame, unknown message types and actions, answers to nothing,
and CALLs of every wallbox-initiated action of 1.6J and 2.0.1 with schema-valid payloads mutated deep in
their structure (fuzz_support.mutated) - gets the CALLERROR OCPP-J prescribes, and the connection, the
gateway and its bounded structures survive.

The oracle is the official schema (tests/ocpp_gateway/schemas, validated here with jsonschema directly,
not with the gateway's code): a payload it refuses must get a schema error code (Formation/Format,
Occurrence, Type, Property constraint violation); an unknown action NotImplemented; a frame that is not
JSON or no [type, id, ...] array FormationViolation (1.6) / RpcFrameworkError (2.0.1) with the message id
"-1" when none can be read; a CALLRESULT/CALLERROR for no CALL of the gateway no answer at all.
"""

from __future__ import annotations

import asyncio
import decimal
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft4Validator
from ocpp_schema_strategies import payloads, schema_path
from ocppgw_helpers import gateway_config, running_gateway, share_broker_secrets
from websockets.asyncio.client import ClientConnection, connect

from conftest import BrokerHandle
from fuzz_support import fuzz, mutated
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
SCHEMA_CODES = {
    "1.6": {"FormationViolation", "OccurenceConstraintViolation", "TypeConstraintViolation",
            "PropertyConstraintViolation"},
    "2.0.1": {"FormatViolation", "OccurrenceConstraintViolation", "TypeConstraintViolation",
              "PropertyConstraintViolation"},
}
FRAME_CODE = {"1.6": "FormationViolation", "2.0.1": "RpcFrameworkError"}


def schema_valid(version: str, action: str, text: str) -> bool:
    """The official schema's verdict on a CALL payload (1.6 numbers as decimals, as the spec's JSON has them)."""
    schema = json.loads(schema_path(version, action, "request").read_text(encoding="utf-8-sig"))
    schema.pop("$id", None)
    try:
        doc = json.loads(text, parse_float=decimal.Decimal if version == "1.6" else float)
    except (ValueError, RecursionError):
        return False
    if not isinstance(doc, dict):
        return False
    return Draft4Validator(schema).is_valid(doc)


@pytest.fixture(scope="module")
async def gw(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Gateway, int]]:
    tmp: Path = tmp_path_factory.mktemp("ocppgw-fuzz")
    cfg, path = gateway_config(tmp, broker.port, backend_url=None, evses=EVSES,
                               ocpp_extra="    max_messages_per_s: 10000\n")
    share_broker_secrets(cfg, broker.config)
    async with running_gateway(cfg, path) as gateway:
        yield gateway, cfg.ocpp.local.port


_conns: dict[str, ClientConnection] = {}


async def wallbox(port: int, version: str) -> ClientConnection:
    """One connection per version for the whole module (a dropped one would fail the survival check)."""
    ws = _conns.get(version)
    if ws is None:
        ws = _conns[version] = await connect(f"ws://127.0.0.1:{port}/ocpp/{CBID[version]}",
                                             subprotocols=[PROTO[version]], proxy=None, open_timeout=5,  # type: ignore[list-item]
                                             max_size=2**22)
    return ws


async def answer_to(ws: ClientConnection, uid: str, wait_s: float = 5.0) -> list[Any]:
    """The gateway's answer with message id ``uid`` (its own CALLs to the wallbox are answered plainly)."""
    async with asyncio.timeout(wait_s):
        while True:
            m = json.loads(await ws.recv())
            if m[0] == 2:  # the gateway asks something (profiles, triggers): a wallbox that says yes
                await ws.send(json.dumps([3, m[1], {"status": "Accepted"} if m[2] != "GetConfiguration"
                                          else {"configurationKey": []}]))
                continue
            if m[1] == uid:
                return list(m)


async def alive(ws: ClientConnection, version: str, n: int) -> None:
    uid = f"alive-{n}"
    await ws.send(json.dumps([2, uid, "Heartbeat", {}]))
    got = await answer_to(ws, uid)
    assert got[0] == 3 and "currentTime" in got[2], got


def frames(version: str) -> st.SearchStrategy[tuple[str, str | bytes, str | None]]:
    """(kind, frame, message id the answer must carry or None for no answer)."""

    @st.composite
    def call(draw: st.DrawFn) -> tuple[str, str | bytes, str | None]:
        uid = "c" + str(draw(st.integers(0, 10**9)))
        if draw(st.integers(0, 9)) == 0:
            action = draw(st.sampled_from(["FooBar", "", "heartbeat", "Heartbeat ", "../x"]))
            return "unknown", json.dumps([2, uid, action, {}]), uid
        if draw(st.integers(0, 19)) == 0:  # a central-system action sent by the wallbox: refused, any code
            action = "RemoteStartTransaction" if version == "1.6" else "RequestStartTransaction"
            return "wrong_direction", json.dumps([2, uid, action, {}]), uid
        action = draw(st.sampled_from(WALLBOX_ACTIONS[version]))
        valid = draw(payloads(version, action))
        if draw(st.integers(0, 4)) == 0:
            text = json.dumps(valid)
        else:
            text = draw(mutated(valid, max_changes=2)).decode()
        return f"call:{action}", f'[2, "{uid}", "{action}", {text}]', uid

    junk = st.one_of(
        st.text(max_size=40).filter(lambda t: not t.lstrip().startswith("[")).map(lambda t: ("junk", t, "-1")),
        st.sampled_from([("junk", "[]", "-1"), ("junk", "[2]", "-1"), ("junk", '[2, ""]', "-1"),
                         ("junk", '{"a": [2, "x"]}', "-1"), ("junk", "null", "-1"), ("junk", "[" * 3000, "-1")]),
        st.binary(min_size=1, max_size=16).filter(lambda b: not _utf8(b)).map(lambda b: ("binary", b, "-1")),
    )
    wrong = st.integers(0, 10**6).flatmap(lambda n: st.sampled_from([
        ("short_call", f'[2, "w{n}", "Heartbeat"]', f"w{n}"),
        ("payload_list", f'[2, "w{n}", "Heartbeat", []]', f"w{n}"),
        ("type", f'[7, "w{n}", {{}}]', f"w{n}"),
        ("type", f'["2", "w{n}", "Heartbeat", {{}}]', f"w{n}"),
        ("stray_result", f'[3, "w{n}", {{}}]', None),
        ("stray_error", f'[4, "w{n}", "GenericError", "", {{}}]', None),
    ]))
    return st.one_of(call(), call(), call(), junk, wrong)


def parses(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def _utf8(b: bytes) -> bool:
    try:
        b.decode()
    except UnicodeDecodeError:
        return False
    return True


_seen = {"n": 0}


async def check(gw: tuple[Gateway, int], version: str, batch: list[tuple[str, str | bytes, str | None]]) -> None:
    port = gw[1]
    ws = await wallbox(port, version)
    for kind, frame, uid in batch:
        await ws.send(frame)
        if uid is None:
            continue
        if isinstance(frame, str) and uid != "-1" and not parses(frame):
            kind, uid = "junk", "-1"  # e.g. a 5000-digit number: no message id can be read
        try:
            got = await answer_to(ws, uid)
        except TimeoutError:
            raise AssertionError(f"no answer to {str(frame)[:300]}") from None
        if kind == "unknown":
            assert got[:3] == [4, uid, "NotImplemented"], (frame, got)
        elif kind == "wrong_direction":
            assert got[0] == 4, (frame, got)
        elif kind.startswith("call:"):
            action = kind.split(":", 1)[1]
            body = frame[frame.index(",", frame.index(action)) + 1:-1]  # type: ignore[union-attr, arg-type]
            if not schema_valid(version, action, body):
                assert got[0] == 4 and got[2] in SCHEMA_CODES[version], (frame, got)
                assert isinstance(got[3], str) and got[3], got  # the description names what was wrong
            else:
                assert got[0] in (3, 4), got
                if got[0] == 4:  # a valid message refused by the gateway: never as a schema violation
                    assert got[2] not in ("FormationViolation", "FormatViolation", "TypeConstraintViolation",
                                          "OccurenceConstraintViolation", "OccurrenceConstraintViolation") \
                        or action in ("StopTransaction", "TransactionEvent"), (frame, got)
        else:
            assert got[0] == 4 and got[1] == uid, (frame, got)
            # a payload that is no object: FormationViolation (1.6) / FormatViolation (2.0.1: "payload for
            # action is syntactically incorrect"); an unknown message type: 2.0.1 MessageTypeNotSupported
            assert got[2] in (FRAME_CODE[version], "MessageTypeNotSupported", "FormatViolation"), (frame, got)
    _seen["n"] += 1
    await alive(ws, version, _seen["n"])
    assert ws.close_code is None


@fuzz(60)
@given(batch=st.lists(frames("1.6"), min_size=1, max_size=5))
async def test_a_16_wallbox_sending_anything(gw: tuple[Gateway, int], batch: list) -> None:
    await check(gw, "1.6", batch)


@fuzz(60)
@given(batch=st.lists(frames("2.0.1"), min_size=1, max_size=5))
async def test_a_201_wallbox_sending_anything(gw: tuple[Gateway, int], batch: list) -> None:
    await check(gw, "2.0.1", batch)


async def test_bad_messages_were_counted_and_logs_stay_bounded(gw: tuple[Gateway, int]) -> None:
    """After the fuzz: the gateway counted what it refused, kept its per-connection structures bounded and
    still serves a wallbox that behaves."""
    g, port = gw
    counters = g.ctx.counters
    bad = {k: v for k, v in counters.items() if k.startswith("ocpp_bad_")}
    assert bad.get("ocpp_bad_frame", 0) > 0 and bad.get("ocpp_bad_schema", 0) > 0, bad
    for version in ("1.6", "2.0.1"):
        ws = await wallbox(port, version)
        await alive(ws, version, 10**6)
    for ws in _conns.values():
        await ws.close()
    _conns.clear()
