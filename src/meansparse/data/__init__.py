"""Data sets as uint8 tensors in memory, served as float images in [0, 1], NCHW.

Normalization is never applied here: it lives inside the models (RobustBench/AutoAttack convention).
"""

from .datasets import DATASETS, ImageSet, load_dataset
from .loaders import Batches, batches, holdout_split, random_crop_flip
from .sources import (
    CIFAR10_URL,
    CIFAR100_URL,
    download_cifar,
    load_cifar_python,
    load_digits,
    load_image_folder,
    load_jpeg_archive,
)

__all__ = [
    "CIFAR10_URL",
    "CIFAR100_URL",
    "DATASETS",
    "Batches",
    "random_crop_flip",
    "ImageSet",
    "batches",
    "download_cifar",
    "holdout_split",
    "load_cifar_python",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "load_jpeg_archive",
]
