"""What ``chargegate config check`` asks the evse-poller: can every Modbus device of a configuration be
polled as configured? (entry point ``chargegate.config_checks``)

Pure: the configuration and the built-in profiles in, ``(path, message)`` pairs out, one per problem,
with the same path syntax as the configuration's own errors (``evses[2].safe_current_a``).
"""

from __future__ import annotations

from chargegate.config import Config
from evse_poller.profile import ProfileError, load_profile
from evse_poller.transport import resolve


def check_config(cfg: Config) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    for i, evse in enumerate(cfg.evses):
        if evse.modbus is None:
            continue
        where = f"evses[{i}]"
        try:
            prof = load_profile(evse.modbus.profile)
        except ProfileError as e:
            errors.append((f"{where}.modbus.profile", "; ".join(msg for _, msg in e.errors)))
            continue
        if prof.kind != "evse":
            errors.append((f"{where}.modbus.profile", f"{prof.name} is a {prof.kind} profile, not an EVSE profile"))
            continue
        try:
            resolve(evse.modbus, prof)
        except ValueError as e:
            errors.append((f"{where}.modbus", str(e)))
        problem = prof.safe_current_problem(evse.safe_current_a)
        if problem is not None:
            errors.append((f"{where}.safe_current_a", problem))
    for i, meter in enumerate(cfg.meters):
        where = f"meters[{i}]"
        try:
            prof = load_profile(meter.modbus.profile)
        except ProfileError as e:
            errors.append((f"{where}.modbus.profile", "; ".join(msg for _, msg in e.errors)))
            continue
        if prof.kind != "meter":
            errors.append((f"{where}.modbus.profile", f"{prof.name} is an {prof.kind} profile, not a meter profile"))
            continue
        try:
            resolve(meter.modbus, prof)
        except ValueError as e:
            errors.append((f"{where}.modbus", str(e)))
    return errors
