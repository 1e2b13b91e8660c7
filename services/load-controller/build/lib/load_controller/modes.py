"""Charging modes per EVSE (``evse/<id>/mode``) turned into charging rules (pure).

A mode only chooses which rules apply to an EVSE; rules only ever pause an EVSE or bound a group's sum,
and the solver puts every fuse, grid-operator limit (with the §14a floor), failsafe and EVSE limit above
them. So no mode can lift a safety or grid-operator limit:

* ``rules`` (default): the configured rules;
* ``now``: the configured rules do not apply to it (as fast as the limits allow);
* ``solar`` / ``solar+min``: instead of the configured rules, a solar rule of its own on the root meter
  (``solar+min``: the minimum current from the grid, the rest from surplus);
* ``off``: paused;
* a session target (``energy_wh`` by ``by``) adds a ``min_energy`` rule for it, which lifts the other
  rules once the deadline is near (not ``off``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chargegate import payloads as p
from chargegate.config.controller import MinEnergyRule, SolarRule

M = p.ChargingModeName


@dataclass(slots=True)
class ModeRules:
    rules: list[Any]
    off: dict[str, str] = field(default_factory=dict)  # EVSE id -> why, in words
    names: dict[str, str] = field(default_factory=dict)  # EVSE id -> mode name (those with a mode message)


def apply(rules: list[Any], modes: dict[str, p.ChargingMode], all_ids: list[str]) -> ModeRules:
    """The rules in force with the EVSEs' modes (``rules`` itself when no EVSE has a non-default mode)."""
    names = {i: m.mode.value for i, m in modes.items() if i in all_ids}
    special = {i for i, m in modes.items() if i in names and (m.mode is not M.RULES or m.target is not None)}
    if not special:
        return ModeRules(rules, names=names)
    lifted = {i for i in special if modes[i].mode is not M.RULES}
    out: list[Any] = []
    for r in rules:
        if not lifted:
            out.append(r)
            continue
        members = r.evses or all_ids
        keep = [i for i in members if i not in lifted]
        if len(keep) == len(members):
            out.append(r)
        elif keep:
            out.append(r.model_copy(update={"evses": keep}))
    off: dict[str, str] = {}
    for i in sorted(special):
        m = modes[i]
        who = f" (set by {m.set_by})" if m.set_by else ""
        if m.mode is M.OFF:
            off[i] = f"charging mode off{who}"
            continue
        if m.mode in (M.SOLAR, M.SOLAR_MIN):
            out.append(SolarRule.model_construct(
                id=f"mode.{m.mode.value}.{i}"[:64], type="solar", evses=[i], enabled=True, meter=None,
                top_up_to_min=m.mode is M.SOLAR_MIN, start_threshold_w=0.0))
        if m.target is not None:
            out.append(MinEnergyRule.model_construct(
                id=f"mode.target.{i}"[:64], type="min_energy", evses=[i], enabled=True,
                energy_wh=m.target.energy_wh, by=m.target.by, margin_s=900.0))
    return ModeRules(out, off=off, names=names)
