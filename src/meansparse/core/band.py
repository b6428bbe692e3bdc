"""The band arithmetic, written once: which elements lie in the band and what the operator makes of them.

``in_band(x, m, t)`` is ``|x - m| < t`` (strict), ``sparsify`` replaces those elements by ``m``.  The eager
operator, the compiled fused kernels (:mod:`meansparse.accel`) and the adaptive attack all call these, so
every path computes the same IEEE operations (``x - m``, ``abs``, ``<``) and stays bit-identical.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._compile import CompiledKernel, takes_compiled

__all__ = ["in_band", "sparsify", "sparsify_lean", "band_from_output", "relu_grad_from_output",
           "StraightThrough", "SurrogateGradient", "soft_sparsify", "soft_gate", "surrogate_backward",
           "surrogate_backward_eager",
           "SURROGATE_U_MAX"]


def _below(d: Tensor, t: Tensor) -> Tensor:
    """``|d| < t`` for a difference ``d`` that the caller owns (its buffer is reused for the absolute value)."""
    return d.abs_() < t


def in_band(x: Tensor, m: Tensor, t: Tensor) -> Tensor:
    """``|x - m| < t``: the positions the operator replaces (``m``, ``t`` broadcastable against ``x``)."""
    return _below(x - m, t)


def sparsify(x: Tensor, m: Tensor, t: Tensor) -> Tensor:
    """``m`` where ``|x - m| < t`` else ``x``; ``m``/``t`` already broadcastable and of ``x.dtype``."""
    return torch.where(in_band(x, m, t), m, x)


def sparsify_lean(x: Tensor, m: Tensor, t: Tensor, in_place: bool) -> Tensor:
    """:func:`sparsify` with one full-size temporary (no autograd): the ``x - m`` buffer holds ``abs`` and
    then the result, or the result is written into ``x`` itself when ``in_place``."""
    d = x - m
    inside = _below(d, t)
    return torch.where(inside, m, x, out=x if in_place else d)


def band_from_output(y: Tensor, m: Tensor, t: Tensor) -> Tensor:
    """The band recovered from the operator's output ``y = sparsify(x, m, t)``: ``y == m`` with ``t > 0``.

    Outside the band ``|x - m| >= t > 0``, so ``x != m``; NaN never compares equal.  Lets a backward pass
    keep ``y`` instead of ``x``."""
    return (y == m) & (t > 0)


def relu_grad_from_output(g: Tensor, z: Tensor, m: Tensor, t: Tensor, exact: bool) -> Tensor:
    """Input gradient of ``relu(sparsify(x))`` from its output ``z`` (the next layer saves ``z`` anyway).

    ``z <= 0`` gives ReLU's zero gradient (``threshold_backward``'s own test); in exact mode an element in the
    band also gets zero: ``z == m`` with ``m > 0`` and ``t > 0`` (in the band with ``m <= 0``, ``z = 0``).
    Every element is ``g`` or ``+0.0`` by the same rule as eager autograd, so the result is bit-identical."""
    zero = z <= 0
    if exact:
        zero = zero | ((z == m) & (m > 0) & (t > 0))
    return torch.where(zero, 0.0, g)


def _compiling_pays(x: Tensor) -> bool:
    return x.is_contiguous() and takes_compiled(x)


_SPARSIFY_KERNEL = CompiledKernel(lambda x, m, t: sparsify(x, m, t), "meansparse_attack_sparsify")


def _sparsify_for_attack(x: Tensor, m: Tensor, t: Tensor) -> Tensor:
    """:func:`sparsify` for the attack gradient modes' forward, one compiled kernel where that pays (the same
    IEEE operations, so bit-identical; about 15 % of a surrogate-gradient pass saved on a CIFAR ResNet)."""
    if _compiling_pays(x) and m.dtype == t.dtype == x.dtype:
        return _SPARSIFY_KERNEL(x, m, t)
    return sparsify(x, m, t)


class StraightThrough(torch.autograd.Function):
    """Same forward as :func:`sparsify`; backward is the identity (BPDA-style gradient)."""

    @staticmethod
    def forward(x: Tensor, m: Tensor, t: Tensor) -> Tensor:  # type: ignore[override]
        return _sparsify_for_attack(x, m, t)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # nothing to save: the gradient is the identity
        pass

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad, None, None


# ------------------------------------------------------------------------------------------- attack surrogates
# The hard band has zero gradient inside and the identity outside; attacks need something in between.  The
# surrogate written here is the soft threshold  s(x) = x - d * exp(-(|d| / t) ** k),  d = x - m: at d = 0 it
# returns m (the band's centre), far outside the band it returns x, and k (the sharpness) sets how close it
# is to the hard band (k -> inf is the operator itself).  Its derivative is  1 - e * (1 - k * u)  with
# u = (|d| / t) ** k and e = exp(-u).  Hand-written: no library knows this operator.
#: u = (|x − m| / t)^k is clamped here before the derivative ``1 − e^(−u)·(1 − k·u)``: from u = 50 on it
#: rounds to exactly 1 in float32 and float64 for any k < 1e12 (e^(−50)·k·u is far below half an ulp of 1),
#: so the clamp changes no finite value; it keeps ``exp`` off the denormal range (about 3x faster on the CPU)
#: and turns the overflow u = inf (|x − m| / t past (3.4e38)^(1/k): k = 8 and a channel of tiny σ, or k = 64
#: at four thresholds) into the derivative 1 instead of 0·(−inf) = NaN, which spread through the backward
#: pass to every pixel of the example and silently stopped the attack.  In the smooth model's forward
#: (:func:`soft_sparsify`) it moves ``x − d·e`` by at most ``|d|·e^(−50) ≈ |d|·2e−22``.
SURROGATE_U_MAX = 50.0


def soft_gate(d: Tensor, t: Tensor, k: float) -> tuple[Tensor, Tensor]:
    """(u, e) of the soft threshold for differences ``d`` and thresholds ``t`` (``t == 0``: no band, e = 0).
    u is clamped at :data:`SURROGATE_U_MAX` (see there): unclamped it overflows to inf for a tiny threshold or
    a large k, and the smooth model's backward then gave 0·inf = NaN."""
    safe_t = torch.where(t > 0, t, torch.ones_like(t))
    r = d.abs() / safe_t
    with torch.no_grad():
        big = r.pow(k) > SURROGATE_U_MAX
    # r ** k where it stays below the clamp; elsewhere the clamp's value, and pow sees 1 so that its backward
    # (k·r^(k−1), multiplied by the zero gradient there) stays finite: clamping after pow still gave 0·inf
    u = torch.where(big, SURROGATE_U_MAX, torch.where(big, 1.0, r).pow(k))
    e = torch.where(t > 0, torch.exp(-u), torch.zeros_like(u))
    return u, e


