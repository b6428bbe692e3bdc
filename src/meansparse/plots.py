"""Figures people would rather look at than read: the α curve and the paper's Figure-1 histogram."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ._utils import model_device
from .core import MeanSparse

__all__ = ["pyplot", "save_figure", "binomial_se", "plot_alpha_curve", "capture_site", "plot_feature_histogram"]


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, or an ImportError naming the ``[plot]`` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'meansparse[plot]'") from e
    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write (120 dpi, parent folders made) and close ``fig``; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def binomial_se(p: float, n: int | None) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` examples, sqrt(p(1-p)/n); 0 if n is unknown."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else 0.0


def plot_alpha_curve(rows: Sequence[dict], path: str | Path, chosen: float | None = None,
                     naive: float | None = None, title: str = "", *, n_clean: int | None = None,
                     n_robust: int | None = None) -> Path:
    """Clean, plain-robust and worst-case robust accuracy against α (rows: dicts with those keys).

    With ``n_clean`` / ``n_robust`` (the examples behind the clean and the robust numbers) every point gets a
    binomial ±1 standard-error bar; rows with ``feasible`` False (outside the clean-accuracy budget) are
    drawn hollow and greyed."""
    plt = pyplot()
    alphas = [r["alpha"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    series = [("clean", "o-", "clean", n_clean)]
    if any(r.get("plain") is not None for r in rows):
        series.append(("plain", "s--", "robust, plain white-box attack", n_robust))
    series.append(("worst_case", "^-", "robust, worst case (honest)", n_robust))
    for key, style, label, n in series:
        values = [r[key] for r in rows]
        errs = [100 * binomial_se(v, n) for v in values] if n else None
        line = ax.errorbar(alphas, [100 * v for v in values], yerr=errs, fmt=style, capsize=2,
                           label=label + (f" (n={n}, ±1 s.e.)" if n else ""))
        out = [i for i, r in enumerate(rows) if r.get("feasible") is False]
        if out:
            ax.plot([alphas[i] for i in out], [100 * values[i] for i in out], style[0], mfc="white",
                    mec=line[0].get_color(), ms=8, zorder=3)
    infeasible = [a for a, r in zip(alphas, rows) if r.get("feasible") is False]
    if infeasible:
        step = min((b - a for a, b in zip(alphas, alphas[1:]) if b > a), default=0.05) / 2
        for i, a in enumerate(infeasible):
            ax.axvspan(a - step, a + step, color="0.9", zorder=0,
                       label="outside the clean budget (hollow)" if i == 0 else None)
    if chosen is not None:
        ax.axvline(chosen, color="k", lw=1, label=f"chosen α = {chosen:g}")
    if naive is not None and naive != chosen:
        ax.axvline(naive, color="r", lw=1, ls=":", label=f"plain-attack choice α = {naive:g}")
    ax.set_xlabel("α (threshold in channel standard deviations)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "MeanSparse α sweep (held-out split)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


@torch.no_grad()
def capture_site(model: nn.Module, op: MeanSparse, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output of one MeanSparse operator on a batch (forward hook; nothing else changes)."""
    store: dict[str, torch.Tensor] = {}

    def hook(_m, inputs, output):
        if op.fused_activation is not None:  # a fused site returns the activation's output: recompute
            output = op.forward(inputs[0].clone())
        store["in"], store["out"] = inputs[0].detach(), output.detach()

    handle = op.register_forward_hook(hook)
    device = model_device(model) or x.device
    try:
        model(x.to(device))
    finally:
        handle.remove()
    return store["in"].cpu(), store["out"].cpu()


def plot_feature_histogram(model: nn.Module, op: MeanSparse, x: torch.Tensor, path: str | Path,
                           channel: int = 0, bins: int = 120) -> Path:
    """Histogram of one channel before and after the operator (the paper's Figure 1)."""
    plt = pyplot()
    z_in, z_out = capture_site(model, op, x)
    dim = op.channel_dim(z_in.ndim)
    a = z_in.movedim(dim, 0)[channel].flatten().float().cpu()
    b = z_out.movedim(dim, 0)[channel].flatten().float().cpu()
    mu = float(op.running_mean[channel])
    sigma = float(op.running_var[channel].sqrt())
    alpha = float(op.alpha)
    lo, hi = float(torch.minimum(a.min(), b.min())), float(torch.maximum(a.max(), b.max()))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharex=True)
    for ax, values, label in ((axes[0], a, "before MeanSparse"), (axes[1], b, "after MeanSparse")):
        ax.hist(values.numpy(), bins=bins, range=(lo, hi), color="tab:blue")
        ax.axvspan(mu - alpha * sigma, mu + alpha * sigma, color="tab:orange", alpha=0.25,
                   label=f"band μ ± {alpha:g}σ")
        ax.axvline(mu, color="k", lw=1)
        ax.set_yscale("log")
        ax.set_title(f"{label}\n{op.site.name} channel {channel}", fontsize=9)
        ax.set_xlabel("pre-activation value")
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)
