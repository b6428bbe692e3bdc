"""The fx strategy: trace the model with ``torch.fx`` and insert an operator node at every selected call site.

Before an activation call (module, functional ``F.relu``/``torch.relu``, method ``x.relu()``) the operator
node takes the activation's input; after a module call (``outputs=``) or a tensor + tensor add
(``residual_adds=True``) every user reads the operator's output instead.  The new graph's forward becomes
the prepared model's forward (see :mod:`meansparse.placement.prepare`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch.fx as fx
from torch import nn

from .._utils import model_device, preserved_state, shallow_copy
from ..core import ACTIVATION_KINDS, SiteInfo
from .candidates import Candidate, make_operator, matches, unique_names
from .registry import (
    activation_classes,
    call_inplace,
    consumer_hint,
    function_activation,
    is_activation_module,
    is_add,
    is_inplace_add,
    is_site,
    is_transparent,
    method_activation,
    producer_hint,
)
from .wrappers import WRAPPERS

__all__ = ["FxResult", "ModeForwards", "prepare_fx"]


class ModeForwards(NamedTuple):
    """The forwards of a model whose trace depends on ``self.training``: eval's, train's (None when it is not
    available, ``issue`` says why), and the traced-through modules that read ``training``."""

    eval: Callable
    train: Callable | None
    issue: str | None
    modules: tuple[str, ...]


class FxResult(NamedTuple):
    """A shallow copy of the model holding the operators, the traced forward to give it, and its source;
    ``modes`` when train and eval mode trace differently."""

    prepared: nn.Module
    forward: Callable
    attr: str  # name of the ModuleList holding the operators
    code: str
    modes: ModeForwards | None = None


class _Tracer(fx.Tracer):
    # buffers as graph inputs: an in-place update (timm's num_batches_tracked.add_(1)) is a graph op, not a
    # change made to the user's buffer once while tracing
    proxy_buffer_attributes = True

    def __init__(self, names: set[str] | None, outputs: Sequence[re.Pattern] = ()) -> None:
        super().__init__()
        self._names = names
        self._outputs = list(outputs)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (
            is_activation_module(m, self._names)
            or isinstance(m, activation_classes())
            # a childless module whose output gets an operator stays one call (e.g. timm's DropPath, which
            # would otherwise trace to nothing in eval mode)
            or (bool(self._outputs) and not m._modules and matches(self._outputs, qualname))
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


def is_tensor_add(node: Any) -> bool:
    """Whether fx ``node`` adds two computed tensors (a residual connection), not a tensor and a constant."""
    if not isinstance(node, fx.Node):
        return False
    return is_add(node.op, node.target) and sum(isinstance(a, fx.Node) for a in node.args) >= 2


def _target(node: fx.Node, gm: nn.Module) -> Any:
    return gm.get_submodule(node.target) if node.op == "call_module" else node.target


def _producer_hint(node: Any, gm: nn.Module, depth: int = 0) -> str | None:
    """Layout of ``node``'s tensor from what produced it, looking through layout-keeping ops."""
    if not isinstance(node, fx.Node) or depth > 8 or node.op not in ("call_module", "call_function", "call_method"):
        return None
    target = _target(node, gm)
    hint = producer_hint(target) if node.op != "call_method" else None
    if hint is not None:
        return hint
    if is_transparent(node.op, target):
        return _producer_hint(next((a for a in node.args if isinstance(a, fx.Node)), None), gm, depth + 1)
    return None


def _consumer_hint(node: fx.Node, gm: nn.Module) -> str | None:
    """Layout from what consumes ``node`` as its first argument."""
    for user in node.users:
        if not user.args or user.args[0] is not node or user.op not in ("call_module", "call_function"):
            continue
        hint = consumer_hint(_target(user, gm))
        if hint is not None:
            return hint
    return None


def _after_hint(node: fx.Node, gm: nn.Module) -> str | None:
    """Layout hint for an operator on ``node``'s output.  An add's result has its operands' layout, known
    from what produced an operand or from what else consumes it (a block input feeding a LayerNorm)."""
    operands = [a for a in node.args if isinstance(a, fx.Node)] if is_tensor_add(node) else []
    for find in (_producer_hint, _consumer_hint):
        for n in [node, *operands]:
            hint = find(n, gm)
            if hint is not None:
                return hint
    return None


