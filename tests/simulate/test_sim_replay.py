"""The simulator as a test harness and as a command: the project's load scenarios and a synthetic week
through it, fast-forward against step by step, `chargegate simulate` on the example configuration, and
no service I/O in the simulator's process."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sim_helpers import DAY, TZ, per_step, run

from chargegate import config as cfgmod
from load_controller.simulate import scenario as sc
from load_controller.simulate.engine import simulate
from load_controller.simulate.summary import summarize

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "simulate"
SCENARIOS = sorted((REPO / "tests" / "load_controller" / "scenarios").glob("*.json"))
CLI = [sys.executable, "-m", "chargegate.cli"]


def example(name: str) -> cfgmod.Config:
    path = EXAMPLES / name
    return cfgmod.resolve_paths(cfgmod.loads(path.read_text(), str(path)), str(path))


def scenario_config(data: dict) -> cfgmod.Config:
    """A load scenario's installation (EVSEs and meters get device stubs, as the scenario harness does)."""
    data = json.loads(json.dumps(data))
    for i, e in enumerate(data.get("evses", [])):
        if "modbus" not in e and "ocpp" not in e:
            e["modbus"] = {"profile": "alfen-eve", "host": "127.0.0.1", "port": 1502 + i}
    for m in data.get("meters", []):
        m.setdefault("modbus", {"profile": "sdm630", "host": "127.0.0.1", "port": 1600})
    return cfgmod.validate_data(data, "scenario")


def test_there_are_load_scenarios_to_replay() -> None:
    assert len(SCENARIOS) >= 20


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_each_load_scenario_site_over_a_day_keeps_every_fuse(path: Path) -> None:
    """Every installation of the load scenarios, with the scenario's own house load on top of a synthetic
    household and one car per EVSE, for a day: the controller's decision holds every fuse and power limit in
    every step (the engine checks each step), and cars that fit get energy."""
    data = json.loads(path.read_text())
    cfg = scenario_config(data["config"])
    # a house load the controller can see: at metered nodes only (below an unmetered node the simulator
    # rightly reports the fuse it cannot protect, see test_sim_numbers)
    metered = {c.id for c in cfg.all_circuits() if c.meter}
    root = cfg.circuits[0].id
    house: list[sc.HouseRow] = [(DAY - timedelta(hours=1), None, (0.0, 0.0, 0.0))]
    if root in metered:
        house = sc.synthetic_rows(sc.parse_profile("household"), DAY.date(), 2, TZ, cfg.controller.voltage_v)
    for node, amps in (data.get("plant", {}).get("house_a") or {}).items():
        if node in metered:
            house.append((DAY - timedelta(hours=1), node, (float(amps[0]), float(amps[1]), float(amps[2]))))
    res = run(cfg, house, sc.default_cars(cfg.evses, need_kwh=10.0), start=DAY.replace(hour=12))
    s = summarize(res, path.stem)
    assert sum(s.violations.values()) == 0, s.violation_examples
    assert all(c.delivered_kwh <= c.wanted_kwh + 1e-6 for c in s.cars)
    if not any(getattr(r, "type", "") == "solar" for r in cfg.controller.rules):  # no sun on this house
        assert s.delivered_kwh > 0, f"{path.stem}: no car got any energy in a day"


def test_a_synthetic_week_with_curtailment_evenings() -> None:
    """examples/simulate: two wallboxes, a §14a limit 18:00-20:00 on weekdays, 7 days from Monday noon.
    By hand: five curtailment evenings of 120 min = 600 min curtailed, all of it at the §14a floor (4.2 kW
    is below the floor of two controllable EVSEs); the family car (30 kWh on 5 weekday evenings) and the
    small car (18 kWh every evening of 7) get all they want: 150 + 126 kWh; no step breaks a fuse."""
    cfg = example("site.yaml")
    cars = sc.parse_cars((EXAMPLES / "cars.yaml").read_text(), "cars.yaml")
    lim = sc.parse_limits((EXAMPLES / "limits.yaml").read_text(), "limits.yaml")
    house = sc.synthetic_rows(sc.parse_profile("household"), DAY.date(), 8, TZ, cfg.controller.voltage_v)
    res = simulate(cfg, sc.Scenario(house=house, cars=cars, limits=lim), DAY.replace(hour=12), days=7)
    s = summarize(res, "week")
    assert sum(s.violations.values()) == 0, s.violation_examples
    assert s.curtailed_min == pytest.approx(600, abs=1) and s.floor_min == pytest.approx(600, abs=1)
    assert s.curtailed_by == {"dso": pytest.approx(600, abs=1)}
    by_car = {c.car: c for c in s.cars}
    assert by_car["family-car"].stays == 5 and by_car["family-car"].delivered_kwh == pytest.approx(150, abs=0.1)
    assert by_car["small-car"].stays == 7 and by_car["small-car"].delivered_kwh == pytest.approx(126, abs=0.1)
    assert s.cars_without_evse == ["visitor"]
    # the energy is split by the tariff periods of the limits file and priced from the site's history.prices
    assert {t.level for t in s.tariffs if t.kwh > 0} <= {"low", "normal", "high"}
    assert s.cost == pytest.approx(sum(t.kwh * (t.price_ct_per_kwh or 0) / 100 for t in s.tariffs), abs=0.05)


