"""The compose stack for real: every image built, ``docker-compose.yml`` with the documented override
``docker-compose.local.yml`` (local base images) started on an engine of the test's own, a Modbus
wallbox and grid meter simulated in a container on the compose network, and the product checked
through the host's published ports (README "With Docker" and "Adding a service").

Images, the build cache and the local base images are cached (compose_support.CACHE); with a warm
cache the module takes about a minute. Where no engine can be started it is skipped with the reason."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_support import ROOT, Engine, EngineError, Watcher, compose_command, engine_problem, publish

from chargegate import payloads as p
from chargegate.broker import free_port
from conftest import wait_for

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]  # a cold cache: debootstrap and every build

PROJECT = "cgtest"
SERVICES = ("evse-poller", "load-controller", "ocpp-gateway", "history", "web", "smgw-link")
EXTRA = "my-service"  # the template's name (docker/extra-service)
SIM_PW, USER_PW, API_TOKEN = "sim-compose-test", "user-compose-test", "api-compose-test"
HOUSE_POWER_W = 24000
CONFIG = f"""version: 1
site: {{name: compose test, topic_root: chargegate}}
state_dir: /state
broker:
  host: mosquitto
  accounts: {{sim: {SIM_PW}, user: {USER_PW}}}
circuits:
  - id: grid
    fuse_a: 35
    meter: grid-meter
evses:
  - id: wallbox
    circuit: grid
    phases: 3
    max_current_a: 16
    modbus: {{profile: alfen-eve, host: sim, port: 1502, device_id: 1}}
meters:
  - id: grid-meter
    role: grid
    modbus: {{profile: sdm630, host: sim, port: 1503, device_id: 1}}
smgw:
  enabled: false
  functions: {{power_reduction: true}}
  http_api: {{enabled: true, host: 0.0.0.0, port: 8090, house_power_w: {HOUSE_POWER_W}, tokens: [{API_TOKEN}]}}
