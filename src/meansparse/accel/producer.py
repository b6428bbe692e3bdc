"""Producer fusion: a fused site also computes the eval BatchNorm / residual add that produces its input.

Why.  A fused site whose activation stays ATen's own kernel (GELU, SiLU, ...: the split path of
:mod:`meansparse.accel.kernels`) costs one extra elementwise pass: the compiled sparsify kernel writes a tensor that
the activation reads again.  In a conv net the operator's input is itself made by an elementwise step, an
eval-mode BatchNorm (``x * a + b`` per channel) or the residual ``add``, so computing that step inside the
sparsify kernel removes the pass: the site then reads and writes no more memory than the base model's
BN + activation, and fused ReLU (one kernel for BN, band and ReLU) one pass less.

Exactness.  ATen's CPU eval BatchNorm takes ``a = (1 / sqrt(var + eps)) * w`` and ``b = bias - mean * a``
in the input's dtype and computes ``x * a + b``, both with fused multiply-adds (GCC contracts them); its
input gradient is ``(g * invstd) * w`` with ``invstd`` from a float64 square root.  The kernels here spell
the same arithmetic out (``prims.fma``).  That mirrors ATen internals, so every compiled kernel is checked
once per process at its first use: the whole fused site (forward, and under autograd both input gradients)
runs on a probe with odd sizes against the eager reference (``F.batch_norm``, add, operator, activation,
autograd); on any difference that key keeps the unfused producer for good (logged at WARNING).

Scope (fx-prepared models, at :func:`meansparse.fuse` time).  Absorbed: an ``nn.BatchNorm1d/2d/3d`` call
whose output only the site reads; an ``add`` of two tensors whose result only the site reads, with a
BatchNorm call directly feeding either side absorbed too; ``nn.Identity`` calls between that BatchNorm / add
and the site are looked through (and dropped).  Activations: ReLU and the split path.  Every call
re-checks what fx cannot know (BN in eval mode with running statistics, no hooks on the operator or the BN
modules, BN parameters not requiring grad under autograd, inputs of one shape, dtype and layout, big enough,
compilation on, operator calibrated with alpha > 0 and not observing); otherwise the absorbed modules run as
before and the site takes the plain fused path, so the values are the same either way.  This is a
hand-written pattern fuser because no library fuses into ``torch.autograd.Function``-based custom ops.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from .._compile import CompiledKernel, compile_enabled, is_compiling
from .._utils import same_versions, tensor_versions
from ..core import ATTACK_MODES, MeanSparse, StraightThrough, broadcast_channel, in_band, sparsify
from ..core.band import band_from_output, relu_grad_from_output
from ..placement.record import attach, attached
from ..placement.registry import IDENTITY_KERNEL, ActivationSpec, is_add, is_inplace_add
from .graph import private, through_identity
from .kernels import ACTIVATIONS, KernelLayout, act_eager, backward_inputs, compiled_layout, save_and_activate

__all__ = ["fused_site", "absorb_producer", "describe", "verdicts", "compiled_kernels", "separate_cache",
           "ProducerInfo", "SUPPORTED"]

log = logging.getLogger(__name__)

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: Activations whose fused site can take a producer: ReLU (one kernel), the split path, and no activation.
SUPPORTED = ("relu", "gelu", "silu", "elu", "mish", "hardswish", "hardtanh", IDENTITY_KERNEL)

#: A producer expression: ("x", i) input i; ("bn", j, ("x", i)) BatchNorm j of input i; ("add", a, b).
Struct = tuple


class ProducerInfo(NamedTuple):
    """What a producer kernel is specialised on."""

    struct: Struct
    kernel: str
    params: tuple
    mode: str  # the operator's gradient mode
    layout: KernelLayout


class BNTerms(NamedTuple):
    """An eval BatchNorm as ATen's CPU kernels compute it: ``x * a + b``; input gradient ``(g * invstd) * w``."""

    a: Tensor
    b: Tensor
    invstd: Tensor
    w: Tensor


