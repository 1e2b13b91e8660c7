"""Meters over their local HTTP JSON API (transport http): the Shelly Pro 3EM profile, read by the real
poller from the simulator (a real HTTP server answering the documented JSON), and every value validated
as for Modbus: a number that is not one, NaN, a missing path, an HTTP error are refused and counted."""

from __future__ import annotations

import pytest
from poller_support import polling

from chargegate import config as cfgmod
from chargegate.broker import free_port
from evse_poller.check import check_config
from evse_poller.httpjson import extract_json, parse_json
from evse_poller.profile import ProfileError, load_profile, parse_profile
from evse_poller.sim import Simulators

# Shelly API docs, EM.GetStatus / EMData.GetStatus examples (values as the device documents them)
EM_DOC = {"id": 0, "a_current": 4.029, "a_voltage": 236.1, "a_act_power": 951.2, "a_aprt_power": 951.9,
          "a_pf": 1, "a_freq": 50, "b_current": 4.027, "b_voltage": 236.201, "b_act_power": -951.1,
          "b_aprt_power": 951.8, "b_pf": 1, "b_freq": 50, "c_current": 3.03, "c_voltage": 236.402,
          "c_act_power": 715.4, "c_aprt_power": 715.9, "c_pf": 1, "c_freq": 50, "n_current": None,
          "total_current": 11.087, "total_act_power": 715.5, "total_aprt_power": 2619.6,
          "user_calibrated_phase": []}
EMDATA_DOC = {"id": 0, "a_total_act_energy": 2776.31, "a_total_act_ret_energy": 0, "b_total_act_energy": 2615.36,
              "b_total_act_ret_energy": 12.5, "c_total_act_energy": 2003.55, "c_total_act_ret_energy": 0,
              "total_act": 7395.22, "total_act_ret": 12.5}


def test_golden_shelly_documents_decode_to_the_quantities() -> None:
    prof = load_profile("shelly-pro-3em")
    values, errors = extract_json(prof, {"em": EM_DOC, "emdata": EMDATA_DOC})
    assert errors == []
    assert values["current_l1"] == pytest.approx(4.029) and values["current_l3"] == pytest.approx(3.03)
    assert values["voltage_l2"] == pytest.approx(236.201)
    assert values["power_l2"] == pytest.approx(-951.1) and values["power"] == pytest.approx(715.5)
    assert values["energy_import"] == pytest.approx(7395.22) and values["energy_export"] == pytest.approx(12.5)


def test_json_values_are_validated() -> None:
    prof = load_profile("shelly-pro-3em")
    em = {**EM_DOC, "a_current": True, "b_current": "4.0", "c_act_power": None}
    del em["a_voltage"]
    values, errors = extract_json(prof, {"em": em, "emdata": EMDATA_DOC})
    assert values["current_l1"] is None and values["current_l2"] is None and values["voltage_l1"] is None
    assert values["power_l3"] is None  # null: not measured, no error
    text = "; ".join(errors)
    assert "current_l1: a_current is bool" in text and "current_l2: b_current is str" in text
    assert "voltage_l1: a_voltage is not in the answer to em" in text and "power_l3" not in text
    for bad in (b'{"a": NaN}', b'{"a": Infinity}', b'{"a": 1' + b'0' * 20 + b'}', b'[' * 100 + b']' * 100,
                b'not json', b'\xff\xfe'):
        with pytest.raises(ValueError):
            parse_json(bad)
    assert parse_json(b'{"a": -0.0}') == {"a": -0.0}  # a meter printing -0.0 W means 0
    values, _ = extract_json(prof, {"em": {**EM_DOC, "a_act_power": -0.0}, "emdata": EMDATA_DOC})
    assert str(values["power_l1"]) == "0.0"


def test_http_profile_rules() -> None:
    base = {"name": "x", "kind": "meter", "vendor": "v", "model": "m", "source": "some vendor document",
            "transport": {"type": "http", "port": 80},
            "http": {"requests": {"s": {"path": "/status"}}, "values": {"power": {"request": "s", "path": "p"}}}}
    assert parse_profile(base, "x.yaml").http is not None
    with pytest.raises(ProfileError, match="unknown request 'nope'"):
        parse_profile({**base, "http": {"requests": {"s": {"path": "/s"}},
                                        "values": {"power": {"request": "nope", "path": "p"}}}}, "x.yaml")
    with pytest.raises(ProfileError, match="has no Modbus registers"):
        parse_profile({**base, "registers": {"power": {"table": "input", "address": 1}}}, "x.yaml")
    with pytest.raises(ProfileError, match="says what it requests"):
        parse_profile({k: v for k, v in base.items() if k != "http"}, "x.yaml")
    with pytest.raises(ProfileError, match="only for transport http"):
        parse_profile({**base, "transport": {"type": "tcp"}, "registers": {"power": {"table": "input", "address": 1}}},
                      "x.yaml")
    with pytest.raises(ProfileError, match="not a meter measurement"):
        parse_profile({**base, "http": {"requests": {"s": {"path": "/s"}},
                                        "values": {"power": {"request": "s", "path": "p"},
                                                   "current_l4": {"request": "s", "path": "c"}}}}, "x.yaml")
    with pytest.raises(ProfileError, match=r"http\.requests\.s\.path"):
        parse_profile({**base, "http": {"requests": {"s": {"path": "status"}},
                                        "values": {"power": {"request": "s", "path": "p"}}}}, "x.yaml")


