"""Save and load the sparsification state as safetensors + JSON metadata (never a pickle).

The file holds, per site, ``running_mean``, ``running_var``, ``alpha`` and ``num_samples`` tensors, and in
the safetensors header the site list and the ``prepare`` arguments.  :func:`load` re-applies ``prepare``
with those arguments to a freshly built base model, checks the sites and channel counts, then installs
the statistics, so the base model's weights come from wherever the user got them.

The header also records the sha256 of the file's tensors (verified on load: a corrupted file is an error)
and of the base model the statistics were measured on (:func:`base_model_sha256`, the model's tensors
without the operators' buffers): ``load`` refuses a different base model, or sites whose activations
differ, unless ``strict=False``.  Files written before these were recorded load without the checks.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ._utils import as_args, eval_mode, tensors_sha256, warn_at_caller
from .core import MeanSparse, operators
from .placement import find_prepared, get_record, prepare_from_config
from .version import __version__

__all__ = ["save", "load", "base_model_sha256"]

FORMAT = "meansparse"
FORMAT_VERSION = "1"


def base_model_sha256(model: nn.Module) -> str:
    """sha256 of the base model's tensors: the state dict in order, without the MeanSparse operators' buffers
    and without names (wrapping an activation renames its parameters, not their values or order), so a
    prepared model and the model it was prepared from give the same hash."""
    skip = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, MeanSparse) and name)
    return tensors_sha256(("", t) for k, t in model.state_dict().items() if not k.startswith(skip))


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    return tensors_sha256(sorted(tensors.items()))


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write every site's statistics and alpha, the site list, the prepare arguments, the sha256 of the
    tensors and of the base model to ``path``."""
    _, root, rec = find_prepared(model)
    ops = operators(root)
    tensors: dict[str, torch.Tensor] = {}
    site_list: list[dict[str, Any]] = []
    for op in ops:
        i = op.site.index
        tensors[f"site.{i}.running_mean"] = op.running_mean.detach().float().cpu().contiguous()
        tensors[f"site.{i}.running_var"] = op.running_var.detach().float().cpu().contiguous()
        tensors[f"site.{i}.alpha"] = torch.tensor([op.alpha_value], dtype=torch.float64)
        tensors[f"site.{i}.num_samples"] = op.num_samples.detach().cpu().reshape(1).to(torch.int64)
        site_list.append(
            {
                "index": i,
                "name": op.site.name,
                "activation": op.site.activation,
                "layout": op.layout,
                "channels": op.channels,
                "centering": op.centering,
                "after_residual_add": op.site.after_residual_add,
                "module_path": op.site.module_path,
                "kind": op.site.kind,
                "calibrated": op.calibrated,
            }
        )
    meta = {"config": rec.config, "sites": site_list, "package_version": __version__,
            "tensors_sha256": _tensors_sha256(tensors), "base_model_sha256": base_model_sha256(root)}
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "meansparse": json.dumps(meta)}
    save_file(tensors, os.fspath(path), metadata=header)


