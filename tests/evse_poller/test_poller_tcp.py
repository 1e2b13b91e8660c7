"""The poller against the simulators over real Modbus TCP: every profile, setpoints, expiry,
watchdogs, implausible values, a device that disappears and comes back, backend commands."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

import pytest
from poller_support import EVSE_PROFILES, SHORT, eventually, polling, read_raw, setpoint, tcp_config

from chargegate import payloads as p
from evse_poller.poller import MemoryPublisher, Poller
from evse_poller.sim import Simulators
from evse_poller.sim.devices import SimSettings


class Rig:
    def __init__(self, sims: Simulators, poller: Poller, pub: MemoryPublisher, ports: dict[str, int]) -> None:
        self.sims, self.poller, self.pub, self.ports = sims, poller, pub, ports

    def status(self, evse_id: str) -> p.EvseStatus:
        return self.pub.statuses[evse_id]


@pytest.fixture(scope="module")
async def rig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    tmp = tmp_path_factory.mktemp("tcp")
    cfg, ports = tcp_config(tmp, watchdog_s=2.0)
    settings = {"alfen": SimSettings(safe_current_a=6.0, validity_s=2.0)}
    sims = Simulators(cfg, base_load_a=(2.0, 1.0, 0.5), settings=settings)
    async with polling(cfg, sims) as (_, poller, pub):
        assert poller.broken == {} and sims.skipped == {}
        yield Rig(sims, poller, pub, ports)


async def test_every_profile_reads_its_simulator(rig: Rig) -> None:
    for n in EVSE_PROFILES:
        rig.sims.plug(SHORT[n], phases=3, max_current_a=16)
    await rig.poller.poll_once()
    await rig.poller.poll_once()
    for n in EVSE_PROFILES:
        st = rig.status(SHORT[n])
        assert st.online, (n, st.reason)
        assert st.iec_state == p.IecState.C and st.state == p.EvseState.CHARGING, (n, st)
        # no setpoint yet: the safe current, flagged as fallback
        assert st.applied is not None and st.applied.fallback and st.applied.current_a <= 6.0, (n, st.applied)
        assert st.current_a == pytest.approx([st.applied.current_a] * 3, abs=0.01), n
        assert st.plausible, (n, st.flags)
        assert st.phases_in_use == 3
    assert rig.status("alfen").raw_state == "C2" and rig.status("heidelberg").raw_state == 7
    assert rig.status("abl").raw_state == 0xC2 and rig.status("charx").raw_state == "C2"
    assert rig.status("alfen").energy_wh is not None and rig.status("alfen").power_w == pytest.approx(3 * 6 * 230)


async def test_meters_see_base_load_and_cars_through_phase_rotation(rig: Rig) -> None:
    await rig.poller.poll_once()
    grid = rig.pub.readings["grid-meter"]
    garage = rig.pub.readings["garage-meter"]
    expected = rig.sims.grid_current_a()
    assert grid.online and grid.current_a == pytest.approx(expected, abs=0.05)
    # the garage meter (SunSpec model 203, found by walking the model chain) sees only the cars
    cars = [e - b for e, b in zip(expected, (2.0, 1.0, 0.5), strict=True)]
    assert garage.online and garage.current_a == pytest.approx(cars, abs=0.05)
    assert grid.voltage_v == [230.0] * 3 and grid.plausible
    # a 1-phase car on the CHARX (phase_rotation [2, 3, 1]) loads grid phase L2
    rig.sims.plug("charx", phases=1, max_current_a=16)
    before = rig.sims.grid_current_a()
    rig.sims.unplug("charx")
    after = rig.sims.grid_current_a()
    assert [round(b - a, 3) for b, a in zip(before, after, strict=True)] == [0.0, 6.0, 0.0]
    rig.sims.plug("charx", phases=3, max_current_a=16)


# What each device's vendor document says the limit register holds for 10 A (read back raw,
# independently of the profiles): (port key, table, address, count, unit, decode)
def _f32(words: list[int]) -> float:
    return struct.unpack(">f", struct.pack(">HH", *words))[0]


LIMIT_REGISTER = {
    "alfen": ("holding", 1210, 2, 1, _f32, 10.0),
    "heidelberg": ("holding", 261, 1, 1, lambda w: w[0], 100),  # 0.1 A
    "charx": ("holding", 1301, 1, 1, lambda w: w[0], 10),
    "webasto": ("holding", 5004, 1, 255, lambda w: w[0], 10),
    "abl": ("holding", 0x14, 1, 1, lambda w: w[0], 166),  # duty cycle 16.6 % = 9.96 A
}


async def test_setpoints_are_written_where_the_vendor_documents_them(rig: Rig) -> None:
    for n in EVSE_PROFILES:
        assert rig.poller.set_setpoint(setpoint(SHORT[n], 10.0))
    await asyncio.sleep(0.2)  # applied at once, not only at the next poll
    for key, (table, addr, count, unit, dec, want) in LIMIT_REGISTER.items():
        raw = await read_raw(rig.ports[key], table, addr, count, unit)
        assert dec(raw) == want, key
    await rig.poller.poll_once()
    for n in EVSE_PROFILES:
        st = rig.status(SHORT[n])
        assert st.applied is not None and not st.applied.fallback and st.applied.seq == 1
        want = 9.96 if n == "abl-emh" else 10.0
        assert st.applied.current_a == pytest.approx(want), n
        assert rig.sims.point(SHORT[n]).limit_a() == pytest.approx(want), n
        assert st.current_a == pytest.approx([want] * 3, abs=0.05), n  # the ABL measures in 0.1 A
    assert not rig.poller.set_setpoint(setpoint("not-ours", 10.0))


async def test_setpoint_expiry_applies_the_safe_current(rig: Rig) -> None:
    rig.poller.set_setpoint(setpoint("charx", 12.0, valid_s=0.4, seq=2))
    await rig.poller.poll_once()
    assert rig.status("charx").applied.current_a == 12.0
    await asyncio.sleep(0.5)
    await rig.poller.poll_once()
    st = rig.status("charx")
    assert st.applied.fallback and st.applied.current_a == 6.0
    assert rig.sims.point("charx").commanded_a == 6.0


async def test_watchdog_and_failsafe_are_programmed(rig: Rig) -> None:
    # Heidelberg: 257 watchdog in ms, 262 failsafe in 0.1 A; Webasto: 2002 timeout s, 2000 failsafe A
    assert await read_raw(rig.ports["heidelberg"], "holding", 257, 1, 1) == [2000]
    assert await read_raw(rig.ports["heidelberg"], "holding", 262, 1, 1) == [60]
    assert await read_raw(rig.ports["heidelberg"], "holding", 258, 1, 1) == [4]  # standby off
    # the Webasto accepts 6..120 s: the poller's 2 s is raised to the device's minimum
    assert await read_raw(rig.ports["webasto"], "holding", 2002, 1, 255) == [6]
    assert await read_raw(rig.ports["webasto"], "holding", 2000, 1, 255) == [6]


async def test_devices_fall_back_by_themselves_when_the_poller_stops(rig: Rig) -> None:
    for n in EVSE_PROFILES:
        rig.poller.set_setpoint(setpoint(SHORT[n], 14.0, seq=10))
    await rig.poller.poll_once()
    for key in ("alfen", "heidelberg", "webasto"):
        assert rig.sims.point(key).limit_a() == 14.0
    # the poller is silent now (nothing polls): after the watchdog time the boxes apply their failsafe
    await asyncio.sleep(2.6)
    for key in ("alfen", "heidelberg"):  # 2 s watchdog / validity time
        cp = rig.sims.point(key)
        assert cp.watchdog_expired(), key
        assert cp.limit_a() == 6.0, key
        assert cp.draw() == [6.0, 6.0, 6.0], key
    assert rig.sims.point("webasto").limit_a() == 14.0  # its minimum timeout is 6 s
    assert rig.sims.point("charx").limit_a() == 14.0  # no watchdog: keeps the last value
    await eventually(lambda: rig.sims.point("webasto").watchdog_expired(), within_s=6)
    assert rig.sims.point("webasto").draw() == [6.0, 6.0, 6.0]
    # polling again restores the setpoint
    await rig.poller.poll_once()
    await rig.poller.poll_once()
    for key in ("alfen", "heidelberg", "webasto"):
        assert rig.sims.point(key).limit_a() == 14.0, key


async def test_implausible_values_are_flagged_and_not_trusted(rig: Rig) -> None:
    await rig.poller.poll_once()
    good = rig.status("alfen")
    fields = rig.sims.evses["alfen"].regmap.fields["holding"]
    orig_current, orig_energy, orig_state = fields[322].get, fields[374].get, fields[1201].get
    try:
        fields[322].get = lambda: 250.0  # 250 A on L2
        await rig.poller.poll_once()
        st = rig.status("alfen")
        assert not st.plausible and "current_l2_out_of_range" in st.flags
        assert st.current_a == good.current_a  # the last trusted values
        fields[322].get = orig_current
        fields[374].get = lambda: 1.0  # energy register runs backwards
        await rig.poller.poll_once()
        st = rig.status("alfen")
        assert "energy_backwards" in st.flags and st.energy_wh is None and not st.plausible
        fields[374].get = orig_energy
        fields[1201].get = lambda: "X7"  # a state the profile does not know
        await rig.poller.poll_once()
        st = rig.status("alfen")
        assert "unknown_state" in st.flags and st.state == p.EvseState.FAULTED and st.raw_state == "X7"
        fields[322].get = lambda: float("nan")  # NaN: the register is unavailable
        fields[1201].get = orig_state
        await rig.poller.poll_once()
        assert rig.status("alfen").online
    finally:
        fields[322].get, fields[374].get, fields[1201].get = orig_current, orig_energy, orig_state
    await rig.poller.poll_once()
    assert rig.status("alfen").plausible


async def test_device_disappears_and_comes_back(rig: Rig) -> None:
    dev = rig.poller.evses["webasto"]
    events = rig.poller.counters["evse_offline_events"]
    await rig.sims.endpoint_of("webasto").stop()
    for _ in range(2):
        await rig.poller.poll_once()
        assert rig.status("webasto").online  # not yet: a single failure is not an outage
    for _ in range(3):
        await rig.poller.poll_once()
    st = rig.status("webasto")
    assert not st.online and st.state == p.EvseState.OFFLINE and st.reason
    assert st.applied is not None  # what it was last allowed, for the controller's worst case
    assert rig.poller.counters["evse_offline_events"] == events + 1  # logged and counted once
    # the others carry on
    assert rig.status("alfen").online and rig.pub.readings["grid-meter"].online
    await rig.sims.endpoint_of("webasto").start()

    async def back() -> bool:
        await rig.poller.poll_evse(dev)
        return rig.status("webasto").online

    await eventually(back, within_s=8, interval=0.2)
    assert rig.status("webasto").state == p.EvseState.CHARGING
    # re-initialised after the outage: watchdog programmed again, setpoint rewritten
    assert await read_raw(rig.ports["webasto"], "holding", 2002, 1, 255) == [6]


async def test_backend_commands(rig: Rig) -> None:
    rig.poller.set_setpoint(setpoint("heidelberg", 10.0, seq=20))
    res = await rig.poller.command(p.EvseCommand(evse_id="heidelberg", action="stop", request_id="r1"))
    assert res is not None and res.accepted, res
    assert rig.sims.point("heidelberg").commanded_a == 0.0
    assert rig.status("heidelberg").state == p.EvseState.SUSPENDED
    res = await rig.poller.command(p.EvseCommand(evse_id="heidelberg", action="start", request_id="r2"))
    assert res.accepted and rig.sims.point("heidelberg").commanded_a == 10.0
    res = await rig.poller.command(p.EvseCommand(evse_id="heidelberg", action="disable", request_id="r3"))
    assert res.accepted
    assert await read_raw(rig.ports["heidelberg"], "holding", 259, 1, 1) == [0]  # remote lock
    assert rig.status("heidelberg").state == p.EvseState.UNAVAILABLE
    res = await rig.poller.command(p.EvseCommand(evse_id="heidelberg", action="start", request_id="r4"))
    assert not res.accepted and "disabled" in (res.detail or "")
    res = await rig.poller.command(p.EvseCommand(evse_id="heidelberg", action="enable", request_id="r5"))
    assert res.accepted and await read_raw(rig.ports["heidelberg"], "holding", 259, 1, 1) == [1]
    assert rig.status("heidelberg").state == p.EvseState.CHARGING
    # the ABL pauses with a 100 % duty cycle
    await rig.poller.command(p.EvseCommand(evse_id="abl", action="stop", request_id="r6"))
    assert await read_raw(rig.ports["abl"], "holding", 0x14, 1, 1) == [1000]
    await rig.poller.command(p.EvseCommand(evse_id="abl", action="start", request_id="r7"))
    assert [r.request_id for r in rig.pub.results] == ["r1", "r2", "r3", "r4", "r5", "r6", "r7"]
    assert rig.poller.command.__self__ is rig.poller
    # remote stop / availability survive a restart
    assert rig.poller._control_file.exists()


async def test_command_to_an_offline_device_is_rejected(rig: Rig) -> None:
    await rig.sims.endpoint_of("charx").stop()
    try:
        for _ in range(3):
            await rig.poller.poll_once()
        res = await rig.poller.command(p.EvseCommand(evse_id="charx", action="stop", request_id="x1"))
        assert res is not None and not res.accepted and "offline" in (res.detail or "")
    finally:
        await rig.sims.endpoint_of("charx").start()
    assert await rig.poller.command(p.EvseCommand(evse_id="ocpp-box", action="stop", request_id="x2")) is None


async def test_phase_switching_on_the_alfen(rig: Rig) -> None:
    # alfen has phase_switching in the test configuration; register 1215: 1 or 3 phases
    rig.poller.set_setpoint(setpoint("alfen", 10.0, seq=30, phases=1))
    await rig.poller.poll_once()
    await rig.poller.poll_once()
    assert await read_raw(rig.ports["alfen"], "holding", 1215, 1, 1) == [1]
    st = rig.status("alfen")
    assert st.applied.phases == 1 and st.phases_in_use == 1 and st.current_a == [10.0, 0.0, 0.0]
    rig.poller.set_setpoint(setpoint("alfen", 10.0, seq=31, phases=3))
    await rig.poller.poll_once()
    assert await read_raw(rig.ports["alfen"], "holding", 1215, 1, 1) == [3]
    # the CHARX cannot switch: a 1-phase setpoint keeps its 3 phases at the per-phase limit
    rig.poller.set_setpoint(setpoint("charx", 10.0, seq=32, phases=1))
    await rig.poller.poll_once()
    assert rig.status("charx").applied.phases == 3
