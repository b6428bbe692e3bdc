"""α search (global, schedule, per-site) and the main-job pipeline on the embedded digits default."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import meansparse as ms
from meansparse.cli import main
from meansparse.data import Batches, holdout_split, load_digits
from meansparse.pipeline import PipelineConfig, run
from meansparse.search import AlphaObjective, AlphaSearchResult, schedule
from meansparse.training import TrainConfig, train

FAST = {"apgd-ce": {"steps": 5}}


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    data = load_digits("train")
    fit, hold = holdout_split(data, 120, seed=0)
    out = tmp_path_factory.mktemp("digits")
    cfg = TrainConfig(model="small_cnn", model_kwargs={"activation": "relu", "width": 8}, dataset="digits",
                      method="pgd", eps=0.1, steps=2, epochs=4, batch_size=64, lr=0.05, n_holdout=80, eval_n=80,
                      eval_steps=2, augment=False)
    train(cfg, out, progress=False, train_data=fit)
    base = ms.models.load(out / "best")
    model = ms.prepare(copy.deepcopy(base), example_inputs=(hold.float()[:2],))
    ms.calibrate(model, Batches(fit, 256), progress=False)
    return base, model, hold


def _kw():
    return dict(n_robust=60, eps=0.1, attack_options=FAST, progress=False)


def test_search_alpha_respects_the_budget_and_sets_the_choice(calibrated):
    _, model, hold = calibrated
    res = ms.search_alpha(model, hold.float(), hold.labels, (0.1, 0.3, 1.5), clean_budget=0.005, **_kw())
    assert [r["alpha"] for r in res.rows] == [0.0, 0.1, 0.3, 1.5]  # α = 0 is always the reference
    base_clean = res.rows[0]["clean"]
    for r in res.rows:
        assert r["feasible"] == (r["clean"] >= base_clean - 0.005 - 1e-12)
        assert r["worst_case"] <= r["plain"] + 1e-12  # worst case includes the plain attack
    assert res.chosen["feasible"]
    best = max(r["worst_case"] for r in res.rows if r["feasible"])
    assert res.chosen["worst_case"] == best
    assert all(op.alpha_value == res.chosen_alpha for op in ms.operators(model))
    again = AlphaSearchResult.from_json(res.to_json())
    assert again.chosen == res.chosen and "chosen" in again.to_markdown()


def test_search_alpha_is_resumable(calibrated, tmp_path):
    _, model, hold = calibrated
    a = ms.search_alpha(model, hold.float(), hold.labels, (0.2,), state_dir=tmp_path, **_kw())
    assert len(list(tmp_path.glob("*.json"))) == 2
    b = ms.search_alpha(model, hold.float(), hold.labels, (0.2,), state_dir=tmp_path, **_kw())
    assert [r["worst_case"] for r in a.rows] == [r["worst_case"] for r in b.rows]


def test_search_rejects_bad_input(calibrated):
    base, model, hold = calibrated
    with pytest.raises(ValueError, match="alphas"):
        ms.search_alpha(model, hold.float(), hold.labels, (-0.1,), **_kw())
    with pytest.raises(ValueError, match="prepared"):
        ms.search_alpha(base, hold.float(), hold.labels, (0.1,), **_kw())


def test_schedule_and_per_site_search(calibrated):
    _, model, hold = calibrated
    n = len(ms.operators(model))
    assert schedule(0.2, 0.5, 3) == {0: 0.2, 1: 0.1, 2: 0.05}
    res = ms.search_schedule(model, hold.float(), hold.labels, (0.2,), ratios=(0.5, 1.0), **_kw())
    assert len(res.rows) == 3 and len(res.chosen["per_site"]) == n
    assert [op.alpha_value for op in ms.operators(model)] == pytest.approx(res.chosen["per_site"])
    seen = []
    res2 = ms.search_per_site(model, hold.float(), hold.labels, 0.1, candidates=(0.0, 0.3), callback=seen.append,
                              **_kw())
    assert len(res2.rows) == 2 + len(seen) and len(seen) == 2 * n
    assert res2.chosen["worst_case"] >= res2.rows[1]["worst_case"] or not res2.rows[1]["feasible"]


def test_pipeline_writes_a_complete_report(tmp_path, monkeypatch):
    from meansparse import pipeline

    cfg = PipelineConfig(n_holdout=100, n_sweep_robust=40, n_test=60, alphas=(0.0, 0.2), train_epochs=2,
                         attacks=("apgd-ce", "bpda-apgd-ce", "transfer"), attack_options=FAST, progress=False)
    given = copy.deepcopy(cfg)
    # the job runs through the public API users call: ms.search_alpha, then ms.evaluate for each row
    assert pipeline.evaluate is ms.evaluate and pipeline.search_alpha is ms.search_alpha
    assert not {"whole_model_compiled", "choose_path", "on_path", "fuse", "decide_path"} & set(vars(pipeline))
    calls = []
    for name in ("evaluate", "search_alpha"):
        real = getattr(pipeline, name)
        monkeypatch.setattr(pipeline, name,
                            lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    summary = run(cfg, tmp_path)
    assert calls[0] == "search_alpha" and calls.count("evaluate") >= 2
    assert cfg == given and cfg.eps is None  # the run resolves into its own values, never into the config
    assert summary["eps"] == pipeline.DIGITS_EPS
    assert summary["execution"]["path"] in ("eager", "fused") and summary["fuse"]["reason"]
    for f in ("report.md", "summary.json", "sweep.json", "before.json", "after.json", "meansparse.safetensors",
              "alpha_curve.png", "feature_histogram.png"):
        assert (tmp_path / f).exists(), f
    assert json.loads((tmp_path / "summary.json").read_text())["n_test"] == 60
    assert summary["after"]["worst_case"] <= min(summary["after"]["robust"].values()) + 1e-12
    text = (tmp_path / "report.md").read_text()
    assert "worst case" in text and "Before / after" in text
    # the saved state reloads onto the base model
    base = ms.models.load(tmp_path / "model" / "best")
    again = ms.load(base, tmp_path / "meansparse.safetensors")
    assert len(ms.operators(again)) == len(ms.sites(again))
    assert torch.is_tensor(ms.operators(again)[0].running_mean)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_unavailable_device_fails_before_any_work(tmp_path, capsys):
    assert main(["sweep", "--out", str(tmp_path), "--device", "cuda", "--quiet"]) == 2
    assert "error: device 'cuda' requested but torch.cuda.is_available() is False" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a valid torch device"):
        run(PipelineConfig(device="gpu0", progress=False), tmp_path)
    assert not (tmp_path / "model").exists()  # nothing trained


def test_pipeline_on_each_path_reports_the_same_numbers(tmp_path):
    """--path fused changes the speed, not the numbers: the fused model is bit-identical on the CPU."""
    cfg = dict(n_holdout=60, n_sweep_robust=20, n_test=40, alphas=(0.0, 0.2), train_epochs=1,
               attacks=("apgd-ce", "bpda-apgd-ce"), attack_options=FAST, progress=False)
    plain = run(PipelineConfig(**cfg), tmp_path / "plain")
    fused = run(PipelineConfig(**cfg, path="fused"), tmp_path / "fused")
    assert fused["execution"]["path"] == "fused" and fused["fuse"]["fuse"]
    for key in ("before", "after"):
        assert fused[key]["robust"] == plain[key]["robust"] and fused[key]["clean"] == plain[key]["clean"]
    assert fused["alpha"] == plain["alpha"]
    # the GPU's default path, forced here: the test rows run compiled (float rounding, not bit for bit)
    whole = run(PipelineConfig(**cfg, path="compiled"), tmp_path / "whole")
    assert whole["fuse"]["path"] == "whole model compiled" and whole["alpha"] == plain["alpha"]
    assert whole["execution"]["path"] == "compiled"
    before = json.loads((tmp_path / "whole" / "before.json").read_text())
    assert before["metadata"]["run"]["execution"]["path"] == "compiled"  # both rows ran on the same path
    for key in ("before", "after"):
        assert whole[key]["clean"] == plain[key]["clean"]
        assert abs(whole[key]["worst_case"] - plain[key]["worst_case"]) <= 2 / 40
    assert "- operator: whole model compiled" in (tmp_path / "whole" / "report.md").read_text()


def test_the_older_fuse_setting_of_the_pipeline_is_its_path(tmp_path):
    with pytest.warns(DeprecationWarning, match="path='fused'"):
        assert PipelineConfig(fuse=True).path == "fused"
    with pytest.warns(DeprecationWarning, match="path='compiled'"):
        assert PipelineConfig(fuse="whole-model").path == "compiled"
    with pytest.raises(ValueError, match="fuse must be"):
        PipelineConfig(fuse="sometimes")
    with pytest.raises(ValueError, match="path must be one of"):
        run(PipelineConfig(path="whole-model", progress=False), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before the output folder is made


def test_search_takes_a_spec(calibrated):
    """A spec and the equivalent keywords give the same search; keywords replace the spec's fields."""
    _, model, hold = calibrated
    spec = ms.EvaluationSpec(eps=0.1, attacks=("apgd-ce", "bpda-apgd-ce"), attack_options=FAST, batch_size=256)
    seen = []
    a = ms.search_alpha(model, hold.float(), hold.labels, (0.2,), spec, n_robust=60, progress=False,
                        announce=seen.append)
    b = ms.search_alpha(model, hold.float(), hold.labels, (0.2,), attacks=("apgd-ce", "bpda-apgd-ce"), **_kw())
    assert a.to_json() == b.to_json()
    assert seen and seen[0].path in ("eager", "fused")
    c = ms.search_alpha(model, hold.float(), hold.labels, (0.2,), spec, n_robust=60, progress=False, seed=1)
    assert c.settings == a.settings  # same attacks and budgets, another seed
    objective = AlphaObjective(model, hold.float(), hold.labels, spec, n_robust=60)
    assert objective.spec == spec and objective.attacks == ["apgd-ce", "bpda-apgd-ce"]
