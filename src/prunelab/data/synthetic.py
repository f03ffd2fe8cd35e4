"""Random but learnable images for tests: every class has its own smooth pattern plus noise."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from prunelab.data.base import ImageDataModule, TensorSource
from prunelab.errors import ConfigError


class SyntheticDataModule(ImageDataModule):
    """Deterministic synthetic classification data generated from ``seed``; no files, no augmentation.

    Each class has a low-frequency prototype image with its own per-channel offset; a sample is its
    class prototype plus Gaussian noise of standard deviation ``noise``, so a tiny convolutional model
    with global pooling beats chance within a few steps. Labels are balanced.
    """

    name = "synthetic"

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
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        train_size: int = 256,
        test_size: int = 64,
        noise: float = 1.0,
    ) -> None:
        super().__init__(root, batch_size, eval_batch_size, num_workers, val_size, seed, augment, subset)
        if num_classes < 2 or train_size < 1 or test_size < 1:
            raise ConfigError("synthetic: need num_classes >= 2 and positive train_size and test_size")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        self.train_size = train_size
        self.test_size = test_size
        self.noise = noise

    def generate(self) -> tuple[TensorSource, TensorSource]:
        """Generates the training pool and the test set from ``seed`` alone."""
        generator = torch.Generator().manual_seed(self.seed)
        coarse = torch.randn(self.num_classes, self.in_channels, 4, 4, generator=generator)
        offsets = torch.randn(self.num_classes, self.in_channels, 1, 1, generator=generator)
        size = (self.image_size, self.image_size)
        prototypes = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False) + offsets

        def sample(count: int) -> TensorSource:
            labels = torch.arange(count) % self.num_classes
            labels = labels[torch.randperm(count, generator=generator)]
            noise = torch.randn(count, self.in_channels, *size, generator=generator)
            return TensorSource(prototypes[labels] + self.noise * noise, labels)

        return sample(self.train_size), sample(self.test_size)

    def _load_sources(self) -> tuple[Dataset, Dataset]:
        return self.generate()

    def _transforms(self) -> tuple[Callable[[Any], torch.Tensor] | None, Callable[[Any], torch.Tensor] | None]:
        return None, None
