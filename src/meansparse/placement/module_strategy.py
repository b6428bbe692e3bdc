"""The modules strategy, for models that do not trace: each activation module is replaced in its parent by a
:class:`~meansparse.placement.wrappers.MeanSparseActivation`, and a module whose output gets an operator is
wrapped in a :class:`~meansparse.placement.wrappers.MeanSparseOutput`.

Functional activations cannot be covered this way; with ``example_inputs`` one probe forward records the call
order, the residual adds a module's forward returns, and the functional activations left uncovered (warned).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .._utils import as_args, eval_mode, model_device, preserved_state, shallow_copy, warn_at_caller
from ..core import MeanSparse, SiteInfo
from .candidates import Candidate, make_operator, matches
from .registry import (
    ADD_METHOD_NAMES,
    activation_classes,
    function_activation,
    is_activation_module,
    method_activation,
    producer_hint,
)
from .wrappers import MeanSparseActivation, MeanSparseOutput

__all__ = ["Registration", "registrations", "prepare_modules"]


class Registration(NamedTuple):
    """One place a child module is registered: ``parent._modules[attr] is child``."""

    parent: nn.Module
    attr: str
    qname: str
    child: nn.Module


def registrations(model: nn.Module) -> list[Registration]:
    """Every registration of a child module, duplicates included, in pre-order."""
    out = []
    for pname, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is not None:
                out.append(Registration(parent, attr, f"{pname}.{attr}" if pname else attr, child))
    return out


def _sibling_hint(parent: nn.Module, attr: str) -> str | None:
    """Layout from the module registered just before ``attr`` (a Sequential's previous layer)."""
    prev = None
    for a, child in parent._modules.items():
        if a == attr:
            break
        prev = child
    return producer_hint(prev) if prev is not None else None


class _Produced(NamedTuple):
    func: Any
    tensor_add: bool
    scope: str


class _ProbeMode(TorchFunctionMode):
    """Records the producer of every tensor, functional activations called outside activation modules and
    tensor + tensor adds per calling module."""

    def __init__(self) -> None:
        super().__init__()
        self.producer: dict[int, _Produced] = {}  # id(tensor) -> what made it
        self.keep: list[Tensor] = []  # keeps ids unique during the probe
        self.scope: list[str] = [""]
        self.in_activation = 0
        self.uncovered: dict[tuple[str, str], int] = {}
        self.adds: dict[str, int] = {}  # scope -> tensor adds executed directly in that module's forward

    def produced(self, t: Any) -> _Produced:
        return self.producer.get(id(t), _Produced(None, False, ""))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.in_activation == 0:
            entry = function_activation(func) or method_activation(func)
            if entry is not None and not entry.secondary:  # a sigmoid is mostly a gate
                key = (self.scope[-1], entry.name)
                self.uncovered[key] = self.uncovered.get(key, 0) + 1
        if isinstance(out, Tensor):
            tensor_add = getattr(func, "__name__", "") in ADD_METHOD_NAMES and (
                sum(isinstance(a, Tensor) for a in args) >= 2
            )
            if tensor_add and self.in_activation == 0:
                self.adds[self.scope[-1]] = self.adds.get(self.scope[-1], 0) + 1
            self.producer[id(out)] = _Produced(func, tensor_add, self.scope[-1])
            self.keep.append(out)
        return out


@dataclass
class _SiteCall:
    """What the probe learnt of one site: calls, first-call order, and (module outputs, returned adds) the
    layout hint of what made the output."""

    calls: int = 0
    order: int | None = None
    hint: str | None = None


@dataclass
class _Probe:
    ops: dict[int, _SiteCall]  # id(operator) -> its calls
    after: dict[tuple[str, str], _SiteCall]  # (module, "output" | "add") -> operator to put on its output
    uncovered: dict[tuple[str, str], int]  # (scope, function) -> uncovered functional activation calls
    uncovered_adds: dict[str, int] = field(default_factory=dict)  # scope -> adds no module returns


class _ProbeHooks:
    """The hooks of the probe forward: before each operator (its first call's order; what made its input, which
    goes into the operator's site record before the operator infers its layout from it), into and out of each
    module (the scope ``_ProbeMode`` records calls in) and, for watched modules, what the module returned (an add
    made in its own forward, an output that ``outputs=`` selects)."""

    def __init__(self, mode: _ProbeMode, ops: list[MeanSparse], outputs: Sequence[re.Pattern],
                 residual_adds: bool) -> None:
        self.mode = mode
        self.ops = {id(op): _SiteCall() for op in ops}
        self.after: dict[tuple[str, str], _SiteCall] = {}
        self.covered_adds: dict[str, int] = {}  # module -> adds its forward returned
        self.outputs, self.residual_adds = outputs, residual_adds
        self.first_calls = 0

    def install(self, model: nn.Module, ops: list[MeanSparse], names: set[str] | None) -> list[Any]:
        """Register every hook on ``model`` (``ops``: its operators); returns the handles."""
        skip = set(self.ops)
        for m in model.modules():
            if isinstance(m, MeanSparseActivation):
                skip.update((id(m.activation), id(m.meansparse)))
        handles = [op.register_forward_pre_hook(self.before_operator) for op in ops]
        for qname, m in model.named_modules():
            is_act = (isinstance(m, MeanSparseActivation) or is_activation_module(m, names)
                      or isinstance(m, activation_classes()))
            watch = bool(qname) and id(m) not in skip and not isinstance(m, (MeanSparse, MeanSparseOutput))
            handles.append(m.register_forward_pre_hook(partial(self.enter, qname, is_act)))
            handles.append(m.register_forward_hook(partial(self.leave, qname, is_act, watch)))
        return handles

    def first_call(self, rec: _SiteCall) -> bool:
        rec.calls += 1
        if rec.order is not None:
            return False
        rec.order = self.first_calls
        self.first_calls += 1
        return True

    def before_operator(self, op: MeanSparse, inputs: tuple) -> None:
        if self.first_call(self.ops[id(op)]):
            made = self.mode.produced(inputs[0] if inputs else None)
            hint = producer_hint(made.func) if made.func is not None else None
            op.site = replace(op.site, after_residual_add=made.tensor_add,
                              layout_hint=op.site.layout_hint if hint is None else hint)

    def enter(self, name: str, is_act: bool, module: nn.Module, inputs: tuple) -> None:
        self.mode.scope.append(name)
        if is_act:
            self.mode.in_activation += 1

    def leave(self, name: str, is_act: bool, watch: bool, module: nn.Module, inputs: tuple, output: Any) -> None:
        self.mode.scope.pop()
        if is_act:
            self.mode.in_activation -= 1
        if watch and isinstance(output, Tensor):
            self._returned(name, output)

    def _returned(self, name: str, output: Tensor) -> None:
        made = self.mode.produced(output)
        kinds = []
        if self.residual_adds and made.tensor_add and made.scope == name:  # this forward returns the add
            self.covered_adds[name] = self.covered_adds.get(name, 0) + 1
            kinds.append("add")
        if self.outputs and matches(self.outputs, name):
            kinds.append("output")
        for kind in kinds:
            rec = self.after.setdefault((name, kind), _SiteCall())
            if self.first_call(rec):
                rec.hint = producer_hint(made.func) if made.func is not None else None


def _probe(
    model: nn.Module,
    ops: list[MeanSparse],
    args: tuple,
    names: set[str] | None,
    outputs: Sequence[re.Pattern] = (),
    residual_adds: bool = False,
) -> _Probe:
    """One forward to learn call order, residual adds, producers and uncovered functional activations."""
    mode = _ProbeMode()
    hooks = _ProbeHooks(mode, ops, outputs, residual_adds)
    handles = hooks.install(model, ops, names)
    try:
        with eval_mode(model), torch.no_grad(), mode:
            model(*args)
    finally:
        for h in handles:
            h.remove()
    covered = hooks.covered_adds
    uncovered_adds = {k: n - covered.get(k, 0) for k, n in mode.adds.items() if n > covered.get(k, 0)}
    return _Probe(hooks.ops, hooks.after, mode.uncovered, uncovered_adds)


def _subtree_ends(locations: list[Registration]) -> dict[str, int]:
    """Registration index of the last module inside each qualified name's subtree (pre-order listing)."""
    ends: dict[str, int] = {}
    for i, reg in enumerate(locations):
        parts = reg.qname.split(".")
        for j in range(1, len(parts) + 1):
            ends[".".join(parts[:j])] = i
    return ends


def _warn_coverage(probe: _Probe, residual_adds: bool, reused: list[str]) -> None:
    if probe.uncovered:
        listing = ", ".join(f"{fn} in '{scope or '<root>'}' x{n}" for (scope, fn), n in sorted(probe.uncovered.items()))
        warn_at_caller(
            "meansparse.prepare(method='modules') cannot insert operators before functional activations; "
            f"not covered: {listing}. Use a traceable model (method='fx') or nn.Module activations.")
    if residual_adds and probe.uncovered_adds:
        listing = ", ".join(f"'{scope or '<root>'}' x{n}" for scope, n in sorted(probe.uncovered_adds.items()))
        warn_at_caller(
            "meansparse.prepare(method='modules', residual_adds=True) can only put an operator after an add "
            f"that a module's forward returns; not covered: adds inside {listing}. Use method='fx'.")
    if reused:
        warn_at_caller(
            "meansparse.prepare(method='modules'): modules called more than once share one "
            f"operator and pooled statistics: {', '.join(reused)}. method='fx' gives one per call site.")


class _Target:
    """The model being prepared: ``model`` itself (in place), or a shallow copy in which each container on the
    way to a changed module is shallow-copied too, so that the user's model keeps its own."""

    def __init__(self, model: nn.Module, inplace: bool) -> None:
        self.root = model if inplace else shallow_copy(model)
        self.inplace = inplace
        self._copies: dict[int, nn.Module] = {id(model): self.root}
        self._owned = {id(self.root)}

    def parent_at(self, qname: str) -> nn.Module:
        """The parent of the module at ``qname`` in the prepared model, shallow-copying each container on the way."""
        cur = self.root
        for part in qname.split(".")[:-1]:
            child = cur._modules[part]
            if not self.inplace and id(child) not in self._owned:
                if id(child) not in self._copies:
                    self._copies[id(child)] = shallow_copy(child)
                    self._owned.add(id(self._copies[id(child)]))
                child = self._copies[id(child)]
                cur._modules[part] = child
            cur = child
        return cur


def _wrap_activations(target: _Target, locations: list[Registration], names: set[str] | None, centering: str,
                      device: torch.device | None) -> list[Candidate]:
    """Wrap every activation module in a :class:`MeanSparseActivation` with a new operator (a module registered
    twice gets the same wrapper: one operator); one candidate each, in registration order."""
    wrappers: dict[int, MeanSparseActivation] = {}
    cands: list[Candidate] = []
    for reg_order, (parent, attr, qname, child) in enumerate(locations):
        if not is_activation_module(child, names) or isinstance(parent, MeanSparseActivation):
            continue
        if id(child) in wrappers:
            target.parent_at(qname)._modules[attr] = wrappers[id(child)]  # registered twice: one operator
            continue
        site = SiteInfo(name=qname, activation=type(child).__name__, kind="module", module_path=qname,
                        layout_hint=_sibling_hint(parent, attr), inplace=getattr(child, "inplace", False) is True)
        c = Candidate(site, module=child, order=reg_order)
        w = MeanSparseActivation(child, make_operator(c, -1, centering, device))
        wrappers[id(child)] = w
        target.parent_at(qname)._modules[attr] = w
        c.wrapper, c.op = w, w.meansparse
        cands.append(c)
    return cands


def _after_candidate(model: nn.Module, qname: str, kind: str, order: float, hint: str | None) -> Candidate:
    """The candidate for an operator on the output of module ``qname`` (``kind`` "output") or on the add its
    forward returns ("add")."""
    mod = model.get_submodule(qname)
    site = SiteInfo(name=f"{qname}.{'add' if kind == 'add' else 'output'}",
                    activation="add" if kind == "add" else type(mod).__name__, kind=kind, module_path=qname,
                    after_residual_add=kind == "add", layout_hint=hint)
    return Candidate(site, module=mod, order=order)


def _probed_candidates(model: nn.Module, cands: list[Candidate], probe: _Probe, residual_adds: bool) -> list[Candidate]:
    """Order the activation candidates by their first call (never called: after every called one), give each the
    record the probe completed on its operator, and return the candidates on module outputs and returned adds
    the probe found; warns about what stays uncovered and about modules called more than once."""
    reused = []
    for c in cands:
        rec = probe.ops[id(c.op)]
        c.order = rec.order if rec.order is not None else 1e9 + c.order
        c.site = c.op.site
        if rec.calls > 1:
            reused.append(f"{c.site.name} ({rec.calls} calls)")
    after = []
    for (qname, kind), rec in probe.after.items():
        c = _after_candidate(model, qname, kind, rec.order, rec.hint or producer_hint(model.get_submodule(qname)))
        after.append(c)
        if rec.calls > 1:
            reused.append(f"{c.site.name} ({rec.calls} calls)")
    _warn_coverage(probe, residual_adds, reused)
    return after


def _unprobed_candidates(model: nn.Module, cands: list[Candidate], locations: list[Registration], needs_probe: bool,
                         outputs: Sequence[re.Pattern], residual_adds: bool) -> list[Candidate]:
    """Without a probe: an error when the selection needs one, else a warning that functional activations and adds
    go unseen, and the candidates on module outputs, each after everything inside its module."""
    if needs_probe or residual_adds:
        what = "residual_adds=True" if residual_adds else "selecting by after_residual_add"
        raise ValueError(
            f"{what} with method='modules' needs example_inputs (one probe forward finds the adds), "
            "e.g. example_inputs=torch.zeros(1, 3, 32, 32)"
        )
    if cands:
        warn_at_caller(
            "meansparse.prepare(method='modules') without example_inputs cannot see functional activations "
            "(F.relu, x.relu(), ...) or residual adds; pass example_inputs to check coverage.")
    if not outputs:
        return []
    ends = _subtree_ends(locations)
    after = []
    for qname, m in model.named_modules():
        if qname and matches(outputs, qname) and not isinstance(m, (MeanSparse, MeanSparseOutput)):
            order = ends.get(qname, -1) + 0.9 - 0.01 * qname.count(".")  # inner modules end first
            after.append(_after_candidate(model, qname, "output", order, producer_hint(m)))
    return after


def _unwrap_unselected(root: nn.Module, cands: list[Candidate], chosen: list[Candidate]) -> None:
    """Put the activations that were not selected back in place, untouched."""
    chosen_ids = {id(c) for c in chosen}
    for c in cands:
        if id(c) not in chosen_ids and c.wrapper is not None:
            for reg in registrations(root):
                if reg.child is c.wrapper:
                    reg.parent._modules[reg.attr] = c.module


def _wrap_outputs(target: _Target, locations: list[Registration], chosen: list[Candidate], centering: str,
                  device: torch.device | None) -> None:
    """Operators on module outputs: wrap every registration of the module in one :class:`MeanSparseOutput`, inner
    modules first (an outer wrapper would hide the path to the inner ones)."""
    for c in sorted(chosen, key=lambda c: -c.site.module_path.count(".")):
        if c.wrapper is not None:
            continue
        c.op = make_operator(c, -1, centering, device)
        output_wrapper: MeanSparseOutput | None = None
        for reg in locations:
            if reg.child is c.module:
                parent = target.parent_at(reg.qname)
                if output_wrapper is None:
                    output_wrapper = MeanSparseOutput(parent._modules[reg.attr], c.op)
                parent._modules[reg.attr] = output_wrapper


def prepare_modules(
    model: nn.Module,
    names: set[str] | None,
    select: Callable[[list[Candidate]], list[Candidate]],
    centering: str,
    example_inputs: Any,
    inplace: bool,
    needs_probe: bool,
    outputs: Sequence[re.Pattern] = (),
    residual_adds: bool = False,
) -> tuple[nn.Module, list[MeanSparse]]:
    """Wrap the selected activation modules (and module outputs) of ``model`` (or of a shallow copy)."""
    target = _Target(model, inplace)
    device = model_device(model)
    locations = registrations(model)
    cands = _wrap_activations(target, locations, names, centering, device)
    # the probes leave no cache behind in the user's modules (in place, the user's model is the prepared one)
    untouched = nullcontext if inplace else partial(preserved_state, model)
    if example_inputs is not None:
        with untouched():
            probe = _probe(target.root, [c.op for c in cands], as_args(example_inputs), names, outputs, residual_adds)
        cands += _probed_candidates(model, cands, probe, residual_adds)
    else:
        cands += _unprobed_candidates(model, cands, locations, needs_probe, outputs, residual_adds)
    cands.sort(key=lambda c: c.order)
    chosen = select(cands)
    _unwrap_unselected(target.root, cands, chosen)
    _wrap_outputs(target, locations, chosen, centering, device)
    for k, c in enumerate(chosen):  # numbered in execution order: the record the operator and candidate share
        c.site = c.op.site = replace(c.site, index=k)
    ops = [c.op for c in chosen]
    if example_inputs is not None and any(op.channels is None for op in ops):
        with untouched(), eval_mode(target.root), torch.no_grad():  # operators added after the probe see data now
            target.root(*as_args(example_inputs))
    return target.root, ops
