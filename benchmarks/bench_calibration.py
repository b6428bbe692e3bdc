"""Calibration pass vs a plain no-grad eval pass over the same loader: time ratio and peak memory.

Variants (interleaved in one process for time; each also in its own child process for peak RSS):
  eval        plain ``model(x)`` under no_grad over the loader (the base model)
  eval_prepared  the same with the prepared model at alpha = 0 (operators present, doing nothing)
  calibrate   ``ms.calibrate`` (shifted per-group sums, compiled when available)
  calibrate_eager  the same with MEANSPARSE_COMPILE=0 (eager chunks of at most 1 MiB of scratch)
  reference   the previous implementation: a float64 copy of every feature map + two-pass var_mean
              (``Moments.batch_stats``) and one finiteness sync per site and batch

    python benchmarks/bench_calibration.py --threads 1 --quick
    python benchmarks/bench_calibration.py --threads 16 --widths 16 64 --batch 256 --batches 8
    python benchmarks/bench_calibration.py --threads 2 --arch dm_wrn --depth 16 --widths 4 --batch 256
    python benchmarks/bench_calibration.py --device cuda --widths 16 64 --batch 1024 --batches 16

On a CUDA device the batches already sit on the GPU (for every variant alike) and memory is the allocator's
(``torch.cuda.max_memory_allocated``) instead of RSS.
"""

from __future__ import annotations

import json

import torch
from _common import (
    base_parser,
    describe,
    environment,
    fmt_table,
    hidden,
    interleaved,
    peak_rss_mib,
    ratios,
    reset_peak_rss,
    rss_mib,
    run_child,
    set_clock,
    setup,
    write_json,
)
from bench_operator import architecture

import meansparse as ms
from meansparse.core import Moments


def build(width: int, activation: str, batch: int, batches: int, device: str = "cpu", arch: str = "resnet18",
          depth: int = 16):
    torch.manual_seed(0)
    net, preset = architecture(arch, width, activation, depth)
    base = net.eval().to(device)
    data = [torch.rand(batch, 3, 32, 32).to(device) for _ in range(batches)]
    model = ms.prepare(base, example_inputs=(data[0][:2],), preset=preset)
    return base, model, data


def reference_observe(op, x):
    """The float64 reference path (what calibration did before): per-site float64 copy and a sync."""
    b = Moments.batch_stats(x, op.channel_dim(x.ndim))
    if not bool(torch.isfinite(b.mean_).all() and torch.isfinite(b.m2).all()):
        raise ValueError("non-finite")
    op.observer.merge(b)


def variant_fns(base, model, data):
    def eval_pass():
        with torch.no_grad():
            for x in data:
                base(x)

    def eval_prepared():
        with torch.no_grad():
            for x in data:
                model(x)

    def calibrate():
        ms.calibrate(model, data, progress=False)

    def calibrate_eager():
        import os

        os.environ["MEANSPARSE_COMPILE"] = "0"
        try:
            ms.calibrate(model, data, progress=False)
        finally:
            del os.environ["MEANSPARSE_COMPILE"]

    def reference():
        ops = ms.operators(model)
        try:
            for op in ops:  # an instance attribute shadows the method for the duration of the pass
                op.observe = (lambda x, op=op: (op.check_channels(x), reference_observe(op, x)))
            ms.calibrate(model, data, progress=False)
        finally:
            for op in ops:
                del op.observe

    return {"eval": eval_pass, "eval_prepared": eval_prepared, "calibrate": calibrate,
            "calibrate_eager": calibrate_eager, "reference": reference}


