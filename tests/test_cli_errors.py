"""Issue #15 through the real entry point (``meansparse.cli.main``, what the console script calls): no wrong
number (same attacks on both sides of a comparison, non-finite logits, the data set a checkpoint was trained
on, validated calibration inputs, states tied to their base model, positive counts, honest report facts,
meaningless ε), every user error one line ``meansparse <cmd>: error: ...`` with exit code 2, validation
before the first expensive step, nothing lost on Ctrl-C.

Everything runs on 8x8 digits or a six-image fake CIFAR archive with tiny models and budgets."""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import meansparse as ms
from meansparse import pipeline_report
from meansparse.cli import build_parser, main
from meansparse.data import Batches, load_digits
from meansparse.evaluation import APGD, BPDA, Report, Square, Transfer, masking_findings
from meansparse.models import create_model, save_checkpoint

FAST = ["--attacks", "apgd-ce", "--option", "apgd-ce.steps=2", "--no-progress", "--device", "cpu"]


# ----------------------------------------------------------------------------------------------- helpers
def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one command; argparse's own errors exit through SystemExit."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc: int, err: str, command: str, *fragments: str) -> str:
    """The run failed with exit code 2, ended with one ``meansparse <command>: error:`` line holding every
    fragment, and printed no traceback."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert last.startswith(f"meansparse {command}: error: "), err
    for f in fragments:
        assert f in last, (f, last)
    return last


def _checkpoint(path: Path, *, normalization: str = "digits", dataset: str = "digits", activation: str = "relu",
                seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = create_model("small_cnn", width=4, normalization=normalization, activation=activation).eval()
    save_checkpoint(net, path, {"model": "small_cnn", "dataset": dataset,
                                "model_kwargs": {"width": 4, "normalization": normalization,
                                                 "activation": activation}})
    return path


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEANSPARSE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def ckpt(tmp_path):
    """A digits checkpoint (untrained small CNN: the errors, not the numbers, are under test)."""
    return _checkpoint(tmp_path / "digits-cnn")


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    """A six-image-per-split CIFAR-shaped JPEG archive standing in for cifar10-jpg (the other eight CIFAR-10
    classes are empty folders, so that the labels are CIFAR-10's)."""
    archive = tmp_path / "cifar10-jpg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            for cls in ("bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"):
                folder = tarfile.TarInfo(f"{split}/{cls}")
                folder.type = tarfile.DIRTYPE
                tar.addfile(folder)
            for c, cls in enumerate(("airplane", "automobile")):
                for i in range(3):
                    buf = io.BytesIO()
                    Image.new("RGB", (32, 32), (100 * c, 40 * i, 50)).save(buf, format="JPEG")
                    info = tarfile.TarInfo(f"{split}/{cls}/{i:04d}.jpg")
                    info.size = len(buf.getvalue())
                    tar.addfile(info, io.BytesIO(buf.getvalue()))
    monkeypatch.setenv("MEANSPARSE_CIFAR10_JPG", str(archive))
    return archive


# ------------------------------------------------------------------- 1. same attacks on both sides
def test_demo_attacks_the_base_and_the_meansparse_model_alike(ckpt, tmp_path, capsys, monkeypatch):
    titles = []
    real_plot = pipeline_report.plot_alpha_curve

    def spy(rows, path, **kw):
        titles.append(kw)
        return real_plot(rows, path, **kw)

    monkeypatch.setattr(pipeline_report, "plot_alpha_curve", spy)
    rc, _, err = cli(capsys, "demo", "--model", ckpt, "--out", tmp_path, "--n-holdout", 60, "--n-sweep-robust", 20,
                     "--n-test", 30, "--alphas", "0,0.3", "--batch-size", 16, "--calibration-batches", 2,
                     "--attacks", "apgd-ce,bpda-apgd-ce,transfer", "--option", "apgd-ce.steps=2",
                     "--option", "transfer.steps=2", "--option", "transfer.n_target_classes=2", "--quiet")
    assert rc == 0, err
    before = Report.from_json((tmp_path / "before.json").read_text())
    after = Report.from_json((tmp_path / "after.json").read_text())
    assert before.ladder[0]["attacks"] == after.ladder[0]["attacks"] == ["apgd-ce", "bpda-apgd-ce", "transfer"]
    assert before.attacks == after.attacks  # the same rungs of the budget ladder too
    for name in before.attacks:  # the same budgets; only the transfer source differs (itself vs the base)
        a, b = before.metadata["attack_settings"][name], after.metadata["attack_settings"][name]
        assert {k: v for k, v in a.items() if k != "base"} == {k: v for k, v in b.items() if k != "base"}
    report = (tmp_path / "report.md").read_text()
    assert "Both rows were attacked with the same attacks and budgets" in report
    assert "steps 2" in report
    # 8. the facts behind the numbers: 2 batches of 16 calibrated (not the whole fitting split) ...
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["calibration_images"] == 32 and "calibration on 32 of" in report
    assert summary["same_attacks_both_rows"] and summary["n_sweep_robust"] == 20
    # ... and the α curve counts the robust images (20), not only the clean ones (60), with error bars
    assert titles and titles[0]["n_robust"] == 20 and titles[0]["n_clean"] == 60
    assert "robust on 20 / clean on 60" in titles[0]["title"]


def test_masking_warning_compares_equals_on_a_model_without_operators():
    """bpda-X is X and transfer crafts on the model itself when there are no operators: a gap between them
    and the white-box attacks is noise between equals, not masking. Square beating them still counts."""
    n = 100
    white = torch.ones(n, dtype=torch.int8)
    broken = white.clone()
    broken[:10] = 0  # breaks 10 % of what survived every white-box attack
    attacks = [APGD(), BPDA(APGD(steps=10)), Transfer()]
    masks = {"apgd-ce": white, "bpda-apgd-ce": broken, "transfer": broken}
    assert masking_findings(attacks, masks, n, True).warnings  # with operators: masking
    assert masking_findings(attacks, masks, n, True, has_operators=False).warnings == []
    square = [APGD(), Square()]
    found = masking_findings(square, {"apgd-ce": white, "square": broken}, n, True, has_operators=False)
    assert found.warnings and "square" in found.warnings[0]


# --------------------------------------------------------------- 2. non-finite logits, hashes verified
def test_nan_weights_are_an_error_not_a_robust_model(ckpt, tmp_path, capsys):
    weights = load_file(str(ckpt) + ".safetensors")
    weights["net.fc2.weight"] = torch.full_like(weights["net.fc2.weight"], float("nan"))
    save_file(weights, str(tmp_path / "nan.safetensors"))
    config = json.loads(Path(str(ckpt) + ".json").read_text())
    del config["weights_sha256"]  # as a checkpoint written before hashes were recorded
    (tmp_path / "nan.json").write_text(json.dumps(config))
    rc, _, err = cli(capsys, "evaluate", "--checkpoint", tmp_path / "nan", "--out", tmp_path / "o", *FAST)
    one_line_error(rc, err, "evaluate", "non-finite logits")
    assert not (tmp_path / "o" / "report.json").exists()


def test_checkpoint_and_state_hashes_are_verified(ckpt, tmp_path, capsys):
    config = json.loads(Path(str(ckpt) + ".json").read_text())
    assert len(config["weights_sha256"]) == 64
    weights = load_file(str(ckpt) + ".safetensors")
    weights["net.fc2.bias"] = weights["net.fc2.bias"] + 1.0  # a valid file with other numbers
    save_file(weights, str(ckpt) + ".safetensors")
    rc, _, err = cli(capsys, "evaluate", "--checkpoint", ckpt, "--out", tmp_path / "o", *FAST)
    one_line_error(rc, err, "evaluate", "digits-cnn.safetensors", "sha256 does not match")
    del config["weights_sha256"]  # an old checkpoint without a hash still loads, unverified
    Path(str(ckpt) + ".json").write_text(json.dumps(config))
    assert ms.models.load(ckpt) is not None

    model = ms.prepare(ms.models.load(ckpt))
    ms.calibrate(model, [load_digits("train").float()[:64]], progress=False)
    ms.save(model, tmp_path / "state.safetensors")
    tensors = load_file(str(tmp_path / "state.safetensors"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "state.safetensors"), framework="pt") as f:
        header = f.metadata()
    tensors["site.0.running_mean"] = tensors["site.0.running_mean"] + 1
    save_file(tensors, str(tmp_path / "state.safetensors"), metadata=header)
    with pytest.raises(ValueError, match="corrupted"):
        ms.load(ms.models.load(ckpt), tmp_path / "state.safetensors")


# ------------------------------------------------------------------------------- 3. the data set
def test_data_defaults_to_the_checkpoints_and_a_mismatch_is_an_error(tmp_path, fake_cifar, capsys):
    cifar = _checkpoint(tmp_path / "cifar-cnn", normalization="cifar10", dataset="cifar10-jpg")
    rc, _, err = cli(capsys, "evaluate", "--checkpoint", cifar, "--out", tmp_path / "o", "--n-examples", 4, *FAST)
    assert rc == 0, err
    assert "note: --data cifar10-jpg (the data set recorded in" in err
    report = (tmp_path / "o" / "report.md").read_text()
    assert "- data: cifar10-jpg, test split: 4 of 6 images (random sample, seed 0)" in report
    rc, _, err = cli(capsys, "evaluate", "--checkpoint", cifar, "--data", "digits", "--out", tmp_path / "o2", *FAST)
    one_line_error(rc, err, "evaluate", "expects 3-channel images", "--data digits")
    rc, _, err = cli(capsys, "calibrate", "--checkpoint", cifar, "--data", "digits", "--out", tmp_path / "s.st",
                     "--device", "cpu")
    one_line_error(rc, err, "calibrate", "expects 3-channel images")
    assert not (tmp_path / "s.st").exists()


# ------------------------------------------------------------------ 4. calibration inputs validated
@pytest.mark.parametrize("form", ["uint8", "0-255", "normalised"])
def test_calibrate_refuses_what_evaluate_refuses(ckpt, form):
    x = load_digits("train").images[:32]
    batch = {"uint8": x, "0-255": x.float(), "normalised": (x.float() / 255 - 0.5) / 0.25}[form]
    model = ms.prepare(ms.models.load(ckpt))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ms.calibrate(model, [batch], progress=False)
    assert not any(op.calibrated for op in ms.operators(model))


# --------------------------------------------------------------------- 5. a state and its base model
def test_state_is_tied_to_its_base_model(tmp_path, capsys):
    relu = _checkpoint(tmp_path / "relu", activation="relu")
    gelu = _checkpoint(tmp_path / "gelu", activation="gelu")  # same seed: same weights, other activation
    other = _checkpoint(tmp_path / "other", activation="relu", seed=1)
    state = tmp_path / "relu-state.safetensors"
    rc, _, err = cli(capsys, "calibrate", "--checkpoint", relu, "--out", state, "--device", "cpu", "--no-progress",
                     "--max-batches", 1)
    assert rc == 0, err
    assert len(ms.operators(ms.load(ms.models.load(relu), state))) == 3
    with pytest.raises(ValueError, match="another activation"):
        ms.load(ms.models.load(gelu), state)
    with pytest.raises(ValueError, match="different base model"):
        ms.load(ms.models.load(other), state)
    with pytest.warns(UserWarning, match="loaded anyway"):
        assert ms.operators(ms.load(ms.models.load(other), state, strict=False))
    rc, _, err = cli(capsys, "evaluate", "--checkpoint", gelu, "--meansparse", state, "--out", tmp_path / "o", *FAST)
    one_line_error(rc, err, "evaluate", "another activation", "strict=False")
    rc, _, err = cli(capsys, "evaluate", "--checkpoint", other, "--meansparse", state, "--no-strict",
                     "--out", tmp_path / "o", "--n-examples", 5, *FAST)
    assert rc == 0 and "warning: meansparse.load" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ 6. counts positive
@pytest.mark.parametrize("argv", [
    ["evaluate", "--n-examples", "-5"], ["demo", "--n-test", "-5"], ["calibrate", "--n-examples", "-5"],
    ["evaluate", "--n-examples", "0"], ["evaluate", "--batch-size", "-1"], ["demo", "--threads", "-2"],
])
def test_counts_must_be_positive(argv, ckpt, tmp_path, capsys):
    rc, _, err = cli(capsys, *argv, "--checkpoint" if argv[0] != "demo" else "--model", ckpt,
                     "--out", tmp_path / "o")
    one_line_error(rc, err, argv[0], argv[1], "must be a positive integer")
    assert not (tmp_path / "o").exists()


def test_a_count_larger_than_the_split_is_clamped_with_a_notice(ckpt, tmp_path, capsys):
    rc, _, err = cli(capsys, "evaluate", "--checkpoint", ckpt, "--n-examples", 100000, "--out", tmp_path / "o", *FAST)
    assert rc == 0, err
    assert "note: --n-examples 100000 is more than the 449 images in the digits test split" in err
    assert Report.from_json((tmp_path / "o" / "report.json").read_text()).n_examples == 449
    with pytest.raises(ValueError, match="positive"):
        load_digits("test").sample(-5)


# ------------------------------------------------------------------------------- 7. empty selection
def test_an_empty_selection_is_an_error_and_sites_never_re_prepares(ckpt):
    base = ms.models.load(ckpt)
    with pytest.raises(ValueError, match="'nomatch' matches none of the 3 sites"):
        ms.prepare(base, include="nomatch")
    with pytest.raises(ValueError, match="leaves none"):
        ms.prepare(base, exclude=".")
    empty = ms.prepare(base, activations=())  # nothing to select from: a prepared model without sites
    assert ms.sites(empty) == [] and len(ms.sites(base)) == 3  # the preview is for unprepared models only


# ---------------------------------------------------------------------------- 9. a meaningless eps
def test_eps_covering_the_box_is_flagged_and_fails_the_sanity_checks(ckpt, tmp_path, capsys, monkeypatch):
    rc, _, err = cli(capsys, "evaluate", "--checkpoint", ckpt, "--eps", 8, "--n-examples", 6, "--sanity",
                     "--out", tmp_path / "o", *FAST)
    assert rc == 0, err
    report = Report.from_json((tmp_path / "o" / "report.json").read_text())
    assert any("covers the whole [0, 1] box" in w and "8/255" in w for w in report.warnings)
    assert [s["passed"] for s in report.sanity if s["check"] == "eps-meaningful"] == [False]
    monkeypatch.setenv("MEANSPARSE_CIFAR10_JPG", str(tmp_path / "missing.tar.gz"))
    rc, _, err = cli(capsys, "evaluate", "--checkpoint", ckpt, "--data", "cifar10-jpg", "--out", tmp_path / "o2",
                     *FAST)
    one_line_error(rc, err, "evaluate", "MEANSPARSE_CIFAR10_JPG=", "missing.tar.gz")


# ------------------------------------------------------------------ 10. every error is one line, exit 2
@pytest.mark.parametrize("kind", ["truncated", "empty", "pickled", "no-model-key", "architecture"])
def test_broken_checkpoints(kind, ckpt, tmp_path, capsys):
    weights, meta = Path(str(ckpt) + ".safetensors"), Path(str(ckpt) + ".json")
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:200])
    elif kind == "empty":
        weights.write_bytes(b"")
    elif kind == "pickled":
        torch.save(load_file(str(weights)), weights)
    elif kind == "no-model-key":
        meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "model"}))
    else:
        config = json.loads(meta.read_text())
        config["model_kwargs"]["width"] = 8
        config.pop("weights_sha256")
        meta.write_text(json.dumps(config))
    rc, _, err = cli(capsys, "evaluate", "--checkpoint", ckpt, "--out", tmp_path / "o", *FAST)
    expected = {"truncated": "not a readable safetensors file", "empty": "not a readable safetensors file",
                "pickled": "not a readable safetensors file", "no-model-key": "digits-cnn.json",
                "architecture": "does not fit the architecture"}[kind]
    one_line_error(rc, err, "evaluate", expected)


