"""Automatic insertion of :class:`~meansparse.operator.MeanSparse` before activations.

Two strategies, because real models differ:

* ``method="fx"`` traces the model with ``torch.fx`` and inserts an operator node right before every
  activation *call site*, module or functional (``F.relu``, ``torch.relu``, ``x.relu()`` ...).  The result
  is a ``GraphModule`` sharing the original parameters; operators live in its ``meansparse`` ModuleList.
* ``method="modules"`` works on models that do not trace: each activation module is replaced in its parent
  by :class:`MeanSparseActivation` (operator first, original activation kept as child).  Functional
  activations cannot be covered this way; with ``example_inputs`` a probe forward finds them and warns.

``method="auto"`` tries fx and falls back to modules with a warning saying why tracing failed.  The
prepared model keeps a reference to the original so :func:`remove` gives it back untouched.

Besides "before an activation", the same mechanism places operators on the *output* of a module
(``outputs=`` regexes of module names, site kind ``"output"``, e.g. after a Transformer MLP's ``fc2``) and
on the output of every tensor + tensor addition (``residual_adds=True``, site kind ``"add"``: after a
residual connection).  ``preset=`` picks these arguments for known architecture families
(:mod:`meansparse.zoo`).  With fx the operator node goes right after the module call or the add; with
modules the module is wrapped in :class:`MeanSparseOutput`, and an add is only reachable when it is the
value a module's forward returns (found by the probe forward).
"""

from __future__ import annotations

import copy
import inspect
import operator as _op
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .operator import MeanSparse

__all__ = [
    "Site",
    "MeanSparseActivation",
    "MeanSparseOutput",
    "prepare",
    "sites",
    "remove",
    "operators",
    "set_alpha",
    "straight_through",
    "register_activation",
]

# ---------------------------------------------------------------------------------------------- registry
_BUILTIN_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Softplus,
    nn.PReLU,
)
_REGISTERED_MODULES: list[type[nn.Module]] = []

# function object -> display name.  F.gelu / F.softplus / F.relu_ are C builtins shared with torch.*.
_FUNCTIONS: dict[Callable, str] = {
    torch.relu: "torch.relu",
    torch.relu_: "torch.relu_",
    F.relu: "F.relu",
    F.gelu: "F.gelu",
    F.silu: "F.silu",
    F.elu: "F.elu",
    F.elu_: "F.elu_",
    F.leaky_relu: "F.leaky_relu",
    F.leaky_relu_: "F.leaky_relu_",
    F.mish: "F.mish",
    F.hardswish: "F.hardswish",
    F.softplus: "F.softplus",
    F.prelu: "F.prelu",
}
_METHODS: dict[str, str] = {"relu": "Tensor.relu", "relu_": "Tensor.relu_"}
_METHOD_OBJECTS: dict[Any, str] = {torch.Tensor.relu: "Tensor.relu", torch.Tensor.relu_: "Tensor.relu_"}

_ADD_FUNCTIONS = {_op.add, _op.iadd, torch.add}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__", "__radd__"}
_CHANNEL_LAST_MODULES: tuple[type[nn.Module], ...] = (nn.Linear,)
_CHANNEL_FIRST_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)
_CHANNEL_LAST_FUNCTIONS = {F.linear}
_CHANNEL_FIRST_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.batch_norm, F.group_norm, F.instance_norm}
_TRANSPARENT_MODULES: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Identity)
_TRANSPARENT_FUNCTIONS = {F.dropout, _op.mul, torch.mul, _op.truediv}


def register_activation(obj: Any) -> Any:
    """Treat a module class (e.g. a parametric PSiLU) or a function as an activation; usable as decorator.

    Registered classes become fx leaves, so their parameters keep their names.  A plain Python function is
    only seen as a call site if fx records it as one (C builtins, or functions marked ``torch.fx.wrap``).
    """
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        if issubclass(obj, (MeanSparse, MeanSparseActivation, MeanSparseOutput)):
            raise ValueError(f"{obj.__name__} cannot be registered as an activation")
        if obj not in _REGISTERED_MODULES:
            _REGISTERED_MODULES.append(obj)
    elif callable(obj):
        _FUNCTIONS.setdefault(obj, getattr(obj, "__qualname__", getattr(obj, "__name__", repr(obj))))
    else:
        raise TypeError(f"register_activation expects an nn.Module subclass or a function, got {obj!r}")
    return obj


def _module_classes() -> tuple[type[nn.Module], ...]:
    return _BUILTIN_MODULES + tuple(_REGISTERED_MODULES)


def _activation_names(activations: Iterable[Any] | None) -> set[str] | None:
    """Normalise the ``activations`` argument to display names (classes by ``__name__``)."""
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
            names.add(_FUNCTIONS[a])
        else:
            raise ValueError(f"unknown activation {a!r}: pass a module class, a known function or a name")
    return names


def _is_activation_module(m: nn.Module, names: set[str] | None) -> bool:
    if isinstance(m, (MeanSparse, MeanSparseActivation, MeanSparseOutput)):
        return False
    tname = type(m).__name__
    if names is not None:
        return tname in names
    return isinstance(m, _module_classes())


# ---------------------------------------------------------------------------------------------- sites
@dataclass(frozen=True)
class Site:
    """One insertion site: where an operator sits and what it sees."""

    index: int
    name: str  # qualified name, used by include/exclude regexes and set_alpha
    activation: str  # "ReLU", "F.gelu", "Tensor.relu", ...; kind "output": the module class; kind "add": "add"
    layout: str | None  # NCHW / NC / NLC / NHWC (NCL for channel-first 3-D); None until data is seen
    channels: int | None
    after_residual_add: bool  # the operator's input is the result of a tensor + tensor add
    module_path: str = ""  # the activation module, or the module whose forward calls the function / the add
    # "module", "function", "method": before an activation called that way; "output": on a module's output;
    # "add": on the output of a tensor + tensor add (a residual connection)
    kind: str = "module"


