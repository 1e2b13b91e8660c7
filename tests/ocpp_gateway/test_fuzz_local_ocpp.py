"""Fuzz: OCPP-J frames from a wallbox into the gateway's local central system (real WebSocket, 1.6J and
2.0.1): garbage text and binary frames, wrong message type ids, unknown actions and schema-invalid
payloads of real actions (mutations of schema-valid ones drawn from the JSON schemas).

The expected answer comes from the OCPP-J specifications (1.6J section 4.2.3, 2.0.1 part 4 section 4.3)
and the schemas in ``schemas/`` (the tests' own copies): a frame that is no OCPP-J RPC frame gets
FormationViolation (1.6) / RpcFrameworkError (2.0.1) with message id "-1" when none can be read; an
unknown message type FormationViolation / MessageTypeNotSupported; an unknown action NotImplemented; a
payload against its schema the code of one of its violations (a wrong type TypeConstraintViolation, a
missing field or too many/few items the occurrence code, an unknown property the format code, anything else
PropertyConstraintViolation). Asserted too: the connection survives every frame (a Heartbeat is answered
after each batch), the bad-message counters grow, the gateway's memory per connection stays bounded."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft4Validator
from ocpp_schema_strategies import load, payloads
from ocppgw_helpers import InProcessGateway, gateway_config, share_broker_secrets
from websockets.asyncio.client import ClientConnection, connect

from conftest import BrokerHandle
from fuzz_support import fuzz, largest, mutated
from ocpp_gateway.service import Gateway

EVSES = """
  - id: fz16
    circuit: grid
    ocpp: {charge_box_id: CB-FZ16}
  - id: fz201
    circuit: grid
    ocpp: {charge_box_id: CB-FZ201, version: "2.0.1"}
