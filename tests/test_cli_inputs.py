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


# ------------------------------------------------------------------ 11. a user's model or value that fails
TINY = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def build():
    return Net()
'''
BROKEN = {
    "raises at import": ("raise RuntimeError('no GPU here')\n", "importing", "RuntimeError: no GPU here"),
    "syntax error": ("def build(:\n", "is not valid Python", "SyntaxError"),
    "factory raises": ("def build():\n    raise KeyError('depth')\n", "build() fails", "KeyError"),
    "factory needs arguments": ("def build(depth):\n    return Net()\n", "called without arguments", "depth"),
    "forward raises": ("Net.forward = lambda self, x: x.view(-1, 5)\n", "forward fails", "RuntimeError"),
    "returns a tuple": ("_f = Net.forward\nNet.forward = lambda self, x: (_f(self, x), x)\n", "returns a tuple",
                        "logits tensor"),
    "returns a dict": ("_f = Net.forward\nNet.forward = lambda self, x: {'logits': _f(self, x)}\n", "returns a dict",
                       "logits tensor"),
    "active dropout": ("_f = Net.forward\nNet.forward = lambda self, x: torch.nn.functional.dropout(_f(self, x), "
                       "0.5, training=True)\n", "not deterministic in eval mode", "dropout"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_python_model_that_fails_is_one_error_line(case, tmp_path, capsys):
    extra, *fragments = BROKEN[case]
    source = tmp_path / "user_model.py"
    source.write_text(TINY + extra if "def build(" not in extra else TINY.split("def build")[0] + extra)
    tree = _cifar_like_tree(tmp_path / "data", ("a", "b", "c"), split="train")
    rc, _, err = cli(capsys, "calibrate", "--model", f"python:{source}:build", "--pretrained", "false", "--data",
                     tree, "--device", "cpu", "--no-progress", "--out", tmp_path / "s.safetensors")
    one_line_error(rc, err, "calibrate", *fragments)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_a_model_in_another_float_type_is_cast_with_a_note(dtype, tmp_path, capsys):
    source = tmp_path / "user_model.py"
    source.write_text(TINY.replace("return Net()", f"return Net().to(torch.{str(dtype).split('.')[1]})"))
    tree = _cifar_like_tree(tmp_path / "data", ("a", "b", "c"), split="train")
    rc, _, err = cli(capsys, "calibrate", "--model", f"python:{source}:build", "--pretrained", "false", "--data",
                     tree, "--device", "cpu", "--no-progress", "--out", tmp_path / "s.safetensors")
    assert rc == 0, err
    assert f"warning: python:{source}:build: weights in {str(dtype).split('.')[1]}; cast to float32" in err


def test_a_worker_error_is_the_workers_one_line(tmp_path, capsys):
    tree = _cifar_like_tree(tmp_path / "data", ("a", "b", "c"), split="train")
    (tree / "train" / "c" / "0.png").write_bytes(b"not a png")  # decoded by a worker only (4th of the sample)
    rc, _, err = cli(capsys, "calibrate", "--model", _three_class_checkpoint(tmp_path / "m"), "--data", tree,
                     "--workers", 2, "--batch-size", 2,
                     "--device", "cpu", "--no-progress", "--out", tmp_path / "s.safetensors")
    last = one_line_error(rc, err, "calibrate", "c/0.png", "cannot decode")
    assert "DataLoader" not in last and "File " not in last and "_io.BytesIO" not in last


def _three_class_checkpoint(path: Path) -> Path:
    from meansparse.models import create_model, save_checkpoint

    torch.manual_seed(0)
    kwargs = {"width": 4, "normalization": "none", "num_classes": 3}
    save_checkpoint(create_model("small_cnn", **kwargs).eval(), path,
                    {"model": "small_cnn", "dataset": "custom", "model_kwargs": kwargs})
    return path


def test_train_refuses_a_learning_rate_that_is_not_a_finite_positive_number(tmp_path, capsys):
    for lr in ("nan", "inf", "0", "-0.1"):
        rc, _, err = cli(capsys, "train", "--lr", lr, "--out", tmp_path / "run")
        assert rc == 2 and "argument --lr: must be a finite number > 0" in err, err


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    from meansparse.cli import calibrate as calibrate_cli

    def bug(*a, **k):
        raise KeyError("internal")

    monkeypatch.setattr(calibrate_cli, "calibrate_checkpoint", bug)
    args = ["calibrate", "--model", _checkpoint(tmp_path / "m"), "--out", tmp_path / "s.safetensors"]
    rc, _, err = cli(capsys, *args)
    one_line_error(rc, err, "calibrate", "KeyError: 'internal'", "--debug")
    with pytest.raises(KeyError):
        cli(capsys, *args, "--debug")


# ------------------------------------------------------------------ 12. smaller ones
def test_weights_that_are_a_folder_or_do_not_fit_say_why_in_full(tmp_path, capsys):
    source = tmp_path / "user_model.py"
    source.write_text(TINY)
    args = ["calibrate", "--model", f"python:{source}:build", "--device", "cpu", "--out", tmp_path / "s.safetensors"]
    rc, _, err = cli(capsys, *args, "--weights", tmp_path)
    one_line_error(rc, err, "calibrate", "is a folder")
    from safetensors.torch import save_file

    save_file({"conv.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(5, 4), "extra": torch.zeros(1)},
              tmp_path / "w.safetensors")
    rc, _, err = cli(capsys, *args, "--weights", tmp_path / "w.safetensors")
    last = one_line_error(rc, err, "calibrate", "missing key(s) in state_dict: conv.bias, fc.bias",
                          "unexpected key(s) in state_dict: extra", "size mismatch for fc.weight")
    assert last.endswith("torch.Size([3, 4])"), last


def test_state_files_that_are_not_states_or_are_outputs(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "m")
    args = ["evaluate", "--model", ckpt, "--n-examples", 4, *FAST, "--out", tmp_path / "e"]
    for content in (b"\x89PNG\r\n\x1a\n\0\0", b"[1, 2]", b"not json"):
        (tmp_path / "bad.json").write_bytes(content)
        rc, _, err = cli(capsys, *args, "--state", tmp_path / "bad.json")
        one_line_error(rc, err, "evaluate", str(tmp_path / "bad.json"))
    rc, _, err = cli(capsys, *args, "--state", tmp_path / "e" / "report.json")
    one_line_error(rc, err, "evaluate", "--state", "report.json", "choose another path")


def test_split_validation_is_a_split_the_loader_knows(tmp_path, capsys):
    tree = _cifar_like_tree(tmp_path / "data", ("a", "b", "c"), split="validation")
    rc, _, err = cli(capsys, "calibrate", "--model", _three_class_checkpoint(tmp_path / "m"), "--data", tree,
                     "--split", "validation", "--device", "cpu", "--no-progress", "--out", tmp_path / "s.safetensors")
    assert rc == 0, err


def test_train_says_when_it_clamps_the_held_out_part(tmp_path, capsys, monkeypatch):
    from meansparse import training

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "build_model", stop)  # the warning is all this test needs
    rc, _, err = cli(capsys, "train", "--data", "digits", "--model", "small_cnn", "--n-holdout", 100000,
                     "--out", tmp_path / "run")
    assert "warning: n_holdout 100000 is more than a fifth of the" in err and "holding out" in err, err


@pytest.mark.parametrize("option, fragment", [
    ("pgd.steps=3", "options for pgd, which is not among the attacks run"),
    ("apgd-ce.rho=7", "apgd-ce.rho=7: must be a fraction in (0, 1]"),
    ("square.p_init=5", "square.p_init=5: must be a fraction in (0, 1]"),
])
def test_attack_options_that_would_be_ignored_or_are_out_of_range(option, fragment, tmp_path, capsys):
    rc, _, err = cli(capsys, "evaluate", "--model", "nowhere", "--attacks", "apgd-ce,square,adaptive",
                     "--option", option, "--out", tmp_path / "e")
    one_line_error(rc, err, "evaluate", fragment)
    rc, _, err = cli(capsys, "demo", "--sweep-attacks", "apgd-ce", "--attacks", "square", "--option", option,
                     "--out", tmp_path / "d")
    one_line_error(rc, err, "demo", fragment)


def test_a_negative_adaptive_lambda_stays_allowed():
    from meansparse.evaluation import build_attack

    assert build_attack("adaptive", lam=-3).params()["lam"] == -3


def test_a_huge_seed_is_refused_by_name_and_sweep_help_lists_only_its_options(capsys):
    rc, _, err = cli(capsys, "evaluate", "--model", "x", "--seed", str(2**64), "--out", "o")
    assert rc == 2 and "argument --seed: must be below 2**63" in err, err
    rc, out, _ = cli(capsys, "sweep", "--help")
    assert rc == 0 and "--sweep-attacks" in out and "--n-test" not in out and "--attacks " not in out


def test_sweep_and_demo_check_the_datas_classes_too(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "m", normalization="none", dataset="custom")
    tree = _cifar_like_tree(tmp_path / "cats", ("cat",), split="train")
    _cifar_like_tree(tmp_path / "cats", ("cat",), split="test")
    rc, _, err = cli(capsys, "sweep", "--model", ckpt, "--data", tree, "--n-holdout", 1, "--quiet",
                     "--out", tmp_path / "s")
    one_line_error(rc, err, "sweep", "1 classes (cat)", "10 logits", "--allow-class-mismatch")
