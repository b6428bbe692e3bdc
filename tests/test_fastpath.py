"""Fast by default (:mod:`meansparse.fastpath`, :mod:`meansparse.accel.auto`): ``ms.evaluate`` and the command
line fuse when that pays off, say which path ran and why, and report the same numbers either way."""

from __future__ import annotations

import pytest
import torch
from evaluation_helpers import FAST

import meansparse as ms
from meansparse._compile import ENV_VAR, compile_enabled
from meansparse.accel import auto
from meansparse.evaluation.budget import attack_passes, estimated_passes
from meansparse.fastpath import attack_objects

pytest_plugins = ("evaluation_fixtures",)


def test_budget_counts_every_attacks_work():
    aa, ce, t = (ms.evaluation.build_attack(n).settings() for n in ("aa", "apgd-ce", "bpda-apgd-t"))
    assert attack_passes(ce) == 100 and attack_passes(t) == 900  # steps x restarts x targets
    assert attack_passes(aa) > attack_passes(ce) + attack_passes(t)
    attacks = attack_objects(["apgd-ce", "nonsense", "square"], {"apgd-ce": {"steps": 10}, "square": {"queries": 30}})
    assert [a.name for a in attacks] == ["apgd-ce", "square"]
    assert estimated_passes(attacks, 4) == 4 * (1 + 10 + 10)


def test_decision_rules(models, test_set, monkeypatch):
    base, model = models
    x, _ = test_set
    assert not auto.fuse_decision(base, x, 1e9).fuse  # no operators
    short = auto.fuse_decision(model, x, 1.0)
    assert not short.fuse and "short job" in short.reason and short.estimated_eager_seconds < 60
    if compile_enabled():
        assert auto.fuse_decision(model, x, 1e9).fuse
    monkeypatch.setenv(ENV_VAR, "0")
    off = auto.fuse_decision(model, x, 1e9)
    assert not off.fuse and "torch.compile is not available" in off.reason


@pytest.mark.parametrize("fuse", ["auto", True, False])
def test_evaluate_reports_the_same_numbers_fused_or_not(models, test_set, fuse, monkeypatch):
    _, model = models
    x, y = test_set
    monkeypatch.setattr(auto, "MIN_EAGER_SECONDS", 0.0)  # "auto" fuses even this small job
    seen = []
    report = ms.evaluate(model, x, y, eps=0.2, attacks=("apgd-ce", "bpda-apgd-ce"), attack_options=FAST,
                         progress=False, fuse=fuse, announce=seen.append)
    reference = ms.evaluation.evaluate(model, x, y, eps=0.2, attacks=("apgd-ce", "bpda-apgd-ce"),
                                       attack_options=FAST, progress=False)
    assert report.comparable() == reference.comparable()
    decision = report.metadata["run"]["fuse"]
    assert seen and decision == seen[0].as_dict()
    assert decision["fuse"] == (fuse is True or (fuse == "auto" and compile_enabled()))
    assert not ms.fused_sites(model)  # the caller's model is left as it was
    assert "- operator: " in report.to_markdown()


def test_cli_says_which_operator_ran(tmp_path, capsys):
    from meansparse.cli import main
    from meansparse.models import create_model, save_checkpoint

    torch.manual_seed(0)
    net = create_model("small_cnn", width=4, normalization="digits").eval()
    save_checkpoint(net, tmp_path / "m", {"model": "small_cnn",
                                          "model_kwargs": {"width": 4, "normalization": "digits"}})
    assert main(["calibrate", "--model", str(tmp_path / "m"), "--data", "digits", "--alpha", "0.1", "--no-progress",
                 "--out", str(tmp_path / "s.safetensors")]) == 0
    common = ["evaluate", "--model", str(tmp_path / "m"), "--meansparse", str(tmp_path / "s.safetensors"), "--data",
              "digits", "--n-examples", "8", "--attacks", "apgd-ce", "--option", "apgd-ce.steps=2", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert "meansparse evaluate: eager operator: a short job" in capsys.readouterr().err
    assert main([*common, "--no-fuse", "--out", str(tmp_path / "b")]) == 0
    assert "eager operator: asked for the eager operator" in capsys.readouterr().err
