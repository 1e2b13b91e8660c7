"""The recorder on a real SQLite file: sessions (energy, tariff parts, costs, signed data, restarts of the
drivers), control actions, the time series with the house load, retention, the disk bound, migrations."""

from __future__ import annotations

import os
import sqlite3
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from chargegate import config as cfgmod
from chargegate import payloads as p
from chargegate import record as rec
from history.recorder import Recorder
from history.service import bound, retention, used_bytes

T0 = datetime(2026, 3, 2, 17, 0, tzinfo=UTC)

CONFIG = """
site: {name: test}
circuits:
  - id: grid
    fuse_a: 35
    meter: grid-meter
    children:
      - {id: garage, fuse_a: 32}
evses:
  - {id: wb1, circuit: garage, modbus: {profile: alfen-eve, host: 127.0.0.1, port: 1502}}
  - {id: wb2, circuit: garage, phases: 1, phase_rotation: [2], ocpp: {charge_box_id: CB1}}
meters:
  - {id: grid-meter, modbus: {profile: sdm630, host: 127.0.0.1, port: 1503}}
history:
  prices: {low: 20, normal: 35, default_ct_per_kwh: 40}
"""


@pytest.fixture
def cfg(tmp_path: Path) -> cfgmod.Config:
    path = tmp_path / "chargegate.yaml"
    path.write_text(CONFIG)
    return cfgmod.load(path)


@pytest.fixture
def db(cfg: cfgmod.Config) -> sqlite3.Connection:
    return rec.open_db(cfg.history.db_path(cfg.state_dir))


def status(evse: str, ts: datetime, *, sid: str | None = "s1", reg: float | None = 1000.0, start: float = 1000.0,
           power: float | None = 11000.0, tag: str | None = "TAG1", online: bool = True,
           state: p.EvseState = p.EvseState.CHARGING, cur: float = 16.0, **session: object) -> p.EvseStatus:
    sess = None
    if sid is not None:
        sess = p.Session(id=sid, started=session.pop("started", T0), energy_start_wh=start,  # type: ignore[arg-type]
                         energy_wh=max(0.0, (reg or start) - start), id_tag=tag)
        for k, v in session.items():
            setattr(sess, k, v)
    return p.EvseStatus(ts=ts, evse_id=evse, online=online, state=state if sid or not online else p.EvseState.AVAILABLE,
                        energy_wh=reg, session=sess, power_w=power, phases_in_use=3 if sid else 0,
                        current_a=[cur, cur, cur] if sid else [0.0, 0.0, 0.0])


def period(pid: str, level: str, start: datetime, end: datetime) -> p.TariffPeriod:
    return p.TariffPeriod(id=pid, level=p.TariffLevel(level), start=start, end=end)


def test_db_file_is_private_and_wal(cfg: cfgmod.Config, db: sqlite3.Connection) -> None:
    path = cfg.history.db_path(cfg.state_dir)
    r = Recorder(db, cfg)
    r.on_status(status("wb1", T0), T0)
    r.flush()
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for suffix in ("", "-wal", "-shm"):
        f = Path(f"{path}{suffix}")
        assert f.exists(), f
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700


def test_session_energy_tariff_parts_and_cost(cfg: cfgmod.Config, db: sqlite3.Connection) -> None:
    r = Recorder(db, cfg)
    split = T0 + timedelta(minutes=30)
    r.on_tariff_schedule(p.TariffSchedule(periods=[period("n1", "normal", T0 - timedelta(hours=1), split),
                                                   period("l1", "low", split, split + timedelta(hours=5))]))
    r.on_status(status("wb1", T0), T0)
    # energy between two statuses counts in the tariff in force at the later one
    for i, reg in enumerate([1500.0, 3000.0]):  # 2000 Wh before the split
        r.on_status(status("wb1", T0 + timedelta(minutes=10 * (i + 1)), reg=reg, power=11000 + i), T0)
    for i, reg in enumerate([4000.0, 6000.0, 9000.0]):  # 6000 Wh after
        r.on_status(status("wb1", split + timedelta(minutes=10 * i), reg=reg, power=10000.0), T0)
    stop = split + timedelta(minutes=25)
    r.on_status(status("wb1", stop, sid=None, reg=9000.0), stop)
    r.flush()
    [s] = rec.sessions(db)
    assert (s.evse_id, s.id_tag, s.started, s.stopped) == ("wb1", "TAG1", T0, stop)
    assert (s.energy_start_wh, s.energy_stop_wh, s.energy_wh) == (1000.0, 9000.0, 8000.0)
    assert s.peak_power_w == 11001 and s.phases == 3
    assert [(t.period_id, t.level, t.energy_wh, t.price_ct_per_kwh) for t in s.tariffs] == [
        ("n1", "normal", 2000.0, 35), ("l1", "low", 6000.0, 20)]
    assert s.cost == pytest.approx(2 * 0.35 + 6 * 0.20)
    [m] = rec.monthly_summary(db)
    assert (m.month, m.id_tag, m.sessions, m.energy_wh) == ("2026-03", "TAG1", 1, 8000.0)
    assert m.cost == pytest.approx(1.9)