@dataclass
class _Candidate:
    name: str
    activation: str
    kind: str
    module_path: str
    after_residual_add: bool
    layout_hint: str | None
    inplace: bool
    node: Any = None  # fx node (fx method)
    module: nn.Module | None = None  # activation module (modules method)
    order: float = 0.0
    extra: dict = field(default_factory=dict)


@dataclass
class _Record:
    """Kept on the prepared model (plain attribute, not a submodule) to support remove/save/load."""

    original: nn.Module | None  # None when prepared in place
    config: dict
    original_class: type | None = None  # fx in place: the class to restore
    attr: str = ""  # fx: name of the ModuleList holding the operators
    code: str = ""  # fx: generated forward source, for inspection


class MeanSparseActivation(nn.Module):
    """Replacement for an activation module: ``activation(meansparse(x))`` (``method="modules"``)."""

    def __init__(self, activation: nn.Module, meansparse: MeanSparse) -> None:
        super().__init__()
        self.meansparse = meansparse
        self.activation = activation

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.activation(self.meansparse(x), *args, **kwargs)


class MeanSparseOutput(nn.Module):
    """Wrapper putting an operator on a module's output: ``meansparse(module(...))`` (``method="modules"``)."""

    def __init__(self, module: nn.Module, meansparse: MeanSparse) -> None:
        super().__init__()
        self.module = module
        self.meansparse = meansparse

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.meansparse(self.module(*args, **kwargs))


# ---------------------------------------------------------------------------------------------- helpers
def operators(model: nn.Module) -> list[MeanSparse]:
    """All MeanSparse operators of ``model``, ordered by site index (execution order)."""
    ops = [m for m in model.modules() if isinstance(m, MeanSparse)]
    return sorted(ops, key=lambda o: o.site_index)


def _site_of(op: MeanSparse) -> Site:
    return Site(
        index=op.site_index,
        name=op.site_name,
        activation=op.activation,
        layout=op.layout,
        channels=op.channels,
        after_residual_add=op.after_residual_add,
        module_path=op.module_path,
        kind=op.kind,
    )


def sites(model: nn.Module) -> list[Site]:
    """Insertion sites of a prepared model; for an unprepared one, the sites ``prepare`` would create."""
    ops = operators(model)
    if not ops:
        ops = operators(prepare(model))
    return [_site_of(o) for o in ops]


def set_alpha(model: nn.Module, alpha: float | Mapping[str | int, float]) -> nn.Module:
    """Set alpha everywhere (a number) or per site (a dict keyed by site name or index)."""
    ops = operators(model)
    if not ops:
        raise ValueError("model has no MeanSparse operators; call meansparse.prepare(model) first")
    if isinstance(alpha, Mapping):
        by_name = {o.site_name: o for o in ops}
        plan = []
        for key, value in alpha.items():
            if isinstance(key, bool) or not isinstance(key, (int, str)):
                raise TypeError(f"set_alpha keys must be site names or indices, got {key!r}")
            if isinstance(key, int):
                if not -len(ops) <= key < len(ops):
                    raise IndexError(f"site index {key} out of range: the model has {len(ops)} sites")
                plan.append((ops[key], value))
            elif key in by_name:
                plan.append((by_name[key], value))
            else:
                raise KeyError(f"no site named {key!r}; known sites: {list(by_name)[:8]}...")
    else:
        plan = [(o, alpha) for o in ops]
    for o, v in plan:  # validate everything before changing anything
        f = float(v)
        if not (f >= 0 and f != float("inf")):
            raise ValueError(f"MeanSparse site '{o.name}': alpha must be finite and >= 0, got {f}")
    for o, v in plan:
        o.set_alpha(v)
    return model


@contextmanager
def straight_through(model: nn.Module) -> Iterator[nn.Module]:
    """Use the straight-through (identity) backward in every operator inside the block (BPDA attacks)."""
    ops = operators(model)
    previous = [o.gradient for o in ops]
    try:
        for o in ops:
            o.gradient = "straight_through"
        yield model
    finally:
        for o, g in zip(ops, previous, strict=True):
            o.gradient = g


def _as_list(v: str | Sequence[str] | None) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    return list(v)


def _matches(patterns: Sequence[re.Pattern], name: str) -> bool:
    return any(p.search(name) for p in patterns)


