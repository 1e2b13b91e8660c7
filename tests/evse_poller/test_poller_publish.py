"""When a poll's EVSE status goes on the bus: whenever it says something new, else as a refresh that keeps
it fresh for the load controller (properties of the pure rules, then the poller over real Modbus TCP)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from poller_support import eventually, setpoint

from chargegate import config as cfgmod
from chargegate import payloads as p
from chargegate.broker import free_port
from evse_poller import logic
from evse_poller.poller import MemoryPublisher, Poller
from evse_poller.sim import Simulators

D_A = logic.CURRENT_DEADBAND_A
D_W = logic.POWER_DEADBAND_W


def base(**kw: object) -> p.EvseStatus:
    d: dict[str, object] = {
        "evse_id": "wb1", "online": True, "state": "charging", "iec_state": "C", "raw_state": "C2",
        "phases_in_use": 3, "current_a": [10.0, 10.0, 10.0], "power_w": 6900.0, "energy_wh": 1000.0,
        "applied": {"current_a": 10.0, "phases": 3, "seq": 4, "source": "load-controller"}, "plausible": True,
        "flags": [], "source": "evse-poller",
        "session": {"id": "s1", "started": "2026-01-01T12:00:00Z", "energy_start_wh": 900.0, "energy_wh": 100.0}}
    d.update(kw)
    return p.EvseStatus.model_validate(d)


noise = st.floats(-0.99, 0.99)  # of the dead band


@settings(max_examples=300, deadline=None)
@given(di=st.lists(noise, min_size=3, max_size=3), dw=noise, de=st.floats(0, 1e6), dse=st.floats(0, 1e4))
def test_noise_and_the_energy_register_alone_are_no_change(di: list[float], dw: float, de: float, dse: float) -> None:
    old = base()
    new = base(current_a=[10.0 + x * D_A for x in di], power_w=6900.0 + dw * D_W, energy_wh=1000.0 + de,
               session={**old.session.model_dump(), "energy_wh": dse})  # type: ignore[union-attr]
    assert not logic.status_changed(old, new)


CHANGES: list[dict[str, object]] = [
    {"online": False, "state": "offline"}, {"state": "suspended"}, {"iec_state": "B"}, {"raw_state": "C1"},
    {"raw_state": 7}, {"phases_in_use": 1}, {"plausible": False}, {"flags": ["energy_backwards"]},
    {"reason": "unknown state code 99"}, {"applied": {"current_a": 9.9, "phases": 3, "seq": 4}},
    {"applied": {"current_a": 10.0, "phases": 3, "seq": 5, "source": "load-controller"}},
    {"applied": {"current_a": 10.0, "phases": 3, "seq": 4, "source": "load-controller", "fallback": True}},
    {"applied": None}, {"session": None}, {"energy_wh": None}, {"power_w": None},
    {"session": {"id": "s2", "started": "2026-01-01T12:00:00Z", "energy_start_wh": 900.0}},
    {"session": {"id": "s1", "started": "2026-01-01T12:00:01Z", "energy_start_wh": 900.0}},
    {"session": {"id": "s1", "started": "2026-01-01T12:00:00Z", "energy_start_wh": 901.0}},
]


@pytest.mark.parametrize("change", CHANGES)
def test_every_state_field_is_a_change(change: dict[str, object]) -> None:
    old, new = base(), base(**change)
    assert logic.status_changed(old, new) and logic.status_changed(new, old)


@settings(max_examples=300, deadline=None)
@given(phase=st.integers(0, 2), delta=st.floats(D_A * 1.01, 80).flatmap(lambda x: st.sampled_from([x, -x])),
       dw=st.floats(D_W * 1.01, 50_000))
def test_a_current_or_power_step_is_a_change(phase: int, delta: float, dw: float) -> None:
    cur = [10.0, 10.0, 10.0]
    cur[phase] = max(0.0, cur[phase] + delta)
    assert logic.status_changed(base(), base(current_a=cur))
    assert logic.status_changed(base(), base(power_w=6900.0 + dw))


@settings(max_examples=300, deadline=None)
@given(interval=st.sampled_from([0.2, 0.5, 1.0, 2.0, 5.0]), timeout=st.floats(0.1, 5), retries=st.integers(0, 4),
       failures=st.integers(1, 10), evse_timeout=st.floats(1, 600))
def test_refresh_leaves_room_for_offline_detection(interval: float, timeout: float, retries: int, failures: int,
                                                   evse_timeout: float) -> None:
    r = logic.status_refresh_s(interval_s=interval, timeout_s=timeout, retries=retries,
                               offline_after_failures=failures, evse_timeout_s=evse_timeout)
    assert interval <= r <= max(interval, logic.MAX_REFRESH_S)
    if r > interval:  # not every poll: the refresh, failing polls until offline and a second stay within the timeout
        assert r + failures * max(interval, timeout * (retries + 1)) + 1.0 <= evse_timeout + 1e-9


@settings(max_examples=200, deadline=None)
@given(interval=st.sampled_from([0.2, 1.0, 2.0]), refresh_polls=st.integers(1, 12),
       polls=st.lists(st.tuples(st.floats(-0.05, 0.05), st.booleans(), st.integers(0, 3)), min_size=1, max_size=80))
def test_published_statuses_are_never_further_apart_than_the_refresh(
        interval: float, refresh_polls: int, polls: list[tuple[float, bool, int]]) -> None:
    """Polls at the interval (a few % early or late); the device sometimes fails (no status); statuses change
    now and then. Every change goes out at once, and while the device answers no two published statuses are
    further apart than the refresh (with every poll published when the refresh is the interval)."""
    refresh = refresh_polls * interval
    last: p.EvseStatus | None = None
    last_at: float | None = None
    gaps_ok = True
    for k, (jitter, answered, state) in enumerate(polls):
        now = k * interval + jitter * interval
        if not answered:
            continue
        new = base(raw_state=f"C{state}")
        changed = last is not None and logic.status_changed(last, new)
        pub = logic.should_publish(last, new, last_at=last_at, now=now, refresh_s=refresh, interval_s=interval)
        if last is None or changed or refresh_polls == 1:
            assert pub
        if pub:
            if last_at is not None and answered_since(polls, last_at, now, interval):
                gaps_ok = gaps_ok and now - last_at <= refresh + 0.1 * interval + 1e-9
            last, last_at = new, now
    assert gaps_ok


def answered_since(polls: list[tuple[float, bool, int]], since: float, now: float, interval: float) -> bool:
    """Every poll between two publishes was answered (failures may delay a refresh)."""
    return all(ok for k, (_j, ok, _s) in enumerate(polls) if since < k * interval < now - interval / 2)


# -- the poller over Modbus TCP ----------------------------------------------------------------------------

class Recorder(MemoryPublisher):
    """Keeps the order and time of everything published."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[float, str, object]] = []

    def evse_status(self, status: p.EvseStatus) -> None:
        super().evse_status(status)
        self.log.append((time.monotonic(), "status", status))

    def command_result(self, result: p.EvseCommandResult) -> None:
        super().command_result(result)
        self.log.append((time.monotonic(), "result", result))

    def of(self, evse: str) -> list[tuple[float, p.EvseStatus]]:
        return [(t, s) for t, k, s in self.log if k == "status" and isinstance(s, p.EvseStatus) and s.evse_id == evse]


