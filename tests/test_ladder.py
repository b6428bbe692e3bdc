"""The budget ladder (convergence of the worst case) and the attack-failure indicators."""

from __future__ import annotations

import json

import pytest
import torch
from evaluation_helpers import EPS, run
from torch import nn

import meansparse as ms
from meansparse.evaluation.indicators import attack_failure_indicators
from meansparse.evaluation.ladder import Ladder

pytest_plugins = ["evaluation_fixtures"]

WEAK = {"apgd-ce": {"steps": 2}, "square": {"queries": 5}}


@pytest.mark.parametrize("bad", [dict(factors=()), dict(factors=(1,)), dict(factors=(4, 2)), dict(factors=(2.5,)),
                                 dict(share=1.0), dict(share=-0.1), dict(families=()),
                                 dict(families=("white-box",))])
def test_ladder_rejects_bad_settings(bad):
    with pytest.raises(ValueError, match="ladder"):
        Ladder(**bad)


@pytest.mark.parametrize("families", [None, ("bpda", "black-box")])
def test_ladder_rungs_run_on_the_examples_still_robust(models, test_set, families):
    _, model = models
    ladder = Ladder() if families is None else Ladder(families=families)
    r = run(model, *test_set, ("apgd-ce", "bpda-apgd-ce", "square"), attack_options=WEAK, batch_size=32,
            indicators=False, ladder=ladder)
    first, *rungs = r.ladder
    assert first["rung"] == 1 and first["attacks"] == ["apgd-ce", "bpda-apgd-ce", "square"]
    assert rungs, "a weak first rung leaves something for the second"
    before = first["worst_case_after"]
    for rung in rungs:
        # the plain white-box attack is not escalated; the escalated families are, with their budget scaled
        # (black-box Square only when asked for)
        expected = [f"bpda-apgd-ce@x{rung['factor']}"] + ([f"square@x{rung['factor']}"] if families else [])
        assert rung["attacks"] == expected
        assert rung["n_attacked"] == round(before * r.n_examples)
        assert rung["worst_case_after"] == pytest.approx(before - rung["n_broken"] / r.n_examples)
        before = rung["worst_case_after"]
    assert r.worst_case_accuracy == before
    settings = r.metadata["attack_settings"]
    assert settings["bpda-apgd-ce@x2"]["inner"]["steps"] == 4
    assert r.metadata["ladder"]["families"] == list(ladder.families)
    if families:
        assert settings["square@x2"]["queries"] == 10
    # the worst case is the AND over every attack the report lists, rungs included
    both = [r.clean_correct[i] and all(r.robust_masks[a][i] != 0 for a in r.attacks) for i in range(r.n_examples)]
    assert both == r.worst_case_robust
    assert r.converged == (rungs[-1]["n_broken"] <= Ladder().allowed(r.n_examples))
    if not r.converged:
        assert len(rungs) == len(Ladder().factors)
        assert any("budget ladder not converged" in w and "--ladder 2,4,8" in w for w in r.warnings)
    md = r.to_markdown()
    assert "## Budget ladder" in md and "| 2 | x2 |" in md


def test_ladder_stops_at_the_first_rung_that_breaks_few_enough(models, test_set):
    _, model = models
    r = run(model, *test_set, ("apgd-ce", "bpda-apgd-ce"), attack_options=WEAK, batch_size=32, indicators=False,
            ladder=Ladder(factors=(2, 4, 8), share=0.99))
    assert [x["rung"] for x in r.ladder] == [1, 2] and r.converged is True
    single = run(model, *test_set, ("apgd-ce", "bpda-apgd-ce"), attack_options=WEAK, batch_size=32,
                 indicators=False, ladder=False)
    assert single.converged is None and len(single.ladder) == 1
    assert all("@x" not in a for a in single.attacks)


