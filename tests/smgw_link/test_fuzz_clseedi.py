"""Fuzz: CLS.EEDI messages from the operator into smgw-link's handler (``ClsEediDevice`` with the real
``OperatorControl`` and its state file): mutations of every message kind the backend sends (deep in the
structure: wrong types, huge and raw numbers, past and future times, extra and missing keys) and hostile
whole payloads.

Asserted per message: the handler never raises and answers with at most one message, valid against the
official schemas; a refused message gets an ack with an errorNumber and a reason in the log, is counted,
and changes nothing (no limit, no failsafe, no state file write); an accepted one yields a limit that is a
plausible number and never open-ended (valid until at most the hold time). Then 2000 distinct accepted
messages: the repeat memory stays bounded."""

from __future__ import annotations

import copy
import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from chargegate import config as cfgmod
from fuzz_support import HOSTILE_PAYLOADS, fuzz, mutated, state_files
from smgw_link.clseedi import messages as m
from smgw_link.clseedi.device import ClsEediDevice
from smgw_link.control import OperatorControl
from smgw_link.measurements import Measurements

FIXTURES = Path(__file__).parent / "fixtures"
KINDS = ("control_limit_with_duration.json", "control_limit_no_duration.json", "control_failsafe.json",
         "control_notify.json", "control_limit_release.json", "read_all.json", "read_selective.json",
         "reply_to_read_control.json", "ack_from_backend.json")
CONFIG = """
circuits:
  - {id: grid, fuse_a: 35, meter: grid-meter}
evses:
  - {id: wb1, circuit: grid, modbus: {profile: alfen-eve, host: 127.0.0.1, port: 1502}}
meters:
  - {id: grid-meter, modbus: {profile: sdm630, host: 127.0.0.1, port: 1504}}
smgw:
  functions: {power_reduction: true}
  clseedi: {device_id: house-9}
"""
NOW = datetime.now(UTC).replace(microsecond=0)


def template(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


class Device:
    """The handler as smgw-link runs it, with its control state saved in ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = cfgmod.loads(CONFIG)
        self.control = OperatorControl.load(self.config.smgw, root / "operator.json", NOW)
        self.counters: dict[str, int] = {}
        self.changes = 0

        def changed() -> None:
            self.changes += 1

        self.device = ClsEediDevice(self.config.smgw, self.control, Measurements(self.config),
                                    lambda: (True, "ok"), changed, self.counters)

    def snapshot(self) -> Any:
        c = self.control
        return copy.deepcopy((c.lpc, c.failsafe_w, c.notify, c.avail, c.tarif, c.failsafe_since)), \
            state_files(self.root)

    def refusals(self) -> int:
        return sum(v for k, v in self.counters.items() if k == "clseedi_invalid" or k.startswith("clseedi_error_"))


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Device:
    d = Device(tmp_path_factory.mktemp("clseedi-fuzz"))
    replies = d.device.handle(json.dumps(template("control_limit_no_duration.json")).encode(), NOW)
    assert replies[0]["data"]["errorNumber"] == m.OK  # a limit in force, so that a change would show
    return d


messages = st.one_of(st.sampled_from(KINDS).flatmap(lambda k: mutated(template(k), 3)),
                     st.sampled_from(HOSTILE_PAYLOADS), st.binary(max_size=64))
offsets = st.sampled_from([-10 * 365 * 86400, -3600, 0, 1, 3600, 10 * 365 * 86400])


@fuzz(300)
@given(payload=messages, offset=offsets)
def test_any_message(dev: Device, payload: bytes, offset: int) -> None:
    now = NOW + timedelta(seconds=offset) if offset <= 0 else NOW  # the clock never runs backwards here
    before, refusals, changes = dev.snapshot(), dev.refusals(), dev.changes
    with capture_logs() as logs:
        replies = dev.device.handle(payload, now)
    assert len(replies) <= 1, replies
    for r in replies:
        assert m.schema_errors(r) == [], r
    ack = replies[0]["data"].get("errorNumber") if replies and replies[0]["type"] == m.ACK else None
    if ack not in (None, m.OK):
        assert dev.refusals() > refusals, dev.counters  # counted
        assert any(e.get("error_number") == ack and e.get("reason") for e in logs), logs  # with the reason
        assert dev.snapshot() == before and dev.changes == changes  # and nothing changed, nothing written
    if not replies and dev.refusals() > refusals and b"clseedi.ack" in payload:
        assert dev.snapshot() == before  # an invalid ack from the backend: dropped, counted
    dev.control.tick(now)
    out = dev.control.outputs(now)
    gl = out.limits["dso"]
    if gl.active:
        assert gl.power_w is not None and math.isfinite(gl.power_w) and 0 <= gl.power_w <= 10_000_000, gl
        assert gl.valid_until <= now + timedelta(seconds=dev.config.smgw.limit_hold_s + 1), gl  # never open-ended
    json.dumps(gl.model_dump(mode="json"))


@fuzz(40)
@given(payload=st.sampled_from(KINDS[:5]).flatmap(lambda k: mutated(template(k), 2)))
def test_refused_is_refused_again_and_changes_nothing(dev: Device, payload: bytes) -> None:
    """A message refused once is refused the same way again (no memory of it makes it pass)."""
    first = dev.device.handle(payload, NOW)
    if not first or first[0]["type"] != m.ACK or first[0]["data"]["errorNumber"] == m.OK:
        return
    before = dev.snapshot()
    again = dev.device.handle(payload, NOW)
    assert again[0]["data"]["errorNumber"] == first[0]["data"]["errorNumber"]
    assert dev.snapshot() == before


def test_repeat_memory_and_counters_stay_bounded(dev: Device) -> None:
    base = template("control_limit_with_duration.json")
    with capture_logs():
        for i in range(2000):
            msg = copy.deepcopy(base)
            msg["id"] = f"fz-{i}"
            msg["data"]["limits"]["power"]["active"]["consumption"]["value"] = 4000 + i
            assert dev.device.handle(json.dumps(msg).encode(), NOW)[0]["data"]["errorNumber"] == m.OK
    assert len(dev.device._seen) <= 256
    assert len(dev.counters) <= 16, dev.counters
    assert dev.control.outputs(NOW).limits["dso"].power_w == 5999
