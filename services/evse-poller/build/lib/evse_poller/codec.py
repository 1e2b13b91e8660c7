"""Register value encoding and decoding (pure, no I/O).

Modbus moves 16-bit registers. Wider values span several registers; vendors disagree about the
order of the registers (``word_order``) and, rarely, about the order of the two bytes inside a
register (``byte_order``). Everything here works on lists of register values (0..65535).
"""

from __future__ import annotations

import math
import struct
from enum import StrEnum


class DType(StrEnum):
    UINT16 = "uint16"
    INT16 = "int16"
    UINT32 = "uint32"
    INT32 = "int32"
    UINT64 = "uint64"
    INT64 = "int64"
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    STRING = "string"  # ASCII, two characters per register, NUL/space padded
    SUNSSF = "sunssf"  # SunSpec scale factor: int16 power of ten
    ACC32 = "acc32"  # SunSpec accumulator: uint32


_STRUCT: dict[DType, tuple[str, int]] = {
    DType.UINT16: ("H", 1),
    DType.INT16: ("h", 1),
    DType.SUNSSF: ("h", 1),
    DType.UINT32: ("I", 2),
    DType.ACC32: ("I", 2),
    DType.INT32: ("i", 2),
    DType.UINT64: ("Q", 4),
    DType.INT64: ("q", 4),
    DType.FLOAT32: ("f", 2),
    DType.FLOAT64: ("d", 4),
}

INTEGER_TYPES = frozenset({DType.UINT16, DType.INT16, DType.UINT32, DType.INT32, DType.UINT64, DType.INT64,
                           DType.SUNSSF, DType.ACC32})


class CodecError(ValueError):
    """A value that cannot be decoded or encoded."""


def width(dtype: DType, count: int | None = None) -> int:
    """Number of registers a value of ``dtype`` occupies (``count`` for strings)."""
    if dtype is DType.STRING:
        if not count or count < 1:
            raise CodecError("a string register needs a count")
        return count
    return _STRUCT[dtype][1]


_UNPACK = {dtype: struct.Struct(">" + fmt) for dtype, (fmt, _n) in _STRUCT.items()}


def _ordered_bytes(words: list[int], byte_order: str, word_order: str) -> bytes:
    if word_order == "little":
        words = words[::-1]
    for w in words:
        if not 0 <= w <= 0xFFFF:
            raise CodecError(f"register value {w} is not 16 bit")
    # each register high byte first ("big") or low byte first ("little")
    return struct.pack(f"{'<' if byte_order == 'little' else '>'}{len(words)}H", *words)


def _words_from_bytes(data: bytes, byte_order: str, word_order: str) -> list[int]:
    words = []
    for i in range(0, len(data), 2):
        a, b = data[i], data[i + 1]
        words.append((b << 8 | a) if byte_order == "little" else (a << 8 | b))
    if word_order == "little":
        words.reverse()
    return words


def decode(words: list[int], dtype: DType, *, byte_order: str = "big", word_order: str = "big") -> int | float | str:
    """Registers -> the raw value (before scaling)."""
    n = len(words)
    if dtype is DType.STRING:
        # strings are a sequence of characters, never word-swapped
        data = _ordered_bytes(words, byte_order, "big")
        text = data.split(b"\x00", 1)[0]
        try:
            return text.decode("ascii").strip()
        except UnicodeDecodeError as e:
            raise CodecError(f"string register holds non-ASCII bytes: {data!r}") from e
    size = _STRUCT[dtype][1]
    if n != size:
        raise CodecError(f"{dtype} needs {size} registers, got {n}")
    value: int | float = _UNPACK[dtype].unpack(_ordered_bytes(words, byte_order, word_order))[0]
    return value


def encode(value: int | float | str, dtype: DType, *, count: int | None = None, byte_order: str = "big",
           word_order: str = "big") -> list[int]:
    """A raw value -> registers. Integers must fit the type; floats are packed as IEEE 754."""
    if dtype is DType.STRING:
        n = width(dtype, count)
        data = str(value).encode("ascii")
        if len(data) > 2 * n:
            raise CodecError(f"string {value!r} does not fit {n} registers")
        data = data.ljust(2 * n, b"\x00")
        return _words_from_bytes(data, byte_order, "big")
    fmt, _ = _STRUCT[dtype]
    if dtype in INTEGER_TYPES:
        if isinstance(value, float):
            if not math.isfinite(value) or value != int(value):
                raise CodecError(f"{dtype} needs an integer, got {value!r}")
            value = int(value)
        if not isinstance(value, int):
            raise CodecError(f"{dtype} needs an integer, got {value!r}")
    try:
        data = struct.pack(">" + fmt, value)
    except struct.error as e:
        raise CodecError(f"{value!r} does not fit {dtype}: {e}") from None
    return _words_from_bytes(data, byte_order, word_order)
