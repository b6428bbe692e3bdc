"""Small helpers every layer may use: the model's device, temporary eval mode, example inputs as positional
arguments, shallow module copies and tensor identity tokens for caches.  Imports only torch."""

from __future__ import annotations

import copy
import hashlib
import os
import sys
import uuid
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["model_device", "resolve_device", "eval_mode", "as_args", "shallow_copy", "tensor_versions", "same_versions",
           "tensors_sha256", "writable_dir", "atomic_path",
           "frozen_parameters", "preserved_state", "WriteError", "writing", "warn_at_caller"]


def model_device(model: nn.Module) -> torch.device | None:
    """Device of the model's first parameter (else buffer); None for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def resolve_device(name: str | torch.device) -> torch.device:
    """``torch.device(name)``, or a ValueError naming the problem (bad name, CUDA requested but absent)."""
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device {name!r} is not a valid torch device: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but torch.cuda.is_available() is False")
    return dev


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Temporarily put every submodule in eval mode, restoring each module's own flag afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, t in modes:
            m.training = t


def as_args(example_inputs: Any) -> tuple:
    """``example_inputs`` as a tuple of positional model inputs."""
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError("example_inputs must be a Tensor or a tuple/list of positional inputs")


def shallow_copy(m: nn.Module) -> nn.Module:
    """A new module object of the same class whose children/parameters/buffers/hooks are the original ones.

    Registries (``_modules``, ``_parameters``, hook dicts ...) are copied, so editing the copy never
    touches the original, while the shared children keep ``.to()``/``.eval()`` consistent for both.
    """
    new = object.__new__(type(m))
    for k, v in m.__dict__.items():
        new.__dict__[k] = copy.copy(v) if isinstance(v, (dict, set, list)) else v
    return new


def tensor_versions(*tensors: Tensor) -> tuple | None:
    """Identity and in-place version of each tensor: changes whenever one is replaced or modified (a cache
    key for values derived from them).  None for inference tensors, which carry no version counter."""
    try:
        return tuple((t, t._version) for t in tensors)
    except RuntimeError:
        return None


def same_versions(a: tuple | None, b: tuple | None) -> bool:
    """Whether two :func:`tensor_versions` tokens name the same tensors at the same versions."""
    if a is None or b is None or len(a) != len(b):
        return False
    return all(x[0] is y[0] and x[1] == y[1] for x, y in zip(a, b, strict=True))


def tensors_sha256(items: Iterable[tuple[str, Tensor]]) -> str:
    """sha256 over (name, dtype, shape, bytes) of each tensor, in the order given: the fingerprint that
    checkpoints and MeanSparse state files record and verify on load."""
    h = hashlib.sha256()
    for name, t in items:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create the folder ``path`` and prove it writable with a probe write, so a long job fails now rather
    than at its final write; a ValueError naming the folder otherwise."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{what} {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create {what} {out} ({e.strerror or e})") from None
    try:
        probe = out / f".meansparse-write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{what} {out} is not writable ({e.strerror or e})") from None
    return out


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; when the block ends without error it replaces ``path``
    (``os.replace`` is atomic, so a kill mid-write leaves the previous file or none, never half of one), on an
    error it is removed.  The name is unique per call, so two processes writing the same file (two runs
    filling one data cache) never share a temporary file; ``suffix`` for writers that insist on one
    (``np.savez`` appends ``.npz``)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class WriteError(OSError):
    """A result that could not be written (a full disk, a quota, an I/O error): one error type whatever the
    writer (``torch.save`` reports a failed write as RuntimeError, safetensors as its own error type), so a
    caller can say what it kept."""


@contextmanager
def writing(path: str | os.PathLike, kept: str = "") -> Iterator[None]:
    """Turn an error raised by the writer in the block into a :class:`WriteError` naming ``path`` and, when
    given, what was kept instead (``kept``).  Wrap only the write itself: every error there is a write error."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:  # noqa: BLE001 - writers report a full disk as OSError, RuntimeError or their own type
        reason = (e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0] if str(e)
                  else type(e).__name__)
        raise WriteError(getattr(e, "errno", None), f"cannot write {path}: {reason}"
                         + (f"; {kept}" if kept else "")) from e


@contextmanager
def frozen_parameters(*models: nn.Module | None) -> Iterator[None]:
    """Parameters with ``requires_grad=False`` inside the block, restored after: attacks need gradients with
    respect to the input only (FAB calls ``backward`` and would otherwise fill ``.grad``; compiled graphs
    are then shared by passes with and without frozen parameters)."""
    saved = [(p, p.requires_grad) for m in models if m is not None for p in m.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _snapshot(obj: Any) -> Any:
    """A copy of a container attribute's contents (one level), or None for anything else."""
    if isinstance(obj, dict):
        return dict(obj)
    if isinstance(obj, (list, set)):
        return copy.copy(obj)
    return None


def _restore(obj: Any, saved: Any) -> None:
    if isinstance(obj, dict):
        obj.clear()
        obj.update(saved)
    elif isinstance(obj, list):
        obj[:] = saved
    else:
        obj.clear()
        obj.update(saved)


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Every submodule's attributes as they were before the block, and the contents of attributes that are
    dicts, lists or sets: a forward run on ``torch.fx`` proxies (or a probe) must not leave caches behind in
    the user's model (timm's ``attention_bias_cache`` would keep a Proxy and the model would not pickle)."""
    saved = []
    for m in model.modules():
        attrs = dict(m.__dict__)
        containers = [(v, _snapshot(v)) for v in attrs.values()]
        saved.append((m, attrs, [(v, c) for v, c in containers if c is not None]))
    try:
        yield
    finally:
        for m, attrs, containers in saved:
            for v, contents in containers:
                _restore(v, contents)
            m.__dict__.clear()
            m.__dict__.update(attrs)


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside meansparse (the user's line that called the
    package), whatever the depth of the call inside it: a fixed ``stacklevel`` points into the package as soon
    as a function is split or wrapped."""
    frame, level = sys._getframe(0), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
