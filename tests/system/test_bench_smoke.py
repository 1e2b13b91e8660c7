"""Every benchmark under bench/ runs in its smoke mode (tiny sizes, a few seconds) and prints its figures.

A benchmark that crashes, exits non-zero (its smoke mode fails on functional errors only: a wallbox not
online, a limit round not applied, a CALLERROR; never on timing) or stops printing a figure fails here,
so that no benchmark rots between the runs that measure with it. The figures' values are not asserted
(timings are not tested), only that each is there and is a finite number.

Each benchmark prints a line ``RESULT {json}``; the figures each must carry are listed below. A new
script under bench/ must be added to this table (checked by :func:`test_every_benchmark_has_a_smoke_run`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"

# script -> the figures its RESULT line must carry
FIGURES: dict[str, list[str]] = {
    "allocate/run.py": ["evses", "solve_median_ms", "solve_p99_ms", "step_median_ms", "step_p99_ms"],
    "allocate/service_latency.py": ["evses", "changes", "python_p50_ms", "python_p99_ms"],
    "poller/bench_poller.py": ["devices", "online", "cycle_ms_median", "core_pct_per_100_devices",
                               "requests_per_poll"],
    "ocpp/bench_ocpp.py": ["wallboxes", "gateway_n", "direct_n", "gateway_p50_ms", "gateway_p99_ms",
                           "direct_p50_ms", "direct_p99_ms", "added_p50_ms", "added_p99_ms", "rss_wallboxes_mb",
                           "cpu_pct", "cpu_ms_per_message", "leg_hop_p50_ms", "leg_hop_p99_ms"],
    "curtail/run.py": ["evses", "rounds", "p50_ms", "p99_ms", "direct_p50_ms", "ratio_p50", "hops"],
    "curtail/setpoint_cost.py": ["evses", "setpoints", "cpu_us_per_setpoint"],
    "admin/run.py": ["evses", "status_p50_ms", "status_p99_ms", "add_p50_ms", "boot_p50_ms", "remove_p50_ms"],
    "footprint/run.py": ["evse_poller_rss_mb", "load_controller_rss_mb", "ocpp_gateway_rss_mb", "smgw_link_rss_mb",
                         "history_rss_mb", "runtime_rss_mb", "services_total_rss_mb"],
    "simulate/run.py": ["evses", "steps", "fast_s", "exact_s", "computed_fast", "computed_exact", "violations",
                        "same_summary", "delivered_kwh"],
    "system/run.py": ["ready_s", "services_cpu_pct", "services_rss_mb", "limit_rounds_ms", "limit_p50_ms",
                      "limit_p99_ms", "status_p50_ms"],
}

pytestmark = pytest.mark.bench


def entry_points() -> list[str]:
    return sorted(str(p.relative_to(BENCH)) for p in BENCH.rglob("*.py")
                  if 'if __name__ == "__main__":' in p.read_text())


# benchmarks whose smoke run lives with their service's tests (they need a browser)
OWN_SMOKE = {"web/run.py": "tests/web/test_web_bench_smoke.py"}


def test_every_benchmark_has_a_smoke_run() -> None:
    root = BENCH.parent
    for script, test in OWN_SMOKE.items():
        assert (root / test).exists() and f"bench/{script.split('/')[0]}" in (root / test).read_text(), (script, test)
    scripts = [s for s in entry_points() if s not in OWN_SMOKE]
    assert scripts, "no benchmark found under bench/"
    assert sorted(FIGURES) == scripts, "every benchmark script needs a row in FIGURES (and a --smoke mode)"
    for s in scripts:
        assert "--smoke" in (BENCH / s).read_text(), f"{s} has no --smoke mode"


def finite_numbers(value: object) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, int | float):
        return math.isfinite(value)
    if isinstance(value, list):
        return bool(value) and all(finite_numbers(v) for v in value)
    if isinstance(value, dict):
        return bool(value) and all(finite_numbers(v) for v in value.values())
    return False


def result_line(out: str) -> dict[str, object]:
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert lines, "no RESULT line"
    return json.loads(lines[-1][len("RESULT "):])


def test_result_line_checks() -> None:
    """The checks below can fail: a missing line, a NaN figure, an empty list."""
    with pytest.raises(AssertionError):
        result_line("figures: 3 ms\n")
    assert result_line("x\nRESULT {\"a\": 1.5}\nmore\n") == {"a": 1.5}
    assert not finite_numbers(float("nan"))
    assert not finite_numbers(None)
    assert not finite_numbers([])
    assert not finite_numbers([1.0, None])
    assert finite_numbers({"x": [1, 2.5]})


# the longest smoke runs first (seconds on this machine), so that two lanes finish close together
SMOKE_COST = {"system/run.py": 26, "curtail/run.py": 17, "footprint/run.py": 16, "admin/run.py": 14,
              "ocpp/bench_ocpp.py": 11, "poller/bench_poller.py": 8}
SMOKE_LANES = 2  # smoke runs at a time: they wait on sockets and processes more than they compute


def _smoke(script: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARGEGATE_")}
    env["TMPDIR"] = str(tmp)  # the benchmarks' work directories go with the test's
    tmp.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, str(BENCH / script), "--smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=200)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future[Any]]]:
    """Every benchmark's smoke run, two at a time in the background from the first test that asks."""
    base = tmp_path_factory.mktemp("bench-smoke")
    pool = ThreadPoolExecutor(max_workers=SMOKE_LANES)
    order = sorted(FIGURES, key=lambda s: -SMOKE_COST.get(s, 5))
    runs = {s: pool.submit(_smoke, s, base / s.replace("/", "-")) for s in order}
    try:
        yield runs
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("script", sorted(FIGURES))
def test_benchmark_smoke(script: str, smoke_runs: dict[str, Future[Any]]) -> None:
    proc = smoke_runs[script].result(timeout=380)
    tail = (proc.stdout[-3000:] + "\n--- stderr ---\n" + proc.stderr[-3000:])
    assert proc.returncode == 0, f"{script} --smoke exited {proc.returncode}:\n{tail}"
    figures = result_line(proc.stdout)
    missing = [k for k in FIGURES[script] if k not in figures]
    assert not missing, f"{script}: figures missing from its RESULT line: {missing}\n{tail}"
    bad = {k: figures[k] for k in FIGURES[script] if not finite_numbers(figures[k])}
    assert not bad, f"{script}: figures that are not finite numbers: {bad}\n{tail}"
