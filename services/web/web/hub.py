"""The live stream: every open page gets the sections that changed, as Server-Sent Events.

Sections are rendered once per audience (who may set modes, who is logged in), not per client. A client
whose queue is full (a page that stopped reading) is dropped: it reconnects by itself when it reads again.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from web.render import Audience

QUEUE_MAX = 64
KEEPALIVE_S = 15.0


@dataclass(eq=False)
class Client:
    audience: Audience
    session_id: str | None
    queue: asyncio.Queue[str | None] = field(default_factory=lambda: asyncio.Queue(QUEUE_MAX))
    closed: bool = False

    def push(self, event: str) -> bool:
        try:
            self.queue.put_nowait(event)
            return True
        except asyncio.QueueFull:
            return False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            while True:  # make room for the end marker
                try:
                    self.queue.put_nowait(None)
                    break
                except asyncio.QueueFull:
                    self.queue.get_nowait()


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class Hub:
    def __init__(self, limit: int, counters: Any) -> None:
        self.limit = limit
        self.clients: set[Client] = set()
        self.counters = counters

    def add(self, audience: Audience, session_id: str | None) -> Client | None:
        if len(self.clients) >= self.limit:
            self.counters["sse_refused"] += 1
            return None
        c = Client(Audience(audience.logged_in, audience.can_set, audience.user), session_id)
        self.clients.add(c)
        self.counters["sse_connects"] += 1
        return c

    def remove(self, c: Client) -> None:
        self.clients.discard(c)
        c.close()

    def audiences(self) -> set[Audience]:
        return {c.audience for c in self.clients}

    def send(self, event_for: Callable[[Audience], str | None]) -> None:
        """``event_for(audience)`` -> the event text for that audience (None: nothing for it)."""
        cache: dict[Audience, str | None] = {}
        for c in list(self.clients):
            if c.audience not in cache:
                cache[c.audience] = event_for(c.audience)
            ev = cache[c.audience]
            if ev is not None and not c.push(ev):
                self.counters["sse_dropped_slow"] += 1
                self.remove(c)

    def end_session(self, session_id: str) -> None:
        for c in list(self.clients):
            if c.session_id == session_id:
                self.remove(c)

    def close_all(self) -> None:
        for c in list(self.clients):
            self.remove(c)


async def stream(hub: Hub, client: Client, first: str) -> AsyncIterator[str]:
    """The event stream of one page: ``first`` (the state now), then what the hub sends; a comment every
    ``KEEPALIVE_S`` keeps proxies from closing an idle stream."""
    try:
        yield "retry: 2000\n\n" + first
        while True:
            try:
                ev = await asyncio.wait_for(client.queue.get(), KEEPALIVE_S)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if ev is None:
                return
            yield ev
    finally:
        hub.remove(client)