def test_broken_state_file(ckpt, tmp_path, capsys):
    (tmp_path / "state.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    rc, _, err = cli(capsys, "evaluate", "--checkpoint", ckpt, "--meansparse", tmp_path / "state.safetensors",
                     "--out", tmp_path / "o", *FAST)
    one_line_error(rc, err, "evaluate", "state.safetensors", "not a readable safetensors file")


@pytest.mark.parametrize("command", ["evaluate", "calibrate"])
def test_bad_device(command, ckpt, tmp_path, capsys):
    out = tmp_path / ("o" if command == "evaluate" else "s.safetensors")
    rc, _, err = cli(capsys, command, "--checkpoint", ckpt, "--out", out, "--device", "gpu0")
    one_line_error(rc, err, command, "'gpu0' is not a valid torch device")


def test_out_that_is_a_file_or_cannot_be_created(ckpt, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    rc, _, err = cli(capsys, "evaluate", "--checkpoint", ckpt, "--out", tmp_path / "file", *FAST)
    one_line_error(rc, err, "evaluate", "is not a folder")
    rc, _, err = cli(capsys, "evaluate", "--checkpoint", ckpt, "--out", tmp_path / "file" / "sub", *FAST)
    one_line_error(rc, err, "evaluate", "cannot create")
    rc, _, err = cli(capsys, "calibrate", "--checkpoint", ckpt, "--out", tmp_path, "--device", "cpu")
    one_line_error(rc, err, "calibrate", "is a folder")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out(ckpt, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, _, err = cli(capsys, "evaluate", "--checkpoint", ckpt, "--out", ro, "--no-resume", *FAST)
        one_line_error(rc, err, "evaluate", "not writable")
    finally:
        ro.chmod(0o700)


def test_bad_data(ckpt, tmp_path, capsys):
    (tmp_path / "notar.tar.gz").write_text("hello")
    rc, _, err = cli(capsys, "evaluate", "--checkpoint", ckpt, "--data", "cifar10-jpg", "--data-root",
                     tmp_path / "notar.tar.gz", "--out", tmp_path / "o", *FAST)
    one_line_error(rc, err, "evaluate", "notar.tar.gz", "not a readable tar archive")
    tree = tmp_path / "tree" / "test" / "cat"  # streamed: the bad image is found when its batch is decoded
    tree.mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tree / "0000.jpg")
    (tree / "0001.jpg").write_bytes(b"not a jpeg")
    cifar = _checkpoint(tmp_path / "cifar-cnn", normalization="cifar10", dataset="cifar10-jpg")
    rc, _, err = cli(capsys, "evaluate", "--checkpoint", cifar, "--data", tmp_path / "tree", "--out",
                     tmp_path / "o", *FAST)
    one_line_error(rc, err, "evaluate", "cat/0001.jpg", "cannot decode")


def test_a_corrupt_cache_is_rebuilt(tmp_path, fake_cifar, capsys):
    cifar = _checkpoint(tmp_path / "cifar-cnn", normalization="cifar10", dataset="cifar10-jpg")
    args = ["evaluate", "--checkpoint", cifar, "--n-examples", 4, "--no-resume", *FAST]
    assert cli(capsys, *args, "--out", tmp_path / "a")[0] == 0
    for f in (tmp_path / "cache").glob("*.npz"):
        f.write_bytes(f.read_bytes()[:50])
    rc, _, err = cli(capsys, *args, "--out", tmp_path / "b")
    assert rc == 0 and "warning:" in err and "rebuilding it" in err, err
    a, b = (Report.from_json((tmp_path / d / "report.json").read_text()) for d in "ab")
    assert a.comparable() == b.comparable()


@pytest.mark.parametrize("argv, fragment", [
    (["--option", "apgd-ce.steps=-5"], "apgd-ce.steps=-5"),
    (["--option", "square.queries=0"], "square.queries=0"),
    (["--attacks", "apgd-ce,typo"], "unknown attack 'typo'"),
    (["--option", "typo.steps=3"], "unknown attack"),
    (["--option", "steps=3"], "bad --option"),
])
def test_invalid_attack_options_fail_before_loading_anything(argv, fragment, tmp_path, capsys):
    rc, _, err = cli(capsys, "evaluate", "--checkpoint", tmp_path / "does-not-exist", "--out", tmp_path / "o",
                     "--device", "cpu", *argv)
    one_line_error(rc, err, "evaluate", fragment)  # before the (missing) checkpoint is even looked at


def test_bad_regex(ckpt, tmp_path, capsys):
    rc, _, err = cli(capsys, "calibrate", "--checkpoint", ckpt, "--include", "(", "--out", tmp_path / "s.st")
    one_line_error(rc, err, "calibrate", "bad --include regular expression '('")
    rc, _, err = cli(capsys, "calibrate", "--checkpoint", ckpt, "--include", "nomatch", "--out", tmp_path / "s.st",
                     "--device", "cpu", "--no-progress")
    one_line_error(rc, err, "calibrate", "'nomatch' matches none")
    assert not (tmp_path / "s.st").exists()


def test_resuming_train_into_a_run_of_another_architecture(tmp_path, capsys):
    common = ["train", "--model", "small_cnn", "--activation", "relu", "--data", "digits", "--epochs", 1,
              "--n-holdout", 100, "--eval-n", 20, "--steps", 1, "--batch-size", 256, "--out", tmp_path / "run"]
    assert cli(capsys, *common, "--width", 4)[0] == 0
    rc, _, err = cli(capsys, *common, "--width", 8)
    one_line_error(rc, err, "train", "holds a run with a different configuration", "model_kwargs")


def test_ctrl_c_is_one_line_and_a_rerun_resumes_to_the_same_report(trained, tmp_path, capsys, monkeypatch):
    from meansparse.evaluation import runner

    args = ["evaluate", "--checkpoint", trained, "--n-examples", 30, "--batch-size", 10, *FAST]
    assert cli(capsys, *args, "--out", tmp_path / "whole")[0] == 0
    real, calls = runner.attack_batch, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(runner, "attack_batch", interrupted)
    rc, _, err = cli(capsys, *args, "--out", tmp_path / "cut")
    assert rc == 2 and "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.strip()][-1] == \
        "meansparse evaluate: interrupted; rerun the same command to resume"
    state = json.loads((tmp_path / "cut" / "state.json").read_text())
    assert list(state["batches"]["apgd-ce"]) == ["0"]  # the finished batch was kept
    monkeypatch.setattr(runner, "attack_batch", real)
    assert cli(capsys, *args, "--out", tmp_path / "cut")[0] == 0
    whole, cut = (Report.from_json((tmp_path / d / "report.json").read_text()) for d in ("whole", "cut"))
    assert whole.comparable()["robust_masks"] == cut.comparable()["robust_masks"]
    assert cut.metadata["run"]["resumed_batches"] == 1


def test_an_interrupted_calibrate_resumes_to_the_same_state(trained, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    from meansparse import calibration

    args = ["calibrate", "--checkpoint", trained, "--n-examples", 64, "--batch-size", 16, "--no-progress"]
    assert cli(capsys, *args, "--out", tmp_path / "whole.safetensors")[0] == 0
    real, calls = calibration._check_finite, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # Ctrl-C after two finished batches
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(calibration, "_check_finite", interrupted)
    rc, _, err = cli(capsys, *args, "--out", tmp_path / "cut.safetensors")
    assert rc == 2 and "rerun the same command to resume" in err
    partial = tmp_path / "cut.safetensors.partial"
    assert partial.exists() and not (tmp_path / "cut.safetensors").exists()
    monkeypatch.setattr(calibration, "_check_finite", real)
    assert cli(capsys, *args, "--out", tmp_path / "cut.safetensors")[0] == 0
    assert not partial.exists()
    whole, cut = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "cut.safetensors")
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)


