"""Bounded memory and bounded log lines against unknown peers.

:class:`Lru` is a dict of fixed size that forgets its least recently used key: the one shape for every
structure keyed by what a peer sends (a charge box id, a peer address, an error text), so that 20,000
peers with distinct ids cost what 1024 do.

:class:`LogLimiter` is the one rate limit for log lines:

* per key (``refuse:<id>:404``, ``decode:<error>``) at most one line per ``interval_s`` (60 s; ``math.inf``:
  once while the key is remembered),
* per event (the message text) at most ``per_event`` lines per ``window_s`` (60 s), whatever the number of
  keys: 20,000 unknown charge box ids make three lines, not 20,000,
* what that budget suppressed is counted and summarised once per window and event: ``wallbox connection
  refused: 19997 more in the last 60 s from 19997 other charge box ids, not logged one by one``
  (``suppressed``, ``keys``, ``window_s`` as fields),
* memory: the keys in an :class:`Lru` of ``max_keys`` (1024), the summaries for at most ``MAX_EVENTS``
  events.

Repeats of a key that was logged are dropped silently until its interval has passed (the line is in the
log already); distinct keys are counted once each while they are remembered.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog

K = TypeVar("K")
V = TypeVar("V")

DEFAULT_MAX_KEYS = 1024
MAX_EVENTS = 64  # distinct events with a pending summary; more share one "(other events)" summary

_log = structlog.get_logger("chargegate.ratelog")


class Lru(MutableMapping[K, V], Generic[K, V]):
    """A mapping of at most ``maxsize`` keys: setting a new key beyond it evicts the least recently used
    one (set or read). ``evicted`` counts the evictions."""

    def __init__(self, maxsize: int = DEFAULT_MAX_KEYS) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self.evicted = 0
        self._d: OrderedDict[K, V] = OrderedDict()

    def __getitem__(self, key: K) -> V:
        value = self._d[key]
        self._d.move_to_end(key)
        return value

    def __setitem__(self, key: K, value: V) -> None:
        d = self._d
        if key in d:
            d.move_to_end(key)
        d[key] = value
        while len(d) > self.maxsize:
            d.popitem(last=False)
            self.evicted += 1

    def __delitem__(self, key: K) -> None:
        del self._d[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: object) -> bool:
        return key in self._d

    def peek(self, key: K, default: V | None = None) -> V | None:
        """The value without making the key recent."""
        return self._d.get(key, default)


@dataclass(slots=True)
class _Key:
    logged_at: float | None = None  # when this key was last logged
    counted_in: float | None = None  # the window (its start) in whose summary it is counted


@dataclass
class _Window:
    start: float
    logged: int = 0  # lines of this event in the window
    suppressed: int = 0  # calls not logged because of the event budget
    keys: int = 0  # distinct keys among them
    subject: str = "keys"
    level: str = "warning"


class LogLimiter:
    """Rate-limited, aggregating, bounded logging (see the module docstring)."""

    def __init__(self, log: Any = None, *, interval_s: float = 60.0, window_s: float = 60.0, per_event: int = 3,
                 max_keys: int = DEFAULT_MAX_KEYS, clock: Callable[[], float] = time.monotonic) -> None:
        self.log = log if log is not None else _log
        self.interval_s = interval_s
        self.window_s = window_s
        self.per_event = per_event
        self.clock = clock
        self.keys: Lru[str, _Key] = Lru(max_keys)
        self.windows: dict[str, _Window] = {}
        self.summaries = 0  # summary lines written
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None  # a limiter may outlive a loop (tests)

    def __len__(self) -> int:
        return len(self.keys)

    def warning(self, key: str, event: str, *, subject: str = "keys", via: Any = None, **fields: Any) -> bool:
        return self.emit("warning", key, event, subject=subject, via=via, **fields)

    def info(self, key: str, event: str, *, subject: str = "keys", via: Any = None, **fields: Any) -> bool:
        return self.emit("info", key, event, subject=subject, via=via, **fields)

    def error(self, key: str, event: str, *, subject: str = "keys", via: Any = None, **fields: Any) -> bool:
        return self.emit("error", key, event, subject=subject, via=via, **fields)

    def emit(self, level: str, key: str, event: str, *, subject: str = "keys", via: Any = None,
             **fields: Any) -> bool:
        """Log ``event`` for ``key`` if its limits allow; True when it was logged. ``subject`` names the keys
        in the summary ("charge box ids", "peers"); ``via``: a logger with bound context for this line (the
        limiter's own logger otherwise)."""
        now = self.clock()
        self._flush_due(now)
        st = self.keys.get(key)
        if st is None:
            st = _Key()
        self.keys[key] = st  # (again): the most recent
        if st.logged_at is not None and now - st.logged_at < self.interval_s:
            return False  # logged already: the line is there
        win = self._window(event, now, subject, level)
        if win.logged >= self.per_event:
            win.suppressed += 1
            if st.counted_in != win.start:
                st.counted_in = win.start
                win.keys += 1
            self._arm()
            return False
        win.logged += 1
        st.logged_at = now
        getattr(via if via is not None else self.log, level)(event, **fields)
        return True

    def forget(self, key: str) -> None:
        """The next line for ``key`` is logged again (e.g. an unknown id that became known and may go again)."""
        self.keys.pop(key, None)

    def _window(self, event: str, now: float, subject: str, level: str) -> _Window:
        win = self.windows.get(event)
        if win is None:
            if len(self.windows) >= MAX_EVENTS:
                event = "(other events)"
                win = self.windows.get(event)
            if win is None:
                win = self.windows[event] = _Window(now, subject=subject, level=level)
        return win

    def _arm(self) -> None:
        """A summary is pending: write it when its window ends, also if nothing else is logged by then."""
        if math.isinf(self.window_s):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: the next call writes it
        if self._timer is not None and self._timer_loop is loop and not loop.is_closed():
            return
        self._timer = loop.call_later(self.window_s, self._on_timer)
        self._timer_loop = loop

    def _on_timer(self) -> None:
        self._timer = None
        self.flush(self.clock())

    def _flush_due(self, now: float) -> None:
        if any(now - w.start >= self.window_s for w in self.windows.values()):
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        """Write the summaries of the windows that ended (all of them when ``now`` is None) and start new
        windows for them."""
        t = self.clock() if now is None else now
        pending = False
        for event, w in list(self.windows.items()):
            if now is not None and t - w.start < self.window_s:
                pending = pending or w.suppressed > 0
                continue
            del self.windows[event]
            if w.suppressed:
                self.summaries += 1
                span = round(min(t - w.start, self.window_s) if now is not None else t - w.start, 1)
                getattr(self.log, w.level)(
                    f"{event}: {w.suppressed} more in the last {span:g} s from {w.keys} other {w.subject}, "
                    "not logged one by one", suppressed=w.suppressed, keys=w.keys, window_s=span)
        if pending:
            self._arm()

    def close(self) -> None:
        """Write what is pending and stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
