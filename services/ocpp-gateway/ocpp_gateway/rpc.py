"""OCPP-J RPC over one WebSocket connection (both versions, both directions).

The frame format, the message classes, the JSON schemas and the error classes come from the
``ocpp`` library; this module adds what a gateway needs on top of them:

* every incoming CALL is validated against the version's schema and a bad one gets the right
  CALLERROR (see :func:`schema_error_code`); a malformed frame gets FormationViolation (1.6) or
  RpcFrameworkError / FormatViolation (2.0.1) with message id ``-1`` when none can be read; the
  connection stays up in every case,
* an unknown action gets NotImplemented, a known one without a handler NotSupported,
* CALLs of one peer are handled one after the other, in order; CALLRESULTs are routed at once,
* a token bucket per connection limits the message rate: beyond it, ordinary CALLs get a
  GenericError at once, transaction messages wait for a token (backpressure on that one socket,
  nothing is dropped, the other connections are untouched),
* raw payloads (camelCase dicts) in and out, so that messages can be forwarded unchanged.

A payload is checked by its schema compiled with fastjsonschema; the reference validator (jsonschema, with
referencing, rpds and attrs: about 4 MB and 50 modules) is imported only when a payload fails that check (it
words the violation and decides).
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import decimal
import json
import re
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import fastjsonschema
import ocpp
import structlog
from websockets.exceptions import ConnectionClosed

from chargegate.ratelog import LogLimiter
from ocpp_gateway.ocpp_enums import e16, e201

if TYPE_CHECKING:
    from jsonschema import Draft4Validator, FormatChecker
    from jsonschema.exceptions import ValidationError as SchemaValidationError

Version = Literal["1.6", "2.0.1"]
SUBPROTOCOL: dict[str, Version] = {"ocpp1.6": "1.6", "ocpp2.0.1": "2.0.1"}
SUBPROTOCOL_OF: dict[str, str] = {v: k for k, v in SUBPROTOCOL.items()}

CALL, CALLRESULT, CALLERROR = 2, 3, 4
TRANSACTION_ACTIONS = frozenset({"StartTransaction", "StopTransaction", "TransactionEvent"})
_SCHEMA_DIR = Path(ocpp.__file__).parent
DECIMAL_PRECISION = 800  # digits: any JSON float (up to 1.8e308) divided by a schema's multipleOf (0.1)
_DECIMAL_ACTIONS_16 = frozenset({"SetChargingProfile", "RemoteStartTransaction", "GetCompositeScheduleResponse"})

Handler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class RpcError(Exception):
    """A CALLERROR, raised by a handler (sent to the peer) or received from the peer."""

    def __init__(self, code: str, description: str = "", details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {description}")
        self.code = code
        self.description = description
        self.details = details or {}


@lru_cache(maxsize=2)
def known_actions(version: Version) -> frozenset[str]:
    """The version's actions (one set per version, shared by every connection)."""
    enum = e16.Action if version == "1.6" else e201.Action
    return frozenset(a.value for a in enum)


@lru_cache(maxsize=1)
def _formats() -> FormatChecker:
    """The reference validator's format checks: date-time only (every other format passes)."""
    from jsonschema import FormatChecker

    checker = FormatChecker(formats=())
    checker.checks("date-time", raises=ValueError)(_is_datetime)
    return checker


def _is_datetime(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not is_rfc3339(value):
        raise ValueError(f"{value!r} is no RFC 3339 date-time")
    return True


# RFC 3339 section 5.6 "date-time", the format JSON Schema's "date-time" names (draft 4, section 7.3.1): ASCII
# digits only, "T" and "Z" in either case (the RFC's note), an optional fraction of any length, the zone "Z" or
# +hh:mm / -hh:mm; the ranges are checked on the groups
_RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.\d+)?(?:[Zz]|[+-](\d{2}):(\d{2}))\Z",
                      re.ASCII)
_MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def is_rfc3339(value: str) -> bool:
    """True for an RFC 3339 date-time: a real day of the proleptic Gregorian calendar (year 0000 too), second
    60 (the leap second) allowed as the RFC does. Python's ``fromisoformat`` takes far more (a space for the T,
    no seconds, the basic format, "+0100"); the schemas' format is this one."""
    m = _RFC3339.match(value)
    if m is None:
        return False
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    if not 1 <= month <= 12:
        return False
    if not 1 <= day <= (29 if month == 2 and calendar.isleap(year) else _MONTH_DAYS[month - 1]):
        return False
    if hour > 23 or minute > 59 or second > 60:
        return False
    off_h, off_m = m.group(7), m.group(8)
    return off_h is None or (int(off_h) <= 23 and int(off_m) <= 59)


def parse_datetime(value: str) -> datetime:
    """ISO 8601 / RFC 3339 date-time with a zone (``Z`` or an offset)."""
    dt = datetime.fromisoformat(value.replace("z", "Z"))
    if dt.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone")
    return dt


def _schema_path(version: Version, action: str, kind: Literal["request", "response"]) -> Path | None:
    if version == "1.6":
        name = action + ("Response" if kind == "response" else "")
        path = _SCHEMA_DIR / "v16" / "schemas" / f"{name}.json"
    else:
        name = action + ("Response" if kind == "response" else "Request")
        path = _SCHEMA_DIR / "v201" / "schemas" / f"{name}.json"
    return path if path.exists() else None


def _is_decimal_action(version: Version, action: str, kind: Literal["request", "response"]) -> bool:
    return version == "1.6" and action + ("Response" if kind == "response" else "") in _DECIMAL_ACTIONS_16


@lru_cache(maxsize=512)
def schema(version: Version, action: str, kind: Literal["request", "response"]) -> dict[str, Any] | None:
    """The library's JSON schema for ``action`` as the reference validator takes it (the numbers of the three
    1.6 messages with ``multipleOf`` as decimals); None when the version has no such message. Loaded for the
    reference validator only: the compiled check reads the file itself."""
    path = _schema_path(version, action, kind)
    if path is None:
        return None
    parse_float: Callable[[str], Any] = decimal.Decimal if _is_decimal_action(version, action, kind) else float
    doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8-sig"), parse_float=parse_float)
    doc.pop("$id", None)
    return doc


@lru_cache(maxsize=512)
def validator(version: Version, action: str, kind: Literal["request", "response"]) -> Draft4Validator | None:
    """The reference validator (jsonschema) of :func:`schema` (None when the version has no such message);
    jsonschema is imported at the first call."""
    doc = schema(version, action, kind)
    if doc is None:
        return None
    from jsonschema import Draft4Validator

    return Draft4Validator(doc, format_checker=_formats())




# the formats the reference validator checks (``_FORMATS``: date-time only); every other format of the schemas
# passes there, so it passes here
_FAST_FORMATS: dict[str, Callable[[str], bool]] = {"date-time": is_rfc3339, "uri": lambda _: True}


@lru_cache(maxsize=512)
def fast_validator(version: Version, action: str, kind: Literal["request", "response"]) -> Callable[[Any], Any] | None:
    """The same schema compiled to Python code (fastjsonschema): ~20 times faster than ``validator``'s on a
    MeterValues. Its "valid" is final, its "invalid" is not: :func:`validate` then asks the reference
    validator, which names the violation (and decides). tests/ocpp_gateway/test_ocppgw_fast_schema.py
    checks both verdicts on every official schema. None where there is no schema.

    The three 1.6 messages whose ``multipleOf`` (0.1) the reference checks on decimals (SetChargingProfile, the
    gateway's every limit, RemoteStartTransaction, GetCompositeSchedule's response): fastjsonschema checks it
    on ``Decimal(repr(x)) / Decimal("0.1")``, exact for every float (a ``repr`` has at most 17 digits, the
    context 28) - the number the reference's decimal round trip (``json.dumps``, ``repr`` too) divides; above
    1.7e307 the float quotient overflows and it says invalid, where the reference decides."""
    path = _schema_path(version, action, kind)
    if path is None:
        return None
    doc = json.loads(path.read_text(encoding="utf-8-sig"))  # floats: fastjsonschema's multipleOf takes a float
    doc.pop("$id", None)
    # Draft 4 as the reference, whatever the file says (2.0.1's say draft-06, where 1.0 is an integer);
    # use_default=False: it must not fill in the schemas' defaults (the payload is forwarded as it came)
    return fastjsonschema.compile({**doc, "$schema": "http://json-schema.org/draft-04/schema#"},
                                  formats=_FAST_FORMATS, use_default=False)


