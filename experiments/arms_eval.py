"""Issue #24 item 4, the answer: every fine-tuning arm under the default worst case on the same test images,
paired against the matched control and against the starting checkpoint.

    python experiments/arms_eval.py runs/arms --acts relu,gelu --n 200 --threads 1      # OUT of finetune_arms.sh
    python experiments/arms_eval.py runs/arms --acts relu --rows control,ms --n 1000 --device cuda
    python experiments/arms_eval.py runs/arms --report                                  # only the table

Rows per reference checkpoint (ReLU / GELU PGD-AT):
  start      the starting checkpoint, α = 0;
  post       post-training MeanSparse at the α its held-out sweep chose (experiments/results/sweep-<act>-pgd-aware;
             the same model as ``start`` where that α is 0);
  control    (c) fine-tuned without operators;
  ms         (b) fine-tuned with MeanSparse in the loop (straight-through inner attack), at its best epoch's α;
  ms-alpha0  the same weights without the band (α = 0): what the fine-tuning did to the network itself;
  ms-exact   (d) fine-tuned with the exact inner gradient (the masking arm), at its best epoch's α;
  ms-surrogate  the optional arm whose inner attack back-propagates the soft threshold.
``start`` and ``post`` are experiments/strongest.py's new-default records where it has run for the same --n;
where it has not, they are evaluated here as its part A (``strongest.new_default``, on its state files: either
script resumes the other's work when both use the same --batch-size; strongest.py's default is 250).  The other
rows are evaluated with ``ms.evaluate``'s defaults (attack list, budget ladder, indicators; transfer from the
arm's own network at α = 0), resumable per batch (state files under results/cache/state/arms/, or
$MEANSPARSE_EXPERIMENT_STATE/arms).  Writes results-<act>-<row>-n<N>.json, eval-n<N>.md and eval-n<N>.png to
experiments/results/finetune-arms/.  The images are those of every experiment here (ablations.test_images).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

import meansparse as ms
from meansparse._utils import resolve_device
from meansparse.plots import binomial_se, pyplot, save_figure
from meansparse.zoo import load_model_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablations import RESULTS, test_images  # noqa: E402
from ablations import STATE as STATE_ROOT  # noqa: E402
from paired_ci import paired  # noqa: E402
from strongest import OUT as STRONGEST  # noqa: E402
from strongest import _ci, _pct, context, new_default  # noqa: E402

OUT = RESULTS / "finetune-arms"
STATE = STATE_ROOT / "arms"
#: row -> (what it is, the arm folder it evaluates or None for strongest.py's records, α override)
ROWS: dict[str, tuple[str, str | None, float | None]] = {
    "start": ("starting checkpoint (α = 0)", None, None),
    "post": ("(a) post-training MeanSparse, held-out α", None, None),
    "control": ("(c) matched control: fine-tuned, no operators", "control", None),
    "ms": ("(b) MeanSparse in the loop (straight-through inner attack)", "ms", None),
    "ms-alpha0": ("(b) without the band (α = 0)", "ms", 0.0),
    "ms-exact": ("(d) MeanSparse, exact inner gradient (masking)", "ms-exact", None),
    "ms-surrogate": ("MeanSparse, surrogate inner gradient", "ms-surrogate", None),
}
EVALUATED = list(ROWS)
REFERENCE = ("start", "post")  # rows of the starting checkpoint itself
OPTIONAL = ("ms-surrogate",)  # an arm finetune_arms.sh trains only when asked


def chosen_alpha(act: str) -> float:
    """The α the held-out sweep of the starting checkpoint chose with the search's MeanSparse-aware default
    attacks (docs/results.md, "First honest α sweeps"; the older sweep-<act>-pgd used BPDA and chose higher)."""
    return float(json.loads((RESULTS / f"sweep-{act}-pgd-aware" / "sweep.json").read_text())["chosen"]["alpha"])


def reference_record(act: str, alpha: float, n: int, strongest: Path) -> dict[str, Any] | None:
    """strongest.py's new-default verdicts for the starting checkpoint at ``alpha`` on the same n images (None
    until strongest.py has run for this n)."""
    path = strongest / f"results-{act}-pgd-{alpha:g}-n{n}.json"
    if not path.exists():
        return None
    r = json.loads(path.read_text())
    plain = (round(r["clean"] * n) - len(r["broke"]["apgd-ce"])) / n if "apgd-ce" in r.get("broke", {}) else None
    return {"alpha": alpha, "n": n, "clean": r["clean"], "plain": plain, "robust": r["new"],
            "converged": r["converged"], "ladder": r["ladder"],
            "command": re.sub(r" --out \S+", "", r["command"])}  # where its files went changes no number


def reference_alpha(act: str, row: str) -> float:
    return 0.0 if row == "start" else chosen_alpha(act)


def evaluate_reference(ctx: Any, act: str, row: str, progress: bool) -> dict[str, Any]:
    """``start`` / ``post`` as strongest.py's part A (the same model, images, seed and state file)."""
    alpha = reference_alpha(act, row)
    t0 = time.time()
    return _record(new_default(ctx, f"{act}-pgd", alpha, progress), alpha, f"{act}-pgd", t0)


