"""Fused MeanSparse + activation: compiled kernels that save one tensor, bit-identical to eager.

The operator always sits directly before an activation, so the pair ``act(where(|x - m| < t, m, x))`` is one
elementwise step.  Eagerly that is 4-5 kernels and as many full-size temporaries (``x - m``, its ``abs``, the
bool mask, the sparsified tensor, the activation), which cost 8-37 % of a ResNet-18 forward on CPU.  Here a
custom :class:`torch.autograd.Function` does it with ``torch.compile``d kernels, two ways:

* in-kernel activations (``IN_KERNEL``: ReLU, LeakyReLU, Softplus): forward
  ``act(where(|x - m| < t, m, x))`` is one kernel that saves only ``x`` (ReLU: only its output, which the
  next layer saves anyway); backward is one kernel that recomputes the band from what was saved:

  - ``gradient="exact"``: ``dL/dx = act'(y) * g * (1 - band)`` where ``y`` is the sparsified value,
  - ``gradient="straight_through"`` (BPDA: identity through the operator only): ``dL/dx = act'(y) * g``;

  the derivative is written with the ATen backward op eager autograd uses (``threshold_backward``, ...).
* split activations (GELU, SiLU, ELU, Mish, Hardswish): inductor's ``erf``/``exp`` differ from ATen's CPU
  kernels by a few ulps (eager GELU even runs oneDNN's ``erf``, which is also ~1.8x faster than inductor's)
  and its Hardswish gradient at NaN differs, so fusing the activation would be neither bit-identical nor
  faster.  The forward is a compiled sparsify kernel then
  ATen's own activation, saving only ``y`` (the activation would have saved its input anyway); the backward
  is ATen's activation backward at ``y``, then (exact mode) one compiled kernel zeroing the band, recognised
  as ``y == m`` with ``t > 0``.

Exactness: every output and gradient element is bit-identical to the eager reference (operator, then
activation, through autograd), NaN/Inf/-0.0 included (``tests/test_fused.py``): the band test (``x - m``,
``abs``, ``<``) is exact IEEE arithmetic in both, compiled code reproduces ATen's ReLU-family kernels, and the
transcendental activations are ATen's.

Fallbacks.  Compiled kernels are cached per (activation, role, layout) and reused for every shape
(``dynamic=True``).  Where ``torch.compile`` is unavailable or fails (no C++ compiler, unsupported platform)
the first failure is logged once at DEBUG level and every call from then on runs the eager reference
(operator then activation: bit-identical, with the eager operator's cost).  ``MEANSPARSE_COMPILE=0``
disables compilation.  Inputs that are small (< ``COMPILE_MIN_NUMEL`` elements), not float32/float64, not
contiguous (or channels-last), or seen while an outer ``torch.compile`` is tracing also take the eager path.

Producers (:mod:`meansparse.fused_producer`, fx graphs, on by default): where the site's input comes from
an eval-mode BatchNorm and/or a residual add that nothing else reads, the kernel computes those too (ATen's
arithmetic, checked against it at first use), which removes the split path's extra pass and one of ReLU's.

Use: ``meansparse.fuse(model)`` after ``prepare`` (opt-in; ``unfuse`` undoes it).  With ``method="fx"`` the
graph is re-traced and each operator node whose only user is a supported activation becomes one call
``meansparse.k(x, activation=spec)``; with ``method="modules"`` each :class:`MeanSparseActivation` becomes a
:class:`FusedMeanSparseActivation`.  ``ms.operators(model)``, statistics, alpha, calibration, save/load and
the gradient modes work unchanged.  Forward *hooks* on a fused operator see the activation's output.
"""

from __future__ import annotations

import inspect
import logging
import operator as _op
import os
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .insertion import MeanSparseActivation, _fx_class, _FxPrepared, _record, operators
from .operator import MeanSparse

__all__ = [
    "fuse",
    "unfuse",
    "fused_sites",
    "FusedMeanSparseActivation",
    "compile_enabled",
    "ENV_VAR",
    "COMPILE_MIN_NUMEL",
    "activation_spec",
]

log = logging.getLogger(__name__)

ENV_VAR = "MEANSPARSE_COMPILE"
#: Inputs with fewer elements run eagerly: compiling for them costs seconds and saves microseconds.
COMPILE_MIN_NUMEL = 1 << 15
_COMPILED_DTYPES = (torch.float32, torch.float64)
_disabled_reason: str | None = None

