"""CPU passes with glibc's default allocator vs ``ms.tune_cpu_allocator()`` (mallopt at run time, what the
command line does) vs ``GLIBC_TUNABLES`` set before start: ResNet-18 eval pass and attack step, peak RSS.

Each mode runs in its own child process (the allocator setting is process-wide).

    python benchmarks/bench_allocator.py --threads 2
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from _common import (
    GLIBC_TUNABLES,
    base_parser,
    describe,
    environment,
    fmt_table,
    interleaved,
    peak_rss_mib,
    set_clock,
    setup,
)

import meansparse as ms
from meansparse.models import create_model

MODES = ("default", "mallopt", "tunables")


def child(args) -> dict:
    tuned = ms.tune_cpu_allocator() if args.mode == "mallopt" else None
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
    p.add_argument("--mode", choices=MODES, default=None, help=argparse_hidden())
    p.add_argument("--child", action="store_true", help=argparse_hidden())
    args = p.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 7)
    if args.child:
        print(json.dumps(child(args)))
        return
    argv = [a for a in sys.argv[1:] if a != "--child"]
    results = {}
    for mode in MODES:
        env = dict(os.environ)
        env.pop("GLIBC_TUNABLES", None)
        if mode == "tunables":
            env["GLIBC_TUNABLES"] = GLIBC_TUNABLES
        proc = subprocess.run([sys.executable, sys.argv[0], *argv, "--child", "--mode", mode], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit(f"benchmark child ({mode}) failed with exit code {proc.returncode}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
