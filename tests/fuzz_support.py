"""Shared pieces of the fuzz tests (``tests/*/test_fuzz_*.py``): hostile inputs, a raw MQTT publisher, a log
capture and a walk over what a service holds in memory.

Each fuzz test drives one external interface of a real service (real broker, real sockets) for a bounded
number of hypothesis examples and asserts the same four things: the service is still there and answers, what
it keeps per peer or per id stays bounded (and so do its log lines), refused input gets the interface's error
for it (a count, an OCPP CALLERROR code, an HTTP 4xx, a CLS.EEDI errorNumber), and refused input writes
nothing (no file, no publish).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import json
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from chargegate import payloads as p
from conftest import wait_for


def fuzz(max_examples: int) -> Any:
    """The settings of every fuzz test: a fixed number of examples, no per-example deadline (a real service
    answers), and no health checks that count a slow real interface against the test."""
    return settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck),
                    print_blob=True)


# -- hostile values ------------------------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=12)

# JSON text json.dumps cannot write (or Python's json.loads takes though it should not), put in raw
RAW_TOKENS = (
    "NaN", "Infinity", "-Infinity", "1e999", "-1e999", "-0.0", "-0", "9" * 5000, "12345678901234567",
    '"\\ud800"', '"\\u0000"', "[" * 200 + "]" * 200, '{"a":' * 100 + "1" + "}" * 100, "1E400", "0.1e-400",
)


def _iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


def _now_plus(seconds: float) -> str:
    return _iso(datetime.now(UTC) + timedelta(seconds=seconds))


BOUNDARY: tuple[Any, ...] = (
    0, 1, -1, 0.5, 5e-324, 6, 16, 32, 999.999, 1000, 1000.001, 10_000_000, 10_000_001, 1e12, 1e12 + 1,
    2**53 - 1, 2**53, -(2**53), 2**63, 2**64, True, False, None, "", " ", "x" * 300, "é", "\u202e", "\x00",
    "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "9999-12-31T23:59:59.999999-14:00",
    "0001-01-01T00:00:00+14:00", "2026-01-01T00:00:00", "1970-01-01T00:00:00Z", "2200-01-01T00:00:00Z",
    "not a date", [], {}, [0, 0, 0], [1000, 1000, 1000], [-1, -1, -1], [1e308, 1e308, 1e308], [1, 2],
    "A", "C", "F", "charging", "offline", "available", "dso", "failsafe", "low", "up", "online", "reload",
    "wb1", "../etc", "a/b", "+", "#",
)
# timestamps relative to now, built when drawn (a hypothesis example replays the offset, not the instant)
relative_times = st.sampled_from([-10 * 365 * 86400, -86400, -3600, -5, 0, 2, 5, 60, 3600, 86400,
                                  10 * 365 * 86400]).map(_now_plus)


class Raw:
    """A JSON token put into the text as it is (see :func:`dumps_raw`)."""

    def __init__(self, text: str) -> None:
        self.text = text


raw_tokens = st.sampled_from(RAW_TOKENS).map(Raw)
values = st.one_of(st.sampled_from(BOUNDARY), relative_times, json_values, raw_tokens)


def dumps_raw(doc: Any) -> bytes:
    """``json.dumps`` with every :class:`Raw` written as its text."""
    raws: dict[str, str] = {}

    def swap(x: Any) -> Any:
        if isinstance(x, Raw):
            key = f"@@raw{len(raws)}@{uuid.uuid4().hex[:6]}@@"
            raws[key] = x.text
            return key
        if isinstance(x, dict):
            return {k: swap(v) for k, v in x.items()}
        if isinstance(x, list):
            return [swap(v) for v in x]
        return x

    text = json.dumps(swap(doc))
    for key, token in raws.items():
        text = text.replace(json.dumps(key), token)
    return text.encode()


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


def _apply(doc: Any, path: tuple[Any, ...], op: str, value: Any, key: str) -> Any:
    if not path:
        return value if op == "replace" else doc
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if op == "replace":
        parent[last] = value
    elif op == "delete":
        del parent[last]
    elif isinstance(parent, dict):
        parent[key] = value
    else:
        parent.insert(last, value)
    return doc


@st.composite
def mutated(draw: st.DrawFn, template: dict[str, Any], max_changes: int = 3) -> bytes:
    """``template`` with 1..``max_changes`` changes: a value replaced by a hostile one, a key deleted, a key
    added (the JSON text, raw tokens included)."""
    doc: Any = copy.deepcopy(template)
    for _ in range(draw(st.integers(1, max_changes))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add"]))
        if op == "delete" and not path:
            op = "replace"
        if op == "add" and not isinstance(_get(doc, path[:-1]) if path else doc, dict | list):
            op = "replace"
        # a copy: BOUNDARY's lists and dicts are shared, and a later "add" would change them for every
        # later example (hypothesis then reports the strategy as flaky)
        value = copy.deepcopy(draw(values))
        doc = _apply(doc, path, op, value, draw(st.sampled_from(["x", "extra", "ts", "v", "evse_id"])))
    return dumps_raw(doc)


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        doc = doc[part]
    return doc


HOSTILE_PAYLOADS = (
    b"", b" ", b"null", b"[]", b"{}", b'"x"', b"1", b"true", b"{", b"}", b"\xff\xfe", b"\xef\xbb\xbf{}",
    b"\x00", b'{"a": 1, "a": 2}', b"[" * 100_000, b"[" * 5000 + b"]" * 5000, b'{"v": ' + b"9" * 5000 + b"}",
    b'{"v": NaN}', b'{"v": 1, "ts": Infinity}', b'{"\xc3\x28": 1}', b'{"ts": "\xed\xa0\x80"}',
    b"x" * 300_000,
)
hostile_payloads = st.one_of(st.sampled_from(HOSTILE_PAYLOADS), st.binary(max_size=48),
                             json_values.map(lambda v: json.dumps(v).encode()))


def payloads_for(template: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """Mostly mutations of a valid payload (deep in its structure), some hostile whole payloads, some valid."""
    return st.one_of(mutated(template), mutated(template), mutated(template), hostile_payloads,
                     st.just(json.dumps(template).encode()))


# -- bus payload templates -----------------------------------------------------------------------------------

def template(name: str, **params: str) -> dict[str, Any]:
    """A valid payload of topic ``name`` (as JSON data) for the topic parameters ``params``."""
    soon = datetime.now(UTC) + timedelta(seconds=30)
    start = datetime.now(UTC) - timedelta(minutes=5)
    period = p.TariffPeriod(id="t1", level=p.TariffLevel.LOW, start=start, end=soon, price_ct_per_kwh=20.0)
    ev = params.get("evse_id", "wb1")
    model: p.Payload
    if name == "evse.status":
        model = p.EvseStatus(evse_id=ev, online=True, state=p.EvseState.CHARGING, iec_state=p.IecState.C,
                             phases_in_use=3, current_a=[10.0, 10.0, 10.0], power_w=6900.0, energy_wh=12345.0,
                             session=p.Session(id="s1", started=start, energy_wh=100.0, id_tag="tag1"),
                             applied=p.AppliedSetpoint(current_a=10.0, phases=3, seq=1), source="evse-poller")
    elif name == "evse.setpoint":
        model = p.Setpoint(evse_id=ev, current_a=8.0, phases=3, valid_until=soon, seq=1, reason="fuzz")
    elif name == "evse.limit":
        model = p.EvseLimit(evse_id=ev, current_a=10.0, phases=3, valid_until=soon, id="prof-1")
    elif name == "evse.command":
        model = p.EvseCommand(evse_id=ev, action=p.EvseCommandAction.STOP, request_id="r1")
    elif name == "evse.command_result":
        model = p.EvseCommandResult(evse_id=ev, request_id="r1", accepted=True)
    elif name == "evse.mode":
        model = p.ChargingMode(evse_id=ev, mode=p.ChargingModeName.NOW)
    elif name == "evse.mode_set":
        model = p.ModeCommand(evse_id=ev, mode=p.ChargingModeName.NOW,
                              target=p.SessionTarget(energy_wh=5000.0, by="07:30"), request_id="r1")
    elif name == "meter.reading":
        model = p.MeterReading(meter_id=params.get("meter_id", "grid-meter"), current_a=[5.0, 6.0, 7.0],
                               voltage_v=[230.0, 230.0, 230.0], power_w=4000.0, energy_import_wh=1e6)
    elif name == "grid.limit":
        model = p.GridLimit(source=p.LimitSource(params.get("source", "dso")), active=True, power_w=8000.0,
                            scope=p.LimitScope.CONTROLLABLE, valid_until=soon, id="lim-1", failsafe_power_w=4200.0,
                            failsafe_duration_s=7200.0)
    elif name == "tariff.current":
        model = p.TariffCurrent(period=period, valid_until=soon)
    elif name == "tariff.schedule":
        model = p.TariffSchedule(periods=[period])
    elif name == "link.smgw":
        model = p.SmgwLinkStatus(state=p.LinkState.UP, gateway="smgw", since=start, bytes_tx=10, bytes_rx=20,
                                 channels={"operator": {"state": "up", "bytes": 5}})
    elif name == "controller.allocation":
        model = p.Allocation(cycle=3, evses=[p.EvseAllocation(evse_id=ev, current_a=10.0, phases=3,
                                                              bound_by="evse_max")], limits={"grid_limits": {}},
                             solve_ms=0.4)
    elif name == "service.health":
        model = p.Health(service=params.get("service", "load-controller"), status=p.HealthStatus.ONLINE,
                         uptime_s=5.0, counters={"x": 1})
    elif name == "service.command":
        model = p.ServiceCommand(action="reload", request_id="r1")
    else:
        raise KeyError(name)
    return json.loads(model.model_dump_json())


# -- a raw MQTT publisher ------------------------------------------------------------------------------------

class RawPublisher:
    """One broker account publishing raw bytes (QoS 1, not retained) with paho, nothing validated."""

    def __init__(self, port: int, account: str, password: str) -> None:
        self.account = account
        self.connected = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fuzz-{account}-{uuid.uuid4().hex[:6]}")
        c.username_pw_set(account, password)
        c.max_inflight_messages_set(1000)
        c.on_connect = lambda cl, u, f, rc, pr: self.connected.set() if not rc.is_failure else None
        c.connect("127.0.0.1", port)
        c.loop_start()
        if not self.connected.wait(5):
            raise TimeoutError(f"{account} could not connect to the broker")
        self.client = c
        self._last: mqtt.MQTTMessageInfo | None = None

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self._last = self.client.publish(topic, payload, qos=1, retain=retain)

    async def flush(self) -> None:
        """Until the broker has taken everything published so far."""
        last = self._last
        if last is not None:
            await asyncio.to_thread(last.wait_for_publish, 10)
            assert last.is_published(), f"{self.account}: broker did not take the messages"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# -- logs ------------------------------------------------------------------------------------------------------

class Logs:
    """Every structlog event while active (``capture()``), with the counts the fuzz tests assert on."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    @contextmanager
    def capture(self) -> Iterator[Logs]:
        with structlog.testing.capture_logs() as entries:
            self.entries = entries
            yield self

    def mark(self) -> int:
        return len(self.entries)

    def since(self, mark: int,
              levels: Iterable[str] = ("warning", "error", "critical", "exception")) -> list[dict[str, Any]]:
        want = set(levels)
        return [e for e in self.entries[mark:] if e.get("log_level") in want]

    def errors(self, mark: int = 0) -> list[dict[str, Any]]:
        return self.since(mark, ("error", "critical", "exception"))


