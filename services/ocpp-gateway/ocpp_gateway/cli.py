"""``chargegate ocpp-queue`` (inspect the durable queue), ``ocpp-sim`` and ``ocpp-backend-sim``."""

from __future__ import annotations

import argparse
import json
import sqlite3
from pathlib import Path
from typing import Any

from chargegate.cli import config_argument


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    q = subparsers.add_parser("ocpp-queue", help="show the OCPP gateway's durable transaction queue")
    config_argument(q)
    q.add_argument("--dead", action="store_true", help="list the messages the backend refused for good")
    q.set_defaults(func=_queue)
    s = subparsers.add_parser("ocpp-sim", help="run the OCPP wallbox simulators of a configuration")
    config_argument(s)
    s.set_defaults(func=_sim)
    b = subparsers.add_parser("ocpp-backend-sim", help="run the OCPP backend simulator")
    b.add_argument("--port", type=int, default=9000)
    b.add_argument("--db", default="backend-sim.sqlite")
    b.add_argument("--control-port", type=int, default=None)
    b.set_defaults(func=_backend)


def _queue(args: Any) -> int:
    from chargegate import config as cfgmod

    cfg = cfgmod.load(args.config)
    path = cfg.ocpp.queue.path or (cfg.state_dir / "ocpp-queue.sqlite")
    if not Path(path).exists():
        print(f"no queue at {path}")
        return 1
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    rows = db.execute("SELECT cp, kind, COUNT(*) FROM msg GROUP BY cp, kind ORDER BY cp").fetchall()
    print(json.dumps({"queue": str(path), "pending": [{"charge_box_id": r[0], "kind": r[1], "messages": r[2]}
                                                      for r in rows],
                      "dead": db.execute("SELECT COUNT(*) FROM dead").fetchone()[0],
                      "open_transactions": db.execute("SELECT COUNT(*) FROM tx WHERE stopped IS NULL").fetchone()[0]},
                     indent=2))
    if args.dead:
        for r in db.execute("SELECT cp, action, payload, reason FROM dead ORDER BY seq"):
            print(json.dumps({"charge_box_id": r[0], "action": r[1], "payload": json.loads(r[2]), "reason": r[3]}))
    return 0


def _sim(args: Any) -> int:
    from ocpp_gateway.sim.__main__ import main

    main(["--config", args.config])
    return 0


def _backend(args: Any) -> int:
    from ocpp_gateway.backend_sim import main

    argv = ["--port", str(args.port), "--db", args.db]
    if args.control_port:
        argv += ["--control-port", str(args.control_port)]
    main(argv)
    return 0
