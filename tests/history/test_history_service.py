"""The history service against the real Mosquitto (project ACL, own accounts): sessions and limits in over
MQTT, the record in SQLite; charging modes set by the `user` account, kept across restarts; kill -9 of the
recorder process during a session loses nothing; the CLI exports what was recorded."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from chargegate import config as cfgmod
from chargegate import payloads as p
from chargegate import record as rec
from chargegate.bus import Bus, Message
from chargegate.runtime import start_context, stop_context
from conftest import BrokerHandle, connected_bus, make_config, wait_for
from history.service import History

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "smgw_link"))  # the admin API's test helpers
from admin_support import ADMIN_TOKEN, VIEWER_TOKEN, admin_yaml, api, listen_port, running_link

CONFIG = """
site: {name: history-test}
circuits:
  - id: grid
    fuse_a: 35
    meter: grid-meter
evses:
  - {id: hwb1, circuit: grid, modbus: {profile: alfen-eve, host: 127.0.0.1, port: 1502}}
  - {id: hwb2, circuit: grid, ocpp: {charge_box_id: HCB2}}
meters:
  - {id: grid-meter, modbus: {profile: sdm630, host: 127.0.0.1, port: 1503}}
history:
  prices: {low: 20, normal: 30}
"""


class Rig:
    def __init__(self, broker: BrokerHandle, path: Path, poller: Bus, smgw: Bus, user: Bus, observer: Bus) -> None:
        self.broker, self.path, self.poller, self.smgw, self.user, self.observer = \
            broker, path, poller, smgw, user, observer
        self.modes: dict[str, p.ChargingMode] = {}
        self.records: dict[str, p.SessionRecord] = {}
        self.controls: list[p.ControlRecord] = []

    def status(self, evse: str, reg: float, sid: str | None = "t1", tag: str | None = "CARD", start: float = 0.0,
               online: bool = True) -> None:
        now = p.utcnow()
        sess = p.Session(id=sid, started=now, energy_start_wh=start, energy_wh=reg - start, id_tag=tag) if sid else None
        st = p.EvseStatus(evse_id=evse, online=online, state=p.EvseState.CHARGING if sid else p.EvseState.AVAILABLE,
                          energy_wh=reg, session=sess, power_w=11000.0 if sid else 0.0, phases_in_use=3 if sid else 0,
                          current_a=[16, 16, 16] if sid else [0, 0, 0], source="evse-poller")
        self.poller.publish("evse.status", st, evse_id=evse)

    def db(self):  # type: ignore[no-untyped-def]
        return rec.open_db(self.path, readonly=True)

    def sessions(self, evse: str) -> list[rec.SessionRow]:
        if not self.path.exists():
            return []
        c = self.db()
        try:
            return rec.sessions(c, evse=evse)
        finally:
            c.close()


@pytest.fixture(scope="module")
async def rig(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    tmp: Path = tmp_path_factory.mktemp("history")
    text = CONFIG + f"broker: {{port: {broker.port}}}\nstate_dir: {broker.config.state_dir}\n"
    cfg = make_config(tmp, text)  # writes chargegate.yaml too
    poller = await connected_bus(broker, "evse-poller")
    smgw = await connected_bus(broker, "smgw-link")
    user = await connected_bus(broker, "user")
    observer = await connected_bus(broker, "observer")
    for eid in ("hwb1", "hwb2"):
        poller.clear("evse.status", evse_id=eid)
    for src in ("dso", "supplier", "local", "failsafe"):
        smgw.clear("grid.limit", source=src)
    r = Rig(broker, cfg.history.db_path(cfg.state_dir), poller, smgw, user, observer)
    r.config = cfg  # type: ignore[attr-defined]
    r.config_path = tmp / "chargegate.yaml"  # type: ignore[attr-defined]

    def on_mode(m: Message) -> None:
        assert isinstance(m.payload, p.ChargingMode)
        r.modes[m.payload.evse_id] = m.payload

    def on_rec(m: Message) -> None:
        assert isinstance(m.payload, p.SessionRecord)
        r.records[m.payload.evse_id] = m.payload

    def on_ctl(m: Message) -> None:
        assert isinstance(m.payload, p.ControlRecord)
        r.controls.append(m.payload)

    observer.subscribe("evse.mode", on_mode)
    observer.subscribe("history.session", on_rec)
    observer.subscribe("history.control", on_ctl)
    await asyncio.sleep(0.2)
    try:
        yield r
    finally:
        for b in (poller, smgw, user, observer):
            await b.stop()


async def running(rig: Rig):  # type: ignore[no-untyped-def]
    ctx = await start_context("history", rig.config, rig.config_path, connect_timeout=5)  # type: ignore[attr-defined]
    h = History(ctx)
    task = asyncio.create_task(h.run())
    return ctx, h, task


async def stopped(ctx, task) -> None:  # type: ignore[no-untyped-def]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await stop_context(ctx)


async def test_modes_set_by_the_user_account_persist_across_a_restart(rig: Rig) -> None:
    ctx, h, task = await running(rig)
    try:
        await wait_for(lambda: "hwb1" in rig.modes and "hwb2" in rig.modes, 5)
        assert rig.modes["hwb1"].mode is p.ChargingModeName.RULES  # every EVSE shows its mode
        rig.user.publish("evse.mode_set", p.ModeCommand(evse_id="hwb1", mode=p.ChargingModeName.SOLAR_MIN,
                                                        target=p.SessionTarget(energy_wh=15000, by="07:00")),
                         evse_id="hwb1")
        await wait_for(lambda: rig.modes["hwb1"].mode is p.ChargingModeName.SOLAR_MIN, 5)
        assert rig.modes["hwb1"].target is not None and rig.modes["hwb1"].target.by == "07:00"
        assert rig.modes["hwb1"].set_by == "user"
        # an unknown EVSE is refused and counted
        rig.user.publish("evse.mode_set", p.ModeCommand(evse_id="nope", mode=p.ChargingModeName.NOW), evse_id="nope")
        await wait_for(lambda: ctx.counters["mode_unknown_evse"] == 1, 5)
    finally:
        await stopped(ctx, task)
    rig.observer.clear("evse.mode", evse_id="hwb1")  # only the database remembers now
    rig.modes.clear()
    ctx, h, task = await running(rig)
    try:
        await wait_for(lambda: "hwb1" in rig.modes, 5)
        assert rig.modes["hwb1"].mode is p.ChargingModeName.SOLAR_MIN
        # the session target belongs to the next session and ends with it
        rig.status("hwb1", 100.0, sid="m1")
        await wait_for(lambda: h.modes["hwb1"].target and h.modes["hwb1"].target.get("session_id") == "m1", 5)
        rig.status("hwb1", 200.0, sid=None)
        await wait_for(lambda: rig.modes["hwb1"].target is None, 5)
        assert rig.modes["hwb1"].mode is p.ChargingModeName.SOLAR_MIN
        rig.user.publish("evse.mode_set", p.ModeCommand(evse_id="hwb1", mode=p.ChargingModeName.RULES), evse_id="hwb1")
        await wait_for(lambda: rig.modes["hwb1"].mode is p.ChargingModeName.RULES, 5)
    finally:
        await stopped(ctx, task)


def test_the_user_account_writes_only_mode_commands(rig: Rig) -> None:
    from chargegate.broker import render_acl

    acl = render_acl("chargegate").split("user user\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert acl == ["topic read chargegate/#", "topic write chargegate/evse/+/mode/set"]


async def test_kill_9_during_a_session_loses_nothing(rig: Rig) -> None:
    env = {**os.environ, "CHARGEGATE_LOG_FORMAT": "json"}
    log = open(rig.path.parent.parent / "history-proc.log", "ab")
    argv = [sys.executable, "-m", "history", "--config", str(rig.config_path)]  # type: ignore[attr-defined]

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=log)

    proc = start()
    try:
        t0 = p.utcnow()
        rig.smgw.publish("grid.limit", p.GridLimit(source=p.LimitSource.DSO, active=True, power_w=6000, id="k9",
                                                   valid_until=t0 + timedelta(minutes=10)), source="dso")
        rig.status("hwb2", 10_000.0, sid="k9", start=10_000.0)
        await wait_for(lambda: len(rig.sessions("hwb2")) == 1, 10)
        rig.status("hwb2", 12_500.0, sid="k9", start=10_000.0)
        await wait_for(lambda: rig.sessions("hwb2")[0].energy_wh == 2500.0, 5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        # while it is dead the car charges on (the retained status is all it will see)
        rig.status("hwb2", 14_000.0, sid="k9", start=10_000.0)
        await asyncio.sleep(0.1)
        proc = start()
        await wait_for(lambda: rig.sessions("hwb2")[0].energy_wh == 4000.0, 10)
        # a kill right after the stop was committed: the stop stays
        rig.status("hwb2", 15_000.0, sid=None)
        await wait_for(lambda: rig.sessions("hwb2")[0].stopped is not None, 5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        proc = start()
        await wait_for(lambda: rig.records.get("hwb2") is not None and rig.records["hwb2"].stopped is not None, 10)
        [s] = rig.sessions("hwb2")
        assert (s.energy_start_wh, s.energy_stop_wh, s.energy_wh) == (10_000.0, 15_000.0, 5000.0)
        assert s.session_ids == ["k9"] and s.id_tag == "CARD"
        assert sum(t.energy_wh for t in s.tariffs) == 5000.0
        c = rig.db()
        try:
            limits = rec.controls(c, kind="limit", source="dso")
        finally:
            c.close()
        assert len([x for x in limits if x.limit_id == "k9"]) == 1  # one action, continued across the kills
        assert stat_mode(rig.path) == 0o600
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        log.close()
    rig.smgw.clear("grid.limit", source="dso")


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


def test_cli_exports(rig: Rig) -> None:
    cp = rig.config_path  # type: ignore[attr-defined]
    run = [sys.executable, "-m", "chargegate.cli", "history"]
    out = subprocess.run([*run, "sessions", "--config", str(cp), "--evse", "hwb2"], capture_output=True, text=True,
                         check=True).stdout
    lines = out.lstrip("\ufeff").splitlines()
    assert lines[0].split(";")[:7] == ["record_id", "evse", "id_tag", "start", "stop", "duration_min", "energy_kwh"]
    row = lines[1].split(";")
    assert row[1] == "hwb2" and row[2] == "CARD" and row[6] == "5,000"
    js = json.loads(subprocess.run([*run, "sessions", "--config", str(cp), "--evse", "hwb2", "--format", "json"],
                                   capture_output=True, text=True, check=True).stdout)
    assert js[0]["energy_wh"] == 5000.0 and js[0]["evse_id"] == "hwb2"
    summ = subprocess.run([*run, "summary", "--config", str(cp), "--id-tag", "CARD", "--style", "intl"],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    assert summ[0] == "month,id_tag,sessions,energy_kwh,cost,currency"
    ctl = subprocess.run([*run, "controls", "--config", str(cp), "--kind", "limit"], capture_output=True, text=True,
                         check=True).stdout
    assert ";k9;" in ctl


def admin_config(cp: Path, port: int) -> tuple[cfgmod.Config, Path]:
    (cp.parent / "admin").mkdir(exist_ok=True)
    return make_config(cp.parent / "admin", cp.read_text() + admin_yaml(port)), cp.parent / "admin" / "chargegate.yaml"


async def test_admin_api_history_and_mode(rig: Rig) -> None:
    port = listen_port()
    cp: Path = rig.config_path  # type: ignore[attr-defined]
    cfg, path = admin_config(cp, port)
    ctx, _, task = await running(rig)
    try:
        async with running_link(cfg, path):
            from chargegate.broker import wait_port

            await asyncio.to_thread(wait_port, "127.0.0.1", port, 10)
            status, body = await api(port, "GET", "/v1/history/sessions?evse=hwb2", VIEWER_TOKEN)
            assert status == 200 and body[0]["energy_wh"] == 5000.0 and body[0]["tariffs"]
            status, text = await api(port, "GET", "/v1/history/controls?format=csv&style=intl&kind=limit", VIEWER_TOKEN)
            assert status == 200 and text.lstrip("\ufeff").startswith("record_id,kind,source") and ",k9," in text
            status, body = await api(port, "GET", "/v1/history/summary?from=2000-01&to=2100-12", VIEWER_TOKEN)
            assert status == 200 and body and body[0]["id_tag"] == "CARD"
            status, _ = await api(port, "GET", "/v1/history/nonsense", VIEWER_TOKEN)
            assert status == 422
            status, _ = await api(port, "PUT", "/v1/evses/hwb1/mode", VIEWER_TOKEN, {"mode": "now"})
            assert status == 403
            status, _ = await api(port, "PUT", "/v1/evses/ghost/mode", ADMIN_TOKEN, {"mode": "now"})
            assert status == 404
            status, body = await api(port, "PUT", "/v1/evses/hwb1/mode", ADMIN_TOKEN,
                                     {"mode": "off", "target_kwh": 10, "by": "06:30"})
            assert status == 202, body
            await wait_for(lambda: rig.modes.get("hwb1") is not None and rig.modes["hwb1"].mode.value == "off", 5)
            assert rig.modes["hwb1"].set_by == "admin:alice" and rig.modes["hwb1"].target.energy_wh == 10000
            status, body = await api(port, "GET", "/v1/modes", VIEWER_TOKEN)
            assert status == 200 and {x["evse_id"]: x["mode"] for x in body} == {"hwb1": "off", "hwb2": "rules"}
    finally:
        await stopped(ctx, task)