def test_fast_forward_gives_the_same_steps_as_computing_every_one() -> None:
    """Six hours over the curtailment evening (limit start and end, cars arriving, the house load changing
    every minute): the fast-forward run copies steps; every step's grants, phases, reasons and draws equal
    those of the run that computes each step."""
    cfg = example("site-3wb.yaml")
    cars = sc.parse_cars((EXAMPLES / "cars.yaml").read_text(), "cars.yaml")
    lim = sc.parse_limits((EXAMPLES / "limits.yaml").read_text(), "limits.yaml")
    house = sc.synthetic_rows(sc.parse_profile("household"), DAY.date(), 2, TZ, cfg.controller.voltage_v)
    scen = sc.Scenario(house=house, cars=cars, limits=lim)
    start = datetime(2026, 1, 5, 16, 30, tzinfo=TZ)
    fast = simulate(cfg, scen, start, days=0.25, fast=True)
    exact = simulate(cfg, scen, start, days=0.25, fast=False)
    assert fast.step_calls < exact.step_calls == exact.n_steps == 6 * 3600
    assert per_step(fast) == per_step(exact)
    a, b = summarize(fast).as_dict(), summarize(exact).as_dict()
    a.pop("step_calls"), b.pop("step_calls")
    assert a == b


def test_the_command_on_the_example_configuration_out_of_the_box(tmp_path: Path) -> None:
    """`chargegate simulate --config config.example.yaml` with a synthetic day: exit 0 (its secrets are not
    needed to simulate), a summary, PNG and SVG plots; a comparison with a bigger fuse has both columns."""
    out = tmp_path / "one"
    r = subprocess.run([*CLI, "simulate", "--config", str(REPO / "config.example.yaml"), "--out", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "energy wanted / delivered" in r.stdout and "safety violations" in r.stdout
    for f in ("summary.txt", "summary.md", "summary.json", "nodes.png", "nodes.svg", "cars.png", "cars.svg"):
        assert (out / f).stat().st_size > 0, f
    assert (out / "nodes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (out / "nodes.svg").read_bytes()[:2000]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 86400 and sum(summary["violations"].values()) == 0
    assert summary["unmet_kwh"] == 0, summary["cars"]

    cmp = tmp_path / "cmp"
    r = subprocess.run([*CLI, "simulate", "--config", str(REPO / "config.example.yaml"), "--out", str(cmp),
                        "--set", "circuits.0.fuse_a=50", "--labels", "35 A,50 A", "--no-plots",
                        "--format", "markdown"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    header = r.stdout.splitlines()[0]
    assert "35 A" in header and "50 A" in header
    assert "of 35 A" in r.stdout and "of 50 A" in r.stdout
    assert (cmp / "compare.md").read_text() == r.stdout


def test_a_bad_input_file_is_named_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "cars.yaml"
    bad.write_text("cars:\n  - id: c\n    evse: wb-left\n    arrive: '25:00'\n    depart: '07:00'\n")
    r = subprocess.run([*CLI, "simulate", "--config", str(EXAMPLES / "site.yaml"), "--cars", str(bad),
                        "--out", str(tmp_path / "o"), "--no-plots"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cars.yaml" in r.stderr and "arrive" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_the_simulator_imports_no_service_io() -> None:
    """The simulator runs the controller core only: no broker client, no Modbus, no web framework, not the
    load-controller's service module."""
    code = (
        "import sys\n"
        "from load_controller.simulate import command, engine, plant, scenario, summary\n"
        "from load_controller.simulate import plots\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('aiomqtt', 'paho', 'pymodbus', 'fastapi',"
        " 'uvicorn', 'websockets', 'starlette') or m in ('load_controller.service', 'chargegate.bus',"
        " 'chargegate.runtime'))\n"
        "print(bad)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
