"""Unknown peers cost bounded log lines and bounded memory (issue 14: 20,000 connections with distinct
unknown charge box ids made 20,000 log lines and +13 MB): real WebSocket connections to the gateway's
local listener, the backend's charging profiles capped per charge point."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from ocppgw_helpers import InProcessGateway, gateway_config, share_broker_secrets
from structlog.testing import capture_logs
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from conftest import BrokerHandle
from ocpp_gateway import rpc
from ocpp_gateway.backend_sim import BackendSim
from ocpp_gateway.service import Gateway
from ocpp_gateway.upstream import MAX_PROFILES

EVSES = """
  - id: known1
    circuit: grid
    ocpp: {charge_box_id: CB-KNOWN}
  - id: mbp
    circuit: grid
    modbus: {profile: alfen-eve, host: 127.0.0.1, port: 1502}
"""

PEERS = 2000


class Records(logging.Handler):
    """What the stdlib loggers (websockets, asyncio) would write at warning and above."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
async def env(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory
              ) -> AsyncIterator[tuple[Gateway, int, BackendSim]]:
    tmp: Path = tmp_path_factory.mktemp("ocppgw-bounds")
    backend = BackendSim(tmp / "backend.sqlite")
    await backend.start()
    cfg, path = gateway_config(tmp / "gw", broker.port, backend_url=backend.url, evses=EVSES)
    share_broker_secrets(cfg, broker.config)
    g = InProcessGateway(cfg, path)
    gw = await g.start()
    try:
        yield gw, cfg.ocpp.local.port, backend
    finally:
        await g.stop()
        await backend.stop()


async def refused(port: int, cbid: str) -> int:
    try:
        ws = await connect(f"ws://127.0.0.1:{port}/ocpp/{cbid}", subprotocols=["ocpp1.6"],  # type: ignore[list-item]
                           proxy=None, open_timeout=5)
    except InvalidStatus as e:
        return e.response.status_code
    await ws.close()
    return 101


async def test_unknown_charge_box_ids_make_few_lines_and_bounded_memory(env: tuple[Gateway, int, Any]) -> None:
    gw, port, _ = env
    assert gw.local is not None
    limiter = gw.local.limiter
    before = gw.ctx.counters["local_refused"]
    stdlib = Records()
    root = logging.getLogger()
    root.addHandler(stdlib)
    try:
        with capture_logs() as logs:
            for start in range(0, PEERS, 50):  # small batches: quick, and nothing piles up
                codes = await asyncio.gather(*(refused(port, f"stranger-{i:05d}") for i in range(start, start + 50)))
                assert set(codes) == {404}
            lines = [e for e in logs if e["log_level"] in ("warning", "error", "critical")]
            assert len(lines) <= 3, lines  # instead of 2000
            assert {e["event"] for e in lines} == {"wallbox connection refused"}
            limiter.flush()  # as at the end of the minute (or at shutdown)
    finally:
        root.removeHandler(stdlib)
    assert gw.ctx.counters["local_refused"] - before == PEERS  # every one counted
    [summary] = [e for e in logs if "suppressed" in e]
    assert summary["suppressed"] == PEERS - 3 and summary["keys"] == PEERS - 3
    assert summary["event"].startswith(f"wallbox connection refused: {PEERS - 3} more in the last ")
    assert summary["event"].endswith(f"from {PEERS - 3} other charge box ids, not logged one by one")
    assert stdlib.records == []  # the websockets library says nothing about them either
    # memory: every per-peer structure at its bound, no connection left
    assert len(limiter) == limiter.keys.maxsize == 1024
    assert len(limiter.windows) <= 1 and len(rpc.BAD_LOG) <= rpc.BAD_LOG.keys.maxsize
    assert gw.local.server is not None and not gw.local.server.connections
    assert set(gw.local.boxes) == {"CB-KNOWN"}
    # the known wallbox still gets in
    assert await refused(port, "CB-KNOWN") == 101


