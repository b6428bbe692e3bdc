"""Fast by default: which path a job runs (eager operator, fused kernels, whole model compiled), decided
from what each costs and saves on the model's device.

Compiling takes time the first time (less with inductor's on-disk cache) and saves a fraction of every
forward and backward pass afterwards, so a compiled path is chosen when torch.compile works and the job's
estimated eager work is long enough to pay for compiling:

- CPU: meansparse's fused kernels from ``MIN_EAGER_SECONDS`` of eager work, a margin over the break-even
  ``benchmarks/bench_compile.py`` measures (docs/benchmarks.md, "Fast by default").  Outputs and gradients are
  bit-identical to the eager operator's, so the choice changes time, never a number.
- CUDA: the whole model under ``torch.compile(mode="reduce-overhead")`` (:mod:`.whole_model`) from
  ``MIN_EAGER_SECONDS_CUDA``: on a GPU it measured faster than the eager operator, and the per-site fused
  kernels slower (``benchmarks/gpu_round.sh``; docs/benchmarks.md, "GPU round for issue #14").  Numbers agree
  to float rounding.
- Other devices: eager (nothing measured there).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .._compile import compile_disabled_reason, compile_enabled
from .._utils import model_device
from ..core import operators
from .fused import fused_sites

__all__ = ["PATHS", "PathDecision", "decide_path", "MIN_EAGER_SECONDS", "MIN_EAGER_SECONDS_CUDA",
           "BACKWARD_FACTOR"]

#: The execution paths: the operator as written, the fused operator + activation kernels, the whole model under
#: one torch.compile (:mod:`.whole_model`).
PATHS = ("eager", "fused", "compiled")
_WORDS = {"eager": "eager operator", "fused": "fused", "compiled": "whole model compiled"}

#: Estimated eager work (seconds) from which compiling the fused kernels pays off: compile overhead divided by
#: the fraction of a step fusing saves, with a margin (a decision threshold: about three times the cold-cache
#: break-even measured by benchmarks/bench_compile.py, docs/benchmarks.md, "Fast by default").
MIN_EAGER_SECONDS = 60.0
#: The same on a CUDA device for compiling the whole model: above the break-even measured in the GPU round
#: (cold compile of the MeanSparse model over the share of eager time it saves; docs/benchmarks.md, "GPU round
#: for issue #14").
MIN_EAGER_SECONDS_CUDA = 120.0
#: A forward + backward pass costs about this many forward passes.
BACKWARD_FACTOR = 3.0


@dataclass(frozen=True)
class PathDecision:
    """Which execution path a job runs (one of :data:`PATHS`) and the one-line reason (what the report's
    metadata and the command line show)."""

    path: str
    reason: str
    estimated_eager_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {', '.join(map(repr, PATHS))}, got {self.path!r}")

    @property
    def description(self) -> str:
        """The path in words: "eager operator", "fused" or "whole model compiled"."""
        return _WORDS[self.path]

    def as_dict(self) -> dict:
        """What ``report.metadata["run"]["execution"]`` records."""
        return asdict(self) | {"description": self.description}

    def legacy_dict(self) -> dict:
        """The record's shape before the path was one value (``report.metadata["run"]["fuse"]``, the demo's
        ``summary["fuse"]``): kept so that readers of older reports keep working."""
        return {"fuse": self.path == "fused", "reason": self.reason,
                "estimated_eager_seconds": self.estimated_eager_seconds, "whole_model": self.path == "compiled",
                "path": self.description}


@torch.no_grad()
def _seconds_per_example(model: nn.Module, example: torch.Tensor) -> float:
    device = model_device(model) or torch.device("cpu")
    # CPU: a few examples (timing must stay negligible next to the job it sizes); a GPU: the whole batch,
    # since a few examples take as long as a batch there (launch-bound) and a batch takes milliseconds.
    x = example.to(device) if device.type == "cuda" else example[:16].to(device)
    model(x[:1])  # warm-up: allocations, lazy initialisation
    _sync(device)
    start = time.perf_counter()
    model(x)
    _sync(device)
    return (time.perf_counter() - start) / len(x)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decide_path(model: nn.Module, example: torch.Tensor, passes: float, other_passes: float = 0.0) -> PathDecision:
    """The path ``model`` should run for a job of ``passes`` forward + backward passes over single examples;
    ``example`` (a batch of inputs) is timed once, eagerly, to turn passes into seconds.  ``other_passes``:
    the rest of the job on this model (an α sweep, another evaluation): the fused kernels, compiled once per
    process, serve it too, so it counts on the CPU; the whole-model compile does not outlive one call."""
    ops = operators(model)
    if not ops:
        return PathDecision("eager", "the model has no MeanSparse operators")
    if fused_sites(model):
        return PathDecision("fused", "the model was already fused")
    device = model_device(model) or torch.device("cpu")
    if device.type not in ("cpu", "cuda"):
        return PathDecision("eager", f"on {device.type} no compiled path was measured; the eager operator")
    if not compile_enabled():
        reason = compile_disabled_reason() or "MEANSPARSE_COMPILE=0 or no torch.compile"
        return PathDecision("eager", f"torch.compile is not available here ({reason})")
    cuda = device.type == "cuda"
    seconds = (passes + (0.0 if cuda else other_passes)) * BACKWARD_FACTOR * _seconds_per_example(model, example)
    what = "the whole model (torch.compile, CUDA graphs)" if cuda else "the fused kernels"
    threshold = MIN_EAGER_SECONDS_CUDA if cuda else MIN_EAGER_SECONDS
    if seconds < threshold:
        return PathDecision("eager", f"a short job (about {seconds:.0f} s of eager work) does not pay for "
                                     f"compiling {what} (worth it from about {threshold:.0f} s)", seconds)
    return PathDecision("compiled" if cuda else "fused", f"about {seconds:.0f} s of eager work: compiling {what} "
                                                         "pays off", seconds)