"""
# what docker-compose.local.yml does for the built-in services, for the extra service of the README's snippet
EXTRA_LOCAL = {"services": {EXTRA: {"build": {"args": {"BASE_IMAGE": "chargegate-local/python:3.11"}},
                                    "healthcheck": {"interval": "5s"}}}}


def say(msg: str) -> None:
    print(f"[compose] {msg}", flush=True)


class Stack:
    def __init__(self, engine: Engine, tmp: Path) -> None:
        self.engine = engine
        self.tmp = tmp
        self.cmd = compose_command() or []
        self.files = [ROOT / "docker-compose.yml", ROOT / "docker-compose.local.yml"]
        self.config_dir = tmp / "config"
        self.certs_dir = tmp / "certs"
        self.ports = {k: free_port() for k in ("MQTT", "OCPP", "WEB", "API", "CLS", "ADMIN")}
        self.env = {**engine.env(), "COMPOSE_PROJECT_NAME": PROJECT,
                    "CHARGEGATE_CONFIG_DIR": str(self.config_dir), "CHARGEGATE_CERTS_DIR": str(self.certs_dir),
                    **{f"CHARGEGATE_{k}_PORT": str(v) for k, v in self.ports.items()}}
        self.sim_image = ""
        self.network = ""

    # -- commands ---------------------------------------------------------------------------------
    def compose(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        argv = [*self.cmd, "--project-directory", str(ROOT), *[a for f in self.files for a in ("-f", str(f))], *args]
        r = subprocess.run(argv, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)}: exit {r.returncode}\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
        return r

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.engine.docker(*args, check=check)

    def containers(self) -> dict[str, str]:
        """service name -> container id (running or not) of this project."""
        out = self.docker("ps", "-a", "--filter", f"label=com.docker.compose.project={PROJECT}",
                          "--format", '{{.ID}} {{.Label "com.docker.compose.service"}}').stdout
        return {svc: cid for cid, svc in (line.split() for line in out.splitlines() if line.strip())}

    def inspect(self, service: str) -> dict[str, Any]:
        return json.loads(self.docker("inspect", self.containers()[service]).stdout)[0]

    def health(self) -> dict[str, str]:
        """service -> "healthy" / "starting" / "unhealthy" / the container's state when it has no check."""
        ids = self.containers()
        if not ids:
            return {}
        out = self.docker("inspect", "-f", '{{index .Config.Labels "com.docker.compose.service"}} {{.State.Status}} '
                          "{{if .State.Health}}{{.State.Health.Status}}{{end}}", *ids.values()).stdout
        res = {}
        for line in out.splitlines():
            svc, status, *h = line.split()
            res[svc] = h[0] if h else status
        return res

    def _all_healthy(self, services: tuple[str, ...], state: dict[str, str]) -> bool:
        state.update(self.health())
        return all(state.get(s) == "healthy" for s in services)

    async def healthy(self, services: tuple[str, ...] = ("mosquitto", *SERVICES),
                      timeout: float = 60) -> None:  # noqa: ASYNC109 - conftest.wait_for's timeout
        state: dict[str, str] = {}
        try:
            await wait_for(lambda: self._all_healthy(services, state), timeout, 0.5,
                           what=f"health checks of {', '.join(services)}")
        except AssertionError as e:
            raise AssertionError(f"{e}: {state}") from None

    def healthy_now(self, services: tuple[str, ...] = ("mosquitto", *SERVICES), timeout: float = 60) -> None:
        """:meth:`healthy` for the fixture (no event loop there)."""
        state: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while not self._all_healthy(services, state):
            if time.monotonic() > deadline:
                raise AssertionError(f"health checks of {', '.join(services)} not passed within {timeout} s: {state}")
            time.sleep(0.5)

    def secret(self, account: str) -> str:
        """A generated broker password, read as README "With Docker" says."""
        return self.compose("exec", "-T", "smgw-link", "cat", f"/state/broker/secrets/{account}").stdout.strip()

    # -- the simulated devices, on the compose network ---------------------------------------------
    def start_sim(self) -> None:
        poller = self.inspect("evse-poller")
        self.sim_image = poller["Image"]
        self.network = next(iter(poller["NetworkSettings"]["Networks"]))
        self.docker("rm", "-f", f"{PROJECT}-sim", check=False)
        self.docker("run", "-d", "--name", f"{PROJECT}-sim", "--network", self.network, "--network-alias", "sim",
                    "-u", "10001:10001", "-v", f"{self.config_dir}:/config:ro", "-v", f"{PROJECT}_state:/state",
                    "-e", "CHARGEGATE_BROKER_HOST=mosquitto", "-e", "CHARGEGATE_STATE_DIR=/state",
                    "-e", "CHARGEGATE_LOG_FORMAT=json", "--entrypoint", "python", self.sim_image,
                    "-m", "evse_poller.sim", "--config", "/config/chargegate.yaml")

    def stop_sim(self) -> None:
        self.docker("rm", "-f", f"{PROJECT}-sim", check=False)

    def up(self) -> None:
        self.compose("up", "-d")
        self.start_sim()

    def down(self, *args: str) -> None:
        # the services first, while the simulated devices still answer: an evse-poller whose device name
        # no longer resolves takes over 10 s to stop (blocking name lookups in its thread pool), and
        # compose then kills it
        self.compose("stop", check=False)
        self.stop_sim()
        self.compose("down", "--remove-orphans", *args)

    def logs(self) -> str:
        r = self.compose("logs", "--no-color", "--tail", "15", check=False)
        return (r.stdout + r.stderr)[-6000:]


def timed(what: str, fn, *args):  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    res = fn(*args)
    say(f"{what}: {time.monotonic() - t0:.1f} s")
    return res