def _as_args(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError("example_inputs must be a Tensor or a tuple/list of positional inputs")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Temporarily put every submodule in eval mode, restoring each module's own flag afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, t in modes:
            m.training = t


def _shallow(m: nn.Module) -> nn.Module:
    """A new module object of the same class whose children/parameters/buffers/hooks are the original ones.

    Registries (``_modules``, ``_parameters``, hook dicts ...) are copied, so editing the copy never
    touches the original, while the shared children keep ``.to()``/``.eval()`` consistent for both.
    """
    new = object.__new__(type(m))
    for k, v in m.__dict__.items():
        new.__dict__[k] = copy.copy(v) if isinstance(v, (dict, set, list)) else v
    return new


class _SelectionError(IndexError):
    """Bad ``indices``: a user error, never a reason to fall back from fx to modules."""


def _select(
    cands: list[_Candidate],
    include: list[str],
    exclude: list[str],
    after_residual_add: bool | None,
    indices: int | Sequence[int] | None,
) -> list[_Candidate]:
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    out = [
        c for c in cands if (not inc or any(p.search(c.name) for p in inc)) and not any(p.search(c.name) for p in exc)
    ]
    if after_residual_add is not None:
        out = [c for c in out if c.after_residual_add == after_residual_add]
    if indices is not None:
        idx = [indices] if isinstance(indices, int) else list(indices)
        for i in idx:
            if not -len(out) <= i < len(out):
                raise _SelectionError(f"site index {i} out of range: {len(out)} sites after include/exclude")
        chosen = sorted({i % len(out) for i in idx})
        out = [out[i] for i in chosen]
    return out


def _unique_names(cands: list[_Candidate]) -> None:
    """First use of a name keeps it; later call sites of the same name get ``:1``, ``:2`` ..."""
    seen: dict[str, int] = {}
    for c in cands:
        k = seen.get(c.name, 0)
        seen[c.name] = k + 1
        if k:
            c.name = f"{c.name}:{k}"


def _make_op(c: _Candidate, index: int, centering: str, device: torch.device | None = None) -> MeanSparse:
    op = MeanSparse(
        centering=centering,
        layout_hint=c.layout_hint,
        inplace=c.inplace,
        site_name=c.name,
        site_index=index,
        activation=c.activation,
        after_residual_add=c.after_residual_add,
        module_path=c.module_path,
        kind=c.kind,
    )
    return op if device is None else op.to(device)


def _model_device(model: nn.Module) -> torch.device | None:
    """Device of the model's first parameter (else buffer); None for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def _flatten_outputs(out: Any) -> list[Tensor]:
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]


def _same_outputs(a: Any, b: Any) -> bool:
    fa, fb = _flatten_outputs(a), _flatten_outputs(b)
    if len(fa) != len(fb):
        return False
    for x, y in zip(fa, fb, strict=True):
        if x.shape != y.shape:
            return False
        if x.device.type == "cpu":
            if not torch.equal(x, y):
                return False
        elif not torch.allclose(x, y, rtol=1e-5, atol=1e-6, equal_nan=True):
            return False  # accelerators may pick different kernels between two calls
    return True


# ---------------------------------------------------------------------------------------------- fx method
class _Tracer(fx.Tracer):
    def __init__(self, names: set[str] | None, outputs: Sequence[re.Pattern] = ()) -> None:
        super().__init__()
        self._names = names
        self._outputs = list(outputs)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (
            _is_activation_module(m, self._names)
            or isinstance(m, _module_classes())
            # a childless module whose output gets an operator stays one call (e.g. timm's DropPath, which
            # would otherwise trace to nothing in eval mode)
            or (bool(self._outputs) and not m._modules and _matches(self._outputs, qualname))
            or super().is_leaf_module(m, qualname)
        )


def _node_scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    last = list(stack.values())[-1]
    return last[0] if isinstance(last, tuple) else str(last)


def _input_of(node: fx.Node) -> tuple[Any, int | str]:
    """The activation's tensor input and where it sits (positional index or keyword)."""
    if node.args:
        return node.args[0], 0
    for k in ("input", "self", "x"):
        if k in node.kwargs:
            return node.kwargs[k], k
    return None, 0


def _fn_inplace(fn: Callable, node: fx.Node) -> bool:
    name = getattr(fn, "__name__", "")
    if name.endswith("_"):
        return True
    try:
        bound = inspect.signature(fn).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return bool(node.kwargs.get("inplace", False))
    return bool(bound.arguments.get("inplace", False))


def _is_tensor_add(node: Any) -> bool:
    if not isinstance(node, fx.Node):
        return False
    tensors = sum(isinstance(a, fx.Node) for a in node.args)
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return tensors >= 2
    if node.op == "call_method" and node.target in _ADD_METHODS:
        return tensors >= 2
    return False


def _fx_hint(node: Any, gm: nn.Module, depth: int = 0) -> str | None:
    """Channel-last if the activation input comes from a Linear, channel-first from conv/norm layers."""
    if not isinstance(node, fx.Node) or depth > 8:
        return None
    nxt = next((a for a in node.args if isinstance(a, fx.Node)), None)
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, _CHANNEL_LAST_MODULES):
            return "last"
        if isinstance(m, _CHANNEL_FIRST_MODULES):
            return "first"
        if isinstance(m, _TRANSPARENT_MODULES) or isinstance(m, _module_classes()):
            return _fx_hint(nxt, gm, depth + 1)
        return None
    if node.op == "call_function":
        if node.target in _CHANNEL_LAST_FUNCTIONS:
            return "last"
        if node.target in _CHANNEL_FIRST_FUNCTIONS:
            return "first"
        if node.target in _TRANSPARENT_FUNCTIONS or node.target in _ADD_FUNCTIONS or node.target in _FUNCTIONS:
            return _fx_hint(nxt, gm, depth + 1)
        return None
    if node.op == "call_method" and (node.target in _ADD_METHODS or node.target in ("mul", "contiguous")):
        return _fx_hint(nxt, gm, depth + 1)
    return None


def _activation_candidate(node: fx.Node, gm: fx.GraphModule, names: set[str] | None, order: int) -> _Candidate | None:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if not _is_activation_module(mod, names):
            return None
        act, kind, path = type(mod).__name__, "module", str(node.target)
        inplace = getattr(mod, "inplace", False) is True
        base = path
    elif node.op == "call_function" and node.target in _FUNCTIONS:
        act, kind, path = _FUNCTIONS[node.target], "function", _node_scope(node)
        if names is not None and act not in names:
            return None
        inplace = _fn_inplace(node.target, node)
        base = f"{path}.{act}" if path else act
    elif node.op == "call_method" and node.target in _METHODS:
        act, kind, path = _METHODS[node.target], "method", _node_scope(node)
        if names is not None and act not in names:
            return None
        inplace = str(node.target).endswith("_")
        base = f"{path}.{act}" if path else act
    else:
        return None
    inp, _ = _input_of(node)
    if not isinstance(inp, fx.Node):
        return None
    return _Candidate(
        name=base,
        activation=act,
        kind=kind,
        module_path=path,
        after_residual_add=_is_tensor_add(inp),
        layout_hint=_fx_hint(inp, gm),
        inplace=inplace,
        node=node,
        order=order,
    )


_LAST_CONSUMER_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.LayerNorm)
_LAST_CONSUMER_FUNCTIONS = {F.linear, F.layer_norm}


