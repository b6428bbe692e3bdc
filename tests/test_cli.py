"""The ``meansparse`` command line: one package for every sub-command, reachable as the console script's
``meansparse.cli:main``, as ``python -m meansparse.cli`` (torchrun) and through ``build_parser``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from meansparse.cli import build_parser, main
from meansparse.models import list_models

COMMANDS = ["train", "finetune", "models", "demo", "sweep", "calibrate", "evaluate"]


def test_every_sub_command_is_registered():
    parser = build_parser()
    assert "{" + ",".join(COMMANDS) + "}" in parser.format_usage()
    for name in COMMANDS:
        with pytest.raises(SystemExit) as info:
            parser.parse_args([name, "--help"])
        assert info.value.code == 0


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    assert capsys.readouterr().out.split() == list_models()


def test_python_dash_m_runs_the_same_parser():
    out = subprocess.run([sys.executable, "-m", "meansparse.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("usage: meansparse ") and all(name in out for name in COMMANDS)


def test_bad_option_is_a_one_line_error(tmp_path, capsys):
    assert main(["sweep", "--out", str(tmp_path), "--option", "steps=3", "--quiet"]) == 2
    assert "meansparse sweep: error: bad --option 'steps=3'" in capsys.readouterr().err


def test_sweep_command_saves_the_chosen_state(tmp_path):
    rc = main(["sweep", "--out", str(tmp_path), "--alphas", "0,0.3", "--n-holdout", "100", "--n-sweep-robust",
               "30", "--option", "apgd-ce.steps=3", "--train-epochs", "2", "--quiet"])
    assert rc == 0
    assert (tmp_path / "meansparse.safetensors").exists() and (tmp_path / "alpha_curve.png").exists()
    assert json.loads((tmp_path / "sweep.json").read_text())["chosen"]["alpha"] in (0.0, 0.3)
