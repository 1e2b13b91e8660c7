"""smgw-link keeps the reference schema validator (jsonschema with referencing, rpds and attrs) out of its process
until a CLS.EEDI message fails the compiled check (bench/footprint); that message still gets the reference's
wording of every violation."""

from __future__ import annotations

import json
import subprocess
import sys

REFERENCE = ("jsonschema", "referencing", "rpds", "attr", "attrs", "jsonschema_specifications")

CODE = (
    "import json, sys, runpy\n"
    f"def loaded(): return sorted(m for m in sys.modules if m.split('.')[0] in {REFERENCE!r} and sys.modules[m])\n"
    "runpy.run_module('smgw_link', run_name='probe', alter_sys=True)\n"
    "from smgw_link.clseedi import messages as m\n"
    "out = {'after_start': loaded()}\n"
    "out['valid'] = m.schema_errors(m.ack('dev', 'rel-1', m.OK))\n"
    "out['after_valid'] = loaded()\n"
    "bad = m.ack('dev', 'rel-1', m.OK)\n"
    "bad['data']['errorNumber'] = 'zero'\n"
    "del bad['specversion']\n"
    "out['bad'] = m.schema_errors(bad)\n"
    "out['after_bad'] = loaded()\n"
    "print(json.dumps(out))\n")


def test_the_reference_validator_is_imported_only_for_a_refused_message() -> None:
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True, timeout=60)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["after_start"] == [] and res["valid"] == [] and res["after_valid"] == []
    assert "jsonschema" in res["after_bad"] and "referencing" in res["after_bad"]
    assert any(e.startswith("(message): 'specversion' is a required property") for e in res["bad"]), res["bad"]
    assert "data/errorNumber: 'zero' is not of type 'integer'" in res["bad"], res["bad"]
