"""The pure per-device logic: state mapping, plausibility, the setpoint decision (properties)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from chargegate import payloads as p
from chargegate.config import Evse
from evse_poller import logic
from evse_poller.profile import load_profile
from evse_poller.registers import encode_value, extract, plan_reads

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
ALFEN = load_profile("alfen-eve")
HEIDELBERG = load_profile("heidelberg-energy-control")
ABL = load_profile("abl-emh")
LIMITS = logic.Limits(80.0, 1000.0)


def evse(**kw) -> Evse:
    base = {"id": "wb1", "circuit": "grid", "modbus": {"profile": "alfen-eve", "host": "127.0.0.1"}}
    return Evse.model_validate({**base, **kw})


def setpoint(current: float, valid_s: float = 10, phases: int = 3, seq: int = 1) -> p.Setpoint:
    return p.Setpoint(evse_id="wb1", current_a=current, phases=phases, valid_until=NOW + timedelta(seconds=valid_s),
                      seq=seq)


# -- setpoint decision -------------------------------------------------------------------------

currents = st.floats(min_value=0, max_value=1000, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(sp_a=currents, valid_s=st.floats(-100, 100), max_a=st.floats(6, 80), min_a=st.floats(0, 6),
       safe=st.floats(0, 80), enabled=st.booleans(), paused=st.booleans(), has_sp=st.booleans(),
       profile=st.sampled_from([ALFEN, HEIDELBERG, ABL]))
def test_target_never_exceeds_any_limit(sp_a, valid_s, max_a, min_a, safe, enabled, paused, has_sp, profile):
    assume(safe <= max_a)
    e = evse(max_current_a=max_a, min_current_a=min_a, safe_current_a=safe)
    sp = setpoint(sp_a, valid_s) if has_sp else None
    cc = profile.current
    t = logic.decide_target(sp, NOW, e, logic.Control(enabled, paused), cc, can_switch_phases=False)
    cap = min(max_a, cc.max_a)
    floor = max(min_a, cc.min_a)
    assert 0 <= t.current_a <= cap
    assert t.current_a == 0 or t.current_a >= floor
    if not enabled or paused:
        assert t.current_a == 0 and not t.fallback
    elif sp is None or sp.expired(NOW):
        assert t.fallback and t.current_a <= safe
    else:
        assert not t.fallback and t.current_a <= sp_a and t.seq == 1
    # what is written is never above the decision (integer registers round down)
    words, applied = logic.current_words(profile, t.current_a)
    assert applied <= t.current_a + 1e-9
    assert all(0 <= w <= 0xFFFF for w in words)


def test_expiry_gives_safe_current_and_reductions_are_exact():
    e = evse(safe_current_a=6, max_current_a=16)
    cc = ALFEN.current
    t = logic.decide_target(setpoint(10, valid_s=-1), NOW, e, logic.Control(), cc, can_switch_phases=False)
    assert (t.current_a, t.fallback, t.reason) == (6, True, "setpoint expired")
    t = logic.decide_target(setpoint(10), NOW, e, logic.Control(), cc, can_switch_phases=False)
    assert (t.current_a, t.fallback) == (10, False)
    t = logic.decide_target(setpoint(5), NOW, e, logic.Control(), cc, can_switch_phases=False)
    assert t.current_a == 0 and "below minimum" in t.reason
    t = logic.decide_target(setpoint(40), NOW, e, logic.Control(), cc, can_switch_phases=False)
    assert t.current_a == 16
    off = evse(safe_current_a=0)
    t = logic.decide_target(None, NOW, off, logic.Control(), cc, can_switch_phases=False)
    assert t.current_a == 0 and t.fallback


def test_phase_switching_only_where_possible():
    e = evse(phase_switching=True)
    t = logic.decide_target(setpoint(10, phases=1), NOW, e, logic.Control(), ALFEN.current, can_switch_phases=True)
    assert t.phases == 1
    t = logic.decide_target(setpoint(10, phases=1), NOW, evse(), logic.Control(), ALFEN.current,
                            can_switch_phases=False)
    assert t.phases == 3


def test_current_words_per_device():
    assert logic.current_words(ALFEN, 16.0) == (encode_value(ALFEN, ALFEN.registers["max_current"], 16.0), 16.0)
    assert logic.current_words(HEIDELBERG, 16.0) == ([160], 16.0)
    assert logic.current_words(HEIDELBERG, 6.55) == ([65], 6.5)
    assert logic.current_words(HEIDELBERG, 0) == ([0], 0.0)
    words, applied = logic.current_words(ABL, 16.0)
    assert words == [266] and abs(applied - 15.96) < 1e-9  # duty cycle 26.6 %, never above 16 A
    assert logic.current_words(ABL, 0) == ([1000], 0.0)  # 100 % duty cycle: no charging


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=4), st.one_of(st.none(), st.lists(
    st.integers(0, 0xFFFF), min_size=1, max_size=4)), st.one_of(st.none(), st.floats(0, 100)), st.floats(0, 100),
    st.one_of(st.none(), st.floats(0.1, 60)))
def test_needs_write(words, last, last_at, now, refresh):
    w = logic.needs_write(words, last, last_at, now, refresh)
    if last is None or last_at is None or words != last:
        assert w
    else:
        assert w == (refresh is not None and now - last_at >= refresh)


# -- state and plausibility --------------------------------------------------------------------

def test_state_mapping():
    assert logic.map_state(ALFEN, "C2") == logic.StateInfo(p.IecState.C, None, True)
    assert not logic.map_state(ALFEN, "X9").known
    info = logic.map_state(HEIDELBERG, 10)
    assert info.iec == p.IecState.F and info.derived == p.EvseState.UNAVAILABLE
    assert logic.derive_state(logic.map_state(ALFEN, "B2"), offered_a=0, enabled=True) == p.EvseState.SUSPENDED
    assert logic.derive_state(logic.map_state(ALFEN, "B2"), offered_a=6, enabled=True) == p.EvseState.PREPARING
    assert logic.derive_state(logic.map_state(ALFEN, "A"), offered_a=6, enabled=False) == p.EvseState.UNAVAILABLE
    assert logic.derive_state(logic.map_state(ALFEN, "F"), offered_a=6, enabled=True) == p.EvseState.FAULTED
    assert logic.derive_state(logic.map_state(ALFEN, "zz"), offered_a=6, enabled=True) == p.EvseState.FAULTED


def _values(state="C2", i=(10.0, 10.0, 10.0), power=6900.0, energy=1000.0):
    return {"state": state, "current_l1": i[0], "current_l2": i[1], "current_l3": i[2], "power": power,
            "energy": energy}


def _eval(values, mem=None, now=100.0, offered=16.0):
    return logic.evaluate_evse(ALFEN, values, mem or logic.EvseMemory(), now=now, offered_a=offered,
                               offered_phases=3, enabled=True, limits=LIMITS)


def test_plausible_reading():
    r, mem = _eval(_values())
    assert r.plausible and r.flags == [] and r.current_a == [10, 10, 10] and r.phases_in_use == 3
    assert r.energy_wh == 1000 and mem.energy_wh == 1000 and r.state == p.EvseState.CHARGING


def test_current_above_80_is_not_trusted():
    _, mem = _eval(_values())
    r2, _ = _eval(_values(i=(10.0, 200.0, 10.0)), mem, now=101)
    assert not r2.plausible and "current_l2_out_of_range" in r2.flags
    assert r2.current_a == [10, 10, 10]  # the last trusted currents, not the garbage
    r3, _ = _eval(_values(i=(10.0, 200.0, 10.0)))  # nothing trusted yet: assume what was allowed
    assert r3.current_a == [16, 16, 16]


def test_negative_power_and_unknown_state():
    r, _ = _eval(_values(power=-500.0))
    assert not r.plausible and "power_negative" in r.flags and r.power_w is None
    r, _ = _eval(_values(state="Q7"))
    assert not r.plausible and "unknown_state" in r.flags and r.state == p.EvseState.FAULTED
    assert r.reason == "unknown state code 'Q7'"


def test_energy_running_backwards_is_flagged_then_accepted_as_reset():
    r, mem = _eval(_values(energy=5000.0))
    r, mem = _eval(_values(energy=4000.0), mem, now=101)
    assert r.energy_wh is None and "energy_backwards" in r.flags and not r.plausible
    r, mem = _eval(_values(energy=4000.5), mem, now=102)
    assert r.energy_wh is None
    r, mem = _eval(_values(energy=4001.0), mem, now=103)
    assert "energy_reset" in r.flags and r.energy_wh == 4001.0 and mem.energy_wh == 4001.0
    r, mem = _eval(_values(energy=4002.0), mem, now=104)
    assert r.plausible and r.energy_wh == 4002.0


def test_energy_jump_is_not_trusted():
    r, mem = _eval(_values(energy=1000.0), now=100)
    r, mem2 = _eval(_values(energy=900_000.0), mem, now=101)
    assert "energy_jump" in r.flags and r.energy_wh is None and mem2.energy_wh == 1000.0


vals = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**63), 2**64),
                 st.text(max_size=5))


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({"state": vals, "current_l1": vals, "current_l2": vals, "current_l3": vals,
                              "power": vals, "energy": vals}),
       st.floats(0, 80), st.booleans(), st.one_of(st.none(), st.floats(0, 1e9)))
def test_any_register_values_give_a_valid_status(values, offered, enabled, last_energy):
    mem = logic.EvseMemory(energy_wh=last_energy, energy_at=0.0 if last_energy is not None else None)
    r, _ = logic.evaluate_evse(ALFEN, values, mem, now=1.0, offered_a=offered, offered_phases=3,
                               enabled=enabled, limits=LIMITS)
    status = p.EvseStatus(evse_id="wb1", online=True, state=r.state, iec_state=r.iec, raw_state=r.raw_state,
                          phases_in_use=r.phases_in_use, current_a=r.current_a, power_w=r.power_w,
                          energy_wh=r.energy_wh, plausible=r.plausible, flags=r.flags)
    assert all(0 <= c <= LIMITS.max_current_a for c in status.current_a)
    if r.plausible:
        assert not any(f.endswith(("out_of_range", "backwards", "negative", "jump")) for f in r.flags)
    if r.energy_wh is not None and last_energy is not None and "energy_reset" not in r.flags:
        assert r.energy_wh >= last_energy - 0.5


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries({k: vals for k in ("current_l1", "current_l2", "current_l3", "voltage_l1",
                                                "voltage_l2", "voltage_l3", "power", "power_l1", "power_l2",
                                                "power_l3", "energy_import", "energy_export")}), st.booleans())
def test_any_meter_values_give_a_valid_reading(values, invert):
    mv, _ = logic.evaluate_meter(values, logic.MeterMemory(energy_import_wh=10.0), invert=invert, limits=LIMITS)
    p.MeterReading(meter_id="m", current_a=mv.current_a, voltage_v=mv.voltage_v, power_w=mv.power_w,
                   power_phase_w=mv.power_phase_w, energy_import_wh=mv.energy_import_wh,
                   energy_export_wh=mv.energy_export_wh, plausible=mv.plausible, flags=mv.flags)
    for x in (mv.current_a or []):
        assert math.isfinite(x) and abs(x) <= LIMITS.meter_max_current_a


def test_meter_current_sign_follows_phase_power_and_invert():
    values = {"current_l1": 10.0, "current_l2": 5.0, "current_l3": 1.0, "power_l1": 2300.0, "power_l2": -1150.0,
              "power_l3": 230.0, "energy_import": 100.0, "energy_export": 50.0}
    mv, _ = logic.evaluate_meter(values, logic.MeterMemory(), invert=False, limits=LIMITS)
    assert mv.current_a == [10.0, -5.0, 1.0] and mv.power_w == 1380.0
    mv, _ = logic.evaluate_meter(values, logic.MeterMemory(), invert=True, limits=LIMITS)
    assert mv.current_a == [-10.0, 5.0, -1.0] and mv.energy_import_wh == 50.0 and mv.energy_export_wh == 100.0


@settings(max_examples=200, deadline=None)
@given(st.permutations([1, 2, 3]), st.lists(st.floats(0, 80), min_size=3, max_size=3), st.integers(1, 3))
def test_grid_mapping_preserves_every_ampere(rotation, draws, n):
    rot = list(rotation)[:n]
    out = logic.grid_currents(draws, rot)
    assert math.isclose(sum(out), sum(draws[:n]), abs_tol=1e-9)
    for i, g in enumerate(rot):
        assert out[g - 1] == draws[i]


def test_extract_scales_and_unavailable_markers():
    prof = load_profile("sunspec-meter")
    names = ["current_l1", "current_l2", "current_l3", "a_sf", "power", "w_sf"]
    blocks = plan_reads(prof, names, offset=100)
    words = {}
    for b in blocks:
        data = [0] * b.count
        for n in b.names:
            r = prof.registers[n]
            i = r.address + 100 - b.address
            data[i] = {"current_l1": 1234, "current_l2": 0x8000, "current_l3": 5, "a_sf": 0xFFFE, "power": 2300,
                       "w_sf": 0}[n]
        words[(b.table, b.address)] = data
    values, errors = extract(prof, words, blocks, offset=100)
    assert errors == []
    assert values["current_l1"] == 12.34 and values["current_l2"] is None and values["current_l3"] == 0.05
    assert values["power"] == 2300