def _consumer_hint(node: fx.Node, gm: nn.Module) -> str | None:
    """Layout from what consumes ``node``: Linear / LayerNorm work on the last dim, conv / norm on dim 1."""
    for user in node.users:
        if not user.args or user.args[0] is not node:
            continue
        if user.op == "call_module":
            m = gm.get_submodule(user.target)
            if type(m) in _LAST_CONSUMER_MODULES:  # exact types: subclasses such as LayerNorm2d permute
                return "last"
            if isinstance(m, _CHANNEL_FIRST_MODULES):
                return "first"
        elif user.op == "call_function":
            if user.target in _LAST_CONSUMER_FUNCTIONS:
                return "last"
            if user.target in _CHANNEL_FIRST_FUNCTIONS:
                return "first"
    return None


def _after_hint(node: fx.Node, gm: nn.Module) -> str | None:
    """Layout hint for an operator on ``node``'s output.  An add's result has its operands' layout, known
    from what produced an operand or from what else consumes it (a block input feeding a LayerNorm)."""
    operands = [a for a in node.args if isinstance(a, fx.Node)] if _is_tensor_add(node) else []
    for n in [node, *operands]:
        hint = _fx_hint(n, gm)
        if hint is not None:
            return hint
    for n in [node, *operands]:
        hint = _consumer_hint(n, gm)
        if hint is not None:
            return hint
    return None


def _is_inplace_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is _op.iadd) or (
        node.op == "call_method" and node.target in ("add_", "__iadd__")
    )


def _fx_candidates(
    gm: fx.GraphModule,
    names: set[str] | None,
    outputs: Sequence[re.Pattern] = (),
    residual_adds: bool = False,
) -> list[_Candidate]:
    cands: list[_Candidate] = []
    for order, node in enumerate(gm.graph.nodes):
        c = _activation_candidate(node, gm, names, order)
        if c is not None:
            cands.append(c)
        if outputs and node.op == "call_module" and _matches(outputs, str(node.target)):
            mod = gm.get_submodule(node.target)
            if not isinstance(mod, (MeanSparse, MeanSparseActivation, MeanSparseOutput)):
                cands.append(
                    _Candidate(
                        name=f"{node.target}.output",
                        activation=type(mod).__name__,
                        kind="output",
                        module_path=str(node.target),
                        after_residual_add=False,
                        layout_hint=_after_hint(node, gm),
                        inplace=False,
                        node=node,
                        order=order,
                    )
                )
        if residual_adds and _is_tensor_add(node):
            scope = _node_scope(node)
            cands.append(
                _Candidate(
                    name=f"{scope}.add" if scope else "add",
                    activation="add",
                    kind="add",
                    module_path=scope,
                    after_residual_add=True,
                    layout_hint=_after_hint(node, gm),
                    inplace=_is_inplace_add(node),  # x += y: later readers of x must see the operator's output
                    node=node,
                    order=order,
                )
            )
    _unique_names(cands)
    return cands


def _trace(model: nn.Module, names: set[str] | None, outputs: Sequence[re.Pattern] = ()) -> fx.GraphModule:
    tracer = _Tracer(names, outputs)
    with _eval_mode(model):  # branches on self.training are baked in: trace the inference behaviour
        graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


class _FxPrepared:
    """Mixin of the classes ``prepare(method="fx")`` creates: ``OriginalClass`` with the traced forward.

    The prepared model stays an instance of the user's class (methods, attributes, containers and
    state_dict keys unchanged, plus ``meansparse.<i>.*``).  The forward is per instance, so pickling
    re-applies ``prepare`` to the pickled original instead of pickling generated code.
    """

    def __deepcopy__(self, memo):
        new = object.__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        return new

    def __reduce_ex__(self, protocol):
        rec = _record(self)  # type: ignore[arg-type]
        if rec is None or rec.original is None:
            raise TypeError(
                "a model prepared in place with method='fx' cannot be pickled; save its "
                "state with meansparse.save or prepare with inplace=False"
            )
        states = [
            {"state": op.state_dict(), "layout": op.layout, "gradient": op.gradient}
            for op in operators(self)  # type: ignore[arg-type]
        ]
        return (_rebuild_fx, (rec.original, rec.config, states))


def _rebuild_fx(original: nn.Module, config: dict, states: list[dict]) -> nn.Module:
    model = prepare_from_config(original, config)
    for op, st in zip(operators(model), states, strict=True):
        op.layout = st["layout"]
        op.gradient = st["gradient"]
        op.load_state_dict(st["state"])
    return model


def _fx_class(cls: type, forward: Callable) -> type:
    return type(
        cls.__name__,
        (_FxPrepared, cls),
        {"forward": forward, "__module__": cls.__module__, "__qualname__": cls.__qualname__},
    )