# ================================================================================ expressions
def _fma(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    if is_compiling():
        return torch.ops.prims.fma(a, b, c)
    # eager stand-in, only reached when compilation fails on the first call (its result is then discarded)
    return (a.double() * b.double() + c.double()).to(c.dtype)


def _walk(s: Struct, leaves: tuple, bn: Callable[[int, Tensor], Tensor]) -> Tensor:
    """Evaluate the producer expression ``s`` on ``leaves``, applying BatchNorm ``j`` as ``bn(j, x)``."""
    if s[0] == "x":
        return leaves[s[1]]
    if s[0] == "bn":
        return bn(s[1], _walk(s[2], leaves, bn))
    return _walk(s[1], leaves, bn) + _walk(s[2], leaves, bn)


def _value(s: Struct, leaves: tuple, aff: tuple) -> Tensor:
    """Inside the kernels: BatchNorm ``j`` as ATen's fused multiply-add with its terms ``aff[2j:2j+2]``."""
    return _walk(s, leaves, lambda j, x: _fma(x, aff[2 * j], aff[2 * j + 1]))


def _leaf_bns(s: Struct, out: dict[int, int | None] | None = None, bn: int | None = None) -> dict[int, int | None]:
    """Input index -> index of the BatchNorm between it and the site (None: reached through adds only)."""
    out = {} if out is None else out
    if s[0] == "x":
        out[s[1]] = bn
    elif s[0] == "bn":
        _leaf_bns(s[2], out, s[1])
    else:
        _leaf_bns(s[1], out, bn)
        _leaf_bns(s[2], out, bn)
    return out


def _count(s: Struct) -> tuple[int, int]:
    paths = _leaf_bns(s)
    return len(paths), len({b for b in paths.values() if b is not None})


def describe(s: Struct) -> str:
    """``bn``, ``add``, ``bn+add``: what a site absorbed (for ``extra_repr``)."""
    kinds = []
    if any(b is not None for b in _leaf_bns(s).values()):
        kinds.append("bn")
    if s[0] == "add":
        kinds.append("add")
    return "+".join(kinds)


def _evaluate(s: Struct, bns: tuple, leaves: tuple) -> Tensor:
    """The absorbed producer as the original graph computed it (modules called as modules)."""
    return _walk(s, leaves, lambda j, x: bns[j](x))


def _reference(s: Struct, bns: tuple, leaves: tuple) -> Tensor:
    """Same values through ``F.batch_norm`` in eval mode (the probe's reference; no hooks, no stat updates)."""

    def bn(j: int, x: Tensor) -> Tensor:
        m = bns[j]
        return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    return _walk(s, leaves, bn)


# ================================================================================ kernels
def _make(s: Struct, name: str, params: tuple, role: str) -> Any:
    n_leaves, n_bn = _count(s)
    paths = _leaf_bns(s)
    act = ACTIVATIONS[name].forward if name else None

    def leaf_grads(gx: Tensor, scales: tuple) -> tuple:
        # eval BatchNorm backward as ATen computes it: (g * invstd) * w; through an add the gradient is g
        return tuple(gx if paths[i] is None else gx * scales[2 * paths[i]] * scales[2 * paths[i] + 1]
                     for i in range(n_leaves))

    if role == "sparsify":  # split path forward: the producer and the band in one pass

        def fn(*a: Tensor) -> Tensor:
            x = _value(s, a[:n_leaves], a[n_leaves:n_leaves + 2 * n_bn])
            return sparsify(x, a[-2], a[-1])

    elif role == "forward":  # in-kernel activation (ReLU): producer, band and activation in one pass

        def fn(*a: Tensor) -> Tensor:
            x = _value(s, a[:n_leaves], a[n_leaves:n_leaves + 2 * n_bn])
            return act(sparsify(x, a[-2], a[-1]), params, False)

    elif role in ("exact", "straight_through"):  # split path: (ATen act backward done), band mask + BN scales

        def fn(gy: Tensor, y: Tensor, m: Tensor, t: Tensor, *scales: Tensor) -> tuple:
            gx = torch.where(band_from_output(y, m, t), 0.0, gy) if role == "exact" else gy
            return leaf_grads(gx, scales)

    else:  # ReLU from its output z: zero where z <= 0 (threshold_backward) or in the band (exact mode)

        def fn(g: Tensor, z: Tensor, m: Tensor, t: Tensor, *scales: Tensor) -> tuple:
            return leaf_grads(relu_grad_from_output(g, z, m, t, role == "relu_exact"), scales)

    return fn


_KERNELS: dict[tuple, CompiledKernel] = {}


def _kernel(s: Struct, name: str, params: tuple, role: str, layout: KernelLayout) -> CompiledKernel:
    key = (s, name, params, role, tuple(layout))
    k = _KERNELS.get(key)
    if k is None:
        safe = "".join(ch if ch.isalnum() else "_" for ch in f"{role}_{name}_{len(_KERNELS)}")
        k = _KERNELS[key] = CompiledKernel(_make(s, name, params, role), f"meansparse_producer_{safe}")
    return k


# ================================================================================ BatchNorm terms
def _bn_terms(bn: nn.Module, x: Tensor) -> BNTerms:
    """The terms of an eval BatchNorm, as ATen's CPU kernels compute them, shaped to broadcast along dim 1 of
    ``x``.  Cached on the module until a statistic or parameter is replaced or modified."""
    params = tuple(p for p in (bn.weight, bn.bias) if p is not None)
    token = tensor_versions(bn.running_mean, bn.running_var, *params)
    if token is not None:
        token = token + ((float(bn.eps), 0), (len(params), bn.weight is None))
    cache = attached(bn, "bn_terms")
    key = (x.dtype, x.device, x.ndim)
    if cache is not None and same_versions(cache[0], token) and key in cache[1]:
        return cache[1][key]
    with torch.no_grad():
        rm, rv = bn.running_mean.detach(), bn.running_var.detach()
        w = bn.weight.detach() if bn.weight is not None else torch.ones_like(rv)
        b = bn.bias.detach() if bn.bias is not None else torch.zeros_like(rm)
        a, beta = _AFFINE(rm, rv + bn.eps, w, b)  # rv + eps in the dtype, as ATen's forward
        invstd = (1 / torch.sqrt(rv.double() + bn.eps)).to(rv.dtype)  # ATen's backward: a float64 sqrt
        out = BNTerms(*(broadcast_channel(v, x.ndim, 1).to(device=x.device) for v in (a, beta, invstd, w)))
    if token is not None:
        if cache is None or not same_versions(cache[0], token):
            cache = (token, {})
            attach(bn, "bn_terms", cache)
        cache[1][key] = out
    return out


def _affine(rm: Tensor, rv_eps: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    a = (1 / torch.sqrt(rv_eps)) * w
    return a, _fma(-rm, a, b)


_AFFINE = CompiledKernel(_affine, "meansparse_bn_affine")


# ================================================================================ autograd
class _ProducerFunction(torch.autograd.Function):
    """act(sparsify(producer(inputs))) under autograd; saves one tensor of the site's size (the sparsified
    value, or ReLU's output) and gives each input the gradient eager autograd would."""

    @staticmethod
    def forward(ctx, info: ProducerInfo, aff: tuple, scales: tuple, m: Tensor, t: Tensor,  # type: ignore[override]
                *leaves: Tensor) -> Tensor:
        ctx.info, ctx.scales = info, scales
        if info.kernel == "relu":
            out = _kernel(info.struct, info.kernel, info.params, "forward", info.layout)(*leaves, *aff, m, t)
            ctx.save_for_backward(out, m, t)
            return out
        y = _kernel(info.struct, "", (), "sparsify", info.layout)(*leaves, *aff, m, t)
        return save_and_activate(ctx, y, m, t, info.kernel, info.params)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):  # type: ignore[override]
        saved, m, t, g = backward_inputs(ctx, g)
        info: ProducerInfo = ctx.info
        if info.kernel == "relu":
            grads = _kernel(info.struct, info.kernel, info.params, f"relu_{info.mode}", info.layout)(
                g, saved, m, t, *ctx.scales)
        else:
            gy = ACTIVATIONS[info.kernel].backward(g, saved, info.params)  # the ATen op eager autograd runs
            grads = _kernel(info.struct, "", (), info.mode, info.layout)(gy, saved, m, t, *ctx.scales)
        return (None, None, None, None, None, *grads)


def _run(info: ProducerInfo, aff: tuple, scales: tuple, m: Tensor, t: Tensor, leaves: tuple, grad: bool) -> Tensor:
    if grad:
        return _ProducerFunction.apply(info, aff, scales, m, t, *leaves)
    if info.kernel == "relu":
        return _kernel(info.struct, info.kernel, info.params, "forward", info.layout)(*leaves, *aff, m, t)
    y = _kernel(info.struct, "", (), "sparsify", info.layout)(*leaves, *aff, m, t)
    return act_eager(y, ActivationSpec(info.kernel, info.params, False))


# ================================================================================ first-use check
_VERDICTS: dict[tuple, bool] = {}


def compiled_kernels() -> dict[tuple, bool]:
    """(producer, activation kernel, params, role, layout) -> whether that kernel has been compiled in this process."""
    return {key: k.compiled for key, k in _KERNELS.items()}


@contextmanager
def separate_cache() -> Iterator[None]:
    """Kernels made and checked inside the block are new ones, dropped after it (the process's are kept)."""
    saved = dict(_KERNELS), dict(_VERDICTS)
    _KERNELS.clear()
    _VERDICTS.clear()
    try:
        yield
    finally:
        _KERNELS.clear()
        _VERDICTS.clear()
        _KERNELS.update(saved[0])
        _VERDICTS.update(saved[1])


def verdicts() -> dict[tuple, bool]:
    """(producer info with mode None when checked without grad, dtype, device type) -> whether that kernel
    passed its first-use check in this process."""
    return dict(_VERDICTS)


def _probe_like(x: Tensor, cd: int, memory: str, gen: torch.Generator) -> Tensor:
    """Random tensor with ``x``'s channels, dtype, device and layout, and small odd sizes elsewhere (vector
    tails included)."""
    sizes = iter([37] if x.ndim == 2 else [3, 5, 7, 9, 11])
    shape = tuple(c if i == cd else next(sizes) for i, c in enumerate(x.shape))
    p = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2).to(dtype=x.dtype, device=x.device)
    return p.contiguous(memory_format=torch.channels_last) if memory == "channels_last" else p


