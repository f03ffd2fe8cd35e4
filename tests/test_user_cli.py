"""One's own model and data from the command line: `backbone=custom backbone._target_=...`,
`dataset=image_folder dataset.root=...` and `dataset=custom dataset._target_=...`, with the classes of
tests/user_pkg, a package that is not part of prunelab (put on PYTHONPATH as a user would)."""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import CrashAtEpoch, make_cfg, run_cli
from PIL import Image

from prunelab import pipeline
from prunelab.data import ImageFolderDataModule
from prunelab.export import load_deployed, load_model
from prunelab.validate import ConfigError

TESTS = Path(__file__).resolve().parent
USER_ENV = {"PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)}
CLASSES = {"cat": (200, 60, 60), "dog": (60, 200, 60), "owl": (60, 60, 200)}
MODEL = ["backbone=custom", "backbone._target_=user_pkg.SmallNet"]
QUICK = ["trainer.enable_progress_bar=false", "latency.batch_sizes=[]"]
FOLDER = ["dataset=image_folder", "dataset.num_workers=0", "dataset.image_size=16", "dataset.batch_size=16"]


def write_images(root: Path, counts: dict[str, int] | None = None, classes: dict[str, tuple] = CLASSES) -> Path:
    """Class folders of small noisy images, one colour per class: PNGs to train on, JPEGs elsewhere."""
    rng = np.random.default_rng(0)
    for split, count in (counts or {"train": 20, "val": 6}).items():
        for name, colour in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 50, (20, 24, 3)), 0, 255).astype("uint8")
                Image.fromarray(pixels).save(root / split / name / f"{i}.{'png' if split == 'train' else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("images"))


def _stable(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if not k.startswith("time/")}


def test_own_model_on_own_images_prunes_reloads_without_base_and_resumes(tmp_path, images):
    run_dir = tmp_path / "run"
    command = [
        *MODEL,
        *FOLDER,
        f"dataset.root={images}",
        "method=l1_filter",
        "budget.flops=0.5",
        "retrain.epochs=2",
        *QUICK,
        f"hydra.run.dir={run_dir}",
    ]
    first = run_cli(*command, cwd=tmp_path, env=USER_ENV)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["model/flops_ratio"] == pytest.approx(0.5, abs=0.01)
    assert 0.0 <= summary["test/acc"] <= 100.0
    # The run's record names the user's class; the model file rebuilds it from that spec, without `base`.
    assert json.loads((run_dir / "experiment.json").read_text())["backbone._target_"] == "user_pkg.SmallNet"
    import user_pkg

    model = load_model(run_dir / "model.pt").eval()
    assert type(model) is user_pkg.SmallNet and model.classifier.out_features == 3
    assert sum(p.numel() for p in model.parameters()) == summary["model/params"]
    x = torch.randn(4, 3, 16, 16)
    deployed = load_deployed(run_dir / "model.ts")
    with torch.no_grad():
        torch.testing.assert_close(model(x), deployed(x), atol=1e-4, rtol=1e-4)

    # The same command again resumes: every stage is found done, nothing is trained again.
    done = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.name in ("done.json", "last.ckpt")}
    again = run_cli(*command, cwd=tmp_path, env=USER_ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "starting" not in again.stdout + again.stderr and len(done) == 4
    assert {p: p.stat().st_mtime_ns for p in done} == done
    assert _stable(json.loads((run_dir / "summary.json").read_text())) == _stable(summary)


def test_own_datamodule_with_an_unstructured_method(tmp_path):
    run_dir = tmp_path / "run"
    out = run_cli(
        *MODEL,
        "dataset=custom",
        "dataset._target_=user_pkg.BlobsDataModule",
        "+dataset.num_classes=4",
        "method=magnitude",
        "budget.sparsity=0.6",
        "retrain.epochs=1",
        *QUICK,
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        env=USER_ENV,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["prune/sparsity"] == pytest.approx(0.6, abs=1e-3) and 0.0 <= summary["test/acc"] <= 100.0
    # The module's num_classes attribute sized the model; its first batch gave the input shape (3, 16, 16).
    model = load_model(run_dir / "model.pt").eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 4)
    masks = model.prunelab.masks.masks
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert kept == pytest.approx(0.4, abs=1e-3)


@pytest.mark.parametrize(
    "args, message",
    [
        (["backbone=custom"], "backbone._target_ is not set: backbone=custom builds a model class of your own"),
        (
            ["backbone=custom", "backbone._target_=no_such_pkg.Net"],
            "backbone._target_=no_such_pkg.Net: no module 'no_such_pkg' can be imported",
        ),
        (
            ["backbone=custom", "backbone._target_=user_pkg.Nope"],
            "backbone._target_=user_pkg.Nope: module user_pkg has no 'Nope'",
        ),
        (
            [*MODEL, "+backbone.depth=3"],
            "backbone._target_=user_pkg.SmallNet: got an unexpected keyword argument 'depth' (it takes: num_classes, "
            "width, in_channels)",
        ),
        (["backbone._target_=user_pkg.SmallNet"], "start from backbone=custom"),
        (
            ["backbone=custom", "backbone._target_=user_pkg.FixedNet", *FOLDER, "dataset.root={images}"],
            "backbone._target_=user_pkg.FixedNet gives outputs of shape (2, 10) on inputs of shape (2, 3, 16, 16), but "
            "the data has 3 classes",
        ),
        ([*MODEL, "dataset=image_folder"], "dataset.root is not set"),
        ([*MODEL, *FOLDER, "dataset.root={images}/nowhere"], "no train/ folder or val/ folder in"),
        (
            [*MODEL, *FOLDER, "dataset.root={images}", "dataset.val_size=60"],
            "val_size=60 must be smaller than the number of training images (60 in",
        ),
        (
            [*MODEL, "dataset=custom"],
            "dataset._target_ is not set: dataset=custom uses a LightningDataModule of your own",
        ),
        ([*MODEL, "dataset._target_=user_pkg.BlobsDataModule"], "unexpected keyword argument 'num_workers'"),
        (
            [*MODEL, "dataset._target_=user_pkg.BlobsDataModule"],
            "start from dataset=custom to leave out the keys of prunelab's presets: "
            "dataset=custom dataset._target_=user_pkg.BlobsDataModule +dataset.<argument>=<value>",
        ),
        (
            [*MODEL, "dataset=custom", "dataset._target_=user_pkg.BlobsDataModule", "+dataset.colour=1"],
            "unexpected keyword argument 'colour'",
        ),
        (
            [*MODEL, "dataset=custom", "dataset._target_=user_pkg.FixedNet"],
            "made a FixedNet, not a lightning LightningDataModule",
        ),
    ],
)
def test_bad_own_model_or_data_is_one_line_exit_2_before_any_work(tmp_path, images, monkeypatch, capsys, args, message):
    # The command's entry point, run in this process (the user's package is importable here as it is on PYTHONPATH).
    from prunelab import cli

    args = [arg.replace("{images}", str(images)) for arg in args]
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setattr(
        sys,
        "argv",
        ["prunelab", *args, "method=l1_filter", "budget.flops=0.5", *QUICK, f"hydra.run.dir={tmp_path / 'run'}"],
    )
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    out = capsys.readouterr()
    assert stopped.value.code == 2, out.err[-2000:]
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("prunelab: error: ") and message in lines[0], lines
    assert "starting" not in out.out + out.err and not (tmp_path / "run" / "stages").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda root: (root / "train" / "emu").mkdir(), "train/: Found no valid file for the classes emu"),
        (
            lambda root: [p.unlink() for p in (root / "val" / "owl").iterdir()],
            "val/: Found no valid file for the classes owl",
        ),
        (
            lambda root: (root / "val" / "owl").rename(root / "val" / "yak"),
            "the class folders of val/ differ from train/'s: val/ lacks class owl of train/ and has class yak that "
            "train/ lacks",
        ),
        (lambda root: (root / "test" / "cat").rename(root / "test" / "cats"), "the class folders of test/ differ"),
    ],
)
def test_a_broken_image_folder_is_refused_at_construction(tmp_path, change, message):
    root = write_images(tmp_path, {"train": 2, "val": 1, "test": 1})
    change(root)
    with pytest.raises(ConfigError) as caught:
        ImageFolderDataModule(str(root))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_image_folder_splits_with_and_without_a_test_folder(tmp_path):
    # Without test/: val/ is the test set; val_size images are carved from train/ for validation.
    plain = write_images(tmp_path / "plain", {"train": 5, "val": 2})
    dm = ImageFolderDataModule(str(plain), image_size=8, val_size=3, mean=[0.5] * 3, std=[0.25] * 3)
    dm.setup()
    assert (dm.num_classes, dm.input_shape) == (3, (3, 8, 8)) and dm.classes == ["cat", "dog", "owl"]
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (12, 3, 6)
    assert dm.test_set.labels.tolist() == [0, 0, 1, 1, 2, 2]
    x, y = next(iter(dm.train_dataloader(epoch=0)))
    assert x.shape == (12, 3, 8, 8) and sorted(y.tolist()) == sorted(dm.train_set.labels.tolist())
    # With test/: train/ trains, val/ validates (exactly its images), test/ tests; val_size must stay 0.
    full = write_images(tmp_path / "full", {"train": 5, "val": 2, "test": 1})
    dm = ImageFolderDataModule(str(full), image_size=8)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (15, 6, 3)
    assert dm.val_set.labels.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ConfigError, match="is the validation split"):
        ImageFolderDataModule(str(full), val_size=2)
    # Normalisation computed on the training images: the normalised training images have mean 0 and std 1.
    pixels = torch.cat([x for x, _ in dm.train_eval_dataloader()])
    assert pixels.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (pixels.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2


def test_a_killed_run_on_an_image_folder_resumes_to_the_uninterrupted_result(tmp_path, images):
    """Sample order and augmentation follow the base datamodule's contract, so a resumed run is exact."""
    overrides = [*MODEL, *FOLDER, f"dataset.root={images}", "trainer.max_epochs=3", "latency.batch_sizes=[]"]
    whole = pipeline.run(make_cfg(tmp_path / "whole", *overrides), tmp_path / "whole")
    killed = tmp_path / "killed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.run(make_cfg(killed, *overrides), killed, callbacks=[CrashAtEpoch(2)])
    resumed = pipeline.run(make_cfg(killed, *overrides), killed)
    assert _stable(resumed) == _stable(whole)
    a, b = (load_model(d / "model.pt").state_dict() for d in (tmp_path / "whole", killed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretrained_weights_of_ones_own_class_load_strictly(tmp_path):
    import user_pkg

    from prunelab.backbones import from_target

    trained = user_pkg.SmallNet(3, width=8)
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "weights.pt")
    spec = {"_target_": "user_pkg.SmallNet", "width": 8, "pretrained": str(tmp_path / "weights.pt")}
    model = from_target(spec, num_classes=3, in_channels=3, input_shape=(3, 16, 16))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))
    assert model.prunelab.spec == {"_target_": "user_pkg.SmallNet", "width": 8, "num_classes": 3, "in_channels": 3}
    with pytest.raises(ValueError, match="shape mismatch"):
        from_target({**spec, "width": 16}, num_classes=3, in_channels=3)


