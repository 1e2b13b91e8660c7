"""Building blocks for the simulator tests: sites, cars and limits as data, runs, per-step expansion."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from chargegate import config as cfgmod
from load_controller.simulate import scenario as sc
from load_controller.simulate.engine import Result, simulate

TZ = ZoneInfo("Europe/Berlin")
DAY = datetime(2026, 1, 5, tzinfo=TZ)  # a Monday


def site(circuits: list[dict[str, Any]], evses: list[dict[str, Any]], meters: list[str] | None = None,
         controller: dict[str, Any] | None = None, **extra: Any) -> cfgmod.Config:
    """A site configuration (EVSEs get a Modbus stub, meters an SDM630 stub: never contacted)."""
    evs = [{**e, "modbus": {"profile": "alfen-eve", "host": "127.0.0.1", "port": 1502 + i}}
           for i, e in enumerate(evses)]
    data: dict[str, Any] = {"site": {"name": "test", "timezone": "Europe/Berlin"}, "circuits": circuits,
                            "evses": evs,
                            "meters": [{"id": m, "modbus": {"profile": "sdm630", "host": "127.0.0.1"}}
                                       for m in (meters if meters is not None else ["grid-meter"])],
                            "controller": controller or {}, **extra}
    return cfgmod.validate_data(data, "test")


def cars(*specs: dict[str, Any]) -> sc.CarsFile:
    return sc.CarsFile.model_validate({"cars": list(specs)})


def limits(**data: Any) -> sc.LimitsFile:
    return sc.LimitsFile.model_validate(data)


def flat(l1: float, l2: float = 0.0, l3: float = 0.0, node: str | None = None) -> list[sc.HouseRow]:
    return [(DAY.replace(hour=0), node, (l1, l2, l3))]


def run(cfg: cfgmod.Config, house: list[sc.HouseRow], cars_: sc.CarsFile, limits_: sc.LimitsFile | None = None,
        start: datetime = DAY, days: float = 1.0, fast: bool = True) -> Result:
    scen = sc.Scenario(house=house, cars=cars_, limits=limits_ or sc.LimitsFile(), label="test")
    return simulate(cfg, scen, start, days=days, fast=fast)


def per_step(res: Result) -> list[tuple[Any, ...]]:
    """Every step's decision (grant, phases, bound_by per EVSE) and what the cars drew."""
    rec = res.records
    out: list[tuple[Any, ...]] = []
    for i, d in enumerate(rec.durations(res.n_steps)):
        out.extend([(rec.grant[i], rec.nph[i], rec.bound[i], rec.draw[i], rec.used[i])] * d)
    return out
