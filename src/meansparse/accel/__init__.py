"""The acceleration layer, optional: fused operator + activation (+ producer) kernels, a CPU allocator
setting, and the whole model under one torch.compile (the GPU's fast path).  Depends on
:mod:`meansparse.core` and :mod:`meansparse.placement`; nothing below imports it, and a model that is never
fused or compiled never touches it."""

from .allocator import tune_cpu_allocator
from .fused import FusedMeanSparse, FusedMeanSparseActivation, FusedMeanSparseOutput, fuse, fused_sites, unfuse
from .whole_model import whole_model_compiled

__all__ = ["FusedMeanSparse", "FusedMeanSparseActivation", "FusedMeanSparseOutput", "fuse", "fused_sites",
           "tune_cpu_allocator", "unfuse", "whole_model_compiled"]
