"""Readers for every supported on-disk format, each returning an `ImageSet` of uint8 NCHW images."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch

from .._utils import atomic_path, warn_at_caller
from .imageset import ImageSet
from .streams import check_tar_end, class_layout, tar_end_recorder

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
# md5 sums published on the CIFAR page.
CIFAR_MD5 = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
}
CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def cache_dir() -> Path:
    """Where decoded arrays are kept (MEANSPARSE_CACHE, else ~/.cache/meansparse)."""
    root = Path(os.environ.get("MEANSPARSE_CACHE", Path.home() / ".cache" / "meansparse"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _file_key(path: Path, *extra: object) -> str:
    st = path.stat()
    text = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|" + "|".join(map(str, extra))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cached(key: str, build) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode once, then serve uint8 arrays from an .npz cache (no pickles); a corrupt cache file is
    rebuilt (with a warning)."""
    path = cache_dir() / f"{key}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return z["images"], z["labels"], [str(c) for c in z["classes"]]
        except Exception as e:  # noqa: BLE001 - zipfile, numpy and OS errors alike mean "unreadable"
            warn_at_caller(f"meansparse: data cache {path} is unreadable ({type(e).__name__}: {e}); rebuilding it")
            path.unlink(missing_ok=True)
    images, labels, classes = build()
    with atomic_path(path, ".npz") as tmp:  # np.savez wants the .npz suffix
        np.savez(tmp, images=images, labels=labels, classes=np.array(classes, dtype=str))
    return images, labels, classes


def _to_set(images: np.ndarray, labels: np.ndarray, classes: list[str], name: str) -> ImageSet:
    return ImageSet(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels), classes, name)


# --------------------------------------------------------------------------------------------- digits
def load_digits(split: str = "train", test_fraction: float = 0.25) -> ImageSet:
    """scikit-learn's bundled 8x8 digits (1,797 images, fully offline), split deterministically."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    images = np.round(d.images / 16.0 * 255.0).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    labels = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    n_test = int(round(len(labels) * test_fraction))
    idx = order[n_test:] if split == "train" else order[:n_test]
    if split not in ("train", "test"):
        raise ValueError(f"digits: unknown split {split!r} (use 'train' or 'test')")
    idx = np.sort(idx)
    return _to_set(images[idx], labels[idx], [str(i) for i in range(10)], f"digits-{split}")


# ------------------------------------------------------------------------------- CIFAR python format
def download_cifar(name: str, root: str | os.PathLike) -> Path:
    """Download and extract the official CIFAR python archive into `root` (needs internet)."""
    url = {"cifar10": CIFAR10_URL, "cifar100": CIFAR100_URL}[name]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / url.rsplit("/", 1)[1]
    if not archive.exists():
        with atomic_path(archive, ".part") as tmp:
            urllib.request.urlretrieve(url, tmp)  # noqa: S310 - fixed https URL
    _check_md5(archive, CIFAR_MD5[archive.name])
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(root, filter="data")
    return root / CIFAR_DIRS[name]


def _check_md5(path: Path, expected: str) -> None:
    digest = hashlib.md5(path.read_bytes()).hexdigest()  # noqa: S324 - checksum, not security
    if digest != expected:
        raise ValueError(f"{path}: md5 {digest} does not match the published {expected}; delete it and retry")


def _unpickle_cifar_batch(path: Path) -> dict:
    # The official format is a Python pickle of plain arrays/lists. Restrict unpickling to builtins and
    # numpy reconstruction so a tampered file cannot run code.
    import pickle

    allowed = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    class _Safe(pickle.Unpickler):
        def find_class(self, module, name):  # noqa: D401
            if (module, name) in allowed:
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"{path}: refusing to load {module}.{name}")

    with open(path, "rb") as f:
        return _Safe(f, encoding="latin1").load()


def load_cifar_python(root: str | os.PathLike, name: str = "cifar10", split: str = "train",
                      download: bool = False) -> ImageSet:
    """The standard `cifar-10-batches-py` / `cifar-100-python` folders (optionally downloading them)."""
    root = Path(root)
    folder = root / CIFAR_DIRS[name] if (root / CIFAR_DIRS[name]).is_dir() else root
    if not (folder / ("batches.meta" if name == "cifar10" else "meta")).exists():
        if not download:
            raise FileNotFoundError(
                f"{name}: no {CIFAR_DIRS[name]} folder under {root}; pass download=True (needs internet) "
                "or point at the extracted folder"
            )
        folder = download_cifar(name, root)
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta = _unpickle_cifar_batch(folder / "batches.meta")["label_names"]
        label_key = "labels"
    else:
        files = ["train"] if split == "train" else ["test"]
        meta = _unpickle_cifar_batch(folder / "meta")["fine_label_names"]
        label_key = "fine_labels"
    xs, ys = [], []
    for fname in files:
        batch = _unpickle_cifar_batch(folder / fname)
        xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[label_key], dtype=np.int64))
    return _to_set(np.concatenate(xs), np.concatenate(ys), list(meta), f"{name}-{split}")


# ------------------------------------------------------------------ JPEG archive split/class/NNNN.jpg
def _decode(data: bytes, size: int | None = None, name: str = "image") -> np.ndarray:
    """One image as uint8 CHW RGB; a file that does not decode is a ValueError naming it."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            if size is not None:
                im = _resize_center_crop(im, size)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
        why = str(e).split(" <_io.")[0]  # PIL names the in-memory buffer, not the file
        raise ValueError(f"{name}: not a readable image ({type(e).__name__}: {why})") from None


