"""A folder of the user's own images: `dataset=image_folder dataset.root=DIR`, any number of classes.

DIR holds `train/<class>/*` and `val/<class>/*` (any image format PIL reads: png, jpg, ...), and may hold
`test/<class>/*`. The folders are scanned with torchvision's `ImageFolder`, so class indices follow the
sorted class-folder names; the images are read lazily, converted to RGB and resized to one size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from prunelab.data.base import FileSource, ImageDataModule, TransformedSubset, image_transform, resolve_root
from prunelab.errors import ConfigError

log = logging.getLogger("prunelab")

LAYOUT = "DIR/train/<class>/*.png|jpg and DIR/val/<class>/... (optionally DIR/test/<class>/...)"


class ImageFolderDataModule(ImageDataModule):
    """Images in class folders: `root/train` trains, `root/val` validates or tests, `root/test` (optional) tests.

    With `root/test`, `root/val` is the validation split and `val_size` must stay 0. Without it, `root/val`
    is the test set (as ImageNet's validation images are), and validation runs on it too unless `val_size`
    images are carved from `root/train` by a seeded permutation (do that for sweeps: they tune on `val/acc`).
    Every split must have the training classes, each with at least one image; anything else is a one-line
    `ConfigError` at construction, before any work.

    Images are resized (shorter side to `resize`, default `image_size`) and center-cropped to `image_size`;
    training augments with a random crop (padded by `image_size // 8`, or `random_resized_crop`) and a
    horizontal flip unless `augment` is off. `mean` / `std` normalise each channel; left null, they are
    computed on up to `stats_images` training images (resized and cropped, not augmented), drawn by the seed.
    Sample order and augmentation follow the base contract, so a resumed run sees the same batches.
    """

    name = "image_folder"

    def __init__(
        self,
        root: str = "",
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_size: int = 0,
        seed: int = 0,
        augment: bool = True,
        subset: int | None = None,
        image_size: int = 32,
        resize: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        stats_images: int = 1000,
        random_resized_crop: bool = False,
    ) -> None:
        super().__init__(root, batch_size, eval_batch_size, num_workers, val_size, seed, augment, subset)
        if int(image_size) < 1 or (resize is not None and int(resize) < int(image_size)):
            raise ConfigError(f"dataset.image_size={image_size} must be >= 1 and dataset.resize={resize} null or >= it")
        if (mean is None) != (std is None) or (mean is not None and not len(mean) == len(std) == 3):
            raise ConfigError(
                f"dataset.mean={mean} and dataset.std={std}: give both, three values each (RGB), or neither"
            )
        if std is not None and min(std) <= 0:
            raise ConfigError(f"dataset.std={std} must be positive")
        self.in_channels = 3
        self.image_size = int(image_size)
        self.resize = int(resize) if resize is not None else self.image_size
        self.mean = tuple(float(m) for m in mean) if mean is not None else None
        self.std = tuple(float(s) for s in std) if std is not None else None
        self.stats_images = int(stats_images)
        self.random_resized_crop = bool(random_resized_crop)
        self.classes, self.samples = self._scan()
        self.num_classes = len(self.classes)
        if "test" in self.samples and self.val_size:
            raise ConfigError(
                f"dataset.val_size={self.val_size}: {resolve_root(self.root) / 'val'} is the validation split "
                f"(a test/ folder is there), so no images are carved from train/; leave dataset.val_size=0"
            )
        if self.val_size >= len(self.samples["train"]):
            raise ConfigError(
                f"dataset.val_size={self.val_size} must be smaller than the number of training images "
                f"({len(self.samples['train'])} in {resolve_root(self.root) / 'train'})"
            )
        if "test" in self.samples:
            # The pool is train/ then val/; `split_indices` takes val/ as the validation split.
            self.val_size = len(self.samples["val"])

    def _scan(self) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
        """The training classes and the (path, class index) samples of each split folder found."""
        from torchvision.datasets import ImageFolder

        root = resolve_root(self.root)
        missing = [name for name in ("train", "val") if not (root / name).is_dir()]
        if missing:
            raise ConfigError(
                f"dataset.root={self.root}: no {' or '.join(f'{name}/ folder' for name in missing)} in {root}; "
                f"image_folder expects {LAYOUT}"
            )
        splits = [name for name in ("train", "val", "test") if (root / name).is_dir()]
        found: dict[str, Any] = {}
        for name in splits:
            try:
                found[name] = ImageFolder(str(root / name), allow_empty=False)
            except FileNotFoundError as err:
                raise ConfigError(f"dataset.root={self.root}: {name}/: {err}".rstrip(". ")) from None
        classes = found["train"].classes
        for name in splits[1:]:
            other = found[name].classes
            if other != classes:
                absent, extra = sorted(set(classes) - set(other)), sorted(set(other) - set(classes))
                parts = ([f"lacks {_few(absent)} of train/"] if absent else []) + (
                    [f"has {_few(extra)} that train/ lacks"] if extra else []
                )
                raise ConfigError(
                    f"dataset.root={self.root}: the class folders of {name}/ differ from train/'s: {name}/ "
                    f"{' and '.join(parts)}"
                )
        return classes, {name: list(folder.samples) for name, folder in found.items()}

    def split_indices(self, pool_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """With a test/ folder, the pool is train/ then val/ and the split is exactly that; else the base's carving."""
        if "test" not in self.samples:
            return super().split_indices(pool_size)
        train = len(self.samples["train"])
        indices = torch.arange(pool_size)
        train_indices = indices[:train] if self.subset is None else indices[: min(train, self.subset)]
        return train_indices, indices[train:]

    def _load_sources(self) -> tuple[Dataset, Dataset]:
        if "test" in self.samples:
            return FileSource(self.samples["train"] + self.samples["val"]), FileSource(self.samples["test"])
        return FileSource(self.samples["train"]), FileSource(self.samples["val"])

    def _resized(self) -> list[Callable[[Any], Any]]:
        from torchvision.transforms import v2

        return [v2.Resize(self.resize, antialias=True), v2.CenterCrop(self.image_size)]

    def _transforms(self) -> tuple[Callable[[Any], torch.Tensor], Callable[[Any], torch.Tensor]]:
        from torchvision.transforms import v2

        if self.mean is None:
            self.mean, self.std = self._statistics()
        if self.random_resized_crop:
            train = [v2.RandomResizedCrop(self.image_size, scale=(0.35, 1.0), antialias=True)]
        else:
            train = [*self._resized(), v2.RandomCrop(self.image_size, padding=self.image_size // 8)]
        return (
            image_transform([*train, v2.RandomHorizontalFlip()], self.mean, self.std),
            image_transform(self._resized(), self.mean, self.std),
        )

    def _statistics(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of up to `stats_images` training images (resized, not augmented), drawn by the
        seed."""
        samples = self.samples["train"]
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(self.seed))[: self.stats_images]
        plain = TransformedSubset(FileSource(samples), order, image_transform(self._resized(), (0.0,) * 3, (1.0,) * 3))
        total = torch.zeros(3, dtype=torch.float64)
        squares = torch.zeros(3, dtype=torch.float64)
        pixels = 0
        for index in range(len(plain)):
            image = plain[index][0].double()
            total += image.sum(dim=(1, 2))
            squares += (image**2).sum(dim=(1, 2))
            pixels += image[0].numel()
        mean = total / pixels
        std = (squares / pixels - mean**2).clamp_min(1e-12).sqrt()
        log.info(
            "image_folder: per-channel mean %s and std %s of %d training images (dataset.mean and dataset.std set "
            "them)",
            [round(float(m), 4) for m in mean],
            [round(float(s), 4) for s in std],
            len(plain),
        )
        return tuple(round(float(m), 6) for m in mean), tuple(round(max(float(s), 1e-3), 6) for s in std)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, num_classes={self.num_classes}, "
            f"image_size={self.image_size})"
        )


def _few(names: list[str], shown: int = 5) -> str:
    """Class names as a short list: the first `shown`, and how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return "class" + ("es " if len(names) > 1 else " ") + ", ".join(names[:shown]) + more
