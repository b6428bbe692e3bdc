"""``fuse``: every operator computes the activation after it (and, in fx graphs, the BatchNorm / residual add
before it) in one compiled call, with the same outputs and gradients (see :mod:`.kernels`, :mod:`.producer`).

Fusing swaps each fused operator to :class:`FusedMeanSparse` (a subclass: same buffers, statistics, alpha,
gradient modes, calibration and save/load) and records the previous class (:mod:`meansparse.placement.record`),
so :func:`unfuse` restores it.  With ``method="fx"`` the graph is re-traced and each operator node whose only
user is a supported activation becomes one call ``meansparse.k(x, activation=spec)``; with
``method="modules"`` each :class:`~meansparse.placement.MeanSparseActivation` becomes a
:class:`FusedMeanSparseActivation`.  Forward *hooks* on a fused operator see the activation's output.
Activations come from the placement registry, so a class added with ``register_activation`` is fused too.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import Tensor, nn

from ..core import ACTIVATION_KINDS, MeanSparse, operators
from ..placement import MeanSparseActivation, MeanSparseOutput, fx_class, get_record, mode_forwards
from ..placement.record import attach, attached, detach, restore_class, swap_class, swapped
from ..placement.registry import (
    GENERIC_KERNEL,
    IDENTITY_KERNEL,
    ActivationSpec,
    function_spec,
    method_spec,
    module_spec,
)
from .graph import fresh_module, private
from .kernels import fused_forward
from .producer import absorb_producer

__all__ = ["fuse", "unfuse", "fused_sites", "FusedMeanSparse", "FusedMeanSparseActivation", "FusedMeanSparseOutput",
           "IDENTITY_SPEC"]


class FusedMeanSparse(MeanSparse):
    """A MeanSparse operator that also applies the activation passed as ``activation`` (fused kernels)."""

    def forward(self, x: Tensor, activation: ActivationSpec | None = None) -> Tensor:  # type: ignore[override]
        if activation is None:
            return super().forward(x)
        if type(activation) is not ActivationSpec:
            activation = ActivationSpec(*activation)
        return fused_forward(self, x, activation)


class FusedMeanSparseActivation(MeanSparseActivation):
    """A fused :class:`~meansparse.placement.MeanSparseActivation`: same children, one fused call."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        spec = attached(self, "spec")
        if args or kwargs or spec is None:
            return self.activation(self.meansparse(x), *args, **kwargs)
        return self.meansparse(x, activation=spec)


#: The spec of a fused site with no activation after it.
IDENTITY_SPEC = ActivationSpec(IDENTITY_KERNEL, (), False)


class FusedMeanSparseOutput(MeanSparseOutput):
    """A fused :class:`~meansparse.placement.MeanSparseOutput`: the operator on the module's output, compiled."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.meansparse(self.module(*args, **kwargs), activation=IDENTITY_SPEC)


def _fuse_operator(op: MeanSparse, spec: ActivationSpec, activation: nn.Module | None) -> None:
    if not isinstance(op, FusedMeanSparse):
        swap_class(op, FusedMeanSparse)
    op.fused_activation = spec
    if spec.kernel == GENERIC_KERNEL:
        attach(op, "activation_module", activation)


def _own_input(op: MeanSparse, owned: bool) -> None:
    """Record whether the site's input tensor is private to it (see :func:`.kernels.owns_input`)."""
    if owned:
        attach(op, "owns_input", True)
    else:
        detach(op, "owns_input")


# ---------------------------------------------------------------------------------------------- fx graphs
def _node_spec(act: fx.Node, src: fx.Node, root: nn.Module) -> ActivationSpec | None:
    """Spec of fx node ``act`` if it applies a supported activation to ``src`` with constant arguments."""
    args, kwargs = tuple(act.args), dict(act.kwargs)
    if not args or args[0] is not src or any(isinstance(a, fx.Node) for a in list(args[1:]) + list(kwargs.values())):
        return None
    if act.op == "call_module":
        return module_spec(root.get_submodule(act.target)) if len(args) == 1 and not kwargs else None
    if act.op == "call_method":
        return method_spec(act.target) if len(args) == 1 and not kwargs else None
    if act.op == "call_function":
        return function_spec(act.target, args, kwargs)
    return None


