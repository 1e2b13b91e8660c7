"""The task supervisor: a failing long-lived task is logged, counted and restarted; cancellation stops it."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from structlog.testing import capture_logs

from chargegate.supervise import Backoff, Tasks, supervised

FAST = Backoff(initial_s=0.001, max_s=0.004, stable_s=10.0)


async def test_failure_is_logged_counted_and_the_task_restarted() -> None:
    runs: list[int] = []
    again = asyncio.Event()

    async def loop() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise OverflowError("cannot convert float infinity to integer")
        again.set()
        await asyncio.Event().wait()  # the restarted loop works on

    health: Counter[str] = Counter()
    with capture_logs() as logs:
        task = asyncio.create_task(supervised("meter-loop:wb1", loop, health=health, backoff=FAST,
                                              context={"evse_id": "wb1"}))
        await asyncio.wait_for(again.wait(), 2)
    assert runs == [0, 1]
    assert health == {"meter-loop:wb1": 1}
    [line] = [e for e in logs if e["log_level"] == "error"]
    assert line["event"] == "task failed, restarting it"
    assert line["task"] == "meter-loop:wb1" and line["evse_id"] == "wb1"
    assert line["error_type"] == "OverflowError" and "infinity" in line["error"]
    assert isinstance(line["exc_info"], OverflowError)  # the traceback, once
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancellation_stops_it_cleanly_also_during_the_backoff() -> None:
    started = asyncio.Event()

    async def loop() -> None:
        started.set()
        await asyncio.Event().wait()

    health: Counter[str] = Counter()
    task = asyncio.create_task(supervised("x", loop, health=health, backoff=FAST))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert health == {}  # a cancellation is no failure

    failing = asyncio.Event()

    async def broken() -> None:
        failing.set()
        raise RuntimeError("bug")

    with capture_logs():
        task = asyncio.create_task(supervised("y", broken, health=health, backoff=Backoff(60.0, 60.0)))
        await failing.wait()
        await asyncio.sleep(0)  # now in its 60 s backoff
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 1)
    assert health == {"y": 1}


async def test_a_burst_is_logged_thinly_with_one_traceback() -> None:
    n = 0
    done = asyncio.Event()

    async def broken() -> None:
        nonlocal n
        n += 1
        if n > 20:
            done.set()
            await asyncio.Event().wait()
        raise ValueError(f"bad {n}")

    health: Counter[str] = Counter()
    with capture_logs() as logs:
        task = asyncio.create_task(supervised("loop", broken, health=health, backoff=Backoff(0.0, 0.0, 10.0)))
        await asyncio.wait_for(done.wait(), 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert health == {"loop": 20}
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [e["failures"] for e in errors] == [1, 2, 4, 8, 16]
    assert sum("exc_info" in e for e in errors) == 1


async def test_backoff_doubles_and_a_stable_run_starts_a_new_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    n = 0
    done = asyncio.Event()
    real_sleep = asyncio.sleep

    async def broken() -> None:
        nonlocal n
        n += 1
        if n == 5:
            await real_sleep(0.06)  # a good run longer than stable_s before it fails again
        if n == 7:
            done.set()
            await asyncio.Event().wait()
        raise KeyError(n)

    async def recorded_sleep(s: float, *a: Any) -> None:
        waits.append(s)
        await real_sleep(0)

    monkeypatch.setattr("chargegate.supervise.asyncio.sleep", recorded_sleep)
    with capture_logs() as logs:
        task = asyncio.create_task(supervised("t", broken, health=None, backoff=Backoff(0.1, 0.4, 0.05)))
        await asyncio.wait_for(done.wait(), 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    monkeypatch.undo()
    assert waits == [0.1, 0.2, 0.4, 0.4, 0.1, 0.2]
    assert [e["failures"] for e in logs if e["log_level"] == "error"] == [1, 2, 4, 1, 2]


async def test_a_foreign_cancellation_is_a_failure_and_expected_errors_end_quietly() -> None:
    n = 0

    async def awaits_a_cancelled_future() -> None:
        nonlocal n
        n += 1
        if n == 1:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            fut.cancel()
            await fut  # CancelledError, but nobody cancelled the supervised task

    health: Counter[str] = Counter()
    with capture_logs() as logs:
        await asyncio.wait_for(supervised("f", awaits_a_cancelled_future, health=health, backoff=FAST), 2)
    assert n == 2 and health == {"f": 1}  # restarted, then returned: supervision ends
    assert [e["error_type"] for e in logs] == ["CancelledError"]

    class Closed(Exception):
        pass

    async def closes() -> None:
        raise Closed

    with capture_logs() as logs:
        await asyncio.wait_for(supervised("c", closes, health=health, backoff=FAST, expected=(Closed,)), 2)
    assert logs == [] and "c" not in health


async def test_tasks_spawn_names_counts_and_oneshot_logs() -> None:
    tasks = Tasks(backoff=FAST)
    ran = asyncio.Event()
    first = True

    async def loop() -> None:
        nonlocal first
        if first:
            first = False
            raise RuntimeError("once")
        ran.set()

    with capture_logs() as logs:
        t = tasks.spawn("poll:evse:wb1", loop, evse="wb1")
        assert t.get_name() == "poll:evse:wb1"
        await asyncio.wait_for(ran.wait(), 2)
        await t

        async def boom() -> None:
            raise ZeroDivisionError("x")

        o = tasks.oneshot("apply-now:wb1", boom(), evse="wb1")
        with pytest.raises(ZeroDivisionError):
            await o
        await asyncio.sleep(0)
    assert tasks.restarts == {"poll:evse:wb1": 1}
    assert tasks.failed == {"apply-now:wb1": 1}
    assert [(e["task"], e["error_type"]) for e in logs] == [("poll:evse:wb1", "RuntimeError"),
                                                           ("apply-now:wb1", "ZeroDivisionError")]