#: An activation as fx can print it: (kind, parameters, write_back).  ``write_back`` means the activation
#: was in-place and later code may read the input tensor, so the result is copied back into it.
Spec = tuple[str, tuple, bool]


# ================================================================================ compilation with fallback
def compile_enabled() -> bool:
    """Whether compiled kernels are used: torch.compile exists, ``MEANSPARSE_COMPILE`` is not 0, and no
    compilation has failed in this process."""
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return _disabled_reason is None and hasattr(torch, "compile")


def compile_disabled_reason() -> str | None:
    """Why compilation was turned off after a failure (None while it works)."""
    return _disabled_reason


def _disable(reason: str) -> None:
    global _disabled_reason
    if _disabled_reason is None:
        _disabled_reason = reason
        log.debug("meansparse: torch.compile unavailable, using eager kernels from now on (%s)", reason)


def _is_compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # pragma: no cover - torch < 2.3
        return False


class CompiledKernel:
    """``fn`` compiled with ``torch.compile(dynamic=True, fullgraph=True)`` on first use, eager on failure.

    Each kernel gets its own code object, hence its own dynamo cache: kernels never evict each other and
    one compiled graph serves every shape of a site.  A failing compilation is retried eagerly; only if the
    eager call succeeds is compilation switched off for the process (so user errors are raised as usual).
    """

    def __init__(self, fn: Callable, name: str) -> None:
        self.eager = fn
        names = {"co_name": name, "co_qualname": name} if hasattr(fn.__code__, "co_qualname") else {"co_name": name}
        code = fn.__code__.replace(**names)
        self._fn = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
        self._compiled: Callable | None = None
        self.name = name

    def __call__(self, *args: Any) -> Any:
        if compile_enabled():
            try:
                if self._compiled is None:
                    self._compiled = torch.compile(self._fn, dynamic=True, fullgraph=True)
                return self._compiled(*args)
            except Exception as e:  # noqa: BLE001 - any compiler/backend failure means "use eager"
                out = self.eager(*args)  # raises the user's error if the problem is not the compiler
                _disable(f"{self.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                return out
        return self.eager(*args)


# ================================================================================ activations
def _p(params: tuple, i: int, default: Any) -> Any:
    return params[i] if len(params) > i else default


# kind -> (eager forward(x, params, inplace), backward(g, y, params) with eager autograd's ATen op)
_ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    "relu": (
        lambda x, p, inplace: F.relu(x, inplace=inplace),
        lambda g, y, p: torch.ops.aten.threshold_backward(g, torch.relu(y), 0),
    ),
    "leaky_relu": (
        lambda x, p, inplace: F.leaky_relu(x, _p(p, 0, 0.01), inplace=inplace),
        lambda g, y, p: torch.ops.aten.leaky_relu_backward(g, y, _p(p, 0, 0.01), False),
    ),
    "gelu": (
        lambda x, p, inplace: F.gelu(x, approximate=_p(p, 0, "none")),
        lambda g, y, p: torch.ops.aten.gelu_backward(g, y, approximate=_p(p, 0, "none")),
    ),
    "silu": (
        lambda x, p, inplace: F.silu(x, inplace=inplace),
        lambda g, y, p: torch.ops.aten.silu_backward(g, y),
    ),
    "elu": (
        lambda x, p, inplace: F.elu(x, _p(p, 0, 1.0), inplace=inplace),
        lambda g, y, p: torch.ops.aten.elu_backward(g, _p(p, 0, 1.0), 1, 1, False, y),
    ),
    "softplus": (
        lambda x, p, inplace: F.softplus(x, _p(p, 0, 1.0), _p(p, 1, 20.0)),
        lambda g, y, p: torch.ops.aten.softplus_backward(g, y, _p(p, 0, 1.0), _p(p, 1, 20.0)),
    ),
    "mish": (
        lambda x, p, inplace: F.mish(x, inplace=inplace),
        lambda g, y, p: torch.ops.aten.mish_backward(g, y),
    ),
    "hardswish": (
        lambda x, p, inplace: F.hardswish(x, inplace=inplace),
        lambda g, y, p: torch.ops.aten.hardswish_backward(g, y),
    ),
}
#: Activations computed inside the compiled kernels (compiled code reproduces ATen's CPU kernels bit for bit).
#: The others (GELU, SiLU, ELU, Mish, Hardswish) run the split path: a compiled sparsify kernel, then ATen's own
#: activation and activation-backward kernels, then a compiled band-mask kernel.
IN_KERNEL = ("relu", "leaky_relu", "softplus")


