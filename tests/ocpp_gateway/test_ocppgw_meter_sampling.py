"""The load controller subtracts an OCPP wallbox's phase currents from the grid meter; they come only
with its MeterValues. The gateway therefore asks every wallbox for MeterValues with the currents at
least every ``ocpp.local.meter_values_interval_s`` (1.6: MeterValueSampleInterval and
MeterValuesSampledData; 2.0.1: SampledDataCtrlr TxUpdatedInterval and TxUpdatedMeasurands), leaves a
wallbox that samples more often alone, triggers MeterValues when they are late (a wallbox that refuses
the setting), and stamps each status with ``measured_at``: when its currents were measured. A wallbox
that neither samples nor answers triggers is logged once and counted; its measurement ages, so the
controller counts its draw as other load."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from ocppgw_helpers import InProcessGateway, gateway_config, share_broker_secrets, until
from websockets.asyncio.client import connect

from chargegate import payloads as p
from chargegate.bus import Bus
from conftest import BrokerHandle, connected_bus
from ocpp_gateway.local import _sampling_changes
from ocpp_gateway.service import Gateway
from ocpp_gateway.sim.wallbox import SimConnector, WallboxSim

INTERVAL = 2  # meter_values_interval_s in these tests (whole seconds, as OCPP has them)
ENERGY_POWER = "Energy.Active.Import.Register,Power.Active.Import"

BOXES = {  # evse id: (charge box id, version, WallboxSim keyword arguments)
    "slow16": ("SLOW16", "1.6", {"meter_interval_s": 60, "measurands": ENERGY_POWER}),
    "slow201": ("SLOW201", "2.0.1", {"meter_interval_s": 60, "measurands": ENERGY_POWER}),
    "fast16": ("FAST16", "1.6", {"meter_interval_s": 1}),
    "stubborn": ("STUBBORN", "1.6", {"meter_interval_s": 60, "readonly": frozenset({"MeterValueSampleInterval"})}),
    "nocurrent": ("NOCURRENT", "1.6", {"meter_interval_s": 1, "measurands": ENERGY_POWER,
                                       "readonly": frozenset({"MeterValuesSampledData"})}),
    "deaf": ("DEAF", "2.0.1", {"meter_interval_s": 60, "readonly": frozenset({"TxUpdatedInterval"}),
                               "triggers": False}),
}


class Rig:
    def __init__(self, gw: Gateway, status: dict[str, p.EvseStatus], boxes: dict[str, WallboxSim], port: int) -> None:
        self.gw, self.status, self.boxes, self.port = gw, status, boxes, port


@pytest.fixture(scope="module")
async def rig(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    tmp: Path = tmp_path_factory.mktemp("ocppgw-meter-sampling")
    evses = "".join(f"  - id: {e}\n    circuit: grid\n    ocpp: {{charge_box_id: {cb}, connector_id: 1, "
                    f"version: \"{v}\"}}\n" for e, (cb, v, _) in BOXES.items())
    evses += "  - id: raw16\n    circuit: grid\n    ocpp: {charge_box_id: RAW16, connector_id: 1}\n"
    cfg, path = gateway_config(tmp / "gw", broker.port, backend_url=None, evses=evses,
                               ocpp_extra=f"    meter_values_interval_s: {INTERVAL}\n")
    share_broker_secrets(cfg, broker.config)
    g = InProcessGateway(cfg, path)
    gw = await g.start()
    status: dict[str, p.EvseStatus] = {}
    obs: Bus = await connected_bus(broker, "observer")
    obs.subscribe("evse.status", lambda m: status.__setitem__(m.payload.evse_id, m.payload))
    url = f"ws://127.0.0.1:{cfg.ocpp.local.port}/ocpp"
    boxes = {e: WallboxSim(cb, url, [SimConnector(1, e)], version=v, **kw)  # type: ignore[arg-type]
             for e, (cb, v, kw) in BOXES.items()}
    for w in boxes.values():
        w.start()
    for w in boxes.values():
        await until(w.booted.is_set, what="wallbox boot")
    try:
        yield Rig(gw, status, boxes, cfg.ocpp.local.port)
    finally:
        for w in boxes.values():
            await w.stop()
        await g.stop()
        await obs.stop()


def _age(st: p.EvseStatus) -> float:
    assert st.measured_at is not None, st
    return (datetime.now(UTC) - st.measured_at).total_seconds()


async def _charging(rig: Rig, evse: str) -> p.EvseStatus:
    rig.boxes[evse].plug(1, phases=3, max_current_a=10)
    await until(lambda: evse in rig.status and rig.status[evse].state == p.EvseState.CHARGING, 10,
                what=f"{evse} charging")
    return rig.status[evse]


@pytest.mark.parametrize("evse", ["slow16", "slow201"])
async def test_a_slow_wallbox_is_asked_for_currents_every_interval(rig: Rig, evse: str) -> None:
    w = rig.boxes[evse]
    await until(lambda: w.meter_interval_s == INTERVAL and w.sends_currents(), 10, what="sampling configured")
    interval_key = "MeterValueSampleInterval" if evse == "slow16" else "TxUpdatedInterval"
    measurands_key = "MeterValuesSampledData" if evse == "slow16" else "TxUpdatedMeasurands"
    assert w.configuration[interval_key] == str(INTERVAL)
    assert w.configuration[measurands_key] == ENERGY_POWER + ",Current.Import"  # added, nothing removed
    await _charging(rig, evse)
    await until(lambda: min(rig.status[evse].current_a) > 5, 3 * INTERVAL + 2, what="currents on the bus")
    # from now on every status carries a measurement at most one interval (plus delivery) old
    seen: set[datetime] = set()
    for _ in range(3):
        first = rig.status[evse].measured_at
        await until(lambda first=first: rig.status[evse].measured_at != first, INTERVAL + 2,  # type: ignore[misc]
                    what="next MeterValues")
        st = rig.status[evse]
        assert _age(st) < 1.0 and st.measured_at not in seen
        seen.add(st.measured_at)  # type: ignore[arg-type]
    w.unplug(1)
    await until(lambda: rig.status[evse].state == p.EvseState.AVAILABLE, 10, what="available")
    assert rig.status[evse].measured_at is None and rig.status[evse].current_a == [0.0, 0.0, 0.0]


async def test_a_wallbox_sampling_more_often_is_left_alone(rig: Rig) -> None:
    w = rig.boxes["fast16"]
    await until(lambda: any(a == "GetConfiguration" for a, _ in w.received), 10, what="settings read")
    assert w.configuration["MeterValueSampleInterval"] == "1"
    assert not any(a == "ChangeConfiguration" for a, _ in w.received), w.received


async def test_late_meter_values_are_triggered_when_the_interval_is_refused(rig: Rig) -> None:
    w = rig.boxes["stubborn"]
    await until(lambda: any(a == "ChangeConfiguration" for a, _ in w.received), 10, what="interval asked for")
    assert w.configuration["MeterValueSampleInterval"] == "60"  # refused (read-only)
    counters = rig.gw.local.counters  # type: ignore[union-attr]
    before = counters["meter_values_triggered"]
    await _charging(rig, "stubborn")
    # its own MeterValues would come every 60 s: the gateway asks for them once they are 1.5 intervals late
    await until(lambda: counters["meter_values_triggered"] >= before + 2, 4 * INTERVAL + 4, what="triggers")
    assert any(a == "TriggerMessage" and d["requestedMessage"] == "MeterValues" for a, d in w.received)
    await until(lambda: min(rig.status["stubborn"].current_a) > 5, 2, what="triggered currents on the bus")
    assert _age(rig.status["stubborn"]) < 2.5 * INTERVAL + 2
    w.unplug(1)


async def test_a_wallbox_that_neither_samples_nor_answers_triggers_ages(rig: Rig) -> None:
    counters = rig.gw.local.counters  # type: ignore[union-attr]
    await until(lambda: counters["meter_sampling_refused"] >= 1, 10, what="refusal counted")
    st = await _charging(rig, "deaf")
    await until(lambda: counters["meter_values_trigger_refused"] >= 1, 3 * INTERVAL + 2, what="trigger refused")
    # no new measurement: the status keeps the time of the last one, which the controller sees age
    assert rig.status["deaf"].measured_at == st.measured_at
    assert _age(rig.status["deaf"]) > 1.5 * INTERVAL
    rig.boxes["deaf"].unplug(1)


async def test_meter_values_without_currents_are_counted_and_the_measurement_ages(rig: Rig) -> None:
    counters = rig.gw.local.counters  # type: ignore[union-attr]
    before = counters["meter_values_without_currents"]
    st = await _charging(rig, "nocurrent")
    # MeterValues every second, with energy and power only (the wallbox refused Current.Import)
    await until(lambda: counters["meter_values_without_currents"] >= before + 2, 5, what="counted")
    assert not rig.boxes["nocurrent"].sends_currents()
    assert rig.status["nocurrent"].measured_at == st.measured_at  # no current measured since the status change
    assert rig.status["nocurrent"].current_a == [0.0, 0.0, 0.0]
    rig.boxes["nocurrent"].unplug(1)


async def test_a_broken_answer_to_the_sampling_questions_is_counted_and_dropped(rig: Rig) -> None:
    counters = rig.gw.local.counters  # type: ignore[union-attr]
    before = counters["meter_sampling_not_configured"]
    async with connect(f"ws://127.0.0.1:{rig.port}/ocpp/RAW16", subprotocols=["ocpp1.6"],  # type: ignore[list-item]
                       proxy=None, open_timeout=5) as ws:
        await ws.send(json.dumps([2, "boot", "BootNotification", {"chargePointVendor": "v", "chargePointModel": "m"}]))
        seen: list[str] = []
        deadline = asyncio.get_running_loop().time() + 10
        while "GetConfiguration" not in seen and asyncio.get_running_loop().time() < deadline:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if msg[0] != 2:
                continue
            seen.append(msg[2])
            if msg[2] == "GetConfiguration":  # a configurationKey that is not a list: schema violation
                await ws.send(json.dumps([3, msg[1], {"configurationKey": "MeterValueSampleInterval=60"}]))
            else:
                await ws.send(json.dumps([3, msg[1], {"status": "Accepted"}]))
        await until(lambda: counters["meter_sampling_not_configured"] > before, 5, what="counted")
        # nothing was changed on it, and the connection still works
        await ws.send(json.dumps([2, "hb", "Heartbeat", {}]))
        while True:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert msg[2] != "ChangeConfiguration" if msg[0] == 2 else True
            if msg[0] == 2:
                await ws.send(json.dumps([3, msg[1], {"status": "Accepted"}]))
            elif msg[1] == "hb":
                assert msg[0] == 3 and "currentTime" in msg[2]
                break


def test_sampling_changes() -> None:
    assert _sampling_changes("60", ENERGY_POWER, "10") == ("10", ENERGY_POWER + ",Current.Import")
    assert _sampling_changes("10", "Current.Import", "10") == (None, None)
    assert _sampling_changes("5", None, "10") == (None, None)  # more often: fine; measurands unknown: left
    assert _sampling_changes("0", "", "10") == ("10", "Current.Import")  # 0 = no periodic sampling at all
    assert _sampling_changes("ten", " Energy.Active.Import.Register , ", "10") == (
        "10", "Energy.Active.Import.Register,Current.Import")
    assert _sampling_changes(None, 7, "10") == ("10", None)  # a broken answer: only the interval is set
