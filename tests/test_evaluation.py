"""Robustness evaluation on a tiny digits CNN trained here in seconds.

Masking fixture: the CNN starts with an activation on the pixels (a ReLU, the identity on [0, 1]), so
``ms.prepare`` puts a MeanSparse operator on the input itself; a large alpha there replaces every mid-grey
pixel by the mean and zeroes its gradient. On a model this small that is the reliable way to get the
gradient masking MeanSparse causes in large networks, which the evaluation must expose.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import meansparse as ms
from meansparse.evaluation import (
    ATTACK_NAMES,
    PGD,
    AdaptivePGD,
    AutoAttackStandard,
    Report,
    derive_seed,
    evaluate,
    sanity_checks,
)
from meansparse.evaluation.cli import parse_eps, parse_options

EPS = 0.2
FAST = {  # few iterations: the tests check the machinery, not the models
    "apgd-ce": {"steps": 10},
    "apgd-t": {"steps": 10, "n_target_classes": 3},
    "apgd-dlr": {"steps": 10},
    "fab-t": {"steps": 10, "n_target_classes": 3},
    "transfer": {"steps": 10, "n_target_classes": 3},
    "square": {"queries": 100},
    "pgd": {"steps": 10},
    "adaptive": {"steps": 10},
    "aa": {"steps": 10, "queries": 100},
}


def _net() -> nn.Module:
    return nn.Sequential(
        nn.ReLU(),  # identity on [0, 1]: gives MeanSparse a site on the pixels
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 16, 10),
    )


def _fgsm_rs_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 0.1, epochs: int = 8) -> None:
    """FGSM with random start (Wong et al. 2020): adversarial training in about a second here."""
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            xb, yb = x[perm[i:i + 64]], y[perm[i:i + 64]]
            d = ((torch.rand(xb.shape, generator=g) * 2 - 1) * eps).requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model((xb + d).clamp(0, 1)), yb), d)
            xa = (xb + (d + 1.25 * eps * grad.sign()).clamp(-eps, eps)).clamp(0, 1).detach()
            opt.zero_grad()
            F.cross_entropy(model(xa), yb).backward()
            opt.step()
    model.eval()


@pytest.fixture(scope="session")
def digits_xy():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    return x[:1400], y[:1400], x[1400:], y[1400:]


@pytest.fixture(scope="session")
def models(digits_xy):
    """(base model, prepared model with alpha 0.8 on the pixel site); shared parameters."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead, and the box may be busy
    torch.manual_seed(0)
    xtr, ytr, _, _ = digits_xy
    base = _net()
    _fgsm_rs_train(base, xtr, ytr)
    model = ms.prepare(base).eval()
    ms.calibrate(model, [(xtr[i:i + 200], ytr[i:i + 200]) for i in range(0, len(xtr), 200)], progress=False)
    ms.set_alpha(model, {0: 0.8})
    yield base, model
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def test_set(digits_xy):
    _, _, xte, yte = digits_xy
    return xte[:60], yte[:60]


def _run(model, x, y, attacks, **kw):
    kw.setdefault("attack_options", FAST)
    kw.setdefault("progress", False)
    kw.setdefault("eps", EPS)
    return evaluate(model, x, y, attacks=attacks, **kw)


# ------------------------------------------------------------------------------------ masking is exposed
@pytest.fixture(scope="session")
def masked_report(models, test_set):
    _, model = models
    return _run(model, *test_set, ("apgd-ce", "bpda-apgd-ce", "transfer", "square"), batch_size=32)


def test_bpda_and_transfer_beat_plain_apgd_and_warning_names_them(masked_report):
    r = masked_report
    acc = r.robust_accuracy
    assert acc["bpda-apgd-ce"] <= acc["apgd-ce"]
    assert acc["transfer"] <= acc["apgd-ce"]
    assert acc["bpda-apgd-ce"] < acc["apgd-ce"] - 0.05  # a clear gap, not noise
    masking = [w for w in r.warnings if w.startswith("gradient masking suspected")]
    assert len(masking) == 1
    assert "bpda-apgd-ce" in masking[0] and "transfer" in masking[0]


