"""Streaming image data sets: an index of files in memory, one image decoded per ``__getitem__``.

:class:`ImageFolderDataset` reads a ``class/image`` tree (optionally under ``split/``), :class:`TarDataset` a
tar archive laid out the same way.  Both are ``torch.utils.data.Dataset``\\ s returning ``(float CHW image in
[0, 1], int label)`` after a RobustBench preprocessing (:mod:`.preprocessing`), so a ``DataLoader`` with worker
processes decodes in parallel and memory holds only the batches in flight, however many images there are.

Order and labels follow :func:`~meansparse.data.load_jpeg_archive` / :func:`~meansparse.data.load_image_folder`:
classes are the sorted class-folder names (label = position; an empty class folder is a class too, in a folder
tree and in an archive alike, so it shifts no label), images sorted by path within a class; so index
``i`` of a stream is image ``i`` of the in-memory set, and ``sample(n, seed)`` / ``subset`` / ``holdout_split``
/ ``distributed.shard`` pick the same images from either.

Tar archives
------------
Members are indexed once (header scan, no extraction) and the index is cached under ``$MEANSPARSE_CACHE/streams``
(keyed by the archive's path, size and mtime).  An *uncompressed* tar is then read in place: each worker opens
the archive lazily (once per process) and reads a member with ``os.pread`` at its offset.  A *compressed* tar
(.tar.gz, .tgz, .tar.bz2, .tar.xz) has no random access, so indexing streams it once, sequentially (one member
in memory at a time), and copies the image members' bytes into a payload file beside the index; random
access then reads that file.  The cost is disk space equal to the images' encoded size (for CIFAR-10's JPEGs
about 80 MB), paid once; the alternative, a sequential ``IterableDataset``, would rule out sub-sampling by
index, splitting, sharding and resuming.  For ImageNet-size sets prefer an uncompressed tar.

Safety: nothing is ever extracted.  Only regular file members count; a member whose name is absolute, has a
``..`` component, a backslash or a control character, or a hidden (``.``-prefixed) component is skipped
(and counted in ``skipped``), as are symlinks, hard links and devices, so no path trick can relabel an image.
"""

from __future__ import annotations

import copy
import hashlib
import os
import tarfile
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .._utils import atomic_path
from .preprocessing import Preprocessing, decode_image, get_preprocessing

__all__ = ["IMAGE_SUFFIXES", "SPLIT_NAMES", "ImageFolderDataset", "ImageStream", "TarDataset", "as_xy",
           "first_images", "open_stream", "stream_cache_dir"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
#: Folder names read as splits: a tree with one of them at the top must be asked for a split it has.
SPLIT_NAMES = ("train", "test", "val", "validation")
_INDEX_VERSION = "meansparse-tar-index/2"
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def stream_cache_dir() -> Path:
    """Where tar indexes and payloads are kept: ``$MEANSPARSE_CACHE/streams`` (else ~/.cache/meansparse)."""
    root = Path(os.environ.get("MEANSPARSE_CACHE", Path.home() / ".cache" / "meansparse")) / "streams"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _as_index(index: Any, n: int) -> np.ndarray:
    """int64 positions from a slice, a bool mask, ints, a list or a tensor (negative positions allowed)."""
    if isinstance(index, slice):
        return np.arange(n, dtype=np.int64)[index]
    if isinstance(index, torch.Tensor):
        index = index.cpu().numpy()
    idx = np.asarray(index)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise IndexError(f"boolean index of shape {idx.shape} for {n} examples")
        return np.flatnonzero(idx).astype(np.int64)
    idx = idx.astype(np.int64).reshape(-1)
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"index out of range for {n} examples")
    return np.where(idx < 0, idx + n, idx)


def _safe_parts(name: str) -> tuple[str, ...] | None:
    """The path components of an archive member or relative file name, None if it must be skipped."""
    if not name or "\\" in name or any(ord(c) < 32 for c in name):
        return None
    path = PurePosixPath(name)
    if path.is_absolute():
        return None
    parts = tuple(p for p in path.parts if p != ".")
    if not parts or any(p == ".." or p.startswith(".") for p in parts):
        return None
    return parts


