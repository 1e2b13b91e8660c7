"""The topic registry: every topic of the contract, bound to one payload model.

One place says, for each topic pattern, which model validates it, its QoS, whether it is
retained and which services may write it (the broker ACL is generated from this table).

Build a topic with :func:`Registry.topic`; validate an incoming message with
:meth:`Registry.parse`, which never raises: a bad payload is counted, logged with the topic and
the error (rate-limited: once per topic and error a minute, at most ``REJECT_LINES_PER_MINUTE``
lines a minute, the rest summarised; see :mod:`chargegate.ratelog`), and ``None`` is returned.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import structlog
from pydantic import BaseModel, ValidationError

from chargegate import payloads as p
from chargegate import strict_json
from chargegate.ratelog import LogLimiter

log = structlog.get_logger("chargegate.topics")

DEFAULT_ROOT = "chargegate"
_PARAM = re.compile(r"\{([a-z_]+)\}")
_SEGMENT_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")

SERVICES = ("evse-poller", "ocpp-gateway", "load-controller", "smgw-link", "history", "web")
# broker accounts that write topics but are no service: the household (web page, Home Assistant, scripts)
USERS = ("user",)
REJECT_LINES_PER_MINUTE = 10  # "invalid message dropped" lines per registry and minute (the counter counts all)
RESOLVE_CACHE_SIZE = 20_000  # topics whose spec and parameters are remembered (see Registry.resolve)


@dataclass(frozen=True)
class TopicSpec:
    name: str  # short name used in code, e.g. "evse.status"
    pattern: str  # relative to the root, e.g. "evse/{evse_id}/status"
    model: type[p.Payload]
    retained: bool
    qos: int
    writers: tuple[str, ...]
    doc: str = ""
    # per-service topics (``{service}`` in the pattern): True = each writer writes only its own
    # (health, log); False = the writers address any service (commands)
    own_only: bool = True
    params: tuple[str, ...] = field(init=False)
    _regex: re.Pattern[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        params = tuple(_PARAM.findall(self.pattern))
        regex = "^" + _PARAM.sub(r"(?P<\1>[^/]+)", re.escape(self.pattern).replace(r"\{", "{").replace(r"\}", "}"))
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "_regex", re.compile(regex + "$"))

    @property
    def wildcard(self) -> str:
        """The pattern as an MQTT subscription (``+`` for every parameter)."""
        return _PARAM.sub("+", self.pattern)

    def match(self, relative: str) -> dict[str, str] | None:
        m = self._regex.match(relative)
        return m.groupdict() if m else None


SPECS: tuple[TopicSpec, ...] = (
    TopicSpec("evse.status", "evse/{evse_id}/status", p.EvseStatus, True, 1, ("evse-poller", "ocpp-gateway"),
              "IEC 61851 state, derived state, phases, currents, power, energy, session, applied setpoint"),
    TopicSpec("evse.setpoint", "evse/{evse_id}/setpoint", p.Setpoint, True, 1, ("load-controller",),
              "per-phase current limit and phase count with valid_until, source and sequence number"),
    TopicSpec("evse.limit", "evse/{evse_id}/limit", p.EvseLimit, True, 1, ("ocpp-gateway",),
              "a per-EVSE limit from the OCPP backend (SetChargingProfile), applied by the controller"),
    TopicSpec("evse.command", "evse/{evse_id}/command", p.EvseCommand, False, 1, ("ocpp-gateway",),
              "remote start/stop and availability from the backend, carried out by the EVSE's driver"),
    TopicSpec("evse.command_result", "evse/{evse_id}/command/result", p.EvseCommandResult, False, 1,
              ("evse-poller", "ocpp-gateway"), "the answer to an EVSE command"),
    TopicSpec("evse.mode", "evse/{evse_id}/mode", p.ChargingMode, True, 1, ("history",),
              "the charging mode in force (off, now, rules, solar, solar+min) and the session target"),
    TopicSpec("evse.mode_set", "evse/{evse_id}/mode/set", p.ModeCommand, False, 1,
              ("user", "smgw-link", "web"), "set the charging mode, the session target or the maximum current "
                                           "(the user account, the admin API, the web page)"),
    TopicSpec("history.session", "history/session/{evse_id}", p.SessionRecord, True, 1, ("history",),
              "the EVSE's last recorded session (open or finished): energy, cost, tariff periods"),
    TopicSpec("history.control", "history/control/{kind}", p.ControlRecord, True, 1, ("history",),
              "the latest recorded control action of a kind (limit, failsafe, link_outage)"),
    TopicSpec("meter.reading", "meter/{meter_id}/reading", p.MeterReading, True, 1, ("evse-poller",),
              "per-phase currents, voltages, power and energy of a meter"),
    TopicSpec("grid.limit", "grid/limit/{source}", p.GridLimit, True, 1, ("smgw-link",),
              "a limit on the grid connection or the controllable devices, one topic per source"),
    TopicSpec("tariff.current", "tariff/current", p.TariffCurrent, True, 1, ("smgw-link",),
              "the tariff period in force"),
    TopicSpec("tariff.schedule", "tariff/schedule", p.TariffSchedule, True, 1, ("smgw-link",),
              "announced tariff periods"),
    TopicSpec("link.smgw", "link/smgw", p.SmgwLinkStatus, True, 1, ("smgw-link",),
              "SMGW link state, certificate expiry, byte counters"),
    TopicSpec("controller.allocation", "controller/allocation", p.Allocation, True, 0, ("load-controller",),
              "per EVSE: the current granted and the limit or rule that bound it"),
    TopicSpec("service.health", "service/{service}/health", p.Health, True, 1, SERVICES,
              "per service: online/offline (last will), version, uptime, config version, counters"),
    TopicSpec("service.log", "service/{service}/log", p.LogRecord, False, 0, SERVICES,
              "per service: log events (info and above) for remote reading"),
    TopicSpec("service.command", "service/{service}/command", p.ServiceCommand, False, 1, ("smgw-link",),
              "reload/restart requests to a service (written by the admin account and smgw-link's admin API)",
              own_only=False),
    # written by the extra services of broker.extra_services, each only under its own name (not retained
    # unless the service says so); no built-in service writes it
    TopicSpec("ext.message", "ext/{service}/{topic}", p.ExtMessage, False, 1, (),
              "an extra service container's own messages (README: Adding a service); `data` is its content"),
)

# broker accounts that are no service but write a registered topic (the ACL grants them; see broker.render_acl)
ACCOUNT_WRITERS: dict[str, tuple[str, ...]] = {"service.command": ("admin",)}

# the simulators' topics (demo and tests, the `sim` account reads and writes sim/#): free JSON, no model
SIM_TOPICS: tuple[dict[str, Any], ...] = (
    {"pattern": "sim/{evse_id}/command", "model": "-", "retained": False, "qos": 1, "writers": ["sim"],
     "doc": "plug or unplug a simulated car: {action: plug|unplug, phases, max_current_a} (chargegate sim)"},
    {"pattern": "sim/{evse_id}/draw", "model": "-", "retained": True, "qos": 1, "writers": ["sim"],
     "doc": "what the simulated car draws (state, currents per phase, energy), on every change and every second"},
)


class TopicError(ValueError):
    pass


class Registry:
    """Topic registry bound to one root (``chargegate`` by default)."""

    def __init__(self, root: str = DEFAULT_ROOT, specs: tuple[TopicSpec, ...] = SPECS) -> None:
        root = root.strip("/")
        if not root or any(c in root for c in "+#") or any(not s for s in root.split("/")):
            raise TopicError(f"invalid topic root {root!r}")
        self.root = root
        self.specs = {s.name: s for s in specs}
        self.invalid: Counter[str] = Counter()  # per topic pattern: payloads dropped
        self._resolved: dict[str, tuple[TopicSpec, dict[str, str]]] = {}  # topic -> resolve()'s answer
        self._reject_log = LogLimiter(log, per_event=REJECT_LINES_PER_MINUTE)

    def spec(self, name: str) -> TopicSpec:
        try:
            return self.specs[name]
        except KeyError:
            raise TopicError(f"unknown topic name {name!r}") from None

    def topic(self, name: str, **params: str) -> str:
        """Build the full topic string for ``name`` with its parameters."""
        spec = self.spec(name)
        missing = set(spec.params) - set(params)
        extra = set(params) - set(spec.params)
        if missing or extra:
            raise TopicError(f"topic {name}: missing {sorted(missing)} extra {sorted(extra)}")
        values = {}
        for k, v in params.items():
            v = str(v)
            if not _SEGMENT_OK.match(v):
                raise TopicError(f"topic {name}: invalid {k} {v!r}")
            values[k] = v
        return f"{self.root}/{spec.pattern.format(**values)}"

    def subscription(self, name: str, **params: str) -> str:
        """An MQTT subscription for ``name``: given parameters fixed, the others ``+``. A given parameter must be
        a valid topic segment (no ``+``, ``#`` or ``/`` widening the filter) and one of the topic's."""
        spec = self.spec(name)
        extra = set(params) - set(spec.params)
        if extra:
            raise TopicError(f"topic {name}: extra {sorted(extra)}")
        for k, v in params.items():
            if not _SEGMENT_OK.match(str(v)):
                raise TopicError(f"topic {name}: invalid {k} {v!r}")
        parts = {k: params.get(k, "+") for k in spec.params}
        return f"{self.root}/{spec.pattern.format(**parts)}"

    def resolve(self, topic: str) -> tuple[TopicSpec, dict[str, str]] | None:
        """The spec and parameters of ``topic``. A service sees the same few hundred topics over and over
        (a burst of 100 setpoints, a poller's statuses): the answer is kept per topic (bounded: cleared when
        full) instead of trying the patterns' regular expressions one after another every time."""
        hit = self._resolved.get(topic)
        if hit is not None:
            return hit[0], dict(hit[1])  # the caller may keep (or change) its own copy of the parameters
        prefix = self.root + "/"
        if not topic.startswith(prefix):
            return None
        rel = topic[len(prefix):]
        for spec in self.specs.values():
            params = spec.match(rel)
            if params is not None:
                if len(self._resolved) >= RESOLVE_CACHE_SIZE:
                    self._resolved.clear()
                self._resolved[topic] = (spec, dict(params))
                return spec, params
        return None

    def parse(self, topic: str, payload: bytes | str) -> tuple[TopicSpec, dict[str, str], p.Payload] | None:
        """Validate an incoming message. Returns ``None`` (logged and counted) when it is bad."""
        resolved = self.resolve(topic)
        if resolved is None:
            self._reject(topic, "unknown topic", "?")
            return None
        spec, params = resolved
        if not payload:
            # an empty retained message clears the topic: not an error, nothing to deliver
            return None
        try:
            data = strict_json.loads(payload)
        except ValueError as e:
            self._reject(topic, str(e), spec.name)
            return None
        if not isinstance(data, dict):
            self._reject(topic, f"payload must be a JSON object, got {type(data).__name__}", spec.name)
            return None
        try:
            model = spec.model.model_validate(data)
        except ValidationError as e:
            self._reject(topic, format_validation_error(e), spec.name)
            return None
        except (ValueError, TypeError, RecursionError) as e:  # never out of the parser, whatever the input
            self._reject(topic, f"payload could not be validated: {type(e).__name__}: {str(e)[:200]}", spec.name)
            return None
        # the id inside the payload must agree with the topic
        for key, value in params.items():
            inner = getattr(model, key, None)
            if inner is not None and str(inner) != value:
                self._reject(topic, f"{key} {inner!r} in the payload does not match the topic", spec.name)
                return None
        return spec, params, model

    def _reject(self, topic: str, error: str, pattern: str) -> None:
        self.invalid[pattern] += 1
        self._reject_log.warning(f"{topic[:200]}\n{error[:120]}", "invalid message dropped", subject="topics",
                                 topic=topic, error=error, dropped_total=sum(self.invalid.values()))

    def describe(self, sim: bool = True) -> list[dict[str, Any]]:
        """Every topic with its model, retained flag, QoS and writers (the services of the registry and the
        accounts the ACL lets write it), and with ``sim`` the simulators' topics."""
        out = [
            {"topic": f"{self.root}/{s.pattern}", "model": s.model.__name__, "retained": s.retained, "qos": s.qos,
             "writers": [*s.writers, *ACCOUNT_WRITERS.get(s.name, ())], "doc": s.doc}
            for s in self.specs.values()
        ]
        if sim:
            out += [{"topic": f"{self.root}/{t['pattern']}", **{k: v for k, v in t.items() if k != "pattern"}}
                    for t in SIM_TOPICS]
        return out


def format_validation_error(e: ValidationError, limit: int = 5) -> str:
    parts = []
    for err in e.errors()[:limit]:
        loc = format_loc(err.get("loc", ()))
        parts.append(f"{loc or '(payload)'}: {err.get('msg')}")
    more = e.error_count() - limit
    if more > 0:
        parts.append(f"... and {more} more")
    return "; ".join(parts)


def format_loc(loc: tuple[Any, ...] | list[Any]) -> str:
    """``('evses', 2, 'max_current_a')`` -> ``evses[2].max_current_a``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def model_for(name: str) -> type[BaseModel]:
    return {s.name: s.model for s in SPECS}[name]
