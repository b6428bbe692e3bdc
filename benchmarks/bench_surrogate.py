"""Cost of the surrogate gradient (the sg-* attacks' backward through the band), one thread, process CPU time.

    python benchmarks/bench_surrogate.py

1. The backward alone on a 64x32x32x32 tensor, k = 8: the soft_gate formula ``grad·(1 − e·(1 − k·u))``,
   :func:`meansparse.core.band.surrogate_backward_eager` (clamped u, in place; identical values where the formula
   is finite) and :func:`~meansparse.core.band.surrogate_backward` (one compiled kernel, equal to rounding),
   medians of 7 after a warm-up call (the first compile is not timed).
2. One forward + backward w.r.t. the input of the ReLU PGD-AT checkpoint (64 test images, α = 0.35, statistics
   from 256 training images) per gradient mode, eager and fused, the surrogate also with compilation off, as a
   multiple of the base model's; medians of 5, interleaved.
"""

from __future__ import annotations

import copy
import os
import time

import torch

import meansparse as ms
from meansparse._compile import ENV_VAR
from meansparse.core.band import soft_gate, surrogate_backward, surrogate_backward_eager
from meansparse.data import Batches, load_dataset
from meansparse.placement import gradient_mode


def _median(f, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        f()
        times.append(time.process_time() - start)
    return sorted(times)[repeats // 2]


def backward_alone() -> None:
    torch.manual_seed(0)
    x, g = torch.randn(64, 32, 32, 32), torch.randn(64, 32, 32, 32)
    m, t, k = torch.randn(1, 32, 1, 1) * 0.1, torch.rand(1, 32, 1, 1) * 0.5, 8.0

    def formula():
        u, e = soft_gate(x - m, t, k)
        return g * (1 - e * (1 - k * u))

    def eager():
        return surrogate_backward_eager(g, x, m, t, k)

    def compiled():
        return surrogate_backward(g, x, m, t, k)

    for f in (formula, eager, compiled):
        f()
    a, b, c = _median(formula, 7), _median(eager, 7), _median(compiled, 7)
    print(f"backward alone: formula {a * 1e3:.1f} ms, eager clamped {b * 1e3:.1f} ms ({a / b:.2f}x faster), "
          f"compiled {c * 1e3:.1f} ms ({a / c:.2f}x faster)")


def model_passes() -> None:
    base = ms.models.load("checkpoints/cifar10-resnet18-relu-pgd").eval()
    x = load_dataset("cifar10-jpg", "test").head(64).float()
    model = ms.prepare(copy.deepcopy(base), example_inputs=(x[:2],))
    ms.calibrate(model, Batches(load_dataset("cifar10-jpg", "train").head(256), 128), progress=False)
    ms.set_alpha(model, 0.35)
    fused = ms.fuse(copy.deepcopy(model).eval())

    def uncompiled(f):  # the attack modes' kernels as before they were compiled (MEANSPARSE_COMPILE=0)
        before = os.environ.get(ENV_VAR)
        os.environ[ENV_VAR] = "0"
        try:
            f()
        finally:
            if before is None:
                del os.environ[ENV_VAR]
            else:
                os.environ[ENV_VAR] = before

    def fb(net, mode):
        xi = x.clone().requires_grad_()
        with gradient_mode(net, mode, 8.0 if mode == "surrogate" else None):
            torch.autograd.grad(net(xi).sum(), xi)

    variants = {"base": lambda: fb(base, "exact"), "eager straight-through": lambda: fb(model, "straight_through"),
                "fused straight-through": lambda: fb(fused, "straight_through"),
                "surrogate": lambda: fb(model, "surrogate"),
                "surrogate, no compile": lambda: uncompiled(lambda: fb(model, "surrogate")),
                "fused model, surrogate": lambda: fb(fused, "surrogate")}
    for v in variants.values():
        v(), v()
    times = {k: [] for k in variants}
    for _ in range(5):
        for k, v in variants.items():
            start = time.process_time()
            v()
            times[k].append(time.process_time() - start)
    b = sorted(times["base"])[2]
    for k, ts in times.items():
        print(f"{k:24s} {sorted(ts)[2] * 1e3:6.0f} ms  x{sorted(ts)[2] / b:.2f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    backward_alone()
    model_passes()
