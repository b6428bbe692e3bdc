"""pyautoattack's own alarms (zero gradients, randomness, dynamic defences) collected for the report
instead of scrolling past on stderr."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping

from .attacks import LIBRARY_LOGGER

__all__ = ["MAX_LIBRARY_MESSAGES", "library_messages", "library_warnings"]

#: distinct pyautoattack messages quoted per attack in the report
MAX_LIBRARY_MESSAGES = 3


@contextlib.contextmanager
def library_messages(sink: dict[str, int]) -> Iterator[None]:
    """Count pyautoattack's log records and warnings into ``sink`` (message -> count); other warnings are
    re-issued unchanged."""

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            sink[msg] = sink.get(msg, 0) + 1

    handler = _Handler(level=logging.WARNING)
    loggers = [logging.getLogger("auto-attack"), logging.getLogger(LIBRARY_LOGGER)]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    for w in caught:
        if "pyautoattack" in str(w.filename):
            msg = str(w.message)
            sink[msg] = sink.get(msg, 0) + 1
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def library_warnings(library: Mapping[str, Mapping[str, int]]) -> list[str]:
    """Report warnings for the collected messages (attack -> message -> count). AutoAttack checks every
    batch, so only the first few distinct messages of each attack are quoted."""
    out: list[str] = []
    for name, sink in library.items():
        items = sorted(sink.items())
        for msg, count in items[:MAX_LIBRARY_MESSAGES]:
            out.append(f"pyautoattack ({name}, {count}x): {msg}")
        if len(items) > MAX_LIBRARY_MESSAGES:
            out.append(f"pyautoattack ({name}): {len(items) - MAX_LIBRARY_MESSAGES} more distinct "
                       "message(s) not shown")
    return out
