"""bench/curtail/setpoint_cost.py: evse-poller's CPU per setpoint, the poller's part of the curtail chain.

The evse-poller service (``evse_poller.service.serve``, its real bus with paho's thread, its real Modbus
TCP client) runs in this process; the broker, N simulated Alfen wallboxes (``python -m evse_poller.sim
--no-bus``) and a publisher of the load-controller's setpoints run as child processes, so that what is
counted is the poller's alone. After start-up the devices' regular polls are stopped (the figure is the
setpoints', not the polls'), then each round publishes a new setpoint for every wallbox and waits until
the poller has written every one (its ``applied`` current). Counted over the measured rounds: from the
setpoint on the wire to the poller's socket until the write's answer is taken (PUBLISH read and PUBACK
in paho's thread, hand-over to the loop, validation, the handler, decide/encode, the Modbus request and
its answer), GC included.

    .venv/bin/python bench/curtail/setpoint_cost.py --evses 100 --rounds 10
        CPU time per setpoint (time.process_time of this process: noisy under load)
    .venv/bin/python bench/curtail/setpoint_cost.py --evses 100 --rounds 4 --callgrind
        the same under valgrind's callgrind: instructions per setpoint (repeatable; counted between a
        zeroing and a dump of callgrind's counters around the measured rounds, minus the idle rate of
        the same process times the rounds' duration)
    .venv/bin/python bench/curtail/setpoint_cost.py --smoke     # 3 wallboxes, 2 rounds (test suite)

Old code against new: the same script with ``PYTHONPATH`` set to an old tree's ``shared`` and
``services/*`` (``git archive``); see bench/curtail/README.md. The last line is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from chargegate import config as cfgmod
from chargegate import log as logsetup
from chargegate import payloads as p
from chargegate.broker import LocalBroker, bus_settings, free_port
from chargegate.topics import Registry

HERE = Path(__file__).resolve()
VALUES = (8.0, 10.0)  # A, alternately: every round changes every wallbox's current

_CG_SOURCE = r"""
#include <valgrind/callgrind.h>
int cg_running(void) { return RUNNING_ON_VALGRIND; }
void cg_zero(void) { CALLGRIND_ZERO_STATS; }
void cg_dump(const char *why) { CALLGRIND_DUMP_STATS_AT(why); }
"""


class Callgrind:
    """Callgrind's client requests (zero the counters, dump them) through a tiny C library built here."""

    def __init__(self, tmp: Path) -> None:
        self.lib: Any = None
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None or not Path("/usr/include/valgrind/callgrind.h").exists():
            return
        src, so = tmp / "cg.c", tmp / "cg.so"
        src.write_text(_CG_SOURCE)
        subprocess.run([cc, "-shared", "-fPIC", "-O0", "-o", str(so), str(src)], check=True)
        lib = ctypes.CDLL(str(so))
        lib.cg_dump.argtypes = [ctypes.c_char_p]
        self.lib = lib if lib.cg_running() else None

    @property
    def active(self) -> bool:
        return self.lib is not None

    def zero(self) -> None:
        if self.lib is not None:
            self.lib.cg_zero()

    def dump(self, why: str) -> None:
        if self.lib is not None:
            self.lib.cg_dump(why.encode())


def config_text(tmp: Path, ports: list[int], broker_port: int) -> str:
    evses = "\n".join(f"  - {{id: wb{i:03d}, circuit: grid, max_current_a: 16, modbus: {{profile: alfen-eve, "
                      f"host: 127.0.0.1, port: {pt}, device_id: 1, timeout_s: 10}}}}" for i, pt in enumerate(ports))
    # long validity and timeouts: under valgrind everything in this process runs ~50 times slower
    return f"""
site: {{name: bench-setpoint-cost}}
state_dir: {tmp / 'state'}
broker: {{port: {broker_port}}}
logging: {{level: warning}}
poller: {{poll_interval_s: 60, watchdog_timeout_s: 600}}
controller: {{setpoint_validity_s: 600}}
circuits:
  - {{id: grid, fuse_a: {len(ports) * 32}}}
evses:
{evses}
"""


def wait_ports(ports: list[int], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"simulator port {port} did not open") from None
                time.sleep(0.05)