# -- memory ----------------------------------------------------------------------------------------------------

_LEAVES = (str, bytes, bytearray, int, float, bool, type(None), datetime, timedelta)
# attributes known to be bounded by other means (the bus's topic-match cache: MATCH_CACHE_SIZE entries; the
# registry's resolved topics: RESOLVE_CACHE_SIZE entries)
SKIP_ATTRS = frozenset({"__class__", "__module__", "_matches", "_resolved", "_client"})


def containers(root: Any, skip: tuple[type, ...] = (), max_depth: int = 12,
               visited: list[Any] | None = None) -> list[tuple[int, str]]:
    """``(length, path)`` of every dict, list, set, deque and other sized container reachable from ``root``
    through attributes, dataclass fields, container items, the variables a closure holds and the object of a
    bound method (objects of the ``skip`` types, modules, classes, the event loop, futures, threads and
    sockets are not entered)."""
    import inspect
    import socket
    import sqlite3
    import types

    opaque = (types.ModuleType, types.BuiltinFunctionType, type, asyncio.AbstractEventLoop, asyncio.Future,
              asyncio.Handle, threading.Thread, socket.socket, sqlite3.Connection, sqlite3.Cursor,
              asyncio.BaseTransport, mqtt.Client, *skip)
    seen: set[int] = set()
    out: list[tuple[int, str]] = []
    stack: list[tuple[Any, str, int]] = [(root, type(root).__name__, 0)]
    while stack:
        obj, path, depth = stack.pop()
        if id(obj) in seen or isinstance(obj, _LEAVES) or isinstance(obj, opaque) or depth > max_depth:
            continue
        seen.add(id(obj))
        if visited is not None:
            visited.append(obj)
        children: list[tuple[Any, str]] = []
        if isinstance(obj, types.FunctionType):
            for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or (), strict=False):
                try:
                    children.append((cell.cell_contents, f"{path}<{name}>"))
                except ValueError:  # an empty cell
                    pass
        elif isinstance(obj, types.MethodType):
            children.append((obj.__self__, f"{path}.__self__"))
        elif inspect.isawaitable(obj) or inspect.isgenerator(obj):
            continue
        elif isinstance(obj, dict):
            out.append((len(obj), path))
            for k, v in list(obj.items())[:2000]:
                children.append((v, f"{path}[{str(k)[:20]!r}]"))
        elif isinstance(obj, list | tuple | set | frozenset | collections.deque):
            out.append((len(obj), path))
            children.extend((v, f"{path}[{i}]") for i, v in enumerate(list(obj)[:2000]))
        elif isinstance(obj, asyncio.Queue):
            out.append((obj.qsize(), path))
        else:
            try:
                if hasattr(obj, "__len__") and hasattr(obj, "__iter__"):
                    out.append((len(obj), path))
            except Exception:
                pass
            attrs: dict[str, Any] = {}
            if is_dataclass(obj) and not isinstance(obj, type):
                attrs.update({f.name: getattr(obj, f.name, None) for f in fields(obj)})
            d = getattr(obj, "__dict__", None)
            if isinstance(d, dict):
                attrs.update(d)
            for slot in getattr(type(obj), "__slots__", ()):
                if isinstance(slot, str) and hasattr(obj, slot):
                    attrs[slot] = getattr(obj, slot)
            for k, v in attrs.items():
                if k not in SKIP_ATTRS:
                    children.append((v, f"{path}.{k}"))
        for child, cpath in children:
            stack.append((child, cpath, depth + 1))
    return out


