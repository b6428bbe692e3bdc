"""Projected gradient ascent on the input, the one primitive behind PGD-AT, TRADES and the adaptive attack.

Written by hand on purpose: pyautoattack covers APGD/FAB/Square for evaluation, but no kept library
without torchvision offers a PGD whose loss can be swapped (TRADES' KL, the paper's adaptive loss) and that
runs inside a training step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_adv, y) -> per-sample loss


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "Linf":
        return delta.clamp(-eps, eps)
    if norm == "L2":
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (delta.ndim - 1))
        return delta * (eps / n).clamp(max=1.0)
    raise ValueError(f"unknown norm {norm!r}: use 'Linf' or 'L2'")


def random_start(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None = None) -> torch.Tensor:
    if norm == "Linf":
        d = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device) * 2 - 1
        return d * eps
    d = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    n = d.flatten(1).norm(dim=1).view(-1, *[1] * (x.ndim - 1))
    r = torch.rand(x.shape[0], generator=generator, dtype=x.dtype).to(x.device).view_as(n)
    return d / n * eps * r


def _step(grad: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "Linf":
        return grad.sign()
    n = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (grad.ndim - 1))
    return grad / n


def pgd(loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float, steps: int,
        norm: str = "Linf", rand_init: bool = True, generator: torch.Generator | None = None,
        init: torch.Tensor | None = None) -> torch.Tensor:
    """Maximise `loss_fn(x + delta, y).sum()` over the eps-ball ∩ [0, 1]^d; returns x + delta (detached)."""
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    x = x.detach()
    if init is not None:
        delta = init.detach().clone()
    elif rand_init:
        delta = random_start(x, eps, norm, generator)
    else:
        delta = torch.zeros_like(x)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = loss_fn(x + delta, y).sum()
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = project(delta + step_size * _step(grad, norm), eps, norm)
            delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def ce_loss(model: torch.nn.Module) -> LossFn:
    return lambda xa, y: F.cross_entropy(model(xa), y, reduction="none")


def pgd_ce(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int,
           step_size: float | None = None, norm: str = "Linf", rand_init: bool = True,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """PGD-k on cross-entropy (Madry et al. 2018); default step 2.5·eps/k."""
    step_size = 2.5 * eps / steps if step_size is None else step_size
    return pgd(ce_loss(model), x, y, eps=eps, step_size=step_size, steps=steps, norm=norm,
               rand_init=rand_init, generator=generator)