def doc_commands() -> list[list[str]]:
    """The `prunelab` commands of the "Your own model and data" page (docs/own-model-data.md), as argument lists."""
    section = (TESTS.parent / "docs" / "own-model-data.md").read_text()
    block = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]
    return [shlex.split(line)[1:] for line in block.splitlines() if line.startswith("prunelab ")]


def test_the_docs_own_model_and_data_commands_run(tmp_path, images, monkeypatch):
    """Each command as written, with tests/user_pkg's classes for my_pkg's and a generated image folder, shortened."""
    from prunelab import cli

    names = {
        "my_pkg.MyNet": "user_pkg.SmallNet",
        "my_pkg.MyDataModule": "user_pkg.BlobsDataModule",
        "/data/pets": str(images),
    }
    commands = doc_commands()
    assert len(commands) == 2
    for index, command in enumerate(commands):
        args = [next((arg.replace(k, v) for k, v in names.items() if k in arg), arg) for arg in command]
        quick = ["dataset.num_workers=0"] if "dataset=image_folder" in args else []
        run_dir = tmp_path / str(index)
        monkeypatch.setattr(
            sys, "argv", ["prunelab", *args, *quick, "retrain.epochs=1", *QUICK, f"hydra.run.dir={run_dir}"]
        )
        cli.main()
        summary = json.loads((run_dir / "summary.json").read_text())
        assert "test/acc" in summary and type(load_model(run_dir / "model.pt")).__name__ == "SmallNet"


