"""Rate-limited logging and bounded per-peer structures: at most one line per key and interval, few per
event and window whatever the number of keys, a summary of what was suppressed, memory at a fixed bound."""

from __future__ import annotations

import asyncio
import math

import pytest
from structlog.testing import capture_logs

from chargegate.ratelog import MAX_EVENTS, LogLimiter, Lru


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_lru_keeps_the_most_recent_keys() -> None:
    d: Lru[str, int] = Lru(3)
    for i in range(5):
        d[f"k{i}"] = i
    assert list(d) == ["k2", "k3", "k4"] and d.evicted == 2
    assert d["k2"] == 2  # read: recent again
    d["k5"] = 5
    assert list(d) == ["k4", "k2", "k5"]
    assert d.peek("k4") == 4 and next(iter(d)) == "k4"  # peek does not touch
    with pytest.raises(ValueError):
        Lru(0)


def test_one_line_per_key_and_interval() -> None:
    clock = Clock()
    lim = LogLimiter(interval_s=60, clock=clock)
    with capture_logs() as logs:
        assert lim.warning("refuse:a", "refused", charge_box_id="a")
        assert not lim.warning("refuse:a", "refused", charge_box_id="a")
        clock.t += 59
        assert not lim.warning("refuse:a", "refused", charge_box_id="a")
        clock.t += 1
        assert lim.warning("refuse:a", "refused", charge_box_id="a")
    assert [e["event"] for e in logs] == ["refused", "refused"]
    assert lim.summaries == 0  # repeats of a logged key are not summarised: the line is there


def test_many_keys_make_few_lines_and_one_summary() -> None:
    clock = Clock()
    lim = LogLimiter(clock=clock, per_event=3, max_keys=1024)
    with capture_logs() as logs:
        for i in range(5000):
            lim.warning(f"refuse:id{i}", "wallbox connection refused", subject="charge box ids", charge_box_id=f"id{i}")
            lim.warning(f"refuse:id{i}", "wallbox connection refused", subject="charge box ids", charge_box_id=f"id{i}")
        assert len(logs) == 3
        assert len(lim) == 1024 and lim.keys.evicted == 5000 - 1024  # memory at its bound
        clock.t += 60
        lim.warning("other", "something else")  # the next line after the window writes the summary
    [summary] = [e for e in logs if "suppressed" in e]
    assert summary["suppressed"] == 2 * 4997 and summary["keys"] == 4997 and summary["window_s"] == 60
    assert summary["event"] == ("wallbox connection refused: 9994 more in the last 60 s from 4997 other charge box "
                                "ids, not logged one by one")
    assert summary["log_level"] == "warning"
    assert len(logs) == 5


def test_events_are_bounded_too() -> None:
    lim = LogLimiter(clock=Clock(), per_event=1)
    with capture_logs() as logs:
        for i in range(MAX_EVENTS + 50):
            lim.warning(f"k{i}", f"event {i}")
            lim.warning(f"j{i}", f"event {i}")
    assert len(lim.windows) <= MAX_EVENTS + 1
    assert len(logs) == MAX_EVENTS + 1  # beyond MAX_EVENTS the events share one budget


async def test_the_summary_comes_by_itself_when_the_window_ends() -> None:
    lim = LogLimiter(window_s=0.05, per_event=1)
    with capture_logs() as logs:
        lim.warning("a", "refused")
        lim.warning("b", "refused")
        lim.warning("c", "refused")
        for _ in range(100):
            if lim.summaries:
                break
            await asyncio.sleep(0.01)
    assert [e.get("suppressed") for e in logs] == [None, 2]


def test_once_while_remembered_and_forget() -> None:
    clock = Clock()
    lim = LogLimiter(interval_s=math.inf, clock=clock, per_event=10)
    with capture_logs() as logs:
        lim.warning("evse:x", "unknown EVSE")
        clock.t += 10_000
        lim.warning("evse:x", "unknown EVSE")
        lim.forget("evse:x")
        lim.warning("evse:x", "unknown EVSE")
    assert len(logs) == 2


def test_close_writes_what_is_pending_and_via_binds_context() -> None:
    lim = LogLimiter(clock=Clock(), per_event=1)
    with capture_logs() as logs:
        lim.error("a", "failed", via=None, error="x")
        lim.error("b", "failed", error="y")
        lim.close()
    assert [e["log_level"] for e in logs] == ["error", "error"]
    assert logs[1]["suppressed"] == 1 and logs[1]["keys"] == 1
