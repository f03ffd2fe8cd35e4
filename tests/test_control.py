"""method=control (issue 35): a finished run's final structure with random or the same channels / weights, its
budget met exactly, scratch retraining that keeps the mask, Scratch-B's epochs, and the sources refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_cfg

from prunelab import load_model, pipeline
from prunelab.backbones import create
from prunelab.budget import scratch_b_epochs
from prunelab.errors import ConfigError
from prunelab.methods.control import final_keep
from prunelab.pipeline.build import build
from prunelab.pipeline.record import experiment_record
from prunelab.structure import ChannelPlan, MaskPlan, apply_channel_plan, channel_groups, prunable_weights

SHAPE = (3, 32, 32)
FAST = [
    "latency.batch_sizes=[]",
    "quiet=true",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "retrain.epochs=1",
]
# The settings a control ignores: its budget is its source's.
BUDGETS = ["budget.flops=0.9", "budget.sparsity=0.1"]


def _run(run_dir, *overrides):
    return pipeline.run(make_cfg(run_dir, *FAST, *overrides), run_dir)


@pytest.fixture(scope="module")
def structured(tmp_path_factory):
    """A finished structured run: L1 filters to half the FLOPs."""
    run_dir = tmp_path_factory.mktemp("structured")
    _run(run_dir, "method=l1_filter", "budget.flops=0.5", "budget.tolerance=0.05")
    return run_dir


@pytest.fixture(scope="module")
def unstructured(tmp_path_factory):
    """A finished unstructured run: magnitude pruning to 70%, per layer."""
    run_dir = tmp_path_factory.mktemp("unstructured")
    _run(run_dir, "method=magnitude", "budget.sparsity=0.7", "budget.scope=layer")
    return run_dir


def _plan(run_dir) -> ChannelPlan:
    (path,) = run_dir.glob("stages/*-prune/plan.json")
    return ChannelPlan.load_json(path)


def _masks(run_dir) -> MaskPlan:
    (path,) = run_dir.glob("stages/*-prune/masks.pt")
    return MaskPlan.load(path)


def _summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_random_channels_keep_the_sources_widths_in_every_group(structured, tmp_path):
    source = _plan(structured)
    drawn = []
    # Seed 1 trains from scratch: Scratch-E, the retraining's own epochs on re-initialised weights.
    for seed, retrain in ((0, "finetune"), (1, "scratch")):
        run_dir = tmp_path / str(seed)
        summary = _run(
            run_dir, "method=control", f"method.source={structured}", f"seed={seed}", f"retrain={retrain}", *BUDGETS
        )
        assert summary[f"{retrain}/epochs"] == 1
        plan = _plan(run_dir)
        assert plan.sizes == source.sizes and plan.kept() == source.kept()
        assert summary["model/flops"] == _summary(structured)["model/flops"]
        assert summary["model/flops_ratio"] == _summary(structured)["model/flops_ratio"]
        assert summary["model/params_ratio"] == _summary(structured)["model/params_ratio"]
        drawn.append(plan.keep)
    # The channels are drawn from the run's seed: not the source's, and not the same at another seed.
    assert any(drawn[0][g] != source.keep[g] for g in source.keep)
    assert any(drawn[0][g] != drawn[1][g] for g in source.keep)


def test_same_channels_are_the_sources_and_train_from_scratch_for_the_dense_compute(structured, tmp_path):
    summary = _run(
        tmp_path, "method=control", f"method.source={structured}", "method.pick=same", "retrain=scratch_b", *BUDGETS
    )
    assert _plan(tmp_path).keep == _plan(structured).keep
    held = _summary(structured)
    assert (summary["model/flops_ratio"], summary["model/params_ratio"]) == (
        held["model/flops_ratio"],
        held["model/params_ratio"],
    )
    # Scratch-B: the retraining's epochs times dense FLOPs over pruned FLOPs (1 epoch here), on re-initialised weights.
    assert summary["scratch_b/epochs"] == scratch_b_epochs(1, held["dense/flops"], held["model/flops"]) > 1
    (pruned,) = tmp_path.glob("stages/*-prune/model.pt")
    source, final = load_model(structured / "model.pt"), load_model(tmp_path / "model.pt")
    assert final.conv1.weight.shape == source.conv1.weight.shape
    assert not torch.equal(final.conv1.weight, load_model(pruned).conv1.weight)


def test_random_masks_keep_the_sources_zeros_in_every_layer(unstructured, tmp_path):
    source = _masks(unstructured)
    summary = _run(tmp_path, "method=control", f"method.source={unstructured}", *BUDGETS)
    masks = _masks(tmp_path)
    assert masks.counts() == source.counts()
    assert any(not torch.equal(masks.masks[k], source.masks[k]) for k in source.masks)
    assert summary["model/sparsity"] == _summary(unstructured)["model/sparsity"]
    final = dict(prunable_weights(load_model(tmp_path / "model.pt")))
    assert all(int((final[k] == 0).sum()) == int((~m).sum()) for k, m in masks.masks.items())


def test_the_same_mask_from_scratch_is_the_lottery_ticket_control(unstructured, tmp_path):
    """Scratch retraining re-initialises the weights and trains them under the source's mask: exact zeros there."""
    source = _masks(unstructured)
    summary = _run(tmp_path, "method=control", f"method.source={unstructured}", "method.pick=same", "retrain=scratch")
    masks = _masks(tmp_path)
    assert masks.masks.keys() == source.masks.keys()
    assert all(torch.equal(masks.masks[k], source.masks[k]) for k in source.masks)
    assert summary["model/sparsity"] == _summary(unstructured)["model/sparsity"]
    final = dict(prunable_weights(load_model(tmp_path / "model.pt")))
    trained = dict(prunable_weights(load_model(unstructured / "model.pt")))
    for name, mask in source.masks.items():
        assert torch.count_nonzero(final[name][~mask]) == 0, name
        assert torch.count_nonzero(final[name][mask]) == int(mask.sum()), name
        assert not torch.equal(final[name], trained[name]), name


