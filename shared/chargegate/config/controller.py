"""Load controller settings and charging rules."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator

from chargegate.config.base import Ident, Strict

_HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
ALL_DAYS: list[Day] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


class TimeWindow(Strict):
    start: str = Field(description="HH:MM local time")
    end: str = Field(description="HH:MM local time; before start means across midnight")
    days: list[Day] = Field(default_factory=lambda: list(ALL_DAYS))

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, v: str) -> str:
        if not _HHMM.match(v):
            raise ValueError(f"{v!r} is not a time HH:MM")
        return v


class RuleBase(Strict):
    id: Ident
    evses: list[Ident] = Field(default_factory=list, description="EVSEs this rule applies to; empty = all")
    enabled: bool = True


class WindowRule(RuleBase):
    """Charge only inside the time windows (outside: paused)."""

    type: Literal["window"]
    windows: list[TimeWindow] = Field(min_length=1)


class TariffRule(RuleBase):
    """Charge only in the given tariff levels, and/or at most ``max_power_w`` in the others."""

    type: Literal["tariff"]
    charge_in: list[Literal["low", "normal", "high"]] = Field(default_factory=lambda: ["low"])
    max_power_w_otherwise: float = Field(default=0, ge=0, description="0 = pause outside charge_in")


class SolarRule(RuleBase):
    """Charge from measured export at the grid meter."""

    type: Literal["solar"]
    meter: Ident | None = Field(default=None, description="grid meter; default: the root circuit's meter")
    top_up_to_min: bool = Field(default=False, description="take from the grid what is missing to the minimum")
    start_threshold_w: float = Field(default=0, ge=0, description="extra export needed before starting")


class MinEnergyRule(RuleBase):
    """Make sure ``energy_wh`` is charged in the session by the deadline (overrides other rules
    once the deadline is too near to reach it otherwise)."""

    type: Literal["min_energy"]
    energy_wh: float = Field(gt=0, le=500_000)
    by: str = Field(description="HH:MM local time")

    @field_validator("by")
    @classmethod
    def _hhmm(cls, v: str) -> str:
        if not _HHMM.match(v):
            raise ValueError(f"{v!r} is not a time HH:MM")
        return v


Rule = Annotated[WindowRule | TariffRule | SolarRule | MinEnergyRule, Field(discriminator="type")]


class Controller(Strict):
    cycle_s: float = Field(default=1.0, ge=0.1, le=60)
    reserve_a: float = Field(default=0.0, ge=0, le=100, description="kept free on every node and phase")
    voltage_v: float = Field(default=230.0, ge=100, le=260, description="nominal phase voltage for W<->A")
    imbalance_limit_a: float = Field(default=20.0, gt=0, le=1000, description="max difference between phases")
    grid_limit_scope: Literal["grid", "controllable"] = Field(
        default="controllable", description="what a grid/limit without scope applies to")
    setpoint_validity_s: float = Field(default=10.0, ge=1, le=600)
    meter_timeout_s: float = Field(default=10.0, ge=1, le=600)
    evse_timeout_s: float = Field(default=10.0, ge=1, le=600)
    fallback_current_a: float = Field(default=0.0, ge=0, le=4000,
                                      description="per phase for the whole site when the grid meter is stale; "
                                                  "0 = the EVSEs' minimum only")
    failsafe_power_w: float = Field(default=4200.0, ge=0)
    failsafe_duration_s: float = Field(default=7200.0, ge=0)
    failsafe_on_link_loss: bool = True
    overdraw_penalty_s: float = Field(default=300.0, ge=0)
    min_charge_time_s: float = Field(default=60.0, ge=0)
    min_pause_s: float = Field(default=60.0, ge=0)
    ramp_step_a: float = Field(default=2.0, gt=0, description="largest increase per cycle")
    phase_switch_delay_s: float = Field(default=300.0, ge=0, description="wait before 1 -> 3 phases")
    rules: list[Rule] = Field(default_factory=list)
