"""The wallbox simulator runner as the demo uses it: configured from the YAML, steered over the
``sim`` broker account, obeying the load controller's setpoints through the gateway."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

from ocppgw_helpers import InProcessGateway, gateway_config, share_broker_secrets, until

from chargegate import payloads as p
from chargegate.broker import bus_settings
from chargegate.bus import Bus
from chargegate.topics import Registry
from conftest import BrokerHandle, connected_bus
from ocpp_gateway.sim.runner import run


async def test_sim_runner_over_mqtt(broker: BrokerHandle, tmp_path: Path) -> None:
    cfg, path = gateway_config(tmp_path, broker.port, backend_url=None, evses="""
  - id: sim1
    circuit: grid
    phases: 3
    phase_rotation: [2, 3, 1]
    ocpp: {charge_box_id: SIMBOX, connector_id: 1, password: simpw}
  - id: sim2
    circuit: grid
    ocpp: {charge_box_id: SIMBOX201, connector_id: 1, version: "2.0.1"}
""")
    share_broker_secrets(cfg, broker.config)
    g = InProcessGateway(cfg, path)
    await g.start()
    runner = asyncio.create_task(run(cfg, meter_interval_s=0.5))
    reg = Registry(cfg.site.topic_root)
    sim_bus = Bus("sim", reg, bus_settings(cfg, "sim"))
    draws: dict[str, dict[str, Any]] = {}
    sim_bus.subscribe_raw(f"{reg.root}/sim/+/draw", lambda t, pl, r: draws.__setitem__(t.split("/")[-2],
                                                                                      json.loads(pl)))
    await sim_bus.start(wait=5)
    ctl = await connected_bus(broker, "load-controller")
    status: dict[str, p.EvseStatus] = {}
    obs = await connected_bus(broker, "observer")
    obs.subscribe("evse.status", lambda m: status.__setitem__(m.payload.evse_id, m.payload))
    try:
        await until(lambda: status.get("sim1") is not None and status["sim1"].online
                    and status.get("sim2") is not None and status["sim2"].online, 10, what="simulators online")
        sim_bus.publish_raw(f"{reg.root}/sim/sim1/command", json.dumps(
            {"action": "plug", "phases": 3, "max_current_a": 32}).encode(), qos=1)
        sim_bus.publish_raw(f"{reg.root}/sim/sim2/command", b'{"action": "plug", "phases": 1}', qos=1)
        sim_bus.publish_raw(f"{reg.root}/sim/sim1/command", b'{"action": "explode"}', qos=1)  # dropped, logged
        # without a setpoint the wallbox gets its safe current (6 A)
        await until(lambda: draws.get("sim1", {}).get("state") == "C", 10, what="car charging")
        assert draws["sim1"]["limit_a"] == 6.0
        ctl.publish("evse.setpoint", p.Setpoint(evse_id="sim1", current_a=13.0, phases=3,
                                                valid_until=p.utcnow() + timedelta(seconds=30), seq=1),
                    evse_id="sim1")
        await until(lambda: draws.get("sim1", {}).get("limit_a") == 13.0, 10, what="setpoint obeyed")
        d = draws["sim1"]
        assert d["evse_current_a"] == [13.0, 13.0, 13.0]
        assert d["grid_current_a"] == [13.0, 13.0, 13.0]  # rotation moves the phases around, all three used
        assert d["commanded_a"] == 13.0 and d["fallback"] is False and d["car_max_current_a"] == 32
        await until(lambda: status["sim1"].state == p.EvseState.CHARGING and status["sim1"].session is not None,
                    10, what="charging on the bus")
        await until(lambda: draws.get("sim2", {}).get("state") == "C" and draws["sim2"]["car_phases"] == 1, 10,
                    what="1-phase car on sim2")
        assert draws["sim2"]["grid_current_a"] == [6.0, 0.0, 0.0] and draws["sim2"]["fallback"] is True
        await asyncio.sleep(0.6)
        sim_bus.publish_raw(f"{reg.root}/sim/sim1/command", b'{"action": "unplug"}', qos=1)
        await until(lambda: draws.get("sim1", {}).get("plugged") is False, 10, what="unplugged")
        await until(lambda: status["sim1"].session is None and status["sim1"].state == p.EvseState.AVAILABLE, 10,
                    what="session over on the bus")
        assert status["sim1"].energy_wh is not None and status["sim1"].energy_wh > 0
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await sim_bus.stop()
        await ctl.stop()
        await obs.stop()
        await g.stop()
