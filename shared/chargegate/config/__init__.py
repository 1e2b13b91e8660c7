"""The installation's configuration: one YAML file, validated by pydantic.

:func:`load` returns a :class:`Config` or raises :class:`ConfigError` whose message names the
file, the path inside the document (``evses[2].max_current_a``) and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from chargegate.config.base import Ident, LocatedErrors, Port, Secret, Strict, twice
from chargegate.config.controller import Controller
from chargegate.config.history import History
from chargegate.config.installation import Circuit, Evse, Meter, ModbusConnection
from chargegate.config.ocpp import Ocpp
from chargegate.config.poller import POLLER, Poller, instance_service
from chargegate.config.smgw import Smgw
from chargegate.config.web import HomeAssistant, Web, WebUser
from chargegate.topics import SERVICES, USERS, format_loc

__all__ = [
    "Admin", "AdminClient", "AdminTls", "Broker", "Circuit", "Config", "ConfigError", "Controller", "Evse",
    "History", "HomeAssistant", "Logging", "Meter", "ModbusConnection", "Ocpp", "Poller", "Secret", "Site", "Smgw",
    "Web", "WebUser", "instance_service", "load", "loads", "poller_accounts", "resolve_paths", "validate_data",
]


class ConfigError(ValueError):
    """A configuration that cannot be used. ``errors`` lists (path, message) pairs."""

    def __init__(self, source: str, errors: list[tuple[str, str]]) -> None:
        self.source = source
        self.errors = errors
        lines = [f"{source}: {path}: {msg}" if path else f"{source}: {msg}" for path, msg in errors]
        super().__init__("\n".join(lines))


class Site(Strict):
    name: str = "chargegate"
    topic_root: str = Field(default="chargegate", pattern=r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")
    timezone: str = Field(default="Europe/Berlin", description="for rule time windows")


class BrokerTls(Strict):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False


# an extra service's name: its broker account, its topics (ext/<name>/, service/<name>/) and its container
ServiceName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$")]


class Broker(Strict):
    host: str | None = Field(default=None, description="external broker; omit to let chargegate run its own")
    port: Port = 1883
    listen: str = Field(default="127.0.0.1", description="address the own broker listens on")
    tls: BrokerTls | None = None
    accounts: dict[str, Secret] = Field(
        default_factory=dict,
        description="password per account (services, observer, admin); missing ones are generated "
                    "into state_dir/broker/")
    extra_services: list[ServiceName] = Field(
        default_factory=list, max_length=32,
        description="broker accounts for extra service containers (README: Adding a service): each reads "
                    "the whole tree and writes only ext/<name>/# and its own service/<name>/health and log")

    @model_validator(mode="after")
    def _known_accounts(self) -> Broker:
        builtin = {*SERVICES, "observer", "admin", "sim", *USERS}
        taken = sorted({s for s in self.extra_services if s in builtin or s.startswith(POLLER + ".")})
        if taken:
            raise ValueError(f"extra_services: {taken} is the name of a built-in account")
        if len(set(self.extra_services)) != len(self.extra_services):
            raise ValueError("extra_services: a name is given twice")
        allowed = builtin | set(self.extra_services)
        # evse-poller.<instance>: checked against poller.instances by Config
        unknown = {a for a in set(self.accounts) - allowed if not a.startswith(POLLER + ".")}
        if unknown:
            raise ValueError(f"unknown broker account(s) {sorted(unknown)}; known: {sorted(allowed)}")
        return self


class Logging(Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class AdminToken(Strict):
    name: str = Field(min_length=1, max_length=64)
    role: Literal["admin", "operator", "viewer"]
    token: Secret


class AdminClient(Strict):
    """A TLS client certificate of the local admin listener mapped to a role."""

    name: str = Field(min_length=1, max_length=64)
    role: Literal["admin", "operator", "viewer"]
    sha256: str | None = Field(default=None, pattern=r"^([0-9A-Fa-f]{2}:?){31}[0-9A-Fa-f]{2}$",
                               description="fingerprint of the client certificate")
    common_name: str | None = Field(default=None, min_length=1, max_length=128,
                                    description="subject CN of a certificate issued by admin.tls.client_ca_file")

    @field_validator("sha256")
    @classmethod
    def _norm(cls, v: str | None) -> str | None:
        return v.replace(":", "").lower() if v else v

    @model_validator(mode="after")
    def _one(self) -> AdminClient:
        if (self.sha256 is None) == (self.common_name is None):
            raise ValueError("an admin client needs exactly one of sha256 or common_name")
        return self


class AdminTls(Strict):
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = Field(default=None, description="CA of admin client certificates; clients "
                                                                  "may then log in with a certificate")


class Admin(Strict):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: Port = 8091
    tokens: list[AdminToken] = Field(default_factory=list)
    keep_versions: int = Field(default=20, ge=1, le=1000)
    tls: AdminTls | None = Field(default=None, description="serve the local admin API over TLS")
    clients: list[AdminClient] = Field(default_factory=list, description="client certificates -> roles "
                                                                         "(local TLS listener only)")
    switch_timeout_s: float = Field(default=60.0, gt=0, le=3600,
                                    description="a new SMGW client certificate must bring the link up within "
                                                "this time, else the previous one is restored")
    log_buffer: int = Field(default=1000, ge=10, le=100_000, description="recent log events kept for the API")
    audit_file: Path | None = Field(default=None, description="default state_dir/admin/audit.jsonl")
    history_dir: Path | None = Field(default=None, description="configuration versions; default "
                                                               "<config dir>/.chargegate-history")

    @model_validator(mode="after")
    def _unique(self) -> Admin:
        errs = twice([(("tokens", j, "name"), t.name) for j, t in enumerate(self.tokens)]
                     + [(("clients", j, "name"), c.name) for j, c in enumerate(self.clients)],
                     "admin token or client name (the audit log names them)")
        if errs:
            raise LocatedErrors(errs)
        if self.clients and (self.tls is None or self.tls.client_ca_file is None):
            raise ValueError("admin.clients need admin.tls with client_ca_file (the CA that issued the client "
                             "certificates; a sha256 then narrows it to one certificate)")
        return self


class Config(Strict):
    version: Literal[1] = 1
    site: Site = Field(default_factory=Site)
    state_dir: Path = Field(default=Path("state"), description="queues, certificates, generated passwords")
    broker: Broker = Field(default_factory=Broker)
    logging: Logging = Field(default_factory=Logging)
    circuits: list[Circuit] = Field(min_length=1, max_length=1, description="one root: the grid connection")
    evses: list[Evse] = Field(default_factory=list)
    meters: list[Meter] = Field(default_factory=list)
    controller: Controller = Field(default_factory=Controller)
    ocpp: Ocpp = Field(default_factory=Ocpp)
    smgw: Smgw = Field(default_factory=Smgw)
    poller: Poller = Field(default_factory=Poller)
    admin: Admin = Field(default_factory=Admin)
    history: History = Field(default_factory=History)
    web: Web = Field(default_factory=Web)
    homeassistant: HomeAssistant = Field(default_factory=HomeAssistant)
    services: list[Ident] = Field(default_factory=lambda: list(SERVICES),
                                  description="services `chargegate run` starts")

    @property
    def root_circuit(self) -> Circuit:
        return self.circuits[0]

    def all_circuits(self) -> list[Circuit]:
        return self.root_circuit.walk()

    def evse(self, evse_id: str) -> Evse:
        for e in self.evses:
            if e.id == evse_id:
                return e
        raise KeyError(evse_id)

    @model_validator(mode="after")
    def _references(self) -> Config:
        """Cross-references, each error at the path of the entry that is wrong (``evses[3].id``)."""
        errs: list[tuple[Any, ...]] = []

        def unique(items: list[tuple[tuple[str | int, ...], str]], what: str) -> None:
            errs.extend(twice(items, what))

        circuits = self.all_circuits()
        cids = [c.id for c in circuits]
        unique(list(_circuit_locs(self.circuits)), "circuit id")
        ids = [e.id for e in self.evses]
        unique([(("evses", i, "id"), e.id) for i, e in enumerate(self.evses)], "evse id")
        mids = [m.id for m in self.meters]
        unique([(("meters", i, "id"), m.id) for i, m in enumerate(self.meters)], "meter id")
        for i, e in enumerate(self.evses):
            if e.circuit not in cids:
                known = ", ".join(dict.fromkeys(cids))
                errs.append((("evses", i, "circuit"), f"unknown circuit {e.circuit!r}; circuits: {known}"))
        for loc, c in _circuit_locs(self.circuits, objects=True):
            if c.meter is not None and c.meter not in mids:
                errs.append(((*loc[:-1], "meter"), f"unknown meter {c.meter!r}; meters: {', '.join(mids) or 'none'}"))
        unique([(("evses", i, "ocpp", "charge_box_id"), f"{e.ocpp.charge_box_id} connector {e.ocpp.connector_id}")
                for i, e in enumerate(self.evses) if e.ocpp], "OCPP charge_box_id and connector_id")
        unique([(("evses", i, "upstream", "charge_box_id"), e.upstream.charge_box_id or e.id)
                for i, e in enumerate(self.evses) if e.upstream and e.upstream.enabled], "upstream charge_box_id")
        instances = self.poller.instances
        for kind, items in (("evses", self.evses), ("meters", self.meters)):
            for i, dev in enumerate(items):
                inst = dev.modbus.instance if dev.modbus is not None else None
                if dev.modbus is None:
                    continue
                if instances and inst is None:
                    errs.append(((kind, i, "modbus", "instance"), f"{dev.id}: poller.instances is given: name the "
                                                                  f"instance that polls it ({', '.join(instances)})"))
                elif inst is not None and inst not in instances:
                    errs.append(((kind, i, "modbus", "instance"),
                                 f"{dev.id}: unknown evse-poller instance {inst!r}; "
                                 f"poller.instances: {', '.join(instances) or 'none'}"))
        for account in self.broker.accounts:
            if account.startswith(POLLER + ".") and account[len(POLLER) + 1:] not in instances:
                errs.append((("broker", "accounts", account), f"unknown broker account {account!r}: not one of "
                                                             f"poller.instances ({', '.join(instances) or 'none'})"))
        for i, svc in enumerate(self.services):
            if svc not in SERVICES:
                errs.append((("services", i), f"unknown service {svc!r}; services: {', '.join(SERVICES)}"))
        for j, r in enumerate(self.controller.rules):
            for k, ev in enumerate(r.evses):
                if ev not in ids:
                    errs.append((("controller", "rules", j, "evses", k), f"rule {r.id}: unknown evse {ev!r}"))
            rule_meter = getattr(r, "meter", None)
            if rule_meter is not None and rule_meter not in mids:
                errs.append((("controller", "rules", j, "meter"), f"rule {r.id}: unknown meter {rule_meter!r}"))
            if r.type == "solar" and rule_meter is None and self.root_circuit.meter is None:
                errs.append((("controller", "rules", j),
                             f"rule {r.id}: a solar rule needs a meter (rule meter or the root circuit's)"))
        if errs:
            raise LocatedErrors(errs)
        return self

    def poller_devices(self, instance: str | None) -> tuple[list[str], list[str]]:
        """The EVSE and meter ids the evse-poller ``instance`` polls (None: the single evse-poller)."""
        return ([e.id for e in self.evses if e.modbus is not None and e.modbus.instance == instance],
                [m.id for m in self.meters if m.modbus.instance == instance])

    def for_poller(self, instance: str | None) -> Config:
        """This configuration as the evse-poller ``instance`` sees it: its own Modbus EVSEs and meters only
        (the other instances' devices are left out; OCPP EVSEs stay). Not validated again (a subset of a
        valid configuration)."""
        if instance is None and not self.poller.instances:
            return self
        evses = [e for e in self.evses if e.modbus is None or e.modbus.instance == instance]
        meters = [m for m in self.meters if m.modbus.instance == instance]
        return self.model_copy(update={"evses": evses, "meters": meters})

    def digest(self) -> str:
        """A short version id of this configuration (stable over key order; secrets by reference)."""
        data = self.model_dump(mode="json")
        blob = json.dumps(data, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def poller_accounts(config: Config) -> tuple[str, ...]:
    """The broker accounts of the evse-poller instances (``evse-poller.<name>``), none without instances."""
    return tuple(instance_service(i) for i in config.poller.instances)


_SECRET_KEYS = {"password", "token", "tokens", "value", "accounts", "secret"}


def _circuit_locs(circuits: list[Circuit], prefix: tuple[str | int, ...] = ("circuits",),
                  objects: bool = False) -> list[tuple[tuple[str | int, ...], Any]]:
    """``(("circuits", 0, "children", 1, "id"), id or circuit)`` for every circuit of the tree."""
    out: list[tuple[tuple[str | int, ...], Any]] = []
    for i, c in enumerate(circuits):
        out.append(((*prefix, i, "id"), c if objects else c.id))
        out.extend(_circuit_locs(c.children, (*prefix, i, "children"), objects))
    return out


def _secretish(loc: tuple[Any, ...]) -> bool:
    return any(isinstance(part, str) and part in _SECRET_KEYS for part in loc)


def validate_data(data: Any, source: str = "<config>") -> Config:
    if data is None:
        raise ConfigError(source, [("", "the document is empty")])
    if not isinstance(data, dict):
        raise ConfigError(source, [("", f"the document must be a mapping, got {type(data).__name__}")])
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        errors: list[tuple[str, str]] = []
        for err in e.errors():
            located = (err.get("ctx") or {}).get("error")
            if isinstance(located, LocatedErrors):  # several problems, each at its own path
                errors.extend((format_loc(loc), msg) for loc, msg in located.located(tuple(err.get("loc", ()))))
                continue
            msg = err.get("msg", "invalid")
            if err.get("type") == "value_error" and msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]  # a validator's own sentence
            inp = err.get("input")
            if err.get("type") in ("extra_forbidden",):
                msg = "unknown key (not part of the configuration)"
            elif inp is not None and not isinstance(inp, dict | list) and not _secretish(err.get("loc", ())):
                msg = f"{msg} (got {inp!r})"
            errors.append((format_loc(err.get("loc", ())), msg))
        raise ConfigError(source, errors) from None


def loads(text: str, source: str = "<config>") -> Config:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(source, [(where, f"not valid YAML: {getattr(e, 'problem', e)}")]) from None
    return validate_data(data, source)


def load(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(str(path), [("", f"cannot read: {e.strerror}")]) from None
    return resolve_paths(loads(text, str(path)), path)


def resolve_paths(cfg: Config, path: str | Path) -> Config:
    """What :func:`load` does after validation: the ``CHARGEGATE_STATE_DIR`` override and a relative
    ``state_dir`` taken from the configuration file's folder (so the digest matches a loaded file)."""
    override = os.environ.get("CHARGEGATE_STATE_DIR")
    if override:
        cfg.state_dir = Path(override)
    if not cfg.state_dir.is_absolute():
        cfg.state_dir = (Path(path).parent / cfg.state_dir).resolve()
    return cfg


