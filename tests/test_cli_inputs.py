"""Issue #22 (data and inputs) through the real entry point: no silent wrong number on users' own models, data
and files; every user error one line ``meansparse <cmd>: error: ...`` with exit code 2, nothing computed lost.

Tiny checkpoints, tiny image trees in tmp_path, tiny budgets."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_cli_errors import FAST, _checkpoint, cli, one_line_error

from meansparse import calibration


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEANSPARSE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A digits CNN trained for a few seconds, so that attacks have clean-correct examples to attack."""
    from meansparse.training import TrainConfig, train

    out = tmp_path_factory.mktemp("trained")
    cfg = TrainConfig(model="small_cnn", model_kwargs={"activation": "relu", "width": 8}, dataset="digits",
                      method="standard", epochs=3, batch_size=64, lr=0.05, n_holdout=100, eval_n=50, eval_steps=0,
                      augment=False)
    train(cfg, out, progress=False)
    return out / "best"


def _interrupt_after(monkeypatch, batches: int) -> None:
    """Ctrl-C while the calibration folds in batch ``batches`` (the ones before it are kept)."""
    real, calls = calibration._check_finite, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == batches + 1:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(calibration, "_check_finite", interrupted)


# ------------------------------------------------------------------ 1. a stale .partial of another model
def test_calibrate_refuses_the_progress_of_another_model(tmp_path, capsys, monkeypatch):
    a, b = _checkpoint(tmp_path / "a", seed=0), _checkpoint(tmp_path / "b", seed=1)
    out = tmp_path / "s.safetensors"
    args = ["calibrate", "--n-examples", 64, "--batch-size", 16, "--no-progress", "--device", "cpu", "--out", out]
    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        assert cli(capsys, *args, "--model", a)[0] == 2
    rc, _, err = cli(capsys, *args, "--model", b)
    one_line_error(rc, err, "calibrate", "s.safetensors.partial", "another model", "remove the file")
    assert not out.exists() and out.with_name("s.safetensors.partial").exists()
    rc, _, err = cli(capsys, *args, "--model", a, "--batch-size", 8)  # other batches: refused as well
    one_line_error(rc, err, "calibrate", "other batch settings")
    assert cli(capsys, *args, "--model", a)[0] == 0  # the command it belongs to resumes it


# ------------------------------------------------------------------ 9. an output that is an input
def test_calibrate_refuses_to_overwrite_its_inputs(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "m")
    weights = tmp_path / "m.safetensors"
    before = weights.read_bytes()
    args = ["calibrate", "--model", ckpt, "--n-examples", 16, "--no-progress", "--device", "cpu"]
    for out, fragment in ((weights, "--model (weights)"), (tmp_path / "m.json", "--model (config)"),
                          (tmp_path / "." / "m.safetensors", "--model (weights)")):
        rc, _, err = cli(capsys, *args, "--out", out)
        one_line_error(rc, err, "calibrate", fragment, "an input of this command")
    assert weights.read_bytes() == before
    data = tmp_path / "data.tar"
    data.write_bytes(b"\0" * 1024)
    rc, _, err = cli(capsys, *args, "--data", data, "--out", data)
    one_line_error(rc, err, "calibrate", "--data")
    assert data.read_bytes() == b"\0" * 1024


# ------------------------------------------------------------------ 10. a full disk loses nothing
def _disk_full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_at_calibrates_final_save_keeps_the_calibration(tmp_path, capsys, monkeypatch):
    from meansparse.cli import calibrate as calibrate_cli

    ckpt = _checkpoint(tmp_path / "m")
    args = ["calibrate", "--model", ckpt, "--n-examples", 48, "--batch-size", 16, "--no-progress", "--device", "cpu"]
    assert cli(capsys, *args, "--out", tmp_path / "whole.safetensors")[0] == 0
    out = tmp_path / "s.safetensors"
    with monkeypatch.context() as m:
        m.setattr(calibrate_cli, "save", _disk_full)
        rc, _, err = cli(capsys, *args, "--out", out)
    one_line_error(rc, err, "calibrate", f"cannot write {out}", "No space left on device", "s.safetensors.partial",
                   "rerun the same command")
    assert not out.exists() and (tmp_path / "s.safetensors.partial").exists()
    with monkeypatch.context() as m:  # the rerun computes no batch again
        m.setattr(calibration, "_check_finite", _disk_full)
        assert cli(capsys, *args, "--out", out)[0] == 0
    whole, cut = load_file(tmp_path / "whole.safetensors"), load_file(out)
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    assert not (tmp_path / "s.safetensors.partial").exists()


def test_a_full_disk_at_evaluates_last_writes_keeps_every_batch(trained, tmp_path, capsys, monkeypatch):
    out = tmp_path / "eval"
    args = ["evaluate", "--model", trained, "--n-examples", 8, *FAST, "--save-adversarial", "--out", out]
    with monkeypatch.context() as m:
        m.setattr(torch, "save", _disk_full)
        rc, _, err = cli(capsys, *args)
    one_line_error(rc, err, "evaluate", "adversarial.pt", "No space left on device", "state.json",
                   "nothing is attacked again")
    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", _disk_full)
        rc, _, err = cli(capsys, *args)
    one_line_error(rc, err, "evaluate", "No space left on device", "state.json")
    assert cli(capsys, *args)[0] == 0
    report = json.loads((out / "report.json").read_text())
    assert report["metadata"]["run"]["resumed_batches"] >= 1 and (out / "adversarial.pt").exists()


# ------------------------------------------------------------------ 3. data whose classes are not the model's
def _cifar_like_tree(root: Path, classes: tuple[str, ...], split: str = "test") -> Path:
    for c, cls in enumerate(classes):
        (root / split / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (40 * c, 60 * i, 90)).save(root / split / cls / f"{i}.png")
    return root


def test_data_classes_that_are_not_the_models_are_an_error_or_a_named_warning(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "m", normalization="none", dataset="custom")  # 10 logits, RGB input
    tree = _cifar_like_tree(tmp_path / "cats", ("cat",))
    args = ["evaluate", "--model", ckpt, "--data", tree, "--n-examples", 2, *FAST, "--out", tmp_path / "e"]
    rc, _, err = cli(capsys, *args)
    one_line_error(rc, err, "evaluate", "1 classes (cat)", "10 logits", "--allow-class-mismatch")
    rc, _, err = cli(capsys, "calibrate", "--model", ckpt, "--data", tree, "--split", "test", "--device", "cpu",
                     "--no-progress", "--out", tmp_path / "s.safetensors")
    one_line_error(rc, err, "calibrate", "1 classes (cat)", "10 logits")
    rc, _, err = cli(capsys, *args, "--allow-class-mismatch")
    assert rc == 0 and "warning: --data " in err and "has 1 classes (cat) but" in err and "10 logits" in err


def test_class_names_the_checkpoint_recorded_must_be_the_datas(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "m", normalization="none", dataset="custom")
    config = json.loads((tmp_path / "m.json").read_text())
    (tmp_path / "m.json").write_text(json.dumps({**config, "classes": [f"c{i}" for i in range(10)]}))
    tree = _cifar_like_tree(tmp_path / "other", tuple(f"d{i}" for i in range(10)))
    rc, _, err = cli(capsys, "evaluate", "--model", ckpt, "--data", tree, "--n-examples", 2, *FAST,
                     "--out", tmp_path / "e")
    one_line_error(rc, err, "evaluate", "the classes d0, d1", "was trained on c0, c1")


def test_training_records_the_classes_it_was_trained_on(trained):
    assert json.loads(trained.with_suffix(".json").read_text())["classes"] == [str(i) for i in range(10)]
