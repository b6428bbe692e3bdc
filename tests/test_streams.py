"""Streaming data sets (meansparse.data.streams): image folders and tar archives built here, compared with
the in-memory loaders image for image; tar safety; the index cache; DataLoader workers; calibration over a
stream equals calibration over the same images in memory."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import meansparse as ms
from meansparse.data import (
    Batches,
    ImageFolderDataset,
    ImageSet,
    TarDataset,
    first_images,
    holdout_split,
    load_jpeg_archive,
    loader,
    open_dataset,
    open_stream,
)
from meansparse.data import streams as streams_module
from meansparse.distributed import shard

CLASSES = ("cat", "dog", "frog")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEANSPARSE_CACHE", str(tmp_path / "cache"))


def _png(rng: np.random.Generator, size=(12, 12)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_tree(root: Path, per_class: int = 4, splits=("train", "test"), seed: int = 0) -> Path:
    """root/split/class/NNNN.png with random 12x12 RGB images (lossless, so pixels are known)."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for cls in CLASSES:
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                (d / f"{i:04d}.png").write_bytes(_png(rng))
    return root


def make_tar(tree: Path, path: Path, mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for split in sorted(p.name for p in tree.iterdir()):
            tar.add(tree / split, arcname=split)
    return path


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "tree")


def stack(ds) -> torch.Tensor:
    return torch.stack([ds[i][0] for i in range(len(ds))])


def test_folder_tar_and_tgz_stream_the_in_memory_images(tree, tmp_path):
    mem = load_jpeg_archive(tree, "train")
    tar = make_tar(tree, tmp_path / "a.tar")
    tgz = make_tar(tree, tmp_path / "a.tar.gz", "w:gz")
    for ds in (ImageFolderDataset(tree, "train"), TarDataset(tar, "train"), TarDataset(tgz, "train")):
        assert len(ds) == 12 and ds.classes == list(CLASSES)
        assert torch.equal(ds.labels, mem.labels)
        assert torch.equal(stack(ds), mem.float())  # bitwise: ToTensor's float / 255 is ImageSet.float()
        x, y = ds[-1]
        assert x.dtype == torch.float32 and x.shape == (3, 12, 12) and y == 2
    assert len(TarDataset(tar, "test")) == 12


def test_subset_sample_split_and_shard_pick_the_in_memory_images(tree):
    mem, ds = load_jpeg_archive(tree, "train"), ImageFolderDataset(tree, "train")
    assert torch.equal(stack(ds.sample(5, seed=3)), mem.sample(5, seed=3).float())
    assert torch.equal(stack(ds.head(4)), mem.head(4).float())
    (fit_s, hold_s), (fit_m, hold_m) = holdout_split(ds, 4, seed=1), holdout_split(mem, 4, seed=1)
    assert torch.equal(stack(hold_s), hold_m.float()) and torch.equal(fit_s.labels, fit_m.labels)
    part = shard(ds, 1, 3)
    assert torch.equal(stack(part), shard(mem, 1, 3).float())
    assert torch.equal(stack(ds.subset(torch.tensor([True, False] * 6))), mem.float()[::2])
    assert torch.equal(first_images(ds, 2), first_images(mem, 2))
    with pytest.raises(IndexError):
        ds[12]


def test_tar_member_tricks_are_skipped_and_nothing_is_extracted(tmp_path):
    rng = np.random.default_rng(1)
    good = _png(rng)
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        def add(name, data=good, **kw):
            info = tarfile.TarInfo(name)
            for k, v in kw.items():
                setattr(info, k, v)
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)

        add("train/cat/0001.png")
        add("train/dog/0001.png")
        add("../train/dog/escape.png")
        add("/abs/train/dog/abs.png")
        add("train/cat/../dog/relabel.png")
        add("train/.hidden/x.png")
        add("train/cat/._apple.png")
        add("train/dog/link.png", type=tarfile.SYMTYPE, linkname="../../etc/passwd")
        add("train/dog/hard.png", type=tarfile.LNKTYPE, linkname="train/cat/0001.png")
        add("train/dog/notes.txt", b"not an image")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.warns(UserWarning, match="skipped 7"):
        ds = TarDataset(path, "train")
    assert ds.names == ["train/cat/0001.png", "train/dog/0001.png"] and ds.skipped == 7
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert [w for w in written if not w.startswith("cache")] == before  # nothing extracted anywhere
    # the index alone, and the empty file that processes building it take turns on
    assert [Path(w).suffixes for w in written if w.startswith("cache")] == [[".index", ".npz"], [".lock"]]
    assert torch.equal(ds[0][0], ds[1][0])


