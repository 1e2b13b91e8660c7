"""The installation as the bus shows it: the latest valid payload of every topic the page shows (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field

from chargegate import payloads as p

# what the page shows, one section each (an element ``sec-<name>``), re-rendered when its inputs change
SECTIONS = ("limits", "evses", "circuits", "link", "health", "sessions", "controls")

# which sections a topic feeds
FEEDS: dict[str, tuple[str, ...]] = {
    "evse.status": ("evses", "circuits"),
    "evse.setpoint": ("evses",),
    "evse.mode": ("evses",),
    "evse.limit": ("evses", "limits"),
    "meter.reading": ("circuits",),
    "grid.limit": ("limits",),
    "controller.allocation": ("evses", "limits", "circuits"),
    "tariff.current": ("limits",),
    "tariff.schedule": ("limits",),
    "link.smgw": ("link",),
    "service.health": ("health",),
    "history.session": ("sessions", "evses"),
    "history.control": ("controls",),
}


@dataclass
class LiveState:
    statuses: dict[str, p.EvseStatus] = field(default_factory=dict)
    setpoints: dict[str, p.Setpoint] = field(default_factory=dict)
    modes: dict[str, p.ChargingMode] = field(default_factory=dict)
    evse_limits: dict[str, p.EvseLimit] = field(default_factory=dict)
    readings: dict[str, p.MeterReading] = field(default_factory=dict)
    limits: dict[str, p.GridLimit] = field(default_factory=dict)
    allocation: p.Allocation | None = None
    tariff_current: p.TariffCurrent | None = None
    tariff_schedule: p.TariffSchedule | None = None
    link: p.SmgwLinkStatus | None = None
    health: dict[str, p.Health] = field(default_factory=dict)
    sessions: dict[str, p.SessionRecord] = field(default_factory=dict)
    controls: dict[str, p.ControlRecord] = field(default_factory=dict)
    max_keys: int = 1000  # per map: what a peer can make us remember (unconfigured ids included)

    def apply(self, name: str, params: dict[str, str], payload: p.Payload) -> tuple[str, ...]:
        """Take a validated message; returns the sections it changes."""
        def put(d: dict[str, p.Payload], key: str) -> None:
            if key in d or len(d) < self.max_keys:
                d[key] = payload

        if name == "evse.status":
            put(self.statuses, params["evse_id"])  # type: ignore[arg-type]
        elif name == "evse.setpoint":
            put(self.setpoints, params["evse_id"])  # type: ignore[arg-type]
        elif name == "evse.mode":
            put(self.modes, params["evse_id"])  # type: ignore[arg-type]
        elif name == "evse.limit":
            put(self.evse_limits, params["evse_id"])  # type: ignore[arg-type]
        elif name == "meter.reading":
            put(self.readings, params["meter_id"])  # type: ignore[arg-type]
        elif name == "grid.limit":
            put(self.limits, params["source"])  # type: ignore[arg-type]
        elif name == "controller.allocation":
            assert isinstance(payload, p.Allocation)
            self.allocation = payload
        elif name == "tariff.current":
            assert isinstance(payload, p.TariffCurrent)
            self.tariff_current = payload
        elif name == "tariff.schedule":
            assert isinstance(payload, p.TariffSchedule)
            self.tariff_schedule = payload
        elif name == "link.smgw":
            assert isinstance(payload, p.SmgwLinkStatus)
            self.link = payload
        elif name == "service.health":
            put(self.health, params["service"])  # type: ignore[arg-type]
        elif name == "history.session":
            put(self.sessions, params["evse_id"])  # type: ignore[arg-type]
        elif name == "history.control":
            put(self.controls, params["kind"])  # type: ignore[arg-type]
        else:
            return ()
        return FEEDS.get(name, ())

    def cleared(self, name: str, params: dict[str, str]) -> tuple[str, ...]:
        """An empty retained message removed a topic's state."""
        maps = {"evse.status": (self.statuses, "evse_id"), "evse.setpoint": (self.setpoints, "evse_id"),
                "evse.mode": (self.modes, "evse_id"), "evse.limit": (self.evse_limits, "evse_id"),
                "meter.reading": (self.readings, "meter_id"), "grid.limit": (self.limits, "source"),
                "service.health": (self.health, "service"), "history.session": (self.sessions, "evse_id"),
                "history.control": (self.controls, "kind")}
        if name in maps:
            d, key = maps[name]
            d.pop(params.get(key, ""), None)  # type: ignore[attr-defined]
        elif name == "controller.allocation":
            self.allocation = None
        elif name == "tariff.current":
            self.tariff_current = None
        elif name == "tariff.schedule":
            self.tariff_schedule = None
        elif name == "link.smgw":
            self.link = None
        return FEEDS.get(name, ())

    def granted(self, evse_id: str) -> p.EvseAllocation | None:
        if self.allocation is None:
            return None
        return next((e for e in self.allocation.evses if e.evse_id == evse_id), None)

    def applied_limit(self, source: str) -> dict[str, object] | None:
        """How the controller applied the grid limit of ``source`` (its ``limits.grid_limits`` entry)."""
        if self.allocation is None:
            return None
        for item in self.allocation.limits.get("grid_limits") or []:
            if isinstance(item, dict) and item.get("source") == source:
                return item
        return None