def find(root: Any, cls: type) -> Any:
    """The one object of type ``cls`` reachable from ``root`` (see :func:`containers`)."""
    objs: list[Any] = []
    containers(root, visited=objs)
    found = [o for o in objs if isinstance(o, cls)]
    assert len(found) == 1, f"{len(found)} objects of {cls.__name__} reachable"
    return found[0]


def largest(root: Any, skip: tuple[type, ...] = (), top: int = 5) -> list[tuple[int, str]]:
    return sorted(containers(root, skip), reverse=True)[:top]


# -- the bus as an external interface --------------------------------------------------------------------------

class _QuietRegistry:
    """The topic registry as an oracle: which payloads a service must refuse (counted, not logged here)."""

    def __init__(self, root: str) -> None:
        from chargegate.topics import Registry

        class Quiet(Registry):
            def _reject(self, topic: str, error: str, pattern: str) -> None:
                self.invalid[pattern] += 1

        self.reg = Quiet(root)

    def topic(self, name: str, **params: str) -> str:
        return self.reg.topic(name, **params)

    def refused(self, topic: str, payload: bytes) -> bool:
        before = sum(self.reg.invalid.values())
        self.reg.parse(topic, payload)
        return sum(self.reg.invalid.values()) > before

    def parse(self, topic: str, payload: bytes) -> Any:
        got = self.reg.parse(topic, payload)
        return None if got is None else got[2]


