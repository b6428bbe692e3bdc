"""``prepare``: insert a MeanSparse operator before each selected activation; ``remove`` undoes it.

Two strategies, because real models differ:

* ``method="fx"`` (:mod:`~meansparse.placement.fx_strategy`) traces the model with ``torch.fx`` and inserts an
  operator node right before every activation *call site*, module or functional (``F.relu``, ``torch.relu``,
  ``x.relu()`` ...).  The prepared model stays an instance of the user's class with the traced forward, sharing
  the original parameters; operators live in its ``meansparse`` ModuleList.
* ``method="modules"`` (:mod:`~meansparse.placement.module_strategy`) works on models that do not trace: each
  activation module is wrapped (operator first, original activation kept as child).

``method="auto"`` tries fx and falls back to modules with a warning saying why tracing failed.  The prepared
model keeps a :class:`~meansparse.placement.record.PreparedRecord` so :func:`remove` gives the original back.

Besides "before an activation", operators go on the *output* of a module (``outputs=`` regexes of module
names, site kind ``"output"``) and on the output of every tensor + tensor addition (``residual_adds=True``,
site kind ``"add"``).  ``preset=`` picks these arguments for known architecture families
(:mod:`meansparse.placement.presets`).
"""

from __future__ import annotations

import copy
import random
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .._utils import as_args, eval_mode, preserved_state, warn_at_caller
from ..core import ACTIVATION_KINDS, check_centering, operators
from .candidates import Candidate, SelectionError, select
from .fx_strategy import FxResult, ModeForwards, prepare_fx
from .module_strategy import prepare_modules, registrations
from .presets import register_family_activations, resolve_preset
from .record import PreparedRecord, clear_record, get_record, set_record
from .registry import activation_lookalikes, activation_names, secondary_names
from .wrappers import WRAPPERS, MeanSparseActivation, MeanSparseOutput

__all__ = ["prepare", "PrepareOptions", "prepare_from_config", "remove", "FxPrepared", "fx_class", "mode_forwards"]


class FxPrepared:
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
        rec = get_record(self)  # type: ignore[arg-type]
        if rec is None or rec.original is None:
            raise TypeError(
                "a model prepared in place with method='fx' cannot be pickled; save its "
                "state with meansparse.save or prepare with inplace=False"
            )
        states = [
            {"state": op.state_dict(), "layout": op.layout, "gradient": op.gradient}
            for op in operators(self)  # type: ignore[arg-type]
        ]
        return (rebuild_fx, (rec.original, rec.config, states))


def rebuild_fx(original: nn.Module, config: dict, states: list[dict]) -> nn.Module:
    """Unpickle an fx-prepared model: prepare the original again and load each operator's state."""
    model = prepare_from_config(original, config)
    for op, st in zip(operators(model), states, strict=True):
        op.layout = st["layout"]
        op.gradient = st["gradient"]
        op.load_state_dict(st["state"])
    return model


def fx_class(cls: type, forward: Callable, modes: ModeForwards | None = None) -> type:
    """``cls`` with ``forward`` (a traced graph's): the class of an fx-prepared (or fused) model.  With
    ``modes`` (train and eval mode trace differently) the forward runs ``modes.eval`` or ``modes.train`` by
    the model's mode."""
    base = next(c for c in cls.__mro__ if not issubclass(c, FxPrepared) and c is not object
                and issubclass(c, nn.Module))
    body = {"forward": forward, "__module__": base.__module__, "__qualname__": base.__qualname__}
    if modes is not None:
        body.update(forward=_by_mode, _meansparse_modes=modes)
    return type(base.__name__, (FxPrepared, base), body)


def mode_forwards(cls: type) -> ModeForwards | None:
    """The per-mode forwards of an fx-prepared class, or None when one graph serves both modes."""
    return getattr(cls, "_meansparse_modes", None)


