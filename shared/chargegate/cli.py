"""The ``chargegate`` command.

Built-in subcommands: ``config check``, ``run``, ``demo``, ``status``, ``broker init``,
``topics``. Services add their own (``cert``, ``sim``, ...) through the entry point group
``chargegate.cli``: each entry is ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

from chargegate import __version__
from chargegate import config as cfgmod
from chargegate.topics import SERVICES

DEFAULT_CONFIG = os.environ.get("CHARGEGATE_CONFIG", "chargegate.yaml")


def config_argument(parser: argparse.ArgumentParser, what: str = "the configuration file") -> None:
    """``--config``/``-c`` with its default in the help (every subcommand that reads the configuration)."""
    parser.add_argument("--config", "-c", default=DEFAULT_CONFIG, metavar="FILE",
                        help=f"{what} (default: %(default)s; env CHARGEGATE_CONFIG sets the default)")


def _cmd_config_check(args: argparse.Namespace) -> int:
    from chargegate.preflight import problems, warnings

    try:
        cfg = cfgmod.load(args.file)
        errors = problems(cfg)
        if errors:
            raise cfgmod.ConfigError(str(args.file), errors)
    except cfgmod.ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    warned = warnings(cfg)
    for path, msg in warned:
        print(f"{args.file}: warning: {path}: {msg}", file=sys.stderr)
    if warned and args.strict:
        print(f"{len(warned)} warning(s), --strict: not ok", file=sys.stderr)
        return 1
    print(f"ok ({len(cfg.evses)} EVSEs, {len(cfg.meters)} meters, {len(cfg.all_circuits())} circuits, "
          f"version {cfg.digest()}; every secret, file and device profile found"
          + (f"; {len(warned)} warning(s) above" if warned else "") + ")")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from chargegate.runner import run

    return run(Path(args.config), services=args.services or None)


def _cmd_demo(args: argparse.Namespace) -> int:
    from chargegate.demo import demo

    return demo(Path(args.dir), duration=args.duration, status=not args.no_status)


def _cmd_status(args: argparse.Namespace) -> int:
    from chargegate.status_view import status

    size = None
    if args.size:
        cols, _, lines = args.size.lower().partition("x")
        try:
            size = (int(cols), int(lines))
        except ValueError:
            print(f"chargegate status: --size {args.size!r}: give it as COLUMNSxLINES, e.g. 100x30", file=sys.stderr)
            return 2
    return status(Path(args.config), once=args.once, timeout=args.timeout, size=size, port=args.port)


def _cmd_broker_init(args: argparse.Namespace) -> int:
    from chargegate.broker import blocked_for, broker_user, write_broker_files

    try:
        cfg = cfgmod.load(args.config)
    except cfgmod.ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    out = Path(args.out)
    def owner(v: str | None) -> tuple[int, int] | None:
        if not v:
            return None
        uid, _, gid = v.partition(":")
        return int(uid), int(gid or uid)

    run_as = None if args.paths_in else broker_user()
    if run_as not in (None, "root"):
        out.mkdir(parents=True, exist_ok=True)
        blocked = blocked_for(run_as, out.resolve().parent)
        if blocked is not None:
            print(f"warning: {blocked} is closed to user {run_as}: mosquitto.conf says 'user root'", file=sys.stderr)
            run_as = "root"
    conf = write_broker_files(cfg, out, port=args.port, listen=args.listen,
                              paths_in=Path(args.paths_in) if args.paths_in else None,
                              broker_owner=owner(args.broker_owner), secrets_owner=owner(args.secrets_owner),
                              run_as=run_as)
    print(f"wrote {conf}, {out / 'passwd'} and {out / 'acl'}; account passwords are in "
          f"{cfg.state_dir / 'broker' / 'secrets'}")
    return 0


def _cmd_topics(args: argparse.Namespace) -> int:
    from chargegate.topics import Registry

    rows = [(t["topic"], t["model"], "yes" if t["retained"] else "no", str(t["qos"]), ", ".join(t["writers"]) or
             "extra services (each its own)") for t in Registry(args.root).describe()]
    head = ("topic", "model", "retained", "qos", "written by")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    return 0


def _add_simulate(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``chargegate simulate``: what-if runs of the real controller core (load_controller.simulate)."""
    sp = sub.add_parser("simulate", help="what-if: the controller over a recorded or synthetic day, with plots")
    try:
        from load_controller.simulate.command import add_arguments, run
    except ImportError as e:
        missing = str(e)
        sp.set_defaults(func=lambda _a: print(f"chargegate simulate needs the load-controller package: {missing}",
                                              file=sys.stderr) or 1)
        return
    add_arguments(sp)
    sp.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="chargegate", description="EV charging manager behind a Smart Meter Gateway")
    ap.add_argument("--version", action="version", version=f"chargegate {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    c = sub.add_parser("config", help="configuration tools")
    csub = c.add_subparsers(dest="config_command", required=True)
    chk = csub.add_parser("check", help="validate a configuration file; prints the errors or 'ok' (and warnings)")
    chk.add_argument("file")
    chk.add_argument("--strict", action="store_true", help="exit 1 on a warning too")
    chk.set_defaults(func=_cmd_config_check)

    r = sub.add_parser("run", help="start the services (and a local broker unless broker.host is set)")
    config_argument(r)
    r.add_argument("services", nargs="*", metavar="SERVICE",
                   help=f"run only these services (default: all in the configuration's `services`): "
                        f"{', '.join(SERVICES)}")
    r.set_defaults(func=_cmd_run)

    d = sub.add_parser("demo", help="run the whole system against built-in simulators")
    d.add_argument("--dir", default="state/demo", help="where the demo writes its configuration and state")
    d.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    d.add_argument("--no-status", action="store_true", help="do not show the live status view")
    d.set_defaults(func=_cmd_demo)

    s = sub.add_parser("status", help="live view of the installation as the broker shows it")
    config_argument(s)
    s.add_argument("--once", action="store_true", help="print one snapshot and exit")
    s.add_argument("--timeout", type=float, default=3.0, help="with --once: how long to collect retained state")
    s.add_argument("--size", default=None, metavar="COLSxLINES",
                   help="fit the view to this size, e.g. 100x30 (default: the terminal's; 100 wide into a pipe)")
    s.add_argument("--port", default=None, metavar="NAME",
                   help="print only this port and exit, e.g. `--port broker` (names: broker, web, variables_api, "
                        "ocpp_local, ...; the demo's in state/demo/ports)")
    s.set_defaults(func=_cmd_status)

    b = sub.add_parser("broker", help="broker accounts and ACL")
    bsub = b.add_subparsers(dest="broker_command", required=True)
    bi = bsub.add_parser("init", help="write mosquitto.conf, password file and ACL for this configuration")
    config_argument(bi)
    bi.add_argument("--out", default="mosquitto/generated")
    bi.add_argument("--port", type=int, default=None)
    bi.add_argument("--listen", default=None)
    bi.add_argument("--paths-in", default=None, help="directory where the broker will see the files")
    bi.add_argument("--broker-owner", default=None, help="UID:GID to own the broker's files (containers)")
    bi.add_argument("--secrets-owner", default=None, help="UID:GID to own the account passwords (containers)")
    bi.set_defaults(func=_cmd_broker_init)

    t = sub.add_parser("topics", help="list the topic contract")
    t.add_argument("--root", default="chargegate")
    t.set_defaults(func=_cmd_topics)

    _add_simulate(sub)

    for ep in entry_points(group="chargegate.cli"):
        try:
            ep.load()(sub)
        except Exception as e:  # a broken plugin must not take the whole CLI down
            print(f"warning: CLI plugin {ep.name} failed to load: {e}", file=sys.stderr)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
