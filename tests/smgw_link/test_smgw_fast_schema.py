"""The compiled CLS.EEDI schema check (fastjsonschema, ``messages.fast_message_validator``) against the
reference validator (jsonschema): whatever the fast one passes, the reference passes too (its "valid" is
final in ``schema_errors``); every fixture and every message smgw-link builds passes both; a refused
message still gets the reference validator's violations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from fuzz_support import HOSTILE_PAYLOADS, fuzz, json_values, mutated
from smgw_link.clseedi import messages as m

FIXTURES = Path(__file__).parent / "fixtures"
ALL = sorted(p for p in FIXTURES.glob("*.json"))


def reference_errors(msg: Any) -> list[str]:
    return [e.message for e in m.message_validator().iter_errors(msg)]


def fast_passes(msg: Any) -> bool:
    try:
        m.fast_message_validator()(msg)
    except Exception:
        return False
    return True


def test_fixtures_and_built_messages_agree() -> None:
    built = [m.ack("dev", "rel-1", m.OK), m.ack("dev", None, m.SCHEMA_ERROR), m.read("dev"),
             m.read("dev", ["limits"]),
             m.envelope(m.STATE, "dev", {"protocol": m.PROTOCOL, "timestamp": 1796644800,
                                         "measurements": [m.measurement_set("grid", "meter", power_w=1200.0,
                                                                            current_a=[1.0, 2.0, 3.0],
                                                                            voltage_v=[230.0, 231.0, 229.0])]})]
    docs = [json.loads(p.read_text()) for p in ALL] + built
    assert len(docs) > 5
    for doc in docs:
        ref = reference_errors(doc)
        assert fast_passes(doc) == (not ref), (doc, ref)
    for doc in built:
        assert fast_passes(doc)  # what smgw-link sends takes the fast path


def test_a_refused_message_gets_the_reference_violations() -> None:
    doc = json.loads(ALL[0].read_text())
    doc["specversion"] = "2.0"
    assert not fast_passes(doc)
    assert m.schema_errors(doc) == ["specversion: '2.0' is not one of ['1.0']"]


def _templates() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in ALL]


@fuzz(400)
@given(st.data())
def test_fast_never_passes_what_the_reference_refuses(data: st.DataObject) -> None:
    doc_text = data.draw(st.one_of(st.sampled_from(_templates()).flatmap(lambda t: mutated(t, max_changes=4)),
                                   st.sampled_from(HOSTILE_PAYLOADS),
                                   json_values.map(lambda v: json.dumps(v).encode())))
    try:
        doc = json.loads(doc_text)
    except (ValueError, RecursionError):
        return
    if fast_passes(doc):
        assert reference_errors(doc) == [], doc
    # what smgw-link answers is the reference validator's verdict and wording, fast path or not
    assert m.schema_errors(doc) == reference_schema_errors(doc)


def reference_schema_errors(msg: Any, limit: int = 5) -> list[str]:
    """``schema_errors`` as it was before the fast path: the reference validator alone."""
    out = []
    for err in sorted(m.message_validator().iter_errors(msg), key=lambda e: list(e.absolute_path)):
        path = "/".join(str(x) for x in err.absolute_path) or "(message)"
        out.append(f"{path}: {err.message[:200]}")
        if len(out) >= limit:
            break
    return out