async def test_backend_profiles_per_charge_point_are_capped(env: tuple[Gateway, int, BackendSim]) -> None:
    gw, _, backend = env
    await backend.wait_connected("mbp")

    def profile(stack: int) -> dict[str, Any]:
        return {"chargingProfileId": 100 + stack, "stackLevel": stack,
                "chargingProfilePurpose": "ChargePointMaxProfile", "chargingProfileKind": "Absolute",
                "chargingSchedule": {"chargingRateUnit": "A", "chargingSchedulePeriod": [{"startPeriod": 0,
                                                                                           "limit": 32}]}}

    answers = [(await backend.call("mbp", "SetChargingProfile", {"connectorId": 0, "csChargingProfiles": profile(s)}))
               ["status"] for s in range(MAX_PROFILES + 5)]
    assert answers == ["Accepted"] * MAX_PROFILES + ["Rejected"] * 5
    assert len(gw.upstreams["mbp"]._profiles) == MAX_PROFILES
    assert gw.ctx.counters["backend_profiles_refused"] == 5
    # a replacement (same purpose and stack level) is still accepted
    assert (await backend.call("mbp", "SetChargingProfile", {"connectorId": 0, "csChargingProfiles": profile(0)})
            )["status"] == "Accepted"
    res = await backend.call("mbp", "ClearChargingProfile", {"chargingProfilePurpose": "ChargePointMaxProfile"})
    assert res["status"] == "Accepted" and gw.upstreams["mbp"]._profiles == []


async def test_backend_profile_with_a_negative_or_huge_limit(env: tuple[Gateway, int, BackendSim]) -> None:
    """Schema-valid but hostile limits (the schemas allow any number): a negative one (discharging) is refused
    with Rejected, counted and logged, and the profiles in force stay; one above anything a connection carries
    is that maximum. The gateway keeps answering (it once failed the handler: EvseLimit refused -15.4 A)."""
    gw, _, backend = env
    await backend.wait_connected("mbp")
    up = gw.upstreams["mbp"]

    def profile(pid: int, limit: float, unit: str = "A") -> dict[str, Any]:
        return {"connectorId": 0, "csChargingProfiles": {
            "chargingProfileId": pid, "stackLevel": 3, "chargingProfilePurpose": "TxDefaultProfile",
            "chargingProfileKind": "Absolute", "chargingSchedule": {
                "chargingRateUnit": unit,
                "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 16}, {"startPeriod": 60, "limit": limit}]}}}

    assert (await backend.call("mbp", "SetChargingProfile", profile(900, 16)))["status"] == "Accepted"
    before = gw.ctx.counters["backend_profiles_refused"]
    with capture_logs() as logs:
        res = await backend.call("mbp", "SetChargingProfile", profile(901, -15.4))
    assert res["status"] == "Rejected"
    assert gw.ctx.counters["backend_profiles_refused"] == before + 1
    line = next(x for x in logs if x["event"] == "backend charging profile refused")
    assert line["profile_id"] == 901 and "negative limit (-15.4 A)" in line["reason"]
    assert [x.id for x in up._profiles if x.id >= 900] == [900]  # the one in force stays

    for pid, unit, want in ((902, "A", 1000.0), (903, "W", 10_000_000.0)):
        # the backend library's own check stops at 28 digits (1e300: test_ocppgw_fast_schema.py)
        big = profile(pid, 1e25, unit)
        big["csChargingProfiles"]["chargingSchedule"]["chargingSchedulePeriod"] = [{"startPeriod": 0, "limit": 1e25}]
        big["csChargingProfiles"]["stackLevel"] = 4 if unit == "A" else 5
        got: list[Any] = []
        orig = up.publish_limit

        def seen(m: Any, got: list[Any] = got, orig: Any = orig) -> None:
            got.append(m)
            orig(m)

        up.publish_limit = seen  # type: ignore[method-assign]
        try:
            assert (await backend.call("mbp", "SetChargingProfile", big))["status"] == "Accepted"
        finally:
            up.publish_limit = orig  # type: ignore[method-assign]
        assert got and got[-1].active and (got[-1].current_a if unit == "A" else got[-1].power_w) == want
    res = await backend.call("mbp", "ClearChargingProfile", {"chargingProfilePurpose": "TxDefaultProfile"})
    assert res["status"] == "Accepted"
