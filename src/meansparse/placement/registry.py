"""One registry of what placement and fusion recognise: activations (modules, functions, Tensor methods), tensor
adds, and the layout rules (which producers and consumers put channels first or last).

Insertion (:mod:`meansparse.placement`) asks it which calls are activation sites and where the channels are;
fusion (:mod:`meansparse.accel`) asks it how each activation is computed (its fusion ``kernel`` and
parameters).  A class added with :func:`register_activation` gets an operator and is fused too: its own forward
runs after a compiled sparsify kernel (kernel ``"generic"``).  A fusion kernel names a computation; a *site
kind* ("module", "function", "method", "output", "add": :mod:`meansparse.core.site`) says where an operator sits.
"""

from __future__ import annotations

import inspect
import operator as _op
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .wrappers import WRAPPERS

__all__ = [
    "Activation",
    "ActivationSpec",
    "register_activation",
    "activation_classes",
    "module_activation",
    "function_activation",
    "method_activation",
    "is_activation_module",
    "is_site",
    "secondary_names",
    "activation_lookalikes",
    "activation_names",
    "module_spec",
    "call_arguments",
    "call_inplace",
    "is_add",
    "is_inplace_add",
    "ADD_METHOD_NAMES",
    "producer_hint",
    "consumer_hint",
    "is_transparent",
    "GENERIC_KERNEL",
    "IDENTITY_KERNEL",
]

#: Fusion kernel of a registered activation class: its own forward runs after the compiled sparsify kernel.
GENERIC_KERNEL = "generic"
#: Fusion kernel of a site with no activation after it (a residual add, a module output): the operator alone.
IDENTITY_KERNEL = "identity"


@dataclass(frozen=True)
class Activation:
    """How placement names an activation and fusion computes it.

    ``kernel``: the fused computation ("relu", "gelu", ..., :data:`GENERIC_KERNEL`), or None: not fused.
    ``params``: (name, default) of the arguments after the input (functions) or of the attributes (modules)
    that parametrise ``kernel``.  ``inplace``: a function that works in place by itself (``relu_``).
    """

    name: str
    kernel: str | None = None
    params: tuple[tuple[str, Any], ...] = ()
    inplace: bool = False
    #: a gate as often as an activation (Tanh, Sigmoid): a site only where the model has no main activation
    secondary: bool = False


class ActivationSpec(NamedTuple):
    """A fusable activation call: fusion ``kernel`` with constant ``params``; ``write_back``: it was in place and later
    code may read its input, so the result is copied back into it."""

    kernel: str
    params: tuple
    write_back: bool


_SLOPE = (("negative_slope", 0.01),)
_MODULES: dict[type[nn.Module], Activation] = {
    nn.ReLU: Activation("ReLU", "relu"),
    nn.LeakyReLU: Activation("LeakyReLU", "leaky_relu", _SLOPE),
    nn.ELU: Activation("ELU", "elu", (("alpha", 1.0),)),
    nn.GELU: Activation("GELU", "gelu", (("approximate", "none"),)),
    nn.SiLU: Activation("SiLU", "silu"),
    nn.Mish: Activation("Mish", "mish"),
    nn.Hardswish: Activation("Hardswish", "hardswish"),
    nn.Softplus: Activation("Softplus", "softplus", (("beta", 1.0), ("threshold", 20.0))),
    nn.PReLU: Activation("PReLU"),  # learnable slope: inserted, not fused
    nn.ReLU6: Activation("ReLU6", "hardtanh", (("min_val", 0.0), ("max_val", 6.0))),
    nn.Hardtanh: Activation("Hardtanh", "hardtanh", (("min_val", -1.0), ("max_val", 1.0))),
    nn.SELU: Activation("SELU", GENERIC_KERNEL),
    nn.CELU: Activation("CELU", GENERIC_KERNEL),
    nn.RReLU: Activation("RReLU", GENERIC_KERNEL),  # random slope in train mode: its own forward
    nn.Tanh: Activation("Tanh", GENERIC_KERNEL, secondary=True),
    nn.Sigmoid: Activation("Sigmoid", GENERIC_KERNEL, secondary=True),
    nn.Hardsigmoid: Activation("Hardsigmoid", GENERIC_KERNEL, secondary=True),
}

