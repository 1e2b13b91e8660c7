"""bench/footprint: what each service costs before it does anything - its import-time memory.

Each service's entry point is loaded in a fresh interpreter as ``python -m <package>`` loads it (its
``__main__`` module runs, up to the ``main()`` call that would start the service), several times;
reported per service: the peak RSS after the import (median of the runs), the number of modules
loaded, and which of the heavy libraries it pulled in (a web framework in a service that does not
serve the admin API is memory for nothing). A bare interpreter with the shared
``chargegate`` runtime is the baseline.

    .venv/bin/python bench/footprint/run.py [--runs 5]
    .venv/bin/python bench/footprint/run.py --smoke     # one run each (the test suite runs it)

A line ``RESULT {json}`` carries the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

SERVICES = {"evse-poller": "evse_poller", "load-controller": "load_controller",
            "ocpp-gateway": "ocpp_gateway", "smgw-link": "smgw_link",
            "history": "history", "(runtime only)": "chargegate.runtime"}
HEAVY = ["rich", "fastapi", "starlette", "uvicorn", "pydantic", "jsonschema", "ocpp", "pymodbus", "websockets",
         "cryptography", "paho", "yaml", "uvloop", "sqlite3", "referencing", "anyio", "h11", "email"]

PROBE = """
import importlib, json, resource, runpy, sys
if sys.argv[1].startswith("chargegate."):  # the baseline: the runtime as a service process has it
    from chargegate.lean import service_process
    service_process()
    importlib.import_module(sys.argv[1])
else:  # what `python -m <package>` imports (its __main__ with another name: main() is not called)
    runpy.run_module(sys.argv[1], run_name="footprint", alter_sys=True)
heavy = sorted({m.split('.')[0] for m, mod in sys.modules.items() if mod is not None} & set(json.loads(sys.argv[2])))
loaded = sum(mod is not None for mod in sys.modules.values())  # kept out (None) is not loaded
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "modules": loaded,
                  "heavy": heavy}))
"""


def probe(module: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARGEGATE_")}
    out = subprocess.run([sys.executable, "-c", PROBE, module, json.dumps(HEAVY)], capture_output=True, text=True,
                         env=env, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="one run per service (the test suite runs it)")
    args = ap.parse_args()
    runs = 1 if args.smoke else args.runs
    figures: dict[str, object] = {}
    print(f"import-time footprint, Python {sys.version.split()[0]}, median of {runs} fresh interpreters")
    total = 0.0
    for name, module in SERVICES.items():
        res = [probe(module) for _ in range(runs)]
        rss = statistics.median(float(r["rss_mb"]) for r in res)  # type: ignore[arg-type]
        mods = res[-1]["modules"]
        heavy = res[-1]["heavy"]
        if name != "(runtime only)":
            total += rss
        key = name.replace("-", "_").replace("(runtime only)", "runtime")
        figures[f"{key}_rss_mb"] = round(rss, 1)
        figures[f"{key}_modules"] = mods
        print(f"  {name:16s} {rss:6.1f} MB  {mods:5d} modules  {', '.join(heavy)}")  # type: ignore[arg-type]
    figures["services_total_rss_mb"] = round(total, 1)
    print(f"  services total   {total:6.1f} MB")
    print("RESULT " + json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
