"""The authors' released MeanSparse models as models prepared by this project.

RobustBench ships the authors' sparsified architectures (``model_zoo/architectures/Meansparse_*.py`` and
``sparsified_model.py``, ids ``Amini2024MeanSparse_*``): copies of the base architectures with their own
``MeanSparse`` modules built in.  :func:`import_reference` turns such a model into the base architecture
(robustbench's own class or timm's, same configuration, same weights) prepared with the matching preset, with
the reference's statistics and threshold installed at the same sites, so it computes the same logits and the
rest of meansparse (``calibrate``, ``set_alpha``, ``save``, ``evaluate``, fusing) works on it.

Families, recognised by the reference's classes:

========== ============================================================ =====================================
preset     reference                                                    base
========== ============================================================ =====================================
dm_wrn     ``Meansparse_wrn_70_16.DMWideResNet``,                       ``dm_wide_resnet.DMWideResNet``
           ``Meansparse_wrn_94_16.MeanSparse_DMWideResNet``
rawrn      ``Meansparse_ra_wrn_70_16.NormalizedWideResNet``             ``robustarch_wide_resnet.NormalizedWideResNet``
swin       ``Meansparse_swin_L.SwinTransformer`` (alone or behind its   timm ``SwinTransformer`` (behind
           ``normalize`` / ``model`` Sequential)                        robustbench's ``normalize_model``)
convnext   timm ``ConvNeXt`` edited by ``add_custom_layer_imagenet``    the same ConvNeXt, wrappers removed
           (``MeanSparse_imagenet`` in ``nn.Sequential`` wrappers)
========== ============================================================ =====================================
"""

from __future__ import annotations

import copy
import importlib
import math
from collections.abc import Iterator
from functools import partial

import torch
from torch import Tensor, nn

from ..core import operators
from ..placement import prepare
from .imports import import_robustbench, import_timm

__all__ = ["import_reference", "reference_family", "reference_sites"]

_ARCH = "robustbench.model_zoo.architectures."
#: (class name, defining module) of the reference's operators
_OPERATORS = {
    ("MeanSparse", _ARCH + "Meansparse_wrn_70_16"),
    ("MeanSparse", _ARCH + "Meansparse_wrn_94_16"),
    ("MeanSparse", _ARCH + "Meansparse_ra_wrn_70_16"),
    ("MeanSparse", _ARCH + "Meansparse_swin_L"),
    ("MeanSparse_imagenet", _ARCH + "sparsified_model"),
}
#: (class name, defining module) -> preset of the reference's network classes
_NETWORKS = {
    ("DMWideResNet", _ARCH + "Meansparse_wrn_70_16"): "dm_wrn",
    ("MeanSparse_DMWideResNet", _ARCH + "Meansparse_wrn_94_16"): "dm_wrn",
    ("NormalizedWideResNet", _ARCH + "Meansparse_ra_wrn_70_16"): "rawrn",
    ("SwinTransformer", _ARCH + "Meansparse_swin_L"): "swin",
    ("ConvNeXt", "timm.models.convnext"): "convnext",
}


def _key(m: nn.Module) -> tuple[str, str]:
    return type(m).__name__, type(m).__module__


def _is_operator(m: nn.Module) -> bool:
    return _key(m) in _OPERATORS


