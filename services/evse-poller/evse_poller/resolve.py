"""Host names of devices resolved without the event loop's default executor.

``loop.create_connection(host=...)`` resolves a name with ``getaddrinfo`` in the loop's default thread pool.
A name whose DNS server does not answer blocks that thread for the resolver's whole timeout (5-20 s), and
at shutdown ``asyncio.run`` waits for the pool: the poller then took 10-19 s to stop after SIGTERM (compose
and systemd kill it before it has written its last status). Here each lookup runs in a daemon thread (never
waited for at exit) with a timeout of its own, and one lookup per name is in flight at a time, so a silent
DNS server costs one thread per configured name, not one per attempt.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from typing import Any

_inflight: dict[tuple[str, int], asyncio.Future[str]] = {}


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def resolve(host: str, port: int, timeout_s: float) -> str:
    """The first stream address of ``host`` (as text); an IP address is returned as it is. Raises
    ``socket.gaierror`` (an OSError) when the name does not resolve and TimeoutError after ``timeout_s``."""
    if is_address(host):
        return host
    key = (host, port)
    fut = _inflight.get(key)
    if fut is None or fut.get_loop() is not asyncio.get_running_loop():
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        _inflight[key] = fut

        def lookup(f: asyncio.Future[str] = fut) -> None:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                result: Any = str(infos[0][4][0]) if infos else socket.gaierror(f"{host}: no address")
            except OSError as e:
                result = e
            try:
                loop.call_soon_threadsafe(_settle, key, f, result)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        threading.Thread(target=lookup, name=f"resolve {host}", daemon=True).start()
    async with asyncio.timeout(timeout_s):
        return await asyncio.shield(fut)


def _settle(key: tuple[str, int], fut: asyncio.Future[str], result: Any) -> None:
    if _inflight.get(key) is fut:
        del _inflight[key]
    if fut.done():
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
        fut.exception()  # retrieved: a lookup nobody waits for any more logs nothing at exit
    else:
        fut.set_result(result)
