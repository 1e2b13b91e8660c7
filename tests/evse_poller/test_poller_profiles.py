"""Profiles: every built-in profile loads, matches the vendor documents, and bad ones are refused
with errors that name the file, the path and the problem."""

from __future__ import annotations

import pytest

from evse_poller.codec import DType
from evse_poller.profile import PROFILE_DIR, ProfileError, available, load_profile, load_profile_file, parse_profile
from evse_poller.registers import plan_reads

PROFILES = ["abl-emh", "alfen-eve", "carlo-gavazzi-em24", "cfos-power-brain", "go-e-charger",
            "heidelberg-energy-control", "keba-p30", "mennekes-amtron-hcc3", "phoenix-charx",
            "sdm630", "sdm72d-m", "shelly-pro-3em", "sunspec-meter", "vestel-evc04", "webasto-next"]


def test_all_profiles_load_and_cite_their_source():
    assert available() == PROFILES
    for name in PROFILES:
        prof = load_profile(name)
        text = (PROFILE_DIR / f"{name}.yaml").read_text()
        assert text.startswith("# "), f"{name}: the source document must be cited in a comment at the top"
        assert prof.source
        # the read plan must be valid for every profile
        plan_reads(prof, list(prof.registers))


# Register facts typed in from the vendor documents, independently of the YAML files:
# (register name in the profile, table, protocol address, type, scale)
GOLDEN = {
    # Alfen "Modbus Slave TCP/IP for NG9xx" v2.3, 3.4: all holding registers, big endian
    "alfen-eve": [("max_current", "holding", 1210, DType.FLOAT32, 1.0),
                  ("state", "holding", 1201, DType.STRING, 1.0),
                  ("current_l1", "holding", 320, DType.FLOAT32, 1.0),
                  ("current_l3", "holding", 324, DType.FLOAT32, 1.0),
                  ("power", "holding", 344, DType.FLOAT32, 1.0),
                  ("energy", "holding", 374, DType.FLOAT64, 1.0),
                  ("applied_current", "holding", 1206, DType.FLOAT32, 1.0),
                  ("charge_phases", "holding", 1215, DType.UINT16, 1.0)],
    # Heidelberg EC register table 2021-02-22: input 5 state, 6-8 currents 0.1 A; holding 257/261/262
    "heidelberg-energy-control": [("state", "input", 5, DType.UINT16, 1.0),
                                  ("current_l1", "input", 6, DType.UINT16, 0.1),
                                  ("current_l3", "input", 8, DType.UINT16, 0.1),
                                  ("energy", "input", 17, DType.UINT32, 1.0),
                                  ("watchdog_timeout", "holding", 257, DType.UINT16, 0.001),
                                  ("remote_lock", "holding", 259, DType.UINT16, 1.0),
                                  ("max_current", "holding", 261, DType.UINT16, 0.1),
                                  ("failsafe_current", "holding", 262, DType.UINT16, 0.1)],
    # Phoenix CHARX SEC: charging point 1 = 1000 + offset; currents int32 mA, status 2 x ASCII
    "phoenix-charx": [("current_l1", "holding", 1238, DType.INT32, 0.001),
                      ("power", "holding", 1244, DType.INT32, 0.001),
                      ("energy", "holding", 1250, DType.INT64, 1.0),
                      ("state", "holding", 1299, DType.STRING, 1.0),
                      ("charging_release", "holding", 1300, DType.UINT16, 1.0),
                      ("max_current", "holding", 1301, DType.UINT16, 1.0)],
    # Webasto Next (OpenEMS, evcc, HA integration): every register a holding register (FC03)
    "webasto-next": [("state", "holding", 1000, DType.UINT16, 1.0),
                     ("current_l1", "holding", 1008, DType.UINT16, 0.001),
                     ("current_l2", "holding", 1010, DType.UINT16, 0.001),
                     ("power", "holding", 1020, DType.UINT32, 1.0),
                     ("energy", "holding", 1036, DType.UINT32, 1.0),
                     ("failsafe_current", "holding", 2000, DType.UINT16, 1.0),
                     ("failsafe_timeout", "holding", 2002, DType.UINT16, 1.0),
                     ("max_current", "holding", 5004, DType.UINT16, 1.0),
                     ("life_bit", "holding", 6000, DType.UINT16, 1.0)],
    # ABL eMH: 0x0014 Icmax duty cycle (A / 0.06), 0x002E status report, 0x0005 modify state
    "abl-emh": [("icmax", "holding", 0x14, DType.UINT16, 0.06),
                ("state", "holding", 0x2E, DType.UINT16, 1.0),
                ("current_l1", "holding", 0x32, DType.UINT16, 0.1),  # evcc abl.go: L3 L2 L1
                ("current_l3", "holding", 0x30, DType.UINT16, 0.1),
                ("modify_state", "holding", 0x05, DType.UINT16, 1.0)],
    # Eastron SDM630: input registers, float32; 0x0006 I1, 0x0034 total power, 0x0048 import kWh
    "sdm630": [("voltage_l1", "input", 0x00, DType.FLOAT32, 1.0),
               ("current_l1", "input", 0x06, DType.FLOAT32, 1.0),
               ("power_l1", "input", 0x0C, DType.FLOAT32, 1.0),
               ("power", "input", 0x34, DType.FLOAT32, 1.0),
               ("energy_import", "input", 0x48, DType.FLOAT32, 1000.0),
               ("energy_export", "input", 0x4A, DType.FLOAT32, 1000.0)],
    # SunSpec model 203: offsets from the model ID register
    "sunspec-meter": [("current_l1", "holding", 3, DType.INT16, 1.0), ("a_sf", "holding", 6, DType.SUNSSF, 1.0),
                      ("power", "holding", 18, DType.INT16, 1.0), ("w_sf", "holding", 22, DType.SUNSSF, 1.0),
                      ("energy_export", "holding", 38, DType.ACC32, 1.0),
                      ("energy_import", "holding", 46, DType.ACC32, 1.0),
                      ("totwh_sf", "holding", 54, DType.SUNSSF, 1.0)],
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_profile_matches_vendor_document(name):
    prof = load_profile(name)
    for reg_name, table, address, dtype, scale in GOLDEN[name]:
        reg = prof.registers[reg_name]
        assert (reg.table, reg.address, reg.type, reg.scale) == (table, address, dtype, scale), reg_name


def test_transport_facts():
    assert load_profile("abl-emh").transport.type == "ascii"  # the eMH speaks Modbus ASCII
    assert (load_profile("abl-emh").transport.baudrate, load_profile("abl-emh").transport.parity) == (38400, "E")
    h = load_profile("heidelberg-energy-control").transport
    assert (h.type, h.baudrate, h.parity) == ("rtu", 19200, "E")
    assert load_profile("webasto-next").transport.device_id == 255
    assert load_profile("alfen-eve").transport.type == "tcp"
    assert load_profile("sunspec-meter").sunspec is not None
    assert load_profile("sunspec-meter").sunspec.model == 203


def test_state_maps():
    alfen = load_profile("alfen-eve").state
    assert alfen is not None and alfen.codes["C2"] == "C" and alfen.codes["B1"] == "B"
    heidelberg = load_profile("heidelberg-energy-control").state
    assert heidelberg is not None and heidelberg.codes["7"] == "C" and heidelberg.codes["2"] == "A"
    abl = load_profile("abl-emh").state
    assert abl is not None and abl.codes[str(0xC2)] == "C"


GOOD = {
    "name": "x", "kind": "evse", "vendor": "v", "model": "m", "source": "some vendor document",
    "transport": {"type": "tcp"},
    "registers": {"state": {"table": "input", "address": 1},
                  "max_current": {"table": "holding", "address": 2, "access": "rw"}},
    "state": {"register": "state", "codes": {1: "A"}},
    "current": {"register": "max_current"},
    "safe_current": {"min_a": 6, "max_a": 16, "zero_is_off": True, "outside": "the device refuses it"},
}


def _bad(**changes):
    data = {**GOOD, **changes}
    with pytest.raises(ProfileError) as e:
        parse_profile(data, "bad.yaml")
    return str(e.value)


def test_good_minimal_profile():
    assert parse_profile(GOOD, "good.yaml").name == "x"


def test_errors_name_file_path_and_problem():
    msg = _bad(registers={"state": {"table": "input", "address": 1, "type": "float"},
                          "max_current": {"table": "holding", "address": 2, "access": "rw"}})
    assert msg.startswith("bad.yaml: registers.state.type:")
    msg = _bad(current={"register": "nope"})
    assert "bad.yaml" in msg and "current.register: unknown register 'nope'" in msg
    msg = _bad(registers={"state": {"table": "input", "address": 1},
                          "max_current": {"table": "holding", "address": 2}})
    assert "read-only" in msg
    msg = _bad(registers={"state": {"table": "input", "address": 70000},
                          "max_current": {"table": "holding", "address": 2, "access": "rw"}})
    assert "registers.state.address" in msg
    msg = _bad(state={"register": "state", "codes": {1: "Z"}})
    assert "state.codes" in msg
    assert "unknown key" in _bad(colour="red")
    assert "safe_current: an EVSE profile declares" in _bad(safe_current=None)
    msg = _bad(registers={"state": {"table": "input", "address": 1, "type": "string"},
                          "max_current": {"table": "holding", "address": 2, "access": "rw"}})
    assert "count" in msg


def test_file_errors(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(ProfileError) as e:
        load_profile_file(p)
    assert "broken.yaml" in str(e.value) and "line" in str(e.value)
    p2 = tmp_path / "other.yaml"
    p2.write_text((PROFILE_DIR / "sdm630.yaml").read_text())
    with pytest.raises(ProfileError) as e:
        load_profile_file(p2)
    assert "must match the file name" in str(e.value)
    with pytest.raises(ProfileError) as e:
        load_profile("no-such-box")
    assert "available" in str(e.value)


def test_read_plan_merges_within_gap_only():
    prof = load_profile("alfen-eve")
    blocks = plan_reads(prof, ["current_l1", "current_l2", "energy", "state", "applied_current"])
    assert [(b.address, b.count) for b in blocks] == [(320, 4), (374, 4), (1201, 7)]  # gap 50 > max_gap 30
    blocks = plan_reads(prof, ["current_l1", "current_l2", "power", "energy", "state", "applied_current"])
    assert [(b.address, b.count) for b in blocks] == [(320, 58), (1201, 7)]
    charx = load_profile("phoenix-charx")
    blocks = plan_reads(charx, ["current_l1", "current_l3", "energy", "state", "max_current"])
    # max_gap 1: spans the documented 1300, never the undocumented 1246..1249
    assert [(b.address, b.count) for b in blocks] == [(1238, 2), (1242, 2), (1250, 4), (1299, 3)]


def test_poll_plans():
    """What one poll reads from each EVSE (every request counts: the poller's CPU goes mostly into requests)."""
    from evse_poller.device import logic_names

    def poll_plan(name: str) -> list[tuple[str, int, int]]:
        prof = load_profile(name)
        names = [n for n in logic_names(prof, "evse") if n in prof.registers]
        if prof.watchdog is not None and prof.watchdog.remaining_register is not None:
            names.append(prof.watchdog.remaining_register)
        return [(b.table, b.address, b.count) for b in plan_reads(prof, names)]

    assert poll_plan("alfen-eve") == [("holding", 320, 58), ("holding", 1201, 9)]
    assert poll_plan("heidelberg-energy-control") == [("input", 5, 14)]  # all documented, one request
    assert poll_plan("abl-emh") == [("holding", 0x2E, 5)]  # the documented 5-register status report
    # the Webasto refuses reads across undocumented registers (OpenEMS: "cannot read the gaps")
    assert poll_plan("webasto-next") == [("holding", 1000, 1), ("holding", 1008, 1), ("holding", 1010, 1),
                                         ("holding", 1012, 1), ("holding", 1020, 2), ("holding", 1036, 2)]
    assert poll_plan("phoenix-charx") == [("holding", 1238, 8), ("holding", 1250, 4), ("holding", 1299, 1)]
