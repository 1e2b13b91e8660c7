"""The OCPP wallbox simulator's schema checks, compiled (fastjsonschema) instead of the ``ocpp`` library's
interpreted jsonschema: the same verdict at a fraction of the CPU.

The library checks every message a simulated wallbox sends and receives (``ocpp.messages.validate_payload``,
a ``Draft4Validator`` over the library's own schema files, no format checks; the 1.6 messages with
``multipleOf`` on decimals). :func:`install` replaces the check the library's ``ChargePoint`` calls by
:func:`validate_payload`: the same schema file compiled to Python code (draft 4, the formats not checked, as
the library does; fastjsonschema's ``multipleOf`` works on the decimal of the number's ``repr``, as the
library's decimal round trip does). A payload it passes is valid; one it fails goes to the library's own
check, which raises the library's error (or, should the two ever disagree, decides). A 1.6 message with
``multipleOf`` keeps float numbers where the library would have handed Decimals to the handler (the
simulator's handlers take ``float()`` of them).

The simulators are the benchmark's lab equipment: 500 of them in one process spent their CPU mostly in
the library's checks while the system under test waited for their answers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import fastjsonschema
import ocpp
import ocpp.charge_point
import ocpp.messages
from ocpp.messages import Call, CallResult, MessageType

_DIR = Path(ocpp.__file__).parent


def _formats(schema: Any, out: set[str]) -> set[str]:
    if isinstance(schema, dict):
        if isinstance(schema.get("format"), str):
            out.add(schema["format"])
        for v in schema.values():
            _formats(v, out)
    elif isinstance(schema, list):
        for v in schema:
            _formats(v, out)
    return out


@lru_cache(maxsize=256)
def compiled(message_type_id: int, action: str, ocpp_version: str) -> Callable[[Any], Any] | None:
    """The compiled check of the library's schema for this message (None: no such schema file)."""
    if ocpp_version not in ("1.6", "2.0.1"):
        return None
    name = action
    if message_type_id == MessageType.CallResult:
        name += "Response"
    elif ocpp_version != "1.6":
        name += "Request"
    path = _DIR / ("v" + ocpp_version.replace(".", "")) / "schemas" / f"{name}.json"
    try:
        schema = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return None
    schema.pop("$id", None)
    # the library validates with Draft4Validator whatever the file says (2.0.1's say draft-06), without formats
    schema["$schema"] = "http://json-schema.org/draft-04/schema#"
    formats = {f: (lambda _v: True) for f in _formats(schema, set())}
    return fastjsonschema.compile(schema, formats=formats, use_default=False)


def passes(message: Call | CallResult, ocpp_version: str) -> bool:
    """Whether the compiled check passes the message (False also where there is none)."""
    if type(message) not in (Call, CallResult) or not message.action:
        return False
    check = compiled(message.message_type_id, message.action, ocpp_version)
    if check is None:
        return False
    try:
        check(message.payload)
    except Exception:  # JsonSchemaValueException, or anything odd: the library decides
        return False
    return True


async def validate_payload(message: Call | CallResult, ocpp_version: str) -> None:
    """``ocpp.messages.validate_payload``, compiled first; the library's own check where that fails."""
    if passes(message, ocpp_version):
        return
    ocpp.messages._validate_payload(message, ocpp_version)


_LIB_CAMEL_TO_SNAKE = ocpp.charge_point.camel_to_snake_case
_LIB_SNAKE_TO_CAMEL = ocpp.charge_point.snake_to_camel_case


@lru_cache(maxsize=4096)
def _snake_key(key: str) -> str:
    out = _LIB_CAMEL_TO_SNAKE({key: None})
    return str(next(iter(out)))


@lru_cache(maxsize=4096)
def _camel_key(key: str) -> str:
    out = _LIB_SNAKE_TO_CAMEL({key: None})
    return str(next(iter(out)))


def camel_to_snake_case(data: Any) -> Any:
    """The library's ``camel_to_snake_case`` (the same keys: each converted by the library once, then
    remembered; its regular expressions per key and message were a sixth of the simulators' CPU)."""
    if isinstance(data, dict):
        return {_snake_key(k): camel_to_snake_case(v) for k, v in data.items()}
    if isinstance(data, list):
        return [camel_to_snake_case(v) for v in data]
    return data


def snake_to_camel_case(data: Any) -> Any:
    """The library's ``snake_to_camel_case``, each key converted once and remembered."""
    if isinstance(data, dict):
        return {_camel_key(k): snake_to_camel_case(v) for k, v in data.items()}
    if isinstance(data, list):
        return [snake_to_camel_case(v) for v in data]
    return data


def install() -> None:
    """Make the library's ``ChargePoint`` (this process's) check messages with :func:`validate_payload` and
    convert keys with the remembering :func:`camel_to_snake_case` / :func:`snake_to_camel_case`."""
    ocpp.charge_point.validate_payload = validate_payload  # type: ignore[assignment]
    ocpp.charge_point.camel_to_snake_case = camel_to_snake_case  # type: ignore[assignment]
    ocpp.charge_point.snake_to_camel_case = snake_to_camel_case  # type: ignore[assignment]
