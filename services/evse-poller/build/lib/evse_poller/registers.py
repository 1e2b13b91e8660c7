"""Read planning and value extraction for a profile's registers (pure, no I/O)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from evse_poller.codec import INTEGER_TYPES, CodecError, DType, decode, encode
from evse_poller.profile import Profile, Register, Table

Value = float | int | str | None


@dataclass(frozen=True)
class ReadBlock:
    table: Table
    address: int
    count: int
    names: tuple[str, ...]


def plan_reads(profile: Profile, names: list[str], offset: int = 0) -> list[ReadBlock]:
    """Group the registers ``names`` into as few reads as the profile allows.

    Registers of one table are merged when they are adjacent, or separated by at most
    ``read.max_gap`` unused registers, and the read stays within ``read.max_registers``.
    ``offset`` is added to every address (SunSpec model start).
    """
    opts = profile.read
    by_table: dict[str, list[tuple[int, int, str]]] = {}
    for n in dict.fromkeys(names):
        r = profile.registers[n]
        by_table.setdefault(r.table, []).append((r.address + offset, r.width, n))
    blocks: list[ReadBlock] = []
    for table, items in by_table.items():
        items.sort()
        start, end, members = items[0][0], items[0][0] + items[0][1], [items[0][2]]
        for addr, w, n in items[1:]:
            new_end = max(end, addr + w)
            if addr - end <= opts.max_gap and new_end - start <= opts.max_registers:
                end = new_end
                members.append(n)
            else:
                blocks.append(ReadBlock(table, start, end - start, tuple(members)))  # type: ignore[arg-type]
                start, end, members = addr, addr + w, [n]
        blocks.append(ReadBlock(table, start, end - start, tuple(members)))  # type: ignore[arg-type]
    for b in blocks:
        if b.count > opts.max_registers:
            raise ValueError(f"register group at {b.address} needs {b.count} registers, more than max_registers")
    return blocks


def raw_value(profile: Profile, reg: Register, words: list[int]) -> int | float | str | None:
    """Decode the registers of one value; ``None`` for an 'unavailable' marker or NaN."""
    if reg.unavailable:
        bits = 0
        for w in words:
            bits = (bits << 16) | w
        if bits in reg.unavailable:
            return None
    bo, wo = profile.order(reg)
    value = decode(words, reg.type, byte_order=bo, word_order=wo)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if reg.mask is not None and isinstance(value, int):
        value &= reg.mask
    return value


def extract(profile: Profile, blocks: dict[tuple[Table, int], list[int]], read_blocks: list[ReadBlock],
            offset: int = 0) -> tuple[dict[str, Value], list[str]]:
    """Values of every register in ``read_blocks`` from the words read. Returns (values, errors).

    Numbers are scaled to engineering units (``scale`` and SunSpec scale factors); strings and
    state codes are returned raw. A value that cannot be decoded is ``None`` with an error.
    """
    raw: dict[str, int | float | str | None] = {}
    errors: list[str] = []
    registers = profile.registers
    for b in read_blocks:
        data = blocks.get((b.table, b.address))
        for n in b.names:
            reg = registers[n]
            # every register of a block lies within it (plan_reads); a block not read leaves its values None
            i = reg.address + offset - b.address
            w = reg.width
            words = data[i:i + w] if data is not None and i >= 0 else None
            if words is None or len(words) != w:
                raw[n] = None
                continue
            try:
                raw[n] = raw_value(profile, reg, words)
            except CodecError as e:
                raw[n] = None
                errors.append(f"{n}: {e}")
    values: dict[str, Value] = {}
    for n, v in raw.items():
        reg = profile.registers[n]
        if v is None or isinstance(v, str) or reg.type is DType.SUNSSF:
            values[n] = v
            continue
        factor = reg.scale
        if reg.scale_register is not None:
            sf = raw.get(reg.scale_register)
            if not isinstance(sf, int) or not -10 <= sf <= 10:
                values[n] = None
                errors.append(f"{n}: scale factor {reg.scale_register} is {sf!r}")
                continue
            factor *= 10.0**sf
        values[n] = v * factor if factor != 1 else v
    return values, errors


def to_raw(reg: Register, value: float, *, round_down: bool = True) -> int:
    """An engineering value -> the raw integer written to ``reg`` (rounded down by default, so a
    current limit is never rounded above what was allowed)."""
    x = value / reg.scale
    n = math.floor(x + 1e-6) if round_down else round(x)
    return int(n)


def encode_value(profile: Profile, reg: Register, value: float | int) -> list[int]:
    """The registers to write for an engineering ``value`` (floats stay floats for float types)."""
    bo, wo = profile.order(reg)
    if reg.type in INTEGER_TYPES:
        return encode(to_raw(reg, float(value)), reg.type, byte_order=bo, word_order=wo)
    return encode(float(value) / reg.scale, reg.type, byte_order=bo, word_order=wo)


def encode_raw(profile: Profile, reg: Register, raw: int) -> list[int]:
    bo, wo = profile.order(reg)
    return encode(raw, reg.type, byte_order=bo, word_order=wo)
