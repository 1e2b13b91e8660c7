"""The CLS.EEDI local device: what chargegate answers to the operator's backend.

Decisions where the spec leaves room (documented in the README):

* errorNumber 1 (schema): not JSON, not an object, or the message violates the official schemas.
* errorNumber 2 (protocol): another major version; a ``state`` sent to us; a control that is
  empty, names several top-level elements without being a reply to our ``read``, carries a
  consumption and a production element together, a limit duration of 0 (must be positive), or a
  limit or failsafe above MAX_POWER_W (10 MW, the bound of every power on the bus).
* errorNumber 4 (not supported): limits/failsafes while ``functions.power_reduction`` is off,
  production limits/failsafes (LPP: chargegate controls consumption only), ``trust`` (chargegate
  keeps no SHIP connections).
* errorNumber 3 (execution): the limit could not be handed to the load controller (the bus is
  down, or, with ``clseedi.require_controller``, the load-controller is not online).
* A control that replies to our ``read`` (has ``relation``) is applied without an ack; acks are
  never answered; a repeated message (same id and content, e.g. an MQTT re-delivery) gets the
  same ack again and is not applied twice.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from typing import Any

import structlog

from chargegate import strict_json
from chargegate.config.smgw import Smgw
from chargegate.payloads import MAX_POWER_W
from smgw_link.clseedi import messages as m
from smgw_link.control import Notify, OperatorControl
from smgw_link.measurements import Measurements

log = structlog.get_logger("smgw_link.clseedi")

ControllerCheck = Callable[[], tuple[bool, str]]


class ClsEediDevice:
    def __init__(self, cfg: Smgw, control: OperatorControl, measurements: Measurements,
                 controller_ok: ControllerCheck, on_change: Callable[[], None] | None = None,
                 counters: Any = None) -> None:
        self.cfg = cfg
        self.control = control
        self.measurements = measurements
        self.controller_ok = controller_ok
        self.on_change = on_change or (lambda: None)
        self.counters = counters if counters is not None else {}
        self._seen: OrderedDict[str, int] = OrderedDict()

    @property
    def source(self) -> str:
        return self.cfg.clseedi.event_source

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    # -- incoming ------------------------------------------------------------------------------------
    def handle(self, payload: bytes, now: datetime) -> list[dict[str, Any]]:
        """Process one message from the backend; returns the messages to send back."""
        self._count("clseedi_rx")
        try:
            obj = strict_json.loads(payload)  # NaN, 5000-digit integers, 100k-deep nesting: a ValueError
        except ValueError as e:
            return [self._nack(None, m.SCHEMA_ERROR, f"not JSON: {e}")]
        if not isinstance(obj, dict):
            return [self._nack(None, m.SCHEMA_ERROR, f"a message must be a JSON object, not {type(obj).__name__}")]
        msg_id = obj.get("id") if isinstance(obj.get("id"), str) else None
        mtype = obj.get("type")
        errors = m.schema_errors(obj)
        if errors:
            if mtype == m.ACK:
                log.warning("invalid ack from the backend ignored", id=msg_id, errors=errors)
                self._count("clseedi_invalid")
                return []
            return [self._nack(msg_id, m.SCHEMA_ERROR, "; ".join(errors), mtype=mtype)]
        data = obj["data"]
        if not isinstance(data, dict) or not isinstance(data.get("protocol"), str):
            return [self._nack(msg_id, m.SCHEMA_ERROR, "data.protocol missing", mtype=mtype)]
        if mtype == m.ACK:
            log.info("ack from the backend", relation=obj.get("relation"), error_number=data.get("errorNumber"))
            return []
        if m.major(data["protocol"]) != m.MAJOR:
            return [self._nack(msg_id, m.PROTOCOL_ERROR, f"protocol {data['protocol']!r} is not version "
                                                          f"{m.MAJOR}.x", mtype=mtype)]
        if mtype == m.READ:
            params = data.get("parameters") or None
            self._count("clseedi_read")
            return [self.state(now, params, relation=msg_id)]
        if mtype == m.STATE:
            return [self._nack(msg_id, m.PROTOCOL_ERROR, "a backend does not send state to a local device",
                               mtype=mtype)]
        # control
        relation = obj.get("relation")
        key = hashlib.sha256(payload).hexdigest()
        if relation is None and key in self._seen:
            log.info("repeated control message, same ack again", id=msg_id)
            return [m.ack(self.source, msg_id, self._seen[key])]
        result = self._control(data, relation is not None, now, msg_id)
        if relation is not None:
            return []  # a reply to our read is not acknowledged
        if result == m.OK:  # a refused message may be retried and is evaluated again
            self._seen[key] = result
        while len(self._seen) > 256:
            self._seen.popitem(last=False)
        return [m.ack(self.source, msg_id, result)]

    def _nack(self, msg_id: str | None, number: int, why: str, mtype: Any = None) -> dict[str, Any]:
        self._count("clseedi_invalid" if number == m.SCHEMA_ERROR else f"clseedi_error_{number}")
        log.warning("CLS.EEDI message rejected", id=msg_id, type=mtype, error_number=number, reason=why[:500])
        return m.ack(self.source, msg_id, number)

    # -- control ----------------------------------------------------------------------------------------
    def _control(self, data: dict[str, Any], reply: bool, now: datetime, msg_id: str | None) -> int:
        present = [k for k in m.CONTROL_PROPERTIES if k in data]
        if not present:
            return self._refuse(m.PROTOCOL_ERROR, "empty control message", msg_id)
        if len(present) > 1 and not reply:
            return self._refuse(m.PROTOCOL_ERROR, f"control carries {present}; only one top-level element is "
                                                  f"allowed outside a reply to read", msg_id)
        # check everything first, then apply: a refused message changes nothing
        results = {k: self._check(k, data[k], msg_id) for k in present}
        worst = max(results.values())
        if not reply and worst != m.OK:
            return worst
        applied = False
        for k in present:
            if results[k] == m.OK:
                self._apply(k, data[k], now, msg_id)
                applied = True
        if applied:
            self.on_change()
        return m.OK

    def _refuse(self, number: int, why: str, msg_id: str | None, warn: bool = False) -> int:
        """Answer ``number``. "Not supported" (an element chargegate never handles) is logged at info;
        everything else, and a limit refused because a function is switched off (``warn``: the operator
        believes it limits the site, and it does not), as a warning."""
        self._count(f"clseedi_error_{number}")
        level = log.info if number == m.NOT_SUPPORTED and not warn else log.warning
        level("CLS.EEDI control refused", id=msg_id, error_number=number, reason=why)
        return number

    @staticmethod
    def _power(elem: Any) -> dict[str, Any] | None:
        if not isinstance(elem, dict):
            return None
        power = elem.get("power")
        active = power.get("active") if isinstance(power, dict) else None
        return active if isinstance(active, dict) else None

    def _check(self, key: str, elem: Any, msg_id: str | None) -> int:
        if key in ("limits", "failsafes"):
            active = self._power(elem)
            if not active or not ({"consumption", "production"} & set(active)):
                return self._refuse(m.PROTOCOL_ERROR, f"{key} names neither consumption nor production", msg_id)
            if "consumption" in active and "production" in active:
                return self._refuse(m.PROTOCOL_ERROR, f"{key}: consumption and production in one message", msg_id)
            if "production" in active:
                return self._refuse(m.NOT_SUPPORTED, f"{key}: production (LPP) is not controlled by chargegate",
                                    msg_id)
            if key == "limits" and active["consumption"].get("duration") == 0:
                return self._refuse(m.PROTOCOL_ERROR, "limit duration must be positive", msg_id)
            watts = active["consumption"]["value"] if key == "limits" else active["consumption"]
            if watts > MAX_POWER_W:  # schema-valid (int64), but beyond any connection behind an SMGW
                return self._refuse(m.PROTOCOL_ERROR, f"{key}: {watts} W is above the {MAX_POWER_W} W a site "
                                                      f"connection can carry", msg_id)
            if not self.cfg.functions.power_reduction:
                return self._refuse(m.NOT_SUPPORTED, f"{key}: function power_reduction is switched off in the "
                                                     f"configuration (smgw.functions.power_reduction)", msg_id,
                                    warn=True)
            ok, why = self.controller_ok()
            if not ok:
                return self._refuse(m.EXECUTION_ERROR, f"{key} not applied: {why}", msg_id)
            return m.OK
        if key == "trust":
            return self._refuse(m.NOT_SUPPORTED, "trust: chargegate maintains no SHIP connections", msg_id)
        if key == "notify":
            return m.OK
        return self._refuse(m.NOT_SUPPORTED, f"{key} not supported", msg_id)

    def _apply(self, key: str, elem: Any, now: datetime, msg_id: str | None) -> None:
        if key == "limits":
            c = self._power(elem)["consumption"]  # type: ignore[index]
            self.control.set_limit(int(c["value"]), bool(c["active"]), c.get("duration"), now, msg_id)
            self._count("clseedi_limits")
            log.info("operator limit accepted", id=msg_id, value_w=c["value"], active=c["active"],
                     duration_s=c.get("duration"))
        elif key == "failsafes":
            v = int(self._power(elem)["consumption"])  # type: ignore[index]
            self.control.set_failsafe(v)
            self._count("clseedi_failsafes")
            log.info("operator failsafe accepted", id=msg_id, failsafe_power_w=v)
        elif key == "notify":
            interval = max(int(elem["interval"]), int(self.cfg.clseedi.notify_min_interval_s + 0.999))
            sources = [s for s in elem["source"] if isinstance(s, str)]
            self.control.set_notify(Notify(interval, int(elem["endTime"]), sources))
            log.info("measurement notifications configured", id=msg_id, interval_s=interval,
                     end_time=elem["endTime"], sources=sources)

    # -- outgoing -------------------------------------------------------------------------------------
    def use_cases(self) -> list[str]:
        out = []
        if self.cfg.functions.power_reduction and (not self.cfg.clseedi.require_controller
                                                   or self.controller_ok()[0]):
            out.append("lpc")
        return out + self.measurements.use_cases()

    def state_data(self, now: datetime, parameters: list[str] | None = None) -> dict[str, Any]:
        want = set(parameters) if parameters else set(m.STATE_PROPERTIES)
        data: dict[str, Any] = {"protocol": m.PROTOCOL}
        c = self.control
        lpc_on = self.cfg.functions.power_reduction
        if "limits" in want and lpc_on and c.lpc is not None:
            limit: dict[str, Any] = {"value": c.lpc.value_w, "active": c.lpc_binding(now)}
            remaining = c.lpc.remaining_s(now)
            if limit["active"] and remaining is not None:
                limit["duration"] = remaining
            data["limits"] = {"power": {"active": {"consumption": limit}}}
        if "failsafes" in want and lpc_on:
            data["failsafes"] = {"power": {"active": {"consumption": int(c.failsafe_power_w)}}}
        if "supportedEebusUseCases" in want:
            data["supportedEebusUseCases"] = self.use_cases()
        if "measurements" in want:
            sets = self.measurements.sets()
            if sets:
                data["measurements"] = sets
        if "notify" in want and c.notify is not None and c.notify.end_time > now.timestamp():
            data["notify"] = {"interval": c.notify.interval_s, "endTime": c.notify.end_time,
                              "source": c.notify.sources}
        data["timestamp"] = int(now.timestamp())
        return data

    def state(self, now: datetime, parameters: list[str] | None = None, relation: str | None = None) -> dict[str, Any]:
        return m.envelope(m.STATE, self.source, self.state_data(now, parameters), relation)

    def notification(self, now: datetime) -> dict[str, Any] | None:
        """The periodic measurement state, while notifications are configured and not ended."""
        n = self.control.notify
        if n is None or n.end_time <= now.timestamp():
            return None
        sets = self.measurements.sets([s for s in n.sources if s in ("gcp", "controllable")])
        if not sets:
            return None
        return m.envelope(m.STATE, self.source, {"protocol": m.PROTOCOL, "measurements": sets,
                                                 "timestamp": int(now.timestamp())})