# --------------------------------------------------------------- 11. validated before expensive work
def test_demo_and_sweep_validate_before_training(tmp_path, capsys):
    for argv, fragment in ((["demo", "--attacks", "apgd-ce,typo"], "unknown attack 'typo'"),
                           (["demo", "--sweep-attacks", "apgd-ce", "--option", "apgd-ce.steps=-1"], "steps=-1"),
                           (["demo", "--alphas", "0,x"], "bad --alphas entry 'x'"),
                           (["sweep", "--alphas", "0,-1"], "bad --alphas entry '-1'"),
                           (["sweep", "--attacks", "aa"], "--attacks is for demo"),
                           (["sweep", "--n-test", "5"], "--n-test is for demo")):
        rc, _, err = cli(capsys, *argv, "--out", tmp_path / "o", "--quiet")
        one_line_error(rc, err, argv[0], fragment)
    assert not (tmp_path / "o" / "model").exists()  # nothing was trained
    (tmp_path / "file").write_text("")
    rc, _, err = cli(capsys, "demo", "--out", tmp_path / "file", "--quiet")
    one_line_error(rc, err, "demo", "not a folder")


def test_evaluate_and_calibrate_check_their_output_before_working(ckpt, tmp_path, capsys, monkeypatch):
    from meansparse.cli import calibrate as calibrate_cli
    from meansparse.cli import evaluate as evaluate_cli

    def never(*a, **k):
        raise AssertionError("the expensive step ran before the output was checked")

    monkeypatch.setattr(evaluate_cli, "evaluate", never)
    monkeypatch.setattr(calibrate_cli, "calibrate", never)
    (tmp_path / "file").write_text("")
    rc, _, err = cli(capsys, "evaluate", "--checkpoint", ckpt, "--no-resume", "--out", tmp_path / "file", *FAST)
    one_line_error(rc, err, "evaluate", "not a folder")
    rc, _, err = cli(capsys, "calibrate", "--checkpoint", ckpt, "--out", tmp_path / "file" / "s.safetensors",
                     "--device", "cpu")
    one_line_error(rc, err, "calibrate", "file")