def test_driver_restart_is_one_session_and_another_tag_is_two(cfg: cfgmod.Config, db: sqlite3.Connection) -> None:
    r = Recorder(db, cfg)
    r.on_status(status("wb1", T0, reg=1000.0), T0)
    r.on_status(status("wb1", T0 + timedelta(minutes=5), reg=2000.0), T0)
    # the poller restarted: a new session id counted from the register now, the car never left
    t1 = T0 + timedelta(minutes=6)
    r.on_status(status("wb1", t1, sid="s2", start=2000.0, reg=2000.0, tag=None, started=t1), t1)
    r.on_status(status("wb1", t1 + timedelta(minutes=5), sid="s2", start=2000.0, reg=3500.0, tag=None,
                       started=t1), t1)
    # another card: a new session
    t2 = T0 + timedelta(minutes=20)
    r.on_status(status("wb1", t2, sid="s3", start=3500.0, reg=3600.0, tag="TAG2", started=t2), t2)
    r.flush()
    a, b = rec.sessions(db)
    assert a.session_ids == ["s1", "s2"] and a.started == T0 and a.energy_wh == 2500.0 and a.stopped == t2
    assert b.id_tag == "TAG2" and b.energy_wh == 100.0 and b.stopped is None


def test_restart_of_the_recorder_continues_open_sessions(cfg: cfgmod.Config, db: sqlite3.Connection) -> None:
    r = Recorder(db, cfg)
    r.on_status(status("wb1", T0, reg=1000.0), T0)
    r.on_status(status("wb1", T0 + timedelta(minutes=1), reg=1200.0), T0)
    r.flush()
    r2 = Recorder(db, cfg)  # what a restarted service builds from the database
    assert r2.sessions["wb1"].energy_wh == 200.0
    r2.on_status(status("wb1", T0 + timedelta(minutes=2), reg=1700.0), T0)
    r2.on_status(status("wb1", T0 + timedelta(minutes=3), sid=None, reg=1700.0), T0)
    r2.flush()
    [s] = rec.sessions(db)
    assert s.energy_wh == 700.0 and s.stopped is not None
    assert sum(t.energy_wh for t in s.tariffs) == 700.0
    assert [t.level for t in s.tariffs] == ["unknown"] and s.cost == pytest.approx(0.7 * 0.40)


def test_offline_status_does_not_end_a_session(cfg: cfgmod.Config, db: sqlite3.Connection) -> None:
    r = Recorder(db, cfg)
    r.on_status(status("wb1", T0), T0)
    r.on_status(p.EvseStatus(ts=T0 + timedelta(seconds=5), evse_id="wb1", online=False, state=p.EvseState.OFFLINE), T0)
    r.flush()
    [s] = rec.sessions(db)
    assert s.stopped is None


def test_signed_meter_data_kept_exactly(cfg: cfgmod.Config, db: sqlite3.Connection) -> None:
    ocmf = 'OCMF|{"FV":"1.0","RD":[{"TM":"2026-03-02T17:00:00,000+0000 S","RV":1.0}]}|{"SD":"30450221"}'
    r = Recorder(db, cfg)
    st = status("wb2", T0)
    st.session = st.session.model_copy(update={"signed_meter_values": [  # type: ignore[union-attr]
        {"data": ocmf, "format": "OCMF", "context": "Transaction.Begin"}, ocmf + " "]})
    r.on_status(st, T0)
    r.on_status(st, T0)  # the same data again is kept once
    r.flush()
    [s] = rec.sessions(db)
    assert [(v.context, v.format, v.data) for v in s.signed] == [("Transaction.Begin", "OCMF", ocmf),
                                                                  (None, None, ocmf + " ")]


