"""``EvaluationSpec`` (:mod:`meansparse.evaluation.spec`): one immutable value holding an evaluation's settings,
validated once when built, taken by ``ms.evaluate``, ``evaluation.evaluate``, ``sanity_checks`` and the α search;
keyword settings build the same spec."""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle

import pytest
from evaluation_helpers import EPS, FAST

import meansparse as ms
from meansparse.evaluation import EvaluationSpec, sanity_checks
from meansparse.evaluation import spec as spec_module
from meansparse.evaluation.hashing import model_hash
from meansparse.evaluation.runner import plan_evaluation, run_config

pytest_plugins = ("evaluation_fixtures",)


def test_the_spec_is_exported_and_immutable():
    assert ms.EvaluationSpec is EvaluationSpec is ms.evaluation.EvaluationSpec
    options = {"apgd-ce": {"steps": 3}}
    spec = EvaluationSpec(attacks=["apgd-ce"], attack_options=options)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.eps = 0.5  # type: ignore[misc]
    with pytest.raises(TypeError, match="immutable"):
        spec.attack_options["apgd-ce"]["steps"] = 5  # type: ignore[index]
    with pytest.raises(TypeError, match="immutable"):
        spec.attack_options["pgd"] = {}  # type: ignore[index]
    options["apgd-ce"]["steps"] = 50  # the caller's dict is copied, not kept
    assert spec.attack_options == {"apgd-ce": {"steps": 3}} and spec.attacks == ("apgd-ce",)
    assert copy.deepcopy(spec) == spec == pickle.loads(pickle.dumps(spec))
    other = spec.replace(seed=3)
    assert other.seed == 3 and spec.seed == 0 and other.attack_options == spec.attack_options


def test_defaults_and_normalised_fields():
    spec = EvaluationSpec()
    assert spec.attacks == ms.evaluation.DEFAULT_ATTACKS and spec.path == "auto" and spec.mode == "auto"
    assert spec.ladder == ms.Ladder() and EvaluationSpec(ladder=False).ladder is None
    assert EvaluationSpec(attacks="pgd").attacks == ("pgd",) and EvaluationSpec(sanity=["pgd"]).sanity == ("pgd",)
    assert spec.individual_for(1000) and not spec.individual_for(1001)
    assert EvaluationSpec(mode="cascade").individual_for(1) is False
    assert EvaluationSpec(mode="individual").individual_for(10**6) is True


@pytest.mark.parametrize(("settings", "message"), [
    ({"norm": "L1"}, "unknown norm 'L1': use 'Linf' or 'L2'"),
    ({"eps": 0.0}, "eps must be a finite number > 0, got 0.0"),
    ({"eps": math.nan}, "eps must be a finite number > 0"),
    ({"attacks": ("apgd-ce", "pgd-100")}, "unknown attack 'pgd-100'; valid attacks: clean, pgd"),
    ({"attacks": ()}, "no attacks given; valid attacks"),
    ({"attacks": ("pgd", "pgd")}, r"attack names must be unique, repeated: \['pgd'\]"),
    ({"attacks": ("pgd",), "attack_options": {"pgd": {"stepz": 3}}}, "bad options for attack 'pgd'"),
    ({"attacks": ("pgd",), "attack_options": {"pgd": {"steps": 0}}}, "bad option pgd.steps=0"),
    ({"attack_options": {"nope": {}}}, r"attack_options for unknown attacks \['nope'\]"),
    ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ({"workers": -1}, "workers must be an integer >= 0, got -1"),
    ({"mode": "both"}, "mode must be one of 'auto', 'individual', 'cascade'"),
    ({"path": "whole-model"}, "path must be one of 'auto', 'eager', 'fused', 'compiled'"),
    ({"ladder": "yes"}, "ladder must be True, False or a meansparse Ladder"),
    ({"sanity": ["nope"]}, "unknown attack 'nope' in sanity"),
    ({"seed": "0"}, "seed must be an integer"),
])
def test_bad_settings_fail_when_the_spec_is_built(settings, message):
    """The same messages as ``evaluate`` gave (tests/test_evaluate.py), raised before any model or data."""
    with pytest.raises(ValueError, match=message):
        EvaluationSpec(**settings)


