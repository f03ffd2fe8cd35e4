"""Shared machinery for every prunelab datamodule.

A concrete datamodule only says where its raw images come from (a training pool and a test set) and
which transforms to apply; this base class carves the seeded validation split, applies the ``subset``
option and builds every loader the same way, so that all datasets behave identically in the pipeline.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from prunelab.distributed import Shard, ShardedBatches, world
from prunelab.errors import ConfigError


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


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the system tells it, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class TransformedSubset(Dataset):
    """A view on some items of a raw source with one transform applied to each image.

    Besides plain positions it accepts the sample ids an `EpochShuffle` yields (epoch * len + position).
    With a `seed`, each item's transform draws its randomness from torch's generator seeded by (`seed`,
    epoch, position), so augmentation is a function of the epoch and the sample alone, whichever process
    (main or data-loader worker) applies it and however often the run was resumed.
    """

    def __init__(
        self,
        source: Dataset,
        indices: torch.Tensor | None,
        transform: Callable[[Any], torch.Tensor] | None,
        seed: int | None = None,
    ) -> None:
        self.source = source
        self.indices = indices
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.source) if self.indices is None else len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        epoch, index = divmod(int(index), len(self))
        source_index = int(self.indices[index]) if self.indices is not None else index
        image, label = self.source[source_index]
        if self.transform is None:
            return image, label
        if self.seed is None:
            return self.transform(image), label
        # The transforms draw from torch's default CPU generator: seed it for this sample, then restore it.
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(zlib.crc32(f"{self.seed}/{epoch}/{index}".encode()))
        try:
            return self.transform(image), label
        finally:
            generator.set_state(state)

    @property
    def labels(self) -> torch.Tensor:
        """The labels of the items in this view, in order, without loading any image."""
        labels = self.source.labels
        return labels if self.indices is None else labels[self.indices]


class EpochShuffle(Sampler[int]):
    """A random order of the training set that is a function of the seed and the epoch alone.

    Lightning calls `set_epoch` at the start of every epoch (as for torch's DistributedSampler), so a
    run resumed at epoch e sees the same order in epoch e as one that never stopped. It yields sample
    ids, epoch * size + position, which `TransformedSubset` turns back into positions and uses to seed
    each sample's augmentation.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_once(self, count: int) -> None:
        """Leave out the first `count` samples of the next pass only (a fit resumed inside an epoch)."""
        self.skip = count

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        offset = self.epoch * self.size
        skip, self.skip = self.skip, 0
        return iter((torch.randperm(self.size, generator=generator)[skip:] + offset).tolist())

    def __len__(self) -> int:
        return self.size


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
    #: The data the pipeline may ask for (a datamodule over a user's loaders may lack some).
    splits: tuple[str, ...] = ("train", "val", "test")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One example's shape, (C, H, W)."""
        return (self.in_channels, self.image_size, self.image_size)

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
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        if val_size < 0:
            raise ConfigError(f"val_size must be >= 0, got {val_size}")
        if subset is not None and subset < 1:
            raise ConfigError(f"subset must be a positive number of images or None, got {subset}")
        self.root = root
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.seed = seed
        self.augment = augment
        self.subset = subset
        self._is_set_up = False
        self._start_epoch = self._start_batch = 0
        self._with_val = False

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
            raise ConfigError(
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
        self.train_set = TransformedSubset(train_source, self.train_indices, train_transform, seed=self.seed)
        both = torch.cat([self.train_indices, self.val_indices]).sort().values
        self.train_val_set = TransformedSubset(train_source, both, train_transform, seed=self.seed)
        self.train_eval_set = TransformedSubset(train_source, self.train_indices, eval_transform)
        self.val_set = TransformedSubset(train_source, self.val_indices, eval_transform) if self.val_size else None
        self.test_set = TransformedSubset(test_source, None, eval_transform)
        self._is_set_up = True

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, shard: bool = False) -> DataLoader:
        """Builds a loader with the options every split shares (shuffled by epoch, see `EpochShuffle`).

        `shard` (the loaders Lightning asks for): in a process group of several ranks, this rank's
        share, `batch_size` being the global batch (see `prunelab.distributed`).
        """
        rank, size = world() if shard else (0, 1)
        sampler = EpochShuffle(len(dataset), self.seed) if shuffle else None
        # No more workers than usable cores (a preset's 4 on a 2-core laptop made PyTorch warn at every loader); the
        # batches do not depend on it: each sample's augmentation is a function of the seed, the epoch and the sample.
        workers = min(self.num_workers, usable_cores())
        common = dict(
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
        )
        if size > 1 and shuffle:
            return DataLoader(dataset, batch_sampler=ShardedBatches(sampler, batch_size, rank, size), **common)
        if size > 1:
            sampler = Shard(len(dataset), rank, size)
            batch_size = math.ceil(batch_size / size)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False, **common)

    @staticmethod
    def _sampler(loader: DataLoader) -> EpochShuffle:
        return loader.batch_sampler.sampler if isinstance(loader.batch_sampler, ShardedBatches) else loader.sampler

    def train_dataloader(self, epoch: int | None = None, batch_size: int | None = None) -> DataLoader:
        """The shuffled training loader, in the order of `epoch` (default: the epoch the current fit starts in).

        `batch_size` overrides the dataset's (e.g. a method's own search batches).

        Lightning creates a resumed fit's iterator before it sets the sampler's epoch, and data-loader
        workers fetch indices as soon as the iterator exists, so the sampler must start at that epoch:
        it comes with the checkpoint the fit resumes from (`load_state_dict`).
        """
        self.setup("fit")
        dataset = self.train_val_set if self._with_val else self.train_set
        loader = self._loader(dataset, batch_size or self.batch_size, shuffle=True, shard=epoch is None)
        self._sampler(loader).set_epoch(self._start_epoch if epoch is None else epoch)
        if epoch is None and self._start_batch:
            self._sampler(loader).skip_once(self._start_batch * self.batch_size)
        return loader

    def train_on_validation(self, enabled: bool) -> None:
        """Put the validation images back into the training set (e.g. for a final training stage).

        While enabled, training sees the whole training pool and validation runs on the test set, as it
        does with `val_size` 0.
        """
        self._with_val = bool(enabled)

    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning checkpoints: where a fit resumed from this checkpoint goes on.

        That is the epoch it trains next and, for a checkpoint taken inside an epoch, the batches of
        that epoch already trained (their samples are left out of the resumed epoch).
        """
        trainer = self.trainer
        if trainer is None:
            return {}
        epochs = trainer.fit_loop.epoch_progress.current
        inside = epochs.processed < epochs.started
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed if inside else 0
        return {"epoch": int(epochs.processed), "batch": int(batches)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._start_epoch = int(state.get("epoch", 0))
        self._start_batch = int(state.get("batch", 0))

    def teardown(self, stage: str) -> None:
        # The next fit starts at the beginning unless it too resumes from a checkpoint.
        if stage == "fit":
            self._start_epoch = self._start_batch = 0

    def train_eval_dataloader(self) -> DataLoader:
        """Training images with test-time transforms in a fixed order, for BN re-estimation and criteria."""
        self.setup("fit")
        return self._loader(self.train_eval_set, self.eval_batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        """The carved validation split, or the test set when ``val_size`` is 0 so validation still runs."""
        self.setup("validate")
        if self.val_set is None or self._with_val:
            return self.test_dataloader()
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False, shard=True)

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False, shard=True)

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
