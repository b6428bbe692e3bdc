"""Data loaders on small archives/folders the tests build, in every supported format."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meansparse.data import (
    batches,
    holdout_split,
    load_cifar_python,
    load_dataset,
    load_digits,
    load_image_folder,
    load_jpeg_archive,
    random_crop_flip,
    sources,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEANSPARSE_CACHE", str(tmp_path / "cache"))


def _png_bytes(color: tuple[int, int, int], size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _make_tree(root: Path, classes=("cat", "dog"), per_class=3) -> None:
    for split in ("train", "test"):
        for c, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                (d / f"{i:04d}.png").write_bytes(_png_bytes((100 * c, 10 * i, 50)))


def test_jpeg_archive_from_tar_and_folder_agree(tmp_path):
    tree = tmp_path / "tree"
    _make_tree(tree)
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree / "train", arcname="train")
        tar.add(tree / "test", arcname="test")
    a = load_jpeg_archive(archive, "train")
    b = load_jpeg_archive(tree, "train")
    assert a.images.shape == (6, 3, 32, 32) and a.images.dtype == torch.uint8
    assert a.classes == ["cat", "dog"] and a.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(a.images, b.images)
    assert a.images[3, 0, 0, 0].item() == 100  # class "dog" red channel
    # second read comes from the uint8 cache and is identical
    assert torch.equal(load_jpeg_archive(archive, "train").images, a.images)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    assert len(load_dataset(str(archive), "test")) == 6


def test_jpeg_archive_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such"):
        load_jpeg_archive(tmp_path / "missing.tar.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="split/class"):
        load_jpeg_archive(tmp_path / "empty", "train")


def _write_cifar_python(folder: Path, n_train_batch=4, n_test=5) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"c{i}" for i in range(10)]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n_train_batch, 3072), dtype=np.uint8),
                         "labels": list(rng.integers(0, 10, n_train_batch))}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
                     "labels": list(range(n_test))}, f)


def test_cifar_python_format(tmp_path):
    _write_cifar_python(tmp_path / "cifar-10-batches-py")
    train = load_cifar_python(tmp_path, "cifar10", "train")
    test = load_dataset("cifar10", "test", root=tmp_path)
    assert train.images.shape == (20, 3, 32, 32) and test.labels.tolist() == [0, 1, 2, 3, 4]
    assert train.classes[0] == "c0"


def test_cifar_refuses_code_in_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar_python(folder)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_cifar_python(tmp_path, "cifar10", "test")


def test_cifar_download_offline(tmp_path, monkeypatch):
    """The real download path, fed a tiny archive instead of the network; checksum verified."""
    src = tmp_path / "src"
    _write_cifar_python(src / "cifar-10-batches-py")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    import hashlib

    monkeypatch.setitem(sources.CIFAR_MD5, "cifar-10-python.tar.gz", hashlib.md5(archive.read_bytes()).hexdigest())
    calls = []

    def fake_urlretrieve(url, dest):
        calls.append(url)
        Path(dest).write_bytes(archive.read_bytes())

    monkeypatch.setattr(sources.urllib.request, "urlretrieve", fake_urlretrieve)
    root = tmp_path / "root"
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_cifar_python(root, "cifar10", "train")
    data = load_cifar_python(root, "cifar10", "train", download=True)
    assert calls == [sources.CIFAR10_URL] and len(data) == 20
    # a corrupted archive is rejected by its checksum
    (root / "cifar-10-python.tar.gz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="md5"):
        sources.download_cifar("cifar10", root)


def test_image_folder_resize_center_crop(tmp_path):
    for c, cls in enumerate(["a", "b"]):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (60, 40), (c * 200, 0, 0)).save(tmp_path / cls / "x.JPEG", format="JPEG")
    data = load_image_folder(tmp_path, size=24)
    assert data.images.shape == (2, 3, 24, 24) and data.labels.tolist() == [0, 1]


def test_digits_and_splits():
    train, test = load_digits("train"), load_digits("test")
    assert train.images.shape[1:] == (1, 8, 8) and len(train) + len(test) == 1797
    fit, hold = holdout_split(train, 100, seed=3)
    fit2, hold2 = holdout_split(train, 100, seed=3)
    assert torch.equal(hold.images, hold2.images) and torch.equal(fit.labels, fit2.labels)
    assert len(fit) + len(hold) == len(train)
    with pytest.raises(ValueError, match="n_holdout"):
        holdout_split(train, 0)


def test_holdout_indices_disjoint():
    data = load_digits("train")
    data.images = torch.arange(len(data)).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).to(torch.int64)
    fit, hold = holdout_split(data, 50, seed=1)
    ids_fit, ids_hold = set(fit.images[:, 0, 0, 0].tolist()), set(hold.images[:, 0, 0, 0].tolist())
    assert not ids_fit & ids_hold and len(ids_fit | ids_hold) == len(data)


def test_batches_float_range_and_determinism():
    data = load_digits("test")
    xs = [x for x, _ in batches(data, 64, shuffle=True, augment=True, seed=1)]
    ys = [x for x, _ in batches(data, 64, shuffle=True, augment=True, seed=1)]
    assert all(torch.equal(a, b) for a, b in zip(xs, ys))
    assert xs[0].dtype == torch.float32 and 0 <= xs[0].min() and xs[0].max() <= 1
    assert sum(len(x) for x in xs) == len(data)


def test_random_crop_flip_is_a_shifted_copy():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    out = random_crop_flip(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(2):
        crops = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(c, out[i]) or torch.equal(c.flip(-1), out[i]) for c in crops)


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("nope")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", "val")


def test_sample_is_unbiased_deterministic_and_prefix_safe():
    """Data sets are stored class by class: a prefix is one class; `sample` and the held-out part are not."""
    data = load_digits("train")
    data = data.subset(data.labels.argsort(stable=True))  # class-sorted, like the CIFAR JPEG archive
    assert data.head(100).labels.unique().numel() == 1
    s1, s2 = data.sample(200, seed=3), data.sample(200, seed=3)
    assert torch.equal(s1.labels, s2.labels) and len(s1) == 200
    assert s1.labels.unique().numel() == 10 and s1.head(50).labels.unique().numel() >= 5
    _, hold = holdout_split(data, 200, seed=0)
    assert hold.head(50).labels.unique().numel() >= 5
    assert len(data.sample(None)) == len(data)


def test_in_memory_archives_keep_empty_classes_and_refuse_truncation(tmp_path):
    """Issue #22.2 / #22.4 for the in-memory loader: an empty class folder is a class (labels as in the
    streamed folder), a truncated archive an error naming it."""
    tree = tmp_path / "tree"
    _make_tree(tree, classes=("cat", "dog"))
    (tree / "test" / "bird").mkdir()
    archive = tmp_path / "tiny.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tree / "train", arcname="train")
        tar.add(tree / "test", arcname="test")
    for source in (tree, archive):
        data = load_jpeg_archive(source, "test")
        assert data.classes == ["bird", "cat", "dog"] and data.labels.tolist() == [1, 1, 1, 2, 2, 2]
    with tarfile.open(archive) as tar:
        end = max(-(-(m.offset_data + m.size) // 512) * 512 for m in tar.getmembers())
    cut = tmp_path / "cut.tar"
    cut.write_bytes(archive.read_bytes()[:end])
    with pytest.raises(ValueError, match="cut.tar.*truncated"):
        load_jpeg_archive(cut, "test")
