"""Fused operator + activation kernels: ``act(sparsify(x))`` in compiled code, bit-identical to eager.

The operator always sits directly before an activation, so the pair is one elementwise step.  Eagerly that is
4-5 kernels and as many full-size temporaries (``x - m``, its ``abs``, the bool mask, the sparsified tensor,
the activation).  Here a custom :class:`torch.autograd.Function` does it with ``torch.compile``d kernels:

* in-kernel activations (``IN_KERNEL``: ReLU, LeakyReLU, Softplus): forward ``act(sparsify(x))`` is one kernel
  that saves only ``x`` (ReLU: only its output, which the next layer saves anyway); backward is one kernel
  that recomputes the band from what was saved (``gradient="exact"``: zero in the band; ``"straight_through"``
  (BPDA): identity through the operator only), with the ATen backward op eager autograd uses
  (``threshold_backward``, ...).
* split activations (GELU, SiLU, ELU, Mish, Hardswish, Hardtanh / ReLU6): inductor's ``erf``/``exp`` differ
  from ATen's CPU kernels by a few ulps and its Hardswish gradient at NaN differs, so fusing the activation
  would be neither bit-identical nor faster.  The forward is a compiled sparsify kernel then ATen's own
  activation, saving only ``y`` (the activation would have saved its input anyway); the backward is ATen's
  activation backward at ``y``, then (exact mode) one compiled kernel zeroing the band, recognised from ``y``
  (:func:`~meansparse.core.band.band_from_output`).  Where fusing found the input private to the site (a
  Linear's output read by nothing else, :func:`owns_input`), ``y`` is written over it: no new full-size
  tensor, which with glibc's default allocator costs as much as the pass (page faults).
* registered activation classes (kernel ``"generic"``): the compiled sparsify kernel, then the module's own
  forward under autograd.

Exactness: every output and gradient element is bit-identical to the eager reference (operator, then
activation, through autograd), NaN/Inf/-0.0 included: the band test is the same IEEE arithmetic in both
(:mod:`meansparse.core.band`), compiled code reproduces ATen's ReLU-family kernels, and the transcendental
activations are ATen's.  Inputs that are small (< ``COMPILE_MIN_NUMEL`` elements), not float32/float64, not
contiguous (or channels-last), or seen while an outer ``torch.compile`` is tracing take the eager path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._compile import CompiledKernel, takes_compiled
from ..core import ATTACK_MODES, MeanSparse
from ..core.band import band_from_output, in_band, relu_grad_from_output, sparsify
from ..placement.record import attached
from ..placement.registry import GENERIC_KERNEL, IDENTITY_KERNEL, ActivationSpec

__all__ = ["ACTIVATIONS", "IN_KERNEL", "KernelLayout", "KernelInfo", "kernel", "compiled_layout", "like",
           "act_eager", "fused_forward", "owns_input", "compiled_kernels", "separate_cache", "save_and_activate",
           "backward_inputs"]


class KernelLayout(NamedTuple):
    """What one compiled graph is specialised on: memory format, rank and channel dim (not the sizes)."""

    memory: str  # "contiguous" or "channels_last"
    ndim: int
    channel_dim: int


class KernelInfo(NamedTuple):
    kernel: str
    params: tuple
    mode: str  # the operator's gradient mode
    layout: KernelLayout
    owns_input: bool = False  # the site's input is private to it: the split path may sparsify it in place


class ActivationMath(NamedTuple):
    """An activation kernel as eager code computes it: forward(x, params, inplace) and the ATen backward op
    eager autograd runs, backward(g, y, params)."""

    forward: Callable[[Tensor, tuple, bool], Tensor]
    backward: Callable[[Tensor, Tensor, tuple], Tensor]


def _p(params: tuple, i: int, default):
    return params[i] if len(params) > i else default


ACTIVATIONS: dict[str, ActivationMath] = {
    "relu": ActivationMath(
        lambda x, p, inplace: F.relu(x, inplace=inplace),
        lambda g, y, p: torch.ops.aten.threshold_backward(g, torch.relu(y), 0),
    ),
    "leaky_relu": ActivationMath(
        lambda x, p, inplace: F.leaky_relu(x, _p(p, 0, 0.01), inplace=inplace),
        lambda g, y, p: torch.ops.aten.leaky_relu_backward(g, y, _p(p, 0, 0.01), False),
    ),
    "gelu": ActivationMath(
        lambda x, p, inplace: F.gelu(x, approximate=_p(p, 0, "none")),
        lambda g, y, p: torch.ops.aten.gelu_backward(g, y, approximate=_p(p, 0, "none")),
    ),
    "silu": ActivationMath(
        lambda x, p, inplace: F.silu(x, inplace=inplace),
        lambda g, y, p: torch.ops.aten.silu_backward(g, y),
    ),
    "elu": ActivationMath(
        lambda x, p, inplace: F.elu(x, _p(p, 0, 1.0), inplace=inplace),
        lambda g, y, p: torch.ops.aten.elu_backward(g, _p(p, 0, 1.0), 1, 1, False, y),
    ),
    "softplus": ActivationMath(
        lambda x, p, inplace: F.softplus(x, _p(p, 0, 1.0), _p(p, 1, 20.0)),
        lambda g, y, p: torch.ops.aten.softplus_backward(g, y, _p(p, 0, 1.0), _p(p, 1, 20.0)),
    ),
    "mish": ActivationMath(
        lambda x, p, inplace: F.mish(x, inplace=inplace),
        lambda g, y, p: torch.ops.aten.mish_backward(g, y),
    ),
    "hardswish": ActivationMath(
        lambda x, p, inplace: F.hardswish(x, inplace=inplace),
        lambda g, y, p: torch.ops.aten.hardswish_backward(g, y),
    ),
    "hardtanh": ActivationMath(  # ReLU6 is hardtanh(0, 6)
        lambda x, p, inplace: F.hardtanh(x, _p(p, 0, -1.0), _p(p, 1, 1.0), inplace=inplace),
        lambda g, y, p: torch.ops.aten.hardtanh_backward(g, y, _p(p, 0, -1.0), _p(p, 1, 1.0)),
    ),
    # sites with no activation after them (residual adds, module outputs): the operator alone, compiled
    IDENTITY_KERNEL: ActivationMath(lambda x, p, inplace: x, lambda g, y, p: g),
}
#: Activations computed inside the compiled kernels (compiled code reproduces ATen's CPU kernels bit for bit).
IN_KERNEL = ("relu", "leaky_relu", "softplus")


def act_eager(x: Tensor, spec: ActivationSpec, module: nn.Module | None = None) -> Tensor:
    """The activation exactly as the original model calls it (in place when the spec writes back); kernel
    ``"generic"`` calls ``module``."""
    if spec.kernel == GENERIC_KERNEL:
        return module(x)  # type: ignore[misc]
    return ACTIVATIONS[spec.kernel].forward(x, spec.params, spec.write_back)


# ================================================================================ kernels
def _sparsify_kernel(x: Tensor, m: Tensor, t: Tensor) -> Tensor:
    return sparsify(x, m, t)


def _sparsify_in_place_kernel(x: Tensor, m: Tensor, t: Tensor) -> Tensor:
    return x.copy_(sparsify(x, m, t))


def _band_mask_kernel(gy: Tensor, y: Tensor, m: Tensor, t: Tensor) -> Tensor:
    # same zeros, same passed-through values as eager's where-backward
    return torch.where(band_from_output(y, m, t), 0.0, gy)


def _band_mask_in_place_kernel(gy: Tensor, y: Tensor, m: Tensor, t: Tensor) -> Tensor:
    return gy.copy_(torch.where(band_from_output(y, m, t), 0.0, gy))


def _make_kernels(name: str, params: tuple) -> dict[str, Callable]:
    if not name:  # the split path's activation-independent kernels
        return {"sparsify": _sparsify_kernel, "sparsify_in_place": _sparsify_in_place_kernel,
                "band_mask": _band_mask_kernel, "band_mask_in_place": _band_mask_in_place_kernel}
    act = ACTIVATIONS[name]

    def forward(x: Tensor, m: Tensor, t: Tensor) -> Tensor:
        return act.forward(sparsify(x, m, t), params, False)

    def backward_exact(g: Tensor, x: Tensor, m: Tensor, t: Tensor) -> Tensor:
        inside = in_band(x, m, t)
        return torch.where(inside, 0.0, act.backward(g, torch.where(inside, m, x), params))

    def backward_straight_through(g: Tensor, x: Tensor, m: Tensor, t: Tensor) -> Tensor:
        return act.backward(g, sparsify(x, m, t), params)

    kernels = {"forward": forward, "exact": backward_exact, "straight_through": backward_straight_through}
    if name == "relu":  # ReLU's backward from its output: saving z instead of x costs no memory
        kernels.update(exact_from_output=lambda g, z, m, t: relu_grad_from_output(g, z, m, t, True),
                       straight_through_from_output=lambda g, z, m, t: relu_grad_from_output(g, z, m, t, False))
    return kernels


_KERNELS: dict[tuple, CompiledKernel] = {}


def kernel(name: str, params: tuple, role: str, layout: KernelLayout | tuple) -> CompiledKernel:
    """The cached kernel for (activation kernel ``name``, role, layout).  Roles: forward / exact /
    straight_through, and for ReLU exact_from_output / straight_through_from_output; name "" holds sparsify /
    band_mask and their in-place variants.  One compiled graph per key serves every size."""
    key = (name, params, role, tuple(layout))
    k = _KERNELS.get(key)
    if k is None:
        safe = "".join(ch if ch.isalnum() else "_" for ch in f"{name}_{params}_{role}_{tuple(layout)}")
        k = CompiledKernel(_make_kernels(name, params)[role], f"meansparse_{safe}")
        _KERNELS[key] = k
    return k


def compiled_kernels() -> dict[tuple, bool]:
    """(activation kernel, params, role, layout) -> whether that kernel has been compiled in this process."""
    return {key: k.compiled for key, k in _KERNELS.items()}


@contextmanager
def separate_cache() -> Iterator[None]:
    """Kernels made inside the block are new ones, dropped after it (the process's cache is untouched)."""
    saved = dict(_KERNELS)
    _KERNELS.clear()
    try:
        yield
    finally:
        _KERNELS.clear()
        _KERNELS.update(saved)


def _memory_format(x: Tensor) -> str | None:
    """``"contiguous"`` / ``"channels_last"`` when ``x`` is laid out so one compiled graph serves it, else None."""
    if x.is_contiguous():
        return "contiguous"
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return None


def compiled_layout(x: Tensor) -> str | None:
    """The memory format key when ``x`` takes the compiled kernels now: compilation on and not inside an outer
    ``torch.compile``, float32/float64, at least ``COMPILE_MIN_NUMEL`` elements; else None (eager reference)."""
    return _memory_format(x) if takes_compiled(x) else None


def like(g: Tensor, memory: str) -> Tensor:
    """``g`` in the memory format the kernels were specialised on."""
    if memory == "channels_last":
        return g.contiguous(memory_format=torch.channels_last)
    return g.contiguous()


def save_and_activate(ctx, y: Tensor, m: Tensor, t: Tensor, name: str, params: tuple) -> Tensor:
    """The split path's forward tail: keep the sparsified ``y`` (and the [C] vectors) for the backward, then
    run ATen's activation on it (which would have saved ``y`` anyway)."""
    ctx.save_for_backward(y, m, t)
    return ACTIVATIONS[name].forward(y, params, False)


def backward_inputs(ctx, g: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(saved tensor, centre, threshold, ``g`` in the memory format the kernels were specialised on)."""
    saved, m, t = ctx.saved_tensors
    return saved, m, t, like(g, ctx.info.layout.memory)


class _FusedFunction(torch.autograd.Function):
    """act(sparsify(x)) under autograd, saving one tensor of x's size and the [C] vectors.

    In-kernel activations: one compiled kernel each way; saves x, or for ReLU its output.  Split activations:
    compiled sparsify, ATen activation; saves the sparsified y, backward = ATen's activation backward at y,
    then the compiled band mask (exact mode only).  Tensors go to the kernels in their own shape, so the
    gradient is a plain tensor, not a view: autograd can accumulate into it in place."""

    @staticmethod
    def forward(ctx, x: Tensor, m: Tensor, t: Tensor, info: KernelInfo) -> Tensor:  # type: ignore[override]
        ctx.info = info
        if info.kernel in IN_KERNEL:
            out = kernel(info.kernel, info.params, "forward", info.layout)(x, m, t)
            ctx.save_for_backward(out if info.kernel == "relu" else x, m, t)
            return out
        if info.owns_input:
            y = kernel("", (), "sparsify_in_place", info.layout)(x, m, t)
            if info.kernel == IDENTITY_KERNEL:  # the output is the input, overwritten: autograd must know
                ctx.mark_dirty(x)
        else:
            y = kernel("", (), "sparsify", info.layout)(x, m, t)
        return save_and_activate(ctx, y, m, t, info.kernel, info.params)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):  # type: ignore[override]
        saved, m, t, g = backward_inputs(ctx, g)
        info: KernelInfo = ctx.info
        if info.kernel in IN_KERNEL:
            role = f"{info.mode}_from_output" if info.kernel == "relu" else info.mode
            return kernel(info.kernel, info.params, role, info.layout)(g, saved, m, t), None, None, None
        gy = ACTIVATIONS[info.kernel].backward(g, saved, info.params)  # the ATen op eager autograd runs
        if info.mode == "exact":  # in place over the activation's fresh gradient, not over g (the identity's)
            role = "band_mask" if gy.data_ptr() == g.data_ptr() else "band_mask_in_place"
            gy = kernel("", (), role, info.layout)(gy, saved, m, t)
        return gy, None, None, None


class _SparsifyFunction(torch.autograd.Function):
    """sparsify(x) under autograd with the compiled kernels (the activation after it runs under autograd
    itself): saves y; backward zeros the band (exact mode) or is the identity (straight-through)."""

    @staticmethod
    def forward(ctx, x: Tensor, m: Tensor, t: Tensor, mode: str, layout: KernelLayout) -> Tensor:  # type: ignore[override]
        y = kernel("", (), "sparsify", layout)(x, m, t)
        ctx.mode, ctx.layout = mode, layout
        ctx.save_for_backward(y, m, t)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):  # type: ignore[override]
        if ctx.mode != "exact":
            return g, None, None, None, None
        y, m, t = ctx.saved_tensors
        return kernel("", (), "band_mask", ctx.layout)(like(g, ctx.layout.memory), y, m, t), None, None, None, None


def owns_input(op: MeanSparse) -> bool:
    """Whether fusing found the site's input tensor private to it (freshly made, read by the site alone): the
    split path then writes the sparsified values over it instead of into a new tensor, saving a full-size
    allocation (on the CPU, with glibc's default allocator, as costly as the pass itself); the identity kernel
    returns the overwritten input, marked dirty for autograd."""
    return bool(attached(op, "owns_input"))


def fused_forward(op: MeanSparse, x: Tensor, spec: ActivationSpec) -> Tensor:
    """``activation(op(x))``, fused: what a :class:`~meansparse.accel.fused.FusedMeanSparse` computes."""
    if op.layout is None or op.channels is None:
        op.see(x)
    module = attached(op, "activation_module") if spec.kernel == GENERIC_KERNEL else None
    if op.observing:
        op.observe(x)
        return act_eager(x, spec, module)
    if op.alpha_value == 0.0:
        return act_eager(x, spec, module)
    op.check_ready(x)
    grad = torch.is_grad_enabled() and x.requires_grad
    if spec.write_back and grad:  # in-place semantics under autograd: exactly the unfused computation
        return act_eager(op.apply_band(x, in_place=True), spec, module)
    # an attack's surrogate (ATTACK_MODES) always takes the eager reference, never a compiled kernel
    memory = None if op.gradient in ATTACK_MODES else compiled_layout(x)
    plain = ActivationSpec(spec.kernel, spec.params, False)
    if memory is None:  # eager: the reference computation
        out = act_eager(op.apply_band(x, in_place=False), plain, module)
    else:
        m, t = op.center_threshold_for(x)
        layout = KernelLayout(memory, x.ndim, op.channel_dim(x.ndim))
        if spec.kernel == GENERIC_KERNEL:
            y = _SparsifyFunction.apply(x, m, t, op.gradient, layout) if grad else \
                kernel("", (), "sparsify", layout)(x, m, t)
            out = act_eager(y, plain, module)
        elif grad:
            out = _FusedFunction.apply(x, m, t, KernelInfo(spec.kernel, spec.params, op.gradient, layout,
                                                           owns_input(op)))
        elif spec.kernel in IN_KERNEL:
            out = kernel(spec.kernel, spec.params, "forward", layout)(x, m, t)
        else:
            role = "sparsify_in_place" if owns_input(op) else "sparsify"
            out = act_eager(kernel("", (), role, layout)(x, m, t), plain)
    if spec.write_back:
        return x.copy_(out)
    return out
