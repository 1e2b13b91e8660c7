"""Supervised long-lived tasks: no loop of a service dies silently.

Every long-lived asyncio task of a service (a device's poll loop, an EVSE's meter loop, the control
loop, the health heartbeat, ...) runs under :func:`supervised`. When the coroutine raises anything but
a cancellation, the supervisor

* logs it with its context: the task name, the device or EVSE id where there is one, the exception
  type and message. The first failure of a burst carries the traceback; further failures of the same
  burst are logged without it and only at the 2nd, 4th, 8th, ... failure, so a loop that keeps
  failing cannot fill the disk,
* counts it per task name (the service's health payload shows them as ``task_restarts``),
* waits a backoff (0.1 s, doubling up to 5 s; back to 0.1 s and a new burst once the task ran
  ``stable_s`` without failing) and starts the coroutine again from its factory.

Cancelling the supervising task stops it cleanly (also during the backoff). A coroutine that
returns ends its supervision (a loop that finishes by design, e.g. after ``close()``). A
``CancelledError`` that the coroutine raises while its task is *not* being cancelled (it awaited a
future that someone else cancelled) is a failure like any other, not a way to die quietly.
"""

from __future__ import annotations

import asyncio
import contextvars
import types
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import structlog

_log = structlog.get_logger("chargegate.supervise")

Factory = Callable[[], Awaitable[Any]]


@dataclass(frozen=True)
class Backoff:
    """Waits between restarts: ``initial_s`` doubling to ``max_s``; a run of ``stable_s`` without a
    failure ends the burst (the next failure waits ``initial_s`` and is logged with its traceback)."""

    initial_s: float = 0.1
    max_s: float = 5.0
    stable_s: float = 30.0


DEFAULT_BACKOFF = Backoff()


def _logged(burst: int) -> bool:
    """Failures 1, 2, 4, 8, ... of a burst are logged."""
    return burst & (burst - 1) == 0


async def supervised(name: str, factory: Factory, *, health: MutableMapping[str, int] | None,
                     log: Any = None, backoff: Backoff = DEFAULT_BACKOFF,
                     expected: tuple[type[BaseException], ...] = (),
                     context: Mapping[str, Any] | None = None) -> None:
    """Run ``factory()`` until it returns or the task is cancelled, restarting it after a failure.

    ``health``: restarts are counted in ``health[name]`` (the service's ``task_restarts``); ``log``: the
    service's logger; ``expected``: exceptions that end the task quietly, as a return does (e.g. a
    connection's heartbeat ends with ``ConnectionClosed``); ``context``: fields for the log line (the
    device or EVSE id)."""
    log = log if log is not None else _log
    fields = dict(context or {})
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    delay = backoff.initial_s
    burst = 0
    while True:
        started = loop.time()
        try:
            await factory()
            return
        except asyncio.CancelledError as e:
            if task is None or task.cancelling():
                raise
            failure: BaseException = e  # not ours: a future the coroutine awaited was cancelled by someone else
        except expected:
            return
        except Exception as e:
            failure = e
        if loop.time() - started >= backoff.stable_s:
            burst, delay = 0, backoff.initial_s
        burst += 1
        if health is not None:
            health[name] = health.get(name, 0) + 1
        if _logged(burst):
            line = dict(task=name, **fields, error_type=type(failure).__name__, error=str(failure)[:500],
                        failures=burst, restart_in_s=round(delay, 3))
            if burst == 1:
                log.error("task failed, restarting it", **line, exc_info=failure)
            else:
                log.error("task keeps failing, restarting it", **line,
                          note="logged at the 2nd, 4th, 8th, ... failure; see task_restarts in the health")
        await asyncio.sleep(delay)
        delay = min(delay * 2, backoff.max_s)


class _FirstStep:
    """What running a coroutine up to its first suspension gave (see :func:`eager_task`)."""

    __slots__ = ("done", "error", "value", "yielded")

    def __init__(self) -> None:
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None
        self.yielded: Any = None


@types.coroutine
def _go_on(coro: Coroutine[Any, Any, Any], first: _FirstStep) -> Any:
    """The rest of ``coro`` after its first step: what it yields goes to the task, what the task sends or
    throws (a cancellation) goes back into it."""
    if first.error is not None:
        err, first.error = first.error, None
        raise err
    if first.done:
        return first.value
    yielded = first.yielded
    first.yielded = None
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value