def test_control_actions(cfg: cfgmod.Config, db: sqlite3.Connection) -> None:
    r = Recorder(db, cfg)

    def lim(ts: datetime, active: bool = True, w: float | None = 6000.0, until_s: float = 60, lid: str = "L1"):  # type: ignore[no-untyped-def]
        return p.GridLimit(ts=ts, source=p.LimitSource.DSO, active=active, power_w=w if active else None,
                           valid_until=ts + timedelta(seconds=until_s), id=lid, reason="LPC",
                           scope=p.LimitScope.CONTROLLABLE)

    r.on_grid_limit(lim(T0), T0)
    r.on_grid_limit(lim(T0 + timedelta(seconds=30)), T0 + timedelta(seconds=30))  # heartbeat: same action
    r.on_allocation(p.Allocation(ts=T0, cycle=1, limits={"grid_limits": [
        {"source": "dso", "raised_to_floor": True, "effective_w": 7560.0}]}), T0 + timedelta(seconds=31))
    t_new = T0 + timedelta(seconds=40)
    r.on_grid_limit(lim(t_new, w=4200.0, lid="L2"), t_new)  # another value: a new action
    t_end = T0 + timedelta(seconds=70)
    r.on_grid_limit(lim(t_end, active=False), t_end)
    # the link: down, then up
    r.on_link(p.SmgwLinkStatus(ts=T0, state=p.LinkState.UP, since=T0), T0)
    r.on_link(p.SmgwLinkStatus(ts=T0 + timedelta(seconds=5), state=p.LinkState.DOWN, since=T0 + timedelta(seconds=5),
                               error="timeout"), T0 + timedelta(seconds=5))
    r.on_link(p.SmgwLinkStatus(ts=T0 + timedelta(seconds=50), state=p.LinkState.UP, since=T0 + timedelta(seconds=50)),
              T0 + timedelta(seconds=50))
    # the controller's own failsafe
    fs = {"cause": "SMGW link lost", "since": T0.isoformat(), "until": (T0 + timedelta(hours=2)).isoformat(),
          "power_w": 4200.0, "scope": "controllable", "effective_w": 7560.0, "raised_to_floor": True}
    r.on_allocation(p.Allocation(ts=T0 + timedelta(seconds=60), cycle=2, limits={"failsafe": fs}), t_end)
    r.on_allocation(p.Allocation(ts=T0 + timedelta(seconds=90), cycle=3, limits={}), T0 + timedelta(seconds=90))
    r.flush()
    rows = rec.controls(db)
    kinds = [(c.kind, c.source, c.power_w, c.started, c.ended) for c in rows]
    assert kinds == [
        ("limit", "dso", 6000.0, T0, t_new),
        ("failsafe", "load-controller", 4200.0, T0, T0 + timedelta(seconds=90)),
        ("link_outage", "smgw-link", None, T0 + timedelta(seconds=5), T0 + timedelta(seconds=50)),
        ("limit", "dso", 4200.0, t_new, t_end),
    ]
    assert rows[0].raised_to_floor is True and rows[0].effective_w == 7560.0 and rows[0].detail == "LPC"
    assert rows[1].detail == "SMGW link lost"
    # a window picks what was in force in it
    assert [c.id for c in rec.controls(db, start=T0 + timedelta(seconds=45), end=T0 + timedelta(seconds=46))] \
        == [rows[1].id, rows[2].id, rows[3].id]


def test_limit_expiring_without_a_message_is_closed(cfg: cfgmod.Config, db: sqlite3.Connection) -> None:
    r = Recorder(db, cfg)
    until = T0 + timedelta(seconds=60)
    r.on_grid_limit(p.GridLimit(ts=T0, source=p.LimitSource.SUPPLIER, active=True, power_w=5000, valid_until=until), T0)
    r.expire(T0 + timedelta(seconds=30))
    r.expire(T0 + timedelta(seconds=61))
    r.flush()
    [c] = rec.controls(db)
    assert c.ended == until and c.source == "supplier"