def _by_mode(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The forward of a model traced differently in train and eval mode: the graph of its mode."""
    modes: ModeForwards = type(self)._meansparse_modes  # type: ignore[attr-defined]
    mixed = [q for q in modes.modules if self.get_submodule(q).training != self.training]
    if mixed:
        raise RuntimeError(
            f"{type(self).__name__} is in {'train' if self.training else 'eval'} mode but {mixed[:3]} are not: "
            "torch.fx baked their train / eval branches into the prepared forward, so the whole model must be "
            "in one mode (model.train() / model.eval()), or prepare with method='modules'"
        )
    if not self.training:
        return modes.eval(self, *args, **kwargs)
    if modes.train is None:
        raise RuntimeError(f"this fx-prepared {type(self).__name__} runs in eval mode only: {modes.issue}; "
                           "put it in eval mode, or prepare with method='modules' to run it in train mode")
    return modes.train(self, *args, **kwargs)


def _same_outputs(a: Any, b: Any) -> bool:
    fa = [t for t in tree_flatten(a)[0] if isinstance(t, Tensor)]
    fb = [t for t in tree_flatten(b)[0] if isinstance(t, Tensor)]
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


def _as_list(v: str | Sequence[str] | None) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    return list(v)



@dataclass(frozen=True, eq=False)
class PrepareOptions:
    """The arguments of :func:`prepare` besides the model, as one value (their meaning: see there)."""

    exclude: str | Sequence[str] | None = None
    include: str | Sequence[str] | None = None
    indices: int | Sequence[int] | None = None
    centering: str = "channel"
    activations: Iterable[Any] | None = None
    example_inputs: Any = None
    method: str = "auto"
    inplace: bool = False
    after_residual_add: bool | None = None
    outputs: str | Sequence[str] | None = None
    residual_adds: bool = False
    preset: str | None = None


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
    ``"swin"``, ``"convnext"``, ``"generic"`` or ``"auto"`` (detected; see :mod:`meansparse.placement.presets`);
    its exclusions and outputs are added to the ones given here.

    Tanh / Sigmoid / Hardsigmoid (mostly gates) get sites only in a model with no other known activation;
    a model with no activation site at all is a warning naming the modules that look like activations.
    """
    options = PrepareOptions(
        exclude=exclude, include=include, indices=indices, centering=centering, activations=activations,
        example_inputs=example_inputs, method=method, inplace=inplace, after_residual_add=after_residual_add,
        outputs=outputs, residual_adds=residual_adds, preset=preset,
    )
    found: dict[str, bool] = {}
    prepared = _prepare(model, options, found)
    if activations is not None or found.get("activation", True):
        return prepared
    alt_found: dict[str, bool] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the first attempt has already said what there was to say
        alt = _prepare(remove(prepared), replace(options, activations=sorted(secondary_names())), alt_found)
    if alt_found.get("activation"):
        return alt
    prepared = _prepare(remove(alt), options, {})
    _warn_no_activation(model)
    return prepared


def _warn_no_activation(model: nn.Module) -> None:
    looks = activation_lookalikes(model)
    hint = (f"modules that look like activations: {', '.join(f'{k} x{v}' for k, v in sorted(looks.items()))}; "
            "if they are, register their classes with meansparse.register_activation(cls) and prepare again"
            if looks else "register the model's activation with meansparse.register_activation(cls_or_function)")
    warn_at_caller(f"meansparse.prepare: no known activation in {type(model).__name__}, so no site before an "
                   f"activation; {hint}.")


@dataclass(frozen=True)
class _Plan:
    """What ``prepare`` does with its options on this model: the preset's arguments merged in, every pattern
    checked, the activation names normalised."""

    names: set[str] | None  # activation class / function names, None: every known one
    include: list[str]
    exclude: list[str]
    outputs: list[str]
    residual_adds: bool
    method: str  # "auto", "fx" or "modules"
    preset: str | None  # the preset's resolved name

    @property
    def output_patterns(self) -> list[re.Pattern]:
        return [re.compile(p) for p in self.outputs]


def _plan(model: nn.Module, options: PrepareOptions) -> _Plan:
    """Check ``options`` against ``model`` and merge the preset's arguments into them."""
    if options.method not in ("auto", "fx", "modules"):
        raise ValueError(f"method must be 'auto', 'fx' or 'modules', got {options.method!r}")
    check_centering(options.centering)
    if any(isinstance(m, WRAPPERS) for m in model.modules()):
        raise ValueError("model is already prepared (it contains MeanSparse operators); call meansparse.remove first")
    names = activation_names(options.activations)
    inc, exc, outs = _as_list(options.include), _as_list(options.exclude), _as_list(options.outputs)
    residual_adds, method, preset_name = options.residual_adds, options.method, None
    if options.preset is not None:
        preset_name, spec = resolve_preset(options.preset, model)
        exc = list(spec.get("exclude", ())) + exc
        outs = list(spec.get("outputs", ())) + outs
        residual_adds = bool(residual_adds or spec.get("residual_adds", False))
        if method == "auto":
            method = spec.get("method", "auto")
    for p in inc + exc + outs:
        try:
            re.compile(p)  # fail early on a bad pattern
        except re.error as e:
            raise ValueError(f"bad regular expression {p!r} for include/exclude/outputs: {e}") from None
    return _Plan(names, inc, exc, outs, residual_adds, method, preset_name)


def _config(plan: _Plan, options: PrepareOptions) -> dict[str, Any]:
    """The record's config: the arguments that re-apply this ``prepare`` (save/load, pickling)."""
    indices = options.indices
    config = {
        "include": plan.include,
        "exclude": plan.exclude,
        "indices": [indices] if isinstance(indices, int) else (None if indices is None else list(indices)),
        "after_residual_add": options.after_residual_add,
        "centering": options.centering,
        "activations": None if plan.names is None else sorted(plan.names),
        "method": plan.method,
        "probed": options.example_inputs is not None,
        "outputs": plan.outputs,
        "residual_adds": bool(plan.residual_adds),
        "preset": plan.preset,  # informative: its arguments are already in the entries above
    }
    args = _probe_args(options)
    if args is not None and len(args) == 1 and isinstance(args[0], Tensor) and args[0].ndim >= 1:
        config["input_shape"] = list(args[0].shape[1:])
    return config


def _probe_args(options: PrepareOptions) -> tuple | None:
    return None if options.example_inputs is None else as_args(options.example_inputs)


def _selector(plan: _Plan, options: PrepareOptions,
              found: dict[str, bool] | None) -> Callable[[list[Candidate]], list[Candidate]]:
    """What a strategy calls with its candidates to get the selected ones; ``found["activation"]`` then says
    whether the model had activation sites to select from."""

    def chosen(cands: list[Candidate]) -> list[Candidate]:
        if found is not None:
            found["activation"] = any(c.site.kind in ACTIVATION_KINDS for c in cands)
        return select(cands, plan.include, plan.exclude, options.after_residual_add, options.indices)

    return chosen


def _prepare(model: nn.Module, options: PrepareOptions, found: dict[str, bool] | None = None) -> nn.Module:
    """:func:`prepare` with one set of activations: fx, falling back to modules when ``method="auto"``."""
    plan = _plan(model, options)
    config = _config(plan, options)
    chosen = _selector(plan, options, found)
    before = {id(m): m.training for m in model.modules()}
    if plan.method in ("auto", "fx"):
        prepared = _prepare_fx(model, plan, options, config, chosen)
        if prepared is not None:
            return _match_mode(prepared, before)
    target, _ = prepare_modules(
        model,
        plan.names,
        chosen,
        options.centering,
        options.example_inputs,
        options.inplace,
        needs_probe=options.after_residual_add is not None,
        outputs=plan.output_patterns,
        residual_adds=plan.residual_adds,
    )
    config["method"] = "modules"
    set_record(target, PreparedRecord(original=None if options.inplace else model, config=config))
    return _match_mode(target, before)


def _prepare_fx(model: nn.Module, plan: _Plan, options: PrepareOptions, config: dict[str, Any],
                chosen: Callable[[list[Candidate]], list[Candidate]]) -> nn.Module | None:
    """The model prepared by tracing (checked on the example inputs), or None after a tracing failure with
    ``method="auto"`` (warned: the modules strategy takes over)."""
    try:
        fx = prepare_fx(model, plan.names, chosen, options.centering, plan.output_patterns, plan.residual_adds)
        prepared = fx.prepared
        prepared.__class__ = fx_class(type(model), fx.forward, fx.modes)
        args = _probe_args(options)
        if args is not None:
            _check_traced(model, prepared, fx, args)
    except SelectionError:
        raise
    except Exception as e:  # noqa: BLE001 - any tracing failure triggers the fallback
        if plan.method == "fx":
            raise RuntimeError(f"torch.fx could not prepare {type(model).__name__}: {e}") from e
        warn_at_caller(
            f"meansparse.prepare: torch.fx tracing of {type(model).__name__} failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); falling back to "
            "method='modules' (activation modules only).")
        return None
    config["method"] = "fx"
    if not options.inplace:
        set_record(prepared, PreparedRecord(original=model, config=config, attr=fx.attr, code=fx.code))
        return prepared
    # validated on the shallow copy: now convert the model object itself
    for k, v in prepared.__dict__.items():
        model.__dict__.setdefault(k, v)  # tracing constants
    model._modules[fx.attr] = prepared._modules[fx.attr]
    cls = type(model)
    model.__class__ = type(prepared)
    set_record(model, PreparedRecord(original=None, config=config, original_class=cls, attr=fx.attr, code=fx.code))
    return model


def _check_traced(model: nn.Module, prepared: nn.Module, fx: FxResult, args: tuple) -> None:
    """The probe forward: the traced model must reproduce the original's outputs (it also fixes layouts and
    channel counts); a train-mode graph that does not reproduce train mode is taken away, saying why.  The probe
    leaves no cache behind in the user's modules."""
    with preserved_state(model), eval_mode(model), torch.no_grad():
        ref = model(*args)
    with preserved_state(model), eval_mode(prepared), torch.no_grad():
        got = prepared(*args)
    if not _same_outputs(ref, got):
        raise RuntimeError("the traced model does not reproduce the original outputs")
    if fx.modes is not None and fx.modes.train is not None:
        issue = _train_probe(model, prepared, args)
        if issue is not None:  # eval mode stays available; train mode says why it is not
            prepared.__class__ = fx_class(type(model), fx.forward, fx.modes._replace(train=None, issue=issue))


@contextmanager
def _train_run(model: nn.Module, seed: int = 0) -> Iterator[None]:
    """Train mode, no grad, the torch and Python random generators seeded; afterwards every buffer, attribute,
    mode and generator as before (a probe must not move BatchNorm statistics or the user's random streams)."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    state = random.getstate()
    cuda = sorted({b.device.index or 0 for b, _ in buffers if b.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda), preserved_state(model), torch.no_grad():
            torch.manual_seed(seed)
            random.seed(seed)
            model.train()
            yield
    finally:
        random.setstate(state)
        for m, t in modes:
            m.training = t
        with torch.no_grad():
            for b, v in buffers:
                b.copy_(v)


def _train_probe(model: nn.Module, prepared: nn.Module, args: tuple) -> str | None:
    """Why the prepared model's train-mode graph cannot stand in for the model in train mode (it fails, or
    its outputs differ on the example inputs with the same random streams), or None."""
    try:
        with _train_run(model):
            ref = model(*args)
    except Exception:  # noqa: BLE001 - e.g. BatchNorm on one value per channel: nothing to compare with
        return None
    try:
        with _train_run(prepared):
            got = prepared(*args)
    except Exception as e:  # noqa: BLE001
        return f"its train-mode graph fails ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if not _same_outputs(ref, got):
        return "its train-mode graph does not reproduce the model in train mode (a branch torch.fx cannot see)"
    return None


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


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`prepare`: return the original model (no MeanSparse left)."""
    rec = get_record(model)
    if rec is not None and rec.original is not None:
        return rec.original
    for reg in registrations(model):
        rc = get_record(reg.child)
        if rc is not None and rc.original is not None:
            reg.parent._modules[reg.attr] = rc.original
    for m in list(model.modules()):
        rc = get_record(m)
        if rc is not None:
            if rc.original_class is not None:  # fx, in place
                m._modules.pop(rc.attr, None)
                m.__class__ = rc.original_class
            clear_record(m)
    for reg in registrations(model):
        if isinstance(reg.child, MeanSparseActivation):
            reg.parent._modules[reg.attr] = reg.child.activation
    while True:  # output wrappers may be nested: unwrap until none is left
        wrapped = [r for r in registrations(model) if isinstance(r.child, MeanSparseOutput)]
        if not wrapped:
            break
        for reg in wrapped:
            if reg.parent._modules.get(reg.attr) is reg.child:
                reg.parent._modules[reg.attr] = reg.child.module
    if operators(model):
        raise RuntimeError("could not remove every MeanSparse operator from this model")
    return model
