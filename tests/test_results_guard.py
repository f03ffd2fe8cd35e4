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
    assert all(
        ok for *_, ok in guard.compare({"plan": "abc", "test/acc": 80.4, "model/flops_ratio": 0.50005}, reference)
    )
    moved = guard.compare({"plan": "abd", "test/acc": 79.0, "model/flops_ratio": 0.5}, reference)
    assert [key for key, *_, ok in moved if not ok] == ["plan", "test/acc"]
    # A per-entry tolerance replaces the default one; a figure the run did not give is off.
    assert all(
        ok
        for *_, ok in guard.compare(
            {"plan": "abc", "test/acc": 79.0, "model/flops_ratio": 0.5}, reference, {"test/acc": 1.5}
        )
    )
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
    assert first != guard.plan_hash(
        _run_dir(tmp_path / "3", [ChannelPlan({"a": [0, 3], "b": [1]}, {"a": 4, "b": 2}), masks])
    )
    assert first != guard.plan_hash(
        _run_dir(tmp_path / "4", [channel, MaskPlan({"w": torch.tensor([True, True, False])})])
    )
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
    moved = [
        (key, got, expected)
        for key, got, expected, ok in guard.compare(outcome.figures, entry["figures"], entry.get("tolerance"))
        if not ok
    ]
    assert not moved, f"{name} moved (figure, measured, reference): {moved}"


def test_accuracy_tolerance_is_twice_the_seed_spread_and_at_least_the_floor():
    assert guard.fit_tolerance([80.0, 80.1, 79.9]) == guard.MIN_ACC_TOLERANCE
    # stdev of (70, 74, 72) is 2.0: twice it, 4.0
    assert guard.fit_tolerance([70.0, 74.0, 72.0]) == 4.0
    # rounded up to a tenth: stdev 1.0327 -> 2.0655 -> 2.1
    assert guard.fit_tolerance([10.0, 12.0, 11.5, 10.0]) == 2.1


def test_spread_runs_every_entry_at_each_seed_and_writes_the_fitted_tolerance(tmp_path, monkeypatch):
    reference = tmp_path / "reference.json"
    document = {"ci": [], "entries": {"a": {"overrides": ["x=1"], "figures": {"plan": "p", "test/acc": 50.0}}}}
    reference.write_text(json.dumps(document))
    accuracy = {None: 50.0, 1: 54.0, 2: 52.0}
    calls = []

    def fake_run(name, overrides, out_dir, shared, seed=None):
        calls.append((name, seed))
        return guard.Outcome(name, {"plan": "p", "test/acc": accuracy[seed]})

    monkeypatch.setattr(guard, "run_entry", fake_run)
    ok, _ = guard.check(reference, tmp_path, jobs=1, out_dir=tmp_path / "out", spread=[1, 2])
    assert ok and sorted(calls, key=str) == sorted([("a", None), ("a-seed1", 1), ("a-seed2", 2)], key=str)
    entry = json.loads(reference.read_text())["entries"]["a"]
    assert entry["spread"] == {"test/acc": {"0": 50.0, "1": 54.0, "2": 52.0}}
    assert entry["tolerance"]["test/acc"] == 4.0 and entry["figures"]["test/acc"] == 50.0
