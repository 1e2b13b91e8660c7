"""Run a module under yappi (CPU clock, every thread), switched on and off by signals.

    python -c "import profiled; profiled.main()" OUT.pstat -m <module> [args ...]   (bench/system on sys.path)

SIGUSR1 starts profiling (built-in functions too with PROFILE_BUILTINS=1), SIGUSR2 stops it and writes
``OUT.pstat`` (pstats format: read it with ``python -m pstats`` or ``pstats.Stats``); at exit a running
profile is written too. Used by
``bench/system/run.py --profile <process,...>`` to profile a window of the run (steady state or the
limit rounds), the paho network thread included (cProfile sees only the thread that enabled it).
yappi is not a dependency of chargegate: ``.venv/bin/pip install yappi`` first.
"""

from __future__ import annotations

import atexit
import os
import runpy
import signal
import sys
from typing import Any

import yappi


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "-m":
        sys.exit(__doc__)
    out, module = sys.argv[1], sys.argv[3]
    sys.argv = [module, *sys.argv[4:]]

    def start(*_: Any) -> None:
        if not yappi.is_running():
            yappi.clear_stats()
            yappi.set_clock_type("cpu")
            yappi.start(builtins=os.environ.get("PROFILE_BUILTINS") == "1")

    def stop(*_: Any) -> None:
        if yappi.is_running():
            yappi.stop()
            yappi.get_func_stats().save(out, type="pstat")

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    atexit.register(stop)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a module that handles SIGTERM itself replaces this
    runpy.run_module(module, run_name="__main__", alter_sys=True)
