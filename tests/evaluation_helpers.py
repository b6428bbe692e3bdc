"""Helpers of the evaluation tests: the tiny digits CNN of ``evaluation_fixtures``, fast attack options and
``run`` (``evaluate`` with them).

The CNN starts with an activation on the pixels (a ReLU, the identity on [0, 1]), so
``ms.prepare`` puts a MeanSparse operator on the input itself; a large alpha there replaces every mid-grey
pixel by the mean and zeroes its gradient. On a model this small that is the reliable way to get the
gradient masking MeanSparse causes in large networks, which the evaluation must expose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meansparse.evaluation import Report, evaluate

EPS = 0.2
FAST = {  # few iterations: the tests check the machinery, not the models
    "apgd-ce": {"steps": 10},
    "apgd-t": {"steps": 10, "n_target_classes": 3},
    "apgd-dlr": {"steps": 10},
    "fab-t": {"steps": 10, "n_target_classes": 3},
    "transfer": {"steps": 10, "n_target_classes": 3},
    "square": {"queries": 100},
    "pgd": {"steps": 10},
    "adaptive": {"steps": 10},
    "aa": {"steps": 10, "queries": 100},
}


def net() -> nn.Module:
    return nn.Sequential(
        nn.ReLU(),  # identity on [0, 1]: gives MeanSparse a site on the pixels
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 16, 10),
    )


def fgsm_rs_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 0.1, epochs: int = 8) -> None:
    """FGSM with random start (Wong et al. 2020): adversarial training that is fast enough for a test."""
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            xb, yb = x[perm[i:i + 64]], y[perm[i:i + 64]]
            d = ((torch.rand(xb.shape, generator=g) * 2 - 1) * eps).requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model((xb + d).clamp(0, 1)), yb), d)
            xa = (xb + (d + 1.25 * eps * grad.sign()).clamp(-eps, eps)).clamp(0, 1).detach()
            opt.zero_grad()
            F.cross_entropy(model(xa), yb).backward()
            opt.step()
    model.eval()


def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks, **kw) -> Report:
    """``evaluate`` with the fast attack options, eps ``EPS`` and no progress bar unless overridden."""
    kw.setdefault("attack_options", FAST)
    kw.setdefault("progress", False)
    kw.setdefault("eps", EPS)
    return evaluate(model, x, y, attacks=attacks, **kw)