class ImageStream(Dataset):
    """Base of the streaming data sets: names, labels and classes in memory, images read and decoded on
    demand.  Subclasses say how to read one image's bytes (``_read``); the index arrays listed in ``_arrays``
    are carried along by :meth:`subset`.

    Duck-types :class:`~meansparse.data.ImageSet` where that needs no pixels: ``len``, ``labels``,
    ``classes``, ``num_classes``, ``name``, ``subset``, ``head``, ``sample``.
    """

    _arrays: tuple[str, ...] = ("_labels",)

    def __init__(self, source: str, names: list[str], labels: np.ndarray, classes: list[str],
                 preprocessing: Preprocessing | str | None, name: str, skipped: int = 0) -> None:
        self.source = source
        self.names = names
        self._labels = np.asarray(labels, dtype=np.int64)
        self.classes = classes
        self.preprocessing = get_preprocessing(preprocessing)
        self.name = name
        self.skipped = skipped

    # ------------------------------------------------------------------ Dataset
    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.name}: index {i} out of range for {len(self)} images")
        i %= len(self)
        data = self._read(i)
        try:
            x = decode_image(data, self.preprocessing)
        except Exception as e:  # a corrupt file names itself instead of failing somewhere in a worker
            why = str(e).split(" <_io.")[0]  # PIL names the in-memory buffer, not the file
            raise ValueError(f"{self.source}: cannot decode {self.names[i]!r}: {type(e).__name__}: {why}") from e
        return x, int(self._labels[i])

    def _read(self, i: int) -> bytes:
        raise NotImplementedError

    # ------------------------------------------------------------------ ImageSet-like
    @property
    def labels(self) -> torch.Tensor:
        """All labels (int64), known from the index without decoding anything."""
        return torch.from_numpy(self._labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else int(self._labels.max()) + 1

    def subset(self, index: Any, name: str | None = None) -> ImageStream:
        """The examples at ``index`` (slice, positions, bool mask or tensor), in that order; shares the source."""
        idx = _as_index(index, len(self))
        new = copy.copy(self)
        new.names = [self.names[i] for i in idx.tolist()]
        for field in self._arrays:
            setattr(new, field, getattr(self, field)[idx])
        new.name = name or self.name
        new._reset_handle()
        return new

    def head(self, n: int | None) -> ImageStream:
        """The first n examples (all if n is None); see :meth:`ImageSet.head`."""
        return self if n is None or n >= len(self) else self.subset(slice(0, n))

    def sample_indices(self, n: int | None, seed: int = 0) -> torch.Tensor:
        """The indices :meth:`sample` takes, in its order (those of :meth:`ImageSet.sample_indices`)."""
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"the number of examples must be a positive integer (or None for all), got {n!r}")
        n = len(self) if n is None else min(n, len(self))
        return torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]

    def sample(self, n: int | None, seed: int = 0) -> ImageStream:
        """n examples drawn without replacement (seeded), in random order: the very draw of
        :meth:`ImageSet.sample` on the in-memory set."""
        perm = self.sample_indices(n, seed)
        return self.subset(perm, f"{self.name}-sample{len(perm)}")

    def with_preprocessing(self, preprocessing: Preprocessing | str | None) -> ImageStream:
        """The same images under another preprocessing."""
        new = copy.copy(self)
        new.preprocessing = get_preprocessing(preprocessing)
        new._reset_handle()
        return new

    def _reset_handle(self) -> None:
        pass

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.source!r}, {len(self)} images, {len(self.classes)} classes, "
                f"preprocessing={self.preprocessing})")


def _split_at(parts: tuple[str, ...], split: str) -> int | None:
    """Index of the first ``split`` folder with at least class/file below it, or None."""
    return next((i for i, p in enumerate(parts[:-2]) if p == split), None)


def _class_depth(images: list[tuple[str, ...]]) -> int:
    """Where the class folders sit when no split is asked for: right under the folders every image shares
    (capped so the shallowest image keeps class/file), and below a level of split folders (train/, test/,
    merged by class) when every image has one.  So ``root/cat/x/1.jpg`` is class ``cat``, as in an image
    folder tree, never ``x``."""
    prefix = os.path.commonprefix([parts[:-1] for parts in images])
    depth = min(len(prefix), min(len(parts) for parts in images) - 2)
    if all(len(parts) >= depth + 3 and parts[depth] in SPLIT_NAMES for parts in images):
        depth += 1
    return depth