def test_minute_series_and_house_load(cfg: cfgmod.Config, db: sqlite3.Connection) -> None:
    r = Recorder(db, cfg)
    t = T0
    for i in range(60):
        now = t + timedelta(seconds=i)
        r.on_reading(p.MeterReading(ts=now, meter_id="grid-meter", current_a=[20.0, 12.0 + (i % 2) * 2, 8.0]))
        r.on_status(status("wb1", now, cur=10.0), now)
        wb2 = status("wb2", now, sid="x", cur=0.0)
        wb2.current_a = [6.0, 0.0, 0.0]  # 1-phase EVSE on grid L2
        r.on_status(wb2, now)
        r.sample(now)
    r.sample(t + timedelta(seconds=60))  # the next minute writes the previous one
    r.flush()
    [grid] = rec.node_series(db, node="grid")
    assert grid.ts == T0 and grid.measured_a == [20.0, 13.0, 8.0] and grid.limit_a == [35.0, 35.0, 35.0]
    assert grid.house_a == [10.0, 0.0, 0.0]  # L2: 13 - 10 - 6 floored at 0
    assert rec.house_load(db) == [(T0, "grid", [10.0, 0.0, 0.0])]  # garage has no meter
    evs = {s.evse_id: s for s in rec.evse_series(db)}
    assert evs["wb1"].drawn_a == [10.0, 10.0, 10.0] and evs["wb2"].drawn_a == [6.0, 0.0, 0.0]


def test_retention_and_disk_bound(cfg: cfgmod.Config, db: sqlite3.Connection) -> None:
    cfg.history.retention.series_days = 1
    cfg.history.retention.controls_days = 731
    r = Recorder(db, cfg)
    old = T0 - timedelta(days=800)
    r.on_grid_limit(p.GridLimit(ts=old, source=p.LimitSource.DSO, active=True, power_w=5000,
                                valid_until=old + timedelta(minutes=1)), old)
    r.expire(old + timedelta(minutes=2))
    r.on_grid_limit(p.GridLimit(ts=T0, source=p.LimitSource.SUPPLIER, active=True, power_w=5000,
                                valid_until=T0 + timedelta(minutes=1)), T0)
    r.flush()
    db.execute("BEGIN")
    for i in range(3000):
        ts = rec.iso(T0 - timedelta(minutes=i))
        db.execute("INSERT INTO series_evse (ts, evse_id, drawn_l1, bound_by, detail) VALUES (?, 'wb1', 1, ?, ?)",
                   (ts, "x" * 50, "y" * 200))
    db.execute("COMMIT")
    gone = retention(db, cfg, T0)
    assert gone["controls"] == 1 and gone["series"] == 3000 - 1441
    assert len(rec.controls(db)) == 1
    before = used_bytes(db)
    trimmed = bound(db, before // 2)
    assert trimmed > 0 and used_bytes(db) <= before // 2
    left = rec.evse_series(db)
    assert left and left[0].ts > T0 - timedelta(days=1)  # the oldest went first
    path = cfg.history.db_path(cfg.state_dir)
    assert os.stat(path).st_size <= before // 2  # the file shrank with it (incremental vacuum)
    assert rec.disk_usage(path) <= before // 2 + 64 * 1024  # and the WAL was truncated (-shm: 32 KiB)


def test_migrations_from_version_1_and_newer_refused(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for stmt in rec.MIGRATIONS[0][1].split(";"):
        if stmt.strip():
            conn.execute(stmt)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO sessions (evse_id, session_id, started, last_seen) VALUES ('wb1','s','x','x')")
    conn.close()
    db = rec.open_db(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == rec.SCHEMA_VERSION
    assert db.execute("SELECT count(*) FROM sessions").fetchone()[0] == 1
    assert "mode" in [r[1] for r in db.execute("PRAGMA table_info(series_evse)")]
    db.execute(f"PRAGMA user_version = {rec.SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(rec.RecordError, match="schema version"):
        rec.open_db(path)
    with pytest.raises(rec.RecordError, match="schema version"):
        rec.open_db(path, readonly=True)
