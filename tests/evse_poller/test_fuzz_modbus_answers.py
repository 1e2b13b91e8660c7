"""Fuzz of Modbus answers (issue 14): a Modbus TCP server that answers every request of every device
profile with drawn words, exception codes, short or overlong byte counts, wrong function codes or junk,
over a real socket. The poller never raises out of a poll, never publishes a number that is not finite or
outside the payload's range, flags what it cannot trust, and keeps polling the others."""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chargegate import config as cfgmod
from chargegate.broker import free_port
from evse_poller.poller import MemoryPublisher, Poller
from evse_poller.profile import available, load_profile
from fuzz_support import fuzz

PROFILES = [n for n in available() if load_profile(n).transport.type != "http"]


class FuzzServer:
    """Answers each request from ``self.plan``: (mode, words) - mode ok | exception | short | long | wrong_fc |
    junk | silent. Words are cycled to the quantity asked for."""

    def __init__(self) -> None:
        self.plan: tuple[str, list[int]] = ("ok", [0])
        self.server: asyncio.Server | None = None
        self.port = free_port()
        self.requests = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readexactly(7)
                tid, _pid, length, unit = struct.unpack(">HHHB", head)
                pdu = await reader.readexactly(length - 1)
                self.requests += 1
                answer = self._answer(pdu)
                if answer is None:
                    continue
                writer.write(struct.pack(">HHHB", tid, 0, len(answer) + 1, unit) + answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _answer(self, pdu: bytes) -> bytes | None:
        mode, words = self.plan
        fc = pdu[0]
        if mode == "silent":
            return None
        if mode == "exception":
            return bytes([fc | 0x80, (words[0] % 12) or 1])
        if mode == "junk":
            return bytes(w & 0xFF for w in words[:8]) or b"\x00"
        if fc in (3, 4):
            qty = struct.unpack(">H", pdu[3:5])[0]
            data = b"".join(struct.pack(">H", words[i % len(words)] & 0xFFFF) for i in range(qty))
            if mode == "short":
                data = data[: max(0, len(data) - 2)]
            elif mode == "long":
                data += b"\x00\x01"
            return bytes([fc + (1 if mode == "wrong_fc" else 0), len(data) & 0xFF]) + data
        if fc in (6, 16):
            return pdu[:5]
        return bytes([fc | 0x80, 1])


@pytest.fixture(scope="module")
async def rig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[FuzzServer, Poller, MemoryPublisher]]:
    tmp: Path = tmp_path_factory.mktemp("modbus-fuzz")
    srv = FuzzServer()
    await srv.start()
    evses, meters = [], []
    for i, n in enumerate(PROFILES):
        dev = (f"modbus: {{profile: {n}, transport: tcp, host: 127.0.0.1, port: {srv.port}, device_id: {i + 1},"
               f" timeout_s: 0.2, retries: 0}}")
        if load_profile(n).kind == "evse":
            evses.append(f"  - {{id: e{i}, circuit: grid, max_current_a: 16, safe_current_a: 6, {dev}}}")
        else:
            meters.append(f"  - {{id: m{i}, role: other, {dev}}}")
    text = f"""
site: {{name: modbus-fuzz}}
state_dir: {tmp / 'state'}
poller: {{poll_interval_s: 1, offline_after_failures: 2, reconnect_backoff_max_s: 0.1, watchdog_timeout_s: 15}}
circuits:
  - {{id: grid, fuse_a: 63}}
evses:
{chr(10).join(evses)}
meters:
{chr(10).join(meters)}
"""
    path = tmp / "chargegate.yaml"
    path.write_text(text)
    cfg = cfgmod.load(path)
    pub = MemoryPublisher()
    poller = Poller(cfg, pub)
    try:
        yield srv, poller, pub
    finally:
        await poller.stop()
        await srv.stop()


def numbers(obj: Any) -> list[float]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, int | float):
        return [float(obj)]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in numbers(v)]
    if isinstance(obj, list | tuple):
        return [x for v in obj for x in numbers(v)]
    return []


WORDS = st.lists(st.one_of(st.integers(0, 0xFFFF), st.sampled_from([0, 1, 0x7FFF, 0x8000, 0xFFFF, 0x7F80, 0xFFC0])),
                 min_size=1, max_size=12)


@fuzz(25)
@given(mode=st.sampled_from(["ok", "ok", "ok", "exception", "short", "long", "wrong_fc", "junk", "silent"]),
       words=WORDS)
async def test_any_answer_of_any_device(rig: tuple[FuzzServer, Poller, MemoryPublisher], mode: str,
                                        words: list[int]) -> None:
    srv, poller, pub = rig
    srv.plan = (mode, words)
    pub.statuses.clear()
    pub.readings.clear()
    await asyncio.wait_for(poller.poll_once(), 30)  # never raises, never hangs
    for st_ in pub.statuses.values():
        doc = st_.model_dump(mode="json")
        assert all(math.isfinite(x) for x in numbers(doc)), doc
        assert all(0 <= a <= 100 for a in st_.current_a), doc  # the payload's range, never a wild number
        if st_.power_w is not None:
            assert -1e6 <= st_.power_w <= 1e6, doc
        if not st_.online:
            assert st_.reason, doc  # offline says why
    for r in pub.readings.values():
        doc = r.model_dump(mode="json")
        assert all(math.isfinite(x) for x in numbers(doc)), doc


async def test_the_poller_still_reads_a_good_answer(rig: tuple[FuzzServer, Poller, MemoryPublisher]) -> None:
    srv, poller, pub = rig
    srv.plan = ("ok", [0])
    for _ in range(4):
        await poller.poll_once()
    assert srv.requests > 0
    assert pub.statuses and any(s.online for s in pub.statuses.values()), {k: s.reason for k, s in pub.statuses.items()}
