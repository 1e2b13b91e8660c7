"""Fault injection against the whole system (issue 8): every service, simulator and broker as its own
process (tests/system/harness.py), one running system shared by the scenarios of this module.

Each scenario injects a fault, sends a grid-operator limit (CLS.EEDI at the operator's backend)
while the fault lasts, ends the fault and prints what it injected and what it observed. The
invariant monitor runs all the time; every scenario asserts that no breach in its window lasted
longer than the grace (printed), that every service was healthy again within 10 s of its fault
ending, and the last scenario checks that every charging session reached the operator's backend
exactly once with the simulators' energy registers as meterStart/meterStop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest
from harness import SERVICES, LimitResult, System, system_plan

pytestmark = pytest.mark.system

HEALTH_BACK_S = 10.0
LIMITS: list[tuple[str, LimitResult]] = []  # every operator limit of the run, for the summary
LENIENT = {"evse-poller", "load-controller", "ocpp-gateway"}  # on the actuation path of a new limit


@pytest.fixture(scope="module")
async def system(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    s = System(system_plan(tmp_path_factory.mktemp("system")))
    try:
        took = await s.start()
        t = s.plan.tuning
        print(f"\n[system] up in {took:.1f} s: {len(s.procs)} processes + 3 brokers, config {s.cfg_path}")
        print(f"[system] grace {s.grace_s:.1f} s = control cycle {t.cycle_s:g} s + poll/ramp {t.poll_interval_s:g} s"
              f" + draw sampling 1 s; setpoint validity {t.setpoint_validity_s:g} s; §14a floor "
              f"{s.plan.floor_w:.0f} W ({sum(w.controllable for w in s.plan.wallboxes)} controllable)")
        yield s
    finally:
        m = s.monitor
        applied = [r.compliant_at - r.on_bus_at for _, r in LIMITS if r.compliant_at and r.on_bus_at]
        if applied:
            print(f"\n[system] operator limit on the bus -> draws within it: max {max(applied):.2f} s over "
                  f"{len(applied)} limits (grace {s.grace_s:.1f} s); per scenario: "
                  + ", ".join(f"{n} {r.compliant_at - r.on_bus_at:.2f} s" for n, r in LIMITS
                              if r.compliant_at and r.on_bus_at))
        longest = sorted(m.breaches(), key=lambda e: -e.duration(time.monotonic()))[:5]
        print(f"[system] monitor: {m.evaluations} evaluations of the invariants, {m.messages} messages; "
              f"{len(m.breaches())} breaches in all, the longest: {m.describe(longest)}")
        await s.stop()


def report(name: str, injected: str, observed: dict[str, Any]) -> None:
    print(f"\n[{name}] injected: {injected}")
    for k, v in observed.items():
        print(f"[{name}]   {k}: {v}")


def assert_no_violations(s: System, since: float, name: str) -> list[str]:
    m = s.monitor
    within = [e for e in m.breaches(since) if e not in m.violations(since)]
    bad = m.violations(since)
    assert not bad, f"{name}: invariant violated beyond the grace of {s.grace_s:.1f} s: {m.describe(bad)}"
    crashed = [(n, code) for t, n, code in s.crashes if t >= since]
    assert not crashed, f"{name}: processes exited on their own: {crashed} (logs in {s.logs})"
    return m.describe(within)


async def all_healthy(s: System, since: float, name: str) -> float:
    """Every service's latest health is online, within HEALTH_BACK_S of ``since`` (its fault's end)."""
    try:
        await s.monitor.until(lambda: all(s.health_state(svc) == "online" for svc in SERVICES),
                              max(0.0, since + HEALTH_BACK_S - time.monotonic()), "every service online")
    except TimeoutError:
        raise AssertionError(f"{name}: not every service healthy within {HEALTH_BACK_S:g} s of the fault's end: "
                             f"{ {svc: s.health_state(svc) for svc in SERVICES} }") from None
    return max(0.0, time.monotonic() - since)


def limit_figures(r: LimitResult, scenario: str = "") -> str:
    if scenario:
        LIMITS.append((scenario, r))
    parts = [f"{r.watts} W acks {r.acks}"]
    if r.on_bus_at is not None:
        parts.append(f"on the bus {r.on_bus_at - r.sent_at:.2f} s after the first send")
    if r.compliant_at is not None and r.on_bus_at is not None:
        parts.append(f"draws within it {max(0.0, r.compliant_at - r.on_bus_at):.2f} s after that")
    return ", ".join(parts)


async def retry_limit(s: System, r: LimitResult, within_s: float = 15.0) -> LimitResult:
    """After a fault: the operator repeats a refused/unanswered limit until it is acknowledged, unless
    the device already took it (the reply to its read after a reconnect)."""
    if r.acks[-1] != 0:
        cur = s.monitor.limits.get(s.cfg.smgw.limit_source)
        if not (cur and cur[1].get("active") and cur[1].get("power_w") == r.watts):
            again = await s.operator_limit(r.watts, retry_for_s=within_s)
            r.acks += again.acks
    return await s.limit_applied(r, within_s)


def drawing(s: System) -> list[str]:
    m = s.monitor
    return [w.id for w in s.plan.wallboxes if w.controllable and m.draws.get(w.id, {}).get("plugged")
            and any(float(a) > 0 for a in m.draws[w.id].get("evse_current_a", []))]


async def steady(s: System, n: int = 2, within_s: float = 20.0) -> None:
    """Before a fault: at least ``n`` controllable cars charging and no breach open."""
    m = s.monitor
    await m.until(lambda: len(drawing(s)) >= n and not m.open, within_s, f"{n} cars charging, no breach open")


async def test_baseline_limit_and_fuses(system: System) -> None:
    s, m = system, system.monitor
    t0 = time.monotonic()
    idle = await asyncio.gather(*(s.plug_when_idle(w.id) for w in s.plan.wallboxes))
    assert all(idle), "a wallbox offered current before its car arrived"
    started = await _wait_tx_open(s, [w.id for w in s.plan.wallboxes], 20)
    await steady(s, n=4)
    loads_before = m.loads()
    r = await s.operator_limit(14500)
    r = await s.limit_applied(r, 10)
    sp_times = [t for sps in m.setpoints.values() for t, _ in sps if r.on_bus_at and t >= r.on_bus_at]
    within = assert_no_violations(s, t0, "baseline")
    report("baseline", "all cars plugged, then an operator limit of 14500 W", {
        "loads per circuit before the limit (A)": {k: [round(x, 1) for x in v] for k, v in loads_before.items()},
        "sessions open at the backend": started,
        "limit": limit_figures(r, "baseline"),
        "first setpoint after the limit reached the bus": f"{min(sp_times) - r.on_bus_at:.2f} s" if sp_times else "-",
        "controllable draw now": f"{m.controllable_w():.0f} W",
        "breaches within the grace": within,
    })
    assert r.acks == [0]


def energy_at(sim: Any, iso_ts: str | None) -> float:
    """The simulator's energy register at (just after) a wall-clock time, from its draws."""
    if not iso_ts:
        return float("inf")
    at = datetime.fromisoformat(iso_ts.replace("Z", "+00:00"))
    for ts, wh in sim.energy_by_ts:
        if datetime.fromisoformat(ts) >= at:
            return wh
    return float("inf")


