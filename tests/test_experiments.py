"""The experiment scripts' offline parts: the summary table and the plots drawn from saved results."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _module(name: str):
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(EXPERIMENTS))


def _rec(alpha, clean, plain, worst, **more):
    return {"alpha": alpha, "clean": clean, "apgd-ce": plain, "worst_case": worst, "warnings": [], **more}


ALPHA_TABLE = [_rec(0.0, 0.700, 0.40, 0.38), _rec(0.1, 0.699, 0.42, 0.385), _rec(0.2, 0.690, 0.45, 0.37)]


def test_summary_reports_the_plain_pick_and_the_honest_gain(tmp_path):
    summarize = _module("summarize")
    for name, data in {"a1-x": {"m1": ALPHA_TABLE}, "a10-y": ALPHA_TABLE, "a9-sites": [{"setting": "s"}]}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"command": f"cmd {name}", "data": data}))
    md = summarize.summarize(0.005, tmp_path)
    rows = [line for line in md.splitlines() if line.startswith("| a") and not line.startswith("| ablation")]
    assert [r.split(" | ")[0] for r in rows] == ["| a1-x", "| a10-y"]  # numeric order; a9's shape has no α table
    # the plain metric picks α = 0.2 (+5.0) where the worst case is -1.0 and clean -1.0 (outside the budget);
    # within the 0.5-point budget the best worst-case gain is α = 0.1: +0.5
    assert "0.2: +5.0 | -1.0 (clean -1.0) | 0.1: +0.5" in rows[0]
    assert "a1-x: `cmd a1-x`" in md


@pytest.mark.parametrize("data", [
    ALPHA_TABLE,
    {"m1": ALPHA_TABLE, "m2": ALPHA_TABLE},
    [{"eps": 2 / 255, "base": {"apgd-ce": 0.6}, "base_worst_case": 0.59, "alpha0.2": {"apgd-ce": 0.61},
      "worst_case": 0.6}],
    [{"setting": "all", "clean": 0.7, "apgd-ce": 0.44, "worst_case": 0.38}],
    {"base": {"test_clean": 0.7, "test_worst": 0.38}, "global α": {"test_clean": 0.7, "test_worst": 0.38},
     "schedule a·r^k": {"test_clean": 0.7, "test_worst": 0.381}},
])
def test_every_result_shape_gets_a_plot(data, tmp_path):
    plots = _module("ablation_plots")
    out = plots.plot_result(tmp_path / "plot.png", data, "title")
    assert out is not None and out.stat().st_size > 1000


def test_unknown_shape_draws_nothing(tmp_path):
    assert _module("ablation_plots").plot_result(tmp_path / "p.png", {"x": 1}, "t") is None
    assert not (tmp_path / "p.png").exists()


def _state(path, n, attacks):
    batches = {a: {"0": {"indices": idx, "robust": rob}} for a, (idx, rob) in attacks.items()}
    path.write_text(json.dumps({"config": {"n_examples": n}, "batches": batches}))


def test_paired_interval_compares_each_setting_with_its_alpha_zero_state(tmp_path):
    ci = _module("paired_ci")
    # 6 images; image 5 is clean-wrong.  α = 0: robust {0, 1}; α = 0.2: robust {0, 1, 2, 3}
    _state(tmp_path / "m-Linf-0.03137-0-x-n6.json", 6, {"a": ([0, 1, 2, 3, 4], [1, 1, 0, 1, 0]),
                                                       "b": ([0, 1, 2, 3, 4], [1, 1, 1, 0, 1])})
    _state(tmp_path / "m-Linf-0.03137-0.2-x-n6.json", 6, {"a": ([0, 1, 2, 3, 4], [1, 1, 1, 1, 0]),
                                                         "b": ([0, 1, 2, 3, 4], [1, 1, 1, 1, 0])})
    assert ci.worst_case_vector(tmp_path / "m-Linf-0.03137-0-x-n6.json") == [1, 1, 0, 0, 0, 0]
    rows = ci.collect(tmp_path)
    assert [(g, name) for g, name, _ in rows] == [("α tables", "m-Linf-0.03137-0.2-x-n6")]
    r = rows[0][2]
    assert r["plus"] == 2 and r["minus"] == 0 and r["delta"] == pytest.approx(2 / 6)
    assert r["low"] < r["delta"] < r["high"]


def test_ablation_attack_sets_are_attacks_and_every_one_runs_at_the_tables_budget():
    """The honest columns of the ablations default to the MeanSparse-aware set (issue #25); every attack of a
    set is a registered name, and every gradient attack in it (wrapped ones included) gets --steps."""
    from meansparse.evaluation.attacks.registry import ATTACK_NAMES, options_for, split_wrapper

    abl = _module("ablations")
    assert set(abl.ATTACK_SETS["v1"]) < set(abl.ATTACK_SETS["aware"])
    assert {"sg-apgd-margin", "sg-apgd-mt"} <= set(abl.ATTACK_SETS["aware"])
    opts = abl.attack_options(7, 11)
    for set_name, attacks in abl.ATTACK_SETS.items():
        for name in attacks:
            assert name in ATTACK_NAMES, (set_name, name)
            if split_wrapper(name)[1].startswith("apgd") or name == "transfer":
                assert options_for(name, opts)["steps"] == 7, name
    assert opts["square"] == {"queries": 11}


def test_strongest_partial_counts_unreached_images_as_no_evidence(tmp_path):
    """A partial summary of an unfinished run: an attack that has not reached a clean-correct image yet (or an
    extra that has not reached its image) must not count it as broken; clean errors stay broken."""
    strongest = _module("strongest")
    state = tmp_path / "s.json"
    state.write_text(json.dumps({"batches": {
        "full": {"0": {"indices": [0, 1], "robust": [True, False]}, "1": {"indices": [3], "robust": [True]}},
        "running": {"0": {"indices": [0, 1], "robust": [False, True]}},  # image 3 not reached yet
    }}))
    clean = strongest._clean_correct(json.loads(state.read_text())["batches"])
    assert clean == {0, 1, 3}  # image 2 was misclassified: no attack covered it
    verdicts = strongest._state_verdicts(state, 4, clean)
    assert verdicts["full"] == [True, False, False, True]
    assert verdicts["running"] == [False, True, False, True]
    assert strongest._state_verdicts(state, 4, unreached_robust=True) == verdicts  # what --partial reads
    assert strongest._state_verdicts(state, 4)["running"] == [False, True, False, False]  # the default: broken


def test_arms_curves_tabulates_every_arm_and_marks_the_best_epoch(tmp_path):
    """The arms' held-out curves read unfinished runs too, keep the arms in their documented order, mark each
    run's best epoch and refuse a folder without runs (one line, exit 2)."""
    curves = _module("arms_curves")

    def run(name: str, worst: list[float], best: int, alpha: bool) -> None:
        hist = [{"epoch": e + 1, "holdout_clean": 0.6, "holdout_pgd": w, **({"alpha": 0.1 * (e + 1)} if alpha else {})}
                for e, w in enumerate(worst)]
        folder = tmp_path / "arms" / "runs" / name
        folder.mkdir(parents=True)
        (folder / "state.json").write_text(json.dumps({"config": {"epochs": 3, "eval_n": 500}, "history": hist,
                                                       "best": hist[best - 1]}))

    run("relu-ms", [0.30, 0.35], 2, True)  # unfinished: 2 of 3 epochs
    run("relu-control", [0.40, 0.38, 0.41], 3, False)
    run("relu-unknown", [0.5], 1, False)  # not an arm: left out
    out = tmp_path / "out"
    assert curves.main([str(tmp_path / "arms"), "--out", str(out)]) == 0
    md = (out / "table.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| relu")]
    assert [r.split(" | ")[1] for r in rows] == ["control"] * 3 + ["ms"] * 2
    assert rows[2].endswith("| 41.0 | best |") and rows[4] == "| relu | ms | 2/3 | 0.2 | 60.0 | 35.0 | best |"
    assert "unknown" not in md and (out / "curves.png").stat().st_size > 0
    assert curves.main([str(tmp_path / "empty"), "--out", str(out)]) == 2


