"""The installation as the bus shows it: the latest payload of every state topic, and a ring
buffer of recent log events of every service (``service/<name>/log``)."""

from __future__ import annotations

import asyncio
from collections import deque
from datetime import datetime
from typing import Any

from chargegate import payloads as p
from chargegate.bus import Bus, Message

ERRORS_KEPT = 200


class BusView:
    def __init__(self, log_buffer: int = 1000) -> None:
        self.evses: dict[str, p.EvseStatus] = {}
        self.setpoints: dict[str, p.Setpoint] = {}
        self.evse_limits: dict[str, p.EvseLimit] = {}
        self.meters: dict[str, p.MeterReading] = {}
        self.grid_limits: dict[str, p.GridLimit] = {}
        self.tariff: p.TariffCurrent | None = None
        self.schedule: p.TariffSchedule | None = None
        self.link: p.SmgwLinkStatus | None = None
        self.allocation: p.Allocation | None = None
        self.health: dict[str, p.Health] = {}
        self.logs: deque[p.LogRecord] = deque(maxlen=log_buffer)
        self.errors: deque[p.LogRecord] = deque(maxlen=ERRORS_KEPT)
        self.log_seq = 0
        self.health_changed = asyncio.Event()

    def resize(self, log_buffer: int) -> None:
        if self.logs.maxlen != log_buffer:
            self.logs = deque(self.logs, maxlen=log_buffer)

    def attach(self, bus: Bus) -> None:
        bus.subscribe("evse.status", self._keyed(self.evses, "evse_id"))
        bus.subscribe("evse.setpoint", self._keyed(self.setpoints, "evse_id"))
        bus.subscribe("evse.limit", self._keyed(self.evse_limits, "evse_id"))
        bus.subscribe("meter.reading", self._keyed(self.meters, "meter_id"))
        bus.subscribe("grid.limit", self._keyed(self.grid_limits, "source"))
        bus.subscribe("tariff.current", lambda m: setattr(self, "tariff", m.payload))
        bus.subscribe("tariff.schedule", lambda m: setattr(self, "schedule", m.payload))
        bus.subscribe("link.smgw", lambda m: setattr(self, "link", m.payload))
        bus.subscribe("controller.allocation", lambda m: setattr(self, "allocation", m.payload))
        bus.subscribe("service.health", self.on_health)
        bus.subscribe("service.log", self.on_log)

    @staticmethod
    def _keyed(store: dict[str, Any], param: str) -> Any:
        def handler(msg: Message) -> None:
            store[msg.params[param]] = msg.payload
        return handler

    def on_health(self, msg: Message) -> None:
        assert isinstance(msg.payload, p.Health)
        self.health[msg.params["service"]] = msg.payload
        self.health_changed.set()
        self.health_changed = asyncio.Event()

    def on_log(self, msg: Message) -> None:
        rec = msg.payload
        assert isinstance(rec, p.LogRecord)
        self.log_seq += 1
        self.logs.append(rec)
        if rec.level in ("error", "critical"):
            self.errors.append(rec)

    def recent_logs(self, *, service: str | None = None, min_level: str = "info", limit: int = 200,
                    since: datetime | None = None) -> list[p.LogRecord]:
        order = {"debug": 0, "info": 1, "warning": 2, "error": 3, "critical": 4}
        floor = order.get(min_level, 1)
        out = [r for r in self.logs if (service is None or r.service == service) and order[r.level] >= floor
               and (since is None or r.ts >= since)]
        return out[-limit:] if limit > 0 else []

    async def wait_health(self, timeout: float) -> None:  # noqa: ASYNC109
        """Until the next health message or ``timeout`` seconds."""
        ev = self.health_changed
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except TimeoutError:
            pass