def _verified(info: ProducerInfo, op: MeanSparse, bns: tuple, aff: tuple, scales: tuple, m: Tensor, t: Tensor,
              x: Tensor, grad: bool) -> bool:
    """Run the fused site on a probe against the eager reference, once per kernel key (see module doc)."""
    vkey = (info if grad else info._replace(mode=None), x.dtype, x.device.type)
    if vkey in _VERDICTS:
        return _VERDICTS[vkey]
    try:
        ok = _probe(info, bns, aff, scales, m, t, x, grad)
    except Exception as e:  # noqa: BLE001 - a probe that cannot run means "do not use this kernel"
        log.warning("meansparse: the fused %s producer probe at %s failed (%s: %s); that site keeps the "
                    "unfused producer", describe(info.struct), op.name, type(e).__name__, e)
        ok = None
    if ok is False:
        log.warning("meansparse: fused %s producer (%s) at %s differs from the eager reference on this torch "
                    "build; that site keeps the unfused producer", describe(info.struct), info.kernel, op.name)
    _VERDICTS[vkey] = bool(ok) and compile_enabled()
    return _VERDICTS[vkey]


def _probe(info: ProducerInfo, bns: tuple, aff: tuple, scales: tuple, m: Tensor, t: Tensor, x: Tensor,
           grad: bool) -> bool:
    gen = torch.Generator().manual_seed(0)
    cd = info.layout.channel_dim
    probe = [_probe_like(x, cd, info.layout.memory, gen).requires_grad_(grad) for _ in range(_count(info.struct)[0])]
    spec = ActivationSpec(info.kernel, info.params, False)
    # the operator's real centre, a threshold per channel that puts half the probe in the band
    with torch.enable_grad() if grad else torch.no_grad():
        xp = _reference(info.struct, bns, tuple(probe))
        d = (xp.detach() - m).abs().movedim(cd, 0).flatten(1).median(1).values
        tp = d.reshape(t.shape) if d.numel() == t.numel() else d.median().expand(t.shape)
        if info.mode == "straight_through" and grad:
            ref = act_eager(StraightThrough.apply(xp, m, tp), spec)
        elif grad:
            with torch.no_grad():
                inside = in_band(xp, m, tp)
            ref = act_eager(torch.where(inside, m, xp), spec)
        else:
            ref = act_eager(sparsify(xp, m, tp), spec)
        got = _run(info, aff, scales, m, tp, tuple(probe), grad)
        ok = torch.equal(ref, got)
        if ok and grad:
            gout = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(ref.dtype)
            want = torch.autograd.grad(ref, probe, gout.clone())
            have = torch.autograd.grad(got, probe, gout.clone())
            ok = all(torch.equal(a, b) for a, b in zip(want, have, strict=True))
    return ok