def publisher(path: str) -> int:
    """Child process: for every line ``seq current`` on stdin, publish one setpoint per EVSE (QoS 1, as the
    load-controller does, through paho), then answer ``sent``."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    cfg = cfgmod.load(path)
    reg = Registry(cfg.site.topic_root)
    st = bus_settings(cfg, "load-controller")
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"setpoint-cost-{os.getpid()}")
    c.username_pw_set(st.username, st.password)
    c.max_inflight_messages_set(1000)
    c.connect(st.host, st.port)
    c.loop_start()
    ids = [e.id for e in cfg.evses]
    for line in sys.stdin:
        seq, current = line.split()
        until = datetime.now(UTC) + timedelta(seconds=cfg.controller.setpoint_validity_s)
        info = None
        for e in ids:
            sp = p.Setpoint(evse_id=e, current_a=float(current), phases=3, valid_until=until, seq=int(seq))
            info = c.publish(reg.topic("evse.setpoint", evse_id=e), sp.to_json(), qos=1, retain=True)
        if info is not None:
            info.wait_for_publish(30)
        print("sent", flush=True)
    c.loop_stop()
    return 0


async def measure(args: argparse.Namespace, tmp: Path, cg: Callgrind) -> dict[str, Any]:
    from chargegate.runtime import start_context, stop_context
    from evse_poller import service

    n = args.evses
    ports = [free_port() for _ in range(n + 1)]
    path = tmp / "chargegate.yaml"
    path.write_text(config_text(tmp, ports[:n], ports[n]))
    cfg = cfgmod.load(path)
    logsetup.setup("evse-poller", cfg.logging.level, "json")  # as run_service sets up the service's logs
    broker = LocalBroker.prepare(cfg, persistence=False)
    broker.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARGEGATE_")}
    env["CHARGEGATE_HEALTH_INTERVAL_S"] = "3600"
    sims = subprocess.Popen([sys.executable, "-m", "evse_poller.sim", "--config", str(path), "--no-bus"], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "sim.log", "wb"))
    pub = subprocess.Popen([sys.executable, str(HERE), "--publisher", str(path)], env=env, text=True,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(tmp / "pub.log", "wb"))
    ctx = None
    task = None
    try:
        wait_ports(ports[:n])
        ctx = await start_context("evse-poller", cfg, path, connect_timeout=60)
        serve = getattr(service, "serve_tuned", service.serve)  # the process's own entry (GC tuned where it is)
        task = asyncio.create_task(serve(ctx))
        poller = None
        deadline = time.monotonic() + 600
        while poller is None or not all(d.online for d in poller.evses.values()):
            if time.monotonic() > deadline:
                raise RuntimeError("the wallboxes did not come online")
            await asyncio.sleep(0.1)
            holder = _find_poller(task)
            if holder is not None:
                poller = holder
                if not getattr(poller, "_brought_up", False):
                    poller._brought_up = True  # type: ignore[attr-defined]
                    await poller.poll_once()  # every device at once, not in its slot of the 60 s interval
        for t in list(poller._device_tasks.values()):  # the regular polls stop: only setpoints are counted
            t.cancel()
        await asyncio.sleep(0.5)
        devs = list(poller.evses.values())
        seq = 0

        async def one_round(current: float) -> None:
            nonlocal seq
            seq += 1
            assert pub.stdin is not None and pub.stdout is not None
            pub.stdin.write(f"{seq} {current}\n")
            pub.stdin.flush()
            await asyncio.to_thread(pub.stdout.readline)
            limit = time.monotonic() + 300
            while not all(d.applied is not None and d.applied.current_a == current for d in devs):
                if time.monotonic() > limit:
                    raise RuntimeError("a wallbox did not get its setpoint")
                await asyncio.sleep(0.005)

        for r in range(args.warmup):
            await one_round(VALUES[r % 2])
        # the idle rate of this process (its loop waiting, paho's thread, the wait loop of one_round)
        cg.zero()
        c0, t0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(args.idle)
        idle_cpu, idle_wall = time.process_time() - c0, time.perf_counter() - t0
        cg.dump("idle")
        prof = None
        if args.cprofile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        cg.zero()
        c0, t0 = time.process_time(), time.perf_counter()
        for r in range(args.rounds):
            await one_round(VALUES[(args.warmup + r) % 2])
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        cg.dump("rounds")
        if prof is not None:
            prof.disable()
            prof.dump_stats(args.cprofile)
        writes = sum(ctx.counters.get(k, 0) for k in ("setpoint_writes",))
        setpoints = args.rounds * n
        net_cpu = cpu - idle_cpu / idle_wall * wall
        return {"evses": n, "rounds": args.rounds, "setpoints": setpoints, "setpoint_writes_total": writes,
                "rounds_wall_s": round(wall, 3), "idle_wall_s": round(idle_wall, 3),
                "cpu_us_per_setpoint": round(net_cpu / setpoints * 1e6, 1),
                "cpu_us_per_setpoint_gross": round(cpu / setpoints * 1e6, 1)}
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if ctx is not None:
            await stop_context(ctx)
        for proc in (pub, sims):
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        broker.stop()


def _find_poller(task: asyncio.Task[None]) -> Any:
    """The service's Poller (held in ``serve``'s closure; reached through the coroutine's frame)."""
    from evse_poller.poller import Poller

    coro: Any = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None)
        if frame is not None:
            holder = frame.f_locals.get("holder")
            if isinstance(holder, dict) and isinstance(holder.get("poller"), Poller):
                return holder["poller"]
        coro = getattr(coro, "cr_await", None)
    return None


