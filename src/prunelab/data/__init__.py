"""Lightning datamodules for every dataset prunelab runs on, all built on ``ImageDataModule``."""

from prunelab.data.base import IMAGENET_MEAN, IMAGENET_STD, ImageDataModule
from prunelab.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from prunelab.data.digits import DigitsDataModule
from prunelab.data.image_folder import ImageFolderDataModule
from prunelab.data.imagenet import ImageNetDataModule
from prunelab.data.loaders import LoaderDataModule, adopt
from prunelab.data.synthetic import SyntheticDataModule
from prunelab.data.tiny_imagenet import TinyImageNetDataModule

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitsDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "LoaderDataModule",
    "SyntheticDataModule",
    "TinyImageNetDataModule",
    "adopt",
]
