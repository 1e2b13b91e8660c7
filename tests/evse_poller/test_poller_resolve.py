"""Device host names: resolved without the loop's default executor, so that a DNS server that does not
answer neither delays a poll beyond its timeout nor the poller's stop (it took 10-19 s under compose).

A hanging DNS server cannot be made here without a network namespace: ``socket.getaddrinfo`` is replaced by
one that blocks, in the test process and in a child process started for the exit check."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from evse_poller import resolve as rs
from evse_poller.mbtcp import ModbusTcpClient


async def test_addresses_pass_and_names_resolve() -> None:
    assert await rs.resolve("127.0.0.1", 502, 1.0) == "127.0.0.1"
    assert await rs.resolve("::1", 502, 1.0) == "::1"
    assert await rs.resolve("localhost", 502, 5.0) in ("127.0.0.1", "::1")
    with pytest.raises(OSError):
        await rs.resolve("no-such-host.invalid", 502, 10.0)


async def test_a_silent_dns_server_costs_the_timeout_and_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    calls: list[str] = []

    def hanging(host: str, *a: object, **kw: object) -> list:  # type: ignore[type-arg]
        calls.append(host)
        release.wait(10)
        raise socket.gaierror("test: released")

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    t0 = time.monotonic()
    for _ in range(3):
        with pytest.raises(TimeoutError):
            await rs.resolve("wallbox.lan", 502, 0.2)
    assert time.monotonic() - t0 < 2.0
    assert calls == ["wallbox.lan"]  # one lookup in flight for the name, not one per attempt
    # the client's connect keeps its own timeout over the lookup
    client = ModbusTcpClient("wallbox.lan", 502, connect_timeout_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        await client.connect()
    assert time.monotonic() - t0 < 1.5
    release.set()
    for _ in range(100):
        if not rs._inflight:
            break
        await asyncio.sleep(0.02)
    assert not rs._inflight


def test_a_hanging_lookup_does_not_delay_the_exit() -> None:
    code = textwrap.dedent("""
        import asyncio, socket, time
        socket.getaddrinfo = lambda *a, **k: time.sleep(30)
        from evse_poller.resolve import resolve
        async def main():
            try:
                await resolve("wallbox.lan", 502, 0.2)
            except TimeoutError:
                print("timeout")
        asyncio.run(main())
    """)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0 and r.stdout.strip() == "timeout", r.stderr
    assert time.monotonic() - t0 < 5, "the process waited for the lookup's thread"
