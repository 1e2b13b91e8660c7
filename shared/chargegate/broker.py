"""Broker accounts, the ACL, the Mosquitto configuration and a local Mosquitto process.

Every service has its own account; the ACL, generated from the topic registry, lets each write
only the topics the registry names it as a writer of (and its own health topic). ``observer``
reads everything (for MQTT explorers and ``chargegate status``); ``admin`` reads everything and
may send service commands. Anonymous access is refused.

A local broker started by root (``chargegate run``, the demo, the tests) does not run as root: it
runs as the system user ``mosquitto``, else ``nobody`` (:func:`broker_user`). The folder holding its
files is root's, group-readable for the broker's group (0750); the password file, the ACL and
mosquitto.conf belong to the broker's user (0600), its persistence folder too (0700); nothing is
world-readable, and the broker cannot change what root writes there. When that user cannot reach
``state_dir/broker`` (a folder on the way is closed to it, e.g. /root), the broker's files and
persistence go to ``/run/chargegate/broker-<hash of state_dir>/`` instead (a warning says so:
retained messages then survive a broker restart, not a reboot). Only when neither user exists, or
no such folder can be made, the broker stays root (``user root``, with a warning).
"""

from __future__ import annotations

import base64
import grp
import hashlib
import os
import pwd
import random
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from chargegate.bus import BusSettings
from chargegate.config import Config, instance_service, poller_accounts
from chargegate.files import open_private_append, private_dir, write_private
from chargegate.topics import ACCOUNT_WRITERS, SERVICES, SPECS, USERS, Registry

ACCOUNTS: tuple[str, ...] = (*SERVICES, "observer", "admin", "sim", *USERS)
PBKDF2_ITERATIONS = 101
BROKER_USERS = ("mosquitto", "nobody")  # the unprivileged users a broker started by root runs as, in this order
RUNTIME_BASE = Path("/run/chargegate")  # where its files go when it cannot reach state_dir/broker
SAME_USER = "\0same"  # write_broker_files: the broker runs as the user who writes its files

log = structlog.get_logger("chargegate.broker")


class BrokerError(RuntimeError):
    pass


class BrokerPortInUse(BrokerError):
    """Another program listens on the broker's port."""