def run(argv: list[str], env: dict[str, str], what: str) -> None:
    r = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise AssertionError(f"{what} failed (exit {r.returncode}):\n{r.stdout[-3000:]}{r.stderr[-3000:]}")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    problem = engine_problem()
    if problem:
        pytest.skip(f"compose stack not tested: {problem}")
    engine = Engine()
    try:
        timed("engine start", engine.start)
    except EngineError as e:
        engine.stop()
        pytest.skip(f"compose stack not tested: the container engine cannot be started here: {e}")
    tmp = Path(tempfile.mkdtemp(prefix="cg-compose-"))
    s = Stack(engine, tmp)
    try:
        s.config_dir.mkdir()
        s.certs_dir.mkdir()
        (s.config_dir / "chargegate.yaml").write_text(CONFIG)
        (s.config_dir / "chargegate.yaml").chmod(0o600)
        for path in (s.config_dir, s.certs_dir, s.config_dir / "chargegate.yaml"):  # README: chown -R 10001
            os.chown(path, 10001, 10001)
        env = engine.env()
        timed("wheelhouse", run, [str(ROOT / "scripts" / "build-wheelhouse.sh")], env, "scripts/build-wheelhouse.sh")
        timed("local base images", run, [str(ROOT / "scripts" / "docker-local-images.sh")], env,
              "scripts/docker-local-images.sh")
        s.compose("down", "-v", "--remove-orphans", check=False)  # whatever a run that died left
        s.stop_sim()
        timed("compose build (every image)", s.compose, "build")
        t0 = time.monotonic()
        s.up()
        s.healthy_now()
        say(f"compose up until every health check passed: {time.monotonic() - t0:.1f} s")
        yield s
    except BaseException:
        with_logs = s.logs() if s.containers() else ""
        say(f"stack logs:\n{with_logs}")
        raise
    finally:
        t0 = time.monotonic()
        s.down("-v")
        say(f"compose down -v: {time.monotonic() - t0:.1f} s")
        s.docker("image", "prune", "-f", check=False)  # the images of earlier builds: the cache stays bounded
        engine.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def observer(stack: Stack) -> Iterator[Watcher]:
    w = Watcher(stack.ports["MQTT"], "observer", stack.secret("observer"))
    yield w
    w.close()


