"""``torch.compile`` with a fallback: compiled kernels where a compiler works, the same eager function where
it does not.  Shared by the moments (calibration) and the fused kernels (:mod:`meansparse.accel`).

Compiled kernels are reused for every shape (``dynamic=True``).  Where ``torch.compile`` is unavailable or
fails (no C++ compiler, unsupported platform) the first failure is logged once at DEBUG level and every call
from then on runs eagerly.  ``MEANSPARSE_COMPILE=0`` disables compilation.
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["CompiledKernel", "compile_enabled", "compile_disabled_reason", "disable_compile", "forget_failure",
           "is_compiling", "takes_compiled", "ENV_VAR", "COMPILE_MIN_NUMEL", "COMPILED_DTYPES"]

log = logging.getLogger("meansparse.compile")

ENV_VAR = "MEANSPARSE_COMPILE"
#: Inputs with fewer elements run eagerly: compiling for them costs seconds and saves microseconds.
COMPILE_MIN_NUMEL = 1 << 15
COMPILED_DTYPES = (torch.float32, torch.float64)


class _State:
    disabled_reason: str | None = None


def compile_enabled() -> bool:
    """Whether compiled kernels are used: torch.compile exists, ``MEANSPARSE_COMPILE`` is not 0, and no
    compilation has failed in this process."""
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return _State.disabled_reason is None and hasattr(torch, "compile")


def is_compiling() -> bool:
    """True while an outer ``torch.compile`` is tracing (our kernels then stay plain ATen inside its graph)."""
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # pragma: no cover - torch < 2.3
        return False


def takes_compiled(x: Tensor, min_numel: int = COMPILE_MIN_NUMEL) -> bool:
    """Whether ``x`` goes to a compiled kernel now: float32/float64, at least ``min_numel`` elements,
    compilation on and no outer ``torch.compile`` tracing.  The one gate of every compiled path (band, moments,
    fused kernels), each adding its own layout condition."""
    return x.dtype in COMPILED_DTYPES and x.numel() >= min_numel and compile_enabled() and not is_compiling()


def compile_disabled_reason() -> str | None:
    """Why compilation was turned off after a failure (None while it works)."""
    return _State.disabled_reason


def forget_failure() -> None:
    """Turn compilation back on after a failure switched it off (e.g. once a compiler is installed)."""
    _State.disabled_reason = None


def disable_compile(reason: str) -> None:
    """Switch compilation off for the rest of the process (the first reason is kept)."""
    if _State.disabled_reason is None:
        _State.disabled_reason = reason
        log.debug("meansparse: torch.compile unavailable, using eager kernels from now on (%s)", reason)


class CompiledKernel:
    """``fn`` compiled with ``torch.compile(dynamic=True, fullgraph=True)`` on first use, eager on failure.

    Each kernel gets its own code object, hence its own dynamo cache: kernels never evict each other and
    one compiled graph serves every shape.  A failing compilation is retried eagerly; only if the eager call
    succeeds is compilation switched off for the process (so user errors are raised as usual).
    """

    def __init__(self, fn: Callable, name: str) -> None:
        self.eager = fn
        names = {"co_name": name, "co_qualname": name} if hasattr(fn.__code__, "co_qualname") else {"co_name": name}
        code = fn.__code__.replace(**names)
        self._fn = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
        self._compiled: Callable | None = None
        self.name = name

    @property
    def compiled(self) -> bool:
        """Whether the compiled version exists (it is built at the first call with compilation on)."""
        return self._compiled is not None

    def __call__(self, *args: Any) -> Any:
        if compile_enabled():
            try:
                if self._compiled is None:
                    self._compiled = torch.compile(self._fn, dynamic=True, fullgraph=True)
                return self._compiled(*args)
            except Exception as e:  # noqa: BLE001 - any compiler/backend failure means "use eager"
                out = self.eager(*args)  # raises the user's error if the problem is not the compiler
                disable_compile(f"{self.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                return out
        return self.eager(*args)
