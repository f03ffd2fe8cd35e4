"""The results guard: its comparison and plan hash, and the CI subset of its entries run against the reference."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ROOT, shared_path
from prunelab import guard
from prunelab.structure import ChannelPlan, MaskPlan

REFERENCE = ROOT / "tests" / "reference_results.json"
DOCUMENT = json.loads(REFERENCE.read_text())


def test_compare_holds_the_plan_exactly_and_the_figures_to_their_tolerance():
    reference = {"plan": "abc", "test/acc": 80.0, "model/flops_ratio": 0.5}
    assert all(ok for *_, ok in guard.compare({"plan": "abc", "test/acc": 80.4, "model/flops_ratio": 0.50005}, reference))
    moved = guard.compare({"plan": "abd", "test/acc": 79.0, "model/flops_ratio": 0.5}, reference)
    assert [key for key, *_, ok in moved if not ok] == ["plan", "test/acc"]
    # A per-entry tolerance replaces the default one; a figure the run did not give is off.
    assert all(ok for *_, ok in guard.compare({"plan": "abc", "test/acc": 79.0, "model/flops_ratio": 0.5}, reference, {"test/acc": 1.5}))
    assert not guard.compare({}, {"test/acc": 80.0})[0][3]


def _run_dir(tmp_path, plans):
    tmp_path.mkdir(parents=True)
    stages = []
    for i, plan in enumerate(plans):
        directory = tmp_path / "stages" / f"{i}-prune"
        directory.mkdir(parents=True)
        if isinstance(plan, ChannelPlan):
            plan.save_json(directory / "plan.json")
        else:
            plan.save(directory / "masks.pt")
        stages.append({"dir": f"{i}-prune", "name": "prune", "kind": "prune", "round": None})
    (tmp_path / "stages.json").write_text(json.dumps(stages))
    return tmp_path


def test_plan_hash_follows_every_kept_channel_and_mask_bit(tmp_path):
    channel = ChannelPlan({"a": [0, 2], "b": [1]}, {"a": 4, "b": 2})
    masks = MaskPlan({"w": torch.tensor([True, False, True])})
    first = guard.plan_hash(_run_dir(tmp_path / "1", [channel, masks]))
    assert first == guard.plan_hash(_run_dir(tmp_path / "2", [channel, masks]))
    assert first != guard.plan_hash(_run_dir(tmp_path / "3", [ChannelPlan({"a": [0, 3], "b": [1]}, {"a": 4, "b": 2}), masks]))
    assert first != guard.plan_hash(_run_dir(tmp_path / "4", [channel, MaskPlan({"w": torch.tensor([True, True, False])})]))
    assert guard.plan_hash(_run_dir(tmp_path / "5", [])) is None


def test_every_entry_has_reference_figures_and_the_ci_subset_exists():
    entries = DOCUMENT["entries"]
    assert set(DOCUMENT["ci"]) <= set(entries)
    for name, entry in entries.items():
        assert entry["figures"].get("plan") and "test/acc" in entry["figures"], f"{name} has no reference figures"


@pytest.mark.parametrize("name", DOCUMENT["ci"])
def test_guarded_method_gives_its_reference_figures(name, tmp_path):
    """A method's quick configuration on real data decides the reference plan and reaches the reference figures.

    When this fails, the method's numbers moved: find why, and if the move is meant, run
    `python -m prunelab.guard --only NAME --update` and say why in the commit.
    """
    shared = shared_path()
    entry = DOCUMENT["entries"][name]
    outcome = guard.run_entry(name, entry["overrides"], tmp_path, shared)
    assert outcome.error is None, f"{name}: {outcome.error} (log: {tmp_path / (name + '.log')})"
    moved = [(key, got, expected) for key, got, expected, ok in guard.compare(outcome.figures, entry["figures"], entry.get("tolerance")) if not ok]
    assert not moved, f"{name} moved (figure, measured, reference): {moved}"