"""
ACTIONS = {"1.6": ["Heartbeat", "StatusNotification", "Authorize", "BootNotification", "MeterValues",
                   "DataTransfer", "FirmwareStatusNotification"],
           "2.0.1": ["Heartbeat", "StatusNotification", "Authorize", "BootNotification", "MeterValues",
                     "NotifyEvent", "FirmwareStatusNotification"]}
FRAME = {"1.6": "FormationViolation", "2.0.1": "RpcFrameworkError"}
MTYPE = {"1.6": "FormationViolation", "2.0.1": "MessageTypeNotSupported"}
FORMAT = {"1.6": "FormationViolation", "2.0.1": "FormatViolation"}
OCCURRENCE = {"1.6": "OccurenceConstraintViolation", "2.0.1": "OccurrenceConstraintViolation"}  # 1.6 spells it so


def spec_codes(version: str, action: str, payload: Any) -> set[str]:
    """The codes the specification allows for ``payload`` of ``action`` (empty: the payload is valid)."""
    if not isinstance(payload, dict):
        return {FORMAT[version]}
    v = Draft4Validator(load(version, action, "request"))
    codes = set()
    for err in v.iter_errors(payload):
        kw = err.validator
        codes.add("TypeConstraintViolation" if kw == "type" else FORMAT[version] if kw == "additionalProperties"
                  else OCCURRENCE[version] if kw in ("required", "minItems", "maxItems") else
                  "PropertyConstraintViolation")
    return codes


@dataclass
class Rig:
    gw: Gateway
    port: int

    def bad(self) -> int:
        return sum(v for k, v in self.gw.ctx.counters.items() if k.startswith("ocpp_bad_"))  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
async def rig(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    cfg, path = gateway_config(tmp_path_factory.mktemp("ocpp-fuzz"), broker.port, backend_url=None, evses=EVSES,
                               ocpp_extra="    max_messages_per_s: 100000\n")
    share_broker_secrets(cfg, broker.config)
    g = InProcessGateway(cfg, path)
    gw = await g.start()
    try:
        yield Rig(gw, cfg.ocpp.local.port)
    finally:
        await g.stop()


@pytest.fixture(scope="module")
async def sockets(rig: Rig) -> AsyncIterator[dict[str, ClientConnection]]:
    out = {}
    for version, cbid, proto in (("1.6", "CB-FZ16", "ocpp1.6"), ("2.0.1", "CB-FZ201", "ocpp2.0.1")):
        out[version] = await connect(f"ws://127.0.0.1:{rig.port}/ocpp/{cbid}", subprotocols=[proto],  # type: ignore[list-item]
                                     proxy=None, open_timeout=5, max_size=2**22)
    try:
        yield out
    finally:
        for ws in out.values():
            await ws.close()


@st.composite
def frames(draw: st.DrawFn, version: str) -> tuple[str | bytes, str, set[str] | None]:
    """A frame, the message id the answer must carry, the codes allowed (None: a CALLRESULT is right)."""
    uid = draw(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=36))
    kind = draw(st.sampled_from(["garbage", "binary", "shape", "mtype", "unknown", "action", "action", "action"]))
    if kind == "garbage":
        text = draw(st.sampled_from(["", "[", "{}", "null", "42", '"x"', "[2]", "[]", "NaN", "[" * 300]) |
                    st.text(max_size=40).filter(lambda t: not t.strip().startswith("[")))
        return text, "-1", {FRAME[version]}
    if kind == "binary":
        return b"\xff\xfe" + draw(st.binary(max_size=20)), "-1", {FRAME[version]}
    if kind == "shape":  # a list, but no [type, id, ...]
        text = draw(st.sampled_from([json.dumps([2, uid]), json.dumps([2, 5, "Heartbeat", {}]),
                                     json.dumps([2, "", "Heartbeat", {}]), json.dumps([2, "x" * 37, "Heartbeat", {}])]))
        msg = json.loads(text)
        return text, msg[1] if isinstance(msg[1], str) and msg[1] else "-1", {FRAME[version]}
    if kind == "mtype":
        mtype = draw(st.sampled_from([0, 1, 5, 9, -1, 2.5, "2", None, True]))
        return json.dumps([mtype, uid, {}]), uid, {MTYPE[version], FRAME[version]}
    if kind == "unknown":
        action = draw(st.sampled_from(["FooBar", "heartbeat", "Heartbeat ", "", "RemoteStartTransactionX"]))
        return json.dumps([2, uid, action, {}]), uid, {"NotImplemented"}
    action = draw(st.sampled_from(ACTIONS[version]))
    valid = draw(payloads(version, action))
    text = draw(st.one_of(mutated(valid, 2), st.just(json.dumps(valid).encode()))).decode()
    try:
        payload = json.loads(text)
    except ValueError:  # a raw token json.loads does not take: not JSON at all
        return f'[2, "{uid}", "{action}", {text}]', "-1", {FRAME[version]}
    codes = spec_codes(version, action, payload)
    return json.dumps([2, uid, action, payload]), uid, codes or None


async def exchange(ws: ClientConnection, frame: str | bytes) -> list[Any]:
    """Send ``frame``, the answer to it (the central system's own CALLs in between - after a boot or a
    status it configures the wallbox - are refused as a wallbox without that feature would)."""
    await ws.send(frame)
    while True:
        msg = list(json.loads(await asyncio.wait_for(ws.recv(), 5)))
        if msg[0] != 2:
            return msg
        await ws.send(json.dumps([4, msg[1], "NotSupported", "not in this test wallbox", {}]))


@pytest.mark.parametrize("version", ["1.6", "2.0.1"])
@fuzz(120)
@given(data=st.data())
async def test_every_frame_gets_the_specified_answer(rig: Rig, sockets: dict[str, ClientConnection],
                                                     version: str, data: st.DataObject) -> None:
    ws = sockets[version]
    batch = data.draw(st.lists(frames(version), min_size=1, max_size=4))
    bad = rig.bad()
    refused = 0
    for frame, uid, codes in batch:
        answer = await exchange(ws, frame)
        if codes is None:
            assert answer[0] in (3, 4) and answer[1] == uid, (frame, answer)
            if answer[0] == 4:  # valid by the schema, refused by the gateway for what it says
                assert answer[2] not in (FRAME[version], FORMAT[version], "TypeConstraintViolation",
                                         OCCURRENCE[version], "InternalError"), (frame, answer)
        else:
            assert answer[0] == 4 and answer[1] == uid[:36] and answer[2] in codes, (frame, codes, answer)
            assert isinstance(answer[3], str) and answer[3], answer  # a description says why
            refused += 1
    assert rig.bad() >= bad + refused  # every refusal counted
    hb = await exchange(ws, json.dumps([2, "hb", "Heartbeat", {}]))
    assert hb[0] == 3 and hb[1] == "hb", hb  # the connection survives
    assert rig.gw.ctx.counters.get("ocpp_internal_errors", 0) == 0  # type: ignore[attr-defined]
    assert rig.gw.ctx.counters.get("ocpp_handler_errors", 0) == 0  # type: ignore[attr-defined]


async def test_memory_stays_bounded(rig: Rig, sockets: dict[str, ClientConnection]) -> None:
    ws = sockets["1.6"]
    for i in range(1500):
        await ws.send(json.dumps([2, f"m{i}", "FooBar", {}]))
    for _ in range(1500):
        await asyncio.wait_for(ws.recv(), 5)
    big = largest(rig.gw)
    assert big[0][0] <= 1024, big