def _resolve(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _prepare_fx(
    model: nn.Module,
    names: set[str] | None,
    select: Callable,
    centering: str,
    outputs: Sequence[re.Pattern] = (),
    residual_adds: bool = False,
) -> tuple[nn.Module, str, str]:
    gm = _trace(model, names, outputs)
    if outputs:
        called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
        inner = [q for q, m in model.named_modules() if q and m._modules and q not in called and _matches(outputs, q)]
        if inner:
            raise ValueError(
                f"outputs= matches {inner[:3]}, which torch.fx traces through (they have submodules), so their "
                "output is not one graph node; match leaf modules (e.g. '.mlp.fc2$') or use method='modules'"
            )
    chosen = select(_fx_candidates(gm, names, outputs, residual_adds))
    prepared = _shallow(model)
    attr = "meansparse"
    while hasattr(prepared, attr) or hasattr(gm, attr):
        attr += "_"
    ops = nn.ModuleList()
    for k, c in enumerate(chosen):
        ops.append(_make_op(c, k, centering, _model_device(model)))
    gm.add_module(attr, ops)
    for k, c in enumerate(chosen):  # in graph order, so an activation sees an earlier add's operator
        node: fx.Node = c.node
        if c.kind in ("output", "add"):  # on the node's output: every user reads the operator instead
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(f"{attr}.{k}", (node,))
            node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
            continue
        inp, where = _input_of(node)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(f"{attr}.{k}", (inp,))
        if isinstance(where, int):
            node.update_arg(where, new)
        else:
            node.update_kwarg(where, new)
    gm.graph.lint()
    gm.recompile()
    for node in gm.graph.nodes:  # constants created while tracing live on the GraphModule only
        if node.op == "get_attr":
            try:
                _resolve(prepared, node.target)
            except AttributeError:
                if "." in node.target:
                    raise
                prepared.__dict__[node.target] = getattr(gm, node.target)
    prepared.add_module(attr, ops)
    prepared.__class__ = _fx_class(type(model), type(gm).forward)
    return prepared, attr, gm.code


# ---------------------------------------------------------------------------------------------- modules method
def _locations(model: nn.Module) -> list[tuple[nn.Module, str, str, nn.Module]]:
    """(parent, attribute, qualified name, child) for every registration, duplicates included."""
    out = []
    for pname, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is not None:
                out.append((parent, attr, f"{pname}.{attr}" if pname else attr, child))
    return out


def _sibling_hint(parent: nn.Module, attr: str) -> str | None:
    prev = None
    for a, child in parent._modules.items():
        if a == attr:
            break
        prev = child
    if isinstance(prev, _CHANNEL_LAST_MODULES):
        return "last"
    if isinstance(prev, _CHANNEL_FIRST_MODULES):
        return "first"
    return None


class _ProbeMode(TorchFunctionMode):
    """Records the producer of every tensor, functional activations called outside activation modules and
    tensor + tensor adds per calling module."""

    def __init__(self) -> None:
        super().__init__()
        self.producer: dict[int, tuple[Any, bool, str]] = {}  # id(tensor) -> (function, tensor add?, scope)
        self.keep: list[Tensor] = []  # keeps ids unique during the probe
        self.scope: list[str] = [""]
        self.in_activation = 0
        self.uncovered: dict[tuple[str, str], int] = {}
        self.adds: dict[str, int] = {}  # scope -> tensor adds executed directly in that module's forward

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.in_activation == 0:
            name = _FUNCTIONS.get(func) or _METHOD_OBJECTS.get(func)
            if name is not None:
                key = (self.scope[-1], name)
                self.uncovered[key] = self.uncovered.get(key, 0) + 1
        if isinstance(out, Tensor):
            fname = getattr(func, "__name__", "")
            tensor_add = fname in ("add", "add_", "__add__", "__iadd__", "__radd__") and (
                sum(isinstance(a, Tensor) for a in args) >= 2
            )
            if tensor_add and self.in_activation == 0:
                self.adds[self.scope[-1]] = self.adds.get(self.scope[-1], 0) + 1
            self.producer[id(out)] = (func, tensor_add, self.scope[-1])
            self.keep.append(out)
        return out


def _func_hint(func: Any) -> str | None:
    if func in _CHANNEL_LAST_FUNCTIONS:
        return "last"
    if func in _CHANNEL_FIRST_FUNCTIONS:
        return "first"
    return None


def _probe_modules(
    model: nn.Module,
    ops: list[MeanSparse],
    args: tuple,
    names: set[str] | None,
    outputs: Sequence[re.Pattern] = (),
    residual_adds: bool = False,
) -> tuple[dict[int, dict], dict[tuple[str, str], dict], dict, dict[str, int]]:
    """One forward to learn call order, residual adds, producers and uncovered functional activations.

    Returns per-operator info (by id), the operators to put on module outputs (``(qname, "output" | "add")``
    -> order, calls, layout hint), uncovered functional activations and uncovered adds per module.
    """
    mode = _ProbeMode()
    info: dict[int, dict] = {id(op): {"calls": 0, "order": None} for op in ops}
    after: dict[tuple[str, str], dict] = {}
    covered_adds: dict[str, int] = {}
    counter = [0]
    handles = []
    skip = {id(op) for op in ops}
    for m in model.modules():
        if isinstance(m, MeanSparseActivation):
            skip.update((id(m.activation), id(m.meansparse)))

    def op_pre(op, inputs):
        rec = info[id(op)]
        rec["calls"] += 1
        if rec["order"] is None:
            rec["order"] = counter[0]
            counter[0] += 1
            x = inputs[0] if inputs else None
            func, tensor_add, _ = mode.producer.get(id(x), (None, False, ""))
            rec["after_residual_add"] = tensor_add
            hint = _func_hint(func)
            if hint is not None:
                op.layout_hint = hint

    def enter(name: str, is_act: bool):
        def pre(mod, inputs):
            mode.scope.append(name)
            if is_act:
                mode.in_activation += 1

        return pre

    def leave(name: str, is_act: bool, watch: bool):
        def post(mod, inputs, output):
            mode.scope.pop()
            if is_act:
                mode.in_activation -= 1
            if not watch or not isinstance(output, Tensor):
                return
            func, tensor_add, scope = mode.producer.get(id(output), (None, False, ""))
            kinds = []
            if residual_adds and tensor_add and scope == name:  # this forward returns the add's result
                covered_adds[name] = covered_adds.get(name, 0) + 1
                kinds.append("add")
            if outputs and _matches(outputs, name):
                kinds.append("output")
            for kind in kinds:
                rec = after.setdefault((name, kind), {"calls": 0, "order": None})
                rec["calls"] += 1
                if rec["order"] is None:
                    rec["order"] = counter[0]
                    counter[0] += 1
                    rec["hint"] = _func_hint(func)

        return post

    for op in ops:
        handles.append(op.register_forward_pre_hook(op_pre))
    for qname, m in model.named_modules():
        is_act = (
            isinstance(m, MeanSparseActivation) or _is_activation_module(m, names) or isinstance(m, _module_classes())
        )
        watch = bool(qname) and id(m) not in skip and not isinstance(m, (MeanSparse, MeanSparseOutput))
        handles.append(m.register_forward_pre_hook(enter(qname, is_act)))
        handles.append(m.register_forward_hook(leave(qname, is_act, watch)))
    try:
        with _eval_mode(model), torch.no_grad(), mode:
            model(*args)
    finally:
        for h in handles:
            h.remove()
    uncovered_adds = {k: n - covered_adds.get(k, 0) for k, n in mode.adds.items() if n > covered_adds.get(k, 0)}
    return info, after, mode.uncovered, uncovered_adds


def _subtree_ends(locations: list[tuple[nn.Module, str, str, nn.Module]]) -> dict[str, int]:
    """Registration index of the last module inside each qualified name's subtree (pre-order listing)."""
    ends: dict[str, int] = {}
    for i, (_, _, qname, _) in enumerate(locations):
        parts = qname.split(".")
        for j in range(1, len(parts) + 1):
            ends[".".join(parts[:j])] = i
    return ends


def _prepare_modules(
    model: nn.Module,
    names: set[str] | None,
    select: Callable,
    centering: str,
    example_inputs: Any,
    inplace: bool,
    needs_probe: bool,
    outputs: Sequence[re.Pattern] = (),
    residual_adds: bool = False,
) -> tuple[nn.Module, list[MeanSparse]]:
    target = model if inplace else _shallow(model)
    copies: dict[int, nn.Module] = {id(model): target}
    owned = {id(target)}
    device = _model_device(model)

    def parent_at(qname: str) -> nn.Module:
        """The module at ``qname`` in ``target``, shallow-copying each container on the way."""
        cur = target
        for part in qname.split(".")[:-1]:
            child = cur._modules[part]
            if not inplace and id(child) not in owned:
                if id(child) not in copies:
                    copies[id(child)] = _shallow(child)
                    owned.add(id(copies[id(child)]))
                child = copies[id(child)]
                cur._modules[part] = child
            cur = child
        return cur

    locations = _locations(model)
    wrappers: dict[int, MeanSparseActivation] = {}
    cands: list[_Candidate] = []
    for reg_order, (parent, attr, qname, child) in enumerate(locations):
        if not _is_activation_module(child, names) or isinstance(parent, MeanSparseActivation):
            continue
        if id(child) in wrappers:
            parent_at(qname)._modules[attr] = wrappers[id(child)]  # registered twice: one operator
            continue
        c = _Candidate(
            name=qname,
            activation=type(child).__name__,
            kind="module",
            module_path=qname,
            after_residual_add=False,
            layout_hint=_sibling_hint(parent, attr),
            inplace=getattr(child, "inplace", False) is True,
            module=child,
            order=reg_order,
        )
        w = MeanSparseActivation(child, _make_op(c, -1, centering, device))
        wrappers[id(child)] = w
        parent_at(qname)._modules[attr] = w
        cands.append(c)
        c.extra["wrapper"] = w
        c.extra["op"] = w.meansparse

    def after_candidate(qname: str, kind: str, order: float, hint: str | None) -> _Candidate:
        mod = model.get_submodule(qname)
        return _Candidate(
            name=f"{qname}.{'add' if kind == 'add' else 'output'}",
            activation="add" if kind == "add" else type(mod).__name__,
            kind=kind,
            module_path=qname,
            after_residual_add=kind == "add",
            layout_hint=hint,
            inplace=False,
            module=mod,
            order=order,
        )

    if example_inputs is not None:
        ops = [c.extra["op"] for c in cands]
        info, after, uncovered, uncovered_adds = _probe_modules(
            target, ops, _as_args(example_inputs), names, outputs, residual_adds
        )
        reused = []
        for c in cands:
            op = c.extra["op"]
            rec = info[id(op)]
            if rec["order"] is not None:
                c.order = rec["order"]
                c.after_residual_add = rec.get("after_residual_add", False)
                c.layout_hint = op.layout_hint or c.layout_hint
            else:
                c.order = 1e9 + c.order  # never called in the probe: after every called site
            if rec["calls"] > 1:
                reused.append(f"{c.name} ({rec['calls']} calls)")
        for (qname, kind), rec in after.items():
            c = after_candidate(qname, kind, rec["order"], rec.get("hint") or _sibling_hint_of(model, qname))
            cands.append(c)
            if rec["calls"] > 1:
                reused.append(f"{c.name} ({rec['calls']} calls)")
        if uncovered:
            listing = ", ".join(f"{fn} in '{scope or '<root>'}' x{n}" for (scope, fn), n in sorted(uncovered.items()))
            warnings.warn(
                "meansparse.prepare(method='modules') cannot insert operators before functional activations; "
                f"not covered: {listing}. Use a traceable model (method='fx') or nn.Module activations.",
                stacklevel=3,
            )
        if residual_adds and uncovered_adds:
            listing = ", ".join(f"'{scope or '<root>'}' x{n}" for scope, n in sorted(uncovered_adds.items()))
            warnings.warn(
                "meansparse.prepare(method='modules', residual_adds=True) can only put an operator after an add "
                f"that a module's forward returns; not covered: adds inside {listing}. Use method='fx'.",
                stacklevel=3,
            )
        if reused:
            warnings.warn(
                "meansparse.prepare(method='modules'): modules called more than once share one "
                f"operator and pooled statistics: {', '.join(reused)}. method='fx' gives one per call site.",
                stacklevel=3,
            )
    elif needs_probe or residual_adds:
        what = "residual_adds=True" if residual_adds else "selecting by after_residual_add"
        raise ValueError(
            f"{what} with method='modules' needs example_inputs (one probe forward finds the adds), "
            "e.g. example_inputs=torch.zeros(1, 3, 32, 32)"
        )
    else:
        if cands:
            warnings.warn(
                "meansparse.prepare(method='modules') without example_inputs cannot see functional activations "
                "(F.relu, x.relu(), ...) or residual adds; pass example_inputs to check coverage.",
                stacklevel=3,
            )
        if outputs:  # no probe: an output comes after everything inside its module
            ends = _subtree_ends(locations)
            for qname, m in model.named_modules():
                if qname and _matches(outputs, qname) and not isinstance(m, (MeanSparse, MeanSparseOutput)):
                    hint = _sibling_hint_of(model, qname)
                    order = ends.get(qname, -1) + 0.9 - 0.01 * qname.count(".")  # inner modules end first
                    cands.append(after_candidate(qname, "output", order, hint))
    cands.sort(key=lambda c: c.order)

    chosen = select(cands)
    chosen_ids = {id(c) for c in chosen}
    for c in cands:  # unselected activations go back in place, untouched
        if id(c) not in chosen_ids and "wrapper" in c.extra:
            w = c.extra["wrapper"]
            for parent, attr, _, child in _locations(target):
                if child is w:
                    parent._modules[attr] = c.module
    # operators on module outputs: wrap every registration of the module, inner modules first (an outer
    # wrapper would hide the path to the inner ones)
    for c in sorted(chosen, key=lambda c: -c.module_path.count(".")):
        if "wrapper" in c.extra:
            continue
        op = _make_op(c, -1, centering, device)
        c.extra["op"] = op
        wrapper: MeanSparseOutput | None = None
        for _, attr, qname, child in locations:
            if child is c.module:
                parent = parent_at(qname)
                if wrapper is None:
                    wrapper = MeanSparseOutput(parent._modules[attr], op)
                parent._modules[attr] = wrapper
    ops = []
    for k, c in enumerate(chosen):
        op = c.extra["op"]
        op.site_index = k
        op.site_name = c.name
        op.after_residual_add = c.after_residual_add
        ops.append(op)
    if example_inputs is not None and any(op.channels is None for op in ops):
        with _eval_mode(target), torch.no_grad():  # operators added after the probe see data now too
            target(*_as_args(example_inputs))
    return target, ops


def _sibling_hint_of(model: nn.Module, qname: str) -> str | None:
    """Channel-last for a Linear's output, channel-first for a conv / norm layer's, else unknown."""
    m = model.get_submodule(qname)
    if isinstance(m, _CHANNEL_LAST_MODULES):
        return "last"
    if isinstance(m, _CHANNEL_FIRST_MODULES):
        return "first"
    return None


# ---------------------------------------------------------------------------------------------- public API
def prepare(
    model: nn.Module,
    exclude: str | Sequence[str] | None = None,
    include: str | Sequence[str] | None = None,
    indices: int | Sequence[int] | None = None,
    centering: str = "channel",
    activations: Iterable[Any] | None = None,
    example_inputs: Any = None,
    method: str = "auto",
    inplace: bool = False,
    *,
    after_residual_add: bool | None = None,
    outputs: str | Sequence[str] | None = None,
    residual_adds: bool = False,
    preset: str | None = None,
    fuse: bool = False,
) -> nn.Module:
    """Insert a MeanSparse operator immediately before each selected activation (alpha = 0: no change).

    ``include``/``exclude`` are regexes searched in site names; ``after_residual_add`` keeps only sites
    after (True) or not after (False) a residual add; ``indices`` then picks sites by position.  With
    ``example_inputs`` one probe forward (eval mode, no grad) fixes layouts and channel counts now, and for
    ``method="fx"`` checks the traced model reproduces the original outputs.  The returned model shares
    parameters with ``model``; ``method="modules", inplace=True`` edits ``model`` itself.

    More sites: ``outputs`` (regexes searched in module names) adds an operator on each matching module's
    output (site ``"<module>.output"``); ``residual_adds=True`` one on the result of every tensor + tensor
    add (site ``"<module>.add"``, ``after_residual_add=True``); pass ``activations=()`` for no activation
    sites.  ``preset`` applies the placement of an architecture family: ``"dm_wrn"``, ``"rawrn"``,
    ``"swin"``, ``"convnext"``, ``"generic"`` or ``"auto"`` (detected; see :mod:`meansparse.zoo`); its
    exclusions and outputs are added to the ones given here.  ``fuse=True`` also calls
    :func:`meansparse.fuse` (operator + activation in one compiled function, same results, see fused.py).
    """
    if method not in ("auto", "fx", "modules"):
        raise ValueError(f"method must be 'auto', 'fx' or 'modules', got {method!r}")
    from .operator import CENTERINGS

    if centering not in CENTERINGS:
        raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
    if any(isinstance(m, (MeanSparse, MeanSparseActivation, MeanSparseOutput)) for m in model.modules()):
        raise ValueError("model is already prepared (it contains MeanSparse operators); call meansparse.remove first")
    names = _activation_names(activations)
    inc, exc, outs = _as_list(include), _as_list(exclude), _as_list(outputs)
    preset_name = None
    if preset is not None:
        from .zoo import resolve_preset  # placements of known architecture families

        preset_name, spec = resolve_preset(preset, model)
        exc = list(spec.get("exclude", ())) + exc
        outs = list(spec.get("outputs", ())) + outs
        residual_adds = bool(residual_adds or spec.get("residual_adds", False))
        if method == "auto":
            method = spec.get("method", "auto")
    for p in inc + exc + outs:
        re.compile(p)  # fail early on a bad pattern
    out_patterns = [re.compile(p) for p in outs]

    def select(cands: list[_Candidate]) -> list[_Candidate]:
        return _select(cands, inc, exc, after_residual_add, indices)

    config = {
        "include": inc,
        "exclude": exc,
        "indices": [indices] if isinstance(indices, int) else (None if indices is None else list(indices)),
        "after_residual_add": after_residual_add,
        "centering": centering,
        "activations": None if names is None else sorted(names),
        "method": method,
        "probed": example_inputs is not None,
        "outputs": outs,
        "residual_adds": bool(residual_adds),
        "preset": preset_name,  # informative: its arguments are already in the entries above
    }
    args = None if example_inputs is None else _as_args(example_inputs)
    if args is not None and len(args) == 1 and isinstance(args[0], Tensor) and args[0].ndim >= 1:
        config["input_shape"] = list(args[0].shape[1:])

    before = {id(m): m.training for m in model.modules()}
    if method in ("auto", "fx"):
        try:
            prepared, attr, code = _prepare_fx(model, names, select, centering, out_patterns, residual_adds)
            if args is not None:
                with _eval_mode(model), torch.no_grad():
                    ref = model(*args)
                with _eval_mode(prepared), torch.no_grad():
                    got = prepared(*args)  # also fixes layouts and channel counts
                if not _same_outputs(ref, got):
                    raise RuntimeError("the traced model does not reproduce the original outputs")
        except _SelectionError:
            raise
        except Exception as e:  # noqa: BLE001 - any tracing failure triggers the fallback
            if method == "fx":
                raise RuntimeError(f"torch.fx could not prepare {type(model).__name__}: {e}") from e
            warnings.warn(
                f"meansparse.prepare: torch.fx tracing of {type(model).__name__} failed "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); falling back to "
                "method='modules' (activation modules only).",
                stacklevel=2,
            )
        else:
            config["method"] = "fx"
            if inplace:  # validated on the shallow copy: now convert the model object itself
                for k, v in prepared.__dict__.items():
                    model.__dict__.setdefault(k, v)  # tracing constants
                model._modules[attr] = prepared._modules[attr]
                cls = type(model)
                model.__class__ = type(prepared)
                rec = _Record(original=None, config=config, original_class=cls, attr=attr, code=code)
                model.__dict__["_meansparse_record"] = rec
                return _done(model, before, fuse)
            rec = _Record(original=model, config=config, attr=attr, code=code)
            prepared.__dict__["_meansparse_record"] = rec
            return _done(prepared, before, fuse)

    target, _ = _prepare_modules(
        model,
        names,
        select,
        centering,
        example_inputs,
        inplace,
        needs_probe=after_residual_add is not None,
        outputs=out_patterns,
        residual_adds=residual_adds,
    )
    config["method"] = "modules"
    target.__dict__["_meansparse_record"] = _Record(original=None if inplace else model, config=config)
    return _done(target, before, fuse)


