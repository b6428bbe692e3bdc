"""The command line on streamed data: ``--data PATH`` (image folder or tar archive), ``--workers``,
``--preprocessing``; results equal the Python API on the same images in memory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_streams import make_tar, make_tree

import meansparse as ms
from meansparse.cli import main
from meansparse.data import Batches, load_jpeg_archive
from meansparse.models import create_model, save_checkpoint


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEANSPARSE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def setup(tmp_path):
    tree = make_tree(tmp_path / "tree", per_class=6)
    tar = make_tar(tree, tmp_path / "data.tar")
    torch.manual_seed(0)
    net = create_model("small_cnn", width=4, num_classes=3).eval()  # the tree's three classes
    with torch.no_grad():  # random weights, but class 0 ("cat", a third of the images) mostly wins: examples to attack
        [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1].bias[0] += 2.0
    save_checkpoint(net, tmp_path / "ckpt", {"model": "small_cnn", "model_kwargs": {"width": 4, "num_classes": 3}})
    return tree, tar, str(tmp_path / "ckpt.safetensors")


def test_calibrate_streamed_tar_equals_the_api_in_memory(setup, tmp_path):
    tree, tar, ckpt = setup
    out = tmp_path / "state.safetensors"
    assert main(["calibrate", "--checkpoint", ckpt, "--data", str(tar), "--n-examples", "12", "--batch-size", "5",
                 "--workers", "1", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    data = load_jpeg_archive(tree, "train").sample(12, seed=0)
    model = ms.prepare(ms.models.load(ckpt), example_inputs=(data.float()[:1],))
    ms.calibrate(model, Batches(data, 5), progress=False)
    ms.save(model, tmp_path / "api.safetensors")
    a, b = load_file(out), load_file(tmp_path / "api.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_streamed_folder_equals_the_api_and_resumes(setup, tmp_path, capsys):
    tree, _, ckpt = setup
    args = ["evaluate", "--checkpoint", ckpt, "--data", str(tree), "--n-examples", "10", "--batch-size", "4",
            "--attacks", "apgd-ce,square", "--option", "apgd-ce.steps=2", "--option", "square.queries=5",
            "--eps", "8/255", "--workers", "1", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "e")]
    assert main(args) == 0
    report = ms.Report.from_json((tmp_path / "e" / "report.json").read_text())
    assert report.metadata["command"]["preprocessing"] is None and 0 < sum(report.clean_correct) < 10
    test = load_jpeg_archive(tree, "test").sample(10, seed=0)
    api = ms.evaluate(ms.models.load(ckpt).eval(), test.float(), test.labels, attacks=["apgd-ce", "square"],
                      eps=8 / 255, batch_size=4, progress=False,
                      attack_options={"apgd-ce": {"steps": 2}, "square": {"queries": 5}})
    for key in ("clean_correct", "robust_masks", "worst_case_robust", "breakdown"):
        assert getattr(report, key) == getattr(api, key)
    capsys.readouterr()
    assert main(args) == 0  # rerun: every batch comes from OUT/state.json
    again = ms.Report.from_json((tmp_path / "e" / "report.json").read_text())
    assert again.metadata["run"]["resumed_batches"] > 0 and again.robust_masks == report.robust_masks


def test_evaluate_with_a_robustbench_preprocessing(setup, tmp_path):
    tree, tar, ckpt = setup
    assert main(["evaluate", "--checkpoint", ckpt, "--data", str(tar), "--n-examples", "3", "--attacks", "apgd-ce",
                 "--option", "apgd-ce.steps=1", "--preprocessing", "Res224", "--device", "cpu", "--no-progress",
                 "--no-resume", "--out", str(tmp_path / "e")]) == 0
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["metadata"]["command"]["preprocessing"] == "Res224" and report["n_examples"] == 3


def test_sweep_and_demo_stream_a_tar(setup, tmp_path):
    _, tar, ckpt = setup
    common = ["--data", str(tar), "--model", ckpt, "--n-holdout", "6", "--n-sweep-robust", "4", "--alphas", "0,0.5",
              "--sweep-attacks", "apgd-ce,bpda-apgd-ce", "--option", "apgd-ce.steps=1", "--batch-size", "4",
              "--workers", "1", "--quiet"]
    assert main(["sweep", *common, "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "meansparse.safetensors").exists()
    assert main(["demo", *common, "--n-test", "4", "--attacks", "apgd-ce", "--out", str(tmp_path / "d")]) == 0
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["n_test"] == 4 and "after" in summary


def test_clear_errors(setup, tmp_path, capsys):
    tree, _, ckpt = setup
    base = ["evaluate", "--checkpoint", ckpt, "--no-progress", "--out", str(tmp_path / "e")]
    assert main([*base, "--data", "digits", "--preprocessing", "Res224"]) == 2
    assert "applies to streamed data" in capsys.readouterr().err
    assert main([*base, "--data", str(tree), "--split", "val"]) == 2
    assert "no 'val' split (found: test, train)" in capsys.readouterr().err
