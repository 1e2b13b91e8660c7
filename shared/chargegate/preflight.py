"""What ``chargegate config check`` and ``chargegate run`` check beyond the configuration's models.

A configuration can be valid and still not run: a secret's environment variable is unset, a TLS file is
missing, a device profile does not exist, a service is not installed, there is no Mosquitto binary.
:func:`problems` finds all of them at once, as ``(path, message)`` pairs with the same path syntax as
the models' errors (``evses[2].ocpp.password``); a secret's value is never part of a message.

``run`` refuses to start on any of them (one clear list, exit 1), so no service starts only to crash
on its first ``reveal()``. ``services`` narrows the checks to what those services use (``run
load-controller`` does not need the OCPP backend's password).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from chargegate import config as cfgmod
from chargegate.config.base import Secret
from chargegate.topics import format_loc

# fields that name a file a service reads at start-up (certificates, keys, CA bundles)
INPUT_FILES = frozenset({"ca_file", "cert_file", "key_file", "client_ca_file", "trust_anchor", "gateway_ca"})

# which service needs a part of the configuration (by its path); a path not listed is needed by all
_SECTION_SERVICE = {"ocpp": "ocpp-gateway", "smgw": "smgw-link", "admin": "smgw-link", "history": "history"}
_EVSE_PART_SERVICE = {"ocpp": "ocpp-gateway", "upstream": "ocpp-gateway", "modbus": "evse-poller"}

Loc = tuple[str | int, ...]


def needed_by(loc: Loc) -> str | None:
    """The service that uses the configuration at ``loc``; None: every service (e.g. broker accounts)."""
    if not loc:
        return None
    if loc[0] in _SECTION_SERVICE:
        return _SECTION_SERVICE[str(loc[0])]
    if loc[0] in ("evses", "meters") and len(loc) > 2:
        return _EVSE_PART_SERVICE.get(str(loc[2]))
    return None


def _walk(obj: Any, loc: Loc) -> Iterator[tuple[Loc, Any, str | None]]:
    """``(path, value, field name)`` of every value below ``obj``, skipping what is switched off: a model
    with ``enabled: false`` and the local OCPP listener's TLS files while ``tls`` is off."""
    if isinstance(obj, BaseModel):
        if getattr(obj, "enabled", True) is False:
            return
        for name in type(obj).model_fields:
            value = getattr(obj, name)
            if value is None:
                continue
            if name in ("cert_file", "key_file", "client_ca_file") and getattr(obj, "tls", None) == "off":
                continue
            yield (*loc, name), value, name
            if not isinstance(value, Secret):
                yield from _walk(value, (*loc, name))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield (*loc, i), v, None
            yield from _walk(v, (*loc, i))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield (*loc, str(k)), v, None
            yield from _walk(v, (*loc, str(k)))


def secret_problems(cfg: cfgmod.Config) -> list[tuple[Loc, str]]:
    """Every secret reference that cannot be resolved now: an unset environment variable, an unreadable
    or empty file. The message names the variable or file, never a value."""
    out: list[tuple[Loc, str]] = []
    backend_on = cfg.ocpp.backend.enabled
    for loc, value, _ in _walk(cfg, ()):
        if not isinstance(value, Secret):
            continue
        if "upstream" in loc and not backend_on:
            continue  # upstream credentials are used only with ocpp.backend enabled
        try:
            revealed = value.reveal()
        except LookupError as e:
            out.append((loc, str(e)))
            continue
        if not revealed:
            src = f"environment variable {value.env}" if value.env else (f"file {value.file}" if value.file else
                                                                        "value")
            out.append((loc, f"secret {src} is empty"))
    return out


def file_problems(cfg: cfgmod.Config) -> list[tuple[Loc, str]]:
    """Certificates, keys and CA files the services read at start-up that are missing or unreadable."""
    out: list[tuple[Loc, str]] = []
    for loc, value, name in _walk(cfg, ()):
        if name not in INPUT_FILES or not isinstance(value, Path):
            continue
        try:
            with value.open("rb") as f:
                f.read(1)
        except IsADirectoryError:
            out.append((loc, f"{value} is a folder, not a file"))
        except OSError as e:
            out.append((loc, f"cannot read {value}: {e.strerror}"))
    return out


def service_checks(cfg: cfgmod.Config) -> list[tuple[str, str]]:
    """The services' own checks of a valid configuration (entry point group ``chargegate.config_checks``:
    each entry is ``check(config) -> [(path, message), ...]``), e.g. the evse-poller's device profiles
    and the current ranges each device accepts. Each entry is named after its service. (importlib.metadata
    is imported here: a service process, which imports this module for :func:`service_problems` at start-up,
    does not need it - bench/footprint.)"""
    from importlib.metadata import entry_points

    errors: list[tuple[str, str]] = []
    for ep in entry_points(group="chargegate.config_checks"):
        try:
            errors.extend(ep.load()(cfg))
        except Exception as e:  # a broken check must not hide the others
            errors.append(("", f"check {ep.name} failed: {type(e).__name__}: {e}"))
    return errors


def _service_check_owner(path: str) -> str | None:
    """``evses[2].modbus.profile`` -> evse-poller (the path syntax of :func:`format_loc`)."""
    parts: list[str | int] = []
    for piece in path.replace("[", ".").replace("]", "").split("."):
        if piece:
            parts.append(int(piece) if piece.isdigit() else piece)
    return needed_by(tuple(parts))


