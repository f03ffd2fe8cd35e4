"""A datamodule over a user's own DataLoaders: given from Python (`prunelab.prune`), or taken from a
LightningDataModule of the user's own class named on the command line (`adopt`)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import ConcatDataset, DataLoader

from prunelab.errors import ConfigError

# What the pipeline asks of a datamodule beyond Lightning's hooks.
PRUNELAB_INTERFACE = ("splits", "input_shape", "num_classes", "train_eval_dataloader", "train_on_validation")


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
            name
            for name, present in (("train", train), ("val", val or test), ("test", test or val))
            if present is not None
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
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=self.train.collate_fn
        )

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
        return (
            f"{type(self).__name__}(splits={self.splits}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes})"
        )


def adopt(datamodule: L.LightningDataModule, name: str = "") -> L.LightningDataModule:
    """A datamodule as the pipeline uses it: prunelab's own (or one with its interface) as it is, any other
    LightningDataModule (`dataset=custom dataset._target_=my_pkg.MyDataModule`) as a `LoaderDataModule` over
    the loaders its `train_dataloader`, `val_dataloader` and `test_dataloader` give (those it implements).

    Such a module is prepared and set up here (`prepare_data`, then `setup("fit")` and `setup("test")` once
    each); prunelab's own are prepared by the caller. The number of classes is its `num_classes` attribute,
    else the length of its training dataset's `classes` (as torchvision datasets have); one example's shape
    is its `input_shape` attribute, else that of the inputs of the first batch of its validation loader (else its
    test, else its training loader). Its loaders are used as they come (see `LoaderDataModule`). `name` (the
    `_target_`) names the module in the one-line `ConfigError` about what it lacks.
    """
    if all(hasattr(datamodule, attribute) for attribute in PRUNELAB_INTERFACE):
        return datamodule
    name = name or f"{type(datamodule).__module__}.{type(datamodule).__qualname__}"
    if not isinstance(datamodule, L.LightningDataModule):
        raise ConfigError(
            f"dataset._target_={name} made a {type(datamodule).__name__}, not a lightning LightningDataModule"
        )
    datamodule.prepare_data()
    loaders, stages = {}, set()
    for split, stage in (("train", "fit"), ("val", "fit"), ("test", "test")):
        hook = f"{split}_dataloader"
        if getattr(type(datamodule), hook) is getattr(L.LightningDataModule, hook):
            continue
        if stage not in stages:
            datamodule.setup(stage)
            stages.add(stage)
        loaders[split] = getattr(datamodule, hook)()
    if not loaders:
        raise ConfigError(
            f"dataset._target_={name} implements none of train_dataloader, val_dataloader, test_dataloader"
        )
    # An evaluation loader is read first where there is one: peeking at a shuffled loader would draw from its generator.
    first = next(loaders[split] for split in ("val", "test", "train") if split in loaders)
    input_shape = getattr(datamodule, "input_shape", None) or _first_inputs_shape(first, name)
    num_classes = getattr(datamodule, "num_classes", None)
    if num_classes is None:
        classes = next(
            (
                c
                for c in (getattr(getattr(loader, "dataset", None), "classes", None) for loader in loaders.values())
                if c is not None
            ),
            None,
        )
        if classes is None:
            raise ConfigError(
                f"dataset._target_={name}: prunelab cannot tell the number of classes; give the module a num_classes "
                "attribute (e.g. self.num_classes = 10 in its __init__)"
            )
        num_classes = len(classes)
    return LoaderDataModule(
        tuple(input_shape), int(num_classes), loaders.get("train"), loaders.get("val"), loaders.get("test")
    )


def _first_inputs_shape(loader: DataLoader, name: str) -> tuple[int, ...]:
    """One example's shape, from the inputs of the loader's first batch, which must be (inputs, labels)."""
    batch = next(iter(loader))
    if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not isinstance(batch[0], torch.Tensor):
        raise ConfigError(
            f"dataset._target_={name}: its loaders must give (inputs, labels) batches, got {type(batch).__name__}"
        )
    return tuple(batch[0].shape[1:])
