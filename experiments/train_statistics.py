"""Which statistics a learning operator should sparsify with in train mode: the running ones or the batch's.

Small CNN (width 8, ReLU) on digits, PGD-AT from scratch (ε = 0.1, 2 steps, straight-through inner attack),
operators before every activation at α = 0.5, momentum 0.1, 10 epochs, 5 seeds; clean and PGD-10
(straight-through) accuracy on the test split, and clean accuracy of the trained model left in train mode.
About 15 s on one CPU thread.  Result: experiments/results/train-statistics/results.txt (docs/usage.md).

    OMP_NUM_THREADS=1 python experiments/train_statistics.py
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

import meansparse as ms
from meansparse.data import batches, load_digits
from meansparse.models import create_model
from meansparse.pgd import pgd_ce


def run(train, test, stats: str, seed: int, alpha: float = 0.5, epochs: int = 10) -> tuple[float, float, float]:
    """(clean, robust, clean in train mode) of one run."""
    torch.manual_seed(seed)
    m = ms.prepare(create_model("small_cnn", num_classes=10, activation="relu", width=8, normalization="digits"))
    ms.learn_statistics(m, statistics=stats)
    ms.set_alpha(m, alpha)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for e in range(epochs):
        m.train()
        for x, y in batches(train, 64, shuffle=True, seed=0, epoch=e):
            with ms.straight_through(m):
                xa = pgd_ce(m, x, y, eps=0.1, steps=2, generator=g)
            loss = F.cross_entropy(m(xa), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    m.eval()
    x, y = next(iter(batches(test, len(test))))
    with torch.no_grad():
        clean = (m(x).argmax(1) == y).float().mean().item()
    with ms.straight_through(m):
        xa = pgd_ce(m, x, y, eps=0.1, steps=10, step_size=0.025, generator=g)
    with torch.no_grad():
        robust = (m(xa).argmax(1) == y).float().mean().item()
        m.train()
        train_mode = (m(x).argmax(1) == y).float().mean().item()
    return clean, robust, train_mode


def main() -> None:
    train, test = load_digits("train"), load_digits("test")
    for stats in ("running", "batch"):
        rs = [run(train, test, stats, s) for s in range(5)]
        clean, robust, train_mode = (statistics.mean(r[i] for r in rs) for i in range(3))
        print(stats, f"clean {clean:.3f} robust {robust:.3f} train-mode clean {train_mode:.3f}",
              "robust per seed", [round(r[1], 3) for r in rs], flush=True)


if __name__ == "__main__":
    main()
