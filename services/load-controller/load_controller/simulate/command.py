"""``chargegate simulate``: the files in, the simulation, the tables and plots out (the I/O edge).

Exit code 0; 1 for a bad input (every error named); 3 when the simulation found a safety violation.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from datetime import date, datetime
from datetime import time as dtime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

DEFAULT_START = date(2026, 1, 5)  # a Monday: runs are reproducible (weekday rules, limits with days)
DEFAULT_HOUR = dtime(12, 0)  # a day runs from noon to noon: the evening and the night the cars are at home


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", "-c", default=os.environ.get("CHARGEGATE_CONFIG", "chargegate.yaml"), metavar="FILE",
                    help="the site configuration (the services' own format; default: %(default)s)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--load", metavar="CSV", help="house load per node and phase (chargegate history house-load)")
    src.add_argument("--profile", metavar="SPEC", default=None,
                     help="synthetic house load: household[:kwh=4500,pv=0,heatpump=0,seed=1] (default) or "
                          "flat:a=8 / flat:l1=10,l2=4,l3=2")
    ap.add_argument("--cars", metavar="YAML", help="cars: arrival, departure, need, charger (default: one per EVSE)")
    ap.add_argument("--limits", metavar="YAML", help="operator limits and tariff periods")
    ap.add_argument("--days", type=float, default=1.0, help="simulated days (default 1)")
    ap.add_argument("--start", metavar="YYYY-MM-DD[THH:MM]", default=None,
                    help=f"start, local time (default: 12:00 of the house load's first day, else of {DEFAULT_START}; "
                         f"a day from noon to noon holds the evening and the night)")
    ap.add_argument("--out", metavar="DIR", default="simulation", help="where the tables and plots go")
    ap.add_argument("--compare", metavar="YAML", help="a second site configuration, side by side")
    ap.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                    help="compare with the configuration changed at KEY (e.g. circuits.0.fuse_a=50, "
                         "controller.rules=[]); repeatable")
    ap.add_argument("--labels", metavar="A,B", default=None, help="column names of a comparison")
    ap.add_argument("--exact", action="store_true", help="compute every step (no fast-forward; slower, same result)")
    ap.add_argument("--no-plots", action="store_true", help="tables only")
    ap.add_argument("--format", choices=("text", "markdown", "json"), default="text", help="what goes to stdout")


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except OSError as e:
        raise SystemExit(f"{path}: cannot read: {e.strerror}") from None


def apply_override(data: dict[str, Any], spec: str) -> None:
    """``a.b.0.c=VALUE`` (VALUE in YAML; ``null`` on a list item removes it) on a configuration document."""
    import yaml

    key, eq, raw = spec.partition("=")
    if not eq or not key:
        raise ValueError(f"--set {spec!r}: expected KEY=VALUE")
    value = yaml.safe_load(raw)
    parts = key.split(".")
    node: Any = data
    for n, part in enumerate(parts):
        last = n == len(parts) - 1
        where = ".".join(parts[:n + 1])
        if isinstance(node, list):
            try:
                idx = int(part)
                node[idx]
            except (ValueError, IndexError):
                raise ValueError(f"--set {key}: {where} is not an item of a list of {len(node)}") from None
            if last:
                if value is None:
                    del node[idx]
                else:
                    node[idx] = value
                return
            node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
                return
            if part not in node:
                node[part] = {}
            node = node[part]
        else:
            raise ValueError(f"--set {key}: {'.'.join(parts[:n])} is not a mapping or list")


def _load_config(path: str, overrides: list[str]) -> Any:
    import yaml

    from chargegate import config as cfgmod

    text = _read(path)
    if not overrides:
        return cfgmod.resolve_paths(cfgmod.loads(text, path), path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return cfgmod.loads(text, path)  # names the YAML error
    data = copy.deepcopy(data)
    for o in overrides:
        apply_override(data, o)
    return cfgmod.resolve_paths(cfgmod.validate_data(data, f"{path} with {' '.join(overrides)}"), path)


def run(args: argparse.Namespace) -> int:
    from chargegate.config import ConfigError
    from load_controller.simulate import scenario as sc
    from load_controller.simulate.engine import simulate
    from load_controller.simulate.summary import summarize, table

    try:
        cfg_a = _load_config(args.config, [])
        runs: list[tuple[str, Any]] = [("", cfg_a)]
        if args.compare or args.overrides:
            cfg_b = _load_config(args.compare or args.config, args.overrides)
            runs.append(("", cfg_b))
        labels = (args.labels.split(",") if args.labels else
                  [Path(args.config).stem,
                   Path(args.compare).stem if args.compare else "with " + " ".join(args.overrides)])
        if len(runs) == 2 and labels[0] == labels[1]:
            labels = [labels[0] + " (A)", labels[1] + " (B)"]
        tz = ZoneInfo(cfg_a.site.timezone)
        if not (0 < args.days <= 366):
            raise SystemExit("--days: between 0 and 366")
        if args.load:
            house = sc.parse_house_csv(_read(args.load), tz, args.load)
            house_label = f"{args.load} ({len(house)} rows)"
            first = min(r[0] for r in house).astimezone(tz).date()
        else:
            prof = sc.parse_profile(args.profile or "household")
            house_label = f"synthetic {prof.describe()}"
            first = DEFAULT_START
        at = DEFAULT_HOUR
        if args.start:
            try:
                when = datetime.fromisoformat(args.start)
            except ValueError:
                raise SystemExit(f"--start: {args.start!r} is not YYYY-MM-DD or YYYY-MM-DDTHH:MM") from None
            first = when.date()
            at = when.time() if "T" in args.start or " " in args.start else DEFAULT_HOUR
        start = datetime.combine(first, at, tzinfo=tz)
        if not args.load:
            days = int(-(-args.days // 1)) + 1
            house = sc.synthetic_rows(prof, first, days, tz, cfg_a.controller.voltage_v)
        cars_text = _read(args.cars) if args.cars else None
        limits = sc.parse_limits(_read(args.limits), args.limits) if args.limits else sc.LimitsFile()
        results = []
        for i, (_, cfg) in enumerate(runs):
            cars = sc.parse_cars(cars_text, args.cars) if cars_text is not None else sc.default_cars(cfg.evses)
            scen = sc.Scenario(house=house, cars=cars, limits=limits, label=house_label)
            t0 = time.perf_counter()
            res = simulate(cfg, scen, start, days=args.days, fast=not args.exact)
            wall = time.perf_counter() - t0
            label = labels[i] if len(runs) == 2 else Path(args.config).stem
            results.append((label, res, wall))
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    summaries = [summarize(res, label) for label, res, _ in results]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for (label, res, wall), s in zip(results, summaries, strict=True):
        d = out / _slug(label) if len(results) == 2 else out
        d.mkdir(parents=True, exist_ok=True)
        (d / "summary.txt").write_text(table([s]) + "\n")
        (d / "summary.md").write_text(table([s], "markdown") + "\n")
        (d / "summary.json").write_text(json.dumps({**s.as_dict(), "wall_s": round(wall, 3)}, indent=1,
                                                   ensure_ascii=False) + "\n")
        written += [d / "summary.txt", d / "summary.md", d / "summary.json"]
        if not args.no_plots:
            from load_controller.simulate.plots import plot_cars, plot_nodes

            written += plot_nodes(res, d / "nodes", f"{s.site} ({label}): current per phase and node")
            written += plot_cars(res, d / "cars", f"{s.site} ({label}): cars")
    if len(results) == 2:
        (out / "compare.txt").write_text(table(summaries) + "\n")
        (out / "compare.md").write_text(table(summaries, "markdown") + "\n")
        written += [out / "compare.txt", out / "compare.md"]
    if args.format == "json":
        print(json.dumps([s.as_dict() for s in summaries], indent=1, ensure_ascii=False))
    else:
        print(table(summaries, args.format))
        for label, res, wall in results:
            print(f"\n{label}: {res.n_steps} steps of {res.dt:g} s, {res.step_calls} computed, {wall:.2f} s",
                  file=sys.stderr)
        print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    viol = sum(sum(s.violations.values()) for s in summaries)
    if viol:
        print(f"safety violations: {viol} steps (see summary.json)", file=sys.stderr)
        return 3
    return 0


def _slug(label: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_." else "-" for c in label).strip("-")
    return out[:64] or "run"
