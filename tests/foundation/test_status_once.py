"""``chargegate status --once`` against a real broker holding the services' retained payloads, and
the grid/tariff/link/allocation rows of the status view for the shapes the services publish."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import timedelta
from typing import Any

import pytest

from chargegate import payloads as p
from chargegate.status_view import Snapshot, grid_rows
from conftest import BrokerHandle, connected_bus


def _alloc(dso_w: float, effective_w: float) -> p.Allocation:
    """An allocation in the shape load-controller publishes under a DSO limit raised to the §14a floor."""
    until = (p.utcnow() + timedelta(seconds=90)).isoformat()
    return p.Allocation(cycle=47, solve_ms=0.7, evses=[
        p.EvseAllocation(evse_id="wb1", current_a=6.8, phases=3, bound_by="§14a_floor",
                         detail=f"dso limit {dso_w:.0f} W raised to the §14a floor {effective_w:.0f} W"),
        p.EvseAllocation(evse_id="wb2", current_a=0, phases=1, bound_by="min_current",
                         detail="the minimum 6 A does not fit under §14a_floor"),
        p.EvseAllocation(evse_id="wb3", current_a=6.0, phases=3, bound_by="§14a_floor",
                         detail=f"dso limit {dso_w:.0f} W raised to the §14a floor {effective_w:.0f} W"),
        p.EvseAllocation(evse_id="wb4", current_a=0, phases=3, bound_by="evse_offline"),
    ], limits={
        "grid_limits": [
            {"source": "dso", "scope": "controllable", "power_w": dso_w, "current_a": None,
             "effective_w": effective_w, "effective_current_a": None, "raised_to_floor": True, "valid_until": until},
            {"source": "local", "active": False, "expired": False, "valid_until": until},
        ],
        "failsafe": None, "floor_14a_w": effective_w, "controllable_evses": 2,
        "warnings": [f"dso limit {dso_w:.0f} W raised to the §14a floor {effective_w:.0f} W"],
    })


def _link() -> p.SmgwLinkStatus:
    return p.SmgwLinkStatus(
        state=p.LinkState.UP, gateway="127.0.0.1:7443", since=p.utcnow() - timedelta(seconds=30),
        certificate="demo-cls",
        cert_not_after=p.utcnow() + timedelta(days=365), cert_days_left=365.0, bytes_tx=8523, bytes_rx=10824,
        channels={
            "operator-mqtt": {"listen": "127.0.0.1:38769", "target": "mqtt.operator.test:8883", "enabled": True,
                              "active": 1, "opened": 1, "failed": 0},
            "operator-ocpp": {"listen": "127.0.0.1:36865", "target": "ocpp.operator.test:443", "enabled": False,
                              "active": 0, "opened": 0, "failed": 0},
            "tls": {"version": "TLSv1.2", "cipher": "ECDHE-ECDSA-AES128-GCM-SHA256", "gateway_sha256": "48cb"},
            "error_kind": None, "clseedi": {"connected": True, "broker": "mqtt.operator.test:8883", "sent": 2},
            "failsafe": False, "operator_link": True})


@pytest.fixture(scope="module")
async def retained(broker: BrokerHandle) -> dict[str, Any]:
    """Every service's retained state, published with the service's own account (the ACL applies)."""
    now = p.utcnow()
    low_end = now + timedelta(minutes=30)
    poller = await connected_bus(broker, "evse-poller")
    ctl = await connected_bus(broker, "load-controller")
    smgw = await connected_bus(broker, "smgw-link")
    poller.publish("evse.status", p.EvseStatus(
        evse_id="wb1", online=True, state=p.EvseState.CHARGING, iec_state=p.IecState.C, phases_in_use=3,
        current_a=[6.8, 6.8, 6.8], power_w=4692, energy_wh=1234,
        applied=p.AppliedSetpoint(current_a=6.8, phases=3, seq=7)), evse_id="wb1")
    # a 1-phase car on a 3-phase wallbox without phase switching: granted x3, draws on L1 only
    poller.publish("evse.status", p.EvseStatus(
        evse_id="wb3", online=True, state=p.EvseState.CHARGING, iec_state=p.IecState.C, phases_in_use=1,
        current_a=[6.0, 0.0, 0.0], power_w=1380, energy_wh=99), evse_id="wb3")
    poller.publish("evse.status", p.EvseStatus(evse_id="wb2", online=True, state=p.EvseState.SUSPENDED),
                   evse_id="wb2")
    poller.publish("evse.status", p.EvseStatus(evse_id="wb4", online=False, state=p.EvseState.OFFLINE,
                                               reason="no answer"), evse_id="wb4")
    poller.publish("meter.reading", p.MeterReading(meter_id="grid-meter", current_a=[19.8, 13.8, 13.8],
                                                   power_w=10902, energy_import_wh=107.7), meter_id="grid-meter")
    ctl.publish("evse.setpoint", p.Setpoint(evse_id="wb1", current_a=6.8, phases=3,
                                            valid_until=now + timedelta(seconds=10), seq=7), evse_id="wb1")
    ctl.publish("controller.allocation", _alloc(6000, 13020))
    smgw.publish("grid.limit", p.GridLimit(
        source=p.LimitSource.DSO, active=True, power_w=6000, scope=p.LimitScope.CONTROLLABLE,
        valid_until=now + timedelta(seconds=90), id="clseedi:1", reason="CLS.EEDI LPC consumption limit for 120 s",
        failsafe_power_w=4200, failsafe_duration_s=7200), source="dso")
    smgw.publish("grid.limit", p.GridLimit(source=p.LimitSource.LOCAL, active=False, scope=p.LimitScope.GRID,
                                           valid_until=now + timedelta(seconds=120), id="avail:local",
                                           reason="AVAIL=100 %"), source="local")
    smgw.publish("tariff.current", p.TariffCurrent(
        period=p.TariffPeriod(id="demo-low", level=p.TariffLevel.LOW, start=now, end=low_end, price_ct_per_kwh=19.5),
        source=p.LimitSource.DSO, valid_until=low_end))
    smgw.publish("tariff.schedule", p.TariffSchedule(periods=[
        p.TariffPeriod(id="demo-low", level=p.TariffLevel.LOW, start=now, end=low_end),
        p.TariffPeriod(id="demo-normal", level=p.TariffLevel.NORMAL, start=low_end, end=low_end + timedelta(hours=1)),
    ], source=p.LimitSource.DSO))
    smgw.publish("link.smgw", _link())
    smgw.publish("service.health", p.Health(service="smgw-link", status=p.HealthStatus.ONLINE, version="0.1.0",
                                            uptime_s=80), service="smgw-link")
    others = [await connected_bus(broker, name) for name in ("evse-poller", "load-controller", "history")]
    for bus, name in zip(others, ("evse-poller", "load-controller", "history"), strict=True):
        bus.publish("service.health", p.Health(service=name, status=p.HealthStatus.ONLINE, version="0.1.0",
                                               uptime_s=80), service=name)
    await asyncio.sleep(0.3)  # QoS 1, retained: on the broker once acknowledged
    for bus in (poller, ctl, smgw, *others):
        await bus.stop()
    return {"low_end": low_end}


def _status_once(broker: BrokerHandle, *extra: str, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}, **(env or {})}
    return subprocess.run([sys.executable, "-m", "chargegate.cli", "status", "--config", str(broker.config_path),
                           "--once", "--timeout", "8", *extra], capture_output=True, text=True, env=env, timeout=30)


def _rows(out: str) -> dict[str, str]:
    """The first word of each line -> the line (EVSE rows), and the first cell of the table (grid rows)."""
    rows = {}
    lines = out.splitlines()
    key = ""
    for i, line in enumerate(lines):
        if line.count("│") >= 2:
            first = line.split("│")[0].strip()
            if first:
                key = first
                rows[key] = line
            elif key:  # a value folded onto the next line
                rows[key] += " " + line.split("│")[1].strip()
        elif line and not line.startswith(" ") and i + 1 < len(lines) and lines[i + 1].startswith("  ↳ "):
            rows[line.split()[0]] = line + "\n" + lines[i + 1]  # an EVSE: its figures and why
    return rows


async def test_status_once_shows_retained_state(broker: BrokerHandle, retained: dict[str, Any]) -> None:
    r = await asyncio.get_running_loop().run_in_executor(None, lambda: _status_once(broker, env={"COLUMNS": "200"}))
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    lines = _rows(out)
    # EVSE row: status, grant and why in words (the code's sentence)
    assert "charging" in lines["wb1"] and "6.8/6.8/6.8" in lines["wb1"] and "6.8 A x3" in lines["wb1"]
    assert "the grid operator's limit of 6000 W is below the §14a floor: raised to 13020 W" in lines["wb1"]
    assert "waits: no room left for its minimum 6 A under the grid operator's limit (§14a floor)" in lines["wb2"]
    # the 1-phase car on a 3-phase wallbox: the phase it really uses
    assert "6.0/0.0/0.0" in lines["wb3"] and "6.0 A x1 (of 3)" in lines["wb3"]
    assert "OFFLINE" in lines["wb4"] and "the wallbox is not reachable" in lines["wb4"]
    assert "19.8/13.8/13.8" in lines["meter grid-meter"] and "10902" in lines["meter grid-meter"]
    # the DSO limit, as asked and as applied
    dso = lines["grid limit (dso)"]
    assert "6000 W active, scope controllable" in dso and "applied 13020 W (§14a floor)" in dso
    assert "inactive (AVAIL=100 %)" in lines["grid limit (local)"]
    # the tariff with its price and end, and the next period
    assert "low (demo-low, 19.5 ct/kWh) from dso" in lines["tariff"]
    assert f"{retained['low_end'].astimezone():%H:%M:%S}" in lines["tariff"]
    assert "normal (demo-normal)" in lines["next tariff"]
    # the SMGW link
    link = lines["SMGW link"]
    assert link.split("│")[1].strip().startswith("up - gateway 127.0.0.1:7443")
    for part in ("TLSv1.2", "cert demo-cls (365 days left)", "operator-mqtt open", "operator-ocpp off",
                 "CLS.EEDI connected"):
        assert part in link, part
    # the allocation names what binds
    assert "bound by evse_offline, min_current, §14a_floor" in lines["allocation"]
    assert "services: 4 of 4 online (evse-poller, history, load-controller, smgw-link)" in out
    # the ports, from the configuration
    assert f"ports on 127.0.0.1: broker {broker.port}" in out


async def test_status_fits_100_by_30_and_prints_ports(broker: BrokerHandle, retained: dict[str, Any]) -> None:
    """4 wallboxes, a meter, limits, tariff, link, services: within 100 columns and 30 lines, by --size and
    by COLUMNS/LINES; ``--port broker`` prints the port alone, from the ``ports`` file next to the config."""
    loop = asyncio.get_running_loop()
    for how in (("--size", "100x30"), ()):
        r = await loop.run_in_executor(None, lambda how=how: _status_once(
            broker, *how, env={} if how else {"COLUMNS": "100", "LINES": "30"}))
        assert r.returncode == 0, r.stdout + r.stderr
        lines = r.stdout.rstrip("\n").splitlines()
        assert len(lines) <= 30 and max(len(x) for x in lines) <= 100, (len(lines), r.stdout)
        assert "6.0 A x1 (of 3)" in r.stdout and "SMGW link" in r.stdout and "services: 4 of 4" in r.stdout
    ports = broker.config_path.parent / "ports"
    ports.write_text('{"broker": 1884, "web": 8080, "ocpp_backend_record": 8095, "bad": "x"}')
    try:
        got = await loop.run_in_executor(None, lambda: _status_once(broker, "--port", "ocpp_backend_record"))
        assert got.returncode == 0 and got.stdout == "8095\n", got
        missing = await loop.run_in_executor(None, lambda: _status_once(broker, "--port", "nope"))
        assert missing.returncode == 1 and "known: broker, " in missing.stderr
    finally:
        ports.unlink()


def test_grid_rows_expired_failsafe_and_link_down() -> None:
    """An active limit past valid_until reads "expired"; a down link shows its error and the failsafe."""
    snap = Snapshot("chargegate")
    old = p.utcnow() - timedelta(seconds=30)
    snap.feed("chargegate/grid/limit/dso", p.GridLimit(source=p.LimitSource.DSO, active=True, power_w=5000,
                                                       valid_until=old).model_dump_json().encode())
    link = p.SmgwLinkStatus(state=p.LinkState.DOWN, error="tls: TLS alert 'unknown ca'", since=old,
                            channels={"failsafe": True, "operator_link": False})
    snap.feed("chargegate/link/smgw", link.model_dump_json().encode())
    alloc = _alloc(5000, 13020).model_dump(mode="json")
    until = (p.utcnow() + timedelta(hours=2)).isoformat()
    alloc["limits"]["failsafe"] = {"cause": "SMGW link down", "since": old.isoformat(), "until": until,
                                   "power_w": 4200.0, "scope": "controllable", "effective_w": 13020.0,
                                   "raised_to_floor": True}
    snap.feed("chargegate/controller/allocation", json.dumps(alloc).encode())
    snap.feed("chargegate/tariff/current", b"not json")  # ignored, not a crash
    rows = {what: (val, when) for what, val, when in grid_rows(snap)}
    assert rows["grid limit (dso)"][0] == "expired"
    assert "ago" in rows["grid limit (dso)"][1]
    assert rows["SMGW link"][0].startswith("down: tls: TLS alert 'unknown ca'") and "FAILSAFE" in rows["SMGW link"][0]
    assert rows["failsafe (controller)"][0] == ("4200 W active, applied 13020 W (§14a floor) - SMGW link down")
    assert "(in 120 min)" in rows["failsafe (controller)"][1] or "(in 119 min)" in rows["failsafe (controller)"][1]
    assert "tariff" not in rows


def test_status_once_without_a_broker_says_so(broker: BrokerHandle) -> None:
    from chargegate.broker import free_port

    port = free_port()
    r = _status_once(broker, "--timeout", "1", env={"CHARGEGATE_BROKER_PORT": str(port)})
    assert r.returncode == 1 and r.stdout == "", r
    assert f"nothing from the broker at 127.0.0.1:{port} within 1 s" in r.stderr
