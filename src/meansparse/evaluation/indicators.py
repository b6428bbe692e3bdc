"""Attack-failure indicators (Pintor et al., "Indicators of Attack Failure", NeurIPS 2022), adapted.

They run on a small probe set (the first ``n`` clean-correct examples) after the evaluation and ask whether
the attacks could have failed in one of the known ways.  The probe attack is hand-written (it must log every
iterate): sign-gradient ascent on the logit margin, through the surrogate gradient on a MeanSparse model, its
values always the real model's.  Each indicator is one line with its value and a verdict; thresholds are
stated in the detail and in docs/evaluation.md.

- silent success: the probe's path crossed the decision boundary for examples the worst case counts robust;
- incomplete optimisation: the probe's loss still rose over its last stage (the smallest steps);
- transfer failure: candidates that fool the base model but not the model itself;
- unconstrained attack: with ε covering the whole box, robust accuracy must reach 0;
- non-converging restarts: two restarts disagree about whether an example breaks;
- unavailable gradients: zero input-gradient coordinates, and units blocked in the operators' bands.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core import operators
from ..pgd import pgd
from ..placement import gradient_mode
from .attacks import SuccessTracker, margin_loss, zero_alphas

__all__ = ["INDICATOR_PROBE_N", "Indicator", "attack_failure_indicators"]

#: examples the indicators probe (the first clean-correct ones)
INDICATOR_PROBE_N = 64
_STEPS = 50
_SHARPNESS = 2.0
#: thresholds (shares of the probe set) above which an indicator fails
INCOMPLETE_SHARE = 0.10
RESTART_SHARE = 0.10
TRANSFER_SHARE = 0.50
ZERO_GRAD_SHARE = 0.50
BAND_SHARE = 0.05


@dataclass
class Indicator:
    """One indicator: its name, value in words, verdict ("pass", "FAIL" or "n/a") and what it means."""

    name: str
    value: str
    verdict: str
    detail: str

    @property
    def failed(self) -> bool:
        return self.verdict == "FAIL"


class ProbeRun(NamedTuple):
    """One probe restart: per step (rows) and example (columns) the real margin and whether it was fooled;
    whether the last iterate is fooled; per example the first fooling iterate (else the last)."""

    margins: torch.Tensor
    fooled: torch.Tensor
    final_fooled: torch.Tensor
    candidates: torch.Tensor


def _gradient_context(model: nn.Module) -> Any:
    return gradient_mode(model, "surrogate", _SHARPNESS) if operators(model) else contextlib.nullcontext()


def probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str, steps: int = _STEPS,
          seed: int = 0) -> ProbeRun:
    """Sign-gradient ascent on the margin from a random start, logging every iterate on the real model."""
    margins, fooled = [], []
    tracker = SuccessTracker(x)

    def loss_fn(xa: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        logits = model(xa)
        tracker.update(xa, logits, yy)
        m = margin_loss(logits, yy)
        margins.append(m.detach())
        fooled.append((logits.argmax(1) != yy).detach())
        return m

    # five equal stages with halving step sizes (eps/4 ... eps/64): the last stage only refines, so a margin
    # still rising there is optimisation left undone, not a fixed step bouncing around the optimum
    gen = torch.Generator().manual_seed(seed)
    stage = max(1, steps // 5)
    final = x
    with _gradient_context(model):
        for k in range(5):
            init = None if k == 0 else final - x
            final = pgd(loss_fn, x, y, eps=eps, step_size=eps / 4 / 2 ** k, steps=stage, norm=norm,
                        generator=gen, init=init)
    with torch.no_grad():
        final_fooled = model(final).argmax(1) != y
    return ProbeRun(torch.stack(margins).cpu(), torch.stack(fooled).cpu(), final_fooled.cpu(),
                    tracker.merge(model, final, y))


def _share(v: float) -> str:
    return f"{100 * v:.1f} %"


def _silent(runs: list[ProbeRun], counted_robust: torch.Tensor) -> Indicator:
    crossed = torch.stack([r.fooled.any(0) for r in runs]).any(0)
    ended = torch.stack([r.final_fooled for r in runs]).any(0)
    missed, back = int((crossed & counted_robust).sum()), int((crossed & ~ended).sum())
    return Indicator("silent success", f"{missed} of {len(crossed)}", "FAIL" if missed else "pass",
                     f"probe iterates crossed the boundary for {int(crossed.sum())} examples ({back} of them ending "
                     "on the correct side); fails if the worst case counts any of them robust")


def _incomplete(runs: list[ProbeRun]) -> Indicator:
    tail = max(1, len(runs[0].margins) // 5)  # the last stage
    rising = []
    for r in runs:
        best_before = r.margins[:-tail].amax(0)
        best_after = r.margins.amax(0)
        spread = (r.margins.amax(0) - r.margins.amin(0)).clamp_min(1e-12)
        rising.append(((best_after - best_before) / spread > 0.01) & ~r.fooled.any(0))
    share = float(torch.stack(rising).any(0).float().mean())
    return Indicator("incomplete optimisation", _share(share), "FAIL" if share > INCOMPLETE_SHARE else "pass",
                     f"probe examples (not broken) whose best margin still rose by > 1 % of its range over the last "
                     f"{tail} steps; fails above {_share(INCOMPLETE_SHARE)}")


def _restarts(runs: list[ProbeRun]) -> Indicator:
    broke = torch.stack([r.fooled.any(0) for r in runs])
    share = float((broke.any(0) & ~broke.all(0)).float().mean())
    return Indicator("non-converging restarts", _share(share), "FAIL" if share > RESTART_SHARE else "pass",
                     f"examples that one of {len(runs)} probe restarts breaks and another does not; fails above "
                     f"{_share(RESTART_SHARE)} (more restarts or steps would change the result)")


def _unconstrained(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, seed: int) -> Indicator:
    big = 1.0 if norm == "Linf" else math.sqrt(x[0].numel())
    run = probe(model, x, y, eps=big, norm=norm, steps=20, seed=seed)
    left = float((~run.fooled.any(0)).float().mean())
    return Indicator("unconstrained attack", f"{_share(left)} robust", "FAIL" if left > 0 else "pass",
                     f"the probe with ε = {big:g} ({norm}, the whole box) must reach 0 % robust accuracy")


def _transfer(model: nn.Module, base: nn.Module | None, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str,
              seed: int) -> Indicator:
    if base is None and not operators(model):
        return Indicator("transfer failure", "-", "n/a", "no base model and no MeanSparse operators: nothing "
                         "to transfer from")
    with contextlib.nullcontext(base) if base is not None else zero_alphas(model) as source:
        run = probe(source, x, y, eps=eps, norm=norm, steps=20, seed=seed)
    with torch.no_grad():
        on_target = (model(run.candidates).argmax(1) != y).cpu()
    src = run.fooled.any(0)
    share = float((src & ~on_target).sum()) / max(int(src.sum()), 1)
    return Indicator("transfer failure", _share(share), "FAIL" if share > TRANSFER_SHARE else "pass",
                     f"of {int(src.sum())} candidates that fool the base model, the share that does not fool the "
                     f"model itself; fails above {_share(TRANSFER_SHARE)} (transfer alone would then say little)")


def _gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[Indicator]:
    ops = operators(model)
    masked, total = [0], [0]

    def count(op: nn.Module, args: tuple) -> None:
        z = args[0].detach()
        masked[0] += int(op.band_mask(z).sum())
        total[0] += z.numel()

    handles = [op.register_forward_pre_hook(count) for op in ops if op.active]
    xg = x.clone().requires_grad_(True)
    try:
        (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    finally:
        for h in handles:
            h.remove()
    zero = float((g == 0).float().mean())
    dead = int((g.flatten(1) == 0).all(1).sum())
    out = [Indicator("unavailable gradients", f"{_share(zero)} zero coordinates, {dead} all-zero examples",
                     "FAIL" if dead or zero > ZERO_GRAD_SHARE else "pass",
                     f"exact input gradient of the cross-entropy on the probe set; fails if any example's is all "
                     f"zero or more than {_share(ZERO_GRAD_SHARE)} of the coordinates are")]
    if ops:
        share = masked[0] / max(total[0], 1)
        out.append(Indicator("band-masked units", _share(share), "FAIL" if share > BAND_SHARE else "pass",
                             f"operator inputs inside the band on clean probe inputs, where the exact gradient is "
                             f"zero; above {_share(BAND_SHARE)} plain gradient attacks are unreliable and only the "
                             "masking-proof attacks (BPDA, surrogate, transfer, Square) count"))
    return out


def attack_failure_indicators(model: nn.Module, x: torch.Tensor, y: torch.Tensor, counted_robust: torch.Tensor, *,
                              eps: float, norm: str, base_model: nn.Module | None = None,
                              seed: int = 0) -> list[dict[str, Any]]:
    """The indicators on probe examples ``x, y`` (clean-correct), whose worst-case verdicts are
    ``counted_robust`` (bool, CPU); one dict per indicator."""
    if len(x) == 0:
        return [asdict(Indicator("indicators", "-", "n/a", "no clean-correct example to probe"))]
    runs = [probe(model, x, y, eps=eps, norm=norm, seed=seed + r) for r in range(2)]
    found = [_silent(runs, counted_robust), _incomplete(runs), _transfer(model, base_model, x, y, eps, norm, seed),
             _unconstrained(model, x, y, norm, seed), _restarts(runs), *_gradients(model, x, y)]
    return [asdict(i) for i in found]