def act_eager(x: Tensor, spec: Spec) -> Tensor:
    """The activation exactly as the original model calls it (in place when the spec writes back)."""
    kind, params, write_back = spec
    return _ACTIVATIONS[kind][0](x, params, write_back)


def _module_spec(m: nn.Module) -> Spec | None:
    if m._forward_hooks or m._forward_pre_hooks:  # hooks would be skipped by a fused call
        return None
    t = type(m)
    inplace = bool(getattr(m, "inplace", False))
    if t is nn.ReLU:
        return ("relu", (), inplace)
    if t is nn.LeakyReLU:
        return ("leaky_relu", (float(m.negative_slope),), inplace)
    if t is nn.GELU:
        return ("gelu", (str(m.approximate),), False)
    if t is nn.SiLU:
        return ("silu", (), inplace)
    if t is nn.ELU:
        return ("elu", (float(m.alpha),), inplace)
    if t is nn.Softplus:
        return ("softplus", (float(m.beta), float(m.threshold)), False)
    if t is nn.Mish:
        return ("mish", (), inplace)
    if t is nn.Hardswish:
        return ("hardswish", (), inplace)
    return None


def activation_spec(activation: nn.Module) -> Spec | None:
    """The fusable description of an activation module, or None (unsupported type, hooks, subclass)."""
    return _module_spec(activation)


# function -> (kind, parameter names with defaults, in place by itself)
_FUNCTION_KINDS: dict[Any, tuple[str, tuple[tuple[str, Any], ...], bool]] = {
    F.relu: ("relu", (), False),
    torch.relu: ("relu", (), False),
    torch.relu_: ("relu", (), True),
    F.relu_: ("relu", (), True),
    F.leaky_relu: ("leaky_relu", (("negative_slope", 0.01),), False),
    F.leaky_relu_: ("leaky_relu", (("negative_slope", 0.01),), True),
    F.gelu: ("gelu", (("approximate", "none"),), False),
    F.silu: ("silu", (), False),
    F.elu: ("elu", (("alpha", 1.0),), False),
    F.elu_: ("elu", (("alpha", 1.0),), True),
    F.softplus: ("softplus", (("beta", 1.0), ("threshold", 20.0)), False),
    F.mish: ("mish", (), False),
    F.hardswish: ("hardswish", (), False),
}
_METHOD_KINDS = {"relu": ("relu", False), "relu_": ("relu", True)}


def _bind(fn: Callable, names: tuple[tuple[str, Any], ...], args: tuple, kwargs: dict) -> dict | None:
    """Arguments after the input, by name; None if they cannot be read reliably."""
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)
    except (TypeError, ValueError):  # C builtins: positional then keyword, by our table
        out: dict[str, Any] = {}
        rest = list(args[1:])
        for name, default in names:
            out[name] = rest.pop(0) if rest else kwargs.pop(name, default) if name in kwargs else default
        extra = set(kwargs) - {n for n, _ in names} - {"input", "self"}
        if rest or extra:
            return None
        return out


def _node_spec(act: Any, src: Any, root: nn.Module) -> Spec | None:
    """Spec of fx node ``act`` if it applies a supported activation to ``src`` with constant arguments."""
    import torch.fx as fx

    args, kwargs = tuple(act.args), dict(act.kwargs)
    if not args or args[0] is not src or any(isinstance(a, fx.Node) for a in list(args[1:]) + list(kwargs.values())):
        return None
    if act.op == "call_module":
        if len(args) != 1 or kwargs:
            return None
        return _module_spec(root.get_submodule(act.target))
    if act.op == "call_method":
        if act.target not in _METHOD_KINDS or len(args) != 1 or kwargs:
            return None
        kind, inplace = _METHOD_KINDS[act.target]
        return (kind, (), inplace)
    if act.op == "call_function" and act.target in _FUNCTION_KINDS:
        kind, names, inplace = _FUNCTION_KINDS[act.target]
        bound = _bind(act.target, names, args, kwargs)
        if bound is None:
            return None
        inplace = inplace or bool(bound.get("inplace", False))
        params = []
        for name, _ in names:
            v = bound.get(name)
            if not isinstance(v, (int, float, str)) or isinstance(v, bool):
                return None
            params.append(float(v) if not isinstance(v, str) else v)
        return (kind, tuple(params), inplace)
    return None


