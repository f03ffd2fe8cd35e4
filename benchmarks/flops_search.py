"""Seconds of the FLOPs-budget threshold search, side by side with what counting each candidate on a built model costs.

The search (`prunelab.budget.search_threshold`) counts every bisection candidate from the plan with a
`CostModel` and builds only the final plan once to check it. Before, every candidate was applied to
a deep copy of the model and counted with a forward pass: this script times one such build-and-count
and multiplies it by the number of candidates the search tried, so both figures come from one run.

    python benchmarks/flops_search.py
"""

from __future__ import annotations

import copy
import time

from prunelab.backbones import create
from prunelab.budget import count_flops, plan_by_threshold, search_threshold
from prunelab.budget import search as budget_search
from prunelab.methods.baselines import l1_scores
from prunelab.structure import apply_channel_plan, channel_groups

MODELS = [("resnet56", (3, 32, 32)), ("torchvision:resnet50", (3, 224, 224))]


def main() -> None:
    print(
        f"{'model':24} {'groups s':>9} {'search s':>9} {'candidates':>10} {'build+count s':>14} "
        f"{'old search s (est.)':>20}"
    )
    for name, shape in MODELS:
        model = create(name, num_classes=10).eval()
        start = time.perf_counter()
        groups = channel_groups(model, shape)
        traced = time.perf_counter() - start
        scores = l1_scores(model, groups)
        tries = []
        # B023: the search below calls it in this iteration only, and it is restored after.
        counting = lambda *args, **kwargs: tries.append(1) or plan_by_threshold(*args, **kwargs)  # noqa: E731, B023
        budget_search.plan_by_threshold = counting  # how many candidates the search looks at
        start = time.perf_counter()
        plan, ratio = search_threshold(model, scores, 0.5, shape, tolerance=0.01)
        searched = time.perf_counter() - start
        budget_search.plan_by_threshold, tries = plan_by_threshold, len(tries)
        start = time.perf_counter()
        count_flops(apply_channel_plan(copy.deepcopy(model), plan, shape), shape)
        built = time.perf_counter() - start
        print(
            f"{name:24} {traced:9.2f} {searched:9.2f} {tries:10d} {built:14.2f} {tries * built:20.2f}   (ratio "
            f"{ratio:.4f})"
        )


if __name__ == "__main__":
    main()
