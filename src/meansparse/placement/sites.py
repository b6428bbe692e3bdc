"""The sites of a prepared model, and the settings that apply to all of them: alpha and the gradient mode."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

from torch import nn

from ..core import TRAIN_STATISTICS, MeanSparse, SiteInfo, check_alpha, check_momentum, check_sharpness, operators
from .prepare import prepare
from .record import get_record

__all__ = ["Site", "gradient_mode", "learn_statistics", "sites", "set_alpha", "straight_through"]


def _info_field(name: str) -> property:
    """A read-only view of one field of the site's record (no copy to drift from the operator's)."""
    return property(lambda self: getattr(self.info, name), doc=f"The site record's ``{name}``.")


@dataclass(frozen=True)
class Site:
    """One insertion site: where an operator sits (``info``: the operator's own record, not a copy) and what it
    sees.  ``index``, ``name``, ``activation``, ``kind``, ``module_path`` and ``after_residual_add`` read
    ``info`` (see :class:`~meansparse.core.SiteInfo`)."""

    info: SiteInfo
    layout: str | None  # NCHW / NC / NLC / NHWC (NCL for channel-first 3-D); None until data is seen
    channels: int | None

    @classmethod
    def of(cls, op: MeanSparse) -> Site:
        return cls(op.site, op.layout, op.channels)

    index = _info_field("index")
    name = _info_field("name")
    activation = _info_field("activation")
    kind = _info_field("kind")
    module_path = _info_field("module_path")
    after_residual_add = _info_field("after_residual_add")


def sites(model: nn.Module) -> list[Site]:
    """Insertion sites of a prepared model (its operators, never re-prepared); for a model that was never
    prepared, the sites ``prepare`` would create (on a copy; the model is unchanged)."""
    ops = operators(model)
    if not ops and not any(get_record(m) is not None for m in model.modules()):
        ops = operators(prepare(model))
    return [Site.of(o) for o in ops]


def set_alpha(model: nn.Module, alpha: float | Mapping[str | int, float]) -> nn.Module:
    """Set alpha everywhere (a number) or per site (a dict keyed by site name or index)."""
    ops = operators(model)
    if not ops:
        raise ValueError("model has no MeanSparse operators; call meansparse.prepare(model) first")
    if isinstance(alpha, Mapping):
        by_name = {o.site.name: o for o in ops}
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
    checked = [(o, check_alpha(v, o.name)) for o, v in plan]  # validate everything before changing anything
    for o, v in checked:
        o.set_alpha(v)
    return model


@contextmanager
def gradient_mode(model: nn.Module, mode: str, sharpness: float | None = None) -> Iterator[nn.Module]:
    """Every operator in ``mode`` (see ``GRADIENTS``) inside the block, as it was after: ``straight_through``
    for BPDA, ``surrogate`` / ``smooth`` (soft threshold of ``sharpness``) for the surrogate attacks."""
    ops = operators(model)
    previous = [(o.gradient, o.sharpness) for o in ops]
    k = check_sharpness(sharpness) if sharpness is not None else None
    try:
        for o in ops:
            o.gradient = mode
            if k is not None:
                o.sharpness = k
        yield model
    finally:
        for o, (g, s) in zip(ops, previous, strict=True):
            o.gradient, o.sharpness = g, s


def straight_through(model: nn.Module) -> AbstractContextManager[nn.Module]:
    """Use the straight-through (identity) backward in every operator inside the block (BPDA attacks)."""
    return gradient_mode(model, "straight_through")


def learn_statistics(model: nn.Module, enabled: bool = True, *, momentum: float | None = 0.1,
                     statistics: str = "running") -> nn.Module:
    """Opt every operator in (or out, ``enabled=False``) of training: in train mode a learning operator
    updates its statistics from each batch's exact moments (exponential filter of ``momentum``, or the exact
    pooled moments when None) and sparsifies with the updated running ones (``statistics="running"``) or the
    batch's (``"batch"``); eval mode always uses the running ones.  Off by default, so a post-training model
    put in train mode keeps its calibrated statistics."""
    ops = operators(model)
    if not ops:
        raise ValueError("model has no MeanSparse operators; call meansparse.prepare(model) first")
    m = check_momentum(momentum)
    if statistics not in TRAIN_STATISTICS:
        raise ValueError(f"statistics must be one of {TRAIN_STATISTICS}, got {statistics!r}")
    if enabled and any(o.fused_activation is not None or o.fused_producer for o in ops):
        raise ValueError("the model is fused (meansparse.fuse): fused operators do not learn; call "
                         "meansparse.unfuse(model) before training")
    for o in ops:
        o.learns, o.momentum, o.train_statistics = bool(enabled), m, statistics
    return model