# F.gelu / F.softplus / F.relu_ are C builtins shared with torch.*
_FUNCTIONS: dict[Callable, Activation] = {
    torch.relu: Activation("torch.relu", "relu"),
    torch.relu_: Activation("torch.relu_", "relu", inplace=True),
    F.relu: Activation("F.relu", "relu"),
    F.gelu: Activation("F.gelu", "gelu", (("approximate", "none"),)),
    F.silu: Activation("F.silu", "silu"),
    F.elu: Activation("F.elu", "elu", (("alpha", 1.0),)),
    F.elu_: Activation("F.elu_", "elu", (("alpha", 1.0),), inplace=True),
    F.leaky_relu: Activation("F.leaky_relu", "leaky_relu", _SLOPE),
    F.leaky_relu_: Activation("F.leaky_relu_", "leaky_relu", _SLOPE, inplace=True),
    F.mish: Activation("F.mish", "mish"),
    F.hardswish: Activation("F.hardswish", "hardswish"),
    F.softplus: Activation("F.softplus", "softplus", (("beta", 1.0), ("threshold", 20.0))),
    F.prelu: Activation("F.prelu"),
    F.relu6: Activation("F.relu6", "hardtanh", (("min_val", 0.0), ("max_val", 6.0))),
    F.hardtanh: Activation("F.hardtanh", "hardtanh", (("min_val", -1.0), ("max_val", 1.0))),
    F.hardtanh_: Activation("F.hardtanh_", "hardtanh", (("min_val", -1.0), ("max_val", 1.0)), inplace=True),
    F.selu: Activation("F.selu"),
    F.celu: Activation("F.celu"),
    F.rrelu: Activation("F.rrelu"),
    torch.tanh: Activation("torch.tanh", secondary=True),
    torch.sigmoid: Activation("torch.sigmoid", secondary=True),
    F.hardsigmoid: Activation("F.hardsigmoid", secondary=True),
}
# F.relu_ is torch.relu_ where both exist; keep the name fx records for it
_FUNCTIONS.setdefault(F.relu_, Activation("F.relu_", "relu", inplace=True))

_METHODS: dict[str, Activation] = {
    "relu": Activation("Tensor.relu", "relu"),
    "relu_": Activation("Tensor.relu_", "relu", inplace=True),
    "tanh": Activation("Tensor.tanh", secondary=True),
    "sigmoid": Activation("Tensor.sigmoid", secondary=True),
}
_METHOD_OBJECTS: dict[Any, Activation] = {torch.Tensor.relu: _METHODS["relu"], torch.Tensor.relu_: _METHODS["relu_"],
                                          torch.Tensor.tanh: _METHODS["tanh"],
                                          torch.Tensor.sigmoid: _METHODS["sigmoid"]}


# ---------------------------------------------------------------------------------------------- activations
def register_activation(obj: Any) -> Any:
    """Treat a module class (e.g. a parametric PSiLU) or a function as an activation; usable as decorator.

    A registered class becomes an fx leaf (its parameters keep their names), gets an operator before every call
    and is fused by :func:`meansparse.fuse` (its own forward after a compiled sparsify kernel).  A plain Python
    function is only seen as a call site if fx records it as one (C builtins, or functions marked
    ``torch.fx.wrap``); it gets an operator but is not fused.
    """
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        if issubclass(obj, WRAPPERS):
            raise ValueError(f"{obj.__name__} cannot be registered as an activation")
        _MODULES.setdefault(obj, Activation(obj.__name__, GENERIC_KERNEL))
    elif callable(obj):
        _FUNCTIONS.setdefault(obj, Activation(getattr(obj, "__qualname__", getattr(obj, "__name__", repr(obj)))))
    else:
        raise TypeError(f"register_activation expects an nn.Module subclass or a function, got {obj!r}")
    return obj


def activation_classes() -> tuple[type[nn.Module], ...]:
    """Every activation module class (built in and registered)."""
    return tuple(_MODULES)


def module_activation(m: nn.Module) -> Activation | None:
    """The registry entry of an activation module: its exact class's, else (a subclass) its name without a
    fusion kernel (a subclass may change forward); None for anything else."""
    entry = _MODULES.get(type(m))
    if entry is not None:
        return entry
    if isinstance(m, activation_classes()) and not isinstance(m, WRAPPERS):
        return Activation(type(m).__name__)
    return None


def function_activation(fn: Any) -> Activation | None:
    return _FUNCTIONS.get(fn)


def method_activation(name_or_method: Any) -> Activation | None:
    """Entry of a Tensor method, by name (fx ``call_method`` target) or method object (``__torch_function__``)."""
    if isinstance(name_or_method, str):
        return _METHODS.get(name_or_method)
    return _METHOD_OBJECTS.get(name_or_method)


