"""Budgets: counting models (FLOPs, parameters, sparsity), timing them, and plans that meet a budget.

The package's modules, from the bottom: `counting`, `timing` (latency measurement), `plans` (plans from scores, top-k),
`cost` and `latency` (a pruned model's cost from a plan), `search` (a plan searched to a budget) and `scratch`
(Scratch-B epochs). Their names are re-exported here.
"""

from prunelab.budget.cost import CostModel
from prunelab.budget.counting import count_flops, count_params, measure, sparsity
from prunelab.budget.densities import DISTRIBUTIONS, keep_counts, layer_densities
from prunelab.budget.latency import LatencyModel
from prunelab.budget.plans import (
    keep_top,
    keep_top_global,
    parse_layer_ratios,
    plan_by_counts,
    plan_by_threshold,
    tie_scores,
    unit_scores,
    unstructured_plan,
)
from prunelab.budget.scratch import scratch_b_epochs
from prunelab.budget.search import budget_latency, search_threshold, structured_plan
from prunelab.budget.timing import (
    Beside,
    deployed,
    deployed_latency,
    latency_beside,
    latency_device,
    time_call,
    time_rounds,
)
from prunelab.errors import BudgetError
from prunelab.structure.channel_group import keep_count

__all__ = [
    "DISTRIBUTIONS",
    "Beside",
    "BudgetError",
    "CostModel",
    "LatencyModel",
    "budget_latency",
    "count_flops",
    "count_params",
    "deployed",
    "deployed_latency",
    "keep_count",
    "keep_counts",
    "keep_top",
    "keep_top_global",
    "latency_beside",
    "latency_device",
    "layer_densities",
    "measure",
    "parse_layer_ratios",
    "plan_by_counts",
    "plan_by_threshold",
    "scratch_b_epochs",
    "search_threshold",
    "sparsity",
    "structured_plan",
    "tie_scores",
    "time_call",
    "time_rounds",
    "unit_scores",
    "unstructured_plan",
]