def _resize_center_crop(im, size: int):
    from PIL import Image

    short = int(round(size / 0.875))  # ImageNet-style resize-then-crop (256 -> 224)
    w, h = im.size
    scale = short / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def _collect(entries, split: str, source: str, size: int | None, folders=()):
    """entries: iterable of (relative path parts, bytes loader). Layout: split/class/**/file, grouped by the
    streamed archives' rule (:func:`~meansparse.data.streams.class_layout`): the class is the folder right
    under the split however deep the file lies, and a folder beside a class folder is a class even when empty
    (dropping it would shift every later label)."""
    entries = [(tuple(parts), read) for parts, read in entries]
    if not any(split in parts[:-2] for parts, _ in entries):
        raise FileNotFoundError(f"{source}: no images under '{split}/<class>/' (expected split/class/NNNN.jpg)")
    folders = {tuple(f) for f in folders if not f[-1].startswith(".")}
    names, labels, classes, reads = class_layout(entries, split, source, folders)
    images = [_decode(read(), size, f"{source}: {name}") for name, read in zip(names, reads, strict=True)]
    return np.stack(images), labels, classes


def load_jpeg_archive(path: str | os.PathLike, split: str = "train", size: int | None = None) -> ImageSet:
    """`split/class/NNNN.jpg` trees, from a .tar.gz (read in place) or an extracted folder; cached."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such archive or folder")

    def build():
        if path.is_dir():
            files = [p for p in path.rglob("*") if p.is_file()]
            entries = [(p.relative_to(path).parts, p.read_bytes) for p in files]
            folders = [p.relative_to(path).parts for p in path.rglob("*") if p.is_dir()]
            return _collect(entries, split, str(path), size, folders)
        try:
            recorded, last_header = tar_end_recorder()
            with tarfile.open(path, "r:*", tarinfo=recorded) as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
                check_tar_end(path, last_header, len(members))
                entries = [(Path(m.name).parts, (lambda m=m: tar.extractfile(m).read())) for m in members]
                folders = [Path(m.name).parts for m in tar.getmembers() if m.isdir()]
                return _collect(entries, split, str(path), size, folders)
        except FileNotFoundError:
            raise
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise ValueError(f"{path}: not a readable tar archive of split/class/NNNN.jpg images "
                             f"({type(e).__name__}: {e})") from None

    # the tag names the layout rule the cached labels follow (class = the folder under the split, any depth)
    key = _file_key(path, "jpeg", split, size, "nested-classes") if path.is_file() else None
    images, labels, classes = _cached(key, build) if key else build()
    return _to_set(images, labels, classes, f"{path.name}-{split}")


def load_image_folder(path: str | os.PathLike, size: int = 224) -> ImageSet:
    """An ImageNet-style `class/xxx.JPEG` folder, resized and center-cropped to `size`."""
    path = Path(path)
    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"{path}: no class sub-folders")
    images, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted((path / cls).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                images.append(_decode(f.read_bytes(), size, str(f)))
                labels.append(label)
    if not images:
        raise FileNotFoundError(f"{path}: no images in the class folders")
    return _to_set(np.stack(images), np.asarray(labels, dtype=np.int64), classes, path.name)
