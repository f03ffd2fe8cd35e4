"""Tests for prunelab.data: split sizes and determinism, file parsing, and the errors users see."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prunelab.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    ImageDataModule,
    ImageNetDataModule,
    SyntheticDataModule,
    TinyImageNetDataModule,
)
from prunelab.schema import DATASET_SCHEMAS

# The shared read-only material sits beside the repository root.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR_SUBSET = SHARED / "data" / "cifar-10-subset"
TINY_MINI = SHARED / "data" / "tiny-imagenet-200-mini"
CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def all_labels(loader: torch.utils.data.DataLoader) -> torch.Tensor:
    """Concatenates the labels of every batch of a loader."""
    return torch.cat([y for _, y in loader])


# Digits.


def test_digits_shapes_and_split_sizes() -> None:
    dm = DigitsDataModule(val_size=200, batch_size=64, seed=0)
    assert (dm.name, dm.num_classes, dm.in_channels, dm.image_size) == ("digits", 10, 3, 32)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1300, 200, 297)
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 1797
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.long and int(y.min()) >= 0 and int(y.max()) <= 9
    # The channels are copies of the one greyscale channel.
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    # Every class appears in the test split, and the normalised test-time images are standardised.
    test_x = torch.cat([x for x, _ in dm.test_dataloader()])
    assert set(all_labels(dm.test_dataloader()).tolist()) == set(range(10))
    assert abs(float(test_x.mean())) < 0.1 and abs(float(test_x.std()) - 1) < 0.1


def test_digits_split_is_seeded_and_disjoint() -> None:
    a, b, c = (DigitsDataModule(val_size=200, seed=s) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.val_indices, b.val_indices) and torch.equal(a.train_indices, b.train_indices)
    assert not torch.equal(a.val_indices, c.val_indices)
    # The test split does not move with the run seed.
    assert torch.equal(a.test_indices, c.test_indices)
    for dm in (a, c):
        train = set(dm.pool_indices[dm.train_indices].tolist())
        val = set(dm.pool_indices[dm.val_indices].tolist())
        test = set(dm.test_indices.tolist())
        assert not (train & val) and not (train & test) and not (val & test)
        assert len(train | val | test) == 1797


def test_digits_values_match_sklearn_and_options() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    dm = DigitsDataModule(image_size=8, in_channels=1, test_size=100, augment=False, batch_size=16)
    dm.setup()
    first = int(dm.pool_indices[dm.train_indices[0]])
    x, y = dm.train_eval_set[0]
    assert x.shape == (1, 8, 8) and y == int(digits.target[first])
    expected = (torch.tensor(digits.images[first], dtype=torch.float32) / 16 - dm.mean) / dm.std
    torch.testing.assert_close(x[0], expected)
    assert len(dm.test_set) == 100 and dm.val_dataloader().dataset is dm.test_set


# Synthetic.


def test_synthetic_shapes_and_determinism() -> None:
    a = SyntheticDataModule(
        num_classes=4, in_channels=2, image_size=16, train_size=40, test_size=12, val_size=8, seed=3
    )
    b = SyntheticDataModule(
        num_classes=4, in_channels=2, image_size=16, train_size=40, test_size=12, val_size=8, seed=3
    )
    c = SyntheticDataModule(
        num_classes=4, in_channels=2, image_size=16, train_size=40, test_size=12, val_size=8, seed=4
    )
    for dm in (a, b, c):
        dm.setup()
    assert (len(a.train_set), len(a.val_set), len(a.test_set)) == (32, 8, 12)
    xa, ya = next(iter(a.train_dataloader()))
    xb, yb = next(iter(b.train_dataloader()))
    xc, _ = next(iter(c.train_dataloader()))
    assert xa.shape == (32, 2, 16, 16)
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and not torch.equal(xa, xc)
    assert torch.bincount(a.train_set.source.labels, minlength=4).tolist() == [10, 10, 10, 10]


def test_synthetic_is_learnable() -> None:
    torch.manual_seed(0)
    dm = SyntheticDataModule(seed=0, batch_size=32)
    dm.setup()
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        for x, y in dm.train_dataloader():
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in dm.test_dataloader())
    assert correct / len(dm.test_set) > 0.3


# CIFAR with fake files.


def write_cifar(
    directory: Path,
    train_per_file: int = 4,
    test: int = 10,
    label_key: str = "labels",
    files: tuple[list[str], str] = (
        ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"],
        "test_batch",
    ),
    num_classes: int = 10,
    columns: int = 3072,
) -> dict[str, dict]:
    """Writes a small CIFAR directory with random images and returns what each file holds."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    written = {}
    train_files, test_file = files
    for name, count in [(n, train_per_file) for n in train_files] + [(test_file, test)]:
        entry = {
            "batch_label": name,
            "data": rng.integers(0, 256, size=(count, columns), dtype=np.uint8),
            label_key: rng.integers(0, num_classes, size=count).tolist(),
        }
        with open(directory / name, "wb") as f:
            pickle.dump(entry, f)
        written[name] = entry
    return written


