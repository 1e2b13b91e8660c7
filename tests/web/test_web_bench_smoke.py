"""bench/web's smoke mode runs (its figures are printed, never asserted)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                                reason="Debian's chromium and chromium-driver are not installed")


def test_bench_web_smoke() -> None:
    bench = Path(__file__).resolve().parents[2] / "bench" / "web" / "run.py"
    r = subprocess.run([sys.executable, str(bench), "--smoke"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith('{"bench": "web"'))
    print(line)
    assert set(json.loads(line)) >= {"html_bytes", "first_paint_ms_p50", "bus_to_screen_ms_p50"}
