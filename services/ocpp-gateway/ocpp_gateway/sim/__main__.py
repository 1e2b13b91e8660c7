"""``python -m ocpp_gateway.sim --config FILE``: one simulated wallbox per OCPP charge box."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from chargegate import config as cfgmod
from chargegate import log as logsetup
from chargegate.shards import parse_shard
from ocpp_gateway.sim.runner import run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="ocpp_gateway.sim", description=__doc__)
    ap.add_argument("--config", "-c", default="chargegate.yaml")
    ap.add_argument("--meter-interval", type=float, default=10.0, help="MeterValues interval in seconds")
    ap.add_argument("--ca", default=None, help="CA file to verify the central system (wss)")
    ap.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="K/N",
                    help="simulate only every N-th charge box, from the K-th (0-based): N processes share them")
    ap.add_argument("--draw-interval", type=float, default=1.0, metavar="S",
                    help="publish every draw at least every S seconds (a change at once; default 1)")
    args = ap.parse_args(argv)
    cfg = cfgmod.load(args.config)
    logsetup.setup("ocpp-sim", cfg.logging.level, cfg.logging.format)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(cfg, meter_interval_s=args.meter_interval, ca_file=args.ca, shard=args.shard,
                        draw_interval_s=args.draw_interval))


if __name__ == "__main__":
    main()
