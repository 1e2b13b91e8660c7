"""CLS.EEDI 1.x messages: validation against the official schemas (copied unchanged into
``schemas/``), envelopes, and conversion of bus readings into ``state`` measurements.

A message is checked by the schema compiled with fastjsonschema; only one that it refuses goes to the reference
validator (jsonschema with referencing, rpds and attrs: about 4 MB and 50 modules), which words the violations.
That is imported then, not with this module (bench/footprint).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

import fastjsonschema

if TYPE_CHECKING:
    from jsonschema import Draft7Validator
    from referencing import Registry

PROTOCOL = "1.0.0"
MAJOR = "1"
SPECVERSION = "1.0"
PREFIX = "de.keo-connectivity.clseedi."
CONTROL, STATE, READ, ACK = (PREFIX + t for t in ("control", "state", "read", "ack"))
TYPES = (CONTROL, STATE, READ, ACK)
STATE_PROPERTIES = ("trust", "limits", "failsafes", "supportedEebusUseCases", "measurements", "notify")
CONTROL_PROPERTIES = ("limits", "failsafes", "trust", "notify")

# errorNumber values (spec, section Acknowledgement)
OK, SCHEMA_ERROR, PROTOCOL_ERROR, EXECUTION_ERROR, NOT_SUPPORTED = 0, 1, 2, 3, 4

_FILES = {
    "file:message.schema.json": "message.schema.json",
    "file:definitions.schema.json": "definitions.schema.json",
    **{f"file:clseedi/{PREFIX}{t}.schema.json": f"clseedi/{PREFIX}{t}.schema.json"
       for t in ("control", "state", "read", "ack")},
}


def _load(rel: str) -> dict[str, Any]:
    base = resources.files("smgw_link.clseedi") / "schemas"
    for part in rel.split("/"):
        base = base / part
    data: dict[str, Any] = json.loads(base.read_text())
    return data


@cache
def _registry() -> Registry:
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT7

    reg: Registry = Registry()
    for uri, rel in _FILES.items():
        res = Resource.from_contents(_load(rel), default_specification=DRAFT7)
        # urldefrag() turns "file:x.json#/p" into "file:///x.json": register both spellings
        # and a "file:x.json" reference inside file:///clseedi/y.json means file:///clseedi/x.json
        uris = [uri, "file:///" + uri[len("file:"):], "file:///clseedi/" + uri[len("file:"):]]
        reg = reg.with_resources([(u, res) for u in uris])
    return reg


@cache
def message_validator() -> Draft7Validator:
    """The official message schema (draft-07) with its ``file:`` references resolved locally (imported here:
    only a message the compiled check refuses needs it)."""
    from jsonschema import Draft7Validator

    return Draft7Validator(_load("message.schema.json"), registry=_registry())


def _inlined(node: Any, seen: tuple[str, ...] = ()) -> Any:
    """``node`` with every ``file:`` reference replaced by what it points to and no ``$id`` (the references
    are resolved here, as :func:`_registry` resolves them for the reference validator)."""
    if isinstance(node, list):
        return [_inlined(x, seen) for x in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("file:"):
        if ref in seen:
            raise ValueError(f"recursive schema reference {ref}")
        rel, _, pointer = ref[len("file:"):].partition("#")
        target: Any = _load(rel)
        for part in [p for p in pointer.split("/") if p]:
            target = target[part]
        # draft-07: keywords beside a $ref are ignored (so does the reference validator)
        return _inlined(target, (*seen, ref))
    return {k: _inlined(v, seen) for k, v in node.items() if k not in ("$id", "$schema")}


@cache
def fast_message_validator() -> Callable[[Any], Any]:
    """The message schema compiled to Python code (fastjsonschema, its references inlined): about ten times
    faster than the reference validator on a control message. Its "valid" is final, its "invalid" is not:
    :func:`schema_errors` then asks the reference validator, which names the violations (and decides);
    tests/smgw_link/test_smgw_fast_schema.py checks that it never passes what the reference refuses."""
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", **_inlined(_load("message.schema.json"))}
    return fastjsonschema.compile(schema, use_default=False)


def _passes(msg: Any) -> bool:
    try:
        fast_message_validator()(msg)
    except Exception:  # JsonSchemaValueException, or anything odd: the reference validator decides
        return False
    return True


def schema_errors(msg: Any, limit: int = 5) -> list[str]:
    """Schema violations of a whole message (envelope and ``data``), as readable strings."""
    if _passes(msg):
        return []
    out = []
    for err in sorted(message_validator().iter_errors(msg), key=lambda e: list(e.absolute_path)):
        path = "/".join(str(x) for x in err.absolute_path) or "(message)"
        out.append(f"{path}: {err.message[:200]}")
        if len(out) >= limit:
            break
    return out


def envelope(type_: str, source: str, data: dict[str, Any], relation: str | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": type_, "source": source, "id": str(uuid.uuid4()), "specversion": SPECVERSION}
    if relation is not None:
        msg["relation"] = relation
    msg["data"] = data
    return msg


def ack(source: str, relation: str | None, error_number: int) -> dict[str, Any]:
    return envelope(ACK, source, {"protocol": PROTOCOL, "errorNumber": error_number}, relation)


def read(source: str, parameters: list[str] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"protocol": PROTOCOL}
    if parameters is not None:
        data["parameters"] = parameters
    return envelope(READ, source, data)


def major(protocol: str) -> str:
    return protocol.strip().split(".", 1)[0]


# -- measurements ----------------------------------------------------------------------------------
def scaled(value: float, scale: int) -> dict[str, Any]:
    """A CLS.EEDI scaled number: value = number * 10^scale."""
    return {"value": {"number": round(value / (10 ** scale)), "scale": scale}}


def measurement_set(id_: str, source: str, *, id_type: str | None = None, power_w: float | None = None,
                    power_phase_w: list[float] | None = None, current_a: list[float] | None = None,
                    voltage_v: list[float] | None = None, energy_consumed_wh: float | None = None,
                    energy_produced_wh: float | None = None, frequency_hz: float | None = None) -> dict[str, Any]:
    m: dict[str, Any] = {"id": id_[:256], "source": source}
    if id_type:
        m["idType"] = id_type
    if frequency_hz is not None:
        m["frequency"] = scaled(frequency_hz, -2)
    energy = {}
    if energy_consumed_wh is not None:
        energy["consumed"] = scaled(energy_consumed_wh, 0)
    if energy_produced_wh is not None:
        energy["produced"] = scaled(energy_produced_wh, 0)
    if energy:
        m["energy"] = energy
    if voltage_v is not None:
        m["voltage"] = {k: scaled(v, -1) for k, v in zip(("a-n", "b-n", "c-n"), voltage_v, strict=True)}
    if current_a is not None:
        m["current"] = {k: scaled(v, -2) for k, v in zip("abc", current_a, strict=True)}
    power: dict[str, Any] = {}
    if power_w is not None:
        power["total"] = scaled(power_w, 0)
    if power_phase_w is not None:
        power["phases"] = {k: scaled(v, 0) for k, v in zip("abc", power_phase_w, strict=True)}
    if power:
        m["power"] = power
    return m
