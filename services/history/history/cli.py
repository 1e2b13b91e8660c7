"""``chargegate history ...`` (exports of the record) and ``chargegate mode ...`` (the charging mode per EVSE)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from chargegate import config as cfgmod
from chargegate import payloads as p
from chargegate import record as rec
from chargegate import record_export as rx
from chargegate.cli import config_argument
from chargegate.files import write_private

DEFAULT_CONFIG = "chargegate.yaml"


def _load(path: str) -> cfgmod.Config | None:
    try:
        return cfgmod.load(path)
    except cfgmod.ConfigError as e:
        print(e, file=sys.stderr)
        return None


def cmd_history(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return 1
    tz = ZoneInfo(cfg.site.timezone)
    try:
        conn = rec.open_db(cfg.history.db_path(cfg.state_dir), readonly=True)
    except rec.RecordError as e:
        print(f"chargegate history: {e}", file=sys.stderr)
        return 1
    try:
        text = rx.export(conn, args.what, fmt=args.format, style=args.style or cfg.history.csv_style, tz=tz,
                         currency=cfg.history.prices.currency, start=rx.parse_when(args.start, tz),
                         end=rx.parse_when(args.end, tz, end=True), evse=args.evse, id_tag=args.id_tag,
                         kind=getattr(args, "kind", None), node=getattr(args, "node", None))
    except ValueError as e:
        print(f"chargegate history: {e}", file=sys.stderr)
        return 2
    finally:
        conn.close()
    if args.out:
        write_private(Path(args.out), text)  # sessions with idTags and costs are personal data: 0600
    else:
        sys.stdout.write(text)
    return 0


async def _send_mode(cfg: cfgmod.Config, cmd: p.ModeCommand, wait_s: float) -> p.ChargingMode | None:
    from chargegate.broker import bus_settings
    from chargegate.bus import Bus, Message
    from chargegate.topics import Registry

    reg = Registry(cfg.site.topic_root)
    bus = Bus("user", reg, bus_settings(cfg, "user"))
    got: asyncio.Future[p.ChargingMode] = asyncio.get_running_loop().create_future()
    sent = False

    def on_mode(msg: Message) -> None:
        m = msg.payload
        assert isinstance(m, p.ChargingMode)
        if sent and not got.done() and (cmd.mode is None or m.mode == cmd.mode) and m.set_at is not None:
            got.set_result(m)

    bus.subscribe("evse.mode", on_mode, evse_id=cmd.evse_id)
    await bus.start(wait=wait_s)
    try:
        await asyncio.sleep(0.2)  # the retained mode in force arrives first
        sent = True
        bus.publish("evse.mode_set", cmd, evse_id=cmd.evse_id)
        try:
            return await asyncio.wait_for(got, wait_s)
        except TimeoutError:
            return None
    finally:
        await bus.stop()


def cmd_mode(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return 1
    if args.evse is None:  # list
        try:
            conn = rec.open_db(cfg.history.db_path(cfg.state_dir), readonly=True)
            rows = rec.modes(conn)
            conn.close()
        except rec.RecordError:
            rows = {}
        for e in cfg.evses:
            r = rows.get(e.id)
            target = f"  target {r.target['energy_wh'] / 1000:g} kWh by {r.target['by']}" if r and r.target else ""
            print(f"{e.id:<20} {r.mode if r else 'rules':<10}{target}"
                  + (f"  (set by {r.set_by} at {r.set_at:%Y-%m-%d %H:%M})" if r else ""))
        return 0
    if args.evse not in {e.id for e in cfg.evses}:
        print(f"chargegate mode: unknown EVSE {args.evse!r}; known: {', '.join(e.id for e in cfg.evses)}",
              file=sys.stderr)
        return 2
    target = None
    if args.target_kwh is not None:
        if not args.by:
            print("chargegate mode: --target-kwh needs --by HH:MM", file=sys.stderr)
            return 2
        target = p.SessionTarget(energy_wh=args.target_kwh * 1000, by=args.by)
    cmd = p.ModeCommand(evse_id=args.evse, mode=p.ChargingModeName(args.mode) if args.mode else None, target=target,
                        clear_target=args.clear_target, request_id=uuid.uuid4().hex[:16], source="cli")
    try:
        m = asyncio.run(_send_mode(cfg, cmd, args.timeout))
    except (OSError, TimeoutError) as e:
        print(f"chargegate mode: the broker cannot be reached: {e}", file=sys.stderr)
        return 1
    if m is None:
        print("chargegate mode: sent, but the history service did not confirm it (is it running?)", file=sys.stderr)
        return 1
    print(f"{m.evse_id}: {m.mode.value}" + (f", target {m.target.energy_wh / 1000:g} kWh by {m.target.by}"
                                            if m.target else ""))
    return 0


def register(sub: Any) -> None:
    h = sub.add_parser("history", help="export the record: sessions, control actions, monthly summary, house load")
    h.add_argument("what", choices=rx.KINDS)
    config_argument(h)
    h.add_argument("--from", dest="start", help="2026-03, 2026-03-01 or an ISO time (site time zone)")
    h.add_argument("--to", dest="end", help="inclusive month or day, or an exclusive ISO time")
    h.add_argument("--evse")
    h.add_argument("--id-tag")
    h.add_argument("--kind", help="controls: limit, evse_limit, failsafe, link_outage")
    h.add_argument("--node", help="house-load: one circuit node")
    h.add_argument("--format", choices=["csv", "json"], default="csv")
    h.add_argument("--style", choices=["de", "intl"], default=None, help="CSV style (default history.csv_style)")
    h.add_argument("--out", "-o", help="write to this file instead of stdout")
    h.set_defaults(func=cmd_history)

    m = sub.add_parser("mode", help="show or set the charging mode of an EVSE (off, now, rules, solar, solar+min)")
    m.add_argument("evse", nargs="?", help="without: list the modes")
    m.add_argument("mode", nargs="?", choices=[x.value for x in p.ChargingModeName])
    m.add_argument("--target-kwh", type=float, help="a session target: this much energy ...")
    m.add_argument("--by", help="... by this local time (HH:MM)")
    m.add_argument("--clear-target", action="store_true")
    config_argument(m)
    m.add_argument("--timeout", type=float, default=5.0)
    m.set_defaults(func=cmd_mode)
