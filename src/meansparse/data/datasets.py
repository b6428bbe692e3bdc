"""`load_dataset` resolves a name or a path to an in-memory `ImageSet`; `open_dataset` keeps the named sets
in memory and streams a path (an image folder or a tar archive)."""

from __future__ import annotations

import os
from pathlib import Path

from .imageset import ImageSet
from .preprocessing import Preprocessing
from .sources import load_cifar_python, load_digits, load_image_folder, load_jpeg_archive
from .streams import ImageStream, open_stream

DATASETS = ("digits", "cifar10", "cifar100", "cifar10-jpg")


def _find_shared_cifar_jpg() -> Path | None:
    """The shared JPEG copy of CIFAR-10: $MEANSPARSE_CIFAR10_JPG, else ../shared/data beside the checkout."""
    env = os.environ.get("MEANSPARSE_CIFAR10_JPG")
    if env:  # an explicit choice is never silently replaced by another copy
        if not Path(env).exists():
            raise FileNotFoundError(f"MEANSPARSE_CIFAR10_JPG={env}: no such file or folder")
        return Path(env)
    here = Path(__file__).resolve()
    candidates = [p / "shared" / "data" / "cifar10-jpg.tar.gz" for p in here.parents]
    candidates.append(Path.cwd().parent / "shared" / "data" / "cifar10-jpg.tar.gz")
    return next((c for c in candidates if c.exists()), None)


def load_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None,
                 download: bool = False, size: int | None = None) -> ImageSet:
    """Load `split` ("train" or "test") of a named data set or of a path.

    - "digits": scikit-learn's bundled digits (offline default);
    - "cifar10"/"cifar100": python-format folders under `root` (download=True fetches them);
    - "cifar10-jpg" or a path to a `.tar.gz`/folder laid out as split/class/NNNN.jpg;
    - a folder of class sub-folders (ImageNet-style val set), resized/center-cropped to `size`.
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}: use 'train' or 'test'")
    if name == "digits":
        return load_digits(split)
    if name in ("cifar10", "cifar100"):
        if root is None:
            raise ValueError(f"{name}: pass root= (the folder holding {name}'s python-format batches)")
        return load_cifar_python(root, name, split, download=download)
    if name == "cifar10-jpg":
        path = Path(root) if root else _find_shared_cifar_jpg()
        if path is None:
            raise FileNotFoundError(
                "cifar10-jpg: archive not found; set MEANSPARSE_CIFAR10_JPG or pass root=path/to/cifar10-jpg.tar.gz"
            )
        return load_jpeg_archive(path, split)
    path = Path(name)
    if path.exists():
        if path.is_file() or (path / split).is_dir():
            return load_jpeg_archive(path, split, size)
        return load_image_folder(path, size or 224)
    raise ValueError(f"unknown data set {name!r}: use one of {', '.join(DATASETS)} or a path")


def open_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None, download: bool = False,
                 preprocessing: Preprocessing | str | None = None) -> ImageSet | ImageStream:
    """What the command line opens for ``--data``: a name of ``DATASETS`` is loaded into memory (as
    `load_dataset` does), a path to a folder or a tar archive is *streamed* (:func:`open_stream`: decoded one
    image at a time, with ``preprocessing``, a RobustBench name such as ``"Res256Crop224"``)."""
    if name in DATASETS:
        if preprocessing not in (None, "none"):
            raise ValueError(f"{name}: preprocessing={preprocessing!r} applies to streamed data (a folder or tar "
                             "path); the named data sets are already tensors")
        return load_dataset(name, split, root=root, download=download)
    if split not in ("train", "test", "val", "validation"):
        raise ValueError(f"unknown split {split!r}: use 'train', 'test', 'val' or 'validation'")
    if Path(name).exists():
        return open_stream(name, split, preprocessing)
    raise ValueError(f"unknown data set {name!r}: use one of {', '.join(DATASETS)} or a path to a folder or a "
                     "tar archive")