def class_layout(entries: list[tuple[tuple[str, ...], Any]], split: str | None, source: str,
                 folders: set[tuple[str, ...]] = frozenset()) -> tuple[list[str], np.ndarray, list[str], list[Any]]:
    """Group ``(parts, payload)`` entries laid out ``[...]/[split/]class/**/file`` into (names, labels, classes,
    payloads), classes sorted, files sorted by name within a class; the class of an image is the folder right
    under the split (or under the archive's shared root), however deep the image lies below it, as in an
    image folder tree.  A folder of ``folders`` beside a class folder is a class too even with no image in it
    (an empty class), as in an image folder tree: dropping it would shift every later class's label."""
    images = [(parts, p) for parts, p in entries
              if len(parts) >= 2 and Path(parts[-1]).suffix.lower() in IMAGE_SUFFIXES]
    at: list[int] = []
    if split is not None:
        in_split = [(parts, p, k + 1) for parts, p in images if (k := _split_at(parts, split)) is not None]
        if in_split:
            images, at = [(parts, p) for parts, p, _ in in_split], [k for *_, k in in_split]
        else:
            found = sorted({q for parts, _ in images for q in parts[:-2]} & set(SPLIT_NAMES))
            if found:
                raise FileNotFoundError(f"{source}: no '{split}' split (found: {', '.join(found)})")
    if not images:
        raise FileNotFoundError(f"{source}: no images laid out as [split/]class/image "
                                f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    at = at or [_class_depth([parts for parts, _ in images])] * len(images)
    by_class: dict[str, list] = {}
    for (parts, p), k in zip(images, at, strict=True):
        by_class.setdefault(parts[k], []).append(("/".join(parts), p))
    roots = {parts[:k] for (parts, _), k in zip(images, at, strict=True)}
    for folder in folders:
        if folder[:-1] in roots:
            by_class.setdefault(folder[-1], [])
    classes = sorted(by_class)
    names, labels, payloads = [], [], []
    for label, cls in enumerate(classes):
        for name, p in sorted(by_class[cls], key=lambda t: t[0]):
            names.append(name)
            labels.append(label)
            payloads.append(p)
    return names, np.asarray(labels, dtype=np.int64), classes, payloads


class ImageFolderDataset(ImageStream):
    """A folder of class sub-folders (``root/class/**/image``; with ``split``, ``root/split/class/...``
    when that folder exists), as torchvision's ``ImageFolder``: classes are the sorted sub-folder names.

    A root whose sub-folders are split names (train, test, val, validation) must be asked for one of them;
    otherwise ``split`` is ignored (an ImageNet validation folder is its own split).
    """

    def __init__(self, root: str | os.PathLike, split: str | None = None,
                 preprocessing: Preprocessing | str | None = None, name: str | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such folder")
        subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        splits = ", ".join(sorted(set(subdirs) & set(SPLIT_NAMES)))
        if split is not None and split in subdirs:
            root = root / split
        elif split is not None and splits:
            raise FileNotFoundError(f"{root}: no '{split}' split (found: {splits})")
        elif split is None and splits:
            raise FileNotFoundError(f"{root}: holds splits ({splits}); pass split=")
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"{root}: no class sub-folders")
        names: list[str] = []
        labels: list[int] = []
        skipped = 0
        for label, cls in enumerate(classes):
            files = []
            for dirpath, dirnames, filenames in os.walk(root / cls):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for f in filenames:
                    rel = Path(dirpath, f).relative_to(root).as_posix()
                    if Path(f).suffix.lower() not in IMAGE_SUFFIXES:
                        continue
                    if _safe_parts(rel) is None:
                        skipped += 1
                        continue
                    files.append(rel)
            files.sort()
            names += files
            labels += [label] * len(files)
        if not names:
            raise FileNotFoundError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the class folders")
        super().__init__(str(root), names, np.asarray(labels), classes, preprocessing,
                         name or (f"{root.parent.name}-{root.name}" if split else root.name), skipped)
        self.root = root
        if skipped:
            warnings.warn(f"{root}: skipped {skipped} hidden or oddly named image file(s)", stacklevel=2)

    def _read(self, i: int) -> bytes:
        return (self.root / self.names[i]).read_bytes()


def _is_compressed(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(6)
    return any(head.startswith(m) for m in _COMPRESSED_MAGIC)


def _archive_key(path: Path) -> str:
    st = path.stat()
    text = f"{_INDEX_VERSION}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def tar_end_recorder() -> tuple[type[tarfile.TarInfo], list[bytes]]:
    """A TarInfo class that keeps the last header block tarfile read: tarfile ends its member loop silently at
    a missing or damaged header (a truncated archive), so the scan checks that this block is the end-of-archive
    marker (all zeros)."""
    last: list[bytes] = [b""]

    class Recorded(tarfile.TarInfo):
        @classmethod
        def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
            last[0] = buf
            return super().frombuf(buf, encoding, errors)

    return Recorded, last


def check_tar_end(path: str | os.PathLike, last_header: list[bytes], images: int) -> None:
    """A ValueError naming the archive when the last header block read was not the end-of-archive marker."""
    if len(last_header[0]) != tarfile.BLOCKSIZE or last_header[0].count(0) != tarfile.BLOCKSIZE:
        raise ValueError(f"{path}: truncated or damaged tar archive (no end-of-archive marker after {images} "
                         "images); copy or download it again")


def _folders_of(member: tarfile.TarInfo) -> set[str]:
    """The folder a member is (a directory member) or lies in: an empty class folder still names a class."""
    name = member.name.rstrip("/")
    return {name} if member.isdir() else {name.rpartition("/")[0]} - {""}


def _scan_tar(path: Path, payload: Path | None) -> tuple[list[str], np.ndarray, np.ndarray, int, list[str]]:
    """(member names, data offsets, sizes, skipped, folders) of the regular, safely named image members; with
    ``payload`` (compressed archives) their bytes are copied there and offsets point into it.  A truncated
    archive (no end-of-archive marker where the members stop) is a ValueError naming the file."""
    names: list[str] = []
    folders: set[str] = set()
    offsets: list[int] = []
    sizes: list[int] = []
    skipped = 0
    mode = "r|*" if payload is not None else "r:"
    out = open(payload, "wb") if payload is not None else None
    recorded, last_header = tar_end_recorder()
    try:
        with tarfile.open(path, mode, tarinfo=recorded) as tar:
            written = 0
            for member in tar:
                tar.members = []  # keep memory flat: tarfile would otherwise remember every header
                folders |= _folders_of(member)
                if not member.isreg():
                    skipped += not member.isdir()
                    continue
                if Path(member.name).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                if _safe_parts(member.name) is None:
                    skipped += 1
                    continue
                if out is not None:
                    f = tar.extractfile(member)
                    assert f is not None
                    data = f.read()
                    out.write(data)
                    offsets.append(written)
                    written += len(data)
                else:
                    offsets.append(member.offset_data)
                names.append(member.name)
                sizes.append(member.size)
        check_tar_end(path, last_header, len(names))
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a readable tar archive ({type(e).__name__}: {e})") from e
    finally:
        if out is not None:
            out.close()
    return (names, np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64), skipped,
            sorted(folders))


@contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``lock_file`` for the block (POSIX); elsewhere no lock (each process then
    builds its own copy, as before)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _tar_index(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, int, Path, list[str]]:
    """The cached member index of ``path`` (built on first use): names, offsets, sizes, skipped members,
    the file the offsets point into (the archive itself, or the payload copy of a compressed one) and the
    archive's folders."""
    key = _archive_key(path)
    cache = stream_cache_dir()
    index_file = cache / f"{key}.index.npz"
    compressed = _is_compressed(path)
    data_file = cache / f"{key}.payload" if compressed else path

    def missing() -> bool:
        return not index_file.exists() or (compressed and not data_file.exists())

    if missing():
        # torchrun ranks (and parallel jobs) open the same archive at once: one builds, the others wait for it
        # instead of each decompressing it too.  Temporaries per process all the same (a lock on a network
        # file system may be advisory only); the payload lands first, the index last (it marks completion).
        with _exclusive(cache / f"{key}.lock"):
            if missing():
                with (atomic_path(data_file) if compressed
                      else nullcontext(None)) as tmp_payload:
                    names, offsets, sizes, skipped, folders = _scan_tar(path, tmp_payload)
                with atomic_path(index_file, ".npz") as tmp_index:
                    blob = np.frombuffer("\n".join(names).encode(), dtype=np.uint8)
                    folder_blob = np.frombuffer("\n".join(folders).encode(), dtype=np.uint8)
                    np.savez(tmp_index, names=blob, offsets=offsets, sizes=sizes, skipped=np.int64(skipped),
                             folders=folder_blob, version=np.array(_INDEX_VERSION))
    with np.load(index_file, allow_pickle=False) as z:
        if str(z["version"]) != _INDEX_VERSION:  # pragma: no cover - keyed by version already
            raise ValueError(f"{index_file}: stale index; delete it")
        text, folder_text = z["names"].tobytes().decode(), z["folders"].tobytes().decode()
        names = text.split("\n") if text else []
        folders = folder_text.split("\n") if folder_text else []
        return (names, z["offsets"].astype(np.int64), z["sizes"].astype(np.int64), int(z["skipped"]), data_file,
                folders)


class TarDataset(ImageStream):
    """A tar archive of images laid out ``[...]/[split/]class/image`` (e.g. CIFAR-10's ``train/cat/0001.jpg``
    or an ImageNet ``val/n01440764/x.JPEG`` tree), read without extracting it; see the module docstring for
    the index cache, compressed archives and which members are skipped."""

    _arrays = ("_labels", "_offsets", "_sizes")

    def __init__(self, path: str | os.PathLike, split: str | None = None,
                 preprocessing: Preprocessing | str | None = None, name: str | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such archive")
        members, offsets, sizes, skipped, self._data_file, folders = _tar_index(path)
        entries = [(parts, k) for k, parts in enumerate(map(_safe_parts, members)) if parts is not None]
        safe_folders = {parts for parts in map(_safe_parts, folders) if parts is not None}
        names, labels, classes, rows = class_layout(entries, split, str(path), safe_folders)
        rows_arr = np.asarray(rows, dtype=np.int64)
        base = path.name.split(".")[0]
        super().__init__(str(path), names, labels, classes, preprocessing,
                         name or (f"{base}-{split}" if split else base), skipped)
        self._offsets = offsets[rows_arr]
        self._sizes = sizes[rows_arr]
        self._fd: int | None = None
        self._pid: int | None = None
        if skipped:
            warnings.warn(f"{path}: skipped {skipped} member(s) that are not regular files with safe relative names",
                          stacklevel=2)

    def _handle(self) -> int:
        """The archive (or payload) opened once per process: DataLoader workers each open their own."""
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self._data_file, os.O_RDONLY), os.getpid()
        return self._fd

    def _read(self, i: int) -> bytes:
        offset, size = int(self._offsets[i]), int(self._sizes[i])
        fd = self._handle()
        chunks, done = [], 0
        while done < size:
            chunk = os.pread(fd, size - done, offset + done)
            if not chunk:
                raise ValueError(f"{self.source}: {self.names[i]!r} is truncated (archive changed since indexing?)")
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)

    def _reset_handle(self) -> None:
        self._fd = self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fd"] = state["_pid"] = None  # a descriptor means nothing in another process
        return state

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None and getattr(self, "_pid", None) == os.getpid():
            try:
                os.close(fd)
            except OSError:
                pass