def soft_sparsify(x: Tensor, m: Tensor, t: Tensor, k: float) -> Tensor:
    """The smooth stand-in for :func:`sparsify` (differentiable everywhere): ``x - (x - m) * exp(-(|x-m|/t)**k)``."""
    d = x - m
    _, e = soft_gate(d, t, k)
    return x - d * e


class SurrogateGradient(torch.autograd.Function):
    """Same forward as :func:`sparsify`; backward is the derivative of :func:`soft_sparsify` (sharpness k).

    The forward stays the real operator, so every value an attack sees is the real model's; only the
    direction it follows comes from the soft threshold (BPDA with a better approximation than the identity)."""

    @staticmethod
    def forward(x: Tensor, m: Tensor, t: Tensor, k: float) -> Tensor:  # type: ignore[override]
        return _sparsify_for_attack(x, m, t)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, m, t, k = inputs
        ctx.save_for_backward(x, m, t)
        ctx.k = k

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, m, t = ctx.saved_tensors
        return surrogate_backward(grad, x, m, t, ctx.k), None, None, None


def surrogate_backward(grad: Tensor, x: Tensor, m: Tensor, t: Tensor, k: float) -> Tensor:
    """``grad`` times the derivative of :func:`soft_sparsify`, ``1 − e·(1 − k·u)``: one compiled kernel where
    compiling pays (:func:`surrogate_backward_eager` elsewhere).  The compiled kernel's ``exp``/``pow`` may
    differ from ATen's by a few ulps (an attack's direction, never a judged value), the clamp is the same."""
    if _compiling_pays(grad) and x.dtype == grad.dtype and x.is_contiguous():
        k_t = torch.full((), float(k), dtype=x.dtype, device=x.device)  # a tensor: a float would be lifted (below)
        return _surrogate_kernel(k)(grad, x, m.to(x.dtype), t.to(x.dtype), k_t)
    return surrogate_backward_eager(grad, x, m, t, k)


def _power(v: Tensor, k: Tensor, n: int) -> Tensor:
    """``v ** k``; for a whole ``k = n`` (the default sharpness values) by squaring, 3-4x cheaper than pow."""
    if n <= 0:
        return v.pow(k)
    out, base = None, v
    while n:
        if n & 1:
            out = base if out is None else out * base
        n >>= 1
        if n:
            base = base * base
    return out


def _surrogate_kernel(k: float) -> CompiledKernel:
    """The compiled backward for sharpness ``k``: one kernel per whole k up to 64 (its power unrolled), one
    generic kernel otherwise.  ``k`` enters as a 0-d tensor: torch 2.13 lifts a Python float (argument or
    closure) into a dynamic scalar, and after a recompile for another value ``pow`` kept the first value's
    exponent (silently wrong derivatives; pytorch/pytorch#194976; tests/test_surrogate.py checks the values)."""
    n = int(k) if float(k).is_integer() and 1 <= k <= 64 else 0
    if n not in _SURROGATE_KERNELS:
        def math(grad: Tensor, x: Tensor, m: Tensor, t: Tensor, k: Tensor) -> Tensor:  # eager's, not in place
            band = t > 0
            u = _power((x - m).abs() / torch.where(band, t, torch.ones_like(t)), k, n).clamp(max=SURROGATE_U_MAX)
            e = torch.where(band, torch.exp(-u), torch.zeros_like(u))
            return (1.0 - e * (1.0 - k * u)) * grad

        _SURROGATE_KERNELS[n] = CompiledKernel(math, f"meansparse_surrogate_backward_{n or 'k'}")
    return _SURROGATE_KERNELS[n]


_SURROGATE_KERNELS: dict[int, CompiledKernel] = {}


def surrogate_backward_eager(grad: Tensor, x: Tensor, m: Tensor, t: Tensor, k: float) -> Tensor:
    """:func:`surrogate_backward` in ATen kernels, with the same arithmetic as :func:`soft_gate` (the same
    rounding), in place on two buffers."""
    band = t > 0
    u = (x - m).abs_().div_(torch.where(band, t, torch.ones_like(t))).pow_(k).clamp_(max=SURROGATE_U_MAX)
    e = u.neg().exp_().masked_fill_(~band, 0.0)  # t = 0: no band, the identity
    return e.mul_(u.mul_(-k).add_(1.0)).neg_().add_(1.0).mul_(grad)