def api_avail(stack: Stack, percent: float) -> dict[str, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{stack.ports['API']}/api/variables/AVAIL", method="PUT",
                                 data=json.dumps({"value": percent}).encode(),
                                 headers={"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def plug(stack: Stack) -> None:
    publish(stack.ports["MQTT"], "sim", SIM_PW, "chargegate/sim/wallbox/command",
            json.dumps({"action": "plug", "phases": 3, "max_current_a": 16}).encode())


def test_services_run_as_10001_with_read_only_config(stack: Stack) -> None:
    for svc in SERVICES:
        info = stack.inspect(svc)
        assert info["Config"]["User"] == "10001:10001", svc
        status = Path(f"/proc/{info['State']['Pid']}/status").read_text()  # the container's main process
        uid = re.search(r"^Uid:\s+(\d+)\s+(\d+)", status, re.M)
        gid = re.search(r"^Gid:\s+(\d+)\s+(\d+)", status, re.M)
        assert uid and uid.groups() == ("10001", "10001"), (svc, uid)
        assert gid and gid.groups() == ("10001", "10001"), (svc, gid)
        mount = next(m for m in info["Mounts"] if m["Destination"] == "/config")
        probe = stack.docker("exec", info["Id"], "sh", "-c", "touch /config/.probe && rm /config/.probe",
                             check=False)
        if svc == "smgw-link":  # its admin API writes new configuration versions (compose: read-write)
            assert mount["RW"] and probe.returncode == 0, probe.stderr
        else:
            assert not mount["RW"], svc
            assert probe.returncode != 0 and "Read-only file system" in probe.stderr, (svc, probe.stderr)
    # the broker is not root either (the Debian mosquitto drops to its user, uid 1883 as in eclipse-mosquitto)
    broker_pid = stack.inspect("mosquitto")["State"]["Pid"]
    uid = re.search(r"^Uid:\s+(\d+)", Path(f"/proc/{broker_pid}/status").read_text(), re.M)
    assert uid and uid.group(1) == "1883", uid


async def test_observer_reads_from_the_host_port_and_writes_nothing(stack: Stack, observer: Watcher) -> None:
    await wait_for(lambda: observer.get("service/load-controller/health") is not None, 10,
                   what="the observer's retained health of load-controller on the host port")
    assert not observer.refused
    t = time.time()
    probe = p.ModeCommand(evse_id="wallbox", max_current_a=7).to_json()
    publish(stack.ports["MQTT"], "observer", stack.secret("observer"), "chargegate/evse/wallbox/mode/set", probe)
    fence = p.ModeCommand(evse_id="wallbox", request_id="fence").to_json()
    publish(stack.ports["MQTT"], "user", USER_PW, "chargegate/evse/wallbox/mode/set", fence)
    await wait_for(lambda: observer.find(t, "evse/wallbox/mode/set", lambda m: m.get("request_id") == "fence"),
                   10, what="the household's mode command (after the observer's)")
    assert not observer.find(t, "evse/wallbox/mode/set", lambda m: m.get("max_current_a") == 7), \
        "the observer account wrote a command"


async def test_wallbox_status_and_grid_limit_lowers_setpoint(stack: Stack, observer: Watcher) -> None:
    await wait_for(lambda: (observer.get("evse/wallbox/status") or {}).get("online") is True, 30,
                   what="the simulated wallbox online on evse/wallbox/status")
    t = time.time()
    plug(stack)

    # the controller ramps up to the EVSE's maximum (16 A) while nothing else binds
    await wait_for(lambda: (observer.get("evse/wallbox/setpoint") or {}).get("current_a") == 16, 40,
                   what="the setpoint of 16 A for the plugged car")
    before = 16
    t = time.time()
    try:
        answer = api_avail(stack, 40)  # the variables API on the host port: 40 % of 24 kW
        assert answer["value"] == 40.0
        await wait_for(lambda: observer.find(t, "grid/limit/local", lambda m: m["active"] and
                                             m["power_w"] == pytest.approx(0.4 * HOUSE_POWER_W)), 15,
                       what="the active grid limit of AVAIL=40 on grid/limit/local")
        await wait_for(lambda: observer.find(t, "evse/wallbox/setpoint", lambda m: m["current_a"] < before), 20,
                       what=f"a setpoint below {before} A under the grid limit")
    finally:
        api_avail(stack, 100)


async def test_restart_of_load_controller_is_survived(stack: Stack, observer: Watcher) -> None:
    old = stack.inspect("load-controller")["State"]["Pid"]
    t = time.time()
    stack.compose("restart", "load-controller")
    assert stack.inspect("load-controller")["State"]["Pid"] != old
    await stack.healthy(("load-controller",))
    await wait_for(lambda: observer.find(t, "service/load-controller/health", lambda m: m["status"] == "online"),
                   10, what="load-controller online again after the restart")
    await wait_for(lambda: observer.since(time.time() - 1, "evse/wallbox/setpoint"), 15,
                   what="setpoints again after the restart")


async def test_crash_restarted_by_policy_and_docker_kill(stack: Stack, observer: Watcher) -> None:
    info = stack.inspect("history")
    count = info["RestartCount"]
    os.kill(info["State"]["Pid"], 9)  # a crash: the restart policy (unless-stopped) starts it again
    # `docker kill` is a stop by hand to the engine: the container stays stopped (README) and the rest
    # of the stack runs on; `docker compose up -d` starts it again
    stack.docker("kill", stack.containers()["evse-poller"])
    await wait_for(lambda: stack.inspect("history")["RestartCount"] == count + 1, 20,
                   what="the engine restarting the crashed history container")
    await wait_for(lambda: stack.inspect("evse-poller")["State"]["Status"] == "exited", 10,
                   what="the killed evse-poller container stopped")
    assert stack.inspect("evse-poller")["RestartCount"] == 0
    others = ("load-controller", "ocpp-gateway", "web", "smgw-link")
    assert all(stack.health()[s] == "healthy" for s in others), stack.health()
    t = time.time()
    stack.compose("up", "-d")
    await stack.healthy()
    await wait_for(lambda: observer.find(t, "evse/wallbox/status", lambda m: m["online"]), 20,
                   what="the wallbox's status again after the poller came back")


async def test_state_survives_down_and_up(stack: Stack, observer: Watcher) -> None:
    observer_pw = stack.secret("observer")
    t = time.time()
    publish(stack.ports["MQTT"], "user", USER_PW, "chargegate/evse/wallbox/mode/set",
            p.ModeCommand(evse_id="wallbox", max_current_a=11).to_json())
    await wait_for(lambda: observer.find(t, "evse/wallbox/mode", lambda m: m.get("max_current_a") == 11), 10,
                   what="the household's cap of 11 A recorded on evse/wallbox/mode")
    set_at = observer.get("evse/wallbox/mode")["set_at"]
    connects = observer.connects
    try:
        t0 = time.monotonic()
        stack.down()  # volumes stay
        assert not stack.containers()
        t = time.time()
        stack.up()
        await stack.healthy()
        say(f"compose down && up until healthy: {time.monotonic() - t0:.1f} s")
        # the generated passwords are in the state volume: the observer logs in again with the old one
        assert stack.secret("observer") == observer_pw
        await wait_for(lambda: observer.connects > connects, 15, what="the observer reconnected with its password")
        assert not observer.refused
        # the history record (state volume) still has the cap, set before the stack went down
        await wait_for(lambda: observer.find(t, "evse/wallbox/mode", lambda m: True), 20,
                       what="evse/wallbox/mode after up")
        mode = observer.get("evse/wallbox/mode")
        assert mode["max_current_a"] == 11 and mode["set_at"] == set_at, mode
    finally:
        publish(stack.ports["MQTT"], "user", USER_PW, "chargegate/evse/wallbox/mode/set",
                p.ModeCommand(evse_id="wallbox", clear_max_current=True).to_json())


def readme_snippet() -> str:
    """The compose entry of README "Adding a service" (its first yaml block)."""
    text = (ROOT / "README.md").read_text().split("## Adding a service", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert m, "README 'Adding a service' has no yaml block"
    return m.group(1)


async def test_extra_service_from_the_template_joins(stack: Stack, observer: Watcher) -> None:
    """README "Adding a service", step by step: the name into broker.extra_services, broker-init run
    again, the broker told to reread its accounts, the service's compose entry up."""
    cfg_file = stack.config_dir / "chargegate.yaml"
    cfg = yaml.safe_load(cfg_file.read_text())
    cfg["broker"]["extra_services"] = [EXTRA]
    cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    (stack.tmp / "docker-compose.override.yml").write_text(readme_snippet())
    (stack.tmp / "extra.local.yml").write_text(yaml.safe_dump(EXTRA_LOCAL))
    stack.files += [stack.tmp / "docker-compose.override.yml", stack.tmp / "extra.local.yml"]
    t0 = time.monotonic()
    stack.compose("run", "--rm", "-T", "broker-init")
    stack.compose("kill", "-s", "HUP", "mosquitto")
    t = time.time()
    stack.compose("up", "-d", "--build", EXTRA)
    await stack.healthy((EXTRA,))
    say(f"extra service built and healthy: {time.monotonic() - t0:.1f} s")
    await wait_for(lambda: observer.find(t, f"service/{EXTRA}/health", lambda m: m["status"] == "online"), 15,
                   what=f"{EXTRA} online on its health topic")
    await wait_for(lambda: observer.find(t, f"ext/{EXTRA}/hello", lambda m: m["data"]["evses_online"] >= 1), 20,
                   what=f"ext/{EXTRA}/hello with the wallbox it saw online")
    info = stack.inspect(EXTRA)
    assert info["Config"]["User"] == "10001:10001"
    assert stack.secret(EXTRA)  # its generated account
