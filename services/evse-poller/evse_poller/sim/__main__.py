"""``python -m evse_poller.sim --config FILE``: simulators for every Modbus EVSE and meter."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from chargegate import config as cfgmod
from chargegate import log as logsetup
from chargegate.shards import parse_shard
from evse_poller.sim.runner import run


def parse_load(text: str) -> tuple[float, float, float]:
    parts = [float(x) for x in text.split(",")]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or any(p < 0 or p > 1000 for p in parts):
        raise argparse.ArgumentTypeError("give one current or three (L1,L2,L3) in A, 0..1000")
    return (parts[0], parts[1], parts[2])


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--base-load-a", type=parse_load, default=(1.0, 1.0, 1.0),
                    help="house base load seen by the grid meter, A per phase (one value or L1,L2,L3)")
    ap.add_argument("--no-bus", action="store_true", help="do not connect to the broker (no plug/unplug commands)")
    ap.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="K/N",
                    help="simulate only every N-th endpoint (TCP port or serial line), starting at the K-th (0-based), "
                         "so that N processes share the devices; the meters belong to shard 0")
    ap.add_argument("--draw-interval", type=float, default=1.0, metavar="S",
                    help="publish every draw at least every S seconds (a change at once; default 1)")


def run_from_args(args: argparse.Namespace) -> int:
    try:
        config = cfgmod.load(args.config)
    except cfgmod.ConfigError as e:
        print(f"simulator: configuration error\n{e}", file=sys.stderr)
        return 2
    logsetup.setup("sim", config.logging.level, getattr(args, "log_format", None) or config.logging.format)

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await run(config, base_load_a=args.base_load_a, use_bus=not args.no_bus, stop=stop,
                         shard=getattr(args, "shard", (0, 1)), draw_interval_s=getattr(args, "draw_interval", 1.0))

    return asyncio.run(main())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m evse_poller.sim",
                                 description="simulated wallboxes and meters for a chargegate configuration")
    ap.add_argument("--config", "-c", default=os.environ.get("CHARGEGATE_CONFIG", "chargegate.yaml"))
    ap.add_argument("--log-format", choices=["auto", "json", "console"], default=None)
    add_arguments(ap)
    sys.exit(run_from_args(ap.parse_args(argv)))


if __name__ == "__main__":
    main()
