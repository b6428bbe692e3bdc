"""CPU passes with glibc's default allocator vs ``ms.accel.tune_cpu_allocator()`` (mallopt at run time, what
the command line does) vs ``GLIBC_TUNABLES`` set before start: ResNet-18 eval pass and attack step, peak RSS.

Each mode runs in its own child process (the allocator setting is process-wide).

    python benchmarks/bench_allocator.py --threads 2
"""

from __future__ import annotations

import json
import sys

import torch
from _common import (
    base_parser,
    describe,
    environment,
    fmt_table,
    hidden,
    interleaved,
    peak_rss_mib,
    run_child,
    set_clock,
    setup,
    write_json,
)

import meansparse as ms
from meansparse.models import create_model

MODES = ("default", "mallopt", "tunables")


def child(args) -> dict:
    tuned = ms.accel.tune_cpu_allocator() if args.mode == "mallopt" else None
    setup(args.threads)
    set_clock(args.clock, args.threads)
    out = {"environment": environment(args.threads), "mallopt_applied": tuned}
    for act in args.activations:
        torch.manual_seed(0)
        net = create_model("resnet18", width=args.width, activation=act).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        data = [torch.rand(args.batch, 3, 32, 32) for _ in range(4)]

        def eval_pass(net=net, data=data):
            with torch.no_grad():
                for x in data:
                    net(x)

        def step(net=net, data=data):
            x = data[0].clone().requires_grad_()
            torch.autograd.grad(net(x).logsumexp(1).sum(), x)

        res = interleaved({"eval": eval_pass, "step": step}, args.repeats, warmup=1)
        out[act] = {"eval_ms_per_batch": 1e3 * res["eval"]["median"] / len(data),
                    "step_ms": 1e3 * res["step"]["median"]}
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--activations", nargs="+", default=["relu", "gelu"])
    p.add_argument("--mode", choices=MODES, default=None, help=hidden())
    p.add_argument("--child", action="store_true", help=hidden())
    args = p.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 7)
    if args.child:
        print(json.dumps(child(args)))
        return
    argv = [a for a in sys.argv[1:] if a != "--child"]
    results = {mode: run_child([*argv, "--child", "--mode", mode], mode, mode == "tunables") for mode in MODES}
    rows = []
    for act in args.activations:
        base = results["default"][act]
        for mode in MODES:
            r = results[mode][act]
            ev, st = r["eval_ms_per_batch"], r["step_ms"]
            rows.append([act, mode, f"{ev:.1f}", f"{ev / base['eval_ms_per_batch']:.3f}", f"{st:.1f}",
                         f"{st / base['step_ms']:.3f}", f"{results[mode]['peak_rss_mib']:.0f}"])
    print(describe(results["default"]["environment"]) + f", ResNet-18 width {args.width}, batch {args.batch}\n"
          f"mallopt applied: {results['mallopt']['mallopt_applied']}\n")
    print(fmt_table(rows, ["act", "allocator", "eval ms/batch", "vs default", "attack step ms", "vs default",
                           "peak RSS MiB"]))
    write_json(args.json, results)



if __name__ == "__main__":
    main()
