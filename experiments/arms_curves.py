"""Issue #24: the fine-tuning arms' held-out curves, epoch by epoch, while they train (or once they have).

    python experiments/arms_curves.py runs/arms        # the OUT folder of experiments/finetune_arms.sh

Reads every ``OUT/runs/<act>-<arm>/state.json`` (finished or not) and writes
experiments/results/finetune-arms/{table.md, curves.png}: per arm and epoch the α the operators trained with,
held-out clean accuracy and the held-out selection metric (``--selection worst``: the worst case of short
APGD-CE, BPDA-APGD-CE and surrogate-margin APGD on the operators, plain APGD-CE alone on an arm without
them).  This is what picks each arm's best epoch, on held-out training images, never the test split; it is
*not* the arms' answer, which is the default worst case on ≥ 1,000 test images (``STEP=eval``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from meansparse.plots import binomial_se, pyplot, save_figure

OUT = Path(__file__).resolve().parent / "results" / "finetune-arms"
#: the order and the meaning of the arms (experiments/finetune_arms.sh)
ARMS = {"control": "matched control (no operators)",
        "ms": "MeanSparse in the loop (straight-through inner attack)",
        "ms-exact": "MeanSparse, exact inner gradient (the masking arm)",
        "ms-surrogate": "MeanSparse, surrogate inner gradient"}


def load_runs(root: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """(activation, arm) -> the run's state.json, for every arm folder that has one."""
    runs = {}
    for path in sorted(root.glob("runs/*/state.json")):
        act, _, arm = path.parent.name.partition("-")
        if arm in ARMS:
            runs[(act, arm)] = json.loads(path.read_text())
    return runs


def table(runs: dict[tuple[str, str], dict[str, Any]], command: str) -> str:
    lines = ["# Fine-tuning arms: held-out curves (issue #24)", "", f"Command: `{command}`", "",
             "Held-out selection metric per epoch (500 held-out training images; the worst case of 10-step "
             "APGD-CE, BPDA-APGD-CE and surrogate-margin APGD on arms with operators, 10-step APGD-CE on the "
             "control). It picks each arm's best epoch; it is not the arms' answer (the default worst case on "
             "the test split). Across arms it compares only loosely: the control's number comes from APGD-CE "
             "alone (the margin loss of the surrogate attack is not run on a model without operators), so it "
             "can sit a little above what the arms' three attacks would give it.", "",
             "| model | arm | epoch | α | held-out clean % | held-out worst % | best |",
             "|---|---|---:|---:|---:|---:|---|"]
    for (act, arm), st in sorted(runs.items(), key=lambda kv: (kv[0][0], list(ARMS).index(kv[0][1]))):
        total = st["config"]["epochs"]
        for h in st["history"]:
            best = "best" if h["epoch"] == st["best"]["epoch"] else ""
            alpha = f"{h['alpha']:g}" if "alpha" in h else "-"
            lines.append(f"| {act} | {arm} | {h['epoch']}/{total} | {alpha} | {100 * h['holdout_clean']:.1f} | "
                         f"{100 * h['holdout_pgd']:.1f} | {best} |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[tuple[str, str], dict[str, Any]], path: Path) -> bool:
    """Held-out clean and worst-case accuracy against the epoch, one panel per model, a line per arm."""
    acts = sorted({act for act, _ in runs})
    if not acts:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(2, len(acts), figsize=(5.5 * len(acts), 6.5), squeeze=False, sharex=True)
    for col, act in enumerate(acts):
        for arm, label in ARMS.items():
            st = runs.get((act, arm))
            if st is None:
                continue
            hist = st["history"]
            epochs = [h["epoch"] for h in hist]
            n = st["config"]["eval_n"]
            for row, key in enumerate(("holdout_pgd", "holdout_clean")):
                acc = [h[key] for h in hist]
                err = [100 * binomial_se(a, n) for a in acc]
                axes[row][col].errorbar(epochs, [100 * a for a in acc], yerr=err, fmt="o-", capsize=3,
                                        label=label)
        axes[0][col].set(title=f"{act} PGD-AT, fine-tuned", ylabel="held-out worst case %")
        total = max(st["config"]["epochs"] for (a, _), st in runs.items() if a == act)
        axes[1][col].set(xlabel="epoch", ylabel="held-out clean %", xticks=range(1, total + 1))
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    save_figure(fig, path)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="the OUT folder given to experiments/finetune_arms.sh")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    runs = load_runs(args.root)
    if not runs:
        print(f"no arm runs under {args.root}/runs (expected <act>-<arm>/state.json)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    md = table(runs, "python experiments/arms_curves.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    if plot(runs, args.out / "curves.png"):
        md += "\n![held-out curves of the arms](curves.png)\n\nBars: ±1 binomial standard error (500 images).\n"
    (args.out / "table.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