def test_cifar_fake_directory_loads_with_warning(tmp_path: Path) -> None:
    written = write_cifar(tmp_path / "cifar-10-batches-py")
    dm = CIFAR10DataModule(str(tmp_path), val_size=5, batch_size=8, seed=0)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 3, 32)
    with pytest.warns(UserWarning, match=r"not the canonical CIFAR-10 set.*20 training and 10 test"):
        dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (15, 5, 10)

    # The training pool is the files in order; the test loader returns the normalised test images.
    pool = dm.train_set.source
    assert torch.equal(pool.images[4].flatten(), torch.from_numpy(written["data_batch_2"]["data"][0]))
    assert pool.labels.tolist() == [label for i in range(1, 6) for label in written[f"data_batch_{i}"]["labels"]]
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (8, 3, 32, 32) and y.tolist() == written["test_batch"]["labels"][:8]
    raw = torch.from_numpy(written["test_batch"]["data"][:8]).view(8, 3, 32, 32).float() / 255
    torch.testing.assert_close(x * STD + MEAN, raw, atol=1e-5, rtol=0)

    # Validation and train_eval use test-time transforms and fixed order; the split is disjoint.
    assert not set(dm.train_indices.tolist()) & set(dm.val_indices.tolist())
    xv, _yv = next(iter(dm.val_dataloader()))
    torch.testing.assert_close(xv[0] * STD + MEAN, pool.images[int(dm.val_indices[0])].float() / 255, atol=1e-5, rtol=0)
    assert torch.equal(all_labels(dm.train_eval_dataloader()), pool.labels[dm.train_indices])
    # The shuffled order is a function of the seed; the loader holds every training image once.
    first, second = all_labels(dm.train_dataloader()), all_labels(dm.train_dataloader())
    assert torch.equal(first, second)
    assert sorted(first.tolist()) == sorted(pool.labels[dm.train_indices].tolist())

    # Passing the batches folder itself works as well, and setup is idempotent.
    same = CIFAR10DataModule(str(tmp_path / "cifar-10-batches-py"), val_size=5, seed=0)
    with pytest.warns(UserWarning):
        same.setup()
    same.setup()
    assert torch.equal(same.val_indices, dm.val_indices)
    other = CIFAR10DataModule(str(tmp_path), val_size=5, seed=1)
    with pytest.warns(UserWarning):
        other.setup()
    assert not torch.equal(other.val_indices, dm.val_indices)


