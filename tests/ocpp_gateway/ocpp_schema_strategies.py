"""Hypothesis strategies built from the OCPP JSON schemas in ``schemas/`` (1.6J, 2.0.1).

``payloads(version, action, kind)`` draws schema-valid payloads: every required field, each optional
field present or absent, enums from their lists, strings up to their maxLength (with non-ASCII
characters), integers and numbers in their ranges, arrays within minItems/maxItems, date-times with
``Z`` or an offset and with or without fractions, and CustomData objects with vendor fields of their
own (2.0.1 allows any). Covers the keywords the OCPP schemas use (type, properties, required,
additionalProperties, $ref to definitions, enum, maxLength, minimum, maximum, minItems, maxItems,
items, format date-time / uri); anything else raises, so a schema that needs more is noticed.
(hypothesis-jsonschema 0.23.1 does not run with the pinned hypothesis.)
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from functools import cache
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

SCHEMAS = Path(__file__).parent / "schemas"
_KNOWN = {"$schema", "$id", "id", "title", "description", "comment", "javaType", "type", "properties", "required",
          "additionalProperties", "$ref", "definitions", "enum", "maxLength", "minimum", "maximum", "minItems",
          "maxItems", "items", "format", "additionalItems", "default", "tsEnumNames", "multipleOf"}
MAX_ITEMS = 3  # arrays without a smaller bound: at most this many items (keeps messages small)

# text as wallboxes and backends send it: printable ASCII most of the time, some non-ASCII (umlauts, CJK, emoji)
_CHARS = st.one_of(st.characters(min_codepoint=0x20, max_codepoint=0x7E),
                   st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")))


def schema_path(version: str, action: str, kind: str) -> Path:
    if version == "1.6":
        return SCHEMAS / "v16" / f"{action}{'Response' if kind == 'response' else ''}.json"
    return SCHEMAS / "v201" / f"{action}{'Response' if kind == 'response' else 'Request'}.json"


@cache
def load(version: str, action: str, kind: str) -> dict[str, Any]:
    return json.loads(schema_path(version, action, kind).read_text(encoding="utf-8-sig"))


def date_times() -> st.SearchStrategy[str]:
    """RFC 3339 date-times: Z or an offset, whole seconds or 1..6 digits of fraction."""
    base = datetime(2026, 1, 1, tzinfo=UTC)

    @st.composite
    def build(draw: Any) -> str:
        t = base + timedelta(seconds=draw(st.integers(-86400 * 400, 86400 * 400)),
                             microseconds=draw(st.integers(0, 999_999)))
        off = draw(st.sampled_from([None, 0, 60, 120, -300, 330]))
        digits = draw(st.sampled_from([0, 3, 6, 1]))
        local = t if off is None else t.astimezone(timezone(timedelta(minutes=off)))
        text = local.strftime("%Y-%m-%dT%H:%M:%S")
        if digits:
            text += "." + local.strftime("%f")[:digits]
        if off is None:
            return text + "Z"
        sign = "+" if off >= 0 else "-"
        return text + f"{sign}{abs(off) // 60:02d}:{abs(off) % 60:02d}"

    return build()


ANY_JSON: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(_CHARS, max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(_CHARS, max_size=6), inner, max_size=3),
    max_leaves=8)


def _resolve(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/definitions/"), ref
        node = root["definitions"][ref.split("/")[-1]]
    return node


def strategy(node: dict[str, Any], root: dict[str, Any]) -> st.SearchStrategy[Any]:
    node = _resolve(node, root)
    unknown = set(node) - _KNOWN
    if unknown:
        raise NotImplementedError(f"schema keywords not covered: {sorted(unknown)}")
    if "enum" in node:
        return st.sampled_from(node["enum"])
    t = node.get("type")
    if t == "object":
        return _object(node, root)
    if t == "array":
        lo = int(node.get("minItems", 0))
        hi = int(node.get("maxItems", max(lo, MAX_ITEMS)))
        return st.lists(strategy(node["items"], root), min_size=lo, max_size=min(hi, max(lo, MAX_ITEMS)))
    if t == "string":
        fmt = node.get("format")
        if fmt == "date-time":
            return date_times()
        if fmt == "uri":
            return st.builds(lambda s: f"https://files.example.test/{s}",
                             st.text(st.sampled_from("abcdefghij0123456789-_"), max_size=20))
        assert fmt is None, fmt
        return st.text(_CHARS, max_size=int(node.get("maxLength", 40)))
    if t == "integer":
        lo = int(node.get("minimum", -(2**31)))
        hi = int(node.get("maximum", 2**31 - 1))
        return st.one_of(st.integers(max(lo, -5), min(hi, 100)), st.integers(lo, hi))
    if t == "number":
        lo = node.get("minimum", -1e9)
        hi = node.get("maximum", 1e9)
        if "multipleOf" in node:
            assert float(node["multipleOf"]) == 0.1, node["multipleOf"]
            return st.integers(int(lo * 10), int(hi * 10)).map(lambda k: k / 10)
        return st.one_of(st.integers(int(lo), int(hi)),
                         st.floats(lo, hi, allow_nan=False, allow_infinity=False),
                         st.decimals(lo, hi, places=3, allow_nan=False, allow_infinity=False).map(float))
    if t == "boolean":
        return st.booleans()
    if t is None and set(node) <= {"description", "javaType"}:  # any JSON (DataTransfer data)
        return ANY_JSON
    raise NotImplementedError(f"schema type {t!r}")


def _object(node: dict[str, Any], root: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    props: dict[str, Any] = node.get("properties", {})
    required = list(node.get("required", []))
    extra_ok = node.get("additionalProperties", True) is not False and set(props) == {"vendorId"}

    @st.composite
    def build(draw: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in props:
            if k in required or draw(st.booleans()):
                out[k] = draw(strategy(props[k], root))
        if extra_ok and draw(st.booleans()):  # CustomData: a vendor's own fields
            out["vendorField"] = draw(st.one_of(st.integers(), st.text(_CHARS, max_size=10),
                                                st.lists(st.booleans(), max_size=2)))
        return out

    return build()


def payloads(version: str, action: str, kind: str = "request") -> st.SearchStrategy[dict[str, Any]]:
    root = load(version, action, kind)
    return strategy(root, root)