def test_no_masking_warning_without_sparsification(models, test_set):
    _, model = models
    alphas = [op.alpha_value for op in ms.operators(model)]
    ms.set_alpha(model, 0.0)
    try:
        r = _run(model, *test_set, ("apgd-ce", "bpda-apgd-ce"), batch_size=32)
    finally:
        ms.set_alpha(model, dict(enumerate(alphas)))
    # bpda-X reuses X's seeds: with every operator the identity the two runs are the same attack
    assert r.robust_masks["apgd-ce"] == r.robust_masks["bpda-apgd-ce"]
    assert not any(w.startswith("gradient masking") for w in r.warnings)


def test_worst_case_is_below_every_attack(masked_report, models, test_set):
    r = masked_report
    assert r.mode == "individual"
    for name, acc in r.robust_accuracy.items():
        assert r.worst_case_accuracy <= acc + 1e-12, name
    assert r.worst_case_accuracy <= r.clean_accuracy
    # the worst case is the per-example AND of every attack
    n = r.n_examples
    both = [r.clean_correct[i] and all(r.robust_masks[a][i] != 0 for a in r.attacks) for i in range(n)]
    assert both == r.worst_case_robust
    assert sum(both) / n == r.worst_case_accuracy

    # cascade mode: later attacks only see what is still robust; cumulative numbers never rise
    _, model = models
    c = _run(model, *test_set, ("apgd-ce", "bpda-apgd-ce", "transfer", "square"), batch_size=32,
             individual=False)
    assert c.mode == "cascade"
    assert c.breakdown[0]["n_attacked"] == sum(c.clean_correct)
    assert c.breakdown[1]["n_attacked"] == c.breakdown[0]["n_attacked"] - c.breakdown[0]["n_broken"]
    accs = [row["cumulative_accuracy"] for row in c.breakdown]
    assert accs == sorted(accs, reverse=True)
    assert c.worst_case_accuracy == accs[-1]
    assert c.robust_accuracy["apgd-ce"] == r.robust_accuracy["apgd-ce"]  # the first attack saw everything


def test_transfer_from_explicit_base_model_matches_alpha_zero(models, test_set):
    base, model = models
    a = _run(model, *test_set, ("transfer",))
    b = _run(model, *test_set, ("transfer",), base_model=base)
    assert a.robust_accuracy == b.robust_accuracy
    assert [op.alpha_value for op in ms.operators(model)][0] == 0.8  # restored after crafting


# --------------------------------------------------------------------------------- resume, determinism
def test_resume_after_interruption_gives_identical_report(models, test_set, tmp_path):
    _, model = models
    attacks = ("apgd-ce", "bpda-apgd-ce", "aa")
    reference = _run(model, *test_set, attacks, batch_size=16)
    assert any(w.startswith("pyautoattack (aa") for w in reference.warnings)  # must survive the resume
    state = tmp_path / "state.json"
    done = []

    def die_in_aa(attack, batch):
        done.append((attack, batch))
        if (attack, batch) == ("aa", 1):
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        _run(model, *test_set, attacks, batch_size=16, state_path=state, callback=die_in_aa)
    stored = json.loads(state.read_text())
    assert sum(len(v) for v in stored["batches"].values()) == len(done) > 2
    resumed = _run(model, *test_set, attacks, batch_size=16, state_path=state, progress=True)
    assert resumed.metadata["run"]["resumed_batches"] == len(done)
    assert resumed.comparable() == reference.comparable()
    again = _run(model, *test_set, attacks, batch_size=16, state_path=state)  # everything from disk
    assert again.comparable() == reference.comparable()


def test_resume_refuses_a_different_evaluation(models, test_set, tmp_path):
    _, model = models
    state = tmp_path / "state.json"
    _run(model, *test_set, ("apgd-ce",), batch_size=32, state_path=state)
    with pytest.raises(ValueError, match="different evaluation.*eps"):
        _run(model, *test_set, ("apgd-ce",), batch_size=32, state_path=state, eps=0.1)
    with pytest.raises(ValueError, match="attacks"):
        _run(model, *test_set, ("apgd-ce", "square"), batch_size=32, state_path=state)