def test_cifar_subset_and_augment_off(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar-10-batches-py")
    dm = CIFAR10DataModule(str(tmp_path), val_size=5, subset=6, augment=False, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.setup()
    assert len(dm.train_set) == 6 and len(dm.val_set) == 5
    assert dm.train_set.transform is dm.train_eval_set.transform
    x, _ = dm.train_set[0]
    torch.testing.assert_close(x, dm.train_eval_set[0][0])


def test_cifar_val_size_too_large(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar-10-batches-py")
    dm = CIFAR10DataModule(str(tmp_path), val_size=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"val_size=20 must be smaller than the number of training images \(20\)"):
            dm.setup()


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    written = write_cifar(
        tmp_path / "cifar-100-python",
        train_per_file=12,
        test=6,
        label_key="fine_labels",
        files=(["train"], "test"),
        num_classes=100,
    )
    dm = CIFAR100DataModule(str(tmp_path), batch_size=6)
    assert dm.num_classes == 100
    with pytest.warns(UserWarning, match="CIFAR-100"):
        dm.setup()
    assert len(dm.train_set) == 12 and dm.val_dataloader().dataset is dm.test_set
    assert all_labels(dm.test_dataloader()).tolist() == written["test"]["fine_labels"]


def test_cifar_malformed_file(tmp_path: Path) -> None:
    directory = tmp_path / "cifar-10-batches-py"
    write_cifar(directory)
    with open(directory / "data_batch_3", "wb") as f:
        pickle.dump({"data": np.zeros((4, 3071), dtype=np.uint8), "labels": [0, 1, 2, 3]}, f)
    with pytest.raises(ValueError, match=r"data_batch_3 is malformed: 'data' has shape \(4, 3071\)"):
        CIFAR10DataModule(str(tmp_path)).setup()
    with open(directory / "data_batch_3", "wb") as f:
        pickle.dump({"data": np.zeros((4, 3072), dtype=np.uint8), "labels": [0, 1, 2]}, f)
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        CIFAR10DataModule(str(tmp_path)).setup()
    (directory / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a readable CIFAR pickle"):
        CIFAR10DataModule(str(tmp_path)).setup()
    (directory / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="missing data_batch_3"):
        CIFAR10DataModule(str(tmp_path)).setup()


def test_cifar_canonical_size_checks_md5(tmp_path: Path) -> None:
    directory = tmp_path / "cifar-10-batches-py"
    # The test file has the canonical 10,000 images, so its md5 must match torchvision's.
    write_cifar(directory, test=10000)
    with pytest.raises(ValueError, match=r"test_batch has the canonical number of images but its md5"):
        CIFAR10DataModule(str(tmp_path)).setup()


def test_cifar_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as error:
        CIFAR10DataModule(str(missing))
    message = str(error.value)
    assert str(missing / "cifar-10-batches-py") in message and str(missing) in message
    assert "dataset.download=true" in message and "https://www.cs.toronto.edu/~kriz/cifar.html" in message
    assert "dataset.root=" in message
    # With download requested the check waits for prepare_data.
    assert CIFAR10DataModule(str(missing), download=True).num_classes == 10
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        CIFAR100DataModule(str(missing))


@pytest.mark.skipif(not CIFAR_SUBSET.is_dir(), reason=f"shared CIFAR-10 subset not found at {CIFAR_SUBSET}")
def test_cifar_real_subset() -> None:
    dm = CIFAR10DataModule(str(CIFAR_SUBSET), val_size=500, seed=0)
    with pytest.warns(UserWarning, match=r"5,170 training and 1,017 test images"):
        dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (4670, 500, 1017)
    with open(CIFAR_SUBSET / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    with open(CIFAR_SUBSET / "cifar-10-batches-py" / "test_batch", "rb") as f:
        test = pickle.load(f, encoding="latin1")
    assert dm.train_set.source.labels[:20].tolist() == batch["labels"][:20]
    assert torch.equal(dm.train_set.source.images[0].flatten(), torch.from_numpy(batch["data"][0]))
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (128, 3, 32, 32) and y.tolist() == test["labels"][:128]
    with pytest.raises(ValueError, match="val_size=5170"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        CIFAR10DataModule(str(CIFAR_SUBSET), val_size=5170).setup()


# Tiny ImageNet with a fake layout.


def write_tiny(root: Path) -> Path:
    """Writes a two-class Tiny ImageNet layout with one greyscale image and returns its folder."""
    directory = root / "tiny-imagenet-200"
    wnids = ["n02", "n01"]
    (directory / "val" / "images").mkdir(parents=True)
    (directory / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for c, wnid in enumerate(wnids):
        images = directory / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (64, 64), (40 * c + i, 0, 0)).save(images / f"{wnid}_{i}.JPEG")
    Image.new("L", (64, 64), 200).save(directory / "train" / "n01" / "images" / "n01_9.JPEG")
    lines = []
    for i, wnid in enumerate(["n01", "n02", "n02", "n01"]):
        mode, colour = ("L", 100) if i == 0 else ("RGB", (0, 0, 0))
        Image.new(mode, (64, 64), colour).save(directory / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (directory / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return directory


def test_tiny_imagenet_fake_layout(tmp_path: Path) -> None:
    directory = write_tiny(tmp_path)
    dm = TinyImageNetDataModule(str(tmp_path), val_size=2, batch_size=4, seed=0)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (2, 3, 64)
    assert dm.wnids == ["n01", "n02"]
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (5, 2, 4)
    assert dm.train_set.source.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert all_labels(dm.test_dataloader()).tolist() == [0, 1, 1, 0]
    # The greyscale JPEGs come out as three equal channels.
    grey, label = dm.test_set[0]
    assert grey.shape == (3, 64, 64) and label == 0
    torch.testing.assert_close(grey * STD + MEAN, torch.full((3, 64, 64), 100 / 255), atol=0.02, rtol=0)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 64, 64)
    # The folder itself is accepted too.
    assert TinyImageNetDataModule(str(directory)).num_classes == 2
    rrc = TinyImageNetDataModule(str(directory), random_resized_crop=True, batch_size=2)
    assert next(iter(rrc.train_dataloader()))[0].shape == (2, 3, 64, 64)


def test_tiny_imagenet_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        TinyImageNetDataModule(str(tmp_path / "absent"))
    assert str(tmp_path / "absent" / "tiny-imagenet-200") in str(error.value)
    assert "http://cs231n.stanford.edu/tiny-imagenet-200.zip" in str(error.value)

    directory = write_tiny(tmp_path)
    (directory / "val" / "val_annotations.txt").unlink()
    dm = TinyImageNetDataModule(str(directory))
    with pytest.raises(FileNotFoundError, match=re.escape(str(directory / "val" / "val_annotations.txt"))):
        dm.setup()
    (directory / "wnids.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"wnids.txt is missing"):
        TinyImageNetDataModule(str(directory))


@pytest.mark.skipif(not TINY_MINI.is_dir(), reason=f"shared Tiny ImageNet mini set not found at {TINY_MINI}")
def test_tiny_imagenet_real_mini() -> None:
    dm = TinyImageNetDataModule(str(TINY_MINI), val_size=0)
    assert dm.num_classes == 200
    dm.setup()
    assert len(dm.train_set) == 20000 and len(dm.test_set) == 10000
    assert torch.bincount(dm.test_set.labels, minlength=200).tolist() == [50] * 200
    first_line = (TINY_MINI / "val" / "val_annotations.txt").read_text().splitlines()[0].split("\t")
    x, y = dm.test_set[0]
    assert x.shape == (3, 64, 64) and y == dm.wnids.index(first_line[1])
    x, y = dm.train_set[150]
    assert x.shape == (3, 64, 64) and y == 1
    split = TinyImageNetDataModule(str(TINY_MINI), val_size=5000, seed=0)
    split.setup()
    assert (len(split.train_set), len(split.val_set)) == (15000, 5000)


# ImageNet with a fake ImageFolder.


def test_imagenet_fake_folder(tmp_path: Path) -> None:
    for split, count in (("train", 3), ("val", 2)):
        for name in ("cat", "ant"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (48 + i, 40), (10, 20, 30)).save(folder / f"{i}.JPEG")
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    dm = ImageNetDataModule(str(tmp_path), image_size=32, batch_size=4, val_size=2)
    assert (dm.num_classes, dm.classes, dm.image_size) == (2, ["ant", "cat"], 32)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (4, 2, 4)
    assert dm.train_set.source.labels.tolist() == [0, 0, 0, 1, 1, 1]
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(
        x[0] * STD + MEAN, torch.tensor([10, 20, 30.0]).view(3, 1, 1).expand(3, 32, 32) / 255, atol=0.02, rtol=0
    )


def test_imagenet_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        ImageNetDataModule(str(tmp_path / "imagenet"))
    assert str(tmp_path / "imagenet" / "train") in str(error.value) and "dataset.root=" in str(error.value)


# Shared behaviour and configs.


def test_loader_options() -> None:
    dm = SyntheticDataModule(num_workers=2, batch_size=16, eval_batch_size=64, val_size=0)
    train = dm.train_dataloader()
    assert train.persistent_workers and train.num_workers == 2
    assert train.pin_memory == torch.cuda.is_available()
    assert train.batch_size == 16 and not train.drop_last
    assert dm.test_dataloader().batch_size == 64 and dm.test_dataloader().persistent_workers
    # The training order is a permutation that depends on the seed and the epoch alone (exact resume).
    sampler = train.sampler
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == epoch0 != epoch1
    # Sample ids carry the epoch (epoch * size + position); each epoch visits every position once.
    n = len(dm.train_set)
    assert sorted(epoch0) == sorted(i - n for i in epoch1) == list(range(n))
    assert list(SyntheticDataModule(seed=1).train_dataloader().sampler) != epoch0
    assert isinstance(dm.train_eval_dataloader().sampler, torch.utils.data.SequentialSampler)
    # With no validation split, validation runs on the test set.
    assert dm.val_dataloader().dataset is dm.test_set
    assert not SyntheticDataModule().train_dataloader().persistent_workers


def test_loaders_use_no_more_workers_than_usable_cores(monkeypatch) -> None:
    import prunelab.data.base as base

    monkeypatch.setattr(base, "usable_cores", lambda: 2)
    dm = SyntheticDataModule(num_workers=4, batch_size=16)
    assert dm.train_dataloader().num_workers == dm.test_dataloader().num_workers == 2
    assert SyntheticDataModule(num_workers=1).train_dataloader().num_workers == 1


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "tiny_imagenet", "imagenet", "digits", "synthetic"])
def test_dataset_configs(name: str, tmp_path: Path) -> None:
    from hydra.errors import InstantiationException
    from hydra.utils import get_class, instantiate
    from omegaconf import OmegaConf

    raw = OmegaConf.load(CONF / f"{name}.yaml")
    # `defaults` names the dataset's typed schema (prunelab.schema), whose fields are arguments too.
    schema = DATASET_SCHEMAS[str(raw.pop("defaults")[0]["/schema/dataset@_here_"])]
    config = OmegaConf.merge({"paths": {"data_dir": str(tmp_path)}, "seed": 7}, {"dataset": raw})
    target = get_class(config.dataset._target_)
    assert issubclass(target, ImageDataModule)
    accepted = set(inspect.signature(target.__init__).parameters)
    assert set(config.dataset) - {"_target_"} <= accepted
    assert {f.name for f in dataclasses.fields(schema)} - {"_target_"} <= accepted
    if name in ("digits", "synthetic"):
        dm = instantiate(config.dataset)
        assert dm.seed == 7
        dm.setup()
        assert len(dm.val_set) == config.dataset.val_size
    else:
        # Hydra wraps the error but keeps its message, which names the folder it looked in.
        with pytest.raises((FileNotFoundError, InstantiationException), match=re.escape(str(tmp_path))):
            instantiate(config.dataset)


def test_augmentation_is_a_function_of_seed_epoch_and_sample_whatever_the_workers() -> None:
    from prunelab.data import DigitsDataModule

    def epoch_batches(num_workers: int, epoch: int) -> list[torch.Tensor]:
        loader = DigitsDataModule(num_workers=num_workers, batch_size=256, seed=3).train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [x for x, _ in loader]

    main = epoch_batches(0, 1)
    # Another epoch crops differently; the same epoch again (e.g. after a resume, or in worker
    # processes) gives the very same tensors.
    assert not torch.equal(main[0], epoch_batches(0, 2)[0])
    workers = epoch_batches(2, 1)
    assert len(main) == len(workers) and all(torch.equal(a, b) for a, b in zip(main, workers))
    torch.manual_seed(123)
    assert all(torch.equal(a, b) for a, b in zip(main, epoch_batches(0, 1)))


def test_training_on_validation_images_puts_them_back() -> None:
    dm = SyntheticDataModule(val_size=32, train_size=256, batch_size=512)
    plain = len(next(iter(dm.train_dataloader()))[1])
    dm.train_on_validation(True)
    assert len(next(iter(dm.train_dataloader()))[1]) == plain + 32 == 256
    assert dm.val_dataloader().dataset is dm.test_set
    dm.train_on_validation(False)
    assert len(next(iter(dm.train_dataloader()))[1]) == plain and dm.val_dataloader().dataset is dm.val_set
