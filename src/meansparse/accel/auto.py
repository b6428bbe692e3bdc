"""Fast by default: whether a job should run the fused kernels, decided from what they cost and save.

Compiling the kernels a model needs takes seconds to a minute the first time (less with inductor's on-disk
cache), and fusing saves a fraction of every forward and backward pass afterwards.  So the fused path is
chosen when torch.compile works, the model runs on the CPU (on a GPU the eager operator measured faster,
docs/benchmarks.md) and the job's estimated eager work is long enough to pay for compiling:
``MIN_EAGER_SECONDS``, set from ``benchmarks/bench_compile.py`` (compile overhead / per-step saving, see
docs/benchmarks.md).  Outputs and gradients are bit-identical either way on the CPU, so the choice changes
time, never a number.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .._compile import compile_disabled_reason, compile_enabled
from .._utils import model_device
from ..core import operators

__all__ = ["FuseDecision", "fuse_decision", "MIN_EAGER_SECONDS", "BACKWARD_FACTOR"]

#: Estimated eager work (seconds) from which compiling the fused kernels pays off: compile overhead divided by
#: the fraction of a step fusing saves, with a margin (benchmarks/bench_compile.py, docs/benchmarks.md).
MIN_EAGER_SECONDS = 60.0
#: A forward + backward pass costs about this many forward passes.
BACKWARD_FACTOR = 3.0


@dataclass(frozen=True)
class FuseDecision:
    """Whether to fuse, and the one-line reason (what the report's metadata and the command line show)."""

    fuse: bool
    reason: str
    estimated_eager_seconds: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _already_fused(model: nn.Module) -> bool:
    return any(op.fused_activation is not None for op in operators(model))


@torch.no_grad()
def _seconds_per_example(model: nn.Module, example: torch.Tensor) -> float:
    device = model_device(model) or torch.device("cpu")
    x = example[:16].to(device)  # a few examples: timing must stay negligible next to the job it sizes
    model(x[:1])  # warm-up: allocations, lazy initialisation
    start = time.perf_counter()
    model(x)
    return (time.perf_counter() - start) / len(x)


def fuse_decision(model: nn.Module, example: torch.Tensor, passes: float) -> FuseDecision:
    """Whether ``model`` should run fused for a job of ``passes`` forward + backward passes over single
    examples; ``example`` (a batch of inputs) is timed once, eagerly, to turn passes into seconds."""
    ops = operators(model)
    if not ops:
        return FuseDecision(False, "the model has no MeanSparse operators")
    if _already_fused(model):
        return FuseDecision(True, "the model was already fused")
    device = model_device(model) or torch.device("cpu")
    if device.type != "cpu":
        return FuseDecision(False, f"on {device.type} the eager operator measured faster than the fused one")
    if not compile_enabled():
        reason = compile_disabled_reason() or "MEANSPARSE_COMPILE=0 or no torch.compile"
        return FuseDecision(False, f"torch.compile is not available here ({reason})")
    seconds = passes * BACKWARD_FACTOR * _seconds_per_example(model, example)
    if seconds < MIN_EAGER_SECONDS:
        return FuseDecision(False, f"a short job (about {seconds:.0f} s of eager work) does not pay for compiling "
                                   f"the fused kernels (worth it from about {MIN_EAGER_SECONDS:.0f} s)", seconds)
    return FuseDecision(True, f"about {seconds:.0f} s of eager work: compiling the fused kernels pays off", seconds)
