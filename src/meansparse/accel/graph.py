"""Facts about fx graph nodes that fusion needs: whether a node's tensor is private to its one reader."""

from __future__ import annotations

import operator as _op
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["private", "fresh_module", "pass_through", "through_identity"]


def _fresh_modules() -> tuple[type[nn.Module], ...]:
    return (
        nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
        nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm,
    )


_FRESH_FUNCTIONS = {_op.add, _op.sub, _op.mul, torch.add, torch.sub, torch.mul, F.conv1d, F.conv2d, F.conv3d,
                    F.linear, F.batch_norm, F.layer_norm, F.group_norm}
_FRESH_METHODS = {"add", "sub", "mul", "__add__", "__sub__", "__mul__", "__radd__", "__rmul__"}
_INPLACE_FUNCTIONS = {_op.iadd, _op.isub, _op.imul}
_INPLACE_METHODS = {"add_", "sub_", "mul_", "__iadd__", "__isub__", "__imul__"}


def fresh_module(m: nn.Module) -> bool:
    """Whether ``m``'s output is a tensor it just made and nobody else sees: a conv / linear / norm layer with
    no forward hooks (a hook may keep the output)."""
    return isinstance(m, _fresh_modules()) and not m._forward_hooks


def pass_through(node: Any, root: nn.Module, dropout: bool = True) -> bool:
    """Whether fx ``node`` calls an identity-like module with no hooks: ``nn.Identity`` (timm's placeholder for a
    disabled drop / drop-block / attention layer), or with ``dropout`` a dropout module, which in eval mode
    returns its input tensor itself and in train mode a new one."""
    if not isinstance(node, fx.Node) or node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return False
    m = root.get_submodule(node.target)
    kinds = (nn.Identity, nn.modules.dropout._DropoutNd) if dropout else (nn.Identity,)
    return isinstance(m, kinds) and not m._forward_hooks and not m._forward_pre_hooks


def through_identity(node: Any, root: nn.Module) -> tuple[Any, list]:
    """The node that produced ``node``'s tensor looking through ``nn.Identity`` calls read by one user only,
    and the identity nodes passed."""
    passed = []
    while pass_through(node, root, dropout=False) and len(node.users) == 1 and len(passed) < 8:
        passed.append(node)
        node = node.args[0]
    return node, passed


def private(node: Any, root: nn.Module, depth: int = 0) -> bool:
    """Whether fx ``node``'s tensor is freshly allocated and read by a single user (so mutating it, or not,
    is invisible to the rest of the graph)."""
    if not isinstance(node, fx.Node) or len(node.users) != 1 or depth > 8:
        return False
    if pass_through(node, root):  # the same tensor (identity, eval dropout) or a new one (train dropout)
        return private(node.args[0], root, depth + 1)
    if node.op == "call_module":
        return fresh_module(root.get_submodule(node.target))
    if node.op == "call_function" and node.target in _FRESH_FUNCTIONS:
        return True
    if node.op == "call_method" and node.target in _FRESH_METHODS:
        return True
    if (node.op == "call_function" and node.target in _INPLACE_FUNCTIONS) or (
        node.op == "call_method" and node.target in _INPLACE_METHODS
    ):
        return bool(node.args) and private(node.args[0], root, depth + 1)
    return False
