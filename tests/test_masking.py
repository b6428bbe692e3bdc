"""Gradient masking is exposed: masking-proof attacks beat plain APGD on the masked model, and the report
says so; ``masking_findings`` on hand-made masks."""

from __future__ import annotations

import torch
from evaluation_helpers import run

import meansparse as ms
from meansparse.evaluation import BPDA, PGD, Square, masking_findings

pytest_plugins = ("evaluation_fixtures",)


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
        r = run(model, *test_set, ("apgd-ce", "bpda-apgd-ce"), batch_size=32)
    finally:
        ms.set_alpha(model, dict(enumerate(alphas)))
    # bpda-X reuses X's seeds: with every operator the identity the two runs are the same attack
    assert r.robust_masks["apgd-ce"] == r.robust_masks["bpda-apgd-ce"]
    assert not any(w.startswith("gradient masking") for w in r.warnings)


def test_masking_findings_on_hand_made_masks():
    pgd = PGD(eps=0.1)
    attacks = [pgd, BPDA(PGD(eps=0.1)), Square(eps=0.1)]
    n = 10
    white = torch.tensor([1] * 6 + [0] * 2 + [-1] * 2, dtype=torch.int8)
    masks = {"pgd": white, "bpda-pgd": white.clone(), "square": white.clone()}
    warnings, extra = masking_findings(attacks, masks, n, individual=True)
    assert warnings == [] and extra == {"bpda-pgd": 0, "square": 0}

    masks["bpda-pgd"] = torch.tensor([0, 0] + [1] * 4 + [0] * 2 + [-1] * 2, dtype=torch.int8)
    found = masking_findings(attacks, masks, n, individual=True)
    assert found.extra_breaks == {"bpda-pgd": 2, "square": 0}
    assert len(found.warnings) == 1 and "bpda-pgd (40.0 %" in found.warnings[0] and "square" not in found.warnings[0]
    # cascade mode: no per-attack accuracy is quoted, the extra breaks alone fire
    cascade = masking_findings(attacks, masks, n, individual=False)
    assert "bpda-pgd (breaks 2 example(s)" in cascade.warnings[0]
    # below the margin nothing fires; without a plain white-box attack there is nothing to compare with
    assert masking_findings(attacks, masks, n, individual=True, margin=0.5).warnings == []
    assert masking_findings(attacks[1:], masks, n, individual=True) == ([], {})
    # a BPDA attack given more steps than the plain attack beside it: the warning says so
    assert "larger budget" not in found.warnings[0]
    stronger = [pgd, BPDA(PGD(eps=0.1, steps=4 * pgd.steps)), Square(eps=0.1)]
    caveat = masking_findings(stronger, masks, n, individual=True).warnings[0]
    assert f"larger budget than pgd, {4 * pgd.steps} vs {pgd.steps} passes per example" in caveat
    assert "no plain" not in caveat  # bpda-pgd has its plain pgd beside it


def test_masking_warning_says_when_the_plain_counterpart_is_missing():
    """sg-apgd-mt against plain APGD-CE alone: the gap may be the targeted margin loss, not masking; with plain
    apgd-mt (or AutoAttack for apgd-t) beside it the caveat goes."""
    from meansparse.evaluation import build_attack

    n = 10
    masks = {"apgd-ce": torch.tensor([1] * 8 + [0] * 2, dtype=torch.int8),
             "sg-apgd-mt": torch.tensor([0] * 4 + [1] * 4 + [0] * 2, dtype=torch.int8)}
    attacks = [build_attack("apgd-ce", eps=0.1), build_attack("sg-apgd-mt", eps=0.1)]
    warning = masking_findings(attacks, masks, n, individual=True).warnings[0]
    assert "no plain apgd-mt ran beside it" in warning
    masks["apgd-mt"] = masks["apgd-ce"].clone()
    paired = masking_findings([*attacks, build_attack("apgd-mt", eps=0.1)], masks, n, individual=True)
    assert "no plain" not in paired.warnings[0]
    masks["aa"], masks["bpda-apgd-t"] = masks["apgd-ce"].clone(), masks["sg-apgd-mt"].clone()
    with_aa = masking_findings([build_attack("aa", eps=0.1), build_attack("bpda-apgd-t", eps=0.1)], masks, n,
                               individual=True)
    assert "no plain" not in with_aa.warnings[0]