def _read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{os.fspath(path)}: no such MeanSparse state file")
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type (and OSError)
        raise ValueError(f"{os.fspath(path)}: not a readable safetensors file ({type(e).__name__}: {e}); is it "
                         "truncated, or a pickle (torch.save)?") from None
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} is not a meansparse state file (format={header.get('format')!r})")
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported meansparse format version {header.get('format_version')!r}")
    try:
        meta = json.loads(header["meansparse"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt meansparse header ({e})") from None
    recorded = meta.get("tensors_sha256")
    if recorded is not None and _tensors_sha256(tensors) != recorded:
        raise ValueError(f"{path}: the tensors' sha256 does not match the one recorded in the file: it is corrupted")
    return meta, tensors


def _base_problem(base_model: nn.Module, meta: dict[str, Any]) -> str | None:
    """Why the base model is not the one the state was calibrated on (when the file recorded its hash)."""
    recorded = meta.get("base_model_sha256")
    if recorded is None:
        return None
    found = base_model_sha256(base_model)
    if found == recorded:
        return None
    return (f"the state was calibrated on a different base model (weights sha256 {recorded[:12]}… in the file, "
            f"{found[:12]}… for this model)")


def _refuse(message: str, strict: bool) -> None:
    if strict:
        raise ValueError(message + "; pass strict=False to load it anyway")
    warn_at_caller(message + " (loaded anyway: strict=False)")


def _mismatch(saved: list[str], found: list[str]) -> str:
    first = next((i for i, (a, b) in enumerate(zip(saved, found, strict=False)) if a != b), min(len(saved), len(found)))
    missing = [n for n in saved if n not in set(found)][:5]
    extra = [n for n in found if n not in set(saved)][:5]
    a = saved[first] if first < len(saved) else "<none>"
    b = found[first] if first < len(found) else "<none>"
    return (
        f"sites do not match: the file has {len(saved)}, the model gives {len(found)}; first difference at "
        f"index {first}: file {a!r} vs model {b!r}; missing from model: {missing}; not in file: {extra}"
    )


def load(base_model: nn.Module, path: str | os.PathLike, example_inputs: Any = None, *,
         strict: bool = True) -> nn.Module:
    """Re-apply the saved ``prepare`` to ``base_model``, check sites/channels, then load stats and alpha.

    ``example_inputs`` (or the input shape recorded at calibration, as zeros) is used for one probe
    forward so channel counts are checked now rather than at the first real forward.  ``strict``: refuse
    (ValueError) a base model whose weights differ from the one the state was calibrated on, or a site whose
    activation differs; ``strict=False`` loads anyway with a warning.  A corrupted file is always an error.
    """
    meta, tensors = _read(path)
    cfg = dict(meta["config"])
    saved_sites = meta["sites"]
    if example_inputs is None and cfg.get("input_shape") is not None:
        dev = next((p.device for p in base_model.parameters()), torch.device("cpu"))
        dtype = next((p.dtype for p in base_model.parameters() if p.is_floating_point()), torch.float32)
        example_inputs = torch.zeros(1, *cfg["input_shape"], device=dev, dtype=dtype)
    probe_at_prepare = cfg["method"] == "modules" and cfg.get("probed", False)
    if probe_at_prepare and example_inputs is None:
        raise ValueError(f"{path} was prepared with a probe forward; pass example_inputs to load")
    model = prepare_from_config(base_model, cfg, example_inputs if probe_at_prepare else None)
    ops = operators(model)
    names = [op.site.name for op in ops]
    saved_names = [s["name"] for s in saved_sites]
    if names != saved_names:
        raise ValueError(f"meansparse.load({os.fspath(path)!r}): {_mismatch(saved_names, names)}")
    for op, s in zip(ops, saved_sites, strict=True):
        if s.get("layout") and op.layout != s["layout"]:
            op.layout = s["layout"]
    if example_inputs is not None and any(op.channels is None for op in ops):
        with eval_mode(model), torch.no_grad():
            model(*as_args(example_inputs))
    for op, s in zip(ops, saved_sites, strict=True):
        c = s.get("channels")
        if c is not None and op.channels is not None and c != op.channels:
            raise ValueError(
                f"meansparse.load: site '{op.name}' has {op.channels} channels in the model but "
                f"{c} in {os.fspath(path)!r}"
            )
    # after the structural checks above, which say more when they fail
    changed = [f"'{op.name}' {s['activation']} in the file, {op.site.activation} in the model"
               for op, s in zip(ops, saved_sites, strict=True)
               if s.get("activation") is not None and s["activation"] != op.site.activation]
    problems = [p for p in (_base_problem(base_model, meta),
                            f"{len(changed)} site(s) have another activation ({'; '.join(changed[:3])})" if changed
                            else None) if p]
    if problems:
        _refuse(f"meansparse.load({os.fspath(path)!r}): {'; '.join(problems)}: its statistics do not describe "
                "this model's features", strict)
    for op, s in zip(ops, saved_sites, strict=True):
        i = s["index"]
        mean, var = tensors[f"site.{i}.running_mean"], tensors[f"site.{i}.running_var"]
        if mean.numel() > 0 and s.get("calibrated", True):
            op.set_statistics(mean, var, num_samples=int(tensors[f"site.{i}.num_samples"].reshape(-1)[0]))
        op.set_alpha(float(tensors[f"site.{i}.alpha"].reshape(-1)[0]))
    rec = get_record(model)
    if rec is not None:
        for k in ("input_shape", "probed"):
            if k in cfg and k not in rec.config:
                rec.config[k] = cfg[k]
    return model
