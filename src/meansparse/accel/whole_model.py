"""The whole model under one ``torch.compile`` (CUDA graphs on a GPU): the path that measured fastest on a GPU.

On a GPU meansparse's per-site fused kernels cost more host time per call than the GPU spends on a layer, so
they ran slower than the eager operator, while the whole MeanSparse model compiled with
``mode="reduce-overhead"`` (the operators trace without graph breaks) ran faster than both (docs/benchmarks.md,
"GPU round for issue #14"; ``benchmarks/gpu_round.sh`` measures it).  Outputs agree with the eager model to
float rounding, not bit for bit; a feature within rounding of a band edge can land on the other side, so a
gradient can differ where it does.  On the CPU the fused kernels stay the fast path: they are bit-identical.

The compiled forward is installed on the module itself (an instance ``forward``), so the model keeps its
state dict, its hash (reports and resume files) and its operators; :func:`whole_model_compiled` takes it off
again on exit.
"""

from __future__ import annotations

import contextlib
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .._utils import frozen_parameters

__all__ = ["whole_model_compiled", "MODE", "RECOMPILE_LIMIT"]

#: CUDA graphs: the launch overhead of a few hundred small kernels per pass is what a GPU pays most here.
MODE = "reduce-overhead"
#: Graphs one evaluation may compile: no-grad and gradient passes, each gradient mode, transfer's α = 0 and
#: the batch sizes an attack meets add up to more than torch's default of 8, past which dynamo silently runs
#: the rest eagerly.
RECOMPILE_LIMIT = 64


def _owned(out: Any) -> Any:
    """Copies of the outputs: a CUDA graph's output buffers are overwritten by its next replay, and attacks
    keep logits across calls (a copy of the logits costs next to nothing)."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_owned(o) for o in out)
    return out


def _recompile_limit() -> contextlib.AbstractContextManager:
    config = torch._dynamo.config  # no public knob for it
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    return config.patch({name: max(RECOMPILE_LIMIT, getattr(config, name))})


@contextmanager
def whole_model_compiled(model: nn.Module, mode: str = MODE) -> Iterator[nn.Module]:
    """``model`` itself, running ``torch.compile(model.forward, mode=mode)`` inside the block (compiled on
    first call, recompiled per new input shape or operator setting), and its own forward again after it.

    The block is for evaluation: parameters are frozen in it (``requires_grad=False``, restored after), so
    that passes with and without frozen parameters share their graphs.  If compiling fails (no Triton, an
    unsupported op), a RuntimeWarning says so and the model runs eagerly for the rest of the block; an error
    the eager model raises too is raised as it is."""
    own = vars(model)
    had, previous = "forward" in own, own.get("forward")
    eager = model.forward
    compiled = torch.compile(eager, mode=mode)
    failed: list[str] = []

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self is not model:  # a deep copy made inside the block runs its own (class) forward
            return type(self).forward(self, *args, **kwargs)
        if failed:
            return eager(*args, **kwargs)
        try:
            return _owned(compiled(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - the eager forward decides whose error it was
            out = eager(*args, **kwargs)  # the model's own error, if it has one, is raised here
            failed.append(f"{type(e).__name__}: {e}")
            warnings.warn(f"meansparse: torch.compile of the whole model failed ({failed[0][:300]}); the rest of "
                          "this run uses the eager model", RuntimeWarning, stacklevel=2)
            return out

    model.forward = types.MethodType(forward, model)  # deepcopy rebinds a method to the copy
    try:
        with frozen_parameters(model), _recompile_limit():
            yield model
    finally:
        if had:
            model.forward = previous
        else:
            del model.forward