def test_a_spec_is_validated_once(models, test_set, monkeypatch):
    """Built once, then passed through ``ms.evaluate`` to the runner without being checked again."""
    _, model = models
    x, y = test_set
    spec = EvaluationSpec(eps=EPS, attacks=("apgd-ce",), attack_options=FAST, ladder=False, indicators=False,
                          path="eager")
    built = []
    real = spec_module.EvaluationSpec.__post_init__
    monkeypatch.setattr(spec_module.EvaluationSpec, "__post_init__", lambda self: built.append(1) or real(self))
    ms.evaluate(model, x[:8], y[:8], spec, progress=False)
    assert not built


def test_evaluate_with_a_spec_equals_evaluate_with_keywords(models, test_set):
    base, model = models
    x, y = test_set
    keywords = dict(eps=EPS, attacks=("apgd-ce", "bpda-apgd-ce", "transfer"), attack_options=FAST,
                    individual=False, seed=3, batch_size=16)
    spec = EvaluationSpec(eps=EPS, attacks=("apgd-ce", "bpda-apgd-ce", "transfer"), attack_options=FAST,
                          mode="cascade", seed=3, batch_size=16)
    a = ms.evaluate(model, x, y, spec, base_model=base, progress=False)
    b = ms.evaluate(model, x, y, base_model=base, progress=False, **keywords)
    assert a.comparable() == b.comparable() and a.mode == "cascade"
    c = ms.evaluation.evaluate(model, x, y, spec, base_model=base, progress=False)  # the model as it is
    assert c.comparable() == a.comparable()
    # keywords given with a spec replace its fields
    d = ms.evaluation.evaluate(model, x, y, spec, base_model=base, progress=False, seed=4)
    assert d.metadata["seed"] == 4 and d.metadata["attack_settings"] == a.metadata["attack_settings"]
    with pytest.raises(TypeError, match="spec must be a meansparse EvaluationSpec"):
        ms.evaluation.evaluate(model, x, y, "Linf")
    with pytest.raises(TypeError, match="unexpected keyword argument 'stpes'"):
        ms.evaluate(model, x, y, stpes=3)


def test_the_stored_config_is_the_one_resume_files_hold(models, test_set):
    """A resume file compares ``run_config``: its keys and values are those the settings always gave."""
    base, model = models
    x, y = test_set
    spec = EvaluationSpec(eps=EPS, attacks=("apgd-ce",), attack_options=FAST, mode="cascade", ladder=False, seed=2,
                          batch_size=16)
    plan = plan_evaluation(model, x, y, spec, base)
    config = run_config(plan, model, base)
    assert list(config) == ["eps", "norm", "n_examples", "seed", "batch_size", "mode", "attacks", "ladder",
                            "model_hash", "base_model_hash", "data_hash"]
    assert config["eps"] == EPS and config["seed"] == 2 and config["mode"] == "cascade" and config["ladder"] is None
    assert config["attacks"] == [{"name": "apgd-ce", "kind": "white-box", "norm": "Linf", "eps": EPS,
                                  **ms.evaluation.build_attack("apgd-ce", eps=EPS, steps=10).params()}]
    assert config["model_hash"] == model_hash(model) and config["base_model_hash"] == model_hash(base)


def test_sanity_checks_take_a_spec(models, test_set):
    _, model = models
    x, y = test_set
    spec = EvaluationSpec(eps=EPS, attack_options=FAST, batch_size=32)
    a = sanity_checks(model, x[:20], y[:20], spec, attack="apgd-ce", budgets=(2, 10))
    b = sanity_checks(model, x[:20], y[:20], eps=EPS, attack_options=FAST, batch_size=32, attack="apgd-ce",
                      budgets=(2, 10))
    assert [f.to_dict() for f in a] == [f.to_dict() for f in b]