Message = tuple[str, dict[str, str], bytes]  # topic name, parameters, payload


class BusFuzz:
    """Publishes fuzzed payloads on the topics a running service subscribes to, each with an account the
    broker's ACL lets write it, and waits until the service has taken all of them: every refused one is
    counted in the service's ``invalid_messages`` (the registry of its context). A message on a topic none of
    the service's subscriptions matches is sent too but expected nowhere (the broker keeps it from the
    service)."""

    def __init__(self, broker: Any, ctx: Any) -> None:
        self.broker = broker
        self.ctx = ctx
        self.oracle = _QuietRegistry(ctx.registry.root)
        self.publishers: dict[str, RawPublisher] = {}
        self.expected_invalid = self.invalid()
        self.sent = 0
        self.refused = 0
        self.topics_sent: set[str] = set()  # to tell the service's publishes from ours on topics we share

    def invalid(self) -> int:
        return sum(self.ctx.registry.invalid.values())

    def delivered(self, topic: str) -> bool:
        """Whether the broker sends ``topic`` to the service: one of its bus subscriptions matches it."""
        return any(mqtt.topic_matches_sub(f, topic) for f in {s.filter for s in self.ctx.bus._subs})

    def account(self, name: str, params: dict[str, str]) -> str:
        spec = self.ctx.registry.spec(name)
        if "service" in spec.params and spec.own_only:
            return params["service"]
        return next(w for w in spec.writers if w != self.ctx.name) if len(spec.writers) > 1 else spec.writers[0]

    def publisher(self, account: str) -> RawPublisher:
        pub = self.publishers.get(account)
        if pub is None:
            pub = self.publishers[account] = RawPublisher(self.broker.port, account, self.broker.password(account))
        return pub

    def restart_command(self, name: str, topic: str, payload: bytes) -> bool:
        """A valid ``restart`` would stop the test process (the runtime sends itself SIGTERM)."""
        if name != "service.command":
            return False
        model = self.oracle.parse(topic, payload)
        return model is not None and getattr(model, "action", None) == "restart"

    async def send(self, batch: Iterable[Message], timeout: float = 10.0) -> list[bool]:  # noqa: ASYNC109
        """Publish ``batch``; returns per message whether the service had to refuse it. Waits until the
        service has counted every refused one and a refused fence message each account sends after its part
        of the batch (so that it has taken every message before them)."""
        refused: list[bool] = []
        fences: dict[str, str] = {}  # per account: its last topic (the broker keeps one publisher's order)
        for name, params, payload in batch:
            topic = self.oracle.topic(name, **params)
            if self.restart_command(name, topic, payload):
                refused.append(False)
                continue
            # a topic the service does not subscribe to (another EVSE's, where it follows its own only) is
            # published all the same, but the broker does not send it: nothing to refuse or count there
            bad = self.oracle.refused(topic, payload) and self.delivered(topic)
            refused.append(bad)
            acct = self.account(name, params)
            self.publisher(acct).publish(topic, payload)
            self.topics_sent.add(topic)
            self.sent += 1
            if bad:
                self.expected_invalid += 1
                self.refused += 1
            if self.delivered(topic):
                fences[acct] = topic
        for acct, topic in fences.items():
            self.publisher(acct).publish(topic, b"fence")
            self.expected_invalid += 1
        for pub in self.publishers.values():
            await pub.flush()
        await wait_for(lambda: self.invalid() >= self.expected_invalid, timeout,
                       what=f"{self.ctx.name} counting {self.expected_invalid} refused messages (has {self.invalid()})")
        assert self.invalid() == self.expected_invalid, \
            f"{self.ctx.name} counted {self.invalid()} refused messages, {self.expected_invalid} were refused"
        return refused

    def close(self) -> None:
        for pub in self.publishers.values():
            pub.close()