def test_strongest_table_names_one_command_per_set_of_runs():
    """Runs that differ only in α (resumed one α at a time) or in where their files went are one command."""
    strongest = _module("strongest")
    base = "python experiments/strongest.py --models gelu-pgd --n 200"
    results = [{"alpha": 0.35, "command": f"{base} --alphas 0.35,0.2,0 --out /tmp/x"},
               {"alpha": 0.2, "command": f"{base} --alphas 0.2"},
               {"alpha": 0.0, "command": f"{base} --out /elsewhere --alphas 0"},
               {"alpha": 0.2, "command": "python experiments/strongest.py --models relu-pgd --alphas 0.2"}]
    assert strongest._commands(results, "unused") == [
        f"{base} --alphas 0.35,0.2,0", "python experiments/strongest.py --models relu-pgd --alphas 0.2"]


def test_arms_eval_pairs_every_row_with_the_control_and_the_start(tmp_path, monkeypatch):
    """The arms' table: each row's worst case with paired intervals against the control and the starting
    checkpoint (strongest.py's record), the rows not evaluated yet named; bad arguments are one error line."""
    arms = _module("arms_eval")
    monkeypatch.setattr(arms, "chosen_alpha", lambda act: 0.2)  # post: a held-out α strongest.py has no record of
    strongest_out = tmp_path / "strongest"
    strongest_out.mkdir()
    start = [True, True, False, False]
    (strongest_out / "results-relu-pgd-0-n4.json").write_text(json.dumps(  # plain: 3 clean-correct, 1 broken
        {"clean": 0.75, "new": start, "converged": True, "ladder": [], "command": "python strongest.py --out /x",
         "broke": {"apgd-ce": [3]}}))
    out = tmp_path / "out"
    out.mkdir()
    arm_rows = {"control": [True, False, False, False], "ms": [True, True, True, False],
                "ms-alpha0": [True, True, True, True]}
    arm_rows["start"] = [False] * 4  # strongest.py's record of the same row wins (the fuller record)
    arm_rows["post"] = [True, False, True, False]  # evaluated here
    for row, robust in arm_rows.items():
        (out / f"results-relu-{row}-n4.json").write_text(json.dumps(
            {"alpha": 0.15 if row == "ms" else 0.0, "n": 4, "clean": 1.0, "robust": robust, "converged": row == "ms",
             "ladder": [], "command": f"python arms_eval.py {row}", **({"plain": 1.0} if row == "ms" else {})}))
    assert arms.main([str(tmp_path / "runs"), "--acts", "relu", "--n", "4", "--out", str(out), "--report",
                      "--strongest", str(strongest_out)]) == 0
    md = (out / "eval-n4.md").read_text()
    rows = {line.split(" | ")[1]: line for line in md.splitlines() if line.startswith("| relu")}
    control, ms_row = rows[arms.ROWS["control"][0]], rows[arms.ROWS["ms"][0]]
    assert control.endswith("| 25.0 | no | - | -25.0 [-74.0, +24.0] |")
    assert ms_row.startswith("| relu | (b) MeanSparse in the loop")
    assert "| 0.15 | 100.0 | 100.0 | 75.0 | yes | +50.0 [" in ms_row  # plain APGD-CE beside the worst case
    assert rows[arms.ROWS["start"][0]].startswith("| relu | starting checkpoint (α = 0) | 0 | 75.0 | 50.0 | 50.0 |")
    assert rows[arms.ROWS["post"][0]].endswith("| 50.0 | no | +25.0 [-24.0, +74.0] | +0.0 [-80.0, +80.0] |")
    assert "not yet evaluated: ms-exact |" in md
    assert "(ms − ms-alpha0, paired): -25.0 [-74.0, +24.0]" in md  # the band alone on the same weights
    assert "`python arms_eval.py control`, `python arms_eval.py ms`, `python arms_eval.py ms-alpha0`, " in md
    assert (out / "eval-n4.png").stat().st_size > 0
    for bad in (["--rows", "nope"], ["--acts", "tanh"], ["--rows", "ms"]):  # the last: no finished arm
        with pytest.raises(SystemExit) as e:
            arms.main([str(tmp_path / "runs"), "--n", "4", "--out", str(out), *bad])
        assert e.value.code == 2
