"""The optimised control step decides exactly as the kept-simple one did (issue 19).

data/step_vectors.json.gz holds 600 random installations with random event sequences, 120 restarts with
setpoints in force and the installation of bench/allocate/run.py, each with the kept-simple step's
fingerprint of every cycle's decision and next memory (recorded while both steps ran side by side and agreed;
step_vectors.py says how and where the recorder is). Here today's step replays them: the plant follows its
decisions, and every cycle's fingerprint must be the recorded one. A changed admission order, detail text,
float rounding or memory field fails the cycle where it first shows, with the currents then and now.
"""

from __future__ import annotations

import gzip
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from step_vectors import TZ, Plant, currents, event, fingerprint, restart_plant, start_plant

from chargegate import payloads as p
from load_controller import controller
from load_controller.topology import Topology

HERE = Path(__file__).parent
with gzip.open(HERE / "data" / "step_vectors.json.gz", "rt", encoding="utf-8") as _f:
    VECTORS: dict[str, Any] = json.load(_f)


class Check:
    """Compares each cycle with the recorded one."""

    def __init__(self, recorded: list[list[str]], what: str) -> None:
        self.recorded = recorded
        self.what = what
        self.seen = 0

    def __call__(self, plant: Any, decision: Any, memory: Any) -> None:
        self.cycle(plant.cycles, decision, memory)

    def cycle(self, n: int, decision: Any, memory: Any) -> None:
        assert n < len(self.recorded), f"{self.what}: more cycles than recorded ({len(self.recorded)})"
        want_fp, want_currents = self.recorded[n]
        got = fingerprint(decision, memory)
        assert got == want_fp, (f"{self.what}, cycle {n}: the decision or the next memory differs from the "
                                f"kept-simple step's\n  recorded: {want_currents}\n  now:      {currents(decision)}")
        self.seen += 1

    def done(self) -> None:
        assert self.seen == len(self.recorded), f"{self.what}: {self.seen} cycles run, {len(self.recorded)} recorded"


def replay(x: dict[str, Any], what: str, prepare: Callable[[Plant], None]) -> None:
    """One recorded example: its plant prepared, the first cycle, then a cycle after every event."""
    check = Check(x["cycles"], what)
    plant = Plant(x["site"], check)
    prepare(plant)
    plant.cycle()
    for raw in x["events"]:
        plant.apply(event(raw))
        plant.cycle()
    check.done()


def chunks(kind: str, size: int) -> list[range]:
    n = len(VECTORS[kind])
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def test_the_recording_covers_what_it_claims() -> None:
    assert len(VECTORS["random"]) == 600 and len(VECTORS["restart"]) == 120 and len(VECTORS["bench"]) == 40
    kinds = {ev[0] for x in VECTORS["random"] for ev in x["events"]}
    assert kinds >= {"plug", "unplug", "run", "limit", "evse_limit", "mode", "tariff", "offline", "ocpp", "gateway",
                     "silence", "meter_offline", "wait", "phases", "stubborn", "house"}
    assert sum(len(x["cycles"]) for x in VECTORS["random"]) > 5000


@pytest.mark.parametrize("which", chunks("random", 100), ids=lambda r: f"{r.start}-{r.stop - 1}")
def test_random_installations_decide_as_recorded(which: range) -> None:
    for i in which:
        x = VECTORS["random"][i]
        replay(x, f"random example {i}", lambda plant, x=x: start_plant(plant, x["setup"], x["house"]))


def test_restarts_with_setpoints_in_force_decide_as_recorded() -> None:
    for i, x in enumerate(VECTORS["restart"]):
        replay(x, f"restart example {i}", lambda plant, x=x: restart_plant(plant, x["setpoints"]))


def test_bench_installation_decides_as_recorded() -> None:
    """bench/allocate/run.py's installation (100 EVSEs in a 3-level tree), its plant moving every cycle. If this
    fails after a change to that script's installation rather than to the step, the recording no longer fits it."""
    sys.path.insert(0, str(HERE.parents[1] / "bench" / "allocate"))
    try:
        import run as bench  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    cfg, inputs, rnd = bench.build(1, seed=3)
    topo = Topology(cfg)
    now = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
    inputs.grid_limits["dso"] = p.GridLimit(source="dso", active=True, power_w=60_000, scope="controllable",
                                            valid_until=now + timedelta(days=1), ts=now)
    plugged = {e.id: ("offline" if rnd.random() < 0.05 else ("C" if rnd.random() < 0.8 else "A")) for e in topo.evses}
    memory = controller.Memory()
    last: dict[str, tuple[float, int]] = {}
    check = Check(VECTORS["bench"], "bench installation")
    for c in range(len(VECTORS["bench"])):
        bench.refresh(cfg, topo, inputs, last, rnd, now, plugged)
        decision, memory = controller.step(topo, cfg.controller, TZ, inputs, memory, now)
        check.cycle(c, decision, memory)
        last = {d.evse_id: (d.current, d.phases) for d in decision.evses}
        now += timedelta(seconds=1)
    check.done()
