"""glibc malloc tuning from inside the process: the run-time equivalent of ``GLIBC_TUNABLES``.

glibc serves large blocks with ``mmap`` and gives them back to the OS on every ``free`` (and trims the heap
top), so large tensors can be paid again in page faults on every pass.  ``GLIBC_TUNABLES`` must be set
before Python starts; ``mallopt`` does the same for every allocation made after the call, which is what a
notebook or an already running job can still do.  The price is that the process keeps its peak memory
instead of returning it to the OS.  How much it helps depends on the process's allocation history
(``benchmarks/bench_allocator.py``, docs/benchmarks.md), so it is opt-in.
``mallopt`` has no Python binding, hence this small ctypes wrapper.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["tune_cpu_allocator"]

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_MAX = 2**31 - 1  # mallopt takes an int: about 2 GiB, like the documented tunables


def tune_cpu_allocator(threshold: int = _MAX) -> bool:
    """Keep freed blocks up to ``threshold`` bytes in the process (glibc only).  Returns whether the
    allocator was changed: False on other C libraries / platforms, or when ``mallopt`` refuses a value."""
    if not sys.platform.startswith("linux") or not 0 < threshold <= _MAX:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_TRIM_THRESHOLD, threshold)) and bool(mallopt(_M_MMAP_THRESHOLD, threshold))