async def _rest(coro: Coroutine[Any, Any, Any], first: _FirstStep) -> Any:
    return await _go_on(coro, first)


def eager_task(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """A task for ``coro`` whose first step runs now, inside the caller, as Python 3.12's eager tasks do:
    a setpoint's Modbus write goes out while the bus is still handing over the rest of a burst, instead
    of after all of them (a task's first step waits for the loop's next turn). The step runs as the
    task (``asyncio.current_task()`` is it, ``asyncio.timeout`` works) and in the task's own context;
    the task then goes on from where the coroutine is suspended, or ends with what the step returned or
    raised. Called from within another task, it is an ordinary task (a task cannot run inside another)."""
    loop = asyncio.get_running_loop()
    if asyncio.current_task(loop) is not None:
        return loop.create_task(coro)
    first = _FirstStep()
    ctx = contextvars.copy_context()
    task = loop.create_task(_rest(coro, first), context=ctx)
    # cancelled before its first turn, the task never enters _go_on: close the coroutine where it waits (its
    # ``finally`` blocks and ``async with`` exits run: a lock it holds is released)
    task.add_done_callback(lambda _: coro.close())
    asyncio.tasks._enter_task(loop, task)
    try:
        first.yielded = ctx.run(coro.send, None)
    except StopIteration as stop:
        first.done, first.value = True, stop.value
    except (Exception, asyncio.CancelledError) as exc:  # the task raises it, as if the step had run in it
        first.error = exc
    except BaseException:  # KeyboardInterrupt, SystemExit: to the caller, as out of any loop callback
        task.cancel()
        raise
    finally:
        asyncio.tasks._leave_task(loop, task)
    return task


class Tasks:
    """Starts a service's supervised tasks; restarts are counted in ``restarts`` (health ``task_restarts``).

    Components get the service's instance (``ServiceContext.tasks``); one built without it (a test, a
    benchmark) supervises its tasks all the same, counting in a private counter."""

    def __init__(self, restarts: Counter[str] | None = None, log: Any = None,
                 backoff: Backoff = DEFAULT_BACKOFF) -> None:
        self.restarts: Counter[str] = restarts if restarts is not None else Counter()
        self.failed: Counter[str] = Counter()  # failures of one-shot tasks by name (see oneshot)
        self.log = log
        self.backoff = backoff

    def supervised(self, name: str, factory: Factory, *, expected: tuple[type[BaseException], ...] = (),
                   **context: Any) -> Awaitable[None]:
        """The supervising coroutine (to await in place, e.g. a service's main loop)."""
        return supervised(name, factory, health=self.restarts, log=self.log, backoff=self.backoff,
                          expected=expected, context=context)

    def spawn(self, name: str, factory: Factory, *, expected: tuple[type[BaseException], ...] = (),
              **context: Any) -> asyncio.Task[None]:
        """A task running ``factory()`` supervised; ``context``: the device or EVSE id for its log lines."""
        coro = supervised(name, factory, health=self.restarts, log=self.log, backoff=self.backoff,
                          expected=expected, context=context)
        return asyncio.create_task(coro, name=name)

    def oneshot(self, name: str, coro: Coroutine[Any, Any, Any], *, eager: bool = False,
                **context: Any) -> asyncio.Task[Any]:
        """A task that does one thing (apply a setpoint now, send one message): not restarted, but its
        failure is logged (the 1st with its traceback, then the 2nd, 4th, 8th, ... of that name), never
        lost in an unretrieved task exception. ``eager``: see :func:`eager_task`."""
        task = eager_task(coro) if eager else asyncio.ensure_future(coro)

        def done(t: asyncio.Future[Any]) -> None:
            if t.cancelled() or t.exception() is None:
                return
            exc = t.exception()
            self.failed[name] += 1
            n = self.failed[name]
            if _logged(n):
                log = self.log if self.log is not None else _log
                line = dict(task=name, **context, error_type=type(exc).__name__, error=str(exc)[:500], failures=n)
                log.error("task failed", **line, **({"exc_info": exc} if n == 1 else {}))

        task.add_done_callback(done)
        return task
