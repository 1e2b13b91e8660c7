"""`chargegate simulate` speed: a simulated day of a site with 10 EVSEs at 1 s steps (target < 10 s).

Runs the simulator core (load_controller.simulate, the service's own controller step against the plant
model) on ``site-10.yaml`` with ``cars-10.yaml``, the synthetic household load and a §14a curtailment
evening (``../../examples/simulate/limits.yaml``), twice: with fast-forward (the default of the command;
steps in which nothing can change are copied, proven equal to the step-by-step run by
tests/simulate/test_sim_replay.py) and ``--exact`` (every one of the 86,400 steps computed). It checks
that both give the same summary and prints

    RESULT {"evses": 10, "steps": 86400, "fast_s": ..., "exact_s": ..., "computed_fast": ..., ...}

``--smoke``: two simulated hours (a few seconds in all). Exit code 1 when the two runs disagree or the
simulation found a safety violation; never because of a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date, datetime
from datetime import time as dtime
from pathlib import Path
from zoneinfo import ZoneInfo

HERE = Path(__file__).resolve().parent
LIMITS = HERE.parents[1] / "examples" / "simulate" / "limits.yaml"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="two simulated hours")
    ap.add_argument("--days", type=float, default=1.0)
    args = ap.parse_args()

    from chargegate import config as cfgmod
    from load_controller.simulate import scenario as sc
    from load_controller.simulate.engine import simulate
    from load_controller.simulate.summary import summarize

    days = 2 / 24 if args.smoke else args.days
    path = HERE / "site-10.yaml"
    cfg = cfgmod.resolve_paths(cfgmod.loads(path.read_text(), str(path)), str(path))
    tz = ZoneInfo(cfg.site.timezone)
    first = date(2026, 1, 5)
    # the smoke run covers the evening's curtailment start (18:00), the full one a day from noon
    start = datetime.combine(first, dtime(17, 0) if args.smoke else dtime(12, 0), tzinfo=tz)
    prof = sc.parse_profile("household")
    house = sc.synthetic_rows(prof, first, int(-(-days // 1)) + 1, tz, cfg.controller.voltage_v)
    scen = sc.Scenario(house=house, cars=sc.parse_cars((HERE / "cars-10.yaml").read_text(), "cars-10.yaml"),
                       limits=sc.parse_limits(LIMITS.read_text(), str(LIMITS)), label="synthetic household")
    out: dict[str, object] = {"evses": len(cfg.evses)}
    summaries = {}
    for mode, fast in (("fast", True), ("exact", False)):
        t0 = time.perf_counter()
        res = simulate(cfg, scen, start, days=days, fast=fast)
        wall = time.perf_counter() - t0
        s = summarize(res, mode).as_dict()
        s.pop("label", None)
        s.pop("step_calls", None)
        summaries[mode] = s
        out["steps"] = res.n_steps
        out[f"{mode}_s"] = round(wall, 3)
        out[f"computed_{mode}"] = res.step_calls
        out[f"{mode}_us_per_step"] = round(wall / res.n_steps * 1e6, 2)
        print(f"{mode:5}: {res.n_steps} steps of {res.dt:g} s, {res.step_calls} computed, {wall:.2f} s",
              file=sys.stderr)
    s = summaries["fast"]
    violations = sum(s["violations"].values()) if isinstance(s.get("violations"), dict) else 0
    out["violations"] = violations
    out["same_summary"] = summaries["fast"] == summaries["exact"]
    out["delivered_kwh"] = round(sum(c["delivered_kwh"] for c in s["cars"]), 2)  # type: ignore[union-attr]
    out["load"] = float(os.getloadavg()[0])
    print("RESULT " + json.dumps(out))
    if not out["same_summary"]:
        print("fast-forward and exact runs differ:", json.dumps(summaries, default=str)[:2000], file=sys.stderr)
        return 1
    if violations:
        print(f"safety violations in {violations} steps", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