def test_a_longer_ladder_resumes_the_rungs_already_run(models, test_set, tmp_path):
    """A ladder that did not converge climbs on from its state file: more factors (or another share) reuse the
    rungs in common and run only the new one; the worst case equals a fresh run's with the longer ladder."""
    _, model = models
    state = tmp_path / "state.json"
    kw = dict(attack_options=WEAK, batch_size=32, indicators=False)
    attacks = ("apgd-ce", "bpda-apgd-ce")
    short = run(model, *test_set, attacks, ladder=Ladder(factors=(2,), share=0.0), state_path=state, **kw)
    stored = json.loads(state.read_text())["batches"]
    assert short.converged is False and any("`meansparse evaluate --ladder 2,4`" in w for w in short.warnings)
    longer = run(model, *test_set, attacks, ladder=Ladder(factors=(2, 4), share=0.0), state_path=state, **kw)
    after = json.loads(state.read_text())["batches"]
    assert {k: after[k] for k in stored} == stored  # every record of the short ladder reused, not recomputed
    assert longer.ladder[:2] == short.ladder and len(longer.ladder) == 3 and "bpda-apgd-ce@x4" in after
    fresh = run(model, *test_set, attacks, ladder=Ladder(factors=(2, 4), share=0.0), **kw)
    assert fresh.worst_case_robust == longer.worst_case_robust and fresh.ladder == longer.ladder


def test_ladder_without_a_masking_proof_attack_says_it_shows_nothing(models, test_set):
    _, model = models
    r = run(model, *test_set, ("apgd-ce",), attack_options=WEAK, batch_size=32, indicators=False)
    assert r.converged is False and len(r.ladder) == 1
    assert any("nothing shows that the worst case has converged" in w for w in r.warnings)


def test_evaluate_rejects_a_bad_ladder(models, test_set):
    _, model = models
    with pytest.raises(ValueError, match="ladder"):
        run(model, *test_set, ("apgd-ce",), ladder="yes")


# ---------------------------------------------------------------------------------------------- indicators
def _by_name(found):
    return {i["name"]: i for i in found}


def test_indicators_in_every_report(models, test_set):
    _, model = models
    r = run(model, *test_set, ("apgd-ce", "bpda-apgd-ce"), attack_options=WEAK, batch_size=32, ladder=False)
    found = _by_name(r.indicators)
    assert set(found) == {"silent success", "incomplete optimisation", "transfer failure", "unconstrained attack",
                          "non-converging restarts", "unavailable gradients", "band-masked units"}
    assert all(i["verdict"] in ("pass", "FAIL", "n/a") for i in r.indicators)
    assert found["unconstrained attack"]["verdict"] == "pass"
    assert found["band-masked units"]["verdict"] == "FAIL"  # alpha 0.8 on the pixels blocks a quarter of them
    failed = [i["name"] for i in r.indicators if i["verdict"] == "FAIL"]
    assert sorted(failed) == sorted(w.split(": ")[1] for w in r.warnings if "indicator failed" in w)
    assert "## Attack-failure indicators" in r.to_markdown()


def test_silent_success_fails_when_the_worst_case_missed_a_crossing(models, test_set):
    _, model = models
    x, y = test_set[0][:16], test_set[1][:16]
    with torch.no_grad():
        keep = model(x).argmax(1) == y
    x, y = x[keep], y[keep]
    missed = _by_name(attack_failure_indicators(model, x, y, torch.ones(len(x), dtype=torch.bool), eps=EPS,
                                                norm="Linf"))
    assert missed["silent success"]["verdict"] == "FAIL"
    fine = _by_name(attack_failure_indicators(model, x, y, torch.zeros(len(x), dtype=torch.bool), eps=EPS,
                                              norm="Linf"))
    assert fine["silent success"]["verdict"] == "pass"


class _Quantised(nn.Module):
    """A classifier behind a rounding step: zero input gradient everywhere (the textbook masked model)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 4) / 4)


def test_gradient_free_model_fails_the_gradient_indicators(models, test_set):
    base, _ = models
    model = _Quantised(base).eval()
    x, y = test_set[0][:16], test_set[1][:16]
    with torch.no_grad():
        keep = model(x).argmax(1) == y
    found = _by_name(attack_failure_indicators(model, x[keep], y[keep], torch.zeros(int(keep.sum()), dtype=torch.bool),
                                               eps=EPS, norm="Linf"))
    assert found["unavailable gradients"]["verdict"] == "FAIL"
    assert found["unconstrained attack"]["verdict"] == "FAIL"  # no gradient: even ε = 1 goes nowhere
    assert found["transfer failure"]["verdict"] == "n/a"
    assert "band-masked units" not in found


def test_indicators_at_alpha_zero_see_no_band(models, test_set):
    _, model = models
    x, y = test_set[0][:16], test_set[1][:16]
    with ms.evaluation.zero_alphas(model):
        found = _by_name(attack_failure_indicators(model, x, y, torch.zeros(16, dtype=torch.bool), eps=EPS,
                                                   norm="Linf"))
    assert found["band-masked units"]["value"] == "0.0 %" and found["band-masked units"]["verdict"] == "pass"