# the messages every wallbox sends, and their answers: their schema checks are compiled at start-up (warm_up)
HOT_ACTIONS: dict[Version, tuple[str, ...]] = {
    "1.6": ("BootNotification", "Heartbeat", "StatusNotification", "Authorize", "StartTransaction", "MeterValues",
            "StopTransaction"),
    "2.0.1": ("BootNotification", "Heartbeat", "StatusNotification", "Authorize", "TransactionEvent", "MeterValues"),
}


def warm_up(versions: set[Version]) -> int:
    """Compile the schema checks of :data:`HOT_ACTIONS` now, not at the first such message: one compile (the
    reference validator and fastjsonschema's generated code) is ~30 M instructions, tens of ms with the event
    loop and every connection waiting - the first MeterValues of 200 wallboxes showed it (bench/ocpp). The
    others are still compiled when first used; the reference validators (for a payload the compiled check
    refuses) too. Returns how many were compiled."""
    n = 0
    for version in sorted(versions):
        for action in HOT_ACTIONS[version]:
            for kind in ("request", "response"):
                n += fast_validator(version, action, kind) is not None
    return n


def _passes(fast: Callable[[Any], Any], payload: Any) -> bool:
    try:
        fast(payload)
    except Exception:  # JsonSchemaValueException, or anything odd: the reference validator decides
        return False
    return True


def code_for(version: Version, kind: str) -> str:
    """Error code names differ between the versions."""
    if kind == "format":
        return "FormationViolation" if version == "1.6" else "FormatViolation"
    if kind == "occurrence":
        return "OccurenceConstraintViolation" if version == "1.6" else "OccurrenceConstraintViolation"
    return kind


def schema_error_code(version: Version, err: SchemaValidationError) -> str:
    """Map a JSON schema violation to the OCPP-J error code (documented in the README)."""
    kw = err.validator
    if kw == "type":
        return "TypeConstraintViolation"
    if kw == "additionalProperties":
        return code_for(version, "format")
    if kw in ("required", "minItems", "maxItems", "minProperties", "maxProperties"):
        return code_for(version, "occurrence")
    return "PropertyConstraintViolation"  # enum, maxLength, minimum, maximum, pattern, format, multipleOf ...


def validate(version: Version, action: str, kind: Literal["request", "response"], payload: Any) -> None:
    """Raise :class:`RpcError` with the right code when ``payload`` violates the schema."""
    fast = fast_validator(version, action, kind)  # every schema has one (None: no schema)
    if fast is None:
        return
    if not isinstance(payload, dict):
        raise RpcError(code_for(version, "format"), "payload must be a JSON object")
    if _passes(fast, payload):
        return
    if _is_decimal_action(version, action, kind):
        payload = json.loads(json.dumps(payload), parse_float=decimal.Decimal)
    v = validator(version, action, kind)
    assert v is not None  # the same schema
    try:
        with decimal.localcontext() as ctx:
            # multipleOf on decimals: 1e300 / 0.1 needs 301 digits (the default 28 raised DivisionImpossible)
            ctx.prec = DECIMAL_PRECISION
            err = next(iter(sorted(v.iter_errors(payload), key=lambda e: e.path)), None)
    except decimal.DecimalException as e:
        raise RpcError("PropertyConstraintViolation",
                       f"{action}: a number cannot be checked against the schema ({type(e).__name__})") from None
    if err is not None:
        where = "/".join(str(p) for p in err.absolute_path) or "(payload)"
        raise RpcError(schema_error_code(version, err), f"{where}: {err.message}"[:500],
                       {"path": where, "keyword": str(err.validator)})