def problems(cfg: cfgmod.Config, services: list[str] | None = None, *, local_broker: bool | None = None,
             installed: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """Everything ``run`` would refuse or a service would fail on at start-up, as ``(path, message)``.

    ``services``: only what these services need (default: ``cfg.services``). ``local_broker``: check the
    Mosquitto binary (default: when ``broker.host`` is unset). ``installed``: service name -> package
    (default: the installed services' entry points)."""
    from chargegate.runner import available_services

    instances = {cfgmod.instance_service(i) for i in cfg.poller.instances}
    # an evse-poller instance (evse-poller.<name>) is the evse-poller service
    wanted = list(dict.fromkeys("evse-poller" if s in instances else s for s in (services or cfg.services)))
    known = installed if installed is not None else available_services()
    out: list[tuple[str, str]] = []
    for name in wanted:
        if name not in known:
            where = f"services[{cfg.services.index(name)}]" if services is None else ""
            out.append((where, f"service {name} is not installed; installed: {', '.join(sorted(known)) or 'none'}"))
    keep = set(wanted)

    def relevant(owner: str | None) -> bool:
        return owner is None or owner in keep

    out += [(format_loc(loc), msg) for loc, msg in secret_problems(cfg) if relevant(needed_by(loc))]
    out += [(format_loc(loc), msg) for loc, msg in file_problems(cfg) if relevant(needed_by(loc))]
    out += [(path, msg) for path, msg in service_checks(cfg) if relevant(_service_check_owner(path))]
    if local_broker if local_broker is not None else cfg.broker.host is None:
        from chargegate.broker import BrokerError, mosquitto_binary

        try:
            mosquitto_binary()
        except BrokerError as e:
            out.append(("broker.host", str(e)))
    return out


def service_problems(cfg: cfgmod.Config, service: str) -> list[tuple[str, str]]:
    """What keeps the service ``service`` from starting with ``cfg``: the secrets and files of the parts it
    uses (of the broker accounts only its own). ``chargegate.runtime`` exits 2 with these."""
    out: list[tuple[str, str]] = []
    base = service.split(".", 1)[0]  # an evse-poller instance (evse-poller.<name>) needs what evse-poller needs
    for loc, msg in [*secret_problems(cfg), *file_problems(cfg)]:
        if loc[:2] == ("broker", "accounts") and len(loc) > 2 and loc[2] != service:
            continue
        if needed_by(loc) in (None, base):
            out.append((format_loc(loc), msg))
    return out



def fallback_warnings(cfg: cfgmod.Config) -> list[tuple[str, str]]:
    """Circuits whose EVSEs, all at their ``safe_current_a`` at once, draw more than the circuit carries
    (its fuse or ``max_current_a`` on some phase, or ``max_power_w`` at ``controller.voltage_v``), as
    ``(path, message)``.

    The safe current is what each EVSE falls back to without a valid setpoint (safety rule 2), and they
    all fall back together when chargegate, the broker or a poller is down - when nothing can keep the
    fuse. The EVSE's own phases count (through ``phase_rotation``; a car may use fewer), the base load
    does not. A warning, not an error: the site works and keeps its fuse while chargegate runs, and the
    installer may know better (the fallback staggered by the devices, a selective fuse) - but it is the
    case the fallback is meant to be safe for (the benchmark's 1000 wallboxes at 6 A on a 4000 A fuse
    tripped it when some of their profiles ran out)."""
    out: list[tuple[str, str]] = []
    volts = cfg.controller.voltage_v

    def visit(c: Any, loc: tuple[Any, ...]) -> None:
        below = {x.id for x in c.walk()}
        evses = [e for e in cfg.evses if e.circuit in below and e.safe_current_a > 0]
        amps = [0.0, 0.0, 0.0]
        for e in evses:
            for ph in e.phase_rotation[: e.phases]:
                amps[ph - 1] += e.safe_current_a
        limits = c.phase_limits()
        over = [k for k in range(3) if limits is not None and amps[k] > limits[k] + 1e-6]
        what = "fuse" if c.fuse_a is not None and c.max_current_a is None else "limit"
        if over:
            worst = max(over, key=lambda k: amps[k] - limits[k])
            out.append((format_loc(loc), f"circuit {c.id}: the safe currents of its {len(evses)} EVSEs add up to "
                        f"{amps[worst]:g} A on L{worst + 1}, above its {what} of {limits[worst]:g} A"
                        + (f" (also on {', '.join(f'L{k + 1}' for k in over if k != worst)})" if len(over) > 1 else "")
                        + ": when they fall back together (no valid setpoint: chargegate, the broker or a poller "
                        "down) they overload it; lower safe_current_a (0 = off) or check the circuit"))
        watts = sum(amps) * volts
        if c.max_power_w is not None and watts > c.max_power_w + 1e-6:
            out.append((format_loc(loc), f"circuit {c.id}: the safe currents of its {len(evses)} EVSEs add up to "
                        f"{watts:.0f} W at {volts:g} V, above its max_power_w {c.max_power_w:g} W: when they fall "
                        "back together they overload it; lower safe_current_a (0 = off) or check the circuit"))
        for i, child in enumerate(c.children):
            visit(child, (*loc, "children", i))

    visit(cfg.root_circuit, ("circuits", 0))
    return out


def warnings(cfg: cfgmod.Config) -> list[tuple[str, str]]:
    """What ``config check`` warns of (the configuration is valid and runs): ``(path, message)``."""
    return fallback_warnings(cfg)
