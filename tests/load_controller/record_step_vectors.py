"""Record data/step_vectors.json.gz from the kept-simple control step (lc_reference/), once (issue 19).

Every example drawn from the strategies of step_vectors.py runs through the kept-simple step and today's
optimised one side by side; both must agree in every cycle (decision and next memory, by ``canonical``), and
the kept-simple step's fingerprint per cycle is recorded with the example. After the recording the
kept-simple copy and this script were removed from the tree (see step_vectors.py); the replay is
test_lc_step_equivalence.py.

    PYTHONPATH=tests/load_controller .venv/bin/python tests/load_controller/record_step_vectors.py
"""

from __future__ import annotations

import gzip
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from lc_reference import controller as ref
from step_vectors import (
    SETPOINTS,
    SETUP,
    TZ,
    Plant,
    canonical,
    currents,
    events,
    fingerprint,
    restart_plant,
    sites,
    start_plant,
)

from chargegate import payloads as p
from load_controller.topology import Topology

HERE = Path(__file__).parent
OUT = HERE / "data" / "step_vectors.json.gz"
SETTINGS = dict(database=None, derandomize=True, phases=[Phase.generate], deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Twin:
    """Runs the kept-simple step beside the plant's (optimised) one and records its fingerprints."""

    def __init__(self) -> None:
        self.memory = ref.Memory()
        self.cycles: list[list[str]] = []

    def __call__(self, plant: Plant, decision: Any, memory: Any) -> None:
        d_ref, self.memory = ref.step(plant.topo, plant.ctl, TZ, plant.inputs, self.memory, plant.now)
        if canonical(d_ref) != canonical(decision) or canonical(self.memory) != canonical(memory):
            raise AssertionError(f"the two steps differ in cycle {plant.cycles}")
        self.cycles.append([fingerprint(d_ref, self.memory), currents(d_ref)])


def record_random(n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    @settings(max_examples=n, **SETTINGS)  # type: ignore[arg-type]
    @given(sites(), st.lists(SETUP, min_size=8, max_size=8),
           st.lists(st.lists(st.floats(0, 30), min_size=3, max_size=3), min_size=4, max_size=4),
           st.lists(events, min_size=5, max_size=50))
    def run(site: dict[str, Any], setup: list[Any], house: list[Any], seq: list[tuple[Any, ...]]) -> None:
        twin = Twin()
        plant = Plant(site, twin)
        start_plant(plant, setup, house)
        plant.cycle()
        for ev in seq:
            plant.apply(ev)
            plant.cycle()
        out.append({"site": site, "setup": setup, "house": house, "events": seq, "cycles": twin.cycles})

    run()
    return out


def record_restart(n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    @settings(max_examples=n, **SETTINGS)  # type: ignore[arg-type]
    @given(sites(), SETPOINTS, st.lists(events, min_size=3, max_size=20))
    def run(site: dict[str, Any], sps: list[tuple[Any, ...]], seq: list[tuple[Any, ...]]) -> None:
        twin = Twin()
        plant = Plant(site, twin)
        restart_plant(plant, sps)
        plant.cycle()
        for ev in seq:
            plant.apply(ev)
            plant.cycle()
        out.append({"site": site, "setpoints": sps, "events": seq, "cycles": twin.cycles})

    run()
    return out


def record_bench(cycles: int) -> list[list[str]]:
    """The installation of bench/allocate/run.py (100 EVSEs in a 3-level tree, a DSO limit, a tariff rule)."""
    from load_controller import controller as opt

    sys.path.insert(0, str(HERE.parents[1] / "bench" / "allocate"))
    import run as bench  # type: ignore[import-not-found]

    cfg, inputs, rnd = bench.build(1, seed=3)
    topo = Topology(cfg)
    now = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
    inputs.grid_limits["dso"] = p.GridLimit(source="dso", active=True, power_w=60_000, scope="controllable",
                                            valid_until=now + timedelta(days=1), ts=now)
    plugged = {e.id: ("offline" if rnd.random() < 0.05 else ("C" if rnd.random() < 0.8 else "A")) for e in topo.evses}
    mem_opt, mem_ref = opt.Memory(), ref.Memory()
    last: dict[str, tuple[float, int]] = {}
    got: list[list[str]] = []
    for c in range(cycles):
        bench.refresh(cfg, topo, inputs, last, rnd, now, plugged)
        d_opt, mem_opt = opt.step(topo, cfg.controller, TZ, inputs, mem_opt, now)
        d_ref, mem_ref = ref.step(topo, cfg.controller, TZ, inputs, mem_ref, now)  # type: ignore[arg-type]
        if canonical(d_ref) != canonical(d_opt) or canonical(mem_ref) != canonical(mem_opt):
            raise AssertionError(f"the two steps differ in cycle {c} of the bench installation")
        got.append([fingerprint(d_ref, mem_ref), currents(d_ref)])
        last = {d.evse_id: (d.current, d.phases) for d in d_opt.evses}
        now += timedelta(seconds=1)
    return got


def main() -> None:
    data = {"random": record_random(600), "restart": record_restart(120), "bench": record_bench(40)}
    OUT.parent.mkdir(exist_ok=True)
    with gzip.open(OUT, "wt", encoding="utf-8", compresslevel=9) as f:
        json.dump(data, f, separators=(",", ":"))
    n = sum(len(x["cycles"]) for k in ("random", "restart") for x in data[k]) + len(data["bench"])
    print(f"{OUT}: {len(data['random'])} + {len(data['restart'])} examples and the bench installation, {n} cycles, "
          f"{OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