def is_activation_module(m: nn.Module, names: set[str] | None = None) -> bool:
    """Whether ``m`` is an activation site: one of ``names`` (class names) if given, else any registered class
    that is not :func:`secondary <secondary_names>`."""
    if isinstance(m, WRAPPERS):
        return False
    if names is not None:
        return type(m).__name__ in names
    entry = module_activation(m)
    return entry is not None and not entry.secondary


def is_site(entry: Activation | None, names: set[str] | None) -> bool:
    """Whether a function / method entry is an activation site: named in ``names``, else not secondary."""
    if entry is None:
        return False
    return entry.name in names if names is not None else not entry.secondary


def secondary_names() -> set[str]:
    """Activations that are as often gates (SE, attention) as activations: Tanh, Sigmoid, Hardsigmoid.
    ``prepare`` puts sites before them only in a model that has no other activation."""
    tables = (_MODULES.values(), _FUNCTIONS.values(), _METHODS.values())
    return {a.name for table in tables for a in table if a.secondary}


_LOOKALIKE = re.compile(r"(?i)(act|relu|elu|lu\d*$|swish|gelu|mish|sigmoid|tanh|softplus|hardswish|star)")


def activation_lookalikes(model: nn.Module) -> dict[str, int]:
    """Classes of childless modules that look like activations (by name, e.g. ``QuickGELU``, ``StarReLU``)
    and are not registered, with their counts: what the no-site warning names."""
    found: dict[str, int] = {}
    for m in model.modules():
        if m._modules or module_activation(m) is not None or isinstance(m, WRAPPERS):
            continue
        name = type(m).__name__
        if _LOOKALIKE.search(name):
            found[name] = found.get(name, 0) + 1
    return found


def activation_names(activations: Iterable[Any] | None) -> set[str] | None:
    """Normalise ``prepare``'s ``activations`` argument to display names (classes by ``__name__``)."""
    if activations is None:
        return None
    if isinstance(activations, (str, type)) or callable(activations):
        activations = [activations]
    names: set[str] = set()
    for a in activations:
        if isinstance(a, str):
            names.add(a)
        elif isinstance(a, type):
            names.add(a.__name__)
        elif a in _FUNCTIONS:
            names.add(_FUNCTIONS[a].name)
        else:
            raise ValueError(f"unknown activation {a!r}: pass a module class, a known function or a name")
    return names