def messages(topics: dict[str, dict[str, list[str]]]) -> st.SearchStrategy[Message]:
    """A message on one of ``topics`` (topic name -> candidate values per parameter) with a payload from
    :func:`payloads_for` the topic's valid template."""

    @st.composite
    def one(draw: st.DrawFn) -> Message:
        name = draw(st.sampled_from(sorted(topics)))
        params = {k: draw(st.sampled_from(v)) for k, v in topics[name].items()}
        return name, params, draw(payloads_for(template(name, **params)))

    return one()


class Published:
    """What a service publishes (its topics only, health and log excluded), seen by the observer account."""

    def __init__(self, broker: Any, ctx: Any) -> None:
        from chargegate.topics import Registry

        self.registry = Registry(ctx.registry.root)
        self.service = ctx.name
        self.topics: list[str] = []
        self.client = RawPublisher(broker.port, "observer", broker.password("observer"))
        self.client.client.on_message = self._on_message
        self.client.client.subscribe(f"{ctx.registry.root}/#", qos=0)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        resolved = self.registry.resolve(msg.topic)
        if resolved is None or resolved[0].name in ("service.health", "service.log"):
            return
        if self.service in resolved[0].writers:
            self.topics.append(msg.topic)

    def mentioning(self, ids: Iterable[str]) -> list[str]:
        want = set(ids)
        return [t for t in list(self.topics) if want & set(t.split("/"))]

    def close(self) -> None:
        self.client.close()


