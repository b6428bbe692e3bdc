"""Fast by default (:mod:`meansparse.fastpath`, :mod:`meansparse.accel.auto`): ``ms.evaluate`` and the command
line pick the execution path (``EvaluationSpec.path``: eager, fused, compiled) when that pays off, say which ran
and why, and report the same numbers either way."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from evaluation_helpers import FAST

import meansparse as ms
from meansparse._compile import ENV_VAR, compile_enabled
from meansparse.accel import auto
from meansparse.evaluation.budget import attack_passes, estimated_passes

pytest_plugins = ("evaluation_fixtures",)


def test_budget_counts_every_attacks_work():
    aa, ce, t = (ms.evaluation.build_attack(n).settings() for n in ("aa", "apgd-ce", "bpda-apgd-t"))
    assert attack_passes(ce) == 100 and attack_passes(t) == 900  # steps x restarts x targets
    assert attack_passes(aa) > attack_passes(ce) + attack_passes(t)
    spec = ms.EvaluationSpec(attacks=("apgd-ce", "square"), attack_options={"apgd-ce": {"steps": 10},
                                                                           "square": {"queries": 30}})
    assert list(spec.attack_settings()) == ["apgd-ce", "square"]
    assert spec.estimated_passes(4) == estimated_passes([ms.evaluation.build_attack("apgd-ce", steps=10),
                                                        ms.evaluation.build_attack("square", queries=30)], 4)
    assert spec.estimated_passes(4) == 4 * (1 + 10 + 10)


def test_decision_rules(models, test_set, monkeypatch):
    base, model = models
    x, _ = test_set
    assert auto.decide_path(base, x, 1e9).path == "eager"  # no operators
    short = auto.decide_path(model, x, 1.0)
    assert short.path == "eager" and "short job" in short.reason and short.estimated_eager_seconds < 60
    if compile_enabled():
        assert auto.decide_path(model, x, 1e9).path == "fused"
        # the rest of the job counts on the CPU: the fused kernels are compiled once per process
        assert auto.decide_path(model, x, 1.0, other_passes=1e9).path == "fused"
    monkeypatch.setenv(ENV_VAR, "0")
    off = auto.decide_path(model, x, 1e9)
    assert off.path == "eager" and "torch.compile is not available" in off.reason
    with pytest.raises(ValueError, match="path must be one of"):
        auto.PathDecision("whole-model", "no such path")


@pytest.mark.parametrize("path", ["auto", "fused", "eager"])
def test_evaluate_reports_the_same_numbers_fused_or_not(models, test_set, path, monkeypatch):
    _, model = models
    x, y = test_set
    monkeypatch.setattr(auto, "MIN_EAGER_SECONDS", 0.0)  # "auto" fuses even this small job
    seen = []
    report = ms.evaluate(model, x, y, eps=0.2, attacks=("apgd-ce", "bpda-apgd-ce"), attack_options=FAST,
                         progress=False, path=path, announce=seen.append)
    reference = ms.evaluation.evaluate(model, x, y, eps=0.2, attacks=("apgd-ce", "bpda-apgd-ce"),
                                       attack_options=FAST, progress=False)
    assert report.comparable() == reference.comparable()
    recorded = report.metadata["run"]["execution"]
    assert seen and recorded == seen[0].as_dict()
    fused = path == "fused" or (path == "auto" and compile_enabled())
    assert recorded["path"] == ("fused" if fused else "eager")
    assert report.metadata["run"]["fuse"] == seen[0].legacy_dict()  # the record's older shape, kept
    assert report.metadata["run"]["fuse"]["fuse"] == fused
    assert not ms.fused_sites(model)  # the caller's model is left as it was
    assert "- operator: " in report.to_markdown()


def test_the_older_fuse_keyword_still_picks_the_path(models, test_set):
    _, model = models
    x, y = test_set
    with pytest.warns(DeprecationWarning, match="path='eager'"):
        report = ms.evaluate(model, x[:8], y[:8], eps=0.2, attacks=("apgd-ce",), attack_options=FAST,
                             progress=False, fuse=False, indicators=False, ladder=False)
    assert report.metadata["run"]["execution"]["path"] == "eager"
    with pytest.raises(ValueError, match="fuse must be"):
        ms.evaluate(model, x, y, eps=0.2, attacks=("apgd-ce",), progress=False, fuse="sometimes")
    with pytest.raises(ValueError, match="path must be one of 'auto', 'eager', 'fused', 'compiled'"):
        ms.evaluate(model, x, y, eps=0.2, attacks=("apgd-ce",), progress=False, path="whole-model")


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
    assert main([*common, "--no-fuse", "--out", str(tmp_path / "b")]) == 0  # the alias of --path eager
    assert "eager operator: asked for the eager operator" in capsys.readouterr().err
    assert main([*common, "--path", "eager", "--out", str(tmp_path / "c")]) == 0
    assert "eager operator: asked for the eager operator (path='eager')" in capsys.readouterr().err
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["metadata"]["run"]["execution"]["path"] == "eager"


def test_decision_on_a_gpu_compiles_the_whole_model(models, test_set, monkeypatch):
    """On CUDA the measured fastest path is the whole model under torch.compile (docs/benchmarks.md); the rule
    is exercised here with the device and the timing stubbed (no GPU in CI)."""
    _, model = models
    x, _ = test_set
    monkeypatch.setattr(auto, "model_device", lambda m: torch.device("cuda"))
    monkeypatch.setattr(auto, "_seconds_per_example", lambda m, e: 1e-3)
    monkeypatch.setattr(auto, "compile_enabled", lambda: True)
    long = auto.decide_path(model, x, auto.MIN_EAGER_SECONDS_CUDA / (auto.BACKWARD_FACTOR * 1e-3) + 1)
    assert long.path == "compiled" and long.description == "whole model compiled"
    assert "CUDA graphs" in long.reason and long.as_dict()["description"] == "whole model compiled"
    assert long.legacy_dict()["whole_model"] and long.legacy_dict()["path"] == "whole model compiled"
    short = auto.decide_path(model, x, 1000.0)  # 3 s of eager work
    assert short.description == "eager operator" and "short job" in short.reason
    # the rest of the job does not count here: the whole-model compile does not outlive one evaluation
    assert auto.decide_path(model, x, 1000.0, other_passes=1e12).path == "eager"
    monkeypatch.setattr(auto, "model_device", lambda m: torch.device("mps"))
    assert auto.decide_path(model, x, 1e12).path == "eager"


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
                         progress=False, path="compiled", announce=seen.append)
    reference = ms.evaluation.evaluate(model, x, y, eps=0.2, attacks=("apgd-ce", "bpda-apgd-ce"),
                                       attack_options=FAST, progress=False)
    assert report.metadata["run"]["execution"]["path"] == "compiled" and seen[0].path == "compiled"
    assert report.metadata["run"]["fuse"]["path"] == "whole model compiled"
    assert "- operator: whole model compiled" in report.to_markdown()
    assert report.clean_accuracy == reference.clean_accuracy
    # float rounding may move a feature across a band edge, so attacks may differ by an example or two
    assert abs(report.worst_case_accuracy - reference.worst_case_accuracy) <= 2 / len(x)
    assert "forward" not in vars(model)


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
    from meansparse.fastpath import choose_path

    model = ms.prepare(torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                           torch.nn.Linear(3 * 6 * 6, 2))).eval()
    ms.learn_statistics(model)
    decision = choose_path(model, torch.rand(4, 1, 8, 8), 1e6, "auto")
    assert decision.path == "eager" and "learn" in decision.reason


def test_a_sweep_never_compiles_the_whole_model(models, test_set):
    """Every α would recompile it: a forced or decided "compiled" path becomes the eager one in a sweep."""
    from meansparse.fastpath import choose_path

    _, model = models
    x, _ = test_set
    decision = choose_path(model, x, 1e6, "compiled", alpha_varies=True)
    assert decision.path == "eager" and "changes α" in decision.reason
    assert choose_path(model, x, 1e6, "fused", alpha_varies=True).path == "fused"
