"""A JSON reader for input from outside that never raises anything but :class:`ValueError`.

Python's ``json.loads`` takes ``NaN``, ``Infinity`` and ``1e999`` (as infinity), raises
``ValueError`` from deep inside for a 5000-digit integer and ``RecursionError`` for a document
nested 100,000 deep. Here each of those is a ``ValueError`` that says what was wrong, so that the
caller's one warning and count covers every bad payload.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_INT_DIGITS = 16  # 2**53 has 16 digits: a longer integer is no quantity of this system
MAX_DEPTH = 64


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"number {text[:40]} is out of range")
    if x == 0.0 and math.copysign(1.0, x) < 0:
        raise ValueError(f"negative zero {text[:40]}: send 0")
    return x


def _int(text: str) -> int:
    digits = text.lstrip("-")
    if len(digits) > MAX_INT_DIGITS:
        raise ValueError(f"integer with {len(digits)} digits is out of range")
    if text.startswith("-") and digits.strip("0") == "":
        raise ValueError("negative zero -0: send 0")
    return int(text)


def _depth_ok(data: str) -> bool:
    """Nesting depth at most ``MAX_DEPTH`` (a cheap scan: brackets inside strings count too, which
    only ever errs on the strict side for text no payload of ours has)."""
    if data.count("[") + data.count("{") <= MAX_DEPTH:
        return True
    depth = 0
    for ch in data:
        if ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return False
        elif ch in "]}":
            depth -= 1
    return True


# one decoder for every call (``json.loads`` with hooks builds a new one each time); it keeps no state per document
_DECODER = json.JSONDecoder(parse_constant=_constant, parse_float=_float, parse_int=_int)


def loads(data: bytes | bytearray | str) -> Any:
    """Parse ``data``; every problem is a ``ValueError`` with a message naming it."""
    if isinstance(data, bytes | bytearray):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"payload is not JSON (not UTF-8 text): {e}") from None
    else:
        text = data
    if not _depth_ok(text):
        raise ValueError(f"payload is nested more than {MAX_DEPTH} levels deep")
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"payload is not JSON: {e}") from None
    except RecursionError:
        raise ValueError("payload is nested too deeply") from None