def _activation_candidate(node: fx.Node, gm: fx.GraphModule, names: set[str] | None, order: int) -> Candidate | None:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if not is_activation_module(mod, names):
            return None
        act, kind, path = type(mod).__name__, "module", str(node.target)
        inplace = getattr(mod, "inplace", False) is True
        base = path
    else:
        if node.op == "call_function":
            entry, kind = function_activation(node.target), "function"
        elif node.op == "call_method":
            entry, kind = method_activation(node.target), "method"
        else:
            return None
        if not is_site(entry, names):
            return None
        act, path = entry.name, _node_scope(node)
        if kind == "function":
            inplace = call_inplace(node.target, tuple(node.args), dict(node.kwargs))
        else:
            inplace = str(node.target).endswith("_")
        base = f"{path}.{act}" if path else act
    inp, _ = _input_of(node)
    if not isinstance(inp, fx.Node):
        return None
    site = SiteInfo(name=base, activation=act, kind=kind, module_path=path, after_residual_add=is_tensor_add(inp),
                    layout_hint=_producer_hint(inp, gm), inplace=inplace)
    return Candidate(site, node=node, order=order)


def _candidates(
    gm: fx.GraphModule,
    names: set[str] | None,
    outputs: Sequence[re.Pattern] = (),
    residual_adds: bool = False,
) -> list[Candidate]:
    cands: list[Candidate] = []
    for order, node in enumerate(gm.graph.nodes):
        c = _activation_candidate(node, gm, names, order)
        if c is not None:
            cands.append(c)
        if outputs and node.op == "call_module" and matches(outputs, str(node.target)):
            mod = gm.get_submodule(node.target)
            if not isinstance(mod, WRAPPERS):
                site = SiteInfo(name=f"{node.target}.output", activation=type(mod).__name__, kind="output",
                                module_path=str(node.target), layout_hint=_after_hint(node, gm))
                cands.append(Candidate(site, node=node, order=order))
        if residual_adds and is_tensor_add(node):
            scope = _node_scope(node)
            site = SiteInfo(name=f"{scope}.add" if scope else "add", activation="add", kind="add", module_path=scope,
                            after_residual_add=True, layout_hint=_after_hint(node, gm),
                            # x += y: later readers of x must see the operator's output
                            inplace=is_inplace_add(node.op, node.target))
            cands.append(Candidate(site, node=node, order=order))
    unique_names(cands)
    return cands


def _trace(model: nn.Module, names: set[str] | None, outputs: Sequence[re.Pattern] = (),
           training: bool = False) -> fx.GraphModule:
    """The graph of ``model`` in eval (or train) mode: branches on ``self.training`` are baked in."""
    tracer = _Tracer(names, outputs)
    with preserved_state(model):  # restores every module's mode too
        model.train(training)
        graph = tracer.trace(model)
        _plain_constants(graph)
        return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _plain(v: Any) -> Any:
    return v.item() if type(v).__module__ == "numpy" and hasattr(v, "item") else v


def _plain_constants(graph: fx.Graph) -> None:
    """NumPy scalars in call arguments as Python numbers: the generated code cannot name ``np`` (timm's
    drop-path rates are ``np.float64``; the train-mode graph failed with a NameError)."""
    for node in graph.nodes:
        node.args = fx.node.map_aggregate(node.args, _plain)
        node.kwargs = fx.node.map_aggregate(node.kwargs, _plain)


