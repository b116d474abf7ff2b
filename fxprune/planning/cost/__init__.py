"""Planning layer: what a plan costs.

* ``fxprune.cost.model`` — the cost model (:class:`CostModel`, ``compute_cost``): MACs,
  parameters and activation memory of any plan, from per-op MAC scaling rules (the
  ``macs`` field of each op entry in ``passes/rules/``);
* ``fxprune.cost.flops`` — dense FLOP counting per node (``node_flops``, fake tensors);
* ``fxprune.cost.latency`` — per-node latency tables measured on a device
  (``measure_latency``, :class:`LatencyTable`);
* ``fxprune.cost.rounding`` — which channel-count multiples each op kind runs fastest on
  a backend, measured (``measure_rounding``, :class:`RoundingTable`, ``round_to="auto"``).
"""
from fxprune.planning.cost.flops import node_flops
from fxprune.planning.cost.latency import LatencyTable, measure_latency
from fxprune.planning.cost.rounding import RoundingTable, auto_round_to, measure_rounding
from fxprune.planning.cost.model import COST_KINDS, Cost, CostModel, CostTerm, compute_cost, uniform_kept, unit_classes

__all__ = ["Cost", "CostTerm", "CostModel", "compute_cost", "node_flops", "uniform_kept", "unit_classes",
           "LatencyTable", "measure_latency", "COST_KINDS",
           "RoundingTable", "measure_rounding", "auto_round_to"]