CONFIG = """
site: {{name: t}}
state_dir: {state}
poller: {{poll_interval_s: 1, offline_after_failures: 2, reconnect_backoff_max_s: 0.5}}
circuits:
  - {{id: grid, fuse_a: 63, meter: shelly}}
meters:
  - {{id: shelly, role: grid, modbus: {{profile: shelly-pro-3em, host: 127.0.0.1, port: {port}, timeout_s: 0.5,
      retries: 0{extra}}}}}
"""


def test_config_check_for_http_meters(tmp_path) -> None:
    good = cfgmod.loads(CONFIG.format(state=tmp_path, port=8080, extra=""))
    assert check_config(good) == []
    bad = cfgmod.loads(CONFIG.format(state=tmp_path, port=8080, extra=", transport: tcp"))
    assert "read over http, not Modbus tcp" in dict(check_config(bad))["meters[0].modbus"]
    with pytest.raises(cfgmod.ConfigError, match="transport http takes host"):
        cfgmod.loads(CONFIG.format(state=tmp_path, port=8080, extra=", transport: http, serial: {port: /dev/x}"))
    sdm = cfgmod.loads(CONFIG.format(state=tmp_path, port=8080, extra=", transport: http").replace(
        "shelly-pro-3em", "sdm630"))
    assert "speaks Modbus (rtu), not http" in dict(check_config(sdm))["meters[0].modbus"]


async def test_shelly_through_the_poller_with_signs_energy_errors_and_network_loss(tmp_path) -> None:
    port = free_port()
    cfg = cfgmod.loads(CONFIG.format(state=tmp_path, port=port, extra=""))
    sims = Simulators(cfg, base_load_a=(-3.0, 1.0, 0.5))  # L1 exports (PV), L2/L3 import
    async with polling(cfg, sims) as (sims, poller, pub):
        assert poller.broken == {} and sims.skipped == {}
        await poller.poll_once()
        r = pub.readings["shelly"]
        assert r.online and r.plausible, r
        # the device reports current magnitudes; the sign comes from the phase power
        assert r.current_a == pytest.approx([-3.0, 1.0, 0.5], abs=0.001)
        assert r.voltage_v == pytest.approx([230.0] * 3)
        assert r.power_phase_w == pytest.approx([-690.0, 230.0, 115.0], abs=0.1)
        assert r.power_w == pytest.approx(-345.0, abs=0.1)
        assert r.energy_import_wh is not None and r.energy_export_wh is not None
        ep = sims.endpoint_of("shelly")
        seen = ep.requests
        await poller.poll_once()
        assert ep.requests == seen + 2  # EM.GetStatus and EMData.GetStatus, one GET each

        # a value that is not a number: not trusted, flagged, the meter stays online
        ep.body_override = (b'{"id":0,"a_current":"3","b_current":1.0,"c_current":0.5,"a_voltage":230,'
                            b'"b_voltage":230,"c_voltage":230,"a_act_power":true,"b_act_power":230,'
                            b'"c_act_power":115,"total_act_power":345,"total_act":0,"total_act_ret":0}')
        await poller.poll_once()
        r = pub.readings["shelly"]
        assert r.online and not r.plausible and "current_incomplete" in r.flags and r.current_a is None, r
        # NaN in the answer: refused whole, counted as a failed poll, offline after offline_after_failures
        ep.body_override = b'{"id":0,"a_current":NaN}'
        failures = poller.counters["meter_poll_failures"]
        await poller.poll_once()
        await poller.poll_once()
        r = pub.readings["shelly"]
        assert poller.counters["meter_poll_failures"] == failures + 2
        assert not r.online and "not usable JSON" in (r.reason or "") and "NaN" in (r.reason or ""), r
        # a password on the device: offline, saying why
        ep.body_override = None
        ep.status_override = 401
        await poller.poll_once()
        r = pub.readings["shelly"]
        assert not r.online and "authentication is not supported" in (r.reason or ""), r
        ep.status_override = None
        await poller.poll_once()
        assert pub.readings["shelly"].online and pub.readings["shelly"].plausible

        # off the network and back
        await sims.set_network("shelly", False)
        await poller.poll_once()
        await poller.poll_once()
        r = pub.readings["shelly"]
        assert not r.online and "ConnectionRefusedError" in (r.reason or ""), r
        await sims.set_network("shelly", True)
        poller.meters["shelly"].link._next_attempt = 0.0  # skip the reconnect backoff
        await poller.poll_once()
        assert pub.readings["shelly"].online
