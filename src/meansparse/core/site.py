"""One record of what placement found about a site, held once.

Placement makes it for each insertion candidate, the operator made there holds it (``MeanSparse.site``), and
:class:`meansparse.placement.Site` reads it back: the facts are never copied field by field.  It is frozen;
placement gives an operator a new record (``dataclasses.replace``) when it learns more (the index after
selection, the layout hint and residual-add fact a probe forward finds).

A site *kind* says where an operator sits; it is not the fusion kernel of the activation after it
(:class:`meansparse.placement.registry.ActivationSpec`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SiteInfo", "SITE_KINDS", "ACTIVATION_KINDS"]

#: "module", "function", "method": before an activation called that way; "output": on a module's output;
#: "add": on the output of a tensor + tensor add (a residual connection).
SITE_KINDS = ("module", "function", "method", "output", "add")
#: The kinds of sites before an activation.
ACTIVATION_KINDS = ("module", "function", "method")


@dataclass(frozen=True)
class SiteInfo:
    """Where an operator sits: the facts placement found (see the module docstring)."""

    name: str = ""  # qualified name, searched by include/exclude regexes and a key of set_alpha
    index: int = -1  # position among the model's sites in execution order; -1 until they are numbered
    activation: str = ""  # "ReLU", "F.gelu", "Tensor.relu", ...; kind "output": the module class; "add": "add"
    kind: str = "module"  # one of SITE_KINDS
    module_path: str = ""  # the activation module, or the module whose forward calls the function / the add
    after_residual_add: bool = False  # the operator's input is the result of a tensor + tensor add
    layout_hint: str | None = None  # "first" / "last": where the producer puts the channels (Conv vs Linear)
    inplace: bool = False  # what follows works in place: later readers of the input expect it changed

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise ValueError(f"site kind must be one of {SITE_KINDS}, got {self.kind!r}")
