"""SIGKILL the gateway process in the middle of sessions (and take the backend away once): after
the restarts the backend has every transaction message exactly once, in order, with the exact
meter values the wallboxes sent and the Modbus EVSEs reported."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from ocppgw_helpers import GatewayProcess, gateway_config, share_broker_secrets, until

from chargegate import payloads as p
from chargegate.bus import Bus
from conftest import BrokerHandle, connected_bus
from ocpp_gateway.backend_sim import BackendSim
from ocpp_gateway.sim.wallbox import SimConnector, WallboxSim

EVSES = """
  - id: wbA
    circuit: grid
    ocpp: {charge_box_id: CB-A}
  - id: wbB
    circuit: grid
    ocpp: {charge_box_id: CB-B, version: "2.0.1"}
  - id: mbC
    circuit: grid
    modbus: {profile: alfen-eve, host: 127.0.0.1, port: 1502}
  - id: mbD
    circuit: grid
    modbus: {profile: alfen-eve, host: 127.0.0.1, port: 1503}
    upstream: {version: "2.0.1"}
"""


class ModbusCar:
    """What evse-poller would publish for a Modbus EVSE with a car: the energy register grows."""

    def __init__(self, bus: Bus, evse_id: str, energy: float) -> None:
        self.bus = bus
        self.evse_id = evse_id
        self.energy = energy
        self.iec = "A"
        self.plug_energy: list[float] = []
        self.unplug_energy: list[float] = []
        self.task: asyncio.Task[None] | None = None

    def publish(self) -> None:
        state = {"A": p.EvseState.AVAILABLE, "B": p.EvseState.PREPARING, "C": p.EvseState.CHARGING}[self.iec]
        cur = 16.0 if self.iec == "C" else 0.0
        self.bus.publish("evse.status", p.EvseStatus(
            evse_id=self.evse_id, online=True, state=state, iec_state=p.IecState(self.iec), energy_wh=self.energy,
            power_w=cur * 3 * 230, current_a=[cur, cur, cur], source="evse-poller"), evse_id=self.evse_id)

    def plug(self) -> None:
        self.iec = "B"
        self.plug_energy.append(self.energy)
        self.publish()
        self.task = asyncio.create_task(self._charge())

    async def _charge(self) -> None:
        await asyncio.sleep(0.2)
        self.iec = "C"
        while True:
            self.energy += 3.0  # 11 kW for 1 s, in Wh, at 10 Hz... in a hurry
            self.publish()
            await asyncio.sleep(0.1)

    async def unplug(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await self.task
        self.iec = "A"
        self.unplug_energy.append(self.energy)
        self.publish()


def energy_of(pl: dict[str, Any]) -> list[float]:
    return [float(sv["value"]) for mv in pl.get("meterValue", []) for sv in mv["sampledValue"]
            if sv.get("measurand") == "Energy.Active.Import.Register" and not sv.get("phase")]


@pytest.mark.timeout(120)
async def test_sigkill_in_the_middle_of_sessions(broker: BrokerHandle, tmp_path: Path) -> None:
    rnd = random.Random(5)
    backend = BackendSim(tmp_path / "backend.sqlite")
    await backend.start()
    cfg, path = gateway_config(tmp_path / "gw", broker.port, backend_url=backend.url, evses=EVSES,
                               backend_extra="    meter_values_interval_s: 0.3\n")
    share_broker_secrets(cfg, broker.config)
    gw = GatewayProcess(path, tmp_path / "gateway.log")
    gw.start()
    poller = await connected_bus(broker, "evse-poller")
    url = f"ws://127.0.0.1:{cfg.ocpp.local.port}/ocpp"
    wa = WallboxSim("CB-A", url, [SimConnector(1, "wbA", energy_wh=10_000.0)], meter_interval_s=0.25)
    wb = WallboxSim("CB-B", url, [SimConnector(1, "wbB", energy_wh=20_000.0)], version="2.0.1",
                    meter_interval_s=0.25)
    cars = [ModbusCar(poller, "mbC", 30_000.0), ModbusCar(poller, "mbD", 40_000.0)]
    queue_file = cfg.state_dir / "ocpp-queue.sqlite"
    try:
        for c in cars:
            c.publish()
        wa.start()
        wb.start()
        for cp in ("wbA", "wbB", "mbC", "mbD"):
            await backend.wait_connected(cp, 20)
        await until(lambda: wa.booted.is_set() and wb.booted.is_set(), 10, what="wallboxes booted")
        kills = 0
        for rnd_i in range(3):
            wa.plug(1)
            wb.plug(1)
            for c in cars:
                c.plug()
            await asyncio.sleep(rnd.uniform(0.6, 1.2))
            gw.kill()  # in the middle of the sessions
            kills += 1
            await asyncio.sleep(rnd.uniform(0.2, 0.6))
            if rnd_i == 1:
                await backend.go_away()
            gw.start()
            await until(lambda: wa.booted.is_set() and wb.booted.is_set() and wa.connected.is_set(), 20,
                        what="wallboxes back")
            await asyncio.sleep(rnd.uniform(0.5, 1.0))
            wa.unplug(1)
            wb.unplug(1)
            for c in cars:
                await c.unplug()
            if rnd_i == 2:
                await asyncio.sleep(0.05)
                gw.kill()  # right after the stops
                kills += 1
                gw.start()
            if rnd_i == 1:
                await asyncio.sleep(0.5)
                await backend.come_back()
            await asyncio.sleep(0.3)

        def drained() -> bool:
            if wa.pending_tx_messages() or wb.pending_tx_messages() or not queue_file.exists():
                return False
            db = sqlite3.connect(f"file:{queue_file}?mode=ro", uri=True)
            try:
                return int(db.execute("SELECT COUNT(*) FROM msg").fetchone()[0]) == 0
            finally:
                db.close()

        await until(drained, 40, interval=0.2, what="every queue drained")
        assert kills == 4
        assert backend.errors_sent() == []

        # the 1.6 wallbox: every session, every meter value, exactly once and in order
        sent_a = [(act, pl) for act, pl, _ in wa.sent if act in ("StartTransaction", "MeterValues", "StopTransaction")]
        starts = [pl for act, pl in sent_a if act == "StartTransaction"]
        stops = [pl for act, pl in sent_a if act == "StopTransaction"]
        sessions = backend.transactions("wbA")
        assert len(starts) == len(stops) == len(sessions) == 3
        for s, st, sp in zip(sessions, starts, stops, strict=True):
            assert s.problems == [], s.problems
            assert (s.meter_start, s.started, s.meter_stop, s.stopped) == (st["meterStart"], st["timestamp"],
                                                                           sp["meterStop"], sp["timestamp"])
        local_ids = [pl["transactionId"] for pl in stops]
        for s, lid in zip(sessions, local_ids, strict=True):
            wallbox_values = [v for act, pl in sent_a if act == "MeterValues" and pl["transactionId"] == lid
                              for v in energy_of(pl)]
            assert s.meter_values == wallbox_values
            assert len(s.meter_values) >= 2

        # the 2.0.1 wallbox, forwarded to a 1.6 backend
        events = [pl for act, pl, _ in wb.sent if act == "TransactionEvent"]
        sessions = backend.transactions("wbB")
        assert len(sessions) == 3
        for s in sessions:
            assert s.problems == [], s.problems
        by_tx: dict[str, list[dict[str, Any]]] = {}
        for ev in events:
            by_tx.setdefault(ev["transactionInfo"]["transactionId"], []).append(ev)
        for s, evs in zip(sessions, by_tx.values(), strict=True):
            assert [e["seqNo"] for e in evs] == list(range(len(evs)))  # the wallbox's own messages, once each
            assert s.meter_start == energy_of(evs[0])[0]
            assert s.meter_stop == energy_of(evs[-1])[-1]
            # the Started event's values follow the 1.6 StartTransaction as a MeterValues (Transaction.Begin)
            assert s.meter_values == [v for e in evs[:-1] for v in energy_of(e)]

        # the Modbus EVSEs: meterStart/meterStop = the register at plug-in and unplug, exactly
        for car, cp in ((cars[0], "mbC"), (cars[1], "mbD")):
            sessions = backend.transactions(cp)
            assert len(sessions) == 3, [s.__dict__ for s in sessions]
            for s, e0, e1 in zip(sessions, car.plug_energy, car.unplug_energy, strict=True):
                assert s.problems == [], s.problems
                assert s.meter_start == e0 and s.meter_stop == e1
                assert all(e0 <= v <= e1 for v in s.meter_values)

        # nothing arrived twice under different message ids; repeats carry the same id
        for cp in ("wbA", "wbB", "mbC", "mbD"):
            seen: set[str] = set()
            for _, uid, _pl in backend.calls(cp):
                assert uid not in seen
                seen.add(uid)
        print(f"kills={kills} wire replays recognised by message id={backend.replays}")
    finally:
        await wa.stop()
        await wb.stop()
        for c in cars:
            if c.task is not None:
                c.task.cancel()
        gw.stop()
        await poller.stop()
        await backend.stop()
