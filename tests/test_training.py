"""Every training method runs an epoch on a few hundred digits in seconds, improves, resumes, reloads."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from meansparse.data import load_digits
from meansparse.models import load
from meansparse.training import TrainConfig, lr_at, train
from meansparse.version import __version__


@pytest.fixture(scope="module")
def digits():
    return load_digits("train").head(400)


def _cfg(method: str, epochs: int = 2, **kw) -> TrainConfig:
    return TrainConfig(model="small_cnn", model_kwargs={"activation": "relu", "width": 8}, dataset="digits",
                       method=method, eps=0.1, steps=2, epochs=epochs, batch_size=64, lr=0.05, n_holdout=80,
                       eval_n=80, eval_steps=2, augment=False, **kw)


@pytest.mark.parametrize("method", ["standard", "pgd", "trades", "fgsm-rs"])
def test_each_method_improves_the_loss(method, digits, tmp_path):
    train(_cfg(method, epochs=3), tmp_path, progress=False, train_data=digits)
    hist = json.loads((tmp_path / "state.json").read_text())["history"]
    assert len(hist) == 3
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert (tmp_path / "best.safetensors").exists()


def test_resume_refuses_another_configuration(digits, tmp_path):
    train(_cfg("pgd", epochs=2), tmp_path, progress=False, train_data=digits)
    with pytest.raises(ValueError, match="different configuration"):
        train(_cfg("pgd", epochs=3), tmp_path, progress=False, train_data=digits)


def _die_in_epoch(monkeypatch, epoch: int):
    """Ctrl-C at the end of ``epoch`` (its held-out evaluation); returns the real function to put back."""
    import meansparse.training as tr

    real, calls = tr.holdout_metrics, {"n": 0}

    def dies(*a, **k):
        calls["n"] += 1
        if calls["n"] == epoch:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(tr, "holdout_metrics", dies)
    return real


def test_resume_after_interruption_matches_uninterrupted(digits, tmp_path, monkeypatch):
    import meansparse.training as tr

    ref = tmp_path / "ref"
    train(_cfg("pgd", epochs=3), ref, progress=False, train_data=digits)
    run = tmp_path / "run"
    real = _die_in_epoch(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg("pgd", epochs=3), run, progress=False, train_data=digits)
    assert json.loads((run / "state.json").read_text())["epoch"] == 2
    monkeypatch.setattr(tr, "holdout_metrics", real)
    train(_cfg("pgd", epochs=3), run, progress=False, train_data=digits)
    a, b = load(ref / "best"), load(run / "best")
    for (k, u), (_, v) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(u, v), k


def test_checkpoint_config_records_the_run(digits, tmp_path):
    train(_cfg("standard", epochs=1), tmp_path, progress=False, train_data=digits, command="meansparse train X")
    cfg = json.loads((tmp_path / "best.json").read_text())
    assert cfg["command"] == "meansparse train X" and cfg["training"]["method"] == "standard"
    assert cfg["model"] == "small_cnn" and "holdout_clean" in cfg["best_epoch"]
    assert cfg["meansparse_version"] == __version__


def test_bad_config_is_rejected(digits, tmp_path):
    with pytest.raises(ValueError, match="unknown training method"):
        train(_cfg("mart"), tmp_path, progress=False, train_data=digits)


def test_lr_schedules():
    c = _cfg("pgd")
    assert lr_at(c, 0.0) == 0.0 and lr_at(c, 0.4) == pytest.approx(c.lr) and lr_at(c, 1.0) == 0.0
    c.schedule = "piecewise"
    assert lr_at(c, 0.1) == c.lr and lr_at(c, 0.6) == pytest.approx(c.lr * 0.1)


# ------------------------------------------------------------------------------------- MeanSparse in the loop
def _ms_cfg(epochs: int = 2, **kw) -> TrainConfig:
    kw = {"meansparse": 0.3, "alpha_schedule": "linear", "alpha_warmup": 2, **kw}
    return _cfg("pgd", epochs=epochs, **kw)


def _files_equal(a, b) -> None:
    from safetensors.torch import load_file

    u, v = load_file(str(a)), load_file(str(b))
    assert u.keys() == v.keys()
    for k in u:
        assert torch.equal(u[k], v[k]), k


def test_meansparse_run_resumes_bit_identically(digits, tmp_path, monkeypatch):
    import meansparse.training as tr

    train(_ms_cfg(epochs=3), tmp_path / "ref", progress=False, train_data=digits)
    real = _die_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(_ms_cfg(epochs=3), tmp_path / "run", progress=False, train_data=digits)
    monkeypatch.setattr(tr, "holdout_metrics", real)
    train(_ms_cfg(epochs=3), tmp_path / "run", progress=False, train_data=digits)
    for name in ("last.safetensors", "best.safetensors", "best.meansparse.safetensors"):
        _files_equal(tmp_path / "ref" / name, tmp_path / "run" / name)
    ref, run = (json.loads((tmp_path / d / "state.json").read_text()) for d in ("ref", "run"))
    assert ref["alpha_schedule"] == run["alpha_schedule"] and run["alpha_schedule"]["position"] == 15
    assert [h["alpha"] for h in run["history"]] == pytest.approx([0.15, 0.3, 0.3])  # 5 steps an epoch, warm-up 10


def test_checkpoint_loads_with_its_trained_operators(digits, tmp_path):
    import meansparse as ms
    from meansparse.zoo import load_model_spec

    train(_ms_cfg(epochs=1, ms_momentum=None), tmp_path, progress=False, train_data=digits)
    from safetensors.torch import load_file

    model = load_model_spec(str(tmp_path / "best"))
    last = load_file(str(tmp_path / "last.safetensors"))  # one epoch: the best is the last
    ops = ms.operators(model)
    assert len(ops) == 3 and all(o.alpha_value == pytest.approx(0.15) and o.calibrated for o in ops)
    for i, op in enumerate(ops):
        assert torch.equal(op.running_mean, last[f"model.meansparse.{i}.running_mean"])
        assert torch.equal(op.running_var, last[f"model.meansparse.{i}.running_var"])
        assert int(op.num_samples) > 320  # cumulative: every element of every forward in train mode
    assert not any(o.learns for o in ops)  # a loaded model keeps its statistics in train mode unless opted in


@pytest.mark.parametrize("method, attack", [("pgd", "pgd_ce"), ("fgsm-rs", "pgd_ce"), ("trades", "pgd")])
def test_inner_attack_is_straight_through_unless_asked(method, attack, digits, tmp_path, monkeypatch):
    import meansparse as ms
    import meansparse.training as tr

    seen, sharp, models = [], [], []
    real, real_with = getattr(tr, attack), tr.with_operators

    def spy(*a, **k):
        seen.append({o.gradient for o in ms.operators(models[-1])})
        sharp.append({o.sharpness for o in ms.operators(models[-1])})
        return real(*a, **k)

    def keep(*a, **k):
        models.append(real_with(*a, **k))
        return models[-1]

    monkeypatch.setattr(tr, attack, spy)
    monkeypatch.setattr(tr, "with_operators", keep)
    monkeypatch.setattr(tr, "holdout_metrics", lambda *a, **k: {"holdout_clean": 0.0, "holdout_pgd": 0.0})
    cfg = _ms_cfg(epochs=1)
    cfg.method = method
    train(cfg, tmp_path / "st", progress=False, train_data=digits)
    assert seen and all(s == {"straight_through"} for s in seen)
    assert {o.gradient for o in ms.operators(models[-1])} == {"exact"}  # the step's band gradient, restored
    seen.clear()
    cfg.inner_gradient = "exact"
    train(cfg, tmp_path / "exact", progress=False, train_data=digits)
    assert seen and all(s == {"exact"} for s in seen)
    seen.clear()
    cfg.inner_gradient = "surrogate"
    train(cfg, tmp_path / "surrogate", progress=False, train_data=digits)
    assert seen and all(s == {"surrogate"} for s in seen)
    assert sharp[-1] == {tr.INNER_SHARPNESS}


def test_worst_case_selection_attacks_plain_bpda_and_surrogate_on_held_out_images(digits, tmp_path, monkeypatch):
    import meansparse.training as tr

    calls = []
    real = tr.evaluate

    def spy(model, x, y, **k):
        calls.append((k["attacks"], x.shape[0], k["ladder"], k["indicators"]))
        return real(model, x, y, **k)

    monkeypatch.setattr(tr, "evaluate", spy)
    train(_ms_cfg(epochs=1, selection="worst"), tmp_path / "ms", progress=False, train_data=digits)
    train(_cfg("pgd", epochs=1, selection="worst"), tmp_path / "plain", progress=False, train_data=digits)
    assert calls == [(["apgd-ce", "bpda-apgd-ce", "sg-apgd-margin"], 80, False, False),
                     (["apgd-ce"], 80, False, False)]
    assert 0 <= json.loads((tmp_path / "ms" / "state.json").read_text())["history"][0]["holdout_pgd"] <= 1


def test_finetune_at_alpha_zero_is_the_matched_control(digits, tmp_path):
    from safetensors.torch import load_file

    train(_cfg("standard", epochs=1), tmp_path / "base", progress=False, train_data=digits)
    init = str(tmp_path / "base" / "best")
    train(_cfg("pgd", epochs=1, init=init, selection="worst"), tmp_path / "control", progress=False,
          train_data=digits)
    train(_cfg("pgd", epochs=1, init=init, selection="worst", meansparse=0.0), tmp_path / "ms0", progress=False,
          train_data=digits)
    a, b = (load_file(str(tmp_path / arm / "best.safetensors")) for arm in ("control", "ms0"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same steps, data, attack, LR
    assert not (tmp_path / "control" / "best.meansparse.safetensors").exists()
    cfg = json.loads((tmp_path / "ms0" / "best.json").read_text())
    assert cfg["model"] == "small_cnn" and cfg["meansparse_state"] == "best.meansparse.safetensors"


def test_finetune_starts_from_calibrated_statistics(digits, tmp_path, monkeypatch):
    import meansparse as ms
    import meansparse.training as tr

    train(_cfg("standard", epochs=1), tmp_path / "base", progress=False, train_data=digits)
    seen = {}
    real = tr._epoch

    def first_epoch(model, *a, **k):
        seen.setdefault("stats", [(o.calibrated, int(o.num_samples)) for o in ms.operators(model)])
        return real(model, *a, **k)

    monkeypatch.setattr(tr, "_epoch", first_epoch)
    train(_cfg("pgd", epochs=1, init=str(tmp_path / "base" / "best"), meansparse=0.2), tmp_path / "ft",
          progress=False, train_data=digits)
    n_fit = len(digits) - 80
    assert seen["stats"] and all(c and n >= n_fit for c, n in seen["stats"])


def test_meansparse_options_are_validated(digits, tmp_path):
    for bad, match in [({"alpha_schedule": "step"}, "schedule"), ({"ms_momentum": 0.0}, "momentum"),
                       ({"inner_gradient": "smooth"}, "inner_gradient"),
                       ({"ms_gradient": "surrogate"}, "ms_gradient"), ({"selection": "test"}, "selection"),
                       ({"alpha_warmup": 0.0}, "alpha_warmup")]:
        with pytest.raises(ValueError, match=match):
            train(_ms_cfg(epochs=1, **bad), tmp_path, progress=False, train_data=digits)
    assert not (tmp_path / "state.json").exists()


def test_a_run_from_before_the_meansparse_options_still_resumes(digits, tmp_path):
    from meansparse.training import TrainConfig as Config

    train(_cfg("standard", epochs=1), tmp_path, progress=False, train_data=digits)
    state = json.loads((tmp_path / "state.json").read_text())
    new = {"init", "init_options", "meansparse", "alpha_schedule", "alpha_warmup", "ms_momentum", "ms_statistics",
           "ms_gradient", "inner_gradient", "preset", "include", "exclude", "selection"}
    assert new <= set(dataclasses.asdict(Config()))
    state["config"] = {k: v for k, v in state["config"].items() if k not in new}
    (tmp_path / "state.json").write_text(json.dumps(state))
    train(_cfg("standard", epochs=1), tmp_path, progress=False, train_data=digits)  # resumes: nothing left to do
    with pytest.raises(ValueError, match="different configuration.*meansparse"):
        train(_cfg("standard", epochs=1, meansparse=0.1), tmp_path, progress=False, train_data=digits)


def test_alpha_per_site(digits, tmp_path):
    import meansparse as ms
    from meansparse.zoo import load_model_spec

    per_site = {"net.act1": 0.4, "net.act2": 0.0, "net.act3": 0.2}
    train(_ms_cfg(epochs=1, meansparse=per_site, alpha_schedule="constant", alpha_warmup=0.0), tmp_path,
          progress=False, train_data=digits)
    ops = ms.operators(load_model_spec(str(tmp_path / "best")))
    assert {o.site.name: o.alpha_value for o in ops} == pytest.approx(per_site)
