"""ImageNet (ILSVRC-2012) from an ImageFolder layout, with the standard ResNet/MobileNet preprocessing."""

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

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
HOW_TO_GET = (
    "Download ILSVRC-2012 from https://image-net.org/download.php (registration required), arrange it as "
    "<root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG (the flat validation images must be moved "
    "into class folders) and pass dataset.root=<root>."
)


def _class_folders(directory: Path) -> list[str]:
    """The sorted names of the sub-folders of ``directory``."""
    with os.scandir(directory) as entries:
        return sorted(e.name for e in entries if e.is_dir())


def _image_files(directory: Path) -> list[str]:
    """The sorted image file paths directly inside ``directory``."""
    with os.scandir(directory) as entries:
        return sorted(e.path for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))


class ImageNetDataModule(ImageDataModule):
    """ImageNet: ``root/val`` is the test set; validation, when asked for, is carved from ``root/train``.

    The number of classes is the number of class folders in ``root/train``, read at construction; class
    indices follow the sorted folder names, and ``root/val`` uses the same mapping.
    """

    name = "imagenet"

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
        image_size: int = 224,
    ) -> None:
        super().__init__(root, batch_size, eval_batch_size, num_workers, val_size, seed, augment, subset)
        self.in_channels = 3
        self.image_size = image_size
        self.classes = self._read_classes()
        self.num_classes = len(self.classes)

    def _read_classes(self) -> list[str]:
        """The class folder names of the training split; raises with where it looked when absent."""
        root = resolve_root(self.root)
        missing = [root / split for split in ("train", "val") if not (root / split).is_dir()]
        if missing:
            where = " and ".join(str(path) for path in missing)
            raise FileNotFoundError(f"ImageNet not found: no folder {where} (root={str(self.root)!r}). {HOW_TO_GET}")
        classes = _class_folders(root / "train")
        if not classes:
            raise FileNotFoundError(f"ImageNet: {root / 'train'} has no class folders. {HOW_TO_GET}")
        return classes

    def _scan(self, split_dir: Path, require_all: bool) -> list[tuple[str, int]]:
        """Lists (path, label) for every image in the class folders of one split."""
        samples: list[tuple[str, int]] = []
        for index, name in enumerate(self.classes):
            class_dir = split_dir / name
            if not class_dir.is_dir():
                if require_all:
                    raise FileNotFoundError(f"ImageNet: missing class folder {class_dir}. {HOW_TO_GET}")
                continue
            samples.extend((path, index) for path in _image_files(class_dir))
        if not samples:
            raise FileNotFoundError(f"ImageNet: no images found in the class folders of {split_dir}. {HOW_TO_GET}")
        return samples

    def _load_sources(self) -> tuple[Dataset, Dataset]:
        root = resolve_root(self.root)
        extra = sorted(set(_class_folders(root / "val")) - set(self.classes))
        if extra:
            raise ConfigError(f"ImageNet: {root / 'val'} has class folders absent from {root / 'train'}: {extra[:5]}")
        return FileSource(self._scan(root / "train", True)), FileSource(self._scan(root / "val", False))

    def _transforms(self) -> tuple[Callable[[Any], torch.Tensor], Callable[[Any], torch.Tensor]]:
        from torchvision.transforms import v2

        train = [v2.RandomResizedCrop(self.image_size, antialias=True), v2.RandomHorizontalFlip()]
        # The usual 256 -> 224 ratio, kept for other input sizes.
        resize = int(round(self.image_size * 256 / 224))
        evaluation = [v2.Resize(resize, antialias=True), v2.CenterCrop(self.image_size)]
        return (
            image_transform(train, IMAGENET_MEAN, IMAGENET_STD),
            image_transform(evaluation, IMAGENET_MEAN, IMAGENET_STD),
        )
