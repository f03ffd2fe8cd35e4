"""scikit-learn's bundled handwritten digits: a real, tiny, offline dataset for quick runs and tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from prunelab.data.base import ImageDataModule, TensorSource
from prunelab.errors import ConfigError

NUM_DIGITS = 1797
# The test split is drawn with this fixed seed, so every run seed is evaluated on the same images.
TEST_SPLIT_SEED = 0


class _Normalize:
    """Repeats a one-channel image to ``channels`` channels and normalises it with a scalar mean/std."""

    def __init__(self, channels: int, mean: float, std: float) -> None:
        self.channels = channels
        self.mean = mean
        self.std = std

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return ((image - self.mean) / self.std).expand(self.channels, -1, -1).contiguous()


class DigitsDataModule(ImageDataModule):
    """The 1,797 real 8x8 greyscale digits of ``sklearn.datasets.load_digits``, resized for CIFAR backbones.

    Pixels (0..16) are scaled to [0, 1], resized bilinearly to ``image_size``, repeated to
    ``in_channels`` channels and normalised with the mean/std of all 1,797 resized images. A test split of
    ``test_size`` images is carved first with a fixed seed (the same for every ``seed``), then
    ``val_size`` images from the rest with ``seed``. ``root`` is ignored.
    """

    name = "digits"

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
        image_size: int = 32,
        in_channels: int = 3,
        test_size: int = 297,
    ) -> None:
        super().__init__(root, batch_size, eval_batch_size, num_workers, val_size, seed, augment, subset)
        if not 0 < test_size < NUM_DIGITS:
            raise ConfigError(f"digits: test_size must be between 1 and {NUM_DIGITS - 1}, got {test_size}")
        self.num_classes = 10
        self.image_size = image_size
        self.in_channels = in_channels
        self.test_size = test_size

    def _load_sources(self) -> tuple[Dataset, Dataset]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        if images.shape[-1] != self.image_size:
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        labels = torch.as_tensor(digits.target, dtype=torch.long)
        self.mean = float(images.mean())
        self.std = float(images.std())

        # The test split is a fixed function of TEST_SPLIT_SEED; the pool keeps the original order.
        permutation = torch.randperm(len(images), generator=torch.Generator().manual_seed(TEST_SPLIT_SEED))
        self.test_indices = permutation[: self.test_size].sort().values
        self.pool_indices = permutation[self.test_size :].sort().values
        train = TensorSource(images[self.pool_indices], labels[self.pool_indices])
        test = TensorSource(images[self.test_indices], labels[self.test_indices])
        return train, test

    def _transforms(self) -> tuple[Callable[[Any], torch.Tensor], Callable[[Any], torch.Tensor]]:
        from torchvision.transforms import v2

        normalize = _Normalize(self.in_channels, self.mean, self.std)
        # Zero padding is the background colour because normalisation comes after the crop; no flips,
        # since digits are not mirror invariant.
        train = v2.Compose([v2.RandomCrop(self.image_size, padding=2), normalize])
        return train, normalize