def _constant(v: Any) -> Any:
    """A parameter value as a fused spec holds it (float or str), or None when it is not a plain constant."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        return None
    return v if isinstance(v, str) else float(v)


def module_spec(m: nn.Module) -> ActivationSpec | None:
    """The fusable description of an activation module, or None (not fused: unknown type, hooks, in place
    generic module, subclass of a built-in activation)."""
    if m._forward_hooks or m._forward_pre_hooks:  # hooks would be skipped by a fused call
        return None
    entry = _MODULES.get(type(m))
    if entry is None or entry.kernel is None:
        return None
    inplace = bool(getattr(m, "inplace", False))
    if entry.kernel == GENERIC_KERNEL:
        return None if inplace else ActivationSpec(GENERIC_KERNEL, (), False)
    params = tuple(_constant(getattr(m, name, default)) for name, default in entry.params)
    if any(p is None for p in params):
        return None
    return ActivationSpec(entry.kernel, params, inplace)


def call_arguments(fn: Callable, args: tuple, kwargs: dict) -> dict | None:
    """The arguments of a call of ``fn`` by name (defaults applied); C builtins are read by the registry's
    parameter list (input first, then the parameters positionally or by keyword).  None if unreadable."""
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)
    except (TypeError, ValueError):
        entry = _FUNCTIONS.get(fn)
        if entry is None:
            return None
        kwargs = dict(kwargs)
        out: dict[str, Any] = {}
        rest = list(args[1:])
        for name, default in entry.params:
            out[name] = rest.pop(0) if rest else kwargs.pop(name, default)
        if rest or set(kwargs) - {"input", "self"}:
            return None
        return out


def call_inplace(fn: Callable, args: tuple, kwargs: dict) -> bool:
    """Whether a call of activation function ``fn`` works in place (``relu_``, ``inplace=True``)."""
    entry = _FUNCTIONS.get(fn)
    if (entry is not None and entry.inplace) or getattr(fn, "__name__", "").endswith("_"):
        return True
    bound = call_arguments(fn, args, kwargs)
    return bool((kwargs if bound is None else bound).get("inplace", False))


def function_spec(fn: Callable, args: tuple, kwargs: dict) -> ActivationSpec | None:
    """The fusable description of a call ``fn(*args, **kwargs)`` whose parameters are constants, or None."""
    entry = _FUNCTIONS.get(fn)
    if entry is None or entry.kernel is None or entry.kernel == GENERIC_KERNEL:
        return None
    bound = call_arguments(fn, args, kwargs)
    if bound is None:
        return None
    # a parameter the function does not take is fixed by it (F.relu6: hardtanh's 0 and 6)
    params = tuple(_constant(bound.get(name, default)) for name, default in entry.params)
    if any(p is None for p in params):
        return None
    return ActivationSpec(entry.kernel, params, entry.inplace or bool(bound.get("inplace", False)))


def method_spec(name: str) -> ActivationSpec | None:
    entry = _METHODS.get(name)
    return None if entry is None or entry.kernel is None else ActivationSpec(entry.kernel, (), entry.inplace)


# ---------------------------------------------------------------------------------------------- adds
_ADD_FUNCTIONS = {_op.add, _op.iadd, torch.add}
#: Names of the Tensor add methods (also what ``__torch_function__`` sees as the function's name).
ADD_METHOD_NAMES = frozenset({"add", "add_", "__add__", "__iadd__", "__radd__"})
_INPLACE_ADDS = {_op.iadd, "add_", "__iadd__"}


def is_add(op: str, target: Any) -> bool:
    """Whether an fx node ``(op, target)`` is an addition (``+``, ``+=``, ``torch.add``, ``x.add(y)`` ...)."""
    if op == "call_function":
        return target in _ADD_FUNCTIONS
    return op == "call_method" and target in ADD_METHOD_NAMES


def is_inplace_add(op: str, target: Any) -> bool:
    return is_add(op, target) and target in _INPLACE_ADDS


# ---------------------------------------------------------------------------------------------- layout rules
# A Linear works on the last dim (channels last); conv and norm layers on dim 1 (channels first).
_LAST_MODULES: tuple[type[nn.Module], ...] = (nn.Linear,)
_FIRST_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
)
_LAST_FUNCTIONS = {F.linear}
_FIRST_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.batch_norm, F.group_norm, F.instance_norm}
# consumers: exact types (subclasses such as timm's LayerNorm2d permute first)
_LAST_CONSUMER_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.LayerNorm)
_LAST_CONSUMER_FUNCTIONS = {F.linear, F.layer_norm}
# ops the layout passes through unchanged
_TRANSPARENT_MODULES: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Identity)
_TRANSPARENT_FUNCTIONS = {F.dropout, _op.mul, torch.mul, _op.truediv}
_TRANSPARENT_METHODS = {"mul", "contiguous"}


def producer_hint(producer: Any) -> str | None:
    """"last" / "first" when ``producer`` (a module or a function) makes channel-last / channel-first
    tensors, else None."""
    if isinstance(producer, nn.Module):
        if isinstance(producer, _LAST_MODULES):
            return "last"
        return "first" if isinstance(producer, _FIRST_MODULES) else None
    if producer in _LAST_FUNCTIONS:
        return "last"
    return "first" if producer in _FIRST_FUNCTIONS else None


def consumer_hint(consumer: Any) -> str | None:
    """The layout a consumer (module or function) of a tensor implies: Linear / LayerNorm work on the last
    dim, conv and norm layers on dim 1."""
    if isinstance(consumer, nn.Module):
        if type(consumer) in _LAST_CONSUMER_MODULES:
            return "last"
        return "first" if isinstance(consumer, _FIRST_MODULES) else None
    if consumer in _LAST_CONSUMER_FUNCTIONS:
        return "last"
    return "first" if consumer in _FIRST_FUNCTIONS else None


def is_transparent(op: str, target: Any) -> bool:
    """Whether an fx node (module instance for ``call_module``) keeps its input's layout: dropout, identity,
    scaling, adds and activations."""
    if op == "call_module":
        return isinstance(target, _TRANSPARENT_MODULES) or isinstance(target, activation_classes())
    if op == "call_function":
        return target in _TRANSPARENT_FUNCTIONS or target in _ADD_FUNCTIONS or target in _FUNCTIONS
    return op == "call_method" and (target in ADD_METHOD_NAMES or target in _TRANSPARENT_METHODS)