def test_same_seed_same_report_other_seed_other_draws(models, test_set):
    _, model = models
    attacks = ("pgd", "apgd-ce", "square", "adaptive")
    a = _run(model, *test_set, attacks, seed=3)
    b = _run(model, *test_set, attacks, seed=3)
    assert a.comparable() == b.comparable()
    assert a.metadata["seed"] == 3 and len(a.metadata["model_hash"]) == 64
    assert derive_seed(3, "pgd", 0) != derive_seed(4, "pgd", 0) != derive_seed(3, "pgd", 1)
    rng_before = torch.get_rng_state()
    _run(model, *test_set, ("pgd",))
    assert torch.equal(rng_before, torch.get_rng_state())  # the caller's RNG is left alone


def test_report_json_roundtrip_and_markdown(masked_report):
    r = masked_report
    back = Report.from_json(r.to_json())
    assert back == r
    md = r.to_markdown()
    assert "| bpda-apgd-ce |" in md and "worst-case" in md and "gradient masking" in md
    for key in ("seed", "versions", "model_hash", "eps", "norm", "n_examples", "attack_settings"):
        assert key in r.metadata
    assert r.metadata["run"]["wall_time_s"] > 0
    with pytest.raises(ValueError, match="unknown fields"):
        Report.from_json(json.dumps({"nope": 1}))


# --------------------------------------------------------------------------------------- sanity, eps
def test_huge_eps_drives_accuracy_to_zero(models, test_set):
    _, model = models
    r = _run(model, *test_set, ("bpda-apgd-ce",), eps=1.0)
    assert r.worst_case_accuracy <= 0.02
    r2 = _run(model, *test_set, ("apgd-ce",), eps=2.0, norm="L2")
    assert r2.robust_accuracy["apgd-ce"] < r.clean_accuracy


def test_sanity_checks_report_findings(models, test_set):
    _, model = models
    x, y = test_set
    findings = sanity_checks(model, x[:30], y[:30], eps=EPS, attack="bpda-apgd-ce", budgets=(2, 10),
                             attack_options=FAST)
    assert [f.check for f in findings] == ["huge-eps", "eps-monotone", "budget-monotone"]
    assert findings[0].passed and findings[0].values["eps"] == 1.0
    r = _run(model, x[:30], y[:30], ("apgd-ce",), sanity=["apgd-ce"])
    assert len(r.sanity) == 3
    failed = sum(not s["passed"] for s in r.sanity)
    assert failed == sum(w.startswith("sanity check failed") for w in r.warnings)


# ---------------------------------------------------------------------------------- reference numbers
def test_aa_equals_pyautoattack_run_directly(models, test_set):
    import pyautoattack

    base, _ = models
    x, y = test_set[0][:30], test_set[1][:30]
    ours = _run(base, x, y, ("aa",), attack_options={"aa": {"queries": 200}}, batch_size=64)
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
    r = _run(model, x, y, ("pgd", AdaptivePGD(eps=EPS, steps=10, lam=0.1, name="adaptive-lam0.1"),
                           AdaptivePGD(eps=EPS, steps=10, lam=10.0, name="adaptive-lam10")))
    assert set(r.robust_accuracy) == {"pgd", "adaptive-lam0.1", "adaptive-lam10"}
    assert r.metadata["attack_settings"]["adaptive-lam10"]["lam"] == 10.0