# ================================================================================ kernels
def _sparsify_kernel(x: Tensor, m: Tensor, t: Tensor) -> Tensor:
    return torch.where((x - m).abs() < t, m, x)


def _band_mask_kernel(gy: Tensor, y: Tensor, m: Tensor, t: Tensor) -> Tensor:
    # y = where(band, m, x): an element is in the band iff y == m and t > 0 (outside it |x - m| >= t > 0, so
    # x != m; NaN never compares equal).  Same zeros, same passed-through values as eager's where-backward.
    return torch.where((y == m) & (t > 0), 0.0, gy)


def _make_kernels(kind: str, params: tuple) -> dict[str, Callable]:
    if not kind:  # the split path's activation-independent kernels
        return {"sparsify": _sparsify_kernel, "band_mask": _band_mask_kernel}
    fwd_act, bwd_act = _ACTIVATIONS[kind]

    def forward(x: Tensor, m: Tensor, t: Tensor) -> Tensor:
        return fwd_act(torch.where((x - m).abs() < t, m, x), params, False)

    def backward_exact(g: Tensor, x: Tensor, m: Tensor, t: Tensor) -> Tensor:
        inside = (x - m).abs() < t
        return torch.where(inside, 0.0, bwd_act(g, torch.where(inside, m, x), params))

    def backward_straight_through(g: Tensor, x: Tensor, m: Tensor, t: Tensor) -> Tensor:
        return bwd_act(g, torch.where((x - m).abs() < t, m, x), params)

    kernels = {"forward": forward, "exact": backward_exact, "straight_through": backward_straight_through}
    if kind == "relu":
        kernels.update(exact_from_output=_relu_exact_from_output, straight_through_from_output=_relu_st_from_output)
    return kernels


# ReLU's backward needs one bit per element, and the output z = relu(where(band, m, x)) already holds it:
# z <= 0 gives ReLU's zero gradient (threshold_backward's own test), and an element is in the band iff
# z == m with m > 0 and t > 0 (outside the band |x - m| >= t > 0, so x != m; in the band with m <= 0, z = 0).
# Saving z instead of x costs no memory: the next layer saves the same tensor.  Bit-identical to eager:
# every gradient element is either g or +0.0 by the same rule.
def _relu_exact_from_output(g: Tensor, z: Tensor, m: Tensor, t: Tensor) -> Tensor:
    return torch.where(((z == m) & (m > 0) & (t > 0)) | (z <= 0), 0.0, g)


def _relu_st_from_output(g: Tensor, z: Tensor, m: Tensor, t: Tensor) -> Tensor:
    return torch.where(z <= 0, 0.0, g)


_KERNELS: dict[tuple, CompiledKernel] = {}


def kernel(kind: str, params: tuple, role: str, layout: tuple) -> CompiledKernel:
    """The cached kernel for (activation, role, layout).  Roles: forward / exact / straight_through, and for
    ReLU exact_from_output / straight_through_from_output; layout: (memory format, ndim, channel dim).  One
    compiled graph per key serves every size."""
    key = (kind, params, role, layout)
    k = _KERNELS.get(key)
    if k is None:
        safe = "".join(ch if ch.isalnum() else "_" for ch in f"{kind}_{params}_{role}_{layout}")
        k = CompiledKernel(_make_kernels(kind, params)[role], f"meansparse_{safe}")
        _KERNELS[key] = k
    return k


def _compilable_layout(x: Tensor) -> str | None:
    """``"contiguous"`` / ``"channels_last"`` when ``x`` is laid out so one compiled graph serves it, else None."""
    if x.is_contiguous():
        return "contiguous"
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return None


def compiled_layout(x: Tensor) -> str | None:
    """The layout key (see :func:`_compilable_layout`) when ``x`` takes the compiled kernels now: compilation
    on and not inside an outer ``torch.compile``, float32/float64, at least ``COMPILE_MIN_NUMEL`` elements;
    else None (eager reference)."""
    if x.dtype in _COMPILED_DTYPES and x.numel() >= COMPILE_MIN_NUMEL and compile_enabled() and not _is_compiling():
        return _compilable_layout(x)
    return None