def is_transaction_message(action: str, payload: Any) -> bool:
    return action in TRANSACTION_ACTIONS or (
        action == "MeterValues" and isinstance(payload, dict) and payload.get("transactionId") is not None)


class TokenBucket:
    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate * 2)
        self.tokens = self.capacity
        self.t = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.t) * self.rate)
        self.t = now

    def take(self) -> bool:
        self._refill()
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    async def wait(self) -> None:
        while not self.take():  # noqa: ASYNC110 - a token bucket waits for time to pass
            await asyncio.sleep((1 - self.tokens) / self.rate)


class OcppRpc:
    """One OCPP-J peer. ``await run()`` reads until the connection closes."""

    def __init__(self, ws: Any, version: Version, name: str, handler: Handler | None, *,
                 counters: Counter[str] | None = None, rate: float | None = None,
                 call_timeout: float = 30.0, validate_out: bool = True, log: Any = None,
                 on_frame: Callable[[str, str], None] | None = None) -> None:
        self.ws = ws
        self.version: Version = version
        self.name = name
        self.handler = handler
        self.counters = counters if counters is not None else Counter()
        self.bucket = TokenBucket(rate) if rate else None
        self.call_timeout = call_timeout
        self.validate_out = validate_out
        self.log = log or structlog.get_logger("ocpp_gateway.rpc")
        self.on_frame = on_frame  # (direction "in"/"out", raw text): for recording
        self.known = known_actions(version)
        self._pending: dict[str, tuple[str, asyncio.Future[dict[str, Any]]]] = {}
        self._call_lock = asyncio.Lock()
        self._calls: asyncio.Queue[tuple[str, str, Any]] = asyncio.Queue(maxsize=64)
        self._limited = False  # rate limit episode logged
        # answers to the peer's latest transaction messages by message id: a repeat of the same message id
        # (the peer did not see our answer) gets the same answer and is not handled twice
        self._answered: OrderedDict[str, tuple[str, dict[str, Any]]] = OrderedDict()
        self.closed = asyncio.Event()

    # -- sending -----------------------------------------------------------------------------
    async def _send(self, frame: list[Any]) -> None:
        await self._send_text(json.dumps(frame, separators=(",", ":"), default=_json_default))

    async def _send_text(self, text: str) -> None:
        if self.on_frame is not None:
            self.on_frame("out", text)
        await self.ws.send(text)

    async def call(self, action: str, payload: dict[str, Any], timeout_s: float | None = None,
                   unique_id: str | None = None, payload_text: str | None = None) -> dict[str, Any]:
        """Send a CALL and return the CALLRESULT payload; a CALLERROR raises :class:`RpcError`,
        no answer in time raises :class:`TimeoutError`, a lost connection ``ConnectionClosed``.
        ``payload_text``: ``payload`` already encoded as ``json.dumps(payload, separators=(",", ":"))`` (the
        transaction queue's stored text): the frame is built around it instead of encoding ``payload`` again
        (the same bytes; ``payload`` is still what the schema check sees)."""
        if self.validate_out:
            validate(self.version, action, "request", payload)
        uid = unique_id or str(uuid.uuid4())
        timeout = timeout_s or self.call_timeout
        async with self._call_lock:
            if self.closed.is_set():
                raise ConnectionClosed(None, None)
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[dict[str, Any]] = loop.create_future()
            self._pending[uid] = (action, fut)
            # one future and one timer per call, no task: the answer, the timer or the end of run() (which fails
            # every pending call with ConnectionClosed) completes ``fut`` (a waiter task on ``closed`` per call,
            # cancelled after every answer, and asyncio.wait cost a third of this method's time: bench/ocpp)
            timer = loop.call_later(timeout, _expire, fut, self.name, action, timeout)
            try:
                if payload_text is None:
                    await self._send([CALL, uid, action, payload])
                else:
                    await self._send_text(f"[{CALL},{json.dumps(uid)},{json.dumps(action)},{payload_text}]")
                return await fut
            finally:
                timer.cancel()
                self._pending.pop(uid, None)

    async def _reply_error(self, uid: str, code: str, description: str, details: dict[str, Any] | None = None) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self._send([CALLERROR, uid, code, description[:500], details or {}])

    # -- receiving ---------------------------------------------------------------------------
    async def run(self) -> None:
        worker = asyncio.create_task(self._worker(), name=f"rpc-worker-{self.name}")
        try:
            async for raw in self.ws:
                await self._on_raw(raw)
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
            for _, fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionClosed(None, None))

    def _bad(self, kind: str, detail: str) -> None:
        self.counters[f"ocpp_bad_{kind}"] += 1
        BAD_LOG.warning(f"{self.name}:{kind}", "bad OCPP message", subject="charge points", via=self.log,
                        charge_box_id=self.name, kind=kind, detail=detail[:300],
                        note="logged once per kind, charge point and minute; see counters")

    async def _on_raw(self, raw: str | bytes) -> None:
        if isinstance(raw, bytes):
            try:
                raw = raw.decode()
            except UnicodeDecodeError:
                self._bad("frame", "binary frame that is not UTF-8")
                await self._reply_error("-1", self._frame_code(), "binary frame, expected OCPP-J text")
                return
        if self.on_frame is not None:
            self.on_frame("in", raw)
        try:
            msg = json.loads(raw)
        except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than the parser goes
            what = "nested too deep" if isinstance(e, RecursionError) else "not JSON"
            self._bad("frame", f"{what}: {raw[:80]!r}")
            code = "FormationViolation" if self.version == "1.6" else "RpcFrameworkError"
            await self._reply_error("-1", code, "message is not valid JSON")
            return
        if not isinstance(msg, list) or len(msg) < 3 or not isinstance(msg[1], str) or not msg[1] \
                or len(msg[1]) > 36:
            self._bad("frame", f"not an OCPP-J message: {raw[:80]!r}")
            uid = msg[1] if isinstance(msg, list) and len(msg) > 1 and isinstance(msg[1], str) and msg[1] else "-1"
            await self._reply_error(uid[:36], self._frame_code(), "not an OCPP-J RPC frame [type, id, ...]")
            return
        mtype, uid = msg[0], msg[1]
        if mtype == CALL:
            if len(msg) != 4 or not isinstance(msg[2], str):
                self._bad("frame", "CALL must be [2, id, action, payload]")
                await self._reply_error(uid, self._frame_code(), "CALL must be [2, id, action, payload]")
                return
            try:
                self._calls.put_nowait((uid, msg[2], msg[3]))
            except asyncio.QueueFull:
                # the peer ignores OCPP's one-call-at-a-time rule: push back on its socket only
                self.counters["ocpp_backpressure"] += 1
                await self._calls.put((uid, msg[2], msg[3]))
        elif mtype in (CALLRESULT, CALLERROR):
            entry = self._pending.get(uid)
            if entry is None:
                self._bad("unexpected_result", f"answer to unknown message id {uid!r}")
                return
            action, fut = entry
            if fut.done():
                return
            if mtype == CALLRESULT:
                if len(msg) != 3:
                    fut.set_exception(RpcError(self._frame_code(), "CALLRESULT must be [3, id, payload]"))
                    return
                try:
                    validate(self.version, action, "response", msg[2])
                except RpcError as e:
                    self._bad("response", f"{action}: {e}")
                    fut.set_exception(e)
                    return
                fut.set_result(msg[2])
            else:
                code = msg[2] if isinstance(msg[2], str) else "GenericError"
                desc = msg[3] if len(msg) > 3 and isinstance(msg[3], str) else ""
                details = msg[4] if len(msg) > 4 and isinstance(msg[4], dict) else {}
                fut.set_exception(RpcError(code, desc, details))
        else:
            self._bad("frame", f"unknown message type {mtype!r}")
            code = self._frame_code() if self.version == "1.6" else "MessageTypeNotSupported"
            await self._reply_error(uid, code, f"message type {mtype!r} is not 2, 3 or 4")

    def _frame_code(self) -> str:
        return "FormationViolation" if self.version == "1.6" else "RpcFrameworkError"

    async def _worker(self) -> None:
        while True:
            uid, action, payload = await self._calls.get()
            try:
                await self._handle_call(uid, action, payload)
            except ConnectionClosed:
                return
            except Exception as e:  # never let one message kill the connection
                self.counters["ocpp_handler_errors"] += 1
                BAD_LOG.error(f"{self.name}:{action}:{type(e).__name__}", "handling an OCPP message failed",
                              via=self.log, charge_box_id=self.name, action=action, exc_info=e)
                await self._reply_error(uid, "InternalError", "the gateway could not handle the message")

    async def _handle_call(self, uid: str, action: str, payload: Any) -> None:
        if self.bucket is not None and not self.bucket.take():
            if is_transaction_message(action, payload):
                # billing data is never refused: slow this one charge point down instead
                self.counters["ocpp_rate_limited_delayed"] += 1
                await self.bucket.wait()
            else:
                self.counters["ocpp_rate_limited"] += 1
                if not self._limited:
                    self._limited = True
                    self.log.warning("charge point exceeds its message rate, rejecting", charge_box_id=self.name,
                                     rate_per_s=self.bucket.rate)
                await self._reply_error(uid, "GenericError", "rate limit exceeded, retry later",
                                        {"max_messages_per_s": self.bucket.rate})
                return
        elif self._limited and self.bucket is not None and self.bucket.tokens >= self.bucket.capacity / 2:
            self._limited = False
        if action not in self.known:
            self._bad("unknown_action", action)
            await self._reply_error(uid, "NotImplemented", f"unknown action {action[:40]!r}")
            return
        try:
            validate(self.version, action, "request", payload)
        except RpcError as e:
            self._bad("schema", f"{action}: {e.description}")
            await self._reply_error(uid, e.code, e.description, e.details)
            return
        if self.handler is None:
            await self._reply_error(uid, "NotSupported", f"{action} is not supported here")
            return
        tx_message = is_transaction_message(action, payload)
        if tx_message and (seen := self._answered.get(uid)) is not None and seen[0] == action:
            self.counters["ocpp_duplicate_message_ids"] += 1
            await self._send([CALLRESULT, uid, seen[1]])
            return
        try:
            result = await self.handler(action, payload)
        except RpcError as e:
            if e.code not in ("NotSupported", "NotImplemented"):
                self._bad("rejected", f"{action}: {e.code} {e.description}")
            await self._reply_error(uid, e.code, e.description, e.details)
            return
        try:
            validate(self.version, action, "response", result)
        except RpcError as e:
            self.counters["ocpp_internal_errors"] += 1
            self.log.error("own answer violates the schema (bug)", charge_box_id=self.name, action=action,
                           error=e.description)
            await self._reply_error(uid, "InternalError", "the gateway built an invalid answer")
            return
        if tx_message:
            self._answered[uid] = (action, result)
            while len(self._answered) > ANSWERED_KEEP:
                self._answered.popitem(last=False)
        await self._send([CALLRESULT, uid, result])


ANSWERED_KEEP = 256  # transaction-message answers remembered per connection for message-id repeats
# bad messages and handler failures of every connection (a peer that reconnects for every bad frame logs no more)
BAD_LOG = LogLimiter(structlog.get_logger("ocpp_gateway.rpc"))


def _expire(fut: asyncio.Future[Any], name: str, action: str, timeout: float) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError(f"{name}: no answer to {action} within {timeout} s"))


def _json_default(o: Any) -> Any:
    if isinstance(o, decimal.Decimal):
        return float(o)
    if isinstance(o, datetime):
        return o.isoformat()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")