def open_stream(path: str | os.PathLike, split: str | None = None,
                preprocessing: Preprocessing | str | None = None) -> ImageStream:
    """A :class:`TarDataset` for a file, an :class:`ImageFolderDataset` for a folder."""
    path = Path(path)
    if path.is_file():
        return TarDataset(path, split, preprocessing)
    if path.is_dir():
        return ImageFolderDataset(path, split, preprocessing)
    raise FileNotFoundError(f"{path}: no such archive or folder")


def first_images(data: Any, n: int) -> torch.Tensor:
    """The first ``n`` images of an :class:`ImageSet` or of a data set of ``(x, y)`` as one float batch
    (e.g. ``example_inputs`` for ``prepare``); only those images are decoded."""
    if hasattr(data, "images") and hasattr(data, "float"):
        return data.subset(slice(0, n)).float()
    from .loaders import collate

    items = [data[i] for i in range(min(n, len(data)))]
    if not items:
        raise ValueError("the data set is empty")
    return collate(items)[0]  # images of different sizes: the error that names --preprocessing


def as_xy(data: Any) -> tuple[Any, Any]:
    """What ``evaluate`` / ``search_alpha`` take: float images and labels of an :class:`ImageSet` (in memory),
    or the data set itself and None (streamed batch by batch)."""
    if hasattr(data, "images") and hasattr(data, "float"):
        return data.float(), data.labels
    return data, None