def _network(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(preset, network module) of a reference model, or None when it contains no reference operator."""
    if not any(_is_operator(m) for m in model.modules()):
        return None
    found = [(_NETWORKS[_key(m)], m) for m in model.modules() if _key(m) in _NETWORKS]
    if len(found) != 1:
        kinds = sorted({f"{type(m).__module__}.{type(m).__name__}" for _, m in found})
        raise ValueError(
            f"import_reference: {type(model).__name__} contains the MeanSparse reference operators but "
            f"{'no' if not found else 'several'} known reference network{'s' if found else ''} {kinds}; known: "
            + ", ".join(sorted(f"{mod}.{name}" for name, mod in _NETWORKS))
        )
    return found[0]


def reference_family(model: nn.Module) -> str | None:
    """The preset of an authors' reference model (``"dm_wrn"``, ``"rawrn"``, ``"swin"``, ``"convnext"``), or
    None when ``model`` contains none of the reference's MeanSparse modules."""
    found = _network(model)
    return None if found is None else found[0]


def reference_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The reference's operators as ``(qualified name, module)``, in execution order.

    Registration order is execution order in every family except Swin, whose block registers its two
    operators (after the residual adds) before its MLP's two (before GELU, after ``fc2``)."""
    names = {id(m): n for n, m in model.named_modules()}
    out: list[tuple[str, nn.Module]] = []
    for m in model.modules():
        if _key(m) == ("SwinTransformerBlock", _ARCH + "Meansparse_swin_L"):
            out += [(names[id(o)], o) for o in (m.meansparse1, m.mlp.meansparse1, m.mlp.meansparse2, m.meansparse2)]
        elif _is_operator(m) and not any(o is m for _, o in out):
            out.append((names[id(m)], m))
    return out


# ------------------------------------------------------------------------------------------ base networks
def _base_class(cls: type, module: str) -> type:
    """An activation class of the reference, or the class of the same name in the base's module when the
    reference defines its own copy (``Swish``)."""
    if cls.__module__.startswith(_ARCH + "Meansparse_"):
        return getattr(importlib.import_module(_ARCH + module), cls.__name__)
    return cls


def _dm_wrn(ref: nn.Module) -> nn.Module:
    from robustbench.model_zoo.architectures.dm_wide_resnet import DMWideResNet

    groups = list(ref.layer)
    base = DMWideResNet(
        num_classes=ref.logits.out_features,
        depth=6 * len(groups[0].block) + 4,
        width=groups[0].block[0].conv_0.out_channels // 16,
        activation_fn=_base_class(type(ref.relu), "dm_wide_resnet"),
        mean=tuple(ref.mean.flatten().tolist()),
        std=tuple(ref.std.flatten().tolist()),
        padding=ref.padding,
        num_input_channels=ref.init_conv.in_channels,
    )
    base.mean, base.std = ref.mean.clone(), ref.std.clone()  # not in the state dict (persistent=False)
    return base


def _rawrn(ref: nn.Module) -> nn.Module:
    from robustbench.model_zoo.architectures.robustarch_wide_resnet import NormalizedWideResNet

    first = [g.block[0] for g in ref.layer]
    se = first[0].se
    base = NormalizedWideResNet(
        mean=tuple(ref.mean.flatten().tolist()),
        std=tuple(ref.std.flatten().tolist()),
        stem_width=ref.init_conv.out_channels,
        depth=[len(g.block) for g in ref.layer],
        stage_width=[b.conv_0.out_channels for b in first],
        groups=[b.conv_0.groups for b in first],
        activation_fn=type(ref.relu),
        se_ratio=None if se is None else se.fc1.out_channels / first[0].conv_1.out_channels,
        se_activation=None if se is None else type(se.activation),
        se_order=getattr(first[0], "se_order", None),
        num_classes=ref.logits.out_features,
        padding=ref.padding,
        num_input_channels=ref.init_conv.in_channels,
    )
    base.mean, base.std = ref.mean.clone(), ref.std.clone()  # plain attributes, not buffers
    return base


def _swin(ref: nn.Module) -> nn.Module:
    timm = import_timm()
    stages = list(ref.layers)
    blocks = [b for s in stages for b in s.blocks]
    first = [s.blocks[0] for s in stages]
    last = blocks[-1].drop_path2
    norm = ref.norm
    base = timm.create_model(
        "swin_large_patch4_window7_224",  # every architecture argument below overrides the variant's
        pretrained=False,
        img_size=ref.patch_embed.img_size,
        patch_size=ref.patch_embed.patch_size,
        in_chans=ref.patch_embed.proj.in_channels,
        num_classes=ref.num_classes,
        global_pool=ref.global_pool,
        embed_dim=ref.embed_dim,
        depths=tuple(len(s.blocks) for s in stages),
        num_heads=tuple(b.attn.num_heads for b in first),
        head_dim=tuple(b.attn.qkv.out_features // 3 // b.attn.num_heads for b in first),
        # the largest window of any block is the target window (smaller ones are clipped to the resolution)
        window_size=tuple(max(b.window_size[i] for b in blocks) for i in (0, 1)),
        mlp_ratio=tuple(b.mlp.fc1.out_features / b.dim for b in first),
        qkv_bias=first[0].attn.qkv.bias is not None,
        drop_rate=getattr(getattr(ref.head, "drop", None), "p", 0.0),
        proj_drop_rate=first[0].mlp.drop1.p,
        attn_drop_rate=first[0].attn.attn_drop.p,
        drop_path_rate=float(getattr(last, "drop_prob", 0.0)),  # the rate grows linearly to the last block
        norm_layer=partial(type(norm), eps=norm.eps) if isinstance(norm, nn.LayerNorm) else type(norm),
    )
    names = {id(m): n for n, m in ref.named_modules()}
    for a, b in zip(blocks, [b for s in base.layers for b in s.blocks], strict=True):
        if (tuple(a.window_size), tuple(a.shift_size)) != (tuple(b.window_size), tuple(b.shift_size)):
            raise ValueError(
                f"import_reference: Swin block {names[id(a)]!r} has window {a.window_size} / shift "
                f"{a.shift_size} but the rebuilt timm block has {b.window_size} / {b.shift_size}"
            )
    return base


def _unwrap_convnext(model: nn.Module) -> None:
    """Undo ``add_custom_layer_imagenet`` in place: each ``Sequential(op, GELU)`` / ``Sequential(drop_path, op)``
    becomes the wrapped module again."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Sequential) and len(child) == 2 and sum(map(_is_operator, child)) == 1:
                setattr(parent, name, next(c for c in child if not _is_operator(c)))


def _base_model(family: str, root: nn.Module, net: nn.Module) -> nn.Module:
    """The base architecture of a reference model, built from the reference's configuration (random weights,
    except ConvNeXt: a copy of the reference with its wrappers removed)."""
    if family == "convnext":
        base = copy.deepcopy(root)
        _unwrap_convnext(base)
        left = [n for n, m in base.named_modules() if _is_operator(m)]
        if left:
            raise ValueError(
                f"import_reference: operators {left[:3]} are not in the nn.Sequential wrappers that robustbench's "
                "add_custom_layer_imagenet makes, so the ConvNeXt base cannot be recovered"
            )
        return base
    build = {"dm_wrn": _dm_wrn, "rawrn": _rawrn, "swin": _swin}[family]
    if net is root:
        return build(net)
    children = dict(root.named_children())
    if family == "swin" and isinstance(root, nn.Sequential) and list(children) == ["normalize", "model"] \
            and children["model"] is net:
        from robustbench.model_zoo.architectures.utils_architectures import normalize_model

        norm = children["normalize"]
        return normalize_model(build(net), norm.mean.flatten().tolist(), norm.std.flatten().tolist())
    raise ValueError(
        f"import_reference: the reference network {type(net).__name__} sits inside a "
        f"{type(root).__name__} that import_reference does not know how to rebuild; pass the network itself"
    )


def _example_input(family: str, net: nn.Module, device: torch.device, dtype: torch.dtype) -> Tensor:
    if family == "swin":
        h, w = net.patch_embed.img_size  # timm's Swin needs its image size
        c = net.patch_embed.proj.in_channels
    elif family == "convnext":
        h = w = 32  # any multiple of 32
        c = net.stem[0].in_channels
    else:  # CIFAR WideResNets: 8x8 after two stride-2 stages, before the padding they add themselves
        h = w = 32 - 2 * net.padding
        c = net.init_conv.in_channels
    return torch.zeros(1, c, h, w, device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------ statistics
def _threshold(name: str, op: nn.Module) -> float:
    """The reference's threshold as our alpha (see :func:`import_reference`)."""
    t = op.threshold
    if t.numel() != 1:
        raise ValueError(f"import_reference: reference site {name!r} has a threshold of shape {tuple(t.shape)}")
    v = float(t)
    if not math.isfinite(v):
        raise ValueError(f"import_reference: reference site {name!r} has threshold {v}; alpha must be finite")
    return max(v, 0.0)


def _check_ready(sites: list[tuple[str, nn.Module]]) -> None:
    for name, op in sites:
        if int(getattr(op, "flag_update_statistics", 0)):
            raise ValueError(
                f"import_reference: reference site {name!r} is still collecting statistics "
                "(flag_update_statistics=1), so its output depends on every batch it sees; set the flag to 0"
            )
        if op.running_var.shape != op.running_mean.shape:
            raise ValueError(f"import_reference: reference site {name!r} has mean and var of different shapes")


def _pairs(ref_sites: list[tuple[str, nn.Module]], ops: list) -> Iterator[tuple[str, nn.Module, object]]:
    """The reference's sites next to the prepared model's, checked: same count, same channels in order."""
    for i in range(max(len(ref_sites), len(ops))):
        ref_name = ref_sites[i][0] if i < len(ref_sites) else "<none>"
        ours = ops[i].site.name if i < len(ops) else "<none>"
        c_ref = ref_sites[i][1].running_mean.numel() if i < len(ref_sites) else None
        c_ours = ops[i].channels if i < len(ops) else None
        if c_ref is None or c_ours is None or c_ref != c_ours:
            raise ValueError(
                f"import_reference: the reference has {len(ref_sites)} sites and the prepared base model "
                f"{len(ops)}; they first differ at site {i}: reference {ref_name!r} ({c_ref} channels) vs "
                f"prepared {ours!r} ({c_ours} channels)"
            )
    for (name, ref_op), op in zip(ref_sites, ops, strict=True):
        yield name, ref_op, op


def import_reference(reference_model: nn.Module) -> nn.Module:
    """The authors' RobustBench MeanSparse model as the base architecture prepared by meansparse.

    Builds the base architecture with the reference's configuration, loads the reference's weights into it
    (same parameter names; the reference's operator buffers are left out), prepares it with the family's
    preset and installs, site by site in execution order, the reference's ``running_mean`` / ``running_var``
    and its ``threshold`` as alpha.  The site lists must agree in count and channels, else a ValueError names
    the first difference.  The result is on the reference's device, in its train / eval mode, and gives the
    same logits.

    Exact conversion.  The reference computes ``where(|x - mean| < threshold * sqrt(var), mean, x)`` and
    returns ``x`` when ``threshold == 0``; the operator here computes the same IEEE operations with alpha =
    threshold (``var`` is the variance, as here), so the logits are bit-identical on CPU.  A negative
    threshold makes the reference's band empty (identity) and becomes alpha 0; a non-finite threshold is
    refused.  Negative variances give no band in either (NaN there, 0 here).  The reference records no
    sample count, so sites get ``num_samples=1`` (calibrated), except sites still at the constructor's
    placeholders (mean and var all zero, threshold 0: a model built without weights), which stay
    uncalibrated so that a later ``set_alpha`` asks for ``calibrate`` instead of silently doing nothing.

    ConvNeXt: the reference picks NCHW or NHWC per call by comparing ``input.shape[1]`` with its channel
    count; here the layout is fixed per site from the graph.  They agree unless a feature map's height
    equals the channel count (never for ConvNeXt-L at 224 px).
    """
    found = _network(reference_model)
    if found is None:
        raise ValueError(
            f"import_reference: {type(reference_model).__name__} contains none of the MeanSparse reference "
            "operators (robustbench model_zoo/architectures/Meansparse_*.py, sparsified_model.py); use "
            "meansparse.prepare for a model without them"
        )
    family, net = found
    import_robustbench()
    ref_sites = reference_sites(reference_model)
    _check_ready(ref_sites)
    alphas = [_threshold(name, op) for name, op in ref_sites]

    p = next(reference_model.parameters())
    base = _base_model(family, reference_model, net)
    if family != "convnext":
        ref_ids = {id(op) for _, op in ref_sites}
        skip = {f"{n}." for n, m in reference_model.named_modules() if id(m) in ref_ids}
        state = {k: v for k, v in reference_model.state_dict().items() if not any(k.startswith(s) for s in skip)}
        try:
            missing, unexpected = base.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shapes that differ
            raise ValueError(
                f"import_reference: the reference's weights do not fit the {family} base architecture built from "
                f"its configuration: {e}"
            ) from e
        if missing or unexpected:
            raise ValueError(
                f"import_reference: the reference's weights do not fit the {family} base architecture built from "
                f"its configuration: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    base = base.to(device=p.device).train(reference_model.training)
    example = _example_input(family, net, p.device, p.dtype)
    model = prepare(base, preset=family, example_inputs=example)
    for (_, ref_op, op), alpha in zip(_pairs(ref_sites, operators(model)), alphas, strict=True):
        mean, var = ref_op.running_mean.detach(), ref_op.running_var.detach()
        placeholder = alpha == 0.0 and not mean.any() and not var.any()
        op.set_statistics(mean, var, num_samples=0 if placeholder else 1)
        op.set_alpha(alpha)
    return model