class _Retracer(fx.Tracer):
    """The prepared forward is already flat fx code that only calls leaf modules: keep every module call a
    call_module node, so the new graph is the old one (nothing is traced into).  Buffers stay graph values:
    an in-place update in train mode (``num_batches_tracked.add_(1)``) must stay a graph op."""

    proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _fuse_graph(graph: fx.Graph, root: nn.Module, producers: bool, owned: dict[MeanSparse, bool]) -> int:
    """Fuse the operator nodes of one traced forward; ``owned`` collects, per operator left as a plain fused
    call, whether its input is private to it in this graph."""
    fused = 0
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        op = root.get_submodule(node.target)
        if not isinstance(op, MeanSparse) or node.kwargs or not node.users:
            continue
        own = private(node.args[0], root) if node.args else False
        if op.site.kind not in ACTIVATION_KINDS:  # nothing to fuse after it: the operator alone, compiled
            if op.site.inplace and not own:
                continue
            _fuse_operator(op, IDENTITY_SPEC, None)
            node.kwargs = {"activation": IDENTITY_SPEC}
            fused += 1
            if not (producers and absorb_producer(graph, node, root, IDENTITY_SPEC)):
                owned[op] = owned.get(op, True) and own
            continue
        if len(node.users) != 1:
            continue
        act = next(iter(node.users))
        spec = _node_spec(act, node, root)
        if spec is None:
            continue
        if spec.write_back or op.site.inplace:  # in place: only when nobody else can see the input tensor
            if not private(node.args[0], root):
                continue
            spec = ActivationSpec(spec.kernel, spec.params, False)
        activation = root.get_submodule(act.target) if act.op == "call_module" else None
        node.kwargs = {"activation": spec}
        act.replace_all_uses_with(node)
        graph.erase_node(act)
        _fuse_operator(op, spec, activation)
        fused += 1
        if not (producers and absorb_producer(graph, node, root, spec)):
            owned[op] = owned.get(op, True) and own
    return fused


def _fuse_fx(root: nn.Module, producers: bool = True) -> int:
    """Fuse an fx-prepared model's forward (both forwards of a model traced differently per mode)."""
    cls = type(root)
    modes = mode_forwards(cls)
    forwards = [cls.forward] if modes is None else [modes.eval, modes.train]
    owned: dict[MeanSparse, bool] = {}
    fused, new = 0, []
    for forward in forwards:
        if forward is None:
            new.append(None)
            continue
        root.__class__ = fx_class(cls, forward)  # trace this graph
        try:
            graph = _Retracer().trace(root)
        finally:
            root.__class__ = cls
        fused += _fuse_graph(graph, root, producers, owned)
        graph.lint()
        new.append(type(fx.GraphModule(root, graph, cls.__name__)).forward)
    for op, own in owned.items():  # an operator in two graphs owns its input only if it does in both
        _own_input(op, own)
    if not fused:
        return 0
    fused_modes = None if modes is None else modes._replace(eval=new[0], train=new[1])
    swap_class(root, fx_class(cls, new[0], fused_modes))
    return fused


# ---------------------------------------------------------------------------------------------- public
def fuse(model: nn.Module, *, producers: bool = True) -> nn.Module:
    """Fuse every operator with the activation right after it (in place; returns ``model``).

    ``producers``: in fx-prepared models also compute the eval BatchNorm and/or residual add that feeds a
    site inside its kernel (:mod:`meansparse.accel.producer`; ReLU and split-path activations).

    Sites whose activation is not fused (PReLU, activations with hooks, subclasses of built-in activations,
    in-place registered classes) or whose in-place activation mutates a tensor other code reads keep the
    unfused path.  Idempotent.  :func:`fused_sites` lists what was fused.  Operators that learn
    (:func:`meansparse.placement.learn_statistics`) are refused: the fused kernels do not update statistics.
    """
    if any(op.learns for op in operators(model)):
        raise ValueError("the model's operators learn (learn_statistics): fused operators would not update their "
                         "statistics; fuse after training, or call learn_statistics(model, False) first")
    for child in list(model.modules()):
        if type(child) is MeanSparseActivation:  # subclasses may change forward: leave them alone
            spec = module_spec(child.activation)
            if spec is None:
                continue
            swap_class(child, FusedMeanSparseActivation)
            attach(child, "spec", spec)
            _fuse_operator(child.meansparse, spec, child.activation)
        elif type(child) is MeanSparseOutput:
            swap_class(child, FusedMeanSparseOutput)
            _fuse_operator(child.meansparse, IDENTITY_SPEC, None)
            _own_input(child.meansparse, fresh_module(child.module) and not child.meansparse.site.inplace)
    for m in list(model.modules()):
        rec = get_record(m)
        if rec is not None and rec.config.get("method") == "fx" and not swapped(m):
            _fuse_fx(m, producers)
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse` (in place; returns ``model``)."""
    for m in list(model.modules()):
        restore_class(m)
        detach(m, "spec")
        if isinstance(m, MeanSparse):
            detach(m, "activation_module")
            detach(m, "owns_input")
            m.__dict__.pop("fused_activation", None)
            m.__dict__.pop("fused_producer", None)
    return model


def fused_sites(model: nn.Module) -> list[str]:
    """Names of the sites currently fused with their activation."""
    return [op.site.name for op in operators(model) if op.fused_activation is not None]