INTERVAL = 0.2


@pytest.fixture(scope="module")
async def rig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Simulators, Poller, Recorder]]:
    tmp: Path = tmp_path_factory.mktemp("publish")
    port = free_port()
    (tmp / "c.yaml").write_text(f"""
site: {{name: publish-test}}
state_dir: {tmp / 'state'}
poller: {{poll_interval_s: {INTERVAL}, watchdog_timeout_s: 15}}
controller: {{evse_timeout_s: 3}}
circuits: [{{id: grid, fuse_a: 63}}]
evses:
  - {{id: alfen, circuit: grid, max_current_a: 16, safe_current_a: 6,
     modbus: {{profile: alfen-eve, host: 127.0.0.1, port: {port}, device_id: 1, timeout_s: 0.3, retries: 0}}}}
  - {{id: webasto, circuit: grid, max_current_a: 16, safe_current_a: 6,
     modbus: {{profile: webasto-next, host: 127.0.0.1, port: {port}, device_id: 7, timeout_s: 0.3, retries: 0}}}}
""")
    cfg = cfgmod.load(tmp / "c.yaml")
    sims = Simulators(cfg)
    await sims.start()
    pub = Recorder()
    poller = Poller(cfg, pub)
    task = asyncio.create_task(poller.run())
    try:
        yield sims, poller, pub
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await sims.stop()


async def test_refresh_period_follows_the_controller_timeout(rig: tuple[Simulators, Poller, Recorder]) -> None:
    _sims, poller, _pub = rig
    # evse_timeout_s 3 - 3 failures of max(0.2 s interval, 0.3 s timeout) - 1 s
    assert poller.status_refresh_s(poller.evses["alfen"]) == pytest.approx(1.1)