def test_tgz_index_and_payload_are_built_once(tree, tmp_path, monkeypatch):
    tgz = make_tar(tree, tmp_path / "a.tgz", "w:gz")
    first = stack(TarDataset(tgz, "test"))
    cache = Path(os.environ["MEANSPARSE_CACHE"]) / "streams"
    assert len(list(cache.glob("*.payload"))) == 1 and len(list(cache.glob("*.index.npz"))) == 1

    def no_scan(*a, **k):
        raise AssertionError("rescanned")

    monkeypatch.setattr(streams_module, "_scan_tar", no_scan)
    assert torch.equal(stack(TarDataset(tgz, "test")), first)  # index and payload from the cache
    os.utime(tgz, ns=(1, 1))  # a changed archive (mtime) is indexed again
    with pytest.raises(AssertionError, match="rescanned"):
        TarDataset(tgz, "test")


_CONCURRENT_CHILD = """
import sys, time
from pathlib import Path
from meansparse.data import TarDataset
from meansparse.data import streams
log, ready, go, archive = map(Path, sys.argv[1:])
scan = streams._scan_tar

def slow_scan(*a, **k):  # a wide window: without the lock the other process would scan meanwhile
    with open(log, "a") as f:
        f.write("scan\\n")
    time.sleep(1.5)
    return scan(*a, **k)

streams._scan_tar = slow_scan
ready.write_text("")
while not go.exists():
    time.sleep(0.01)
print(len(TarDataset(archive, "test")))
"""


def test_concurrent_processes_build_a_tgz_index_once(tree, tmp_path):
    """torchrun ranks open the same archive at the same moment: one decompresses it, the others wait and
    read its index and payload."""
    import subprocess
    import sys
    import time

    tgz = make_tar(tree, tmp_path / "a.tgz", "w:gz")
    log, go = tmp_path / "scans.log", tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    children = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_CHILD, str(log), str(r), str(go), str(tgz)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in ready]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.write_text("")
    outs = [c.communicate(timeout=120) for c in children]
    assert all(c.returncode == 0 for c in children), [o[1][-2000:] for o in outs]
    assert [o[0].strip() for o in outs] == [str(len(TarDataset(tgz, "test")))] * 2
    assert log.read_text().splitlines() == ["scan"]


def test_loader_with_workers_gives_the_same_batches(tree, tmp_path):
    ds = TarDataset(make_tar(tree, tmp_path / "a.tar"), "train")
    ds[0]  # opens the archive in this process: workers must open their own
    pickle.loads(pickle.dumps(ds))[1]
    serial = list(loader(ds, 5))
    parallel = list(loader(ds, 5, workers=2))
    assert [len(y) for _, y in serial] == [5, 5, 2]
    for (xa, ya), (xb, yb) in zip(serial, parallel, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and ya.dtype == torch.int64
    shuffled = [y for _, y in loader(ds, 4, shuffle=True, seed=1)]
    assert sorted(torch.cat(shuffled).tolist()) == sorted(ds.labels.tolist())
    assert isinstance(loader(load_jpeg_archive(tree, "train"), 4), Batches)


def test_mixed_sizes_need_a_preprocessing(tmp_path):
    rng = np.random.default_rng(2)
    for cls, size in (("a", (40, 30)), ("b", (30, 50))):
        (tmp_path / "f" / cls).mkdir(parents=True)
        (tmp_path / "f" / cls / "x.png").write_bytes(_png(rng, size))
    ds = ImageFolderDataset(tmp_path / "f")
    with pytest.raises(ValueError, match="differ in size.*Res256Crop224"):
        next(iter(loader(ds, 2)))
    with pytest.raises(ValueError, match="differ in size"):
        first_images(ds, 2)
    x, _ = next(iter(loader(ds.with_preprocessing("Res224"), 2)))
    assert x.shape == (2, 3, 224, 224)
    assert ImageFolderDataset(tmp_path / "f", preprocessing="Crop288")[0][0].shape == (3, 288, 288)


def test_open_dataset_and_clear_errors(tree, tmp_path):
    assert isinstance(open_dataset("digits", "test"), ImageSet)
    assert isinstance(open_dataset(str(tree), "test"), ImageFolderDataset)
    with pytest.raises(ValueError, match="applies to streamed data"):
        open_dataset("digits", "test", preprocessing="Res224")
    with pytest.raises(FileNotFoundError, match="no 'val' split .*test, train"):
        open_stream(tree, "val")
    with pytest.raises(FileNotFoundError, match="no 'val' split"):
        TarDataset(make_tar(tree, tmp_path / "a.tar"), "val")
    with pytest.raises(FileNotFoundError, match="no such"):
        open_stream(tmp_path / "missing")
    flat = tree / "train"  # class folders only (an ImageNet val folder): the split is not part of the layout
    assert len(ImageFolderDataset(flat, "val")) == 12
    (tree / "train" / "cat" / "0000.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot decode 'cat/0000.png'"):
        ImageFolderDataset(flat)[0]
    (tmp_path / "bad.tar").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="not a readable tar"):
        TarDataset(tmp_path / "bad.tar")


