"""Fast by default (:mod:`meansparse.fastpath`, :mod:`meansparse.accel.auto`): ``ms.evaluate`` and the command
line fuse when that pays off, say which path ran and why, and report the same numbers either way."""

from __future__ import annotations

import copy

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


def test_decision_on_a_gpu_compiles_the_whole_model(models, test_set, monkeypatch):
    """On CUDA the measured fastest path is the whole model under torch.compile (docs/benchmarks.md); the rule
    is exercised here with the device and the timing stubbed (no GPU in CI)."""
    _, model = models
    x, _ = test_set
    monkeypatch.setattr(auto, "model_device", lambda m: torch.device("cuda"))
    monkeypatch.setattr(auto, "_seconds_per_example", lambda m, e: 1e-3)
    monkeypatch.setattr(auto, "compile_enabled", lambda: True)
    long = auto.fuse_decision(model, x, auto.MIN_EAGER_SECONDS_CUDA / (auto.BACKWARD_FACTOR * 1e-3) + 1)
    assert long.whole_model and not long.fuse and long.path == "whole model compiled"
    assert "CUDA graphs" in long.reason and long.as_dict()["path"] == "whole model compiled"
    short = auto.fuse_decision(model, x, 1000.0)  # 3 s of eager work
    assert short.path == "eager operator" and "short job" in short.reason
    monkeypatch.setattr(auto, "model_device", lambda m: torch.device("mps"))
    assert auto.fuse_decision(model, x, 1e12).path == "eager operator"


@pytest.mark.skipif(not compile_enabled(), reason="torch.compile unavailable")
def test_whole_model_compiled_keeps_the_model_and_its_numbers(models, test_set):
    from meansparse.evaluation.hashing import model_hash

    _, model = models
    x, y = test_set
    keys, digest = list(model.state_dict()), model_hash(model)
    with torch.no_grad():
        eager_out = model(x)
    with ms.accel.whole_model_compiled(model) as m:
        assert m is model and "forward" in vars(model)
        with torch.no_grad():
            out = model(x)
        assert list(model.state_dict()) == keys and model_hash(model) == digest
        twin = copy.deepcopy(model)  # a copy made inside the block runs itself, not the compiled original
        ms.set_alpha(twin, 0.0)
        with torch.no_grad():
            torch.testing.assert_close(twin(x), ms.remove(copy.deepcopy(model))(x))
    assert "forward" not in vars(model)  # its own forward again
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    seen = []
    report = ms.evaluate(model, x, y, eps=0.2, attacks=("apgd-ce", "bpda-apgd-ce"), attack_options=FAST,
                         progress=False, fuse="whole-model", announce=seen.append)
    reference = ms.evaluation.evaluate(model, x, y, eps=0.2, attacks=("apgd-ce", "bpda-apgd-ce"),
                                       attack_options=FAST, progress=False)
    assert report.metadata["run"]["fuse"]["path"] == "whole model compiled" and seen[0].whole_model
    assert "- operator: whole model compiled" in report.to_markdown()
    assert report.clean_accuracy == reference.clean_accuracy
    # float rounding may move a feature across a band edge, so attacks may differ by an example or two
    assert abs(report.worst_case_accuracy - reference.worst_case_accuracy) <= 2 / len(x)
    assert "forward" not in vars(model)
    with pytest.raises(ValueError, match="fuse must be"):
        ms.evaluate(model, x, y, eps=0.2, attacks=("apgd-ce",), progress=False, fuse="sometimes")


def test_whole_model_falls_back_to_eager_when_compiling_fails(models, test_set, monkeypatch):
    from meansparse.accel import whole_model

    _, model = models
    x, _ = test_set

    def broken(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("no backend here")
        return call

    monkeypatch.setattr(whole_model.torch, "compile", broken)
    with torch.no_grad():
        expected = model(x)
    with ms.accel.whole_model_compiled(model):
        with pytest.warns(RuntimeWarning, match="torch.compile of the whole model failed .*no backend here"):
            out = model(x)
        again = model(x)  # no second warning: eager from now on
        with pytest.raises(RuntimeError, match="shape|size|channels"):
            model(x[:, :, :3])  # the model's own error is not hidden
    assert torch.equal(out, expected) and torch.equal(again, expected)


def test_a_model_whose_operators_learn_is_evaluated_eagerly():
    from meansparse.fastpath import plan_fusion

    model = ms.prepare(torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                           torch.nn.Linear(3 * 6 * 6, 2))).eval()
    ms.learn_statistics(model)
    decision = plan_fusion(model, torch.rand(4, 1, 8, 8), 1e6, "auto")
    assert not decision.fuse and not decision.whole_model and "learn" in decision.reason
