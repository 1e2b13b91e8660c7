"""The installation compiled for the controller: circuit tree, EVSEs and meters as flat indices."""

from __future__ import annotations

import math
from dataclasses import dataclass

from chargegate.config import Config

# §14a EnWG (BNetzA BK6-22-300): Gleichzeitigkeitsfaktor for n = 2..9+ controllable devices behind an EMS
GZF = {2: 0.80, 3: 0.75, 4: 0.70, 5: 0.65, 6: 0.60, 7: 0.55, 8: 0.50}
GZF_9_AND_MORE = 0.45
FLOOR_ONE_W = 4200.0


def gzf(n: int) -> float:
    if n <= 1:
        return 1.0
    return GZF.get(n, GZF_9_AND_MORE)


def floor_14a_w(n: int) -> float:
    """The §14a floor for ``n`` controllable devices: 4.2 kW + (n − 1) × GZF(n) × 4.2 kW (0 for none)."""
    if n <= 0:
        return 0.0
    return FLOOR_ONE_W + (n - 1) * gzf(n) * FLOOR_ONE_W


@dataclass(frozen=True, slots=True)
class EvseSpec:
    id: str
    index: int
    node: int
    phases: int  # 1 or 3 connected
    rotation: tuple[int, ...]  # grid phase (0..2) of each EVSE phase
    min_a: float
    max_a: float
    safe_a: float
    priority: int
    switching: bool
    controllable: bool
    grid_phases: tuple[int, ...] = ()  # the grid phases it is connected to, sorted


@dataclass(frozen=True, slots=True)
class NodeSpec:
    id: str
    index: int
    parent: int
    limits: tuple[float, float, float]  # per phase, inf when none
    max_power_w: float  # inf when none
    meter: str | None
    chain: tuple[int, ...]  # this node and its ancestors up to the root


class Topology:
    """Flat, index-based view of ``Config.circuits`` / ``Config.evses`` / ``Config.meters``."""

    def __init__(self, config: Config) -> None:
        self.nodes: list[NodeSpec] = []
        self.node_index: dict[str, int] = {}

        def add(circuit, parent: int) -> None:  # type: ignore[no-untyped-def]
            idx = len(self.nodes)
            lim = circuit.phase_limits()
            limits = tuple(float(x) for x in lim) if lim is not None else (math.inf, math.inf, math.inf)
            chain = (idx, *self.nodes[parent].chain) if parent >= 0 else (idx,)
            self.nodes.append(NodeSpec(
                id=circuit.id, index=idx, parent=parent, limits=limits,  # type: ignore[arg-type]
                max_power_w=float(circuit.max_power_w) if circuit.max_power_w is not None else math.inf,
                meter=circuit.meter, chain=chain))
            self.node_index[circuit.id] = idx
            for child in circuit.children:
                add(child, idx)

        add(config.root_circuit, -1)
        self.evses: list[EvseSpec] = []
        self.evse_index: dict[str, int] = {}
        for i, e in enumerate(config.evses):
            spec = EvseSpec(
                id=e.id, index=i, node=self.node_index[e.circuit], phases=e.phases,
                rotation=tuple(p - 1 for p in e.phase_rotation), min_a=e.min_current_a, max_a=e.max_current_a,
                safe_a=e.safe_current_a, priority=e.priority, switching=e.phase_switching,
                controllable=e.controllable, grid_phases=tuple(sorted(p - 1 for p in e.phase_rotation)))
            self.evses.append(spec)
            self.evse_index[e.id] = i
        self.meters = {m.id: m for m in config.meters}
        self.metered: list[tuple[int, str]] = [(n.index, n.meter) for n in self.nodes if n.meter]
        self.below: list[list[int]] = [[] for _ in self.nodes]  # EVSE indices below each node
        for e in self.evses:
            for n in self.nodes[e.node].chain:
                self.below[n].append(e.index)
        self.n_controllable = sum(1 for e in self.evses if e.controllable)
        self.floor_w = floor_14a_w(self.n_controllable)

    @property
    def root(self) -> NodeSpec:
        return self.nodes[0]