def memory_child(args) -> None:
    """Peak RSS of one pass of one variant in a fresh process: one warm-up pass (first-call compilation,
    allocator growth), then the peak mark is reset and the measured pass runs."""
    setup(args.threads)
    base, model, data = build(args.width_one, args.activation, args.batch, args.batches, args.device, args.arch,
                              args.depth)
    fns = variant_fns(base, model, data)
    fns[args.memory]()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        reset, start = True, torch.cuda.memory_allocated() / 2**20
        fns[args.memory]()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        print(json.dumps({"variant": args.memory, "peak_rss_mib": peak, "start_rss_mib": start,
                          "growth_mib": peak - start, "peak_reset": reset}))
        return
    reset = reset_peak_rss()
    start = rss_mib()
    fns[args.memory]()
    peak = peak_rss_mib()
    print(json.dumps({"variant": args.memory, "peak_rss_mib": peak, "start_rss_mib": start,
                      "growth_mib": peak - start, "peak_reset": reset}))


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--arch", choices=["resnet18", "dm_wrn", "swin", "convnext"], default="resnet18",
                   help="as bench_operator.py --arch (each with its preset placement)")
    p.add_argument("--depth", type=int, default=16, help="dm_wrn depth")
    p.add_argument("--widths", type=int, nargs="+", default=None)
    p.add_argument("--activation", default="relu", help="resnet18's activation")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--batches", type=int, default=None)
    p.add_argument("--memory", default=None, help=hidden())
    p.add_argument("--width-one", type=int, default=None, help=hidden())
    args = p.parse_args()
    default_widths = {"resnet18": [16, 64], "dm_wrn": [4, 10], "swin": [32], "convnext": [32]}[args.arch]
    args.widths = args.widths or (default_widths[:1] if args.quick else default_widths)
    args.batch = args.batch or (128 if args.quick else 256)
    args.batches = args.batches or (2 if args.quick else 8)
    args.repeats = args.repeats or (5 if args.quick else 7)
    if args.memory:
        memory_child(args)
        return
    setup(args.threads)
    set_clock(args.clock, args.threads, args.device)
    rows, out = [], {"environment": environment(args.threads), "cases": []}
    for width in args.widths:
        base, model, data = build(width, args.activation, args.batch, args.batches, args.device, args.arch,
                                  args.depth)
        fns = variant_fns(base, model, data)
        res = interleaved(fns, args.repeats)
        r = ratios(res, "eval")
        mem = {}
        for v in (v for v in fns if v != "eval_prepared"):
            cmd = ["--memory", v, "--width-one", str(width), "--threads",
                   str(args.threads), "--activation", args.activation, "--batch", str(args.batch), "--batches",
                   str(args.batches), "--device", args.device, "--arch", args.arch, "--depth", str(args.depth)]
            mem[v] = run_child(cmd, f"memory {v}")
        images = args.batch * args.batches
        rows.append([width, args.batch, args.batches, f"{1e3 * res['eval']['median']:.0f}",
                     f"{r['eval_prepared']:.3f}", f"{r['calibrate']:.3f}", f"{r['calibrate_eager']:.3f}",
                     f"{r['reference']:.3f}",
                     f"{images / res['calibrate']['median']:.0f}",
                     *(f"{mem[v]['start_rss_mib']:.0f} + {mem[v]['growth_mib']:.0f}" for v in mem)])
        out["cases"].append({"width": width, "batch": args.batch, "batches": args.batches,
                             "median_s": {k: v["median"] for k, v in res.items()}, "ratio": r, "memory": mem})
    env = out["environment"]
    arch = f"ResNet-18 ({args.activation})" if args.arch == "resnet18" else (
        f"DMWideResNet-{args.depth} (SiLU)" if args.arch == "dm_wrn" else args.arch)
    print(f"{describe(env)}, {arch}, 32x32 inputs\n"
          "ratios: median time / median time of the plain eval pass over the same batches, interleaved\n")
    print("memory: RSS (on a GPU: allocated device memory) at the start of a pass + the pass's peak growth\n"
          "above it (MiB), measured in a fresh "
          "process per variant after one warm-up pass (compiled kernels loaded; the inductor runtime itself\n"
          "adds ~100 MiB of resident code to the start RSS of 'calibrate')\n")
    print(fmt_table(rows, ["width", "batch", "batches", "eval ms", "prepared α=0 / eval", "calibrate / eval",
                           "eager calibrate / eval",
                           "float64 reference / eval", "calibrate img/s", "mem eval", "mem calibrate",
                           "mem eager calibrate", "mem reference"]))
    write_json(args.json, out)



if __name__ == "__main__":
    main()
