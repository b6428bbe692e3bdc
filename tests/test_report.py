"""``Report``: lossless JSON round trip, Markdown for people, the metadata a result needs."""

from __future__ import annotations

import json

import pytest

from meansparse.evaluation import Report

pytest_plugins = ("evaluation_fixtures",)


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