def _resolve(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def prepare_fx(
    model: nn.Module,
    names: set[str] | None,
    select: Callable[[list[Candidate]], list[Candidate]],
    centering: str,
    outputs: Sequence[re.Pattern] = (),
    residual_adds: bool = False,
) -> FxResult:
    """Trace ``model``, insert the selected operators and return the prepared shallow copy and its forward."""
    gm = _trace(model, names, outputs)
    if outputs:
        called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
        inner = [q for q, m in model.named_modules() if q and m._modules and q not in called and matches(outputs, q)]
        if inner:
            raise ValueError(
                f"outputs= matches {inner[:3]}, which torch.fx traces through (they have submodules), so their "
                "output is not one graph node; match leaf modules (e.g. '.mlp.fc2$') or use method='modules'"
            )
    cands = _candidates(gm, names, outputs, residual_adds)
    chosen = select(cands)
    train, issue = _train_graph(model, names, outputs, residual_adds, gm, cands, chosen)
    prepared = shallow_copy(model)
    attr = "meansparse"
    while hasattr(prepared, attr) or hasattr(gm, attr) or (train is not None and hasattr(train[0], attr)):
        attr += "_"
    ops = nn.ModuleList()
    for k, c in enumerate(chosen):
        ops.append(make_operator(c, k, centering, model_device(model)))
    _insert(gm, ops, attr, chosen, prepared)
    train_forward = None
    if train is not None:
        _insert(train[0], ops, attr, train[1], prepared, suffix="_train")
        train_forward = type(train[0]).forward
    prepared.add_module(attr, ops)
    modes = None
    if train is not None or issue is not None:
        modes = ModeForwards(type(gm).forward, train_forward, issue, _mode_modules(model, gm))
    return FxResult(prepared, type(gm).forward, attr, gm.code, modes)


def _train_graph(model: nn.Module, names: set[str] | None, outputs: Sequence[re.Pattern], residual_adds: bool,
                 gm: fx.GraphModule, cands: list[Candidate], chosen: list[Candidate]) -> tuple[Any, str | None]:
    """The train-mode trace and its chosen candidates when it differs from the eval trace (``self.training``
    checks inside traced modules are baked in: timm's BatchNormAct2d, drop-path), else None; and why a
    train-mode forward is not available, if it is not."""
    try:
        tgm = _trace(model, names, outputs, training=True)
    except Exception as e:  # noqa: BLE001 - any failure: eval mode still works
        return None, f"torch.fx cannot trace it in train mode ({type(e).__name__}: {str(e).splitlines()[0]})"
    if tgm.code == gm.code:
        return None, None
    tcands = _candidates(tgm, names, outputs, residual_adds)
    if [c.site.name for c in tcands] != [c.site.name for c in cands]:
        return None, "its activation sites differ between train and eval mode"
    by_name = {c.site.name: c for c in tcands}
    return (tgm, [by_name[c.site.name] for c in chosen]), None


def _insert(gm: fx.GraphModule, ops: nn.ModuleList, attr: str, chosen: list[Candidate], prepared: nn.Module,
            suffix: str = "") -> None:
    """Put operator ``k`` of ``ops`` at ``chosen[k]`` in ``gm``; tracing constants go onto ``prepared``
    (renamed with ``suffix``, so that a second graph's constants do not replace the first's)."""
    gm.add_module(attr, ops)
    for k, c in enumerate(chosen):  # in graph order, so an activation sees an earlier add's operator
        node: fx.Node = c.node
        if c.site.kind not in ACTIVATION_KINDS:  # on the node's output: every user reads the operator instead
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
    for node in gm.graph.nodes:  # constants created while tracing live on the GraphModule only
        if node.op == "get_attr":
            try:
                _resolve(prepared, node.target)
            except AttributeError:
                if "." in node.target:
                    raise
                value = getattr(gm, node.target)
                node.target = node.target + suffix
                prepared.__dict__[node.target] = value
    gm.graph.lint()
    gm.recompile()


def _reads_training(cls: type) -> bool:
    """Whether a method of ``cls`` (not of nn.Module) reads an attribute named ``training``."""
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            continue
        for fn in vars(klass).values():
            code = getattr(fn, "__code__", None)
            if code is not None and "training" in code.co_names:
                return True
    return False


def _mode_modules(model: nn.Module, gm: fx.GraphModule) -> tuple[str, ...]:
    """Modules that tracing went into and whose code reads ``self.training``: their train / eval branch is
    baked into the graph, so they must be in the model's mode (the root's) when it runs."""
    leaves = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    out = []
    for q, m in model.named_modules():
        if q and not any(q == leaf or q.startswith(leaf + ".") for leaf in leaves) and _reads_training(type(m)):
            out.append(q)
    return tuple(out)