def _record(rep: ms.Report, alpha: float, checkpoint: str, t0: float) -> dict[str, Any]:
    """One row's record (what load_rows and the table read back)."""
    return {"alpha": round(alpha, 6), "n": rep.n_examples, "clean": rep.clean_accuracy,
            "plain": rep.robust_accuracy.get("apgd-ce"), "robust": list(rep.worst_case_robust),
            "converged": rep.converged, "ladder": rep.ladder, "warnings": rep.warnings,
            "checkpoint": checkpoint, "seconds": time.time() - t0,
            # the attacks' compute over every session that resumed this row (their batches keep their times)
            "attack_seconds": sum(rep.metadata["run"]["attack_seconds"].values())}


def evaluate_row(root: Path, act: str, row: str, images: Any, batch: int, device: torch.device,
                 progress: bool) -> dict[str, Any]:
    """One fine-tuned arm (at its own α or the row's) under the default worst case; resumable."""
    _, arm, alpha = ROWS[row]
    ckpt = root / "runs" / f"{act}-{arm}" / "best"
    model = load_model_spec(str(ckpt), device=device).eval()
    if alpha is not None:
        ms.set_alpha(model, alpha)
    ops = ms.operators(model)
    alpha = float(ops[0].alpha) if ops else 0.0
    STATE.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rep = ms.evaluate(model, images.float(), images.labels, batch_size=batch, seed=0, progress=progress,
                      state_path=STATE / f"{act}-{row}-n{len(images)}.json")
    return _record(rep, alpha, str(ckpt), t0)


def load_rows(out: Path, act: str, n: int, strongest: Path) -> dict[str, dict[str, Any]]:
    """The rows of one checkpoint that have a record here, start and post from strongest.py's where it has one
    (the same state file behind both where they share a batch size)."""
    rows: dict[str, dict[str, Any]] = {}
    for row in EVALUATED:
        path = out / f"results-{act}-{row}-n{n}.json"
        record = reference_record(act, reference_alpha(act, row), n, strongest) if row in REFERENCE else None
        if record is not None:
            rows[row] = record
        elif path.exists():
            rows[row] = json.loads(path.read_text())
    return rows