def test_calibration_over_a_stream_equals_calibration_in_memory(build_model, tree, tmp_path, capsys):
    """Same images, same batches: bitwise equal statistics; other batch boundaries: equal to float64 rounding
    (the pooled moments are exact, only the float64 summation order differs)."""
    ds = TarDataset(make_tar(tree, tmp_path / "a.tar"), "train")
    mem = load_jpeg_archive(tree, "train")

    def stats(batches, progress=False):
        model = ms.prepare(build_model("resnet18", width=4))
        ms.calibrate(model, batches, progress=progress)
        return [(op.running_mean.clone(), op.running_var.clone()) for op in ms.operators(model)]

    in_memory = stats(Batches(mem, 5))
    streamed = stats(loader(ds, 5, workers=2), progress=True)
    assert "12.0/12.0" in capsys.readouterr().err  # the bar's total comes from the loader
    for (m1, v1), (m2, v2) in zip(in_memory, streamed, strict=True):
        assert torch.equal(m1, m2) and torch.equal(v1, v2)
    for (m1, v1), (m2, v2) in zip(in_memory, stats(loader(ds, 7)), strict=True):
        torch.testing.assert_close(m2, m1, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(v2, v1, rtol=1e-6, atol=1e-7)


def test_an_empty_class_folder_keeps_the_labels_in_an_archive_as_in_a_folder(tmp_path):
    """Issue #22.2: classes come from one rule for folders and archives: an empty class folder is a class
    (dropping it would shift every later label)."""
    root = make_tree(tmp_path / "tree", per_class=2, splits=("test",))
    (root / "test" / "bird").mkdir()  # sorts first: every label would shift by one
    folder = ImageFolderDataset(root, "test")
    for archive in (make_tar(root, tmp_path / "t.tar"), make_tar(root, tmp_path / "t.tgz", "w:gz")):
        ds = TarDataset(archive, "test")
        assert ds.classes == folder.classes == ["bird", *CLASSES]
        assert torch.equal(ds.labels, folder.labels) and torch.equal(stack(ds), stack(folder))


@pytest.mark.parametrize("compressed", [False, True])
def test_a_truncated_archive_is_an_error_naming_it(tree, tmp_path, compressed):
    """Issue #22.4: an archive cut at a 512-byte block boundary (or anywhere) is an error, never the images
    before the cut read as the whole set."""
    with tarfile.open(make_tar(tree, tmp_path / "whole.tar")) as tar:
        ends = [-(-(m.offset_data + m.size) // 512) * 512 for m in tar.getmembers() if m.isfile()]
    whole = (tmp_path / "whole.tar").read_bytes()
    cuts = [ends[len(ends) // 2], ends[-1], ends[-1] - 512]  # after a member, before the end marker, mid-member
    for k, cut in enumerate(cuts):
        path = tmp_path / f"cut{k}.tar"
        data = whole[:cut]
        if compressed:
            path, data = tmp_path / f"cut{k}.tar.gz", gzip.compress(data)
        path.write_bytes(data)
        with pytest.raises(ValueError, match=f"{path.name}.*(truncated|not a readable)"):
            TarDataset(path, "train")
    assert len(TarDataset(tmp_path / "whole.tar", "train")) == 12  # the whole archive still reads


@pytest.mark.parametrize("split", ["test", None])
def test_images_nested_inside_a_class_folder_keep_that_class_in_folders_and_archives(tmp_path, split):
    """A class folder with sub-folders (``test/dog/extra/0005.png``): the class is ``dog`` in the folder tree,
    the streamed archive and the in-memory loader alike; before, the archives labelled it ``extra``, a class
    of its own, and shifted every later label without a word."""
    root = make_tree(tmp_path / "tree", per_class=2, splits=("test",))
    (root / "test" / "dog" / "extra").mkdir()
    (root / "test" / "dog" / "extra" / "0005.png").write_bytes(_png(np.random.default_rng(1)))
    (root / "test" / "cat" / "a" / "b").mkdir(parents=True)  # two levels down
    (root / "test" / "cat" / "a" / "b" / "0007.png").write_bytes(_png(np.random.default_rng(2)))
    folder = ImageFolderDataset(root, "test")
    assert folder.classes == list(CLASSES) and folder.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    archive = make_tar(root, tmp_path / "t.tar")
    ds = TarDataset(archive, split)
    assert ds.classes == folder.classes and torch.equal(ds.labels, folder.labels)
    assert torch.equal(stack(ds), stack(folder))
    mem = load_jpeg_archive(archive, "test")
    assert mem.classes == folder.classes and torch.equal(mem.labels, folder.labels)