def test_pfs_refuses_a_class_of_ones_own_without_a_width_multiplier():
    from prunelab.methods.pfs import PruningFromScratch
    from prunelab.structure import model_record

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    model_record(model).spec = {"_target_": "torch.nn.Sequential"}
    with pytest.raises(ConfigError, match=r"torch.nn.Sequential must take a `width` argument"):
        PruningFromScratch(ratio=0.5).initial_model(model)


def test_a_datamodule_of_ones_own_gives_its_classes_and_shape_or_says_what_is_missing():
    import user_pkg

    from prunelab.data import LoaderDataModule, adopt

    blobs = user_pkg.BlobsDataModule(num_classes=3, size=8)
    adopted = adopt(blobs)
    assert isinstance(adopted, LoaderDataModule) and (adopted.num_classes, adopted.input_shape) == (3, (3, 8, 8))
    assert adopted.splits == ("train", "val", "test") and blobs.setups == 2  # setup("fit") and setup("test"), once each
    assert adopt(adopted) is adopted  # prunelab's own datamodules pass as they are

    class Unnamed(user_pkg.BlobsDataModule):
        def __init__(self) -> None:
            super().__init__()
            del self.num_classes

    with pytest.raises(ConfigError, match="cannot tell the number of classes; give the module a num_classes attribute"):
        adopt(Unnamed())

    class Named(Unnamed):
        def setup(self, stage: str | None = None) -> None:
            super().setup(stage)
            self.train_set.classes = ["a", "b", "c", "d", "e"]

    assert adopt(Named()).num_classes == 5


