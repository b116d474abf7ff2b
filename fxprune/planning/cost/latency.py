"""Latency measurement: per-node times of uniformly pruned copies on the current device.

Requires: a :class:`~fxprune.cost.model.CostModel` over real (not meta) weights and
inputs. Ensures: a monotone per-node :class:`LatencyTable`, cached by graph fingerprint,
device, input shapes and settings.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx

from fxprune.core.errors import PlanError
from fxprune.planning.cost.model import Cost, CostModel, uniform_kept


class MetaLatencyError(PlanError, ValueError):
    """A latency table asked of a model on the meta device (no real forward to time)."""

__all__ = ["LatencyTable", "measure_latency", "latency_table_mismatch"]


# ----------------------------------------------------------------------------------
# Latency: a per-node lookup table measured on the current device
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LatencyTable:
    """Measured per-node latency (ms) as a function of the node's size under a plan.

    Each node is timed in models pruned uniformly to ``fractions`` of every group (plus
    the dense model and the one-unit-per-group floor); its size is its MACs (its output elements for MAC-free nodes, nothing for constants).
    ``predict(kept)`` interpolates each node's (size, ms) curve, made monotone, and sums.
    Times include the per-node dispatch of an ``Interpreter``, so they over-estimate an
    eager forward by a constant per node; compare predictions with predictions.
    """

    key: str
    device: str
    nodes: tuple[str, ...]
    kinds: tuple[str, ...]  # per node: "macs" | "memory" | "const"
    sizes: tuple[tuple[float, ...], ...]
    times_ms: tuple[tuple[float, ...], ...]

    def predict(self, cost: CostModel, kept: np.ndarray | None = None) -> float:
        per_node = cost.node_costs(kept)
        total = 0.0
        for name, kind, xs, ts in zip(self.nodes, self.kinds, self.sizes, self.times_ms):
            if kind == "const" or name not in per_node:
                total += ts[-1]
                continue
            total += float(np.interp(per_node[name][kind], xs, ts))
        return total

    @property
    def dense_ms(self) -> float:
        return float(sum(ts[-1] for ts in self.times_ms))

    def to_json(self) -> str:
        return json.dumps({"key": self.key, "device": self.device, "nodes": self.nodes,
                           "kinds": self.kinds, "sizes": self.sizes, "times_ms": self.times_ms})

    @classmethod
    def from_json(cls, text: str) -> "LatencyTable":
        d = json.loads(text)
        return cls(d["key"], d["device"], tuple(d["nodes"]), tuple(d["kinds"]),
                   tuple(tuple(x) for x in d["sizes"]), tuple(tuple(x) for x in d["times_ms"]))


def latency_table_mismatch(table: Any, cost: CostModel) -> str | None:
    """Why ``table`` cannot predict ``cost``'s graph (not a ``LatencyTable``, or measured
    on another graph: its node names would read another model's curves), else None."""
    if not isinstance(table, LatencyTable):
        return (f"latency= takes a fxprune.cost.LatencyTable, not {type(table).__name__} "
                "(measure_latency(cost); a saved one: LatencyTable.from_json(text))")
    made_on = table.key.split("|", 1)[0]
    if made_on != cost.analysis.fingerprint:
        return (f"the latency table was measured on another graph (fingerprint "
                f"{made_on[:12]} != {cost.analysis.fingerprint[:12]}): measure it on this "
                "model and inputs (measure_latency(compute_cost(analysis)))")
    shapes = str([tuple(x.shape) if isinstance(x, torch.Tensor) else None
                  for x in cost.analysis.example_inputs])
    parts = table.key.split("|")
    if len(parts) > 2 and parts[2] != shapes:
        return (f"the latency table was measured on inputs of shapes {parts[2]}, this "
                f"analysis has {shapes}: measure it on these inputs")
    return None


_LATENCY_CACHE: dict[str, LatencyTable] = {}