async def _wait_tx_open(s: System, evses: list[str], within_s: float) -> dict[str, int]:
    deadline = time.monotonic() + within_s
    while True:
        out = {}
        for e in evses:
            txs = await s.transactions(e)
            out[e] = sum(1 for t in txs if t.get("stopped") is None)
        if all(v >= 1 for v in out.values()) or time.monotonic() > deadline:
            return out
        await asyncio.sleep(0.3)


async def test_broker_killed_and_restarted(system: System) -> None:
    s, m = system, system.monitor
    await steady(s)
    t0 = time.monotonic()
    f = m.fault_begin("broker", lenient=True)
    s.kill_broker()
    s.unplug("charx")  # a session ends while the bus is gone
    r = await s.operator_limit(14000)
    # every wallbox hears nothing: once the setpoints expire, each falls to its safe current
    plugged = [w for w in s.plan.wallboxes if m.draws.get(w.id, {}).get("plugged")]

    def all_safe() -> bool:
        return all(float(m.draws[w.id].get("limit_a") or 0) <= w.safe_a + 0.01 for w in plugged)

    t_fb = time.monotonic()
    await m.until(all_safe, s.plan.tuning.setpoint_validity_s + s.grace_s + 2, "every wallbox at its safe current")
    fell_after = time.monotonic() - t0
    offered = {w.id: m.draws[w.id].get("limit_a") for w in plugged}
    t_up = time.monotonic()
    s.start_broker()
    back = await s.healthy_again(list(SERVICES), t_up, HEALTH_BACK_S)
    m.fault_end(f, t_up + max(back.values(), default=HEALTH_BACK_S))
    r = await retry_limit(s, r)
    await s.plug_when_idle("charx")
    within = assert_no_violations(s, t0, "broker")
    report("broker", "Mosquitto SIGKILLed; the 1-phase car unplugged and an operator limit of 14000 W sent while "
                     "it was down; restarted after every wallbox fell back", {
        "wallboxes at their safe current after": f"{fell_after:.1f} s (waited {time.monotonic() - t_fb:.1f} s)",
        "offered current during the outage (A)": offered,
        "services healthy after the restart (s)": {k: round(v, 2) for k, v in back.items()},
        "limit": limit_figures(r, "broker"),
        "breaches within the grace": within,
    })
    assert set(back) == set(SERVICES), f"not healthy within {HEALTH_BACK_S} s: {set(SERVICES) - set(back)}"
    assert r.acks[-1] == 0