def _done(prepared: nn.Module, before: dict[int, bool], fuse: bool) -> nn.Module:
    _match_mode(prepared, before)
    if fuse:
        from .fused import fuse as fuse_model

        fuse_model(prepared)
    return prepared


def _match_mode(prepared: nn.Module, before: dict[int, bool]) -> nn.Module:
    """Modules that prepare created (operators, wrappers, containers) take the mode of the model they joined:
    a new nn.Module starts in train mode, which would make an eval-mode model report train mode."""
    training = prepared.training
    for m in prepared.modules():
        if id(m) not in before:
            m.training = training
    return prepared


def prepare_from_config(model: nn.Module, config: Mapping[str, Any], example_inputs: Any = None) -> nn.Module:
    """Re-apply ``prepare`` with the arguments recorded in a prepared model's config (save/load, pickle)."""
    if config.get("preset"):  # a preset's arguments are recorded expanded; only its activation classes are not
        from .zoo import register_family_activations

        register_family_activations(config["preset"], model)
    return prepare(
        model,
        include=config.get("include") or None,
        exclude=config.get("exclude") or None,
        indices=config.get("indices"),
        centering=config.get("centering", "channel"),
        activations=config.get("activations"),
        method=config["method"],
        example_inputs=example_inputs,
        after_residual_add=config.get("after_residual_add"),
        outputs=config.get("outputs") or None,
        residual_adds=bool(config.get("residual_adds", False)),
    )


