"""Insertion candidates, shared by the fx and the modules strategies: what a site would be (its
:class:`~meansparse.core.SiteInfo`), how the user's ``include`` / ``exclude`` / ``after_residual_add`` /
``indices`` select among them, and the operator made for each selected one (holding the candidate's record)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..core import MeanSparse, SiteInfo

__all__ = ["Candidate", "SelectionError", "select", "unique_names", "make_operator", "matches"]


@dataclass
class Candidate:
    """A place an operator could go: its site record, and what the strategy needs to put one there."""

    site: SiteInfo
    node: Any = None  # fx node (fx strategy)
    module: nn.Module | None = None  # activation module (modules strategy)
    order: float = 0.0
    wrapper: nn.Module | None = None  # modules strategy: the MeanSparseActivation put in the model
    op: MeanSparse | None = None  # modules strategy: the operator made for it
    calls: int = 0  # modules strategy: calls seen by the probe forward
    extra: dict = field(default_factory=dict)


class SelectionError(IndexError, ValueError):
    """Bad ``indices``, or ``include`` / ``exclude`` selecting nothing: a user error, never a reason to fall
    back from fx to modules."""


def matches(patterns: Sequence[re.Pattern], name: str) -> bool:
    return any(p.search(name) for p in patterns)


def select(
    cands: list[Candidate],
    include: list[str],
    exclude: list[str],
    after_residual_add: bool | None,
    indices: int | Sequence[int] | None,
) -> list[Candidate]:
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    names = [c.site.name for c in cands]
    for p in inc:
        if cands and not any(p.search(n) for n in names):
            raise SelectionError(f"include pattern {p.pattern!r} matches none of the {len(cands)} sites "
                                 f"({_some(names)}); an empty selection would insert no operator")
    out = [c for c in cands if (not inc or matches(inc, c.site.name)) and not matches(exc, c.site.name)]
    if after_residual_add is not None:
        out = [c for c in out if c.site.after_residual_add == after_residual_add]
    if cands and not out:
        raise SelectionError(f"the selection leaves none of the {len(cands)} sites ({_some(names)}): include="
                             f"{include}, exclude={exclude}, after_residual_add={after_residual_add}")
    if indices is not None:
        idx = [indices] if isinstance(indices, int) else list(indices)
        for i in idx:
            if not -len(out) <= i < len(out):
                raise SelectionError(f"site index {i} out of range: {len(out)} sites after include/exclude")
        chosen = sorted({i % len(out) for i in idx})
        out = [out[i] for i in chosen]
    return out


def _some(names: list[str], k: int = 4) -> str:
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")


def unique_names(cands: list[Candidate]) -> None:
    """First use of a name keeps it; later call sites of the same name get ``:1``, ``:2`` ..."""
    seen: dict[str, int] = {}
    for c in cands:
        k = seen.get(c.site.name, 0)
        seen[c.site.name] = k + 1
        if k:
            c.site = replace(c.site, name=f"{c.site.name}:{k}")


def make_operator(c: Candidate, index: int, centering: str, device: torch.device | None = None) -> MeanSparse:
    """The operator for ``c``: the candidate's record, numbered ``index``, becomes the operator's (one object)."""
    c.site = replace(c.site, index=index)
    op = MeanSparse(centering=centering, site=c.site)
    return op if device is None else op.to(device)
