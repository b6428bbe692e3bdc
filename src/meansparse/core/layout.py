"""Where the channels are: layout names, the channel dimension, and per-channel vectors broadcast to it.

Channels are dim 1 for conv features (NCHW, NC, NCL) and the last dim for token features (NLC in Swin/ViT,
NHWC in ConvNeXt MLPs).  Which one a site has is inferred from the tensor rank and a hint from what
produced the tensor (a Linear works on the last dim, a conv or norm layer on dim 1; see
:mod:`meansparse.placement.registry`).
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["LAYOUTS", "infer_layout", "channel_dim", "broadcast_channel"]

#: Layout name -> channel dimension.  ``NCL`` (channel-first 3-D, e.g. Conv1d) is an extension.
LAYOUTS: dict[str, int] = {"NCHW": 1, "NC": 1, "NCL": 1, "NLC": -1, "NHWC": -1}


def infer_layout(ndim: int, hint: str | None = None) -> str:
    """Layout from the tensor rank; ``hint`` ("first"/"last") comes from the producer (Conv vs Linear)."""
    if ndim < 2:
        raise ValueError(f"MeanSparse needs a batched input with a channel dimension, got a {ndim}-D tensor")
    if ndim == 2:
        return "NC"
    if hint == "last":
        return "NLC" if ndim == 3 else "NHWC"
    if ndim == 3:
        return "NCL" if hint == "first" else "NLC"
    return "NCHW"


def channel_dim(layout: str, ndim: int) -> int:
    """The (non-negative) channel dimension of an ``ndim``-D tensor in ``layout``."""
    d = LAYOUTS[layout]
    return d if d >= 0 else ndim + d


def broadcast_channel(v: Tensor, ndim: int, cd: int) -> Tensor:
    """A per-channel vector ``[C]`` (or a 0-dim scalar) shaped to broadcast along dim ``cd`` of an
    ``ndim``-D tensor."""
    if v.ndim == 0 or cd == ndim - 1:
        return v
    return v.reshape((-1,) + (1,) * (ndim - cd - 1))
