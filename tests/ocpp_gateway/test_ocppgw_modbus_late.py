"""A Modbus EVSE's session is billed from the plug-in, even when the gateway first sees the car later.

Found by the system fault-injection suite (tests/system): a car plugged in while ocpp-gateway was down
charged at once; the restarted gateway started the backend session from the energy register it saw
then, so the energy charged before was never billed. evse-poller now reports the car's stay
(``status.session``: plug-in time and register); the gateway bills the first session of a stay from
there (and only the first: a later session in the same stay starts at the register it sees)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from ocppgw_helpers import InProcessGateway, gateway_config, share_broker_secrets, until

from chargegate import payloads as p
from chargegate.bus import Bus
from conftest import BrokerHandle, connected_bus
from ocpp_gateway.backend_sim import BackendSim

EVSES = """
  - id: late16
    circuit: grid
    modbus: {profile: alfen-eve, host: 127.0.0.1, port: 1502}
  - id: late201
    circuit: grid
    modbus: {profile: alfen-eve, host: 127.0.0.1, port: 1503}
    upstream: {version: "2.0.1"}
"""


@pytest.fixture(scope="module")
async def env(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory
              ) -> AsyncIterator[tuple[BackendSim, Bus, InProcessGateway, Path]]:
    tmp: Path = tmp_path_factory.mktemp("ocppgw-modbus-late")
    backend = BackendSim(tmp / "backend.sqlite")
    await backend.start()
    cfg, path = gateway_config(tmp / "gw", broker.port, backend_url=backend.url, evses=EVSES)
    share_broker_secrets(cfg, broker.config)
    g = InProcessGateway(cfg, path)
    await g.start()
    poller = await connected_bus(broker, "evse-poller")
    for cp in ("late16", "late201"):
        await backend.wait_connected(cp)
    try:
        yield backend, poller, g, tmp
    finally:
        await g.stop()
        await poller.stop()
        await backend.stop()


def status(evse_id: str, iec: str, energy: float, session: p.Session | None) -> p.EvseStatus:
    state = {"A": p.EvseState.AVAILABLE, "B": p.EvseState.PREPARING, "C": p.EvseState.CHARGING}[iec]
    cur = 16.0 if iec == "C" else 0.0
    return p.EvseStatus(evse_id=evse_id, online=True, state=state, iec_state=p.IecState(iec), energy_wh=energy,
                        current_a=[cur, cur, cur], session=session, source="evse-poller")


@pytest.mark.parametrize("evse", ["late16", "late201"])
async def test_first_session_of_a_stay_starts_at_the_plug_in(
        env: tuple[BackendSim, Bus, InProcessGateway, Path], evse: str) -> None:
    backend, poller, _g, _tmp = env
    poller.publish("evse.status", status(evse, "A", 5000.0, None), evse_id=evse)
    await asyncio.sleep(0.3)
    # the gateway first hears of the car when it has charged 12.5 Wh already (it was not running before)
    plugged_at = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=30)
    stay = p.Session(id="stay-" + evse, started=plugged_at, energy_start_wh=5000.0, energy_wh=12.5)
    poller.publish("evse.status", status(evse, "C", 5012.5, stay), evse_id=evse)
    await until(lambda: len(backend.transactions(evse)) == 1, what="session at the backend")
    poller.publish("evse.status", status(evse, "A", 5020.0, None), evse_id=evse)
    await until(lambda: backend.transactions(evse)[0].meter_stop is not None, what="session stopped")
    s = backend.transactions(evse)[0]
    assert s.meter_start == 5000 and s.meter_stop == 5020
    assert s.started is not None and datetime.fromisoformat(s.started.replace("Z", "+00:00")) == plugged_at
    assert s.problems == []
    # the next car: its own plug-in register
    stay2 = p.Session(id="stay2-" + evse, started=datetime.now(UTC), energy_start_wh=5020.0, energy_wh=0.0)
    poller.publish("evse.status", status(evse, "B", 5020.0, stay2), evse_id=evse)
    await until(lambda: len(backend.transactions(evse)) == 2, what="second session")
    assert backend.transactions(evse)[1].meter_start == 5020
