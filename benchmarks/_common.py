"""Shared helpers of the benchmark scripts: thread setup, interleaved timing, the GLIBC_TUNABLES re-exec."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

#: glibc returns large blocks to the OS on every free (mmap threshold 32 MiB at most, trim threshold
#: 128 KiB by default), so each big temporary is a fresh mmap + page faults.  These values keep freed
#: memory in the process instead.  The variable is read at process start, hence the re-exec.
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=2147483648:glibc.malloc.trim_threshold=4294967296"


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (a few minutes at most)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (each round runs every variant once)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                   help="cpu: process CPU time (immune to other jobs' scheduling; right for --threads 1); "
                        "wall: elapsed time; auto: cpu with one thread, else wall")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda: wall clock, synchronised per timing)")
    return p


CLOCK = {"name": "wall", "cuda": False}


def set_clock(clock: str, threads: int, device: str = "cpu") -> str:
    """Pick the timer; on a CUDA device always the wall clock, with a device sync before each reading."""
    CLOCK["cuda"] = str(device).startswith("cuda")
    if CLOCK["cuda"] and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: no CUDA device is available")
    CLOCK["name"] = "wall" if CLOCK["cuda"] else ("cpu" if threads == 1 else "wall") if clock == "auto" else clock
    return CLOCK["name"]


def now() -> float:
    if CLOCK["cuda"]:
        torch.cuda.synchronize()
    return time.process_time() if CLOCK["name"] == "cpu" else time.perf_counter()


def setup(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)


def environment(threads: int) -> dict:
    return {
        "clock": CLOCK["name"],
        "torch": torch.__version__,
        "threads": threads,
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")(),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "gpu": torch.cuda.get_device_name() if CLOCK["cuda"] else None,
    }


def describe(env: dict) -> str:
    """One line for a benchmark's header: software, hardware and conditions of the run."""
    gpu = f"GPU {env['gpu']}, " if env.get("gpu") else ""
    return (f"torch {env['torch']}, {gpu}threads={env['threads']}, {env['cores']} cores ({env['cpu_capability']}), "
            f"load average at start {env['load_average']}, clock={env['clock']}")


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Run every variant once per round, rounds in a row (A B C A B C ...): slow drifts of a shared machine
    hit all variants alike.  Returns median / min seconds (of the clock chosen by ``set_clock``) and the
    raw samples per variant."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in variants}
    faults: dict[str, list[int]] = {k: [] for k in variants}
    for r in range(repeats):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))  # no fixed position bias
        for k in order:
            f0 = _minor_faults()
            t0 = now()
            variants[k]()
            samples[k].append(now() - t0)
            faults[k].append(_minor_faults() - f0)
    return {k: {"median": statistics.median(v), "min": min(v), "samples": v,
                "minor_faults": statistics.median(faults[k])} for k, v in samples.items()}


def _minor_faults() -> int:
    """Minor page faults of this process so far: how much of a variant's time went to the allocator handing
    fresh pages (glibc's default returns large blocks to the OS and faults them in again)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def ratios(results: dict[str, dict], base: str, stat: str = "median") -> dict[str, float]:
    b = results[base][stat]
    return {k: v[stat] / b for k, v in results.items()}


def _status_mib(field: str) -> float | None:
    """A memory line of /proc/self/status (``VmHWM``, ``VmRSS``) in MiB; None where /proc is unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """Peak resident set size of this process (since the last ``reset_peak_rss``), MiB."""
    peak = _status_mib("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; never reset


def rss_mib() -> float:
    """Current resident set size, MiB (0 where /proc is unavailable)."""
    return _status_mib("VmRSS") or 0.0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5), so a later peak covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_child(args: list[str], name: str, tunables: bool | None = None) -> dict:
    """Re-run this script as a child (``args`` after the script name): with GLIBC_TUNABLES (True), without it
    (False) or in this process's environment (None).  The child prints one JSON line as its last line."""
    env = dict(os.environ)
    if tunables is not None:
        env.pop("GLIBC_TUNABLES", None)
    if tunables:
        env["GLIBC_TUNABLES"] = GLIBC_TUNABLES
    proc = subprocess.run([sys.executable, sys.argv[0], *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"benchmark child ({name}) failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_variants(argv: list[str], glibc: str) -> list[tuple[str, dict]]:
    """Re-run this script as children: without GLIBC_TUNABLES and/or with it (``glibc``: default, tuned or
    both)."""
    wanted = {"both": ("default", "tuned"), "default": ("default",), "tuned": ("tuned",)}[glibc]
    return [(name, run_child([*argv, "--child"], name, name == "tuned")) for name in wanted]


def fmt_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def hidden() -> str:
    """``help=`` of the arguments a script passes to its own child processes (not shown in --help)."""
    return argparse.SUPPRESS


def write_json(path: str | None, data: object) -> None:
    """``--json FILE``: the results as JSON (nothing when no file was asked for)."""
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
