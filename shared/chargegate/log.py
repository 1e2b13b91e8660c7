"""structlog set-up: JSON lines when not on a terminal, readable key=value on a terminal."""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

import structlog

_SECRET_WORDS = ("password", "passwd", "secret", "token", "private_key", "authorization")


def _redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in list(event):
        if any(w in key.lower() for w in _SECRET_WORDS):
            event[key] = "**********"
    return event


Sink = Any  # Callable[[str, dict[str, Any]], None]
_sinks: list[Sink] = []
_in_sink = threading.local()


def add_sink(sink: Sink) -> None:
    """``sink(level, event_dict)`` sees every event (after redaction), e.g. to forward it to the bus."""
    _sinks.append(sink)


def remove_sink(sink: Sink) -> None:
    if sink in _sinks:
        _sinks.remove(sink)


def _forward(_: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    if _sinks and not getattr(_in_sink, "busy", False):
        _in_sink.busy = True
        try:
            for sink in list(_sinks):
                try:
                    sink(method, dict(event))
                except Exception:  # a sink must never break logging
                    pass
        finally:
            _in_sink.busy = False
    return event


class _StderrLogger:
    """Writes to whatever ``sys.stderr`` is at call time (test capture, redirection)."""

    def msg(self, message: str) -> None:
        # a lone surrogate from outside (a JSON "\\ud800" in an id) must not make the log line raise
        print(message.encode("utf-8", "backslashreplace").decode("utf-8"), file=sys.stderr, flush=True)

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def enabled(level: int) -> bool:
    """Whether structlog's configured level filter lets ``level`` (``logging.INFO``, ...) through. For a hot path
    with a line that is usually filtered out: a service's logger is a lazy proxy that binds a new logger on every
    call, even for a line it then drops (about 8 times the cost of asking this)."""
    check = getattr(structlog.get_config()["wrapper_class"], "is_enabled_for", None)
    return True if check is None else bool(check(None, level))


def _factory(*_: Any) -> _StderrLogger:
    return _StderrLogger()


def setup(service: str | None = None, level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog and the stdlib root logger once per process."""
    fmt = os.environ.get("CHARGEGATE_LOG_FORMAT", fmt)
    level = os.environ.get("CHARGEGATE_LOG_LEVEL", level)
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    lvl = getattr(logging, level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
        _forward,
    ]
    if service:
        structlog.contextvars.bind_contextvars(service=service)
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=_factory,
        cache_logger_on_first_use=False,
    )
    # libraries that use stdlib logging (pymodbus, websockets, paho) go through the same output
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(processors=[
        structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer], foreign_pre_chain=shared))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(lvl, logging.WARNING))
