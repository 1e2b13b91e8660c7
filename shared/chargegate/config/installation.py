"""The installation: circuit tree, EVSEs and meters."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from chargegate.config.base import Ident, Port, Secret, Strict

Phase = Literal[1, 2, 3]


class Circuit(Strict):
    """A node of the circuit tree: the grid connection at the root, sub-distributions below."""

    id: Ident
    name: str | None = None
    fuse_a: float | None = Field(default=None, gt=0, le=4000, description="fuse rating per phase in A")
    max_current_a: Annotated[list[Annotated[float, Field(ge=0, le=4000)]], Field(min_length=3, max_length=3)] | None = (
        None
    )
    max_power_w: float | None = Field(default=None, gt=0, le=10_000_000)
    meter: Ident | None = Field(default=None, description="meter measuring everything below this node")
    children: list[Circuit] = Field(default_factory=list)

    @model_validator(mode="after")
    def _has_limit(self) -> Circuit:
        if self.fuse_a is None and self.max_current_a is None and self.max_power_w is None:
            raise ValueError(f"circuit {self.id} needs fuse_a, max_current_a or max_power_w")
        return self

    def phase_limits(self) -> list[float] | None:
        if self.max_current_a is not None:
            lim = list(self.max_current_a)
            if self.fuse_a is not None:
                lim = [min(x, self.fuse_a) for x in lim]
            return lim
        if self.fuse_a is not None:
            return [self.fuse_a] * 3
        return None

    def walk(self) -> list[Circuit]:
        out = [self]
        for c in self.children:
            out.extend(c.walk())
        return out


class SerialLine(Strict):
    port: str = Field(description="serial device, e.g. /dev/ttyUSB0")
    baudrate: int = Field(default=9600, ge=300, le=1_000_000)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8


class ModbusConnection(Strict):
    """How to reach a polled device (Modbus, or a meter's local HTTP API). ``transport`` defaults to the
    profile's."""

    profile: str = Field(min_length=1, description="device profile name, e.g. alfen-eve, sdm630, shelly-pro-3em")
    transport: Literal["tcp", "rtu", "ascii", "rtu-over-tcp", "http"] | None = None
    host: str | None = None
    port: Port | None = None
    serial: SerialLine | None = None
    device_id: int | None = Field(default=None, ge=0, le=255, description="Modbus unit id (RTU: 1..247; TCP: 0..255)")
    timeout_s: float = Field(default=0.5, gt=0, le=30)
    retries: int = Field(default=2, ge=0, le=10)
    poll_interval_s: float | None = Field(default=None, ge=0.1, le=60,
                                          description="overrides poller.poll_interval_s for this device")
    instance: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9-]{0,30}$",
                                 description="the evse-poller instance that polls this device (one of "
                                             "poller.instances; required when those are given)")

    @model_validator(mode="after")
    def _where(self) -> ModbusConnection:
        if self.transport in ("tcp", "rtu-over-tcp", "http") and not self.host:
            raise ValueError(f"transport {self.transport} needs host")
        if self.transport in ("rtu", "ascii") and self.serial is None:
            raise ValueError(f"transport {self.transport} needs serial")
        if self.transport == "http" and self.serial is not None:
            raise ValueError("transport http takes host (and port), not serial")
        if self.host is None and self.serial is None:
            raise ValueError("needs host (Modbus TCP) or serial (Modbus RTU)")
        return self


class OcppLocal(Strict):
    """An EVSE that is a connector of an OCPP wallbox connecting to chargegate."""

    charge_box_id: str = Field(min_length=1, max_length=48)
    connector_id: int = Field(default=1, ge=1, le=16)
    password: Secret | None = Field(default=None, description="HTTP Basic password (security profile 1/2)")
    version: Literal["1.6", "2.0.1"] | None = Field(
        default=None, description="OCPP version the wallbox speaks; none: negotiated (the simulator uses 1.6)")


class Upstream(Strict):
    """How this EVSE appears at the supplier's OCPP backend (one charge point per EVSE)."""

    enabled: bool = True
    charge_box_id: str | None = Field(default=None, min_length=1, max_length=48,
                                      description="defaults to the EVSE id")
    url: str | None = Field(default=None, description="defaults to ocpp.backend.url")
    password: Secret | None = None
    version: Literal["1.6", "2.0.1"] | None = None


class Evse(Strict):
    id: Ident
    name: str | None = None
    circuit: Ident = Field(description="the circuit node this EVSE hangs from")
    phases: Literal[1, 3] = 3
    phase_rotation: Annotated[list[Phase], Field(min_length=1, max_length=3)] = Field(
        default_factory=lambda: [1, 2, 3],
        description="grid phase of each EVSE phase, e.g. [2, 3, 1]; a 1-phase EVSE lists one",
    )
    min_current_a: float = Field(default=6.0, ge=0, le=80)
    max_current_a: float = Field(default=16.0, gt=0, le=80)
    safe_current_a: float = Field(default=6.0, ge=0, le=80,
                                  description="applied when no valid setpoint arrives (0 = off)")
    priority: int = Field(default=0, ge=-100, le=100, description="higher is served first")
    phase_switching: bool = False
    controllable: bool = Field(default=True, description="a controllable device in the sense of §14a EnWG")
    id_tag: str | None = Field(default=None, max_length=20, description="idTag used upstream for this EVSE")
    modbus: ModbusConnection | None = None
    ocpp: OcppLocal | None = None
    upstream: Upstream | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Evse:
        if (self.modbus is None) == (self.ocpp is None):
            raise ValueError("an EVSE needs exactly one of modbus or ocpp")
        if self.min_current_a > self.max_current_a:
            raise ValueError(f"min_current_a {self.min_current_a} is above max_current_a {self.max_current_a}")
        if self.safe_current_a > self.max_current_a:
            raise ValueError(f"safe_current_a {self.safe_current_a} is above max_current_a {self.max_current_a}")
        if len(self.phase_rotation) != self.phases:
            raise ValueError(f"phase_rotation lists {len(self.phase_rotation)} phases, the EVSE has {self.phases}")
        if len(set(self.phase_rotation)) != len(self.phase_rotation):
            raise ValueError("phase_rotation names a grid phase twice")
        if self.phase_switching and self.phases != 3:
            raise ValueError("phase_switching needs a 3-phase EVSE")
        return self

    @property
    def kind(self) -> Literal["modbus", "ocpp"]:
        return "modbus" if self.modbus is not None else "ocpp"


class Meter(Strict):
    id: Ident
    name: str | None = None
    role: Literal["grid", "circuit", "pv", "other"] = "grid"
    modbus: ModbusConnection
    invert: bool = Field(default=False, description="flip the sign of power/current (meter mounted reversed)")