# ================================================================================ the fused site
def _global_hooks() -> bool:
    mod = torch.nn.modules.module
    return bool(getattr(mod, "_global_forward_hooks", None) or getattr(mod, "_global_forward_pre_hooks", None))


def _eligible(op: MeanSparse, spec: ActivationSpec, bns: tuple, leaves: tuple) -> str | None:
    """The memory format key when the compiled producer path applies to this call, else None."""
    if spec.kernel not in SUPPORTED or spec.write_back or not all(isinstance(v, Tensor) for v in leaves):
        return None
    if op._forward_hooks or op._forward_pre_hooks or _global_hooks():
        return None
    if not op.active or not op.calibrated or op.layout is None or op.gradient in ATTACK_MODES:
        return None
    x = leaves[0]
    memory = compiled_layout(x)
    cd = op.channel_dim(x.ndim)
    if memory is None or x.shape[cd] != op.channels or (bns and cd != 1):
        return None
    if any(v.shape != x.shape or v.dtype != x.dtype or v.device != x.device or v.stride() != x.stride()
           for v in leaves[1:]):
        return None
    for bn in bns:
        if (type(bn) not in _BN_TYPES or bn.training or bn.running_mean is None or bn.running_var is None
                or bn._forward_hooks or bn._forward_pre_hooks
                or bn.running_var.dtype != x.dtype or bn.running_var.device != x.device):
            return None
        if torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in (bn.weight, bn.bias)):
            return None
    return memory


