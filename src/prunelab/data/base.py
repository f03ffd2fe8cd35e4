"""Shared machinery for every prunelab datamodule.

A concrete datamodule only says where its raw images come from (a training pool and a test set) and
which transforms to apply; this base class carves the seeded validation split, applies the ``subset``
option and builds every loader the same way, so that all datasets behave identically in the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


class TensorSource(Dataset):
    """Raw images held in memory as one tensor, returned untransformed with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


class FileSource(Dataset):
    """Images read lazily from disk with PIL and converted to RGB, paired with integer labels."""

    def __init__(self, samples: Sequence[tuple[str, int]]) -> None:
        self.samples = list(samples)
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        path, label = self.samples[index]
        # Reading inside the context manager closes the file at once, which matters with many workers.
        with Image.open(path) as image:
            return image.convert("RGB"), label


class TransformedSubset(Dataset):
    """A view on some items of a raw source with one transform applied to each image."""

    def __init__(
        self,
        source: Dataset,
        indices: torch.Tensor | None,
        transform: Callable[[Any], torch.Tensor] | None,
    ) -> None:
        self.source = source
        self.indices = indices
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source) if self.indices is None else len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.indices is not None:
            index = int(self.indices[index])
        image, label = self.source[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    @property
    def labels(self) -> torch.Tensor:
        """The labels of the items in this view, in order, without loading any image."""
        labels = self.source.labels
        return labels if self.indices is None else labels[self.indices]


def resolve_root(root: str | Path) -> Path:
    """Turns a user-given data path into an absolute one so that error messages say exactly where."""
    return Path(root).expanduser().resolve()


class ImageDataModule(L.LightningDataModule):
    """Base datamodule: a training pool split into train and validation, plus a fixed test set.

    The validation split is ``val_size`` images drawn from the training pool by a permutation seeded
    with ``seed``; it and ``train_eval_dataloader`` use the test-time transforms. ``subset`` keeps only
    the first N images of the training split (after the validation split is carved, so that the
    validation images do not change with ``subset``). Subclasses set ``name``, ``num_classes``,
    ``in_channels`` and ``image_size`` in their constructor and implement ``_load_sources`` and
    ``_transforms``.
    """

    name: str = "image"
    num_classes: int = 0
    in_channels: int = 3
    image_size: int = 0

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
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}")
        if subset is not None and subset < 1:
            raise ValueError(f"subset must be a positive number of images or None, got {subset}")
        self.root = root
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.seed = seed
        self.augment = augment
        self.subset = subset
        self._is_set_up = False

    def _load_sources(self) -> tuple[Dataset, Dataset]:
        """Returns the raw training pool and the raw test set; items are (image, label)."""
        raise NotImplementedError

    def _transforms(self) -> tuple[Callable[[Any], torch.Tensor] | None, Callable[[Any], torch.Tensor] | None]:
        """Returns the training-time (augmenting) and the test-time transform."""
        raise NotImplementedError

    def split_indices(self, pool_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Deterministically splits a pool of ``pool_size`` images into train and validation indices.

        Both index lists are sorted, so the training split keeps the pool's order (``subset`` then
        means "the first N training images").
        """
        if self.val_size >= pool_size:
            raise ValueError(
                f"{self.name}: val_size={self.val_size} must be smaller than the number of training "
                f"images ({pool_size}); pass a smaller dataset.val_size"
            )
        generator = torch.Generator().manual_seed(self.seed)
        permutation = torch.randperm(pool_size, generator=generator)
        val_indices = permutation[: self.val_size].sort().values
        train_indices = permutation[self.val_size :].sort().values
        if self.subset is not None:
            train_indices = train_indices[: self.subset]
        return train_indices, val_indices

    def setup(self, stage: str | None = None) -> None:
        if self._is_set_up:
            return
        train_source, test_source = self._load_sources()
        train_transform, eval_transform = self._transforms()
        if not self.augment:
            train_transform = eval_transform
        self.train_indices, self.val_indices = self.split_indices(len(train_source))
        self.train_set = TransformedSubset(train_source, self.train_indices, train_transform)
        self.train_eval_set = TransformedSubset(train_source, self.train_indices, eval_transform)
        self.val_set = TransformedSubset(train_source, self.val_indices, eval_transform) if self.val_size else None
        self.test_set = TransformedSubset(test_source, None, eval_transform)
        self._is_set_up = True

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        """Builds a loader with the options every split shares."""
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def train_eval_dataloader(self) -> DataLoader:
        """Training images with test-time transforms in a fixed order, for BN re-estimation and criteria."""
        self.setup("fit")
        return self._loader(self.train_eval_set, self.eval_batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        """The carved validation split, or the test set when ``val_size`` is 0 so validation still runs."""
        self.setup("validate")
        if self.val_set is None:
            return self.test_dataloader()
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, num_classes={self.num_classes}, "
            f"image_size={self.image_size}, root={str(self.root)!r})"
        )


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_transform(
    augmentation: Sequence[Callable[[Any], Any]],
    mean: Sequence[float],
    std: Sequence[float],
) -> Callable[[Any], torch.Tensor]:
    """Composes augmentation (or resizing) with conversion to a normalised float tensor.

    The augmentation runs on the raw item (a uint8 tensor or a PIL image, whichever is cheaper for the
    source); the result is a plain tensor, so batches collate into ordinary tensors rather than
    torchvision's tensor subclasses.
    """
    from torchvision.transforms import v2

    return v2.Compose(
        [
            *augmentation,
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
            v2.ToPureTensor(),
        ]
    )
