"""Modbus EVSEs (read by evse-poller) as charge points of their own at the backend.

Input is ``evse/<id>/status`` on the bus. A transaction starts when a car is plugged in (IEC
61851 state B/C/D) and the EVSE is online with a known energy register; it stops when the car is
unplugged (state A) or when the backend stops it remotely. meterStart and meterStop are the
energy register in Wh. Backend commands become ``evse/<id>/command`` and wait for
``evse/<id>/command/result``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from decimal import Decimal
from typing import Any

import structlog

from chargegate import payloads as p
from chargegate.bus import Bus
from chargegate.config import Config, Evse
from chargegate.supervise import Tasks
from ocpp_gateway import conv
from ocpp_gateway.rpc import Version
from ocpp_gateway.txqueue import TxRow
from ocpp_gateway.upstream import UpstreamCP

log = structlog.get_logger("ocpp_gateway.modbus")

PLUGGED = {p.IecState.B, p.IecState.C, p.IecState.D}
COMMAND_TIMEOUT_S = 10.0
REMOTE_START_VALID_S = 180.0


class ModbusEvse:
    """Driver and session tracker for one Modbus EVSE."""

    kind = "modbus"

    def __init__(self, evse: Evse, config: Config, bus: Bus, counters: Counter[str],
                 tasks: Tasks | None = None) -> None:
        self.evse = evse
        self.tasks = tasks or Tasks()
        self.config = config
        self.bus = bus
        self.counters = counters
        self.up: UpstreamCP | None = None
        self.status: p.EvseStatus | None = None
        self.tx: str | None = None
        self._await_unplug = False
        self._remote_tag: tuple[str, float] | None = None
        self._results: dict[str, asyncio.Future[p.EvseCommandResult]] = {}
        self._meter_task: asyncio.Task[None] | None = None
        self._no_energy_logged = False
        self.log = log.bind(evse_id=evse.id)

    def attach(self, up: UpstreamCP) -> None:
        self.up = up
        row = up.queue.open_tx(self.evse.id)
        self.tx = row.tx if row else None
        if self.tx:
            self.log.info("open session restored from the queue", tx=self.tx)
        self._meter_task = self.tasks.spawn(f"meter-loop:{self.evse.id}", self._meter_loop, evse_id=self.evse.id)
        if self.status is not None:
            # a (retained) status that arrived before the upstream charge point existed
            self.on_status(self.status)

    def close(self) -> None:
        if self._meter_task is not None:
            self._meter_task.cancel()

    # -- bus input -----------------------------------------------------------------------------
    def on_status(self, st: p.EvseStatus) -> None:
        self.status = st
        up = self.up
        if up is None:
            return
        plugged = st.online and (st.iec_state in PLUGGED if st.iec_state is not None else st.state in (
            p.EvseState.PREPARING, p.EvseState.CHARGING, p.EvseState.SUSPENDED))
        unplugged = st.online and (st.iec_state == p.IecState.A if st.iec_state is not None else
                                   st.state == p.EvseState.AVAILABLE)
        ts = conv.iso(st.ts)
        if unplugged:
            self._await_unplug = False
        if self.tx is not None and unplugged:
            self._stop(ts, "EVDisconnected")
        elif self.tx is None and plugged and not self._await_unplug and st.energy_wh is not None:
            tag = self._take_remote_tag() or (st.session.id_tag if st.session and st.session.id_tag else None) \
                or self.evse.id_tag or self.config.ocpp.backend.id_tag
            meter, started, local_id = Decimal(str(st.energy_wh)), ts, None
            ps = st.session  # the poller's record of this car's stay: plug-in time and register then
            if (ps is not None and ps.energy_start_wh is not None and ps.energy_start_wh <= st.energy_wh
                    and up.queue.tx_by_local(self.evse.id, ps.id) is None):
                # the first session of this stay: bill from the plug-in, also when the car arrived (and charged)
                # while the gateway was not running
                meter, started, local_id = Decimal(str(ps.energy_start_wh)), conv.iso(ps.started), ps.id
            self.tx = up.start_tx(id_tag=tag, meter_start_wh=meter, timestamp=started, local_id=local_id,
                                  trigger="CablePluggedIn")
            self.log.info("session started", tx=self.tx, meter_start_wh=str(meter), started=started, id_tag=tag)
        elif self.tx is None and plugged and st.energy_wh is None and not self._no_energy_logged:
            self._no_energy_logged = True
            self.log.warning("car plugged in but the EVSE reports no energy register: no session can be billed")
        s16, err = conv.status16_from_bus(st, self.tx is not None)
        up.set_status(s16, err, st.reason if s16 in ("Faulted", "Unavailable") else None)

    def on_result(self, res: p.EvseCommandResult) -> None:
        fut = self._results.get(res.request_id)
        if fut is not None and not fut.done():
            fut.set_result(res)

    def _stop(self, ts: str, reason: str) -> None:
        assert self.up is not None and self.tx is not None
        energy = self._energy()
        row = self.up.queue.tx(self.tx)
        if energy is None:
            energy = Decimal(str(row.meter_last)) if row and row.meter_last is not None else Decimal(0)
        self.up.stop_tx(self.tx, meter_stop_wh=energy, timestamp=ts, reason16=reason,
                        id_tag=row.id_tag if row else None)
        self.log.info("session stopped", tx=self.tx, meter_stop_wh=str(energy), reason=reason)
        self.tx = None

    def _energy(self) -> Decimal | None:
        st = self.status
        return Decimal(str(st.energy_wh)) if st is not None and st.energy_wh is not None else None

    def _take_remote_tag(self) -> str | None:
        if self._remote_tag is None:
            return None
        tag, until = self._remote_tag
        self._remote_tag = None
        return tag if asyncio.get_running_loop().time() < until else None

    # -- meter values -------------------------------------------------------------------------
    def samples(self) -> list[conv.Sample]:
        st = self.status
        if st is None or st.energy_wh is None:
            return []
        ts = conv.now_iso()
        vals = [conv.Value(conv.num_str(st.energy_wh), conv.ENERGY, "Wh")]
        if st.power_w is not None:
            vals.append(conv.Value(conv.num_str(round(st.power_w, 1)), conv.POWER, "W"))
        for i, a in enumerate(st.current_a[: self.evse.phases]):
            vals.append(conv.Value(conv.num_str(round(a, 2)), conv.CURRENT, "A", phase=f"L{i + 1}"))
        return [conv.Sample(ts, vals)]

    async def _meter_loop(self) -> None:
        while True:
            assert self.up is not None
            await asyncio.sleep(self.up.meter_interval_s)
            if self.tx is not None and self.status is not None and self.status.online:
                self.up.meter_tx(self.tx, self.samples())

    async def trigger_meter_values(self) -> None:
        if self.up is None:
            return
        if self.tx is not None:
            self.up.meter_tx(self.tx, self.samples())
        else:
            s = self.samples()
            if s:
                self.up.send_live("MeterValues", {"connectorId": 1, "meterValue": conv.to_16(s, "Trigger")}
                                  if self.up.version == "1.6" else
                                  {"evseId": 1, "meterValue": conv.to_201(s, "Trigger")})

    # -- driver ----------------------------------------------------------------------------------
    async def _command(self, action: p.EvseCommandAction, id_tag: str | None = None) -> p.EvseCommandResult | None:
        rid = uuid.uuid4().hex[:16]
        fut: asyncio.Future[p.EvseCommandResult] = asyncio.get_running_loop().create_future()
        self._results[rid] = fut
        try:
            self.bus.publish("evse.command", p.EvseCommand(evse_id=self.evse.id, action=action, request_id=rid,
                                                           id_tag=id_tag), evse_id=self.evse.id)
            return await asyncio.wait_for(fut, COMMAND_TIMEOUT_S)
        except TimeoutError:
            self.counters["evse_command_timeouts"] += 1
            self.log.warning("EVSE command not answered", action=str(action), timeout_s=COMMAND_TIMEOUT_S)
            return None
        finally:
            self._results.pop(rid, None)

    async def remote_start(self, id_tag: str, remote_start_id: int | None = None) -> bool:
        if self.tx is not None:
            return False
        res = await self._command(p.EvseCommandAction.START, id_tag)
        if res is None or not res.accepted:
            return False
        self._remote_tag = (id_tag, asyncio.get_running_loop().time() + REMOTE_START_VALID_S)
        self._await_unplug = False
        if self.status is not None:
            asyncio.get_running_loop().call_soon(self.on_status, self.status)
        return True

    async def remote_stop(self, tx: TxRow) -> bool:
        if self.tx != tx.tx:
            return False
        res = await self._command(p.EvseCommandAction.STOP)
        if res is None or not res.accepted:
            return False
        if self.tx == tx.tx:
            self._stop(conv.now_iso(), "Remote")
            self._await_unplug = True
            if self.status is not None and self.up is not None:
                s16, err = conv.status16_from_bus(self.status, False)
                self.up.set_status("Finishing" if s16 in ("Preparing", "Charging", "SuspendedEV", "SuspendedEVSE")
                                   else s16, err)
        return True

    async def availability(self, operative: bool) -> str:
        res = await self._command(p.EvseCommandAction.ENABLE if operative else p.EvseCommandAction.DISABLE)
        return "Accepted" if res is not None and res.accepted else "Rejected"

    async def reset(self, hard: bool) -> str:
        return "Rejected"

    async def unlock(self) -> str:
        return "NotSupported"

    async def trigger(self, what: str) -> str | None:
        return None  # the upstream charge point answers StatusNotification/MeterValues/Heartbeat itself

    async def passthrough(self, version: Version, action: str, payload: dict[str, Any]) -> dict[str, Any] | None:
        return None

    def boot_info(self) -> dict[str, str]:
        prof = self.evse.modbus.profile if self.evse.modbus else "modbus"
        return {"vendor": self.config.ocpp.backend.vendor, "model": prof[:20], "serial": self.evse.id[:25]}


async def cancel(task: asyncio.Task[Any] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
