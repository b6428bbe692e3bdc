"""Fast by default: which path a job runs (eager operator, fused kernels, whole model compiled), decided
from what each costs and saves on the model's device.

Compiling takes seconds to a minute the first time (less with inductor's on-disk cache) and saves a fraction
of every forward and backward pass afterwards, so a compiled path is chosen when torch.compile works and the
job's estimated eager work is long enough to pay for compiling:

- CPU: meansparse's fused kernels from ``MIN_EAGER_SECONDS`` of eager work (``benchmarks/bench_compile.py``:
  3x the measured break-even).  Outputs and gradients are bit-identical to the eager operator's, so the choice
  changes time, never a number.
- CUDA: the whole model under ``torch.compile(mode="reduce-overhead")`` (:mod:`.whole_model`) from
  ``MIN_EAGER_SECONDS_CUDA``: on an H200 it ran APGD-CE at 0.43x the eager operator's time while the fused
  kernels took 1.85x (``benchmarks/gpu_round.sh``, docs/benchmarks.md).  Numbers agree to float rounding.
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

__all__ = ["FuseDecision", "fuse_decision", "MIN_EAGER_SECONDS", "MIN_EAGER_SECONDS_CUDA", "BACKWARD_FACTOR"]

#: Estimated eager work (seconds) from which compiling the fused kernels pays off: compile overhead divided by
#: the fraction of a step fusing saves, with a margin (benchmarks/bench_compile.py, docs/benchmarks.md).
MIN_EAGER_SECONDS = 60.0
#: The same on a CUDA device for compiling the whole model: the measured break-even (cold compile of the
#: MeanSparse model 40-54 s / saving 0.48-0.62 of the eager time, ResNet-18 and DM-WRN-28-10 on an H200) is
#: 65-112 s of eager work.
MIN_EAGER_SECONDS_CUDA = 120.0
#: A forward + backward pass costs about this many forward passes.
BACKWARD_FACTOR = 3.0


@dataclass(frozen=True)
class FuseDecision:
    """Whether to fuse (or compile the whole model), and the one-line reason (what the report's metadata and
    the command line show)."""

    fuse: bool
    reason: str
    estimated_eager_seconds: float | None = None
    whole_model: bool = False  # torch.compile of the whole model (accel.whole_model) instead of fusing

    @property
    def path(self) -> str:
        """The path in words: "fused", "whole model compiled" or "eager operator"."""
        return "whole model compiled" if self.whole_model else "fused" if self.fuse else "eager operator"

    def as_dict(self) -> dict:
        return asdict(self) | {"path": self.path}


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


def fuse_decision(model: nn.Module, example: torch.Tensor, passes: float) -> FuseDecision:
    """Whether ``model`` should run fused for a job of ``passes`` forward + backward passes over single
    examples; ``example`` (a batch of inputs) is timed once, eagerly, to turn passes into seconds."""
    ops = operators(model)
    if not ops:
        return FuseDecision(False, "the model has no MeanSparse operators")
    if fused_sites(model):
        return FuseDecision(True, "the model was already fused")
    device = model_device(model) or torch.device("cpu")
    if device.type not in ("cpu", "cuda"):
        return FuseDecision(False, f"on {device.type} no compiled path was measured; the eager operator")
    if not compile_enabled():
        reason = compile_disabled_reason() or "MEANSPARSE_COMPILE=0 or no torch.compile"
        return FuseDecision(False, f"torch.compile is not available here ({reason})")
    seconds = passes * BACKWARD_FACTOR * _seconds_per_example(model, example)
    cuda = device.type == "cuda"
    what = "the whole model (torch.compile, CUDA graphs)" if cuda else "the fused kernels"
    threshold = MIN_EAGER_SECONDS_CUDA if cuda else MIN_EAGER_SECONDS
    if seconds < threshold:
        return FuseDecision(False, f"a short job (about {seconds:.0f} s of eager work) does not pay for compiling "
                                   f"{what} (worth it from about {threshold:.0f} s)", seconds)
    return FuseDecision(not cuda, f"about {seconds:.0f} s of eager work: compiling {what} pays off", seconds,
                        whole_model=cuda)
