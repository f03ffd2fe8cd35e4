"""CIFAR-10 and CIFAR-100 from the standard python-format pickles, held in memory as uint8."""

from __future__ import annotations

import hashlib
import pickle
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from prunelab.data.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDataModule,
    TensorSource,
    image_transform,
    resolve_root,
)
from prunelab.errors import ConfigError

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


def _md5(path: Path) -> str:
    """The md5 hex digest of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads one CIFAR pickle and checks its shape; returns images (N, 3, 32, 32) uint8 and labels."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as error:
        raise ConfigError(f"{path} is not a readable CIFAR pickle: {error}") from error
    if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise ConfigError(f"{path} is malformed: expected a dict with 'data' and '{label_key}', found {keys}")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise ConfigError(
            f"{path} is malformed: 'data' has shape {data.shape}, expected (N, 3072) rows of 3x32x32 pixels"
        )
    if data.dtype != np.uint8:
        raise ConfigError(f"{path} is malformed: 'data' has dtype {data.dtype}, expected uint8")
    if labels.ndim != 1 or len(labels) != len(data):
        raise ConfigError(f"{path} is malformed: {len(data)} images but {labels.size} labels in '{label_key}'")
    return data.reshape(-1, 3, 32, 32), labels


class _CIFARDataModule(ImageDataModule):
    """Common loader for both CIFAR variants; subclasses name the files and the label key."""

    name = "cifar"
    display_name = "CIFAR"
    base_folder = ""
    torchvision_class = ""
    label_key = "labels"
    canonical_train_size = 50000
    canonical_test_size = 10000

    def __init__(
        self,
        root: str = "",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_size: int = 0,
        seed: int = 0,
        augment: bool = True,
        subset: int | None = None,
        download: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__(root, batch_size, eval_batch_size, num_workers, val_size, seed, augment, subset)
        self.in_channels = 3
        self.image_size = 32
        self.download = download
        self.mean = tuple(mean)
        self.std = tuple(std)
        # Fail at construction when the data cannot appear later; with download it may appear in prepare_data.
        if not download:
            self.data_dir()

    @classmethod
    def _file_lists(cls) -> tuple[list[list[str]], list[list[str]]]:
        """The (file name, md5) lists torchvision knows for the canonical training and test files."""
        import torchvision.datasets

        dataset_class = getattr(torchvision.datasets, cls.torchvision_class)
        return dataset_class.train_list, dataset_class.test_list

    def _find_data_dir(self) -> Path | None:
        """The folder holding the batch files, whether ``root`` is that folder or its parent."""
        root = resolve_root(self.root)
        first_file = self._file_lists()[0][0][0]
        for candidate in (root / self.base_folder, root):
            if (candidate / first_file).is_file():
                return candidate
        return None

    def data_dir(self) -> Path:
        """The folder holding the batch files; raises with where it looked and how to get the data."""
        found = self._find_data_dir()
        if found is not None:
            return found
        root = resolve_root(self.root)
        raise FileNotFoundError(
            f"{self.display_name} not found: looked for {root / self.base_folder} and {root} "
            f"(root={str(self.root)!r}). Get it with dataset.download=true when online, or download the "
            f"python version from {CIFAR_URL}, extract it and pass dataset.root=<the folder that holds "
            f"{self.base_folder}/>."
        )

    def prepare_data(self) -> None:
        if self.download and self._find_data_dir() is None:
            import torchvision.datasets

            dataset_class = getattr(torchvision.datasets, self.torchvision_class)
            dataset_class(str(resolve_root(self.root)), train=True, download=True)
        self.data_dir()

    def _read_split(
        self, directory: Path, files: list[list[str]], canonical_size: int
    ) -> tuple[np.ndarray, np.ndarray, bool]:
        """Reads and concatenates the files of one split; the flag says whether it is canonical."""
        missing = [name for name, _ in files if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{self.display_name} directory {directory} is incomplete: missing {', '.join(missing)}. "
                f"Download it again from {CIFAR_URL} or with dataset.download=true."
            )
        images, labels, canonical = [], [], True
        per_file = canonical_size // len(files)
        for name, md5 in files:
            path = directory / name
            data, targets = read_cifar_batch(path, self.label_key)
            if len(data) == per_file:
                # A file of canonical length must be the canonical file, byte for byte.
                if _md5(path) != md5:
                    raise ConfigError(
                        f"{path} has the canonical number of images but its md5 is not {md5}: the file is "
                        f"corrupted; download it again from {CIFAR_URL}"
                    )
            else:
                canonical = False
            images.append(data)
            labels.append(targets)
        return np.concatenate(images), np.concatenate(labels), canonical

    def _load_sources(self) -> tuple[Dataset, Dataset]:
        directory = self.data_dir()
        train_files, test_files = self._file_lists()
        train_x, train_y, train_ok = self._read_split(directory, train_files, self.canonical_train_size)
        test_x, test_y, test_ok = self._read_split(directory, test_files, self.canonical_test_size)
        for split, labels in (("training", train_y), ("test", test_y)):
            if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ConfigError(
                    f"{directory}: {split} labels span {labels.min()}..{labels.max()}, expected "
                    f"0..{self.num_classes - 1}"
                )
        if not (train_ok and test_ok):
            warnings.warn(
                f"{directory} is not the canonical {self.display_name} set: it has {len(train_y):,} training "
                f"and {len(test_y):,} test images (canonical: {self.canonical_train_size:,} and "
                f"{self.canonical_test_size:,}); shapes were checked, md5 sums only for full-length files.",
                stacklevel=3,
            )
        train = TensorSource(torch.from_numpy(train_x), torch.from_numpy(train_y))
        test = TensorSource(torch.from_numpy(test_x), torch.from_numpy(test_y))
        return train, test

    def _transforms(self) -> tuple[Callable[[Any], torch.Tensor], Callable[[Any], torch.Tensor]]:
        from torchvision.transforms import v2

        augmentation = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]
        return image_transform(augmentation, self.mean, self.std), image_transform([], self.mean, self.std)


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 (10 classes, 32x32) from ``cifar-10-batches-py``; subsets of the files are accepted with a warning."""

    name = "cifar10"
    display_name = "CIFAR-10"
    base_folder = "cifar-10-batches-py"
    torchvision_class = "CIFAR10"
    label_key = "labels"
    num_classes = 10


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 with its 100 fine labels, 32x32, from ``cifar-100-python``."""

    name = "cifar100"
    display_name = "CIFAR-100"
    base_folder = "cifar-100-python"
    torchvision_class = "CIFAR100"
    label_key = "fine_labels"
    num_classes = 100
