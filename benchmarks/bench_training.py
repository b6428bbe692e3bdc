"""Cost of MeanSparse in the training loop: one adversarial training step with and without operators.

A step is what ``meansparse train`` / ``finetune`` run per batch: the inner attack (straight-through through
the operators), the forward and backward on its examples and the SGD update; with operators every forward in
train mode also measures the batch's per-channel moments and updates the running statistics.  Variants, run
interleaved in one process: the base model, operators with running statistics (the default), with the batch's
statistics, and with the straight-through band gradient in the step.  Random CIFAR-sized images; weights
change between steps, as in training.

    python benchmarks/bench_training.py --threads 1 --quick
    python benchmarks/bench_training.py --device cuda --widths 16 64 --batch 128 512 --json training.json
"""

from __future__ import annotations

import copy

import torch
from _common import base_parser, describe, environment, fmt_table, interleaved, ratios, set_clock, setup, write_json

from meansparse.models import create_model
from meansparse.training import TrainConfig, adversarial_batch, with_operators

VARIANTS = {"base": None, "running": {}, "batch": {"ms_statistics": "batch"},
            "running+st": {"ms_gradient": "straight_through"}}


def stepper(base: torch.nn.Module, options: dict | None, x: torch.Tensor, y: torch.Tensor, method: str,
            steps: int, alpha: float):
    """A function running one training step of its own copy of ``base`` (operators as ``options`` say)."""
    cfg = TrainConfig(method=method, steps=steps, meansparse=None if options is None else alpha, **(options or {}))
    model = with_operators(copy.deepcopy(base), cfg, x[:2]).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        loss, _ = adversarial_batch(model, x, y, cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=None, help="ResNet-18 base widths (64 = standard)")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes")
    p.add_argument("--activation", default="relu", help="activation of the ResNet-18")
    p.add_argument("--method", default="pgd", choices=["pgd", "trades", "fgsm-rs"], help="training method")
    p.add_argument("--steps", type=int, default=2, help="inner attack steps")
    p.add_argument("--alpha", type=float, default=0.25, help="α of the operators")
    args = p.parse_args()
    setup(args.threads)
    set_clock(args.clock, args.threads, args.device)
    widths = args.widths or ([8] if args.quick else [16, 64])
    sizes = args.batch or ([16] if args.quick else [64, 128])
    repeats = args.repeats or (3 if args.quick else 10)
    env = environment(args.threads)
    print(f"# {__doc__.splitlines()[0]}\n# {describe(env)}; {args.method} with {args.steps} attack steps, "
          f"α = {args.alpha}, median of {repeats} interleaved rounds\n")
    rows, results = [], []
    for width in widths:
        base = create_model("resnet18", width=width, activation=args.activation).to(args.device)
        base = base.to(memory_format=torch.channels_last)
        for n in sizes:
            x = torch.rand(n, 3, 32, 32, device=args.device).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (n,), device=args.device)
            fns = {k: stepper(base, o, x, y, args.method, args.steps, args.alpha) for k, o in VARIANTS.items()}
            res = interleaved(fns, repeats)
            rel = ratios(res, "base")
            for k, r in res.items():
                rows.append([width, n, k, f"{r['median'] * 1e3:.1f}", f"{n / r['median']:.0f}", f"{rel[k]:.2f}"])
            results.append({"width": width, "batch": n,
                            "variants": {k: {"median_s": r["median"], "min_s": r["min"], "ratio": rel[k]}
                                         for k, r in res.items()}})
    print(fmt_table(rows, ["width", "batch", "variant", "ms/step", "img/s", "× base"]))
    write_json(args.json, {"environment": env, "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
