"""The glibc allocator setting (:mod:`meansparse.accel.allocator`)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tune_cpu_allocator_applies_mallopt_in_a_fresh_process():
    """Run in a child: the setting is process-wide.  glibc accepts both thresholds; out-of-range is refused."""
    code = ("from meansparse.accel import tune_cpu_allocator as tune; "
            "print(tune(), tune(0), tune(2**40))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False", "False"]
