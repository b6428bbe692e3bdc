"""``meansparse evaluate``: option parsing and a report written end to end."""

from __future__ import annotations

import pytest
import torch

from meansparse.cli import main
from meansparse.cli.common import parse_eps, parse_options
from meansparse.evaluation import Report


def test_cli_helpers():
    assert parse_eps("8/255") == 8 / 255 and parse_eps("0.5") == 0.5
    assert parse_options(["apgd-ce.steps=20", "adaptive.lam=0.5", "bpda-aa.queries=10"]) == {
        "apgd-ce": {"steps": 20}, "adaptive": {"lam": 0.5}, "bpda-aa": {"queries": 10}}
    with pytest.raises(ValueError):
        parse_options(["steps=3"])


def test_cli_writes_report(tmp_path):
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
    assert report.n_examples == 10 and report.eps == 0.1 and report.ladder[0]["attacks"] == ["apgd-ce", "square"]
    assert report.attacks[:2] == ["apgd-ce", "square"] and report.converged is not None
    assert (out / "report.md").read_text().startswith("# Robustness report")
    assert (out / "state.json").exists()


def test_cli_ladder_factors_reach_the_spec():
    """--ladder sets the ladder's factors (one rung more where 2,4 did not converge), --single-rung none."""
    import argparse

    from meansparse.cli.evaluate import add_evaluate_parser, evaluation_spec
    from meansparse.evaluation.ladder import Ladder

    parser = argparse.ArgumentParser()
    add_evaluate_parser(parser.add_subparsers())
    base = ["evaluate", "--checkpoint", "c", "--out", "o"]
    assert evaluation_spec(parser.parse_args([*base, "--ladder", "2,4,8"]), "cpu").ladder == Ladder(factors=(2, 4, 8))
    assert evaluation_spec(parser.parse_args(base), "cpu").ladder == Ladder()
    assert evaluation_spec(parser.parse_args([*base, "--single-rung"]), "cpu").ladder is None
