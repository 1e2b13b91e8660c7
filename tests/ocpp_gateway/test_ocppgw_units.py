"""Property and unit tests: the durable queue's order and drop policy, profile evaluation, exact
meter value conversion, and the RPC layer against arbitrary frames."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ocpp_gateway import conv
from ocpp_gateway.profiles import Profile, effective
from ocpp_gateway.rpc import OcppRpc
from ocpp_gateway.txqueue import TX_ID_PLACEHOLDER, TxQueue

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def start_payload(meter: int) -> dict[str, Any]:
    return {"connectorId": 1, "idTag": "T", "meterStart": meter, "timestamp": "2024-01-01T00:00:00Z"}


def test_queue_order_fill_and_persistence(tmp_path: Path) -> None:
    q = TxQueue(tmp_path / "q.sqlite")
    tx = q.begin_tx(cp="cp1", evse_id="e1", version="1.6", action="StartTransaction", payload=start_payload(5),
                    id_tag="T", meter_start=5, started="2024-01-01T00:00:00Z", local_id="1")
    q.add(tx, "update", "MeterValues", {"connectorId": 1, "transactionId": TX_ID_PLACEHOLDER, "meterValue": []})
    q.add(tx, "stop", "StopTransaction", {"transactionId": TX_ID_PLACEHOLDER, "meterStop": 9,
                                          "timestamp": "2024-01-01T01:00:00Z"}, stopped="2024-01-01T01:00:00Z")
    other = q.begin_tx(cp="cp2", evse_id="e2", version="1.6", action="StartTransaction", payload=start_payload(1),
                       id_tag="T", meter_start=1, started="2024-01-01T00:00:00Z")
    q.close()
    q = TxQueue(tmp_path / "q.sqlite")  # as after kill -9: everything is still there
    assert q.count() == 4 and q.count("cp1") == 3
    head = q.head("cp1")
    assert head is not None and head.action == "StartTransaction" and head.uid
    uid = head.uid
    q.close()
    q = TxQueue(tmp_path / "q.sqlite")
    head = q.head("cp1")
    assert head is not None and head.uid == uid  # a repeat carries the same message id
    q.delivered(head.seq, backend_id="4711", id_status="Accepted")
    mv = q.head("cp1")
    assert mv is not None and mv.action == "MeterValues" and mv.payload["transactionId"] == 4711
    q.delivered(mv.seq)
    stop = q.head("cp1")
    assert stop is not None and stop.payload["transactionId"] == 4711
    row = q.tx(tx)
    assert row is not None and row.backend_id == "4711" and row.stopped is not None
    assert q.tx_by_backend("cp1", "4711") == row and q.tx_by_local("e1", "1") == row
    assert q.open_tx("e2") is not None and q.open_tx("e2").tx == other  # type: ignore[union-attr]


def test_refused_message_goes_to_dead_table_and_start_takes_its_transaction(tmp_path: Path) -> None:
    q = TxQueue(tmp_path / "q.sqlite", max_attempts=3)
    tx = q.begin_tx(cp="cp", evse_id="e", version="1.6", action="StartTransaction", payload=start_payload(0),
                    id_tag="T", meter_start=0, started="x")
    q.add(tx, "stop", "StopTransaction", {"transactionId": TX_ID_PLACEHOLDER, "meterStop": 1, "timestamp": "y"})
    head = q.head("cp")
    assert head is not None
    assert not q.failed(head.seq, "FormationViolation: x", 0.01)
    assert q.due_in(head.seq) > 0
    assert not q.failed(head.seq, "FormationViolation: x", 0.01)
    assert q.failed(head.seq, "FormationViolation: x", 0.01)
    assert q.bury_tx(tx, "start refused") == 1
    assert q.count() == 0 and q.dead_count() == 2


ops = st.lists(st.tuples(st.sampled_from(["start", "update", "update", "update", "stop"]), st.integers(0, 3)),
               min_size=1, max_size=80)


@FAST
@given(ops=ops, bound=st.integers(10, 25))
def test_drop_policy_never_drops_start_or_stop(tmp_path_factory: Any, ops: list[tuple[str, int]], bound: int) -> None:
    q = TxQueue(tmp_path_factory.mktemp("q") / "q.sqlite", max_messages=bound)
    open_tx: dict[int, str] = {}
    enqueued: list[tuple[str, str, int]] = []  # (tx, kind, n)
    n = 0
    for op, k in ops:
        n += 1
        if op == "start" and k not in open_tx:
            open_tx[k] = q.begin_tx(cp="cp", evse_id=f"e{k}", version="1.6", action="StartTransaction",
                                    payload={"n": n}, id_tag="T", meter_start=0, started="x")
            enqueued.append((open_tx[k], "start", n))
        elif op == "update" and k in open_tx:
            q.add(open_tx[k], "update", "MeterValues", {"n": n})
            enqueued.append((open_tx[k], "update", n))
        elif op == "stop" and k in open_tx:
            t = open_tx.pop(k)
            q.add(t, "stop", "StopTransaction", {"n": n})
            enqueued.append((t, "stop", n))
    rows = q.db.execute("SELECT tx, kind, payload FROM msg ORDER BY seq").fetchall()
    kept = [(t, kind, json.loads(pl)["n"]) for t, kind, pl in rows]
    kept_n = [x[2] for x in kept]
    # order is the enqueue order
    assert kept_n == sorted(kept_n)
    # every start and stop is still there
    all_fixed = [x for x in enqueued if x[1] in ("start", "stop")]
    assert {x[2] for x in all_fixed} <= set(kept_n)
    # the last meter value of every transaction is kept
    last_update: dict[str, int] = {}
    for t, kind, m in enqueued:
        if kind == "update":
            last_update[t] = m
    assert set(last_update.values()) <= set(kept_n)
    # the bound holds whenever something could still be dropped
    droppable = [x for x in kept if x[1] == "update" and x[2] not in last_update.values()]
    assert len(kept) <= bound or not droppable
    q.close()


def _prof(pid: int, purpose: str, stack: int, limit: float, **kw: Any) -> Profile:
    d = {"chargingProfileId": pid, "stackLevel": stack, "chargingProfilePurpose": purpose,
         "chargingProfileKind": kw.pop("kind", "Absolute"),
         "chargingSchedule": {"chargingRateUnit": "A", "startSchedule": "2024-05-01T00:00:00Z",
                              "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit}]}}
    d.update(kw)
    return Profile.parse(d, "1.6")


def test_profile_validity_stack_and_purpose() -> None:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    until = now + timedelta(minutes=10)
    profiles = [_prof(1, "TxDefaultProfile", 0, 16), _prof(2, "TxDefaultProfile", 1, 10, validTo=until.isoformat()),
                _prof(3, "ChargePointMaxProfile", 0, 12)]
    lim = effective(profiles, now)
    assert lim is not None and lim.current_a == 10 and lim.valid_until == until
    lim = effective(profiles, until + timedelta(seconds=1))
    assert lim is not None and lim.current_a == 12  # level 1 expired: level 0 (16) capped by the max profile (12)
    assert effective([], now) is None


@FAST
@given(limits=st.lists(st.tuples(st.sampled_from(["TxDefaultProfile", "TxProfile", "ChargePointMaxProfile"]),
                                 st.integers(0, 5), st.floats(0, 63, allow_nan=False)), min_size=1, max_size=8))
def test_effective_limit_never_exceeds_the_max_profile(limits: list[tuple[str, int, float]]) -> None:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    profiles = [_prof(i, purpose, stack, round(lim, 1)) for i, (purpose, stack, lim) in enumerate(limits)]
    lim = effective(profiles, now)
    assert lim is not None and lim.current_a is not None
    maxes = [x for x in profiles if x.purpose == "ChargePointMaxProfile"]
    if maxes:
        top = max(x.stack for x in maxes)
        assert lim.current_a <= min(x.periods[0].limit for x in maxes if x.stack == top)
    assert lim.valid_until > now


decimals = st.decimals(min_value=Decimal("0"), max_value=Decimal("99999999.999"), places=3, allow_nan=False,
                       allow_infinity=False)


@FAST
@given(values=st.lists(decimals, min_size=1, max_size=5))
def test_meter_values_round_trip_exactly(values: list[Decimal]) -> None:
    samples = [conv.Sample("2024-01-01T00:00:00Z", [conv.Value(conv.num_str(v), conv.ENERGY, "Wh")])
               for v in values]
    back16 = conv.from_16(conv.to_16(samples))
    back201 = conv.from_201(json.loads(json.dumps(conv.to_201(samples))))
    assert [Decimal(s.values[0].value) for s in back16] == values
    assert [Decimal(s.values[0].value) for s in back201] == values
    assert conv.energy_of(back201) == values[-1]


def test_kwh_and_phase_energy() -> None:
    s = conv.from_16([{"timestamp": "t", "sampledValue": [{"value": "12.345", "unit": "kWh"}]}])
    assert conv.energy_of(s) == Decimal("12345")
    s = conv.from_16([{"timestamp": "t", "sampledValue": [
        {"value": "1", "measurand": conv.ENERGY, "phase": "L1"},
        {"value": "2", "measurand": conv.ENERGY, "phase": "L2"}]}])
    assert conv.energy_of(s) == 3
    s = conv.from_201([{"timestamp": "t", "sampledValue": [{"value": 1.5, "unitOfMeasure": {"unit": "kWh",
                                                                                           "multiplier": 1}}]}])
    assert conv.energy_of(s) == Decimal("15000")


class FakeWs:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, text: str) -> None:
        self.sent.append(text)


frames = st.one_of(
    st.text(max_size=40),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                 lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                 max_leaves=10).map(json.dumps),
    st.tuples(st.sampled_from([2, 3, 4, 5]), st.text(min_size=1, max_size=10),
              st.sampled_from(["Heartbeat", "BootNotification", "StartTransaction", "X"]),
              st.dictionaries(st.sampled_from(["connectorId", "idTag", "meterStart", "timestamp", "z"]),
                              st.one_of(st.integers(), st.text(max_size=25), st.none()), max_size=4))
    .map(lambda t: json.dumps(list(t))),
)


@FAST
@given(raw=frames, version=st.sampled_from(["1.6", "2.0.1"]))
def test_rpc_answers_every_bad_call_and_never_crashes(raw: str, version: str) -> None:
    async def run() -> list[str]:
        ws = FakeWs()

        async def handler(action: str, payload: dict[str, Any]) -> dict[str, Any]:
            return {"currentTime": "2024-01-01T00:00:00Z"} if action == "Heartbeat" else {}

        rpc = OcppRpc(ws, version, "cb", handler)  # type: ignore[arg-type]
        worker = asyncio.create_task(rpc._worker())
        await rpc._on_raw(raw)
        await asyncio.sleep(0)
        for _ in range(20):
            if rpc._calls.empty():
                break
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)
        worker.cancel()
        return ws.sent

    sent = asyncio.run(run())
    assert len(sent) <= 1
    for s in sent:
        msg = json.loads(s)
        assert msg[0] in (3, 4)
        if msg[0] == 4:
            assert isinstance(msg[2], str) and isinstance(msg[4], dict)


def test_values_the_other_version_cannot_express_are_left_out() -> None:
    s201 = conv.from_201([{"timestamp": "t", "sampledValue": [
        {"value": 5, "measurand": "Energy.Active.Net", "unitOfMeasure": {"unit": "Wh"}},
        {"value": 7, "measurand": "Energy.Active.Import.Register", "unitOfMeasure": {"unit": "Wh"},
         "context": "Transaction.Begin"},
        {"value": 1, "measurand": "Voltage", "unitOfMeasure": {"unit": "dBm"}}]}])
    out16 = conv.to_16(s201, "Sample.Periodic")
    assert out16 == [{"timestamp": "t", "sampledValue": [
        {"value": "7", "measurand": "Energy.Active.Import.Register", "context": "Transaction.Begin", "unit": "Wh"}]}]
    s16 = conv.from_16([{"timestamp": "t", "sampledValue": [{"value": "1500", "measurand": "RPM"},
                                                            {"value": "20.5", "measurand": "Temperature"}]}])
    assert conv.to_201(s16) == []


@FAST
@given(current=st.floats(0, 1000, allow_nan=False), phases=st.sampled_from([1, 3]),
       evse_phases=st.sampled_from([1, 3]), max_a=st.floats(6, 80), safe=st.floats(0, 6),
       valid_s=st.floats(-30, 30, allow_nan=False))
def test_profile_sent_never_exceeds_setpoint_or_evse_maximum(current: float, phases: int, evse_phases: int,
                                                             max_a: float, safe: float, valid_s: float) -> None:
    from chargegate import payloads as p
    from chargegate.config import Evse
    from ocpp_gateway.local import Connector, _amps

    evse = Evse.model_validate({"id": "e", "circuit": "grid", "phases": evse_phases,
                                "phase_rotation": [1, 2, 3][:evse_phases], "max_current_a": max_a,
                                "safe_current_a": safe, "ocpp": {"charge_box_id": "CB"}})
    c = Connector(evse, None)  # type: ignore[arg-type]
    now = datetime.now(UTC)
    c.setpoint = p.Setpoint(evse_id="e", current_a=current, phases=phases, valid_until=now + timedelta(seconds=valid_s),
                            seq=1)
    amps, ph, until, fallback = c.desired(now)
    sent = _amps(amps)
    if c.setpoint.valid_until > now:
        assert not fallback and until == c.setpoint.valid_until
        assert sent <= current + 1e-9 and sent <= max_a + 1e-9
    else:  # expired: the safe current, without an end
        assert fallback and until is None and amps == safe
    assert sent <= amps + 1e-9 and round(sent * 10, 6) == int(round(sent * 10, 6))  # a multiple of 0.1 A
    assert ph <= evse_phases


def test_queue_database_is_0600(tmp_path: Path) -> None:
    """idTags and meter values are personal data: the queue file and its WAL are 0600 whatever the umask."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        q = TxQueue(tmp_path / "q.sqlite")
        q.begin_tx(cp="cp1", evse_id="e1", version="1.6", action="StartTransaction", payload=start_payload(5),
                   id_tag="T", meter_start=5, started="2024-01-01T00:00:00Z", local_id="1")
    finally:
        os.umask(old)
    files = [f for f in tmp_path.iterdir() if f.name.startswith("q.sqlite")]
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files), \
        {f.name: oct(f.stat().st_mode) for f in files}