@pytest.mark.parametrize("service", list(SERVICES))
async def test_service_sigkilled_and_restarted(system: System, service: str) -> None:
    s, m = system, system.monitor
    watts = {"evse-poller": 13800, "load-controller": 14200, "ocpp-gateway": 13600, "smgw-link": 10000}[service]
    await steady(s)
    t0 = time.monotonic()
    f = m.fault_begin(service, lenient=service in LENIENT)
    pid = s.kill_service(service)
    unplugged = []
    if service == "ocpp-gateway":
        # sessions end while the gateway is dead: they must still reach the backend, once
        for e in ("ocpp16", "webasto"):
            s.unplug(e)
            unplugged.append(e)
    r = await s.operator_limit(watts, ack_within_s=2.0)
    t_start = time.monotonic()
    s.start_service(service)
    back = await s.healthy_again([service], t_start, HEALTH_BACK_S, old_pids={service: pid})
    m.fault_end(f, t_start + back.get(service, HEALTH_BACK_S))
    r = await retry_limit(s, r)
    for e in unplugged:
        await s.plug_when_idle(e)
    within = assert_no_violations(s, t0, service)
    eff = m.effective_limit(s.cfg.smgw.limit_source, {"power_w": watts})
    report(f"kill {service}", f"SIGKILL {service} (pid {pid}); operator limit {watts} W while it was dead"
           + (f"; cars unplugged meanwhile: {unplugged}" if unplugged else "") + "; restarted at once", {
               "dead for": f"{t_start - f.start:.2f} s",
               "healthy after the restart": f"{back.get(service, float('nan')):.2f} s",
               "limit": limit_figures(r, service) + f" (effective {eff:.0f} W)",
               "breaches within the grace": within,
           })
    assert service in back, f"{service} not healthy within {HEALTH_BACK_S} s of its restart"
    assert r.acks[-1] == 0 or r.on_bus_at is not None


