"""What ``prepare`` and ``fuse`` leave on a model so they can be undone: one record and one class-swap protocol.

Every attribute this package keeps on a user's module is written here, under one key prefix:

* the prepared model's :class:`PreparedRecord` (the original model, the ``prepare`` arguments, the class to
  restore), read by ``remove``, ``save``/``load``, ``calibrate`` and pickling;
* a swapped class (:func:`swap_class` / :func:`restore_class`): fusing turns an operator into its fused
  subclass and an fx-prepared model into a class with the fused forward, and gives the previous class back;
* small attachments (:func:`attach`): plain attributes, never submodules, so ``state_dict`` is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["PreparedRecord", "get_record", "set_record", "clear_record", "find_prepared", "swap_class",
           "restore_class", "swapped", "attach", "attached", "detach"]

_PREFIX = "_meansparse_"
_RECORD = _PREFIX + "record"
_SWAPPED = _PREFIX + "swapped_class"


@dataclass
class PreparedRecord:
    """Kept on the prepared model (plain attribute, not a submodule) to support remove/save/load."""

    original: nn.Module | None  # None when prepared in place
    config: dict
    original_class: type | None = None  # fx in place: the class to restore
    attr: str = ""  # fx: name of the ModuleList holding the operators
    code: str = ""  # fx: generated forward source, for inspection


def get_record(model: nn.Module) -> PreparedRecord | None:
    return model.__dict__.get(_RECORD)


def set_record(model: nn.Module, record: PreparedRecord) -> None:
    model.__dict__[_RECORD] = record


def clear_record(model: nn.Module) -> None:
    model.__dict__.pop(_RECORD, None)


def find_prepared(model: nn.Module) -> tuple[str, nn.Module, PreparedRecord]:
    """The (qualified name, module, record) of the module ``prepare`` returned, searching submodules."""
    found = [(n, m, get_record(m)) for n, m in model.named_modules() if get_record(m) is not None]
    if not found:
        raise ValueError("model was not prepared with meansparse.prepare")
    if len(found) > 1:
        raise ValueError(f"model contains {len(found)} prepared submodules: {[n for n, _, _ in found]}")
    return found[0]  # type: ignore[return-value]


def swap_class(module: nn.Module, cls: type) -> None:
    """Give ``module`` the class ``cls``, remembering the class it had before the first swap."""
    module.__dict__.setdefault(_SWAPPED, type(module))
    module.__class__ = cls


def swapped(module: nn.Module) -> bool:
    return _SWAPPED in module.__dict__


def restore_class(module: nn.Module) -> bool:
    """Undo :func:`swap_class`; returns whether there was anything to undo."""
    cls = module.__dict__.pop(_SWAPPED, None)
    if cls is None:
        return False
    module.__class__ = cls
    return True


def attach(module: nn.Module, name: str, value: Any) -> None:
    module.__dict__[_PREFIX + name] = value


def attached(module: nn.Module, name: str, default: Any = None) -> Any:
    return module.__dict__.get(_PREFIX + name, default)


def detach(module: nn.Module, name: str) -> None:
    module.__dict__.pop(_PREFIX + name, None)
