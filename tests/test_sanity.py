"""Sanity checks on the evaluation: huge eps, monotone in eps and in budget; ``evaluate(sanity=...)``."""

from __future__ import annotations

from evaluation_helpers import EPS, FAST, run

from meansparse.evaluation import sanity_checks

pytest_plugins = ("evaluation_fixtures",)


def test_sanity_checks_report_findings(models, test_set):
    _, model = models
    x, y = test_set
    findings = sanity_checks(model, x[:30], y[:30], eps=EPS, attack="bpda-apgd-ce", budgets=(2, 10),
                             attack_options=FAST)
    assert [f.check for f in findings] == ["huge-eps", "eps-monotone", "budget-monotone"]
    assert findings[0].passed and findings[0].values["eps"] == 1.0
    r = run(model, x[:30], y[:30], ("apgd-ce",), sanity=["apgd-ce"])
    assert len(r.sanity) == 3
    failed = sum(not s["passed"] for s in r.sanity)
    assert failed == sum(w.startswith("sanity check failed") for w in r.warnings)