def _like(g: Tensor, layout: str) -> Tensor:
    if layout == "channels_last":
        return g.contiguous(memory_format=torch.channels_last)
    return g.contiguous()


class _FusedFunction(torch.autograd.Function):
    """act(sparsify(x)) under autograd, saving one tensor of x's size and the [C] vectors.

    In-kernel activations (``IN_KERNEL``): one compiled kernel each way; saves x, or for ReLU its output
    (which the next layer saves anyway).  Split activations: compiled sparsify, ATen activation; saves the
    sparsified y (the activation would have saved its input anyway), backward = ATen's activation backward
    at y, then the compiled band mask (exact mode only).  Tensors go to the kernels in their own shape, so
    the gradient is a plain tensor, not a view: autograd can accumulate into it in place."""

    @staticmethod
    def forward(ctx, x: Tensor, m: Tensor, t: Tensor, kinfo: tuple) -> Tensor:  # type: ignore[override]
        kind, params, mode, key = kinfo
        ctx.kinfo = kinfo
        if kind in IN_KERNEL:
            out = kernel(kind, params, "forward", key)(x, m, t)
            ctx.save_for_backward(out if kind == "relu" else x, m, t)
            return out
        y = kernel("", (), "sparsify", key)(x, m, t)
        ctx.save_for_backward(y, m, t)
        return act_eager(y, (kind, params, False))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):  # type: ignore[override]
        saved, m, t = ctx.saved_tensors
        kind, params, mode, key = ctx.kinfo
        g = _like(g, key[0])
        if kind in IN_KERNEL:
            role = f"{mode}_from_output" if kind == "relu" else mode
            return kernel(kind, params, role, key)(g, saved, m, t), None, None, None
        gy = _ACTIVATIONS[kind][1](g, saved, params)  # the ATen op eager autograd runs
        if mode == "exact":
            gy = kernel("", (), "band_mask", key)(gy, saved, m, t)
        return gy, None, None, None


def fused_forward(op: nn.Module, x: Tensor, spec: Spec) -> Tensor:
    """``activation(op(x))`` for :class:`~meansparse.operator.MeanSparse` ``op`` (its forward delegates here)."""
    if op._layout is None or op._channels is None:
        op._first_sight(x)
    kind, params, write_back = spec
    if op._observer is not None:
        op._observe(x)
        return act_eager(x, spec)
    if op._alpha_value == 0.0:
        return act_eager(x, spec)
    op._require_calibrated()
    op._check_channels(x)
    grad = torch.is_grad_enabled() and x.requires_grad
    if write_back and grad:  # in-place semantics under autograd: exactly the unfused computation
        return act_eager(op._sparsify(x, in_place=True), spec)
    layout = compiled_layout(x)
    if layout is None:  # eager: the reference computation
        out = act_eager(op._sparsify(x, in_place=False), (kind, params, False))
    else:
        m, t = op._center_threshold_for(x)
        key = (layout, x.ndim, op.channel_dim(x.ndim))
        if grad:
            out = _FusedFunction.apply(x, m, t, (kind, params, op.gradient, key))
        elif kind in IN_KERNEL:
            out = kernel(kind, params, "forward", key)(x, m, t)
        else:
            y = kernel("", (), "sparsify", key)(x, m, t)
            out = act_eager(y, (kind, params, False))
    if write_back:
        return x.copy_(out)
    return out


