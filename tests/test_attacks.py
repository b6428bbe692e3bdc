"""The attacks: each stays in the threat model, AutoAttack matches pyautoattack run directly, adaptive PGD
with lambda 0 is PGD, transfer restores the alphas."""

from __future__ import annotations

import torch
from evaluation_helpers import EPS, run

import meansparse as ms
from meansparse.evaluation import (
    ATTACK_NAMES,
    PGD,
    AdaptivePGD,
    AutoAttackStandard,
    derive_seed,
    zero_alphas,
)

pytest_plugins = ("evaluation_fixtures",)


def test_transfer_from_explicit_base_model_matches_alpha_zero(models, test_set):
    base, model = models
    a = run(model, *test_set, ("transfer",))
    b = run(model, *test_set, ("transfer",), base_model=base)
    assert a.robust_accuracy == b.robust_accuracy
    assert [op.alpha_value for op in ms.operators(model)][0] == 0.8  # restored after crafting


def test_zero_alphas_gives_the_base_model_and_restores(models, test_set):
    base, model = models
    x = test_set[0][:8]
    before = [op.alpha_value for op in ms.operators(model)]
    with torch.no_grad(), zero_alphas(model) as m:
        assert m is model and all(op.alpha_value == 0.0 for op in ms.operators(model))
        assert torch.equal(model(x), base(x))
    assert [op.alpha_value for op in ms.operators(model)] == before


def test_aa_equals_pyautoattack_run_directly(models, test_set):
    import pyautoattack

    base, _ = models
    x, y = test_set[0][:30], test_set[1][:30]
    ours = run(base, x, y, ("aa",), attack_options={"aa": {"queries": 200}}, batch_size=64)
    assert ours.metadata["attack_settings"]["aa"]["steps"] == 100
    adversary = pyautoattack.AutoAttack(base, norm="Linf", eps=EPS, seed=derive_seed(0, "aa", 0),
                                        version="standard")
    adversary.square.n_queries = 200
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=64)
    with torch.no_grad():
        robust = (base(x_adv).argmax(1) == y).tolist()
    assert ours.worst_case_robust == robust
    assert ours.robust_accuracy["aa"] == sum(robust) / len(robust)


def test_adaptive_with_lambda_zero_is_pgd_and_leaves_no_hooks(models, test_set):
    _, model = models
    x, y = test_set[0][:20], test_set[1][:20]
    pgd = PGD(norm="Linf", eps=EPS, steps=5).run(model, x, y, seed=7)
    ada0 = AdaptivePGD(norm="Linf", eps=EPS, steps=5, lam=0.0).run(model, x, y, seed=7)
    assert torch.equal(pgd, ada0)
    ada = AdaptivePGD(norm="Linf", eps=EPS, steps=5, lam=10.0).run(model, x, y, seed=7)
    assert (ada - x).abs().max() <= EPS + 1e-6 and ada.min() >= 0 and ada.max() <= 1
    assert not any(op._forward_pre_hooks or op._forward_hooks for op in ms.operators(model))
    # the paper's comparison: two λ values and PGD with the same steps and step size, in one report
    r = run(model, x, y, ("pgd", AdaptivePGD(eps=EPS, steps=10, lam=0.1, name="adaptive-lam0.1"),
                          AdaptivePGD(eps=EPS, steps=10, lam=10.0, name="adaptive-lam10")), ladder=False)
    assert set(r.robust_accuracy) == {"pgd", "adaptive-lam0.1", "adaptive-lam10"}
    assert r.metadata["attack_settings"]["adaptive-lam10"]["lam"] == 10.0


def test_every_attack_runs_and_stays_in_the_threat_model(models, test_set):
    _, model = models
    x, y = test_set[0][:12], test_set[1][:12]
    for p in model.parameters():
        p.grad = None  # left over from training
    for norm, eps in (("Linf", EPS), ("L2", 1.0)):
        r = run(model, x, y, ATTACK_NAMES, norm=norm, eps=eps, batch_size=8, ladder=False, indicators=False)
        assert set(r.robust_accuracy) == set(ATTACK_NAMES)
        assert all(row["invalid_candidates"] == 0 for row in r.breakdown), r.breakdown
        assert r.robust_accuracy["clean"] == r.clean_accuracy
        if norm == "Linf":  # AutoAttack's own Square alarm fires here; it must reach the report
            assert any(w.startswith("pyautoattack (aa") for w in r.warnings)
    assert not any(p.grad is not None for p in model.parameters())  # FAB's backward did not leak


def test_aa_builder_caps_targets_for_few_classes(models):
    base, _ = models
    adversary = AutoAttackStandard(eps=EPS).build(base, seed=0, device="cpu", n_classes=5)
    assert adversary.apgd_targeted.n_target_classes == 4 and adversary.fab.n_target_classes == 4


def test_an_attack_has_a_family_and_reports_it_under_kind():
    """``Attack.family`` is what the attack knows of the model; reports and resume files keep their "kind" key,
    and a subclass written when the attribute was called ``kind`` still works, with a warning."""
    import pytest

    from meansparse.evaluation.attacks import FAMILIES

    assert {ms.evaluation.build_attack(n).family for n in ("apgd-ce", "bpda-apgd-ce", "sg-apgd-ce", "transfer",
                                                            "square", "adaptive", "clean")} == set(FAMILIES)
    assert ms.evaluation.build_attack("square").settings()["kind"] == "black-box"
    with pytest.warns(DeprecationWarning, match="Old.kind is now Old.family"):
        class Old(ms.evaluation.Attack):
            name = "old"
            kind = "black-box"
    assert Old().family == "black-box" and Old().settings()["kind"] == "black-box"
