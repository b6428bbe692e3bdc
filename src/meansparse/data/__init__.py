"""Data sets as uint8 tensors in memory, or streamed from an image folder / tar archive (one image decoded
per item, RobustBench's preprocessing), served as float images in [0, 1], NCHW.

Normalization is never applied here: it lives inside the models (RobustBench/AutoAttack convention).
"""

from .datasets import DATASETS, ImageSet, load_dataset, open_dataset
from .loaders import Batches, batches, collate, holdout_split, loader, random_crop_flip
from .preprocessing import PREPROCESSINGS, Preprocessing, decode_image, get_preprocessing, to_tensor
from .sources import (
    CIFAR10_URL,
    CIFAR100_URL,
    download_cifar,
    load_cifar_python,
    load_digits,
    load_image_folder,
    load_jpeg_archive,
)
from .streams import SPLIT_NAMES, ImageFolderDataset, ImageStream, TarDataset, as_xy, first_images, open_stream

__all__ = [
    "CIFAR10_URL",
    "CIFAR100_URL",
    "DATASETS",
    "SPLIT_NAMES",
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
    "PREPROCESSINGS",
    "Preprocessing",
    "ImageFolderDataset",
    "ImageStream",
    "TarDataset",
    "collate",
    "decode_image",
    "as_xy",
    "first_images",
    "get_preprocessing",
    "loader",
    "open_dataset",
    "open_stream",
    "to_tensor",
]
