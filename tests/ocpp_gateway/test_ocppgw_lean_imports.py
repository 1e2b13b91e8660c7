"""ocpp-gateway takes only the ``ocpp`` library's enumerations (and schema files), not its ChargePoint and
message classes (``ocpp_gateway.ocpp_enums``; bench/footprint): the same values as the library's own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_the_service_does_not_import_the_librarys_charge_point() -> None:
    code = ("import json, sys, runpy; runpy.run_module('ocpp_gateway', run_name='probe', alter_sys=True); "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'ocpp' or m.startswith('ocpp.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["ocpp"]


@pytest.mark.parametrize("version", ["v16", "v201"])
def test_the_enumerations_are_the_librarys(version: str) -> None:
    code = ("import enum, importlib, json, sys\n"
            "from ocpp_gateway import ocpp_enums\n"
            "ours = getattr(ocpp_enums, 'e16' if sys.argv[1] == 'v16' else 'e201')\n"
            "assert 'ocpp.' + sys.argv[1] not in sys.modules\n"
            "lib = importlib.import_module('ocpp.' + sys.argv[1] + '.enums')\n"
            "assert ours is not lib\n"
            "names = sorted(n for n, v in vars(lib).items()\n"
            "               if isinstance(v, enum.EnumMeta) and v.__module__ == lib.__name__)\n"
            "def members(m, n): return [(x.name, x.value) for x in getattr(m, n)]\n"
            "print(json.dumps({'names': names, 'same': [n for n in names if members(ours, n) == members(lib, n)]}))\n")
    out = subprocess.run([sys.executable, "-c", code, version], capture_output=True, text=True, check=True, timeout=60)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(res["names"]) > 20 and res["same"] == res["names"]


def test_a_process_with_the_library_loaded_shares_its_modules() -> None:
    import ocpp.v16.enums
    import ocpp.v201.enums

    from ocpp_gateway import ocpp_enums

    assert ocpp_enums._enums("v16") is ocpp.v16.enums and ocpp_enums._enums("v201") is ocpp.v201.enums


REFERENCE = ("jsonschema", "referencing", "rpds", "attr", "attrs", "jsonschema_specifications")
_REFERENCE_LOADED = ("def loaded(): return sorted(m for m in sys.modules if m.split('.')[0] in "
                     f"{REFERENCE!r} and sys.modules[m] is not None)\n")


def test_the_reference_validator_is_imported_only_for_a_payload_the_compiled_check_refuses() -> None:
    """jsonschema (with referencing, rpds, attrs) is not in the service process after start-up (warm_up
    included); the first payload that fails the compiled check imports it and gets the reference's wording
    and OCPP-J code, as before; so does a 1.6 message whose multipleOf is checked on decimals."""
    code = ("import json, sys, runpy\n" + _REFERENCE_LOADED +
            "runpy.run_module('ocpp_gateway', run_name='probe', alter_sys=True)\n"
            "from ocpp_gateway import rpc\n"
            "rpc.warm_up({'1.6', '2.0.1'})\n"
            "out = {'after_start': loaded()}\n"
            "mv = [{'timestamp': '2026-12-07T10:00:00Z', 'sampledValue': [{'value': '1'}]}]\n"
            "rpc.validate('1.6', 'MeterValues', 'request', {'connectorId': 1, 'meterValue': mv})\n"
            "out['after_valid'] = loaded()\n"
            "def err(*a):\n"
            "    try:\n"
            "        rpc.validate(*a)\n"
            "    except rpc.RpcError as e:\n"
            "        return [e.code, e.description, e.details]\n"
            "out['bad'] = err('1.6', 'MeterValues', 'request', {'connectorId': 'x', 'meterValue': mv})\n"
            "out['after_bad'] = loaded()\n"
            "out['decimal'] = err('1.6', 'SetChargingProfile', 'request', {'connectorId': 1})\n"
            "out['when'] = err('2.0.1', 'Heartbeat', 'response', {'currentTime': '2026-12-07T10:00:00'})\n"
            "print(json.dumps(out))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["after_start"] == [] and res["after_valid"] == []
    assert res["bad"] == ["TypeConstraintViolation", "connectorId: 'x' is not of type 'integer'",
                          {"path": "connectorId", "keyword": "type"}]
    assert "jsonschema" in res["after_bad"]
    assert res["decimal"][0] == "OccurenceConstraintViolation" and "csChargingProfiles" in res["decimal"][1]
    assert res["when"][0] == "PropertyConstraintViolation" and res["when"][2]["keyword"] == "format"
