"""Settings of the evse-poller service (Modbus wallboxes and meters)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from chargegate.config.base import Strict

# an evse-poller instance: its process runs as ``evse-poller.<name>`` (broker account, health topic)
InstanceName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,30}$")]
POLLER = "evse-poller"


def instance_service(instance: str | None) -> str:
    """The service name (broker account, ``service/<name>/health``) of an evse-poller instance."""
    return POLLER if instance is None else f"{POLLER}.{instance}"


class Poller(Strict):
    """``poller:`` section. Every key has a default; a device's ``modbus.poll_interval_s`` overrides."""

    poll_interval_s: float = Field(default=1.0, ge=0.1, le=60, description="poll cycle of every device")
    offline_after_failures: int = Field(
        default=3, ge=1, le=100, description="consecutive failed polls before a device is published offline")
    reconnect_backoff_max_s: float = Field(default=30.0, ge=0.1, le=600,
                                           description="longest wait between reconnect attempts")
    watchdog_timeout_s: float = Field(
        default=15.0, ge=2, le=3600,
        description="communication watchdog programmed into devices that have one: without Modbus traffic "
                    "for this long they fall back to their failsafe (the EVSE's safe_current_a)")
    max_current_a: float = Field(default=80.0, gt=0, le=1000,
                                 description="EVSE phase currents above this are implausible")
    meter_max_current_a: float = Field(default=1000.0, gt=0, le=10000,
                                       description="meter phase currents above this are implausible")

    instances: list[InstanceName] = Field(
        default_factory=list, max_length=64,
        description="split the Modbus devices over several evse-poller processes: each device names its "
                    "instance in modbus.instance; each instance runs as evse-poller.<name> with its own broker "
                    "account (writing only its own devices' topics) and health topic. Empty: one evse-poller")

    @model_validator(mode="after")
    def _watchdog_above_interval(self) -> Poller:
        if len(set(self.instances)) != len(self.instances):
            raise ValueError("instances: a name is given twice")
        if self.watchdog_timeout_s < 2 * self.poll_interval_s:
            raise ValueError(f"watchdog_timeout_s {self.watchdog_timeout_s} must be at least twice "
                             f"poll_interval_s {self.poll_interval_s}")
        return self