class _NodeTimer(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, sync: Callable[[], None]) -> None:
        super().__init__(gm)
        self.sync, self.times = sync, {}

    def run_node(self, n: torch.fx.Node) -> Any:
        self.sync()
        start = time.perf_counter()
        result = super().run_node(n)
        self.sync()
        self.times.setdefault(n.name, []).append((time.perf_counter() - start) * 1e3)
        return result


def _time_nodes(gm: torch.fx.GraphModule, inputs: tuple, repeats: int) -> dict[str, float]:
    device = next((t.device for t in gm.parameters()), torch.device("cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timer = _NodeTimer(gm.eval(), sync)
    with torch.no_grad():
        timer.run(*inputs)  # warm-up
        timer.times = {}
        for _ in range(repeats):
            timer.run(*inputs)
    return {name: statistics.median(ts) for name, ts in timer.times.items()}


def measure_latency(cost: CostModel, *, fractions: Sequence[float] = (0.25, 0.5, 0.75),
                    repeats: int = 5, cache: bool = True, cache_path: str | None = None
                    ) -> LatencyTable:
    """Time every node of the model pruned uniformly to each of ``fractions``; cached.

    Requires real (not meta) example inputs and weights. The table is cached in memory
    by graph fingerprint, device, input shapes and settings, and in ``cache_path``
    (a JSON file) when given.
    """
    from passes.slice_weights import slice_weights

    analysis = cost.analysis
    inputs = tuple(analysis.example_inputs)
    device = next((t.device for t in analysis.gm.parameters()), torch.device("cpu"))
    if device.type == "meta" or any(isinstance(x, torch.Tensor) and x.is_meta for x in inputs):
        raise MetaLatencyError(
            "a latency table times real forwards: this analysis lives on the meta device. "
            "Measure one on a real copy (fxprune.cost.measure_latency(compute_cost("
            "fxprune.analyze(real_model, real_inputs)))) and pass latency=table, or plan "
            "with target_macs / target_params")
    fractions = tuple(sorted(set(float(f) for f in fractions) | {0.0, 1.0}))  # 0: one unit each
    shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in inputs]
    key = f"{analysis.fingerprint}|{device}|{shapes}|{fractions}|{repeats}|{torch.get_num_threads()}"
    if cache and key in _LATENCY_CACHE:
        return _LATENCY_CACHE[key]
    if cache and cache_path and os.path.exists(cache_path):
        with open(cache_path) as fh:
            stored = LatencyTable.from_json(fh.read())
        if stored.key == key:
            _LATENCY_CACHE[key] = stored
            return stored
    samples = []
    for f in fractions:
        kept = uniform_kept(analysis, f)
        gm = slice_weights(analysis, kept)  # a copy even at 1.0: timing sets eval()
        samples.append((cost.node_costs(kept), _time_nodes(gm, inputs, repeats)))
    table = _build_table(key, str(device), cost, samples)
    if cache:
        _LATENCY_CACHE[key] = table
        if cache_path:
            with open(cache_path, "w") as fh:
                fh.write(table.to_json())
    return table


def _build_table(key: str, device: str, cost: CostModel,
                 samples: list[tuple[dict[str, Cost], dict[str, float]]]) -> LatencyTable:
    names, kinds, sizes, times = [], [], [], []
    dense = cost.node_costs(None)
    for node in cost.analysis.gm.graph.nodes:
        if node.name not in samples[-1][1]:
            continue
        c = dense.get(node.name)
        kind = "macs" if c is not None and c.macs > 0 else \
            "memory" if c is not None and c.memory > 0 else "const"
        if kind == "const":
            xs, ts = [1.0], [statistics.median(s[1].get(node.name, 0.0) for s in samples)]
        else:
            pts = sorted((s[0][node.name][kind], s[1].get(node.name, 0.0)) for s in samples)
            xs = [p[0] for p in pts]
            ts = np.maximum.accumulate([p[1] for p in pts]).tolist()  # monotone in size
        names.append(node.name)
        kinds.append(kind)
        sizes.append(tuple(float(x) for x in xs))
        times.append(tuple(float(t) for t in ts))
    return LatencyTable(key, device, tuple(names), tuple(kinds), tuple(sizes), tuple(times))
