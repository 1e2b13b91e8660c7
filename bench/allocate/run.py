"""bench/allocate: the time of one allocation for 1000 EVSEs in a 3-level circuit tree.

The site: a grid connection (1000 A per phase, metered) > 10 distribution boards (160 A, metered)
> 10 sub-boards each (63 A) > 10 EVSEs each = 1000 EVSEs (70 % 3-phase 32 A, 20 % 1-phase on
rotated phases, 10 % 3-phase with 1/3-phase switching; priorities 0/1), about 80 % with a car
plugged in, a few offline, house load on every board, a DSO limit and a tariff rule. Every cycle
the meters and statuses change a little (the cars follow their setpoints), as in operation.

Reported: median and p99 of
* ``solve``  - the pure solver on the problem of one cycle (admission, fair water-filling, imbalance);
* ``step``   - one whole control step: inputs -> problem -> solve -> decisions and next memory.
Target (issue 19): whole step median under 10 ms.

    .venv/bin/python bench/allocate/run.py [--cycles 200] [--evses-per-board 10]
    .venv/bin/python bench/allocate/run.py --smoke     # 100 EVSEs, 10 cycles (the test suite runs it)

The last line is ``RESULT {json}`` with the figures (every benchmark ends so; tests/system/test_bench_smoke.py
reads it).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from chargegate import config as cfgmod
from chargegate import payloads as p
from load_controller import solver as solver_mod
from load_controller.controller import Inputs, Memory, step
from load_controller.topology import Topology


def build(per_board: int, seed: int) -> tuple[cfgmod.Config, Inputs, random.Random]:
    rnd = random.Random(seed)
    dists = []
    evses = []
    meters = [{"id": "grid-meter", "modbus": {"profile": "sdm630", "host": "127.0.0.1"}}]
    for a in range(10):
        boards = []
        for b in range(10):
            boards.append({"id": f"sub{a}.{b}", "fuse_a": 63})
            for c in range(per_board):
                kind = rnd.random()
                e: dict = {"id": f"e{a}.{b}.{c}", "circuit": f"sub{a}.{b}", "max_current_a": 32,  # type: ignore[type-arg]
                           "priority": 1 if rnd.random() < 0.1 else 0,
                           "modbus": {"profile": "sim", "host": "127.0.0.1"}}
                if kind < 0.2:
                    e.update(phases=1, phase_rotation=[rnd.choice([1, 2, 3])], max_current_a=16)
                elif kind < 0.3:
                    e.update(phase_switching=True, phase_rotation=rnd.choice([[1, 2, 3], [2, 3, 1], [3, 1, 2]]))
                evses.append(e)
        meters.append({"id": f"m{a}", "modbus": {"profile": "sdm630", "host": "127.0.0.1"}})
        dists.append({"id": f"dist{a}", "fuse_a": 160, "meter": f"m{a}", "children": boards})
    data = {
        "circuits": [{"id": "grid", "fuse_a": 1000, "meter": "grid-meter", "children": dists}],
        "evses": evses, "meters": meters,
        "controller": {"rules": [{"id": "cheap", "type": "tariff", "evses": [e["id"] for e in evses[:50]],
                                  "charge_in": ["low"], "max_power_w_otherwise": 50000}]},
    }
    cfg = cfgmod.validate_data(data, "bench")
    inputs = Inputs()
    return cfg, inputs, rnd


def refresh(cfg: cfgmod.Config, topo: Topology, inputs: Inputs, last: dict[str, tuple[float, int]],
            rnd: random.Random, now: datetime, plugged: dict[str, str]) -> None:
    """The plant: cars follow their setpoints; a few plug in or out; house load wanders."""
    for e in topo.evses:
        state = plugged[e.id]
        if rnd.random() < 0.002:
            state = "A" if state == "C" else "C"
            plugged[e.id] = state
        if state == "offline":
            inputs.statuses[e.id] = p.EvseStatus(evse_id=e.id, online=False, state="offline", ts=now)
            continue
        cur, nph = last.get(e.id, (0.0, 3))
        drawn = [0.0, 0.0, 0.0]
        if state == "C":
            for k in range(1 if (e.phases == 1 or nph == 1) else 3):
                drawn[k] = max(0.0, cur - rnd.random() * 0.5)
        inputs.statuses[e.id] = p.EvseStatus.model_construct(
            evse_id=e.id, online=True, state=p.EvseState.CHARGING if state == "C" else p.EvseState.AVAILABLE,
            iec_state=p.IecState.C if state == "C" else p.IecState.A, current_a=drawn, ts=now, plausible=True,
            applied=None, session=None, power_w=None, energy_wh=None, phases_in_use=0, flags=[], v=1)
    per_grid = [0.0, 0.0, 0.0]
    for a in range(10):
        house = [rnd.uniform(5, 40) for _ in range(3)]
        ev = [0.0, 0.0, 0.0]
        for i in topo.below[topo.node_index[f"dist{a}"]]:
            e = topo.evses[i]
            st = inputs.statuses[e.id]
            for k in range(e.phases):
                ev[e.rotation[k]] += st.current_a[k]
        cur = [min(1000.0, house[k] + ev[k]) for k in range(3)]
        per_grid = [per_grid[k] + cur[k] for k in range(3)]
        inputs.readings[f"m{a}"] = p.MeterReading(meter_id=f"m{a}", current_a=cur, ts=now)
    inputs.readings["grid-meter"] = p.MeterReading(meter_id="grid-meter",
                                                   current_a=[min(1000.0, per_grid[k] + 30) for k in range(3)], ts=now)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--evses-per-board", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-gc-tuning", action="store_true", help="measure without the service's GC tuning")
    ap.add_argument("--smoke", action="store_true", help="tiny run for the test suite: 100 EVSEs, 10 cycles")
    args = ap.parse_args()
    if args.smoke:
        args.cycles, args.evses_per_board = 10, 1
    cfg, inputs, rnd = build(args.evses_per_board, args.seed)
    topo = Topology(cfg)
    tz = ZoneInfo(cfg.site.timezone)
    now = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
    inputs.grid_limits["dso"] = p.GridLimit(source="dso", active=True, power_w=900_000, scope="controllable",
                                            valid_until=now + timedelta(days=1), ts=now)
    inputs.tariff_current = p.TariffCurrent(period=p.TariffPeriod(id="t", level="high", start=now - timedelta(hours=1)),
                                            ts=now)
    plugged = {e.id: ("offline" if rnd.random() < 0.01 else ("C" if rnd.random() < 0.8 else "A")) for e in topo.evses}
    memory = Memory()
    last: dict[str, tuple[float, int]] = {}
    step_ms: list[float] = []
    solve_ms: list[float] = []
    orig_solve = solver_mod.solve
    timing: list[float] = []

    def timed_solve(problem: solver_mod.Problem) -> solver_mod.Solution:
        t = time.perf_counter()
        sol = orig_solve(problem)
        timing.append((time.perf_counter() - t) * 1000)
        return sol

    import load_controller.controller as ctl_mod

    ctl_mod.solve = timed_solve  # type: ignore[assignment]
    if not args.no_gc_tuning:
        from load_controller.service import tune_gc

        tune_gc()  # as the service does after start-up
    warm = 2 if args.smoke else 20
    charging = 0
    for c in range(args.cycles + warm):
        refresh(cfg, topo, inputs, last, rnd, now, plugged)
        t = time.perf_counter()
        decision, memory = step(topo, cfg.controller, tz, inputs, memory, now)
        dt = (time.perf_counter() - t) * 1000
        last = {d.evse_id: (d.current, d.phases) for d in decision.evses}
        if c >= warm:
            step_ms.append(dt)
            solve_ms.append(timing[-1])
            charging = sum(1 for d in decision.evses if d.current > 0)
        now += timedelta(seconds=1)
    ctl_mod.solve = orig_solve  # type: ignore[assignment]

    def q(xs: list[float], frac: float) -> float:
        s = sorted(xs)
        return s[min(len(s) - 1, round(frac * (len(s) - 1)))]

    n = len(topo.evses)
    print(f"bench/allocate: {n} EVSEs, {len(topo.nodes)} circuit nodes (3 levels below the grid connection), "
          f"{charging} charging in the last cycle, {args.cycles} cycles")
    print(f"  solve  median {statistics.median(solve_ms):7.2f} ms   p99 {q(solve_ms, 0.99):7.2f} ms")
    print(f"  step   median {statistics.median(step_ms):7.2f} ms   p99 {q(step_ms, 0.99):7.2f} ms")
    target = statistics.median(step_ms) < 10
    print(f"  target: median under 10 ms -> {'met' if target else 'NOT met'} (whole step)")
    print("RESULT " + json.dumps({"evses": n, "cycles": len(step_ms), "charging": charging,
                                  "solve_median_ms": round(statistics.median(solve_ms), 3),
                                  "solve_p99_ms": round(q(solve_ms, 0.99), 3),
                                  "step_median_ms": round(statistics.median(step_ms), 3),
                                  "step_p99_ms": round(q(step_ms, 0.99), 3), "target_met": target}), flush=True)


if __name__ == "__main__":
    main()