def table(by_act: dict[str, dict[str, dict[str, Any]]], n: int, command: str) -> str:
    lines = [f"# Fine-tuning arms on {n} test images (issue #24)", "", f"Command: `{command}`", "",
             "The same images in every row (random CIFAR-10 test images, seed 0), Linf 8/255, each row under "
             "`ms.evaluate`'s default worst case (APGD-CE, surrogate-gradient APGD margin / multi-target, transfer "
             "from the row's own network at α = 0, warm-started Square; the budget ladder). Δ columns: paired "
             "difference in robust accuracy, percentage points (95 % interval). Plain APGD-CE: what the "
             "paper's kind of metric alone would report (a gain only it sees is no gain).", "",
             "| model | row | α | clean % | plain APGD-CE % | worst case % | converged | Δ vs control (c) "
             "| Δ vs start |",
             "|---|---|---:|---:|---:|---:|:---:|---:|---:|"]
    for act, rows in by_act.items():
        control, start = rows.get("control"), rows.get("start")
        for row, r in sorted(rows.items(), key=lambda kv: list(ROWS).index(kv[0])):
            rob = r["robust"]
            vs_c = _ci(rob, control["robust"]) if control and row != "control" else "-"
            vs_s = _ci(rob, start["robust"]) if start and row != "start" else "-"
            plain = "-" if r.get("plain") is None else _pct(r["plain"])
            lines.append(f"| {act} | {ROWS[row][0]} | {r['alpha']:g} | {_pct(r['clean'])} | {plain} | "
                         f"{_pct(sum(rob) / len(rob))} | {'yes' if r['converged'] else 'no'} | {vs_c} | {vs_s} |")
        missing = [row for row in ROWS if row not in rows and row not in OPTIONAL]
        if missing:
            lines.append(f"| {act} | not yet evaluated: {', '.join(missing)} | | | | | | | |")
    notes = [f"- {act}: the band itself, on the in-loop arm's own weights (ms − ms-alpha0, paired): "
             f"{_ci(rows['ms']['robust'], rows['ms-alpha0']['robust'])}"
             for act, rows in by_act.items() if "ms" in rows and "ms-alpha0" in rows]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def plot(by_act: dict[str, dict[str, dict[str, Any]]], path: Path) -> bool:
    """Per checkpoint: worst-case and clean accuracy per row (top), and each row's paired difference in worst
    case against the starting checkpoint and the control with its 95 % interval (bottom: the comparison the
    per-row error bars overstate, since every row sees the same images)."""
    acts = [a for a, rows in by_act.items() if rows]
    if not acts:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(2, len(acts), figsize=(6 * len(acts), 7.5), squeeze=False, sharex="col")
    for col, act in enumerate(acts):
        rows = sorted(by_act[act].items(), key=lambda kv: list(ROWS).index(kv[0]))
        xs = range(len(rows))
        top, bottom = axes[0][col], axes[1][col]
        for key, shift, label in (("robust", -0.18, "worst case"), ("clean", 0.18, "clean")):
            acc = [sum(r["robust"]) / len(r["robust"]) if key == "robust" else r["clean"] for _, r in rows]
            err = [100 * binomial_se(a, r["n"]) for a, (_, r) in zip(acc, rows)]
            top.bar([x + shift for x in xs], [100 * a for a in acc], width=0.36, yerr=err, capsize=3, label=label)
        for ref, shift, color in (("start", -0.12, "C0"), ("control", 0.12, "C1")):  # one colour per reference
            if ref not in by_act[act]:
                continue
            pts = [(x, paired([int(v) for v in r["robust"]], [int(v) for v in by_act[act][ref]["robust"]]))
                   for x, (row, r) in zip(xs, rows) if row != ref]
            bottom.errorbar([x + shift for x, _ in pts], [100 * d["delta"] for _, d in pts],
                            yerr=[[100 * (d["delta"] - d["low"]) for _, d in pts],
                                  [100 * (d["high"] - d["delta"]) for _, d in pts]],
                            fmt="o", capsize=3, color=color, label=f"vs {ref}")
        bottom.axhline(0, color="gray", lw=0.8)
        top.set(title=f"{act} PGD-AT: fine-tuning arms", ylabel="accuracy %")
        bottom.set(ylabel="Δ worst case, points (95 % CI)")
        bottom.set_xticks(list(xs), [row for row, _ in rows], rotation=20)
        for ax in (top, bottom):
            ax.grid(axis="y", alpha=0.3)
        if bottom.get_legend_handles_labels()[0]:  # each panel says which reference its points are against
            bottom.legend(fontsize=8)
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="the OUT folder given to experiments/finetune_arms.sh")
    p.add_argument("--acts", default="relu,gelu", help="comma list of relu, gelu")
    p.add_argument("--rows", default=None,
                   help=f"rows to evaluate, in this order: any of {', '.join(EVALUATED)} (default: every arm "
                        "that has finished, start and post where strongest.py has no record for this --n)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--strongest", type=Path, default=STRONGEST,
                   help="folder of experiments/strongest.py's records (its --out; default: the committed one)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--report", action="store_true", help="only rebuild the table and plot from the records")
    args = p.parse_args(argv)
    acts = args.acts.split(",")
    rows = args.rows.split(",") if args.rows else []
    bad = [a for a in acts if a not in ("relu", "gelu")] + [r for r in rows if r not in EVALUATED]
    if bad:
        p.error(f"unknown --acts / --rows value(s): {', '.join(bad)}")
    if args.n < 1:
        p.error("--n must be a positive integer")

    def finished(act: str, row: str) -> bool:  # the arm's training ended (the starting checkpoint always has)
        return row in REFERENCE or (args.root / "runs" / f"{act}-{ROWS[row][1]}" / "best.json").exists()

    def wanted(act: str, row: str) -> bool:  # by default: every finished arm, start / post where strongest.py's
        if args.rows is not None:            # record is missing
            return True
        if row in REFERENCE:
            return reference_record(act, reference_alpha(act, row), args.n, args.strongest) is None
        return finished(act, row)

    todo = [(act, row) for act in acts for row in (rows or EVALUATED) if wanted(act, row)]
    missing = sorted({f"{act}-{ROWS[row][1]}" for act, row in todo if not finished(act, row)})
    if missing and not args.report:
        p.error(f"no finished arm (best.json) under {args.root}/runs for: {', '.join(missing)}")
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python experiments/arms_eval.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if not args.report:
        if args.threads:
            torch.set_num_threads(args.threads)
        device = resolve_device(args.device)
        ctx = (context(args.n, args.batch_size, str(device), args.progress)
               if any(row in REFERENCE for _, row in todo) else None)
        images = ctx.test if ctx else test_images(args.n) if todo else None  # decoded once for every row
        for act, row in todo:
            r = (evaluate_reference(ctx, act, row, args.progress) if row in REFERENCE else
                 evaluate_row(args.root, act, row, images, args.batch_size, device, args.progress))
            r["command"] = command
            (args.out / f"results-{act}-{row}-n{args.n}.json").write_text(json.dumps(r) + "\n")
            print(f"[{act} {row}] clean {_pct(r['clean'])} worst {_pct(sum(r['robust']) / args.n)} "
                  f"({r['seconds']:.0f} s here, {r['attack_seconds'] / 3600:.1f} attack-hours in all)", flush=True)
    by_act = {act: load_rows(args.out, act, args.n, args.strongest) for act in acts}
    commands = sorted({r["command"] for rows_ in by_act.values() for r in rows_.values() if "command" in r})
    md = table(by_act, args.n, "`, `".join(commands) or command)
    if plot(by_act, args.out / f"eval-n{args.n}.png"):
        md += (f"\n![arms: worst case and clean accuracy](eval-n{args.n}.png)\n\nTop: ±1 binomial standard error "
               "of each number alone; bottom: paired differences in worst case with their 95 % intervals.\n")
    (args.out / f"eval-n{args.n}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
