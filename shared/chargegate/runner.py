"""``chargegate run``: the services (and a local broker) as supervised processes.

Each service is started as ``python -m <package> --config FILE``; the services are found
through the entry point group ``chargegate.services`` (a new service registers itself there, the
runner needs no change). A crashed process is restarted with exponential backoff (reset after it
ran for a minute); the broker is restarted at once (with backoff when it keeps dying). A service
that exits with code 2 (:data:`CONFIG_ERROR_EXIT`: its configuration cannot be used) is not restarted
in a loop: it starts again once the configuration file changes. SIGINT/SIGTERM stop everything
cleanly: SIGTERM first, SIGKILL after a grace period.

Before anything starts, :func:`run` checks what would make it fail (``chargegate.preflight``: secrets,
files, profiles, installed services; and that the broker's port is free) and stops with one clear
message and exit code 1 instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import BinaryIO

import structlog

from chargegate import config as cfgmod
from chargegate import log as logsetup
from chargegate.broker import BrokerError, LocalBroker, port_free, port_in_use_message
from chargegate.files import open_private_append

log = structlog.get_logger("chargegate.runner")

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0
GRACE_S = 8.0
CONFIG_ERROR_EXIT = 2  # a service's exit code for "the configuration cannot be used" (chargegate.runtime)


def available_services() -> dict[str, str]:
    """Service name -> Python package to run with ``-m``."""
    out = {}
    for ep in entry_points(group="chargegate.services"):
        out[ep.name] = ep.value.split(":")[0].split(".")[0]
    return out


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff: float = BACKOFF_MIN_S
    next_start: float = 0.0
    restarts: int = 0
    logfile: Path | None = None
    config_file: Path | None = None  # exit code 2 (configuration error): restarted once this file changes
    waiting_for: float | None = None  # the config_file's mtime when it exited with a configuration error

    def start(self) -> None:
        env = {**os.environ, **self.env}
        out: BinaryIO | None = None
        if self.logfile is not None:  # a service's log names wallboxes, idTags, addresses: 0600
            out = open_private_append(self.logfile)
        self.popen = subprocess.Popen(self.argv, env=env, stdout=out, stderr=out, start_new_session=True)
        if out is not None:
            out.close()
        self.started_at = time.monotonic()
        log.info("process started", process=self.name, pid=self.popen.pid)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


class Supervisor:
    """Starts processes, restarts crashed ones with backoff, stops them all cleanly."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        self.broker: LocalBroker | None = None
        self._stop = False
        self._broker_next = 0.0  # when the broker may be restarted next
        self._broker_backoff = 0.0  # 0: at once (the first death after it ran stably)
        self._broker_failures = 0
        self._broker_started = 0.0

    def add(self, proc: Proc) -> None:
        self.procs.append(proc)

    def request_stop(self, *_: object) -> None:
        self._stop = True

    def start_all(self) -> None:
        if self.broker is not None:
            self.broker.start()
            self._broker_started = time.monotonic()
            log.info("broker started", port=self.broker.port, pid=self.broker.proc.pid if self.broker.proc else None)
        for p in self.procs:
            p.start()

    def _tick_broker(self, now: float) -> None:
        """Restart a dead broker: at once after it ran for a while, then with backoff (0.5 s doubling to
        30 s); a failure is logged at the 1st, 2nd, 4th, 8th, ... attempt, in one line each."""
        assert self.broker is not None
        if self.broker.alive():
            if self._broker_backoff and now - self._broker_started > STABLE_AFTER_S:
                self._broker_backoff = 0.0
            return
        if now < self._broker_next:
            return
        if self._broker_failures == 0:
            code = self.broker.proc.returncode if self.broker.proc else None
            log.warning("broker died, restarting it", port=self.broker.port, exit_code=code)
        try:
            self.broker.start(timeout=5)
        except BrokerError as e:
            self._broker_failures += 1
            self._broker_backoff = min(max(self._broker_backoff * 2, BACKOFF_MIN_S), BACKOFF_MAX_S)
            self._broker_next = now + self._broker_backoff
            n = self._broker_failures
            if n & (n - 1) == 0:  # 1, 2, 4, 8, ...
                log.error("broker restart failed", attempt=n, error=str(e), retry_in_s=self._broker_backoff)
            return
        pid = self.broker.proc.pid if self.broker.proc else None
        log.info("broker started", port=self.broker.port, pid=pid, restart=True,
                 after_attempts=self._broker_failures + 1)
        self._broker_failures = 0
        self._broker_started = now
        # dying again soon: the next restart waits (a broker that dies at once must not loop)
        self._broker_backoff = max(self._broker_backoff, BACKOFF_MIN_S)
        self._broker_next = now + self._broker_backoff

    def tick(self) -> None:
        now = time.monotonic()
        if self.broker is not None:
            self._tick_broker(now)
        for p in self.procs:
            if p.alive():
                if now - p.started_at > STABLE_AFTER_S:
                    p.backoff = BACKOFF_MIN_S
                continue
            if p.waiting_for is not None:  # a configuration error: again once the file changed
                if _mtime(p.config_file) != p.waiting_for:
                    log.info("configuration changed, starting again", process=p.name)
                    p.waiting_for = None
                    p.next_start = 0.0
                    p.restarts += 1
                    p.start()
                continue
            if p.popen is not None and p.next_start == 0.0:
                code = p.popen.returncode
                if code == CONFIG_ERROR_EXIT and p.config_file is not None:
                    p.waiting_for = _mtime(p.config_file)
                    log.error("process refused its configuration; not restarted until the configuration file "
                              "changes (its log says what is wrong)", process=p.name, exit_code=code,
                              config=str(p.config_file), log=str(p.logfile) if p.logfile else "stderr")
                    continue
                p.next_start = now + p.backoff
                log.warning("process exited, restarting", process=p.name, exit_code=code,
                            restart_in_s=round(p.backoff, 1))
                p.backoff = min(p.backoff * 2, BACKOFF_MAX_S)
            elif p.next_start and now >= p.next_start:
                p.next_start = 0.0
                p.restarts += 1
                p.start()

    def stop_all(self) -> None:
        for p in self.procs:
            if p.alive():
                assert p.popen is not None
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        for p in self.procs:
            if p.popen is None:
                continue
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("process did not stop in time, killing it", process=p.name)
                p.popen.kill()
                p.popen.wait(5)
        if self.broker is not None:
            self.broker.stop()
        log.info("all processes stopped")

    def run(self, until: Callable[[], bool] | None = None, on_tick: Callable[[], None] | None = None) -> None:
        old_int = signal.signal(signal.SIGINT, self.request_stop)
        old_term = signal.signal(signal.SIGTERM, self.request_stop)
        try:
            self.start_all()
            while not self._stop and not (until and until()):
                self.tick()
                if on_tick:
                    on_tick()
                time.sleep(0.1)
        finally:
            self.stop_all()
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)


