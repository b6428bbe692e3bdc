"""The acceleration layer, optional: fused operator + activation (+ producer) kernels and a CPU allocator
setting.  Depends on :mod:`meansparse.core` and :mod:`meansparse.placement`; nothing below imports it, and a
model that is never fused never touches it."""

from .allocator import tune_cpu_allocator
from .fused import FusedMeanSparse, FusedMeanSparseActivation, FusedMeanSparseOutput, fuse, fused_sites, unfuse

__all__ = ["FusedMeanSparse", "FusedMeanSparseActivation", "FusedMeanSparseOutput", "fuse", "fused_sites",
           "tune_cpu_allocator", "unfuse"]
