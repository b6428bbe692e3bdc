"""The plot of one ablation result, drawn from its results.json data alone (so it can be redrawn any time).

    python experiments/ablations.py --replot      # redraw every experiments/results/<ablation>/plot.png

Shapes handled (as experiments/ablations.py writes them):
- a list of α records (``alpha``, ``clean``, one key per attack, ``worst_case``): one curve per column;
- a dict of such lists (one per model / threat / centering): the paper's metric dashed, worst case solid;
- a list of ε records (A.8), a list of site settings (A.9), per-layer α (base / global / schedule).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meansparse.plots import pyplot  # matplotlib with the Agg backend, or a clear ImportError

#: the paper's metric in each α table: the first of these columns present
PLAIN = ("apgd-ce", "pgd")

SKIP = {"alpha", "warnings", "eps", "setting"}


def _pct(v: float | None) -> float:
    return float("nan") if v is None else 100 * v


def plain_attack(rec: dict[str, Any]) -> str | None:
    """The plain (paper-metric) attack column of a result record, if it has one."""
    return next((k for k in PLAIN if k in rec), None)


def _alpha_curves(ax, recs: list[dict[str, Any]]) -> None:
    xs = [r["alpha"] for r in recs]
    keys = [k for k in recs[0] if k not in SKIP and isinstance(recs[0][k], (int, float))]
    for k in keys:
        style = "o-" if k in ("worst_case", "clean") else "o--"
        lw = 2.2 if k == "worst_case" else 1.2
        ax.plot(xs, [_pct(r.get(k)) for r in recs], style, lw=lw, label=k.replace("_", " "))
    ax.set_xlabel("α")


def _variant_curves(ax, data: dict[str, list[dict[str, Any]]]) -> None:
    for i, (tag, recs) in enumerate(data.items()):
        color = f"C{i}"
        xs = [r["alpha"] for r in recs]
        plain = plain_attack(recs[0])
        ax.plot(xs, [_pct(r[plain]) for r in recs], "o--", color=color, lw=1.2, label=f"{tag}: {plain}")
        ax.plot(xs, [_pct(r["worst_case"]) for r in recs], "o-", color=color, lw=2.2, label=f"{tag}: worst case")
    ax.set_xlabel("α")


def _eps_curves(ax, recs: list[dict[str, Any]]) -> None:
    xs = [r["eps"] * 255 for r in recs]
    ax.plot(xs, [_pct(r["base"]["apgd-ce"]) for r in recs], "o--", color="C0", label="base: APGD-CE")
    ax.plot(xs, [_pct(r["base_worst_case"]) for r in recs], "o-", color="C0", lw=2.2, label="base: worst case")
    ax.plot(xs, [_pct(r["alpha0.2"]["apgd-ce"]) for r in recs], "o--", color="C1", label="α=0.2: APGD-CE")
    ax.plot(xs, [_pct(r["worst_case"]) for r in recs], "o-", color="C1", lw=2.2, label="α=0.2: worst case")
    ax.set_xlabel("ε (×1/255)")


def _bars(ax, labels: list[str], plain: list[float], worst: list[float], plain_label: str) -> None:
    ys = range(len(labels))
    ax.barh([y + 0.2 for y in ys], plain, height=0.4, color="C1", label=plain_label)
    ax.barh([y - 0.2 for y in ys], worst, height=0.4, color="C0", label="worst case")
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.invert_yaxis()
    lo = min(worst + plain)
    ax.set_xlim(max(0.0, lo - 5), max(worst + plain) + 2)
    ax.set_xlabel("accuracy (%)")


def plot_result(path: str | Path, data: Any, title: str) -> Path | None:
    """Draw ``data`` (an ablation's results.json "data") to ``path``; None if the shape is unknown."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        if isinstance(data, list) and data and "alpha" in data[0]:
            _alpha_curves(ax, data)
        elif isinstance(data, list) and data and "eps" in data[0]:
            _eps_curves(ax, data)
        elif isinstance(data, list) and data and "setting" in data[0]:
            _bars(ax, [r["setting"] for r in data], [_pct(r["apgd-ce"]) for r in data],
                  [_pct(r["worst_case"]) for r in data], "APGD-CE (paper's metric)")
        elif isinstance(data, dict) and "base" in data and "global α" in data:
            labels = ["base model", "global α", "schedule a·r^k"]
            recs = [data["base"], data["global α"], data["schedule a·r^k"]]
            _bars(ax, labels, [_pct(r["test_clean"]) for r in recs], [_pct(r["test_worst"]) for r in recs],
                  "clean (test)")
        elif isinstance(data, dict) and all(isinstance(v, list) and v and "alpha" in v[0] for v in data.values()):
            _variant_curves(ax, data)
        else:
            return None
        if ax.get_xlabel() != "accuracy (%)":
            ax.set_ylabel("accuracy (%)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        return Path(path)
    finally:
        plt.close(fig)