def _mtime(path: Path | None) -> float:
    try:
        return path.stat().st_mtime if path is not None else 0.0
    except OSError:
        return 0.0


def build(config_path: Path, services: list[str] | None = None, logs_dir: Path | None = None) -> Supervisor:
    """A supervisor for the configuration's services (and its own broker when broker.host is unset)."""
    cfg = cfgmod.load(config_path)
    known = available_services()
    wanted = services or cfg.services
    instances = {cfgmod.instance_service(i): i for i in cfg.poller.instances}
    missing = [s for s in wanted if s not in known and s not in instances]
    if missing:
        raise SystemExit(f"unknown or not installed service(s): {', '.join(missing)}; "
                         f"installed: {', '.join(sorted(known)) or 'none'}")
    sup = Supervisor()
    if cfg.broker.host is None:
        sup.broker = LocalBroker.prepare(cfg)
    procs: list[tuple[str, str, tuple[str, ...]]] = []  # (process name, package, extra arguments)
    for name in wanted:
        if name == "evse-poller" and instances:  # one process per instance (poller.instances)
            procs += [(n, known[name], ("--instance", i)) for n, i in instances.items()]
        elif name in instances:
            procs.append((name, known["evse-poller"], ("--instance", instances[name])))
        else:
            procs.append((name, known[name], ()))
    for name, package, extra in dict.fromkeys(procs):
        sup.add(Proc(name, [sys.executable, "-m", package, "--config", str(config_path), *extra],
                     logfile=(logs_dir / f"{name}.log") if logs_dir else None, config_file=Path(config_path)))
    return sup


def run(config_path: Path, services: list[str] | None = None) -> int:
    """``chargegate run``: 0 after a clean stop; 1 with one message on stderr for anything that keeps it
    from starting (configuration, secrets, files, services, the broker's port) - never a traceback."""
    from chargegate.preflight import problems

    try:
        cfg = cfgmod.load(config_path)
        errors = problems(cfg, services)
        if errors:
            raise cfgmod.ConfigError(str(config_path), errors)
    except cfgmod.ConfigError as e:
        print(f"{e}\nchargegate run: not started (`chargegate config check {config_path}` lists the same)",
              file=sys.stderr)
        return 1
    if cfg.broker.host is None and not port_free(cfg.broker.port, cfg.broker.listen):
        print(f"chargegate run: not started: {port_in_use_message(cfg.broker.port, cfg.broker.listen, config_path)}",
              file=sys.stderr)
        return 1
    logsetup.setup("runner", cfg.logging.level, cfg.logging.format)
    try:
        sup = build(config_path, services)
        sup.run()
    except (BrokerError, OSError, LookupError) as e:
        print(f"chargegate run: {e}", file=sys.stderr)
        return 1
    return 0
