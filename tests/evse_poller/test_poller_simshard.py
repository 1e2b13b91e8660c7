"""The Modbus simulators split over several processes (``python -m evse_poller.sim --shard K/N``): the shards
take every N-th TCP endpoint, together every device once; devices sharing an endpoint stay together; the
meters are shard 0's. And the OCPP wallbox simulators' ``--shard``: every N-th charge box."""

from __future__ import annotations

from pathlib import Path

from conftest import make_config
from evse_poller.sim.runner import Simulators
from ocpp_gateway.sim.runner import build_sims

SITE = """
site: {name: test}
circuits:
  - {id: grid, fuse_a: 63, meter: grid-meter}
evses:
  - {id: a, circuit: grid, modbus: {profile: alfen-eve, host: 127.0.0.1, port: 1502}}
  - {id: b, circuit: grid, modbus: {profile: alfen-eve, host: 127.0.0.1, port: 1504}}
  - {id: c, circuit: grid, modbus: {profile: alfen-eve, host: 127.0.0.1, port: 1504, device_id: 2}}
  - {id: d, circuit: grid, modbus: {profile: alfen-eve, host: 127.0.0.1, port: 1505}}
  - {id: e, circuit: grid, modbus: {profile: alfen-eve, host: 127.0.0.1, port: 1506}}
  - {id: o1, circuit: grid, ocpp: {charge_box_id: CB1}}
  - {id: o2, circuit: grid, ocpp: {charge_box_id: CB2}}
  - {id: o3, circuit: grid, ocpp: {charge_box_id: CB3}}
meters:
  - {id: grid-meter, modbus: {profile: sdm630, host: 127.0.0.1, port: 1503}}
"""


def test_shards_split_the_endpoints_and_keep_the_meters_in_shard_0(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, SITE)
    whole = Simulators(cfg)
    assert set(whole.evses) == {"a", "b", "c", "d", "e"} and set(whole.meters) == {"grid-meter"}
    shards = [Simulators(cfg, shard=(k, 2)) for k in range(2)]
    evses = [set(s.evses) for s in shards]
    assert evses[0] | evses[1] == set(whole.evses) and not evses[0] & evses[1]
    # b and c share 127.0.0.1:1504: one shard serves that port with both units
    assert any({"b", "c"} <= e for e in evses)
    assert set(shards[0].meters) == {"grid-meter"} and not shards[1].meters
    ports = [{key[2] for key in s.endpoints} for s in shards]
    assert not ports[0] & ports[1] and 1503 in ports[0]
    assert ports[0] | ports[1] == {key[2] for key in whole.endpoints}
    # one shard of more than there are endpoints simulates nothing (and is no configuration error)
    assert not Simulators(cfg, shard=(9, 10)).evses


def test_ocpp_simulator_shards_split_the_charge_boxes(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, SITE)
    whole = [s.cbid for s in build_sims(cfg)]
    parts = [[s.cbid for s in build_sims(cfg, shard=(k, 2))] for k in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(whole) == ["CB1", "CB2", "CB3"]
    assert not set(parts[0]) & set(parts[1])