# ---------------------------------------------------------------------------------------- 12. help
def test_every_option_has_help_with_its_default():
    from meansparse.cli.common import HelpFormatter

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        assert p.formatter_class is HelpFormatter or name == "models", name
        for action in p._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:  # hidden: refused
                continue
            assert action.help, f"{name} {action.option_strings} has no help"
            shown = p._get_formatter()._get_help_string(action)
            flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                       argparse._StoreConstAction))  # e.g. --fuse, an alias of --path fused
            assert flag or action.required or "default" in shown.lower(), f"{name} {action.option_strings}"
    demo = sub.choices["demo"].format_help()
    assert "10,000 CIFAR-10 images" in " ".join(demo.split())


def test_calibration_progress_has_a_total_and_the_sweep_reports_inside_a_step(trained, capsys):
    data = load_digits("train")  # 1,348 images
    model = ms.prepare(ms.models.load(trained))
    ms.calibrate(model, Batches(data, 100), max_batches=3, progress=True)
    assert "300/300" in capsys.readouterr().err  # a total (hence an ETA), capped at max_batches
    ms.calibrate(model, Batches(data, 512), progress=True)
    assert "1.35k/1.35k" in capsys.readouterr().err
    hold = load_digits("test").subset(slice(0, 40))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ms.search_alpha(model, hold.float(), hold.labels, (0.2,), n_robust=20, eps=0.1, batch_size=10,
                        attack_options={"apgd-ce": {"steps": 2}}, progress=True)
    err = capsys.readouterr().err
    assert "α=0.2: apgd-ce batch 1" in err and "α=0.2: sg-apgd-margin batch" in err, err