def fused_site(op: MeanSparse, spec: ActivationSpec, s: Struct, bns: tuple, *leaves: Tensor) -> Tensor:
    """``activation(op(producer(*leaves)))``: what :func:`meansparse.fuse` puts in an fx graph where it
    absorbed the producer of a site's input."""
    if type(spec) is not ActivationSpec:
        spec = ActivationSpec(*spec)
    grad = torch.is_grad_enabled() and any(isinstance(v, Tensor) and v.requires_grad for v in leaves)
    memory = _eligible(op, spec, bns, leaves)
    if memory is not None:
        x = leaves[0]
        m, t = op.center_threshold_for(x)
        terms = [_bn_terms(bn, x) for bn in bns]
        aff = tuple(v for bt in terms for v in (bt.a, bt.b))
        scales = tuple(v for bt in terms for v in (bt.invstd, bt.w))
        info = ProducerInfo(s, spec.kernel, spec.params, op.gradient,
                            KernelLayout(memory, x.ndim, op.channel_dim(x.ndim)))
        if _verified(info, op, bns, aff, scales, m, t, x, grad):
            return _run(info, aff, scales, m, t, leaves, grad)
    return op(_evaluate(s, bns, leaves), activation=spec)


# ================================================================================ the fx pass
def _is_add(n: Any) -> bool:
    """A two-tensor add whose result may replace its operands: ``+``, or ``+=`` on a tensor nobody else reads."""
    if len(n.args) != 2 or n.kwargs or not all(isinstance(a, fx.Node) for a in n.args):
        return False
    if not is_add(n.op, n.target):
        return False
    return not is_inplace_add(n.op, n.target) or len(n.args[0].users) == 1


def _bn_node(n: Any, root: nn.Module) -> bool:
    if n.op != "call_module" or len(n.args) != 1 or n.kwargs or not isinstance(n.args[0], fx.Node):
        return False
    m = root.get_submodule(n.target)
    return type(m) in _BN_TYPES and not m._forward_hooks and not m._forward_pre_hooks


def absorb_producer(graph: Any, node: Any, root: nn.Module, spec: ActivationSpec) -> bool:
    """Rewrite the fused site ``node`` (``op(x, activation=spec)``) into ``fused_site(...)`` over the inputs
    of the BatchNorm / add that produced ``x``, when only the site reads it.  Returns whether it did."""
    op = root.get_submodule(node.target)
    if spec.kernel not in SUPPORTED or not isinstance(op, MeanSparse) or len(node.args) != 1:
        return False
    leaves: list = []
    bns: list = []
    absorbed: list = []

    def term(n: Any) -> Struct:
        if _bn_node(n, root) and len(n.users) == 1:
            absorbed.append(n)
            bns.append(n.target)
            leaves.append(n.args[0])
            return ("bn", len(bns) - 1, ("x", len(leaves) - 1))
        leaves.append(n)
        return ("x", len(leaves) - 1)

    src, passed = through_identity(node.args[0], root)
    if not isinstance(src, fx.Node) or len(src.users) != 1:
        return False
    if _is_add(src):
        absorbed.append(src)
        struct: Struct = ("add", term(src.args[0]), term(src.args[1]))
    elif _bn_node(src, root):
        struct = term(src)
    else:
        return False
    if len(set(leaves)) != len(leaves):
        return False
    if struct[0] == "add" and is_inplace_add(src.op, src.target) and not private(src.args[0], root):
        return False
    with graph.inserting_before(node):
        op_attr = graph.get_attr(node.target)
        bn_attrs = tuple(graph.get_attr(b) for b in bns)
        new = graph.call_function(fused_site, (op_attr, spec, struct, bn_attrs, *leaves))
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    for n in passed:  # the identity calls between the producer and the site, last first
        graph.erase_node(n)
    for n in absorbed:  # outermost first: each has no users left once the site is gone
        graph.erase_node(n)
    op.fused_producer = describe(struct)
    return True
