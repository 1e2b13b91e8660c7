"""Run one simulated wallbox per OCPP charge box of a configuration, steered over MQTT.

Account ``sim`` (ACL: readwrite ``<root>/sim/#``). Commands on ``<root>/sim/<evse_id>/command``:
``{"action": "plug", "phases": 1|2|3, "max_current_a": 16.0}`` or ``{"action": "unplug"}``.
State, retained, on ``<root>/sim/<evse_id>/draw`` on every change and every second, with the keys
of evse-poller's simulators (``plugged, car_phases, car_max_current_a, state`` (IEC letter),
``enabled, limit_a, commanded_a, fallback, evse_current_a, grid_current_a, phase_rotation,
energy_wh``) plus ``limit_phases, power_w, transaction, online, source: "ocpp-sim"``.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from typing import Any

import structlog

from chargegate.broker import bus_settings
from chargegate.bus import Bus
from chargegate.config import Config
from chargegate.topics import Registry
from ocpp_gateway.sim.wallbox import SimConnector, WallboxSim

log = structlog.get_logger("ocpp_gateway.sim")


def build_sims(config: Config, *, meter_interval_s: float = 10.0, ca_file: str | None = None,
               host: str | None = None, port: int | None = None, shard: tuple[int, int] = (0, 1)) -> list[WallboxSim]:
    """One simulated wallbox per charge box of ``config``; ``shard`` (K, N): only every N-th charge box from the
    K-th (0-based, in the configuration's order), so that N processes simulate them together."""
    lc = config.ocpp.local
    h = host or (lc.host if lc.host not in ("0.0.0.0", "::", "") else "127.0.0.1")
    scheme = "wss" if lc.tls == "on" else "ws"
    url = f"{scheme}://{h}:{port or lc.port}/ocpp"
    ctx = None
    if lc.tls == "on":
        ctx = ssl.create_default_context(cafile=ca_file or (str(lc.cert_file) if lc.cert_file else None))
        ctx.check_hostname = False
    boxes: dict[str, dict[str, Any]] = {}
    for e in config.evses:
        if e.ocpp is None:
            continue
        b = boxes.setdefault(e.ocpp.charge_box_id, {"connectors": [], "password": None, "version": "1.6"})
        b["connectors"].append(SimConnector(n=e.ocpp.connector_id, evse_id=e.id, phases=e.phases,
                                            max_current_a=e.max_current_a, phase_rotation=list(e.phase_rotation)))
        if e.ocpp.password is not None:
            b["password"] = e.ocpp.password.reveal()
        if e.ocpp.version:
            b["version"] = e.ocpp.version
    k, n = shard
    return [WallboxSim(cb, url, b["connectors"], version=b["version"], password=b["password"], ssl_context=ctx,
                       meter_interval_s=meter_interval_s) for j, (cb, b) in enumerate(boxes.items()) if j % n == k]


async def run(config: Config, *, meter_interval_s: float = 10.0, ca_file: str | None = None,
              shard: tuple[int, int] = (0, 1), draw_interval_s: float = 1.0) -> None:
    registry = Registry(config.site.topic_root)
    root = registry.root
    bus = Bus("sim", registry, bus_settings(config, "sim"))
    sims = build_sims(config, meter_interval_s=meter_interval_s, ca_file=ca_file, shard=shard)
    by_evse: dict[str, tuple[WallboxSim, SimConnector]] = {}
    last: dict[str, tuple[float, str]] = {}

    def publish(sim: WallboxSim, c: SimConnector) -> None:
        state = sim.draw_state(c)
        key = json.dumps({k: v for k, v in state.items() if k not in ("ts", "energy_wh")}, sort_keys=True)
        prev = last.get(c.evse_id)
        now = time.monotonic()
        if prev is not None and prev[1] == key and now - prev[0] < draw_interval_s:
            return
        last[c.evse_id] = (now, key)
        # handed to the MQTT client at the end of this turn of the event loop, with the others of the turn
        # (one wake-up of its network thread instead of one per wallbox: a burst of SetChargingProfile to 100
        # wallboxes answered one after the other behind those GIL hand-overs); the state and its ts are now's
        outbox.append((f"{root}/sim/{c.evse_id}/draw", json.dumps(state).encode()))
        if len(outbox) == 1:
            try:
                asyncio.get_running_loop().call_soon(flush)
            except RuntimeError:  # no event loop running: at once
                flush()

    outbox: list[tuple[str, bytes]] = []

    def flush() -> None:
        out = outbox[:]
        outbox.clear()
        with bus.batch():
            for topic, data in out:
                bus.publish_raw(topic, data, qos=1, retain=True)

    for sim in sims:
        for c in sim.connectors.values():
            by_evse[c.evse_id] = (sim, c)
        sim.on_change = lambda c, sim=sim: publish(sim, c)

    def on_command(topic: str, payload: bytes, retained: bool) -> None:
        parts = topic.split("/")
        evse_id = parts[-2] if len(parts) >= 3 else ""
        target = by_evse.get(evse_id)
        if target is None or retained:
            return
        try:
            cmd = json.loads(payload)
            action = cmd["action"]
            phases = int(cmd.get("phases", 3))
            amps = float(cmd.get("max_current_a", 16.0))
            if action not in ("plug", "unplug") or phases not in (1, 2, 3) or not 0 < amps <= 80:
                raise ValueError(f"bad command {cmd!r}")
        except (ValueError, KeyError, TypeError) as e:
            log.warning("bad simulator command dropped", topic=topic, error=str(e))
            return
        sim, c = target
        if action == "plug":
            sim.plug(c.n, phases, amps, cmd.get("id_tag"))
        else:
            sim.unplug(c.n)
        log.info("simulator command", evse_id=evse_id, action=action)

    bus.subscribe_raw(f"{root}/sim/+/command", on_command)
    await bus.start()
    for sim in sims:
        sim.start()
    log.info("OCPP wallbox simulators running", wallboxes=[s.cbid for s in sims], evses=sorted(by_evse))
    try:
        await asyncio.Event().wait()
    finally:
        for sim in sims:
            await sim.stop()
        await bus.stop()