def _record(model: nn.Module) -> _Record | None:
    return model.__dict__.get("_meansparse_record")


def find_prepared(model: nn.Module) -> tuple[str, nn.Module, _Record]:
    """The (qualified name, module, record) of the module ``prepare`` returned, searching submodules."""
    found = [(n, m, _record(m)) for n, m in model.named_modules() if _record(m) is not None]
    if not found:
        raise ValueError("model was not prepared with meansparse.prepare")
    if len(found) > 1:
        raise ValueError(f"model contains {len(found)} prepared submodules: {[n for n, _, _ in found]}")
    return found[0]  # type: ignore[return-value]


def _undo_in_place(m: nn.Module, rec: _Record) -> None:
    if rec.original_class is not None:  # fx, in place
        m._modules.pop(rec.attr, None)
        m.__class__ = rec.original_class
    m.__dict__.pop("_meansparse_record", None)


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`prepare`: return the original model (no MeanSparse left)."""
    rec = _record(model)
    if rec is not None and rec.original is not None:
        return rec.original
    for parent, attr, _, child in _locations(model):
        rc = _record(child)
        if rc is not None and rc.original is not None:
            parent._modules[attr] = rc.original
    for m in list(model.modules()):
        rc = _record(m)
        if rc is not None:
            _undo_in_place(m, rc)
    for parent, attr, _, child in _locations(model):
        if isinstance(child, MeanSparseActivation):
            parent._modules[attr] = child.activation
    while True:  # output wrappers may be nested: unwrap until none is left
        wrapped = [(p, a, c) for p, a, _, c in _locations(model) if isinstance(c, MeanSparseOutput)]
        if not wrapped:
            break
        for parent, attr, child in wrapped:
            if parent._modules.get(attr) is child:
                parent._modules[attr] = child.module
    if operators(model):
        raise RuntimeError("could not remove every MeanSparse operator from this model")
    return model