async def test_unchanged_status_is_refreshed_changes_go_out_at_once(rig: tuple[Simulators, Poller, Recorder]) -> None:
    sims, poller, pub = rig
    refresh = poller.status_refresh_s(poller.evses["alfen"])
    await eventually(lambda: pub.of("alfen") and pub.of("webasto"), 5, 0.02)
    polls0, n0 = poller.polls, len(pub.of("alfen"))
    await asyncio.sleep(3.0)  # no car: nothing changes
    seen = pub.of("alfen")[n0 - 1:]
    polls = (poller.polls - polls0) / 2
    assert polls >= 12  # about 15 polls of each EVSE
    assert 2 <= len(seen) - 1 <= 4  # about one refresh per 1.1 s, not one status per poll
    for (t0, s0), (t1, s1) in itertools.pairwise(seen):
        assert t1 - t0 <= refresh + 0.05
        assert (s1.ts - s0.ts).total_seconds() <= refresh + 0.05
        assert not logic.status_changed(s0, s1)
    assert poller.counters["statuses_unchanged"] > 0
    # a car arrives: the status saying so is published at the next poll, not at the next refresh
    n1 = len(pub.of("alfen"))
    t_plug = time.monotonic()
    sims.plug("alfen", phases=3, max_current_a=16)

    def plugged() -> list[float]:
        return [t for t, s in pub.of("alfen")[n1:] if s.iec_state in (p.IecState.B, p.IecState.C)]

    await eventually(plugged, 2, 0.02)
    t_seen = plugged()[0]
    assert t_seen - t_plug <= INTERVAL + 0.15
    # a new setpoint: the status with it applied follows at once
    n2 = len(pub.of("alfen"))
    t_sp = time.monotonic()
    poller.set_setpoint(setpoint("alfen", 10.0, seq=7))

    def applied7() -> list[float]:
        return [t for t, s in pub.of("alfen")[n2:] if s.applied is not None and s.applied.seq == 7]

    await eventually(applied7, 2, 0.02)
    t_seen = applied7()[0]
    assert t_seen - t_sp <= INTERVAL + 0.15
    # charging at a steady current: the energy register still goes out, with every refresh
    await eventually(lambda: pub.of("alfen")[-1][1].current_a[0] > 9.0, 2, 0.02)
    n3 = len(pub.of("alfen"))
    await asyncio.sleep(2.5)
    charging = pub.of("alfen")[n3:]
    assert 2 <= len(charging) <= 4
    energies = [s.energy_wh for _, s in charging]
    assert all(e is not None for e in energies) and energies == sorted(energies) and energies[-1] > energies[0]
    sims.unplug("alfen")
    await eventually(lambda: pub.of("alfen")[-1][1].iec_state == p.IecState.A, 2, 0.02)


async def test_command_publishes_the_new_state_before_the_result(rig: tuple[Simulators, Poller, Recorder]) -> None:
    sims, poller, pub = rig
    sims.plug("webasto", phases=3, max_current_a=16)
    poller.set_setpoint(setpoint("webasto", 12.0, seq=3))
    await eventually(lambda: pub.of("webasto")[-1][1].current_a[0] > 11.0, 3, 0.02)
    n = len(pub.log)
    res = await poller.command(p.EvseCommand(evse_id="webasto", action="stop", request_id="r1"))
    assert res is not None and res.accepted
    tail = [(k, s) for _, k, s in pub.log[n:]]
    kinds = [k for k, s in tail if k == "result" or getattr(s, "evse_id", "") == "webasto"]
    assert kinds.index("status") < kinds.index("result")
    st_before = next(s for k, s in tail if k == "status" and isinstance(s, p.EvseStatus) and s.evse_id == "webasto")
    assert st_before.applied is not None and st_before.applied.current_a == 0.0  # paused, with a fresh register
    assert (p.utcnow() - st_before.ts).total_seconds() < 1.0
    await poller.command(p.EvseCommand(evse_id="webasto", action="start", request_id="r2"))
    sims.unplug("webasto")


async def test_offline_status_goes_out_at_once_and_back_online(rig: tuple[Simulators, Poller, Recorder]) -> None:
    sims, _poller, pub = rig
    n = len(pub.of("webasto"))
    t_down = time.monotonic()
    await sims.set_network("webasto", False)
    try:
        await eventually(lambda: any(not s.online for _, s in pub.of("webasto")[n:]), 5, 0.02)
        t_off = next(t for t, s in pub.of("webasto")[n:] if not s.online)
        # three failed polls (0.3 s timeouts at worst), as when every poll was published
        assert t_off - t_down <= 3 * (INTERVAL + 0.3) + 0.3
        n_off = len(pub.of("webasto"))
        await asyncio.sleep(1.0)
        assert all(not s.online and s.reason for _, s in pub.of("webasto")[n_off - 1:])
    finally:
        await sims.set_network("webasto", True)
    await eventually(lambda: pub.of("webasto")[-1][1].online, 10, 0.02)