async def test_smgw_link_cut_and_restored(system: System) -> None:
    s, m = system, system.monitor
    await steady(s)
    t0 = time.monotonic()
    f = m.fault_begin("smgw", lenient=False)
    s.cut_smgw()
    s.unplug("ocpp201")  # its StopTransaction must wait in the queue for the link
    r = await s.operator_limit(14800, ack_within_s=1.0)  # cannot arrive: the channel is cut

    def failsafe() -> bool:
        cur = m.limits.get(s.cfg.smgw.limit_source)
        return bool(cur and cur[1].get("id") == "failsafe" and cur[1].get("active"))

    await m.until(failsafe, s.plan.tuning.link_loss_grace_s + 5, "the failsafe limit after the link loss")
    t_failsafe = time.monotonic() - t0
    link_states = [d.get("state") for _, d in m.links if _ >= t0]
    t_up = time.monotonic()
    s.restore_smgw()
    await m.until(lambda: m.links[-1][1].get("state") == "up", 15, "the SMGW link up again")
    link_back = time.monotonic() - t_up
    m.fault_end(f)
    back = await s.healthy_again(["smgw-link"], t_up, HEALTH_BACK_S)
    healthy = await all_healthy(s, t_up, "smgw cut")
    r = await retry_limit(s, r)
    await s.until_backend_connected(15)
    upstream_back = time.monotonic() - t_up
    await s.plug_when_idle("ocpp201")
    within = assert_no_violations(s, t0, "smgw")
    report("smgw cut", "SMGW simulator killed (HAN TLS and both CLS channels cut); a car unplugged at an OCPP "
                       "wallbox and an operator limit of 14800 W sent meanwhile; SMGW started again", {
        "failsafe limit on the bus after": f"{t_failsafe:.1f} s (link_loss_grace_s "
                                           f"{s.plan.tuning.link_loss_grace_s:g} s)",
        "link states seen": sorted(set(link_states), key=link_states.index),
        "link up again after the restore": f"{link_back:.2f} s",
        "smgw-link health online after the restore": f"{back.get('smgw-link', float('nan')):.2f} s",
        "every upstream charge point connected again after": f"{upstream_back:.2f} s",
        "every service online (health) after the restore": f"{healthy:.2f} s",
        "limit": limit_figures(r, "smgw cut"),
        "breaches within the grace": within,
    })
    assert "smgw-link" in back


async def test_wallbox_off_the_network(system: System) -> None:
    s, m = system, system.monitor
    wb = s.plan.wallbox("webasto")  # has a communication watchdog (failsafe current = its safe current)
    await steady(s)
    t0 = time.monotonic()
    f = m.fault_begin("webasto off the network", lenient=False)
    s.network(wb.id, False)
    r = await s.operator_limit(13500)
    r = await s.limit_applied(r, 10)
    await m.until(lambda: not m.status[wb.id][1].get("online"), 10, "the wallbox reported offline")
    t_offline = time.monotonic() - t0
    await m.until(lambda: float(m.draws[wb.id].get("limit_a") or 0) <= wb.safe_a + 0.01, 15,
                  "the wallbox at its failsafe (safe) current")
    t_safe = time.monotonic() - t0
    alloc = {e["evse_id"]: (e["current_a"], e["bound_by"]) for e in (m.allocation or (0, {}))[1].get("evses", [])}
    t_up = time.monotonic()
    s.network(wb.id, True)
    m.fault_end(f)
    healthy = await all_healthy(s, t_up, "wallbox offline")
    await m.until(lambda: m.status[wb.id][0] > t_up and m.status[wb.id][1].get("online"), HEALTH_BACK_S,
                  "the wallbox online again")
    online_again = time.monotonic() - t_up
    within = assert_no_violations(s, t0, "wallbox offline")
    report("wallbox offline", f"{wb.id} (Modbus TCP) off the network: port closed; operator limit 13500 W meanwhile",
           {"reported offline after": f"{t_offline:.1f} s",
            "at its safe current (own watchdog) after": f"{t_safe:.1f} s",
            "allocation while it was unreachable": alloc,
            "limit": limit_figures(r, "wallbox offline"),
            "online again after the network came back": f"{online_again:.2f} s",
            "every service online (health) after the network came back": f"{healthy:.2f} s",
            "breaches within the grace": within})


