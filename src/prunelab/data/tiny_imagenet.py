"""Tiny ImageNet (200 classes, 64x64) from the standard ``tiny-imagenet-200`` layout, read lazily."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from prunelab.data.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FileSource,
    ImageDataModule,
    image_transform,
    resolve_root,
)
from prunelab.errors import ConfigError

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
FOLDER = "tiny-imagenet-200"
HOW_TO_GET = (
    f"Download {TINY_IMAGENET_URL}, unzip it and pass dataset.root=<the tiny-imagenet-200 folder or its parent>."
)


def _jpeg_files(directory: Path) -> list[str]:
    """The sorted JPEG file paths in one folder."""
    with os.scandir(directory) as entries:
        return sorted(e.path for e in entries if e.is_file() and e.name.lower().endswith((".jpeg", ".jpg")))


class TinyImageNetDataModule(ImageDataModule):
    """Tiny ImageNet: the training images form the pool for train and validation, the official val set is the test set.

    Class indices follow the sorted wnids (the ImageFolder convention). Greyscale images are converted to
    RGB. Images are read from disk per item, never all held in memory.
    """

    name = "tiny_imagenet"

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
        random_resized_crop: bool = False,
    ) -> None:
        super().__init__(root, batch_size, eval_batch_size, num_workers, val_size, seed, augment, subset)
        self.in_channels = 3
        self.image_size = 64
        self.random_resized_crop = random_resized_crop
        self.wnids = self._read_wnids()
        self.num_classes = len(self.wnids)

    def data_dir(self) -> Path:
        """The ``tiny-imagenet-200`` folder, whether ``root`` is that folder or its parent."""
        root = resolve_root(self.root)
        for candidate in (root / FOLDER, root):
            if (candidate / "wnids.txt").is_file():
                return candidate
        # A folder that has the dataset's sub-folders but no wnids.txt is an incomplete copy.
        for candidate in (root / FOLDER, root):
            if (candidate / "train").is_dir() or (candidate / "val").is_dir():
                raise FileNotFoundError(
                    f"Tiny ImageNet: {candidate / 'wnids.txt'} is missing (root={str(self.root)!r}); the copy "
                    f"is incomplete. {HOW_TO_GET}"
                )
        raise FileNotFoundError(
            f"Tiny ImageNet not found: looked for {root / FOLDER} and {root} (root={str(self.root)!r}). {HOW_TO_GET}"
        )

    def _read_wnids(self) -> list[str]:
        """The class wnids listed in ``wnids.txt``, sorted so that indices match ImageFolder's."""
        path = self.data_dir() / "wnids.txt"
        wnids = sorted({line.strip() for line in path.read_text().splitlines() if line.strip()})
        if not wnids:
            raise ConfigError(f"{path} lists no classes. {HOW_TO_GET}")
        return wnids

    def _load_sources(self) -> tuple[Dataset, Dataset]:
        directory = self.data_dir()
        class_index = {wnid: i for i, wnid in enumerate(self.wnids)}

        # Training images live in train/<wnid>/images/.
        train_samples: list[tuple[str, int]] = []
        for wnid in self.wnids:
            images_dir = directory / "train" / wnid / "images"
            if not images_dir.is_dir():
                raise FileNotFoundError(f"Tiny ImageNet: missing training folder {images_dir}. {HOW_TO_GET}")
            files = _jpeg_files(images_dir)
            if not files:
                raise FileNotFoundError(f"Tiny ImageNet: no JPEG images in {images_dir}. {HOW_TO_GET}")
            train_samples.extend((path, class_index[wnid]) for path in files)

        # The official validation set is flat; its labels come from the tab-separated annotations.
        annotations = directory / "val" / "val_annotations.txt"
        images_dir = directory / "val" / "images"
        if not annotations.is_file() or not images_dir.is_dir():
            raise FileNotFoundError(
                f"Tiny ImageNet: missing {annotations} or {images_dir} (the official validation set, used "
                f"as the test split). {HOW_TO_GET}"
            )
        present = set(os.listdir(images_dir))
        test_samples = []
        for number, line in enumerate(annotations.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2:
                raise ConfigError(
                    f"{annotations}:{number} is malformed: expected 'file<TAB>wnid<TAB>box', got {line!r}"
                )
            file_name, wnid = fields[0].strip(), fields[1].strip()
            if wnid not in class_index:
                raise ConfigError(f"{annotations}:{number}: wnid {wnid!r} is not listed in {directory / 'wnids.txt'}")
            if file_name not in present:
                raise FileNotFoundError(f"{annotations}:{number}: image {images_dir / file_name} does not exist")
            test_samples.append((str(images_dir / file_name), class_index[wnid]))
        if not test_samples:
            raise ConfigError(f"{annotations} lists no images. {HOW_TO_GET}")
        return FileSource(train_samples), FileSource(test_samples)

    def _transforms(self) -> tuple[Callable[[Any], torch.Tensor], Callable[[Any], torch.Tensor]]:
        from torchvision.transforms import v2

        if self.random_resized_crop:
            crop = v2.RandomResizedCrop(self.image_size, scale=(0.35, 1.0), antialias=True)
        else:
            crop = v2.RandomCrop(self.image_size, padding=8)
        train = image_transform([crop, v2.RandomHorizontalFlip()], IMAGENET_MEAN, IMAGENET_STD)
        return train, image_transform([], IMAGENET_MEAN, IMAGENET_STD)