@pytest.mark.parametrize("arch", ["resnet_tiny", "mobilenet_v2_tiny"])
def test_plans_applied_in_turn_compose_to_the_final_channels(arch):
    """Two plans applied one after the other (a method pruning over rounds) leave the model that the composed
    plan gives in one go: the same shapes and weights."""
    torch.manual_seed(0)
    model = create(arch)
    at_once = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    plans = []
    for _ in range(2):
        groups = channel_groups(model, SHAPE)
        keep = {
            g.name: sorted(torch.randperm(g.size, generator=gen)[: max(1, g.size * 3 // 4)].tolist()) for g in groups
        }
        plans.append(ChannelPlan(keep, {g.name: g.size for g in groups}))
        apply_channel_plan(model, plans[-1], SHAPE)
    kept = final_keep(plans)
    apply_channel_plan(at_once, ChannelPlan(kept, {g.name: g.size for g in channel_groups(at_once, SHAPE)}), SHAPE)
    assert {g.name: g.size for g in channel_groups(model, SHAPE)} == {k: len(v) for k, v in kept.items()}
    one, two = at_once.state_dict(), model.state_dict()
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def _control(run_dir, *overrides):
    return build(make_cfg(run_dir, "method=control", *overrides).method)


def test_sources_that_cannot_be_controlled_are_refused_in_one_line(structured, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((structured / "config.yaml").read_text())
    dense = tmp_path / "dense"
    dense.mkdir()
    for name in ("config.yaml", "model.pt"):
        (dense / name).write_bytes((structured / name).read_bytes())
    unpruned = {**_summary(structured), "model/flops_ratio": 1.0, "model/sparsity": 0.0}
    (dense / "summary.json").write_text(json.dumps(unpruned))
    refused = [
        ([f"method.source={dense}"], r"pruned nothing \(model/flops_ratio 1, model/sparsity 0\)$"),
        ([], r"^method=control needs method.source="),
        ([f"method.source={tmp_path / 'missing'}"], r"^method.source=\S+missing: no such directory$"),
        ([f"method.source={unfinished}"], r"holds no finished run \(no summary.json and model.pt\)$"),
        (
            [f"method.source={structured}", "backbone=vgg_tiny"],
            r"was run with backbone.name=resnet_tiny, this run has vgg_tiny",
        ),
        (
            [f"method.source={structured}", "dataset.image_size=16"],
            r"was run with dataset.image_size=32, this run has 16",
        ),
        ([f"method.source={structured}", "method.pick=best"], r"^method.pick='best' must be one of random, same$"),
    ]
    for overrides, message in refused:
        with pytest.raises(ConfigError, match=message) as found:
            _control(tmp_path, *overrides)
        assert "\n" not in str(found.value)
    # Where the data is, how it is loaded and the run's seed are not the source's to decide.
    assert _control(tmp_path, f"method.source={structured}", "dataset.batch_size=8", "dataset.num_workers=1", "seed=3")


def test_scratch_zeroes_the_masked_weights_it_reinitialises_even_without_training(unstructured, tmp_path):
    _run(
        tmp_path,
        "method=control",
        f"method.source={unstructured}",
        "method.pick=same",
        "retrain=scratch",
        "retrain.epochs=0",
    )
    (pruned,) = tmp_path.glob("stages/*-prune/model.pt")
    final, before = (dict(prunable_weights(load_model(p))) for p in (tmp_path / "model.pt", pruned))
    for name, mask in _masks(unstructured).masks.items():
        assert torch.count_nonzero(final[name][~mask]) == 0, name
        # Re-initialised: the kept weights are new.
        assert not torch.equal(final[name][mask], before[name][mask]), name


def test_a_control_resumes_where_only_its_copy_of_the_data_settings_that_decide_nothing_differs(structured, tmp_path):
    one, two, three = (
        experiment_record(make_cfg(tmp_path, "method=control", f"method.source={structured}", *more))
        for more in ([], ["dataset.num_workers=2"], ["dataset.val_size=16"])
    )
    assert one == two and one["method.source"] == str(structured)
    assert one != three and one["dataset.val_size"] != three["dataset.val_size"]
