"""A datamodule over a user's own DataLoaders, for pruning a model from Python (`prunelab.prune`)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import ConcatDataset, DataLoader

from prunelab.validate import ConfigError


class LoaderDataModule(L.LightningDataModule):
    """The splits a user hands over as DataLoaders of (inputs, integer labels) batches, each optional.

    `splits` names what the pipeline may ask for: "train" with a training loader, "val" and "test"
    with a validation or a test loader (either stands in for the other, as a prunelab dataset's test
    set stands in for an empty validation split). `input_shape` is one example's shape (any number of
    dimensions, not necessarily square) and `num_classes` the model's outputs.

    Unlike prunelab's own datasets, the loaders are used as they come: their order, augmentation and
    workers are the user's, so a run resumed mid-stage sees the batches the loader gives then, and the
    loaders are not sharded over several processes. `train_eval_dataloader` (what data-driven scores
    read) is the training loader itself.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        train: DataLoader | None = None,
        val: DataLoader | None = None,
        test: DataLoader | None = None,
    ) -> None:
        super().__init__()
        self.input_shape = tuple(int(n) for n in input_shape)
        self.num_classes = int(num_classes)
        self.train, self.val, self.test = train, val, test
        self.splits = tuple(
            name for name, present in (("train", train), ("val", val or test), ("test", test or val)) if present is not None
        )
        self.batch_size = int(getattr(train, "batch_size", None) or 1)
        self._with_val = False

    def train_dataloader(self, epoch: int | None = None, batch_size: int | None = None) -> DataLoader:
        """The training loader (with the validation images too while `train_on_validation` is on).

        `batch_size` other than the loader's (a method's own batches) gives a loader over the same
        dataset in an order seeded by `epoch`.
        """
        if self.train is None:
            raise ConfigError("no training loader was given (pass train=<DataLoader>)")
        loader = self.train
        if self._with_val and self.val is not None:
            loader = self._reloaded(ConcatDataset([self.train.dataset, self.val.dataset]), self.batch_size, epoch)
        if batch_size is not None and batch_size != self.batch_size:
            loader = self._reloaded(loader.dataset, batch_size, epoch)
        return loader

    def _reloaded(self, dataset: Any, batch_size: int, epoch: int | None) -> DataLoader:
        generator = torch.Generator().manual_seed(int(epoch or 0))
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=self.train.collate_fn)

    def train_eval_dataloader(self) -> DataLoader:
        return self.train_dataloader()

    def train_on_validation(self, enabled: bool) -> None:
        """Train on the validation images too (validation then runs on the test loader, when there is one)."""
        self._with_val = bool(enabled)

    def val_dataloader(self) -> DataLoader | list:
        if self._with_val or self.val is None:
            return self.test if self.test is not None else []
        return self.val

    def test_dataloader(self) -> DataLoader | list:
        found = self.test if self.test is not None else self.val
        return found if found is not None else []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(splits={self.splits}, input_shape={self.input_shape}, num_classes={self.num_classes})"