async def test_grid_meter_silent(system: System) -> None:
    s, m = system, system.monitor
    await steady(s)
    t0 = time.monotonic()
    f = m.fault_begin("grid meter silent", lenient=False)
    s.network("grid-meter", False)
    r = await s.operator_limit(14300)
    r = await s.limit_applied(r, 10)

    def stale() -> bool:
        return bool(m.allocation and m.allocation[0] > t0 and m.allocation[1].get("limits", {}).get("stale_meters"))

    await m.until(stale, s.plan.tuning.meter_timeout_s + 8, "the controller treating the grid meter as stale")
    t_stale = time.monotonic() - t0
    ev_w = m.all_ev_w()
    t_up = time.monotonic()
    s.network("grid-meter", True)
    m.fault_end(f)
    healthy = await all_healthy(s, t_up, "meter silent")
    await m.until(lambda: m.readings["grid-meter"][0] > t_up and m.readings["grid-meter"][1].get("online"),
                  HEALTH_BACK_S, "grid meter readings again")
    back = time.monotonic() - t_up
    within = assert_no_violations(s, t0, "meter silent")
    report("meter silent", "grid meter (SDM630 over Modbus TCP) off the network; operator limit 14300 W meanwhile", {
        "controller on stale-meter rules after": f"{t_stale:.1f} s (meter_timeout_s "
                                                 f"{s.plan.tuning.meter_timeout_s:g} s)",
        "all cars drew then": f"{ev_w:.0f} W",
        "limit": limit_figures(r, "meter silent"),
        "readings again after": f"{back:.2f} s",
        "every service online (health) after the meter came back": f"{healthy:.2f} s",
        "breaches within the grace": within,
    })


async def test_sessions_reach_the_backend_exactly_once(system: System) -> None:
    s, m = system, system.monitor
    for w in s.plan.wallboxes:
        s.unplug(w.id)
    await m.until(lambda: all(ss[-1].stop_wh is not None for ss in m.sessions.values()), 10, "cars unplugged")

    async def all_stopped() -> dict[str, list[dict[str, Any]]]:
        out = {}
        for w in s.plan.wallboxes:
            out[w.id] = await s.transactions(w.id)
        return out

    deadline = time.monotonic() + 30
    while True:
        txs = await all_stopped()
        done = all(len(txs[e]) == len(m.sessions.get(e, [])) and all(t.get("stopped") for t in txs[e]) for e in txs)
        if done or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(0.5)  # energy registers are frozen now: the last draws are final
    rows = []
    problems = []
    for w in s.plan.wallboxes:
        sessions = m.sessions.get(w.id, [])
        backend = txs[w.id]
        if len(backend) != len(sessions):
            problems.append(f"{w.id}: {len(sessions)} sessions plugged, {len(backend)} at the backend: {backend}")
            continue
        integer = (w.upstream_version or "1.6") == "1.6"
        for sim, bk in zip(sessions, backend, strict=True):
            want_start = w.register(sim.plug_wh or 0.0)
            want_stop = w.register(sim.stop_wh or 0.0)
            # a float register (Alfen) sent as OCPP 1.6 integer Wh is rounded; everything else is exact
            # (0.0015: the simulator's draw reports energy with three decimals)
            tol = 0.5 if integer and w.kind == "modbus" and w.profile == "alfen-eve" else 0.0015
            exact_start = sim.start_clean or w.kind == "ocpp"  # an OCPP wallbox takes it itself at plug-in
            hi = want_start if exact_start else w.register(energy_at(sim, bk.get("started")))
            rows.append(f"{w.id} tx {bk['transaction_id']}: meterStart {bk['meter_start']} (register "
                        + (f"{want_start:.3f}" if exact_start else f"{want_start:.3f}..{hi:.3f}, car drew at once")
                        + f"), meterStop {bk['meter_stop']} (register {want_stop:.3f}), "
                        f"{len(bk['meter_values'])} meter values, {len(bk['messages'])} messages")
            if bk["problems"]:
                problems.append(f"{w.id}: backend found {bk['problems']}")
            ms = bk["meter_start"]
            if ms is None or not want_start - tol <= float(ms) <= hi + tol:
                problems.append(f"{w.id}: meterStart {ms} != register {want_start}" + ("" if exact_start else
                                                                                       f"..{hi}"))
            if bk["meter_stop"] is None or abs(float(bk["meter_stop"]) - want_stop) > tol:
                problems.append(f"{w.id}: meterStop {bk['meter_stop']} != register {want_stop}")
            for v in bk["meter_values"]:
                if not want_start - tol <= float(v) <= want_stop + tol:
                    problems.append(f"{w.id}: meter value {v} outside [{want_start}, {want_stop}]")
    violations = m.violations(0.0)
    report("sessions", "every car unplugged; the backend's record compared with the simulators' energy registers",
           {"sessions": rows, "whole-run violations": m.describe(violations)})
    assert not problems, "\n".join(problems)
    assert not violations, m.describe(violations)