def hash_password(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """Mosquitto 2.x ``$7$`` (PBKDF2-SHA512) password hash, as mosquitto_passwd writes it."""
    salt = salt or os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def secrets_dir(config: Config) -> Path:
    return config.state_dir / "broker" / "secrets"


def account_password(config: Config, account: str, create: bool = True) -> str:
    """The password of ``account``: from the configuration, else generated once into state_dir."""
    given = config.broker.accounts.get(account)
    if given is not None:
        return given.reveal()
    path = secrets_dir(config) / account
    env = os.environ.get(f"CHARGEGATE_BROKER_PASSWORD_{account.upper().replace('-', '_').replace('.', '_')}")
    if env:
        return env
    if path.exists():
        return path.read_text().strip()
    if not create:
        raise BrokerError(f"no password for broker account {account} ({path} missing)")
    private_dir(path.parent)
    pw = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(pw + "\n")
    return pw


def accounts(config: Config) -> tuple[str, ...]:
    """Every broker account: the built-in ones, the evse-poller instances and the configuration's extra
    services."""
    return (*ACCOUNTS, *poller_accounts(config), *config.broker.extra_services)


def poller_acl_devices(config: Config) -> dict[str, tuple[list[str], list[str]]]:
    """Per evse-poller instance (``poller.instances``): its EVSE and meter ids, for :func:`render_acl`."""
    return {i: config.poller_devices(i) for i in config.poller.instances}


def render_acl(root: str, ha_prefix: str | None = None, ha_node: str | None = None,
               extra_services: Sequence[str] = (),
               poller_instances: Mapping[str, tuple[Sequence[str], Sequence[str]]] | None = None) -> str:
    """The ACL file for topic root ``root``, generated from the registry's writers. With ``ha_prefix``
    (Home Assistant's MQTT discovery switched on) the web service also writes and reads back its discovery
    documents (``<prefix>/<component>/<ha_node>/<object>/config``) and reads Home Assistant's
    ``<prefix>/status``; the household's account (which Home Assistant logs in with) reads the prefix and
    announces Home Assistant on ``<prefix>/status``. Each extra service (``broker.extra_services``) reads
    everything and writes only ``ext/<name>/#`` and its own health and log.

    With ``poller_instances`` (instance -> its EVSE ids and meter ids; ``poller.instances`` of the
    configuration) the Modbus devices are split over several evse-poller processes: each instance's
    account ``evse-poller.<name>`` writes the status and command results of its own EVSEs, the readings
    of its own meters and its own health and log, nothing else; the plain ``evse-poller`` account then
    writes only its own health and log (one poller cannot overwrite another's devices)."""
    reg = Registry(root)
    poller_own = {"evse.status": "evse_id", "evse.command_result": "evse_id", "meter.reading": "meter_id"}
    lines = ["# generated by `chargegate broker init` from the topic registry; do not edit", ""]
    for svc in SERVICES:
        lines += [f"user {svc}", f"topic read {root}/#"]
        if svc == "web" and ha_prefix is not None:
            lines += [f"topic readwrite {ha_prefix}/+/{ha_node or root.replace('/', '_')}/+/config",
                      f"topic read {ha_prefix}/status"]
        for spec in SPECS:
            if "service" in spec.params and spec.own_only:  # per-service state: only its own
                if svc in spec.writers:
                    lines.append(f"topic write {reg.topic(spec.name, service=svc)}")
            elif svc in spec.writers and not (poller_instances and svc == "evse-poller"
                                              and spec.name in poller_own):
                lines.append(f"topic write {root}/{spec.wildcard}")
        lines.append("")
    for inst, (evse_ids, meter_ids) in (poller_instances or {}).items():
        account = instance_service(inst)
        lines += [f"user {account}", f"topic read {root}/#",
                  f"topic write {reg.topic('service.health', service=account)}",
                  f"topic write {reg.topic('service.log', service=account)}"]
        for name, param in poller_own.items():
            for ident in (meter_ids if param == "meter_id" else evse_ids):
                lines.append(f"topic write {reg.topic(name, **{param: ident})}")
        lines.append("")
    lines += ["user observer", f"topic read {root}/#", "topic read $SYS/#", ""]
    lines += ["user admin", f"topic read {root}/#"]
    lines += [f"topic write {root}/{spec.wildcard}" for spec in SPECS if "admin" in ACCOUNT_WRITERS.get(spec.name, ())]
    lines.append("")
    lines += ["user sim", f"topic readwrite {root}/sim/#", ""]
    for account in USERS:  # the household: reads the installation, writes only its commands (charging mode)
        lines += [f"user {account}", f"topic read {root}/#"]
        lines += [f"topic write {root}/{spec.wildcard}" for spec in SPECS if account in spec.writers]
        if ha_prefix is not None:
            lines += [f"topic read {ha_prefix}/#", f"topic write {ha_prefix}/status"]
        lines.append("")
    for svc in extra_services:
        lines += [f"user {svc}", f"topic read {root}/#", f"topic write {reg.topic('service.health', service=svc)}",
                  f"topic write {reg.topic('service.log', service=svc)}",
                  f"topic write {reg.subscription('ext.message', service=svc)}", ""]
    return "\n".join(lines)


def render_passwords(config: Config) -> str:
    return "".join(f"{a}:{hash_password(account_password(config, a))}\n" for a in accounts(config))


def render_conf(*, port: int, listen: str, password_file: Path | str, acl_file: Path | str,
                persistence_dir: Path | str | None, log_dest: str = "stderr", run_as: str | None = None) -> str:
    lines = [
        "# chargegate broker configuration (generated)",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {password_file}",
        f"acl_file {acl_file}",
        f"listener {port} {listen}",
        "max_queued_messages 10000",
        "set_tcp_nodelay true",
        "max_inflight_messages 1000",
        f"log_dest {log_dest}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
    ]
    if run_as:
        # started as root, mosquitto drops to this user (without the line: to "mosquitto")
        lines.append(f"user {run_as}")
    if persistence_dir is not None:
        lines += ["persistence true", f"persistence_location {str(persistence_dir).rstrip('/')}/",
                  "autosave_interval 30"]
    else:
        lines.append("persistence false")
    return "\n".join(lines) + "\n"


def broker_user(euid: int | None = None, exists: Callable[[str], bool] | None = None) -> str | None:
    """The ``user`` a local broker runs as: None when we are not root (it runs as whoever starts it);
    started by root the first of :data:`BROKER_USERS` that exists, "root" only when none does."""
    if (os.geteuid() if euid is None else euid) != 0:
        return None
    exists = exists or _user_exists
    return next((u for u in BROKER_USERS if exists(u)), "root")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@dataclass(frozen=True)
class Placement:
    """Where a local broker's files live and who it runs as (see the module doc)."""

    dir: Path
    user: str | None  # the ``user`` line: None (not started by root), "root", or an unprivileged user
    note: str | None = None  # why not state_dir/broker, or why root: logged as a warning

    @property
    def unprivileged(self) -> bool:
        return self.user not in (None, "root")


def blocked_on_the_way(path: Path, uid: int, gids: set[int]) -> Path | None:
    """The first folder from / down to ``path`` (included) that ``uid`` (with groups ``gids``) cannot enter;
    None when it can reach ``path``. Owner, group and other bits as the kernel applies them."""
    cur = Path(path.anchor)
    for part in [cur, *path.resolve().parents[::-1][1:], path.resolve()]:
        cur = part
        try:
            st = os.stat(cur)
        except OSError:
            return cur
        bit = 0o100 if st.st_uid == uid else (0o010 if st.st_gid in gids else 0o001)
        if not st.st_mode & bit:
            return cur
    return None


def blocked_for(user: str, path: Path) -> Path | None:
    """:func:`blocked_on_the_way` for the system user ``user`` and its groups."""
    pw = pwd.getpwnam(user)
    return blocked_on_the_way(path, pw.pw_uid, {pw.pw_gid, *os.getgrouplist(user, pw.pw_gid)})


def placement(config: Config, euid: int | None = None) -> Placement:
    """``state_dir/broker`` with the user of :func:`broker_user`; a folder under :data:`RUNTIME_BASE` when
    that user cannot reach it; root when there is no such user or that folder cannot be made."""
    home = config.state_dir / "broker"
    user = broker_user(euid)
    if user is None:
        return Placement(home, None)
    if user == "root":
        return Placement(home, "root", f"none of the users {', '.join(BROKER_USERS)} exists: the broker runs "
                                       f"as root")
    home.mkdir(parents=True, exist_ok=True)
    blocked = blocked_for(user, home.parent)
    if blocked is None:
        return Placement(home, user)
    alt = RUNTIME_BASE / f"broker-{hashlib.sha256(str(config.state_dir.resolve()).encode()).hexdigest()[:16]}"
    try:
        RUNTIME_BASE.mkdir(parents=True, exist_ok=True, mode=0o755)
        os.chmod(RUNTIME_BASE, 0o755)
        again = blocked_for(user, RUNTIME_BASE)
        if again is not None:
            raise OSError(f"{again} is closed to {user}")
    except OSError as e:
        return Placement(home, "root", f"{blocked} is closed to user {user} and {RUNTIME_BASE} cannot be used "
                                       f"({e}): the broker runs as root")
    return Placement(alt, user, f"{blocked} is closed to user {user}: the broker's files and persistence are in "
                                f"{alt} (retained messages survive a broker restart, not a reboot; let {user} "
                                f"reach {home} to keep them in state_dir)")


def _hand_over(out_dir: Path, files: list[Path], data: Path | None, user: str) -> None:
    """The folder stays root's, readable for the broker's group (0750); the files and the persistence
    folder belong to the broker's user (0600 / 0700)."""
    pw = pwd.getpwnam(user)
    gid = pw.pw_gid
    os.chown(out_dir, 0, gid)
    os.chmod(out_dir, 0o750)
    for f in files:
        os.chown(f, pw.pw_uid, gid)
        os.chmod(f, 0o600)
    if data is not None:
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        for f in [data, *data.rglob("*")]:
            os.chown(f, pw.pw_uid, gid, follow_symlinks=False)
        os.chmod(data, 0o700)


def group_name(user: str) -> str:
    return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name


def write_broker_files(config: Config, out_dir: Path, *, port: int | None = None, listen: str | None = None,
                       persistence: bool = True, paths_in: Path | None = None,
                       broker_owner: tuple[int, int] | None = None,
                       secrets_owner: tuple[int, int] | None = None, run_as: str | None = SAME_USER) -> Path:
    """Write passwd, acl and mosquitto.conf into ``out_dir``. ``paths_in`` is where they will be
    seen by the broker (e.g. ``/mosquitto/config`` inside the container). ``run_as``: the ``user``
    line (default: the user writing them, so that the broker can read them); an unprivileged user is
    given the files (see the module doc). Returns the conf path."""
    if run_as == SAME_USER:
        run_as = "root" if os.geteuid() == 0 else None
    out_dir.mkdir(parents=True, exist_ok=True)
    seen = paths_in or out_dir.resolve()
    write_private(out_dir / "passwd", render_passwords(config))
    ha = config.homeassistant
    write_private(out_dir / "acl", render_acl(config.site.topic_root, ha.discovery_prefix if ha.enabled else None,
                                              ha.node(config.site.topic_root), config.broker.extra_services,
                                              poller_acl_devices(config)))
    data = (seen.parent / "data") if paths_in else (out_dir.resolve() / "data")
    if persistence and not paths_in:
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = render_conf(port=port or config.broker.port, listen=listen or config.broker.listen,
                       password_file=seen / "passwd", acl_file=seen / "acl",
                       persistence_dir=data if persistence else None,
                       run_as=None if paths_in else run_as)
    write_private(out_dir / "mosquitto.conf", conf)
    if run_as not in (None, "root") and not paths_in:
        _hand_over(out_dir, [out_dir / n for n in ("passwd", "acl", "mosquitto.conf")],
                   data if persistence else None, run_as)
    if broker_owner is not None:  # in a container: the broker runs as its own user
        for name in ("passwd", "acl", "mosquitto.conf"):
            os.chown(out_dir / name, *broker_owner)
    if secrets_owner is not None:  # the services' user must read their passwords
        sdir = secrets_dir(config)
        os.chown(sdir, *secrets_owner)
        for f in sdir.iterdir():
            os.chown(f, *secrets_owner)
    return out_dir / "mosquitto.conf"


def bus_settings(config: Config, account: str) -> BusSettings:
    host = config.broker.host or (config.broker.listen if config.broker.listen not in ("0.0.0.0", "::") else
                                  "127.0.0.1")
    host = os.environ.get("CHARGEGATE_BROKER_HOST", host)
    port = int(os.environ.get("CHARGEGATE_BROKER_PORT", config.broker.port))
    tls = config.broker.tls
    return BusSettings(host=host, port=port, username=account, password=account_password(config, account),
                       ca_file=str(tls.ca_file) if tls and tls.ca_file else None,
                       cert_file=str(tls.cert_file) if tls and tls.cert_file else None,
                       key_file=str(tls.key_file) if tls and tls.key_file else None,
                       tls_insecure=bool(tls and tls.insecure))


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (c for c in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(c, os.X_OK)), None)
    if not found:
        raise BrokerError("the mosquitto binary was not found; install it (Debian: apt-get install mosquitto) "
                          "or set broker.host to an external broker")
    return found


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``host:port`` now. With ``SO_REUSEADDR`` as servers (Mosquitto,
    asyncio) bind: a port whose last connections are in TIME-WAIT (a demo stopped a moment ago) is free,
    a port another program listens on is not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def port_in_use_message(port: int, host: str, config_path: str | Path | None = None) -> str:
    where = f" in {config_path}" if config_path else ""
    return (f"port {port} on {host} is in use by another program (another broker? `ss -ltnp 'sport = :{port}'` "
            f"shows which): stop it, or set broker.port{where} to a free port (or broker.host to use that broker)")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a server (simulators, tests, the demo).

    Chosen below the kernel's ephemeral range: a port from that range (what binding port 0
    gives) may be taken by one of the many outgoing connections before the server binds it.
    A port is not handed out twice by the same process. Probed as servers bind (``SO_REUSEADDR``).
    """
    lo, _ = _ephemeral_range()
    top = max(20001, min(lo, 32768))
    for _ in range(500):
        port = random.randrange(20000, top)
        if port in _handed_out or not port_free(port):
            continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:  # fall back to the kernel's choice
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def first_free(candidates: Iterable[int], host: str = "127.0.0.1") -> int:
    """The first of ``candidates`` a server could listen on now (:func:`port_free`, ``SO_REUSEADDR``: a port
    in TIME-WAIT after a stopped run counts as free), else :func:`free_port`. The demo's well-known ports
    (broker 1883, web 8080, variables API 8090) stay the same from one run to the next when nobody else
    holds them."""
    for port in candidates:
        if port_free(port, host):
            return port
    return free_port()


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BrokerError(f"nothing listens on {host}:{port} after {timeout} s") from None
            time.sleep(0.02)


@dataclass
class LocalBroker:
    """A Mosquitto process with the project's configuration (for runs, the demo and tests)."""

    conf: Path
    port: int
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None
    log_file: Path | None = None
    runtime_dir: Path | None = None  # its files outside state_dir (see :func:`placement`), removed by discard()
    listen: str | None = None  # the address it listens on (default ``host``)

    @classmethod
    def prepare(cls, config: Config, port: int | None = None, persistence: bool = True) -> LocalBroker:
        port = port or config.broker.port
        place = placement(config)
        if place.note:
            log.warning("local broker: " + place.note, user=place.user, folder=str(place.dir))
        conf = write_broker_files(config, place.dir, port=port, listen=config.broker.listen, persistence=persistence,
                                  run_as=place.user)
        host = config.broker.listen if config.broker.listen not in ("0.0.0.0", "::") else "127.0.0.1"
        home = config.state_dir / "broker"
        return cls(conf=conf, port=port, host=host, log_file=home / "mosquitto.log", listen=config.broker.listen,
                   runtime_dir=place.dir if place.dir != home else None)

    def discard(self) -> None:
        """Stop it and remove its files outside state_dir (tests; a run keeps them for its restarts)."""
        self.stop()
        if self.runtime_dir is not None:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def start(self, timeout: float = 10.0) -> None:
        """Start Mosquitto and wait until it listens. Refused at once (:class:`BrokerPortInUse`) when
        another program listens on the port: a connection to it would look like our broker."""
        if self.proc is not None and self.proc.poll() is None:
            return
        assert self.log_file is not None
        if not port_free(self.port, self.listen or self.host):
            raise BrokerPortInUse(port_in_use_message(self.port, self.listen or self.host))
        logf = open_private_append(self.log_file)  # client names and addresses: 0600
        start_at = self.log_file.stat().st_size
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)], stdout=logf, stderr=logf,
                                     start_new_session=True)
        logf.close()
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise BrokerError(f"mosquitto exited at start (code {code}): {self._log_since(start_at)}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise BrokerError(f"mosquitto did not listen on port {self.port} within {timeout:g} s: "
                                      f"{self._log_since(start_at)}") from None
                time.sleep(0.02)

    def _log_since(self, offset: int) -> str:
        """What this start wrote to the broker's log (its last lines, bounded), or where the log is."""
        assert self.log_file is not None
        try:
            with self.log_file.open("rb") as f:
                f.seek(offset)
                text = f.read(4000).decode(errors="replace")
        except OSError:
            text = ""
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return " / ".join(lines[-3:])[:500] + f" (log: {self.log_file})" if lines else f"see {self.log_file}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
