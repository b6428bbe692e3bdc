"""Streamed calibration: peak RSS over N and 4N images (must not grow with N) and images/s against a plain
eval pass over the same loader.

Data: the CIFAR-10 JPEG archive (``../shared/data/cifar10-jpg.tar.gz``, train split, 50,000 JPEGs; ``--data``
takes another tar archive or image folder), streamed by ``meansparse.data.TarDataset`` through
``meansparse.data.loader(..., workers=W)``; N images drawn with ``sample(N, seed=0)``.  Model: ResNet-18
(``--width``, random weights, 32x32 inputs), prepared with ``ms.prepare``.

Memory: one fresh child process per run, ``--memory-repeats`` runs per case, each case without and with
GLIBC_TUNABLES (``--glibc``).  A warm-up calibration on two random batches loads the compiled kernels; then
the peak-RSS mark is reset, the data is opened and one pass runs over all N images.  Reported: RSS when the
mark was reset, the peak's growth above it (median, min-max over the runs), how much of that growth came
after the first quarter of the pass, and the largest peak RSS of any decoding worker (``RUSAGE_CHILDREN``;
mostly pages shared with the parent that forked it).  Cases:

  streamed    ``ms.calibrate`` over the streamed loader (what this benchmark is about)
  streamed-eager  the same with MEANSPARSE_COMPILE=0 (calibration's eager moments instead of its compiled
              kernels)
  in-memory   ``ms.calibrate`` over ``Batches`` of ``load_jpeg_archive`` (the whole split decoded to uint8,
              from the .npz cache this script builds beforehand), sampled to the same N images
  control     no data at all: the base model's no-grad forward over N random images made batch by batch;
              whatever this grows with N is the allocator's, not the data path's

Speed, one process, variants interleaved (wall clock: decoding runs in the workers): ``decode`` iterates the
loader only, ``eval`` runs the base model under no_grad over it, ``calibrate`` is ``ms.calibrate`` over it.

    python benchmarks/bench_streaming.py --quick
    python benchmarks/bench_streaming.py --n 4000 --workers 1
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from pathlib import Path

import _common as bench
import torch

import meansparse as ms
from meansparse.data import Batches, load_jpeg_archive, loader, open_stream
from meansparse.models import create_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpg.tar.gz"


def build(width: int):
    torch.manual_seed(0)
    base = create_model("resnet18", width=width).eval()
    model = ms.prepare(base, example_inputs=(torch.rand(2, 3, 32, 32),))
    return base, model


def streamed(args, n: int):
    return open_stream(args.data, args.split).sample(n, seed=0)


def memory_child(args) -> None:
    if args.memory == "streamed-eager":
        os.environ["MEANSPARSE_COMPILE"] = "0"
    bench.setup(args.threads)
    base, model = build(args.width)
    n = args.memory_n
    ms.calibrate(model, [torch.rand(args.batch, 3, 32, 32) for _ in range(2)], progress=False)  # warm-up
    with torch.no_grad():
        base(torch.rand(args.batch, 3, 32, 32))
    reset = bench.reset_peak_rss()
    start = bench.rss_mib()
    peaks: list[float] = []  # the peak mark before each batch

    def traced(batches):
        for b in batches:
            peaks.append(bench.peak_rss_mib())
            yield b

    t0 = time.perf_counter()
    if args.memory == "control":
        with torch.no_grad():
            for x in traced(torch.rand(args.batch, 3, 32, 32) for _ in range(n // args.batch)):
                base(x)
    else:
        if args.memory.startswith("streamed"):
            batches = loader(streamed(args, n), args.batch, args.workers)
        else:
            batches = Batches(load_jpeg_archive(args.data, args.split).sample(n, seed=0), args.batch)
        ms.calibrate(model, traced(batches), progress=False)
    seconds = time.perf_counter() - t0
    peak = bench.peak_rss_mib()
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"variant": args.memory, "images": n, "start_rss_mib": start, "peak_rss_mib": peak,
                      "growth_mib": peak - start, "late_growth_mib": peak - peaks[len(peaks) // 4],
                      "worker_peak_rss_mib": worker if args.memory.startswith("streamed") else None,
                      "peak_reset": reset, "seconds": seconds, "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}))


def speed(args) -> dict:
    base, model = build(args.width)
    data = streamed(args, args.n)
    batches = loader(data, args.batch, args.workers)

    def decode():
        for _ in batches:
            pass

    def eval_pass():
        with torch.no_grad():
            for x, _ in batches:
                base(x)

    def calibrate():
        ms.calibrate(model, batches, progress=False)

    res = bench.interleaved({"decode": decode, "eval": eval_pass, "calibrate": calibrate}, args.repeats)
    return {k: {"median_s": v["median"], "images_per_s": args.n / v["median"], "samples": v["samples"]}
            for k, v in res.items()}


def main() -> None:
    p = bench.base_parser(__doc__.splitlines()[0])
    p.add_argument("--data", default=str(SHARED), help="tar archive or image folder ([split/]class/image)")
    p.add_argument("--split", default="train")
    p.add_argument("--n", type=int, default=None, help="N: images of the speed run and the smaller memory run")
    p.add_argument("--workers", type=int, default=1, help="DataLoader decoding processes")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--width", type=int, default=16, help="ResNet-18 width")
    p.add_argument("--memory-repeats", type=int, default=2, help="child processes per memory case")
    p.add_argument("--glibc", choices=["both", "default", "tuned"], default="both",
                   help="memory runs without GLIBC_TUNABLES, with it (see _common.GLIBC_TUNABLES), or both")
    p.add_argument("--memory", default=None, help=bench.hidden())
    p.add_argument("--memory-n", type=int, default=None, help=bench.hidden())
    args = p.parse_args()
    args.n = args.n or (1000 if args.quick else 5000)
    args.repeats = args.repeats or (3 if args.quick else 5)
    if args.memory:
        memory_child(args)
        return
    bench.setup(args.threads)
    clock = bench.set_clock("wall" if args.workers and args.clock == "auto" else args.clock, args.threads, args.device)
    open_stream(args.data, args.split)  # build the index (and a .tar.gz's payload cache) before measuring
    load_jpeg_archive(args.data, args.split)  # and the in-memory path's .npz cache
    out = {"environment": bench.environment(args.threads), "args": {k: v for k, v in vars(args).items()
                                                             if k not in ("memory", "memory_n")}, "memory": []}
    glibcs = {"both": ("default", "tuned"), "default": ("default",), "tuned": ("tuned",)}[args.glibc]
    for glibc in glibcs:
        for variant in ("streamed", "streamed-eager", "in-memory", "control"):
            for n in (args.n, 4 * args.n):
                cmd = ["--memory", variant, "--memory-n", str(n), "--threads", str(args.threads), "--data",
                       args.data, "--split", args.split, "--workers", str(args.workers), "--batch", str(args.batch),
                       "--width", str(args.width)]
                runs = [bench.run_child(cmd, f"memory {variant} {n}", tunables=glibc == "tuned")
                        for _ in range(args.memory_repeats)]
                out["memory"].append({"variant": variant, "glibc": glibc, "images": n, "runs": runs})
    out["speed"] = speed(args)
    env = out["environment"]
    print(f"{bench.describe(env)}, ResNet-18 width {args.width}, 32x32, batch {args.batch}, workers {args.workers}, "
          f"data {os.path.basename(args.data)} ({args.split})\n")
    print(f"memory of opening the data + one pass (MiB), {args.memory_repeats} fresh processes per row: RSS "
          "before the data is opened, the peak's growth above it (median, min-max), the part of that growth\n"
          "after the first quarter of the pass (median), the largest decoding worker's peak RSS\n")
    rows = []
    for m in out["memory"]:
        growth = sorted(r["growth_mib"] for r in m["runs"])
        workers = [r["worker_peak_rss_mib"] for r in m["runs"] if r["worker_peak_rss_mib"] is not None]
        rows.append([m["variant"], m["glibc"], m["images"],
                     f"{statistics.median(r['start_rss_mib'] for r in m['runs']):.0f}",
                     f"{statistics.median(growth):.0f} ({growth[0]:.0f}-{growth[-1]:.0f})",
                     f"{statistics.median(r['late_growth_mib'] for r in m['runs']):.0f}",
                     f"{max(workers):.0f}" if workers else "-"])
    print(bench.fmt_table(rows, ["pass", "glibc", "images", "RSS before", "peak growth", "of it after 1st quarter",
                           "largest worker peak"]))
    s = out["speed"]
    print(f"\nspeed over the same loader, {args.n} images, median of {args.repeats} interleaved rounds "
          f"(clock={clock})\n")
    print(bench.fmt_table([[args.n, args.workers, f"{s['decode']['images_per_s']:.0f}",
                            f"{s['eval']['images_per_s']:.0f}",
                      f"{s['calibrate']['images_per_s']:.0f}",
                      f"{s['calibrate']['median_s'] / s['eval']['median_s']:.3f}"]],
                    ["images", "workers", "decode only img/s", "eval img/s", "calibrate img/s",
                     "calibrate / eval time"]))
    bench.write_json(args.json, out)


if __name__ == "__main__":
    main()