def totals(files: list[str]) -> dict[str, int]:
    """Instructions of each callgrind dump by its trigger ("idle", "rounds")."""
    out: dict[str, int] = {}
    for f in files:
        why, total = None, None
        with open(f, errors="replace") as fh:
            for line in fh:
                if line.startswith("desc: Trigger:"):
                    why = line.rsplit(":", 1)[-1].strip()
                elif line.startswith(("totals:", "summary:")):
                    total = int(line.split()[1])
        if why is not None and total is not None:
            out[why] = total
    return out


def outer_callgrind(args: argparse.Namespace) -> int:
    """Run this script under callgrind and turn its two dumps into instructions per setpoint."""
    tmp = Path(tempfile.mkdtemp(prefix="setpoint-cost-cg-"))
    out = tmp / "callgrind.out"
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no", "--collect-jumps=no",
            sys.executable, str(HERE), "--evses", str(args.evses), "--rounds", str(args.rounds), "--warmup",
            str(args.warmup), "--idle", str(args.idle), "--dir", str(tmp / "run")]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        return proc.returncode
    inner = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    got = totals(sorted(glob.glob(f"{out}*")))
    setpoints = inner["setpoints"]
    idle_rate = got["idle"] / inner["idle_wall_s"]
    net = got["rounds"] - idle_rate * inner["rounds_wall_s"]
    result = {**inner, "instructions_rounds": got["rounds"], "instructions_idle_per_s": round(idle_rate),
              "instructions_per_setpoint": round(net / setpoints),
              "instructions_per_setpoint_gross": round(got["rounds"] / setpoints)}
    print(f"{setpoints} setpoints: {result['instructions_per_setpoint']:,} instructions each "
          f"({result['instructions_per_setpoint_gross']:,} before the idle rate is taken off); dumps in {tmp}")
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--evses", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--idle", type=float, default=2.0, help="seconds of idle measured for the idle rate")
    ap.add_argument("--callgrind", action="store_true", help="count instructions under valgrind's callgrind")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--cprofile", default=None, metavar="FILE",
                    help="cProfile of the measured rounds (the loop's thread only) into FILE, for where it goes")
    ap.add_argument("--publisher", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="tiny run for the test suite: 3 wallboxes, 2 rounds")
    args = ap.parse_args()
    if args.publisher:
        return publisher(args.publisher)
    if args.smoke:
        args.evses, args.rounds, args.warmup, args.idle = 3, 2, 1, 0.5
    if args.callgrind:
        return outer_callgrind(args)
    tmp = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="setpoint-cost-"))
    tmp.mkdir(parents=True, exist_ok=True)
    cg = Callgrind(tmp)
    from evse_poller.service import use_fast_event_loop

    use_fast_event_loop()  # the service's own event loop (uvloop when installed)
    result = asyncio.run(measure(args, tmp, cg))
    print(f"{result['setpoints']} setpoints: {result['cpu_us_per_setpoint']} us CPU each", flush=True)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
