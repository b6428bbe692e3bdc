"""Fingerprints that tie an evaluation to its inputs: per-batch seeds, model and data hashes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["config_hash", "data_hash", "derive_seed", "example_digests", "examples_hash", "model_hash"]


def derive_seed(seed: int, attack: str, batch: int) -> int:
    """Seed of one (attack, batch): independent of batch order and of which batches were resumed."""
    digest = hashlib.sha256(f"{seed}/{attack}/{batch}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def model_hash(model: nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes): any change to weights, statistics or
    alphas gives a different hash."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_hash(x: torch.Tensor, y: torch.Tensor) -> str:
    """sha256 over the examples and labels (dtypes, shapes, bytes), so a resume never mixes data sets."""
    h = hashlib.sha256()
    for t in (x, y):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def config_hash(config: Mapping[str, Any]) -> str:
    """Short sha256 of an evaluation's JSON config: names what belongs to one evaluation on disk."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def example_digests(x: torch.Tensor, y: torch.Tensor) -> list[bytes]:
    """sha256 of each example (its image bytes, then its int64 label): what a streamed evaluation hashes,
    batch by batch, in its clean pass."""
    out = []
    x = x.detach().cpu().contiguous()
    y = y.detach().cpu().to(torch.int64).contiguous()
    for xi, yi in zip(x, y):
        h = hashlib.sha256(xi.reshape(-1).view(torch.uint8).numpy())
        h.update(yi.reshape(1).view(torch.uint8).numpy())
        out.append(h.digest())
    return out


def examples_hash(digests: list[bytes], dtype: torch.dtype, shape: tuple[int, ...]) -> str:
    """sha256 over the per-example digests in order (with the images' dtype and per-example shape): the
    data hash of a streamed evaluation.  It depends only on the examples, not on the batch size, the number
    of ranks or the worker processes; it differs from :func:`data_hash` of the same tensors (a state file
    written in memory is not resumed from a stream: the resume refuses, it never mixes)."""
    h = hashlib.sha256(f"examples|{dtype}|{tuple(shape)}|{len(digests)}|".encode())
    for d in digests:
        h.update(d)
    return h.hexdigest()
