"""``chargegate sim ...``: drive the simulated cars from the command line.

* ``chargegate sim run`` - start the simulators of the configuration (as ``python -m evse_poller.sim``)
* ``chargegate sim plug <evse_id> [--phases N] [--max-current-a X]`` - plug a car in
* ``chargegate sim unplug <evse_id>`` - unplug it
* ``chargegate sim show`` - print what every simulated car draws (the retained draw topics)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from chargegate import config as cfgmod
from chargegate.cli import config_argument

DEFAULT_CONFIG = os.environ.get("CHARGEGATE_CONFIG", "chargegate.yaml")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from evse_poller.sim.__main__ import add_arguments

    sim = subparsers.add_parser("sim", help="simulated wallboxes and meters (plug a car in and out)")
    sub = sim.add_subparsers(dest="sim_command", required=True)

    r = sub.add_parser("run", help="start simulators for every Modbus EVSE and meter of the configuration")
    config_argument(r)
    r.add_argument("--log-format", choices=["auto", "json", "console"], default=None)
    add_arguments(r)
    r.set_defaults(func=_cmd_run)

    p = sub.add_parser("plug", help="plug a car into a simulated EVSE")
    p.add_argument("evse_id")
    config_argument(p)
    p.add_argument("--phases", type=int, choices=[1, 2, 3], default=3, help="phases the car charges on")
    p.add_argument("--max-current-a", type=float, default=16.0, help="the car's own maximum current per phase")
    p.add_argument("--timeout", type=float, default=5.0, help="how long to wait for the simulator's answer")
    p.set_defaults(func=_cmd_plug)

    u = sub.add_parser("unplug", help="unplug the car from a simulated EVSE")
    u.add_argument("evse_id")
    config_argument(u)
    u.add_argument("--timeout", type=float, default=5.0)
    u.set_defaults(func=_cmd_unplug)

    s = sub.add_parser("show", help="what every simulated car draws now")
    config_argument(s)
    s.add_argument("--timeout", type=float, default=2.0)
    s.set_defaults(func=_cmd_show)


def _cmd_run(args: argparse.Namespace) -> int:
    from evse_poller.sim.__main__ import run_from_args

    return run_from_args(args)


def _load(path: str) -> cfgmod.Config | None:
    try:
        return cfgmod.load(path)
    except cfgmod.ConfigError as e:
        print(e, file=sys.stderr)
        return None


def _cmd_plug(args: argparse.Namespace) -> int:
    if not 0 < args.max_current_a <= 80:
        print("--max-current-a must be in (0, 80]", file=sys.stderr)
        return 2
    return _send(args, {"action": "plug", "phases": args.phases, "max_current_a": args.max_current_a})


def _cmd_unplug(args: argparse.Namespace) -> int:
    return _send(args, {"action": "unplug"})


def _send(args: argparse.Namespace, command: dict[str, Any]) -> int:
    config = _load(args.config)
    if config is None:
        return 2
    # the Modbus simulators (sim run) and the OCPP wallbox simulators (ocpp-sim) answer on the same topics
    simulated = [e.id for e in config.evses if e.modbus is not None or e.ocpp is not None]
    if args.evse_id not in simulated:
        print(f"unknown simulated EVSE {args.evse_id!r}; the configuration's Modbus and OCPP EVSEs: "
              f"{', '.join(simulated) or 'none'}", file=sys.stderr)
        return 2
    from chargegate import log as logsetup

    logsetup.setup("sim", "warning")  # the answer is the one line printed; the bus's own info lines are noise
    return asyncio.run(_send_async(config, args.evse_id, command, args.timeout))


async def _send_async(config: cfgmod.Config, evse_id: str, command: dict[str, Any], wait_s: float) -> int:
    from evse_poller.sim.runner import sim_bus

    bus = sim_bus(config)
    root = bus.registry.root
    want_plugged = command["action"] == "plug"
    seen: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def on_draw(topic: str, payload: bytes, retained: bool) -> None:
        try:
            seen.put_nowait(json.loads(payload))
        except ValueError:
            pass

    try:
        try:
            await bus.start(wait=wait_s)
        except TimeoutError:
            print(f"cannot reach the broker at {bus.settings.host}:{bus.settings.port}", file=sys.stderr)
            return 1
        bus.subscribe_raw(f"{root}/sim/{evse_id}/draw", on_draw)
        await asyncio.sleep(0.1)  # the retained draw arrives first; the answer follows the command
        bus.publish_raw(f"{root}/sim/{evse_id}/command", json.dumps(command).encode(), qos=1, retain=False)
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                print(f"no simulator answered for {evse_id} within {wait_s:g} s "
                      "(is the demo, `chargegate sim run` or `chargegate ocpp-sim` running?)", file=sys.stderr)
                return 1
            try:
                draw = await asyncio.wait_for(seen.get(), left)
            except TimeoutError:
                continue
            if draw.get("plugged") is want_plugged and (not want_plugged or (
                    draw.get("car_phases") == command["phases"]
                    and draw.get("car_max_current_a") == command["max_current_a"])):
                break
        if want_plugged:
            print(f"{evse_id}: car plugged in ({command['phases']} phases, max {command['max_current_a']:g} A); "
                  f"state {draw.get('state')}, limit {draw.get('limit_a')} A, "
                  f"drawing {draw.get('evse_current_a')} A")
        else:
            print(f"{evse_id}: car unplugged")
        return 0
    finally:
        await bus.stop()


def _cmd_show(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 2
    from chargegate import log as logsetup

    logsetup.setup("sim", "warning")
    return asyncio.run(_show(config, args.timeout))


async def _show(config: cfgmod.Config, wait_s: float) -> int:
    from evse_poller.sim.runner import sim_bus

    bus = sim_bus(config)
    draws: dict[str, dict[str, Any]] = {}

    def on_draw(topic: str, payload: bytes, retained: bool) -> None:
        try:
            d = json.loads(payload)
        except ValueError:
            return
        if isinstance(d, dict):
            draws[str(d.get("evse_id", topic))] = d

    try:
        await bus.start(wait=wait_s)
    except TimeoutError:
        print(f"cannot reach the broker at {bus.settings.host}:{bus.settings.port}", file=sys.stderr)
        await bus.stop()
        return 1
    bus.subscribe_raw(f"{bus.registry.root}/sim/+/draw", on_draw)
    await asyncio.sleep(min(wait_s, 1.0))
    await bus.stop()
    if not draws:
        print("no simulator data on the bus")
        return 1
    for evse_id, d in sorted(draws.items()):
        print(f"{evse_id:12} {'plugged' if d.get('plugged') else 'empty  '} state {d.get('state')} "
              f"limit {d.get('limit_a')} A{' (failsafe)' if d.get('fallback') else ''} "
              f"grid {d.get('grid_current_a')} A energy {d.get('energy_wh')} Wh")
    return 0
