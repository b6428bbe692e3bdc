"""``meansparse train --meansparse`` and ``meansparse finetune`` on digits with a tiny CNN and one epoch: the
checkpoints they write are read by ``evaluate`` with their operators, and every mistake is one error line
before any work."""

from __future__ import annotations

import json

import pytest
from test_cli_errors import cli  # (exit code, stdout, stderr) of one command

import meansparse as ms
from meansparse.cli import main
from meansparse.zoo import load_model_spec

TINY = ["--data", "digits", "--epochs", 1, "--batch-size", 256, "--steps", 1, "--eps", 0.1, "--n-holdout", 100,
        "--eval-n", 20, "--eval-steps", 1, "--no-augment", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A digits CNN trained from scratch with operators (linear α warm-up over the one epoch)."""
    out = tmp_path_factory.mktemp("train")
    assert main(["train", "--model", "small_cnn", "--width", "8", "--activation", "relu", *map(str, TINY),
                 "--meansparse", "0.3", "--alpha-schedule", "linear:1", "--out", str(out)]) == 0
    return out


def test_train_with_meansparse_writes_a_checkpoint_with_its_operators(trained):
    config = json.loads((trained / "best.json").read_text())
    assert config["meansparse_state"] == "best.meansparse.safetensors" and config["training"]["meansparse"] == 0.3
    assert config["training"]["selection"] == "worst" and config["training"]["inner_gradient"] == "straight_through"
    model = load_model_spec(str(trained / "best"))
    alphas = {round(o.alpha_value, 6) for o in ms.operators(model)}
    assert alphas == {0.3}


def test_finetune_arms_and_evaluate_reads_them(trained, tmp_path, capsys):
    rc, out, err = cli(capsys, "finetune", "--model", trained / "best", *TINY, "--meansparse", 0.2,
                       "--out", tmp_path / "ms")
    assert rc == 0, err
    assert json.loads(out)["best_checkpoint"].endswith("best.safetensors")
    assert cli(capsys, "finetune", "--model", trained / "best", *TINY, "--out", tmp_path / "control")[0] == 0
    assert not (tmp_path / "control" / "best.meansparse.safetensors").exists()
    ms_cfg, control_cfg = (json.loads((tmp_path / arm / "best.json").read_text())["training"]
                           for arm in ("ms", "control"))
    differs = {k for k in ms_cfg if ms_cfg[k] != control_cfg[k]}
    assert differs == {"meansparse"}  # the matched control: the same run with no operators
    rc, out, err = cli(capsys, "evaluate", "--checkpoint", tmp_path / "ms" / "best", "--n-examples", 10,
                       "--eps", 0.1, "--attacks", "apgd-ce", "--option", "apgd-ce.steps=1", "--no-indicators",
                       "--no-progress", "--device", "cpu", "--out", tmp_path / "eval")
    assert rc == 0, err
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["metadata"]["meansparse_operators"] == 3
    rc, _, err = cli(capsys, "evaluate", "--checkpoint", tmp_path / "ms" / "best", "--meansparse",
                     tmp_path / "ms" / "best.meansparse.safetensors", "--no-progress", "--out", tmp_path / "eval2")
    assert rc == 2 and "comes with its MeanSparse operators" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("argv, fragment", [
    (["--meansparse", 0.3, "--alpha-schedule", "linear"], "warm-up in epochs"),
    (["--alpha-schedule", "linear:2"], "need --meansparse"),
    (["--meansparse", 0.3, "--ms-momentum", 2], "--ms-momentum"),
    (["--meansparse", 0.3, "--include", "("], "bad --include regular expression"),
    (["--meansparse", 0.3, "--band-gradient", "smooth"], "invalid choice"),
])
def test_mistakes_are_one_line_errors_before_any_work(argv, fragment, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "--model", "small_cnn", *TINY, *argv, "--out", out)
    assert rc == 2 and "Traceback" not in err
    assert fragment in err.strip().splitlines()[-1]
    assert not out.exists()


def test_finetune_of_an_unknown_model_is_one_line(tmp_path, capsys):
    rc, _, err = cli(capsys, "finetune", "--model", tmp_path / "nothing", *TINY, "--out", tmp_path / "run")
    assert rc == 2 and err.strip().splitlines()[-1].startswith("meansparse finetune: error: --model")
    assert "no checkpoint there" in err and not (tmp_path / "run").exists()


def test_finetune_of_a_python_spec_reloads_from_its_recorded_spec(tmp_path, capsys):
    from safetensors.torch import save_file

    from meansparse.models import create_model

    (tmp_path / "net.py").write_text("from meansparse.models import create_model\n\n\ndef build():\n"
                                     "    return create_model('small_cnn', width=4, normalization='digits')\n")
    save_file(create_model("small_cnn", width=4, normalization="digits").state_dict(), str(tmp_path / "w.safetensors"))
    spec = f"python:{tmp_path / 'net.py'}:build"
    rc, _, err = cli(capsys, "finetune", "--model", spec, "--weights", tmp_path / "w.safetensors", *TINY,
                     "--meansparse", 0.1, "--out", tmp_path / "run")
    assert rc == 0, err
    config = json.loads((tmp_path / "run" / "best.json").read_text())
    assert config["init"]["spec"] == spec and config["model"] == spec
    model = load_model_spec(str(tmp_path / "run" / "best"))
    assert len(ms.operators(model)) == 3 and all(o.alpha_value == pytest.approx(0.1) for o in ms.operators(model))


def test_finetune_places_operators_as_prepare_does(trained, tmp_path, capsys):
    rc, _, err = cli(capsys, "finetune", "--model", trained / "best", *TINY, "--meansparse", 0.2, "--include",
                     "act1", "--exclude", "act3", "--ms-momentum", "cumulative", "--out", tmp_path / "run")
    assert rc == 0, err
    ops = ms.operators(load_model_spec(str(tmp_path / "run" / "best")))
    assert [o.site.name for o in ops] == ["net.act1"]
    assert json.loads((tmp_path / "run" / "best.json").read_text())["training"]["ms_momentum"] is None