def test_every_attack_runs_and_stays_in_the_threat_model(models, test_set):
    _, model = models
    x, y = test_set[0][:12], test_set[1][:12]
    for p in model.parameters():
        p.grad = None  # left over from training
    for norm, eps in (("Linf", EPS), ("L2", 1.0)):
        r = _run(model, x, y, ATTACK_NAMES, norm=norm, eps=eps, batch_size=8)
        assert set(r.robust_accuracy) == set(ATTACK_NAMES)
        assert all(row["invalid_candidates"] == 0 for row in r.breakdown), r.breakdown
        assert r.robust_accuracy["clean"] == r.clean_accuracy
        if norm == "Linf":  # AutoAttack's own Square alarm fires here; it must reach the report
            assert any(w.startswith("pyautoattack (aa") for w in r.warnings)
    assert not any(p.grad is not None for p in model.parameters())  # FAB's backward did not leak


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m, x, y: (m, x * 2, y, {}), r"\[0, 1\]"),
        (lambda m, x, y: (m, x - 0.5, y, {}), r"\[0, 1\]"),
        (lambda m, x, y: (m, x[:, 0], y, {}), "4-D NCHW"),
        (lambda m, x, y: (m, x, y[:-1], {}), "differ in length"),
        (lambda m, x, y: (m, x, torch.full_like(y, 10), {}), r"labels must be in \[0, 9\]"),
        (lambda m, x, y: (m, x, y.float(), {}), "integer"),
        (lambda m, x, y: (m, x, y, {"eps": 0.0}), "eps"),
        (lambda m, x, y: (m, x, y, {"eps": -0.1}), "eps"),
        (lambda m, x, y: (m, x, y, {"eps": math.nan}), "eps"),
        (lambda m, x, y: (m, x, y, {"norm": "L1"}), "norm"),
        (lambda m, x, y: (m, x, y, {"attacks": ("apgd-ce", "pgd-100")}), "valid attacks: clean, pgd"),
        (lambda m, x, y: (m, x, y, {"attacks": ("bpda-square",)}), "unknown attack"),
        (lambda m, x, y: (m, x, y, {"attacks": ("pgd", "pgd")}), "unique"),
        (lambda m, x, y: (m, x, y, {"attack_options": {"pgd": {"stepz": 3}}, "attacks": ("pgd",)}), "options"),
        (lambda m, x, y: (m, x, y, {"batch_size": 0}), "batch_size"),
    ],
)
def test_bad_input_is_a_clear_value_error(models, test_set, change, match):
    _, model = models
    m, x, y, kw = change(model, test_set[0][:8], test_set[1][:8])
    kw.setdefault("attacks", ("pgd",))
    with pytest.raises(ValueError, match=match):
        _run(m, x, y, **kw)


def test_train_mode_is_refused(models, test_set):
    _, model = models
    model.train()
    try:
        with pytest.raises(ValueError, match="train mode"):
            _run(model, test_set[0][:8], test_set[1][:8], ("pgd",))
    finally:
        model.eval()


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_helpers():
    assert parse_eps("8/255") == 8 / 255 and parse_eps("0.5") == 0.5
    assert parse_options(["apgd-ce.steps=20", "adaptive.lam=0.5", "bpda-aa.queries=10"]) == {
        "apgd-ce": {"steps": 20}, "adaptive": {"lam": 0.5}, "bpda-aa": {"queries": 10}}
    with pytest.raises(ValueError):
        parse_options(["steps=3"])


def test_cli_writes_report(tmp_path):
    from meansparse.cli import main
    from meansparse.models import create_model, save_checkpoint

    torch.manual_seed(0)
    net = create_model("small_cnn", width=4, normalization="digits").eval()
    save_checkpoint(net, tmp_path / "ckpt", {"model": "small_cnn",
                                            "model_kwargs": {"width": 4, "normalization": "digits"}})
    out = tmp_path / "out"
    rc = main(["evaluate", "--checkpoint", str(tmp_path / "ckpt.safetensors"), "--data", "digits",
               "--n-examples", "10", "--eps", "1/10", "--attacks", "apgd-ce,square", "--option",
               "apgd-ce.steps=2", "--option", "square.queries=5", "--out", str(out), "--no-progress"])
    assert rc == 0
    report = Report.from_json((out / "report.json").read_text())
    assert report.n_examples == 10 and report.eps == 0.1 and report.attacks == ["apgd-ce", "square"]
    assert (out / "report.md").read_text().startswith("# Robustness report")
    assert (out / "state.json").exists()


def test_aa_builder_caps_targets_for_few_classes(models):
    base, _ = models
    adversary = AutoAttackStandard(eps=EPS).build(base, seed=0, device="cpu", n_classes=5)
    assert adversary.apgd_targeted.n_target_classes == 4 and adversary.fab.n_target_classes == 4