class FirstWeights(L.Callback):
    """The effective (masked) conv and linear weights each fit stage starts training with, by stage."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, torch.Tensor]] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        layers = pl_module.model.named_modules()
        self.seen[pl_module.stage] = {
            f"{n}.weight": m.weight.detach().clone()
            for n, m in layers
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
        }


def test_iterative_pruning_rewinds_a_class_of_ones_own_without_base(tmp_path):
    """IMP's rewinding rebuilds the user's class from the run's files alone (no model given from Python)."""
    cfg = make_cfg(
        tmp_path,
        *MODEL,
        "dataset=custom",
        "dataset._target_=user_pkg.BlobsDataModule",
        "method=imp",
        "budget.sparsity=0.36",
        "retrain.rewind_iteration=2",
        "trainer.max_epochs=1",
        "latency.batch_sizes=[]",
    )
    first = FirstWeights()
    summary = pipeline.run(cfg, tmp_path, callbacks=[first])
    assert summary["round2/sparsity"] == pytest.approx(0.36, abs=1e-3)
    # Each round's retraining starts from the weights of training iteration 2 (rewind.pt), under the round's masks.
    start = load_model(tmp_path / "rewind.pt").state_dict()
    for round_ in (1, 2):
        masks = load_model(tmp_path / "stages" / f"r{round_}-1-rewind" / "model.pt").prunelab.masks.masks
        weights = first.seen[f"round{round_}/rewind"]
        assert weights.keys() == masks.keys()
        assert all(torch.equal(weights[name], start[name] * masks[name]) for name in weights)