# ================================================================================ the fusing pass
class FusedMeanSparseActivation(MeanSparseActivation):
    """A fused :class:`~meansparse.insertion.MeanSparseActivation`: same children, one fused call."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        spec = self.__dict__.get("_meansparse_spec")
        if args or kwargs or spec is None:
            return self.activation(self.meansparse(x), *args, **kwargs)
        return self.meansparse(x, activation=spec)


def _fresh_modules() -> tuple[type[nn.Module], ...]:
    return (
        nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
        nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm,
    )


_FRESH_FUNCTIONS = {_op.add, _op.sub, _op.mul, torch.add, torch.sub, torch.mul, F.conv1d, F.conv2d, F.conv3d,
                    F.linear, F.batch_norm, F.layer_norm, F.group_norm}
_FRESH_METHODS = {"add", "sub", "mul", "__add__", "__sub__", "__mul__", "__radd__", "__rmul__"}
_INPLACE_FUNCTIONS = {_op.iadd, _op.isub, _op.imul}
_INPLACE_METHODS = {"add_", "sub_", "mul_", "__iadd__", "__isub__", "__imul__"}


def _private(node: Any, root: nn.Module, depth: int = 0) -> bool:
    """Whether fx ``node``'s tensor is freshly allocated and read by a single user (so mutating it, or not,
    is invisible to the rest of the graph)."""
    import torch.fx as fx

    if not isinstance(node, fx.Node) or len(node.users) != 1 or depth > 8:
        return False
    if node.op == "call_module":
        return isinstance(root.get_submodule(node.target), _fresh_modules())
    if node.op == "call_function" and node.target in _FRESH_FUNCTIONS:
        return True
    if node.op == "call_method" and node.target in _FRESH_METHODS:
        return True
    if (node.op == "call_function" and node.target in _INPLACE_FUNCTIONS) or (
        node.op == "call_method" and node.target in _INPLACE_METHODS
    ):
        return bool(node.args) and _private(node.args[0], root, depth + 1)
    return False


def _fx_base_class(root: nn.Module) -> type:
    return next(c for c in type(root).__mro__ if not issubclass(c, _FxPrepared) and c is not object
                and issubclass(c, nn.Module))


def _fuse_fx(root: nn.Module, producers: bool = True) -> int:
    import torch.fx as fx

    from .fused_producer import absorb_producer

    class _Retracer(fx.Tracer):
        """The prepared forward is already flat fx code that only calls leaf modules: keep every module
        call a call_module node, so the new graph is the old one (nothing is traced into)."""

        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return True

    graph = _Retracer().trace(root)
    fused = 0
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        op = root.get_submodule(node.target)
        if not isinstance(op, MeanSparse) or node.kwargs or len(node.users) != 1:
            continue
        act = next(iter(node.users))
        spec = _node_spec(act, node, root)
        if spec is None:
            continue
        if spec[2] or op.inplace:  # in place: only when nobody else can see the input tensor
            if not _private(node.args[0], root):
                continue
            spec = (spec[0], spec[1], False)
        node.kwargs = {"activation": spec}
        act.replace_all_uses_with(node)
        graph.erase_node(act)
        op.fused_activation = spec
        fused += 1
        if producers:
            absorb_producer(graph, node, root, spec)
    if not fused:
        return 0
    graph.lint()
    gm = fx.GraphModule(root, graph, type(root).__name__)
    root.__dict__.setdefault("_meansparse_unfused_class", type(root))
    root.__class__ = _fx_class(_fx_base_class(root), type(gm).forward)
    return fused


def fuse(model: nn.Module, *, producers: bool = True) -> nn.Module:
    """Fuse every operator with the activation right after it (in place; returns ``model``).

    ``producers``: in fx-prepared models also compute the eval BatchNorm and/or residual add that feeds a
    site inside its kernel (:mod:`meansparse.fused_producer`; ReLU and split-path activations).

    Sites whose activation is unsupported (custom modules, activations with hooks, PReLU ...) or whose
    in-place activation mutates a tensor other code reads keep the unfused path.  Idempotent.  See the
    module docstring for exactness and fallbacks; :func:`fused_sites` lists what was fused.
    """
    for child in list(model.modules()):
        if type(child) is MeanSparseActivation:  # subclasses may change forward: leave them alone
            spec = _module_spec(child.activation)
            if spec is None:
                continue
            child.__dict__["_meansparse_unfused_class"] = type(child)
            child.__class__ = FusedMeanSparseActivation
            child.__dict__["_meansparse_spec"] = spec
            child.meansparse.fused_activation = spec
    for m in list(model.modules()):
        rec = _record(m)
        if rec is not None and rec.config.get("method") == "fx" and "_meansparse_unfused_class" not in m.__dict__:
            _fuse_fx(m, producers)
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse` (in place; returns ``model``)."""
    for m in list(model.modules()):
        cls = m.__dict__.pop("_meansparse_unfused_class", None)
        if cls is not None:
            m.__class__ = cls
            m.__dict__.pop("_meansparse_spec", None)
        if isinstance(m, MeanSparse):
            m.fused_activation = None
            m.fused_producer = None
    return model


def fused_sites(model: nn.Module) -> list[str]:
    """Names of the sites currently fused with their activation."""
    return [op.site_name for op in operators(model) if op.fused_activation is not None]