def state_files(root: Any) -> dict[str, tuple[int, str]]:
    """Every file below ``root`` with its size and SHA-256 (SQLite's -wal/-shm left out: see the callers)."""
    import hashlib
    from pathlib import Path

    out: dict[str, tuple[int, str]] = {}
    base = Path(root)
    if not base.exists():
        return out
    for f in sorted(base.rglob("*")):
        if f.is_file() and not f.name.endswith(("-wal", "-shm", "-journal")):
            data = f.read_bytes()
            out[str(f.relative_to(base))] = (len(data), hashlib.sha256(data).hexdigest())
    return out


def unknown_id_flood(ids: list[str], topics: Iterable[tuple[str, str]], refused_on: tuple[str, str] | None = None,
                     refused: int = 1000) -> list[Message]:
    """A valid message per id on each ``(topic name, id parameter)``, then ``refused`` invalid ones (an
    ``online`` that is no boolean) on as many distinct topics of ``refused_on``."""
    batch: list[Message] = [(name, {key: i}, json.dumps(template(name, **{key: i})).encode())
                            for i in ids for name, key in topics]
    if refused_on is not None:
        name, key = refused_on
        batch += [(name, {key: i}, json.dumps({key: i, "online": "yes"}).encode()) for i in ids[:refused]]
    return batch


def warning_summary(entries: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return collections.Counter(str(e.get("event"))[:80] for e in entries).most_common(8)


# -- the three assertions every bus fuzz test makes ------------------------------------------------------------

async def any_payload_round(bus: BusFuzz, logs: Logs, ctx: Any, task: asyncio.Task[Any],
                            batch: list[Message]) -> None:
    """``batch`` into the service: every refused payload counted (see :meth:`BusFuzz.send`), no error logged,
    the service task alive and no task restarted."""
    mark = logs.mark()
    await bus.send(batch)
    assert logs.errors(mark) == []
    assert not task.done(), task
    assert dict(ctx.task_restarts) == {}


def refused_only(bus: BusFuzz, batch: list[Message]) -> list[Message]:
    """The messages of ``batch`` the service has to refuse."""
    return [msg for msg in batch if bus.oracle.refused(bus.oracle.topic(msg[0], **msg[1]), msg[2])]


async def unknown_ids_round(bus: BusFuzz, logs: Logs, ctx: Any, ids: list[str], topics: Iterable[tuple[str, str]],
                            refused_on: tuple[str, str] | None = None) -> None:
    """A valid message per unknown id on each of ``topics`` and 1000 refused ones (see
    :func:`unknown_id_flood`): every container of the service within 1024 entries, at most 30 warnings."""
    mark = logs.mark()
    flood = unknown_id_flood(ids, topics, refused_on=refused_on)
    assert sum(await bus.send(flood, timeout=60)) == (1000 if refused_on else 0)
    big = largest(ctx)
    assert big[0][0] <= 1024, big
    warnings = logs.since(mark)
    assert len(warnings) <= 30, warning_summary(warnings)
