"""Load controller settings and charging rules.

Every key has a default, so ``controller:`` may be left out entirely. Currents are per phase in A,
powers in W (converted with ``voltage_v`` per phase).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from chargegate.config.base import Ident, LocatedErrors, Strict, StrictMember, twice

_HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
ALL_DAYS: list[Day] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
TariffLevelName = Literal["low", "normal", "high"]
LimitSourceName = Literal["dso", "supplier", "ocpp_backend", "local", "failsafe"]


class TimeWindow(Strict):
    start: str = Field(description="HH:MM local time")
    end: str = Field(description="HH:MM local time; before start means across midnight; equal to start: all day")
    days: list[Day] = Field(default_factory=lambda: list(ALL_DAYS),
                            description="days on which the window starts")

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, v: str) -> str:
        if not _HHMM.match(v):
            raise ValueError(f"{v!r} is not a time HH:MM")
        return v


class RuleBase(StrictMember):
    id: Ident
    evses: list[Ident] = Field(default_factory=list, description="EVSEs this rule applies to; empty = all")
    enabled: bool = True


class WindowRule(RuleBase):
    """Charge only inside the time windows (outside: paused)."""

    type: Literal["window"]
    windows: list[TimeWindow] = Field(min_length=1)


class TariffRule(RuleBase):
    """Charge only in the given tariff levels, and/or at most ``max_power_w_otherwise`` (together, for
    all EVSEs of the rule) in the others."""

    type: Literal["tariff"]
    charge_in: list[TariffLevelName] = Field(default_factory=lambda: ["low"])
    max_power_w_otherwise: float = Field(default=0, ge=0, description="0 = pause outside charge_in")
    unknown_level: TariffLevelName = Field(
        default="normal", description="the level assumed while no tariff is known (no tariff/current, no schedule)")


class SolarRule(RuleBase):
    """Charge from measured export at the grid meter (together, for all EVSEs of the rule)."""

    type: Literal["solar"]
    meter: Ident | None = Field(default=None, description="grid meter; default: the root circuit's meter")
    top_up_to_min: bool = Field(default=False, description="take from the grid what is missing to the minimum")
    start_threshold_w: float = Field(default=0, ge=0, description="extra export needed before starting")


class MinEnergyRule(RuleBase):
    """Make sure ``energy_wh`` is charged in the session by the deadline (overrides the other rules
    once the deadline is too near to reach it otherwise)."""

    type: Literal["min_energy"]
    energy_wh: float = Field(gt=0, le=500_000)
    by: str = Field(description="HH:MM local time")
    margin_s: float = Field(default=900, ge=0, le=86_400,
                            description="start this much earlier than the time needed at full power")

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
    imbalance_limit_a: float = Field(default=20.0, gt=0, le=1000,
                                     description="max difference between phases of the EV charging currents")
    grid_limit_scope: Literal["grid", "controllable"] = Field(
        default="controllable", description="what a grid/limit without scope applies to")
    setpoint_validity_s: float = Field(default=10.0, ge=1, le=600)
    meter_timeout_s: float = Field(default=10.0, ge=1, le=600)
    evse_timeout_s: float = Field(default=10.0, ge=1, le=600)
    ev_current_max_age_s: float = Field(
        default=25.0, ge=1, le=600,
        description="an EVSE's current measured longer ago than this (OCPP: its last MeterValues) is not "
                    "subtracted from the meter: the car may draw less by now, and the non-EV load would be "
                    "underestimated")
    ev_current_fresh_s: float = Field(
        default=3.0, ge=0.1, le=60,
        description="a non-continuous EV measurement (OCPP) this young, with a meter reading as young, fixes a "
                    "floor for the non-EV load until the EVSE's next measurement (a car that lowers its draw "
                    "on its own must not make the house look lighter)")
    event_driven_sources: list[Ident] = Field(
        default_factory=lambda: ["ocpp-gateway"],
        description="services that publish EVSE status only on events (OCPP): their statuses stay fresh while "
                    "the service's health is online and recent, whatever their age")
    publisher_timeout_s: float = Field(default=35.0, ge=1, le=3600,
                                       description="a service health message older than this: the service is gone")
    unmetered_allowance_a: float = Field(
        default=0.0, ge=0, le=4000, validation_alias=AliasChoices("unmetered_allowance_a", "fallback_current_a"),
        description="per phase: what the installer declares safe for the EVSEs below a node to draw together "
                    "while the node's meter is unknown (never heard, silent, offline or implausible); the "
                    "node's capacity is otherwise taken as used. 0 (default): nothing, they are paused. "
                    "(Formerly fallback_current_a.)")
    failsafe_power_w: float = Field(default=4200.0, ge=0)
    failsafe_duration_s: float = Field(default=7200.0, ge=0)
    # Ignored, kept so that older configurations still load: smgw-link alone decides the link-loss
    # failsafe (smgw.on_link_loss, smgw.link_loss_grace_s); the controller follows what it publishes.
    failsafe_on_link_loss: bool = Field(
        default=True, description="ignored (older configurations): the link-loss failsafe is smgw-link's, "
                                  "see smgw.on_link_loss")
    link_loss_grace_s: float = Field(
        default=120.0, ge=0, le=86_400,
        description="ignored (older configurations): the link-loss grace is smgw.link_loss_grace_s")

    @property
    def ignored_settings(self) -> list[str]:
        """Settings given in the configuration that no longer do anything (logged at start)."""
        return sorted(k for k in ("failsafe_on_link_loss", "link_loss_grace_s") if k in self.model_fields_set)
    floor_sources: list[LimitSourceName] = Field(
        default_factory=lambda: ["dso", "supplier", "failsafe"],
        description="grid limits from these sources are raised to the §14a floor")
    decrease_settle_s: float = Field(
        default=10.0, ge=0, le=120,
        description="current freed by cutting an EVSE is handed to others only once that EVSE is seen "
                    "following the cut (its status: applied and drawn at most the new setpoint) or after this "
                    "long (IEC 61851-1 gives a car 5 s to follow a lower PWM duty cycle)")
    overdraw_penalty_s: float = Field(default=300.0, ge=0)
    overdraw_tolerance_a: float = Field(default=0.5, ge=0, le=50,
                                        description="a meter this far above a limit counts as an overdraw")
    overdraw_settle_s: float = Field(default=5.0, ge=0, le=300,
                                     description="a further overdraw within this time does not add up")
    min_charge_time_s: float = Field(default=60.0, ge=0)
    min_pause_s: float = Field(default=60.0, ge=0)
    ramp_step_a: float = Field(default=2.0, gt=0, description="largest increase per cycle")
    phase_switch_delay_s: float = Field(default=300.0, ge=0, description="wait before 1 -> 3 phases")
    reclaim: bool = Field(default=True, description="give current a car does not draw to others")
    reclaim_after_s: float = Field(default=20.0, ge=0, le=3600,
                                   description="a grant unchanged this long may be reclaimed")
    reclaim_threshold_a: float = Field(default=2.0, ge=0.1, le=80,
                                       description="reclaim when the car draws this much less than granted")
    reclaim_margin_a: float = Field(default=1.0, ge=0, le=80, description="left above what the car draws")
    phase_detection: bool = Field(default=True,
                                  description="1-phase cars on 3-phase EVSEs: a switching EVSE is told to use 1 "
                                              "phase (only L1 budgeted); on others the car stays budgeted on "
                                              "all phases and counts on its own for the phase imbalance")
    current_step_a: float = Field(default=0.1, gt=0, le=1, description="setpoints are rounded down to this")
    allocation_interval_s: float = Field(default=10.0, ge=0.5, le=600,
                                         description="controller/allocation is republished at least this often")
    rules: list[Rule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_rule_ids(self) -> Controller:
        errs = twice([(("rules", j, "id"), r.id) for j, r in enumerate(self.rules)], "rule id")
        if errs:
            raise LocatedErrors(errs)
        return self
