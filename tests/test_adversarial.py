"""Adversarial examples out (:mod:`meansparse.evaluation.adversarial`): the worst-case images are written in
RobustBench's format, judging them again reproduces the report's worst case exactly, and a resumed run
writes the same images as an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch
from evaluation_helpers import EPS, run

from meansparse.cli import main
from meansparse.evaluation import load_adversarial, rejudge

pytest_plugins = ("evaluation_fixtures",)
ATTACKS = ("apgd-ce", "bpda-apgd-ce", "square")


@pytest.mark.parametrize("individual", [True, False])
def test_written_examples_reproduce_the_worst_case(models, test_set, tmp_path, individual):
    _, model = models
    x, y = test_set
    report = run(model, x, y, ATTACKS, batch_size=32, individual=individual, adversarial_dir=tmp_path,
                 state_path=tmp_path / "state.json")
    adv = load_adversarial(tmp_path)
    assert adv.x.shape == x.shape and adv.x.dtype == torch.float32 and adv.indices == list(range(len(x)))
    assert rejudge(model, adv, y) == report.worst_case_robust  # judged again: the same worst case, exactly
    broken = [i for i, a in enumerate(adv.attacks) if a is not None]
    assert broken and len(broken) == sum(c and not r for c, r in zip(report.clean_correct, report.worst_case_robust))
    for i in range(len(x)):
        a = adv.attacks[i]
        if a is None:
            assert torch.equal(adv.x[i], x[i])  # unbroken: the clean image
        else:
            assert report.robust_masks[a][i] == 0 and (adv.x[i] - x[i]).abs().max() <= EPS + 1e-6
            first = next(b for b in report.attacks if report.robust_masks[b][i] == 0)  # rungs included
            assert a == first  # the first attack in order that broke it
    assert torch.load(tmp_path / "adversarial.pt", weights_only=True).shape == x.shape  # a plain tensor file


def test_a_resumed_run_writes_the_same_examples(models, test_set, tmp_path):
    _, model = models
    x, y = test_set
    whole = run(model, x, y, ATTACKS, batch_size=16, adversarial_dir=tmp_path / "a", state_path=tmp_path / "a.json")

    class Stop(Exception):
        pass

    calls = []

    def interrupt(attack, batch):
        calls.append((attack, batch))
        if len(calls) == 3:
            raise Stop

    with pytest.raises(Stop):
        run(model, x, y, ATTACKS, batch_size=16, adversarial_dir=tmp_path / "b", state_path=tmp_path / "b.json",
            callback=interrupt)
    resumed = run(model, x, y, ATTACKS, batch_size=16, adversarial_dir=tmp_path / "b", state_path=tmp_path / "b.json")
    assert resumed.comparable() == whole.comparable()
    assert torch.equal(load_adversarial(tmp_path / "a").x, load_adversarial(tmp_path / "b").x)
    # a state written without kept images: the batches that broke something are attacked again
    plain_state = tmp_path / "c.json"
    run(model, x, y, ATTACKS, batch_size=16, state_path=plain_state)
    again = run(model, x, y, ATTACKS, batch_size=16, adversarial_dir=tmp_path / "c", state_path=plain_state)
    assert again.comparable() == whole.comparable()
    assert torch.equal(load_adversarial(tmp_path / "c").x, load_adversarial(tmp_path / "a").x)


def test_cli_save_adversarial_names_the_split_indices(models, tmp_path):
    from safetensors.torch import save_file

    from meansparse.data import load_dataset
    from meansparse.zoo import load_model_spec

    base, _ = models
    save_file(base.state_dict(), tmp_path / "w.safetensors")
    spec = ["--model", "python:evaluation_helpers:net", "--weights", str(tmp_path / "w.safetensors")]
    out = tmp_path / "eval"
    assert main(["evaluate", *spec, "--data", "digits", "--n-examples", "40", "--eps", str(EPS), "--attacks",
                 "apgd-ce,square", "--option", "apgd-ce.steps=5", "--option", "square.queries=50",
                 "--save-adversarial", "--no-progress", "--out", str(out)]) == 0
    record = json.loads((out / "adversarial.json").read_text())
    report = json.loads((out / "report.json").read_text())
    idx = torch.tensor(record["split_indices"])
    assert len(set(idx.tolist())) == 40 and record["data"] == "digits" and record["split"] == "test"
    assert record["n_broken"] > 0
    labels = load_dataset("digits", "test").labels[idx]
    model = load_model_spec(spec[1], weights=spec[3])
    assert rejudge(model, load_adversarial(out), labels) == report["worst_case_robust"]
