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


# -- eager one-shot tasks ----------------------------------------------------------------------------------

def _from_a_callback(fn: Any) -> asyncio.Future[Any]:
    """Run ``fn()`` in a plain loop callback (as the bus hands a message to a handler: no task current)."""
    loop = asyncio.get_running_loop()
    out: asyncio.Future[Any] = loop.create_future()
    loop.call_soon(lambda: out.set_result(fn()))
    return out


async def test_eager_task_runs_its_first_step_at_once_as_the_task() -> None:
    from chargegate.supervise import eager_task

    steps: list[str] = []
    gate: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    seen: dict[str, Any] = {}

    async def apply() -> int:
        seen["task"] = asyncio.current_task()
        async with asyncio.timeout(5):  # needs a current task: it is the eager task's
            steps.append("sent")
            got = await gate
        steps.append("answered")
        await asyncio.sleep(0)
        return got * 2

    def handler() -> asyncio.Task[Any]:
        t = eager_task(apply())
        steps.append("handler returns")
        return t

    task = await _from_a_callback(handler)
    assert steps == ["sent", "handler returns"]  # the first step ran inside the caller
    assert seen["task"] is task and asyncio.current_task() is not task
    gate.set_result(21)
    assert await task == 42 and steps[-1] == "answered"


async def test_eager_task_without_a_suspension_and_with_a_failure() -> None:
    from chargegate.supervise import eager_task

    async def nothing_to_wait_for() -> str:
        return "done"

    async def fails_at_once() -> None:
        raise ValueError("bad setpoint")

    done = await _from_a_callback(lambda: eager_task(nothing_to_wait_for()))
    assert await done == "done"
    failed = await _from_a_callback(lambda: eager_task(fails_at_once()))
    with pytest.raises(ValueError, match="bad setpoint"):
        await failed
    # a one-shot's failure in its eager step is counted and logged like any other
    tasks = Tasks()
    with capture_logs() as logs:
        t = await _from_a_callback(lambda: tasks.oneshot("apply-now:wb1", fails_at_once(), eager=True, evse="wb1"))
        await asyncio.gather(t, return_exceptions=True)
        await asyncio.sleep(0)
    assert tasks.failed == {"apply-now:wb1": 1}
    assert [e["task"] for e in logs if e["event"] == "task failed"] == ["apply-now:wb1"]


async def test_eager_task_cancelled_before_its_next_turn_releases_what_it_holds() -> None:
    from chargegate.supervise import eager_task

    lock = asyncio.Lock()
    cleaned: list[str] = []

    async def holds_the_lock() -> None:
        async with lock:
            try:
                await asyncio.Event().wait()
            finally:
                cleaned.append("finally")

    task = await _from_a_callback(lambda: eager_task(holds_the_lock()))
    assert lock.locked()
    task.cancel()  # before the task's first turn
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled() and cleaned == ["finally"] and not lock.locked()
    # cancelled while waiting (after its first turn): the cancellation goes into the coroutine
    task = await _from_a_callback(lambda: eager_task(holds_the_lock()))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled() and cleaned == ["finally", "finally"] and not lock.locked()


async def test_eager_task_inside_a_task_is_an_ordinary_task() -> None:
    from chargegate.supervise import eager_task

    steps: list[str] = []

    async def step() -> None:
        steps.append("ran")

    t = eager_task(step())  # this test runs in a task
    assert steps == []
    await t
    assert steps == ["ran"]
