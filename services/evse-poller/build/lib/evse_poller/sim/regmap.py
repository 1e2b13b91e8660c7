"""A register map for a simulated device, served by pymodbus (``SimData``/``SimDevice``).

Each simulator lists its fields by hand from the vendor's document (table, address, type), with
a getter that reads the model and, for writable fields, a setter. This is deliberately separate
from the YAML profiles, so that the poller (driven by a profile) is checked against an
independent description of the device. Undefined addresses answer ILLEGAL ADDRESS; a write that
covers a field only partly, or a value the device refuses, is answered with an exception too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.simulator import DataType, SimData, SimDevice

from evse_poller.codec import CodecError, DType, decode, encode, width

Getter = Callable[[], int | float | str]
Setter = Callable[[int | float | str], bool]

TABLE_OF_FC = {1: "coil", 5: "coil", 15: "coil", 2: "discrete", 3: "holding", 6: "holding", 16: "holding",
               22: "holding", 23: "holding", 4: "input"}
TABLES = ("coil", "discrete", "holding", "input")
WRITE_FCS = frozenset({5, 6, 15, 16})


@dataclass
class Field:
    table: str
    address: int
    dtype: DType
    get: Getter
    set: Setter | None = None
    count: int | None = None  # registers of a string
    scale: float = 1.0  # register value = engineering value / scale
    word_order: str = "big"
    name: str = ""

    @property
    def width(self) -> int:
        return width(self.dtype, self.count)

    def words(self) -> list[int]:
        v = self.get()
        if self.dtype is DType.STRING:
            return encode(str(v), self.dtype, count=self.count)
        if self.dtype in (DType.FLOAT32, DType.FLOAT64):
            return encode(float(v) / self.scale, self.dtype, word_order=self.word_order)
        raw = round(float(v) / self.scale) if isinstance(v, float) or self.scale != 1 else int(v)
        return encode(raw, self.dtype, word_order=self.word_order)

    def value_of(self, words: list[int]) -> int | float | str:
        raw = decode(words, self.dtype, word_order=self.word_order)
        if isinstance(raw, str) or self.scale == 1:
            return raw
        return raw * self.scale


class RegisterMap:
    """The fields of one device (one unit id)."""

    def __init__(self) -> None:
        self.fields: dict[str, dict[int, Field]] = {t: {} for t in TABLES}
        self.on_request: Callable[[], None] | None = None
        self.before_read: Callable[[], None] | None = None
        self.silent = False  # a device that stopped answering (on a shared bus)
        self.max_read: int | None = None  # a device that refuses longer reads (exception 3, illegal value)
        self.functions: frozenset[int] | None = None  # the function codes the device supports (None: all)
        self.reads = 0
        self.writes = 0
        self._echo: dict[tuple[str, int], list[int]] = {}

    def add(self, f: Field) -> Field:
        table = self.fields[f.table]
        for a in range(f.address, f.address + f.width):
            for other in table.values():
                if other.address <= a < other.address + other.width:
                    raise ValueError(f"{f.table} {a}: {f.name} overlaps {other.name}")
        table[f.address] = f
        return f

    def field(self, table: str, address: int, dtype: DType | str, get: Getter, set: Setter | None = None, *,
              count: int | None = None, scale: float = 1.0, word_order: str = "big", name: str = "") -> Field:
        return self.add(Field(table, address, DType(dtype), get, set, count, scale, word_order,
                              name or f"{table}:{address}"))

    def constant(self, table: str, address: int, dtype: DType | str, value: int | float | str, *,
                 count: int | None = None, name: str = "") -> Field:
        return self.field(table, address, dtype, lambda: value, count=count, name=name)

    def filler(self, table: str, start: int, end: int, value: int = 0) -> None:
        """Define every still undefined register in [start, end] (reserved registers that read ``value``)."""
        for a in range(start, end + 1):
            if not any(f.address <= a < f.address + f.width for f in self.fields[table].values()):
                self.add(Field(table, a, DType.UINT16, lambda v=value: v, name=f"reserved {a}"))

    # -- requests ----------------------------------------------------------------------------
    def _covering(self, table: str, address: int) -> Field | None:
        t = self.fields[table]
        f = t.get(address)
        if f is not None:
            return f
        for f in t.values():
            if f.address <= address < f.address + f.width:
                return f
        return None

    def read(self, table: str, address: int, count: int) -> list[int] | ExcCodes:
        if self.on_request:
            self.on_request()
        if self.before_read:
            self.before_read()
        self.reads += 1
        if self.max_read is not None and count > self.max_read:
            return ExcCodes.ILLEGAL_VALUE
        out: list[int] = []
        a = address
        while a < address + count:
            f = self._covering(table, a)
            if f is None:
                return ExcCodes.ILLEGAL_ADDRESS
            try:
                words = f.words()
            except (CodecError, ValueError, OverflowError):
                return ExcCodes.DEVICE_FAILURE
            take = words[a - f.address: min(f.width, address + count - f.address)]
            out.extend(take)
            a += len(take)
        return out

    def write(self, table: str, address: int, values: list[int]) -> ExcCodes | None:
        if self.on_request:
            self.on_request()
        a = address
        end = address + len(values)
        pending: list[tuple[Field, int | float | str]] = []
        while a < end:
            f = self._covering(table, a)
            if f is None or f.set is None:
                return ExcCodes.ILLEGAL_ADDRESS
            if f.address != a or f.address + f.width > end:
                return ExcCodes.ILLEGAL_ADDRESS  # a multi-register value must be written whole
            try:
                value = f.value_of(values[a - address: a - address + f.width])
            except CodecError:
                return ExcCodes.ILLEGAL_VALUE
            if isinstance(value, float) and not math.isfinite(value):
                return ExcCodes.ILLEGAL_VALUE
            pending.append((f, value))
            a += f.width
        for f, value in pending:
            assert f.set is not None
            if not f.set(value):
                return ExcCodes.ILLEGAL_VALUE
        self.writes += 1
        return None

    # -- pymodbus ----------------------------------------------------------------------------
    def sim_device(self, device_id: int) -> SimDevice:
        """A pymodbus SimDevice whose every access goes through this map."""
        blocks: list[list[SimData]] = []
        for table in TABLES:
            entries = []
            for f in sorted(self.fields[table].values(), key=lambda f: f.address):
                for i in range(f.width):
                    entries.append(SimData(f.address + i, values=0, datatype=DataType.REGISTERS,
                                           readonly=f.set is None))
            if not entries:
                if table in ("coil", "discrete"):
                    # pymodbus needs one entry per table; bit blocks take bit values
                    entries.append(SimData(0, values=[False] * 16, datatype=DataType.BITS, readonly=True))
                else:
                    entries.append(SimData(0, datatype=DataType.INVALID))
            blocks.append(_merge(entries))

        async def action(function_code: int, start_address: int, address: int, count: int,
                         registers: list[int], set_values: list[int] | list[bool] | None) -> ExcCodes | None:
            table = TABLE_OF_FC.get(function_code)
            if table is None or (self.functions is not None and function_code not in self.functions):
                return ExcCodes.ILLEGAL_FUNCTION
            if self.silent:
                return ExcCodes.GATEWAY_NO_RESPONSE
            if set_values is None and function_code in WRITE_FCS:
                # pymodbus reads the registers back to build a write's answer: echo what was written
                # (a write-only register could not be read)
                echo = self._echo.get((table, address), [0] * count)
                registers[address - start_address: address - start_address + count] = echo[:count]
                return None
            if set_values is None:
                words = self.read(table, address, count)
                if isinstance(words, ExcCodes):
                    return words
                registers[address - start_address: address - start_address + count] = words
                return None
            written = [int(v) for v in set_values]
            self._echo[(table, address)] = written
            return self.write(table, address, written)

        return SimDevice(device_id, simdata=(blocks[0], blocks[1], blocks[2], blocks[3]), action=action)


def _merge(entries: list[SimData]) -> list[SimData]:
    """Merge runs of adjacent single registers with the same access into one SimData each."""
    out: list[SimData] = []
    for e in entries:
        last = out[-1] if out else None
        if (last is not None and e.datatype == DataType.REGISTERS and last.datatype == DataType.REGISTERS
                and last.readonly == e.readonly and last.address + last.count == e.address):
            last.count += 1
        else:
            out.append(e)
    return out


def describe(m: RegisterMap) -> dict[str, Any]:
    return {t: sorted((f.address, f.width, f.name) for f in fs.values()) for t, fs in m.fields.items() if fs}
