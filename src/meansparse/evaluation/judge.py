"""Running one attack on one batch and judging its candidates on the real model.

A candidate breaks an example only if it lies inside the threat model (norm ball, [0, 1] box, finite) and
the plain model misclassifies it, so no attack or wrapper can inflate a success rate.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import torch
from torch import nn

from .attacks import Attack
from .hashing import derive_seed
from .messages import library_messages

__all__ = ["Verdict", "BatchRun", "attack_batch", "check_finite", "judge", "rng_devices"]

_LINF_TOL = 1e-6
_L2_REL_TOL = 1e-5
_BOX_TOL = 1e-6


class Verdict(NamedTuple):
    """Per example: still robust (not broken by a valid candidate), and whether the candidate was invalid."""

    robust: torch.Tensor
    invalid: torch.Tensor


def judge(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, norm: str,
          eps: float) -> Verdict:
    """Which candidates ``x_adv`` break their example: inside the threat model and misclassified by the
    plain model."""
    if x_adv.shape != x.shape:
        raise RuntimeError(f"attack returned shape {tuple(x_adv.shape)} for inputs {tuple(x.shape)}")
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
    bound = eps + _LINF_TOL if norm == "Linf" else eps * (1 + _L2_REL_TOL) + _LINF_TOL
    flat = x_adv.flatten(1)
    valid = ((size <= bound) & torch.isfinite(flat).all(1) & (flat.amin(1) >= -_BOX_TOL)
             & (flat.amax(1) <= 1 + _BOX_TOL))
    with torch.no_grad():
        logits = model(x_adv)
    check_finite(logits[valid], "adversarial candidates inside the threat model")
    wrong = logits.argmax(1) != y
    return Verdict(robust=~(valid & wrong), invalid=~valid)


class BatchRun(NamedTuple):
    """One attacked batch: its JSON record (what the state stores) and the candidates that broke an example
    (CPU, in the record's order of broken examples)."""

    record: dict[str, Any]
    breaking: torch.Tensor


def check_finite(logits: torch.Tensor, where: str) -> None:
    """Non-finite logits make every accuracy meaningless (argmax of NaN is arbitrary): a ValueError."""
    bad = ~torch.isfinite(logits).all(1)
    if bool(bad.any()):
        raise ValueError(f"the model returns non-finite logits (NaN/Inf) for {int(bad.sum())} of {len(logits)} "
                         f"inputs ({where}): its weights (or statistics) are corrupted; no accuracy can be measured")


def rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose RNG state an attack on ``device`` may draw from (to fork and restore)."""
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


def attack_batch(attack: Attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: list[int], b: int,
                 seed: int, device: torch.device, norm: str, eps: float) -> BatchRun:
    """Run ``attack`` on the batch ``x, y`` of examples ``idx`` (``x[i]`` is example ``idx[i]``, as the
    evaluation's example source fetched it; batch ``b``, seeded from ``derive_seed``) and judge the result.

    The record is plain JSON (it is what the evaluation state stores): the indices, per-example robustness,
    the number of invalid candidates, the library messages and the time taken. The caller's RNG is left alone.
    """
    t0 = time.perf_counter()
    batch_messages: dict[str, int] = {}
    if len(x) != len(idx) or len(y) != len(idx):
        raise ValueError(f"batch {b}: {len(x)} images and {len(y)} labels for {len(idx)} indices")
    xb, yb = x.to(device), y.to(device)
    bseed = derive_seed(int(seed), attack.seed_key, b)
    with torch.random.fork_rng(devices=rng_devices(device)), library_messages(batch_messages):
        torch.manual_seed(bseed)
        x_adv = attack.run(model, xb, yb, seed=bseed)
    x_adv = x_adv.to(device)
    verdict = judge(model, xb, x_adv, yb, norm, eps)
    record = {"indices": idx, "robust": [int(v) for v in verdict.robust.cpu()], "invalid": int(verdict.invalid.sum()),
              "messages": batch_messages, "seconds": time.perf_counter() - t0}
    return BatchRun(record, x_adv[~verdict.robust].detach().cpu())
