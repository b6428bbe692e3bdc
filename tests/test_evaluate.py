"""``evaluate``: worst case per example, cascade mode, resume and determinism, input validation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from evaluation_helpers import run

from meansparse.evaluation import derive_seed

pytest_plugins = ("evaluation_fixtures",)


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
    c = run(model, *test_set, ("apgd-ce", "bpda-apgd-ce", "transfer", "square"), batch_size=32,
            individual=False)
    assert c.mode == "cascade"
    assert c.breakdown[0]["n_attacked"] == sum(c.clean_correct)
    assert c.breakdown[1]["n_attacked"] == c.breakdown[0]["n_attacked"] - c.breakdown[0]["n_broken"]
    accs = [row["cumulative_accuracy"] for row in c.breakdown]
    assert accs == sorted(accs, reverse=True)
    assert c.worst_case_accuracy == accs[-1]
    assert c.robust_accuracy["apgd-ce"] == r.robust_accuracy["apgd-ce"]  # the first attack saw everything


# --------------------------------------------------------------------------------- resume, determinism
def test_resume_after_interruption_gives_identical_report(models, test_set, tmp_path):
    _, model = models
    attacks = ("apgd-ce", "bpda-apgd-ce", "aa")
    reference = run(model, *test_set, attacks, batch_size=16)
    assert any(w.startswith("pyautoattack (aa") for w in reference.warnings)  # must survive the resume
    state = tmp_path / "state.json"
    done = []

    def die_in_aa(attack, batch):
        done.append((attack, batch))
        if (attack, batch) == ("aa", 1):
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        run(model, *test_set, attacks, batch_size=16, state_path=state, callback=die_in_aa)
    stored = json.loads(state.read_text())
    assert sum(len(v) for v in stored["batches"].values()) == len(done) > 2
    resumed = run(model, *test_set, attacks, batch_size=16, state_path=state, progress=True)
    assert resumed.metadata["run"]["resumed_batches"] == len(done)
    assert resumed.comparable() == reference.comparable()
    again = run(model, *test_set, attacks, batch_size=16, state_path=state)  # everything from disk
    assert again.comparable() == reference.comparable()


def test_resume_refuses_a_different_evaluation(models, test_set, tmp_path):
    _, model = models
    state = tmp_path / "state.json"
    run(model, *test_set, ("apgd-ce",), batch_size=32, state_path=state)
    with pytest.raises(ValueError, match="different evaluation.*eps"):
        run(model, *test_set, ("apgd-ce",), batch_size=32, state_path=state, eps=0.1)
    with pytest.raises(ValueError, match="attacks"):
        run(model, *test_set, ("apgd-ce", "square"), batch_size=32, state_path=state)


def test_same_seed_same_report_other_seed_other_draws(models, test_set):
    _, model = models
    attacks = ("pgd", "apgd-ce", "square", "adaptive")
    a = run(model, *test_set, attacks, seed=3)
    b = run(model, *test_set, attacks, seed=3)
    assert a.comparable() == b.comparable()
    assert a.metadata["seed"] == 3 and len(a.metadata["model_hash"]) == 64
    assert derive_seed(3, "pgd", 0) != derive_seed(4, "pgd", 0) != derive_seed(3, "pgd", 1)
    rng_before = torch.get_rng_state()
    run(model, *test_set, ("pgd",))
    assert torch.equal(rng_before, torch.get_rng_state())  # the caller's RNG is left alone


def test_huge_eps_drives_accuracy_to_zero(models, test_set):
    _, model = models
    r = run(model, *test_set, ("bpda-apgd-ce",), eps=1.0)
    assert r.worst_case_accuracy <= 0.02
    r2 = run(model, *test_set, ("apgd-ce",), eps=2.0, norm="L2")
    assert r2.robust_accuracy["apgd-ce"] < r.clean_accuracy


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
        run(m, x, y, **kw)


def test_train_mode_is_refused(models, test_set):
    _, model = models
    model.train()
    try:
        with pytest.raises(ValueError, match="train mode"):
            run(model, test_set[0][:8], test_set[1][:8], ("pgd",))
    finally:
        model.eval()
