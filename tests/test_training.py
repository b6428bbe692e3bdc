"""Every training method runs an epoch on a few hundred digits in seconds, improves, resumes, reloads."""

from __future__ import annotations

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


def test_resume_after_interruption_matches_uninterrupted(digits, tmp_path, monkeypatch):
    import meansparse.training as tr

    ref = tmp_path / "ref"
    train(_cfg("pgd", epochs=3), ref, progress=False, train_data=digits)
    run = tmp_path / "run"
    real = tr.holdout_metrics
    calls = {"n": 0}

    def dies_in_epoch_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(tr, "holdout_metrics", dies_in_epoch_3)
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
