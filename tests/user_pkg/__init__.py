"""A package of a user's own, outside prunelab, for the tests of `backbone=custom` and `dataset=custom`:
a small CNN and a LightningDataModule that knows nothing of prunelab."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class SmallNet(nn.Module):
    """Two conv-BN-ReLU blocks, global pooling and a linear classifier."""

    def __init__(self, num_classes: int, width: int = 16, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class FixedNet(SmallNet):
    """A model that always predicts ten classes (it takes no num_classes)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__(10, width)


class BlobsDataModule(L.LightningDataModule):
    """Learnable random images: each class is a noisy copy of its own pattern. It sets `num_classes` and lets
    prunelab read the input shape from the first batch."""

    def __init__(
        self, num_classes: int = 3, size: int = 16, per_class: int = 40, batch_size: int = 20, seed: int = 0
    ) -> None:
        super().__init__()
        self.num_classes = self.patterns = num_classes
        self.size, self.per_class, self.batch_size, self.seed = size, per_class, batch_size, seed
        self.setups = 0

    def setup(self, stage: str | None = None) -> None:
        self.setups += 1
        generator = torch.Generator().manual_seed(self.seed)
        patterns = torch.randn(self.patterns, 3, self.size, self.size, generator=generator)
        labels = torch.arange(self.patterns).repeat_interleave(self.per_class)
        images = patterns[labels] + 0.5 * torch.randn(len(labels), 3, self.size, self.size, generator=generator)
        self.train_set = TensorDataset(images, labels)
        self.val_set = TensorDataset(
            patterns[labels[::4]] + 0.5 * torch.randn(len(labels[::4]), 3, self.size, self.size, generator=generator),
            labels[::4],
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, generator=torch.Generator().manual_seed(self.seed)
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)
