"""``meansparse calibrate``: prepare a checkpoint, measure every site's statistics, write a state file.

    meansparse calibrate --checkpoint runs/r18/best --data cifar10-jpg --holdout 1000 --out r18.safetensors
    torchrun --nproc_per_node 4 -m meansparse.cli calibrate --checkpoint ... --out r18.safetensors

Under ``torchrun`` each rank loads the data, keeps its strided shard (rank r: examples r, r + W, ...; nothing
duplicated), calibrates it and the per-rank accumulators are merged exactly (all-gather of count / mean / M2
folded with the same Chan merge); rank 0 writes the file.  The statistics equal a single-process run's up to
float64 rounding.  The written state loads with ``meansparse.load(base_model, path)`` or
``meansparse evaluate --meansparse path``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

__all__ = ["add_calibrate_parser", "run_calibrate"]


def add_calibrate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``calibrate`` sub-command."""
    p = subparsers.add_parser(
        "calibrate", help="prepare a checkpoint and calibrate MeanSparse statistics (torchrun: data-parallel)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", "--model", dest="checkpoint", required=True,
                   help="model checkpoint written by `meansparse train` (.safetensors + .json)")
    p.add_argument("--data", default="digits", help="data set name or path (see meansparse.data.load_dataset)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--holdout", type=int, default=0,
                   help="leave out this many held-out images (holdout_split with --seed, as the α search uses)")
    p.add_argument("--n-examples", type=int, default=None, help="calibrate on N randomly drawn remaining images")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches (per rank)")
    p.add_argument("--include", action="append", default=None, help="site regex to keep (repeatable)")
    p.add_argument("--exclude", action="append", default=None, help="site regex to drop (repeatable)")
    p.add_argument("--centering", default="channel", choices=["channel", "zero", "global"])
    p.add_argument("--method", default="auto", choices=["auto", "fx", "modules"])
    p.add_argument("--alpha", type=float, default=None, help="alpha stored in the file (default 0: unchanged)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="state file to write (.safetensors)")
    p.set_defaults(func=run_calibrate)
    return p


def run_calibrate(args: argparse.Namespace) -> int:
    """Run the calibration described by ``args``; rank 0 writes ``args.out`` and prints a JSON summary."""
    import torch

    from .distributed import is_main, launch

    if args.threads:
        torch.set_num_threads(args.threads)
    with launch(args.device) as device:
        summary = calibrate_checkpoint(args, device)
        if is_main():
            print(json.dumps(summary))
    return 0


def calibrate_checkpoint(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Load, prepare, calibrate (this rank's shard) and, on rank 0, save; returns a summary."""
    import meansparse as ms
    from meansparse.data import Batches, holdout_split, load_dataset
    from meansparse.models import load

    from .distributed import all_gather_object, is_main, shard, world_size

    model = load(args.checkpoint, device=device)
    data = load_dataset(args.data, args.split, root=args.data_root)
    if args.holdout:
        data, _ = holdout_split(data, args.holdout, seed=args.seed)
    data = data.sample(args.n_examples, seed=0)
    mine = shard(data)
    example = data.subset(slice(0, 1)).float().to(device)
    model = ms.prepare(model, include=args.include, exclude=args.exclude, centering=args.centering,
                       method=args.method, example_inputs=(example,))
    start = time.perf_counter()
    ms.calibrate(model, Batches(mine, args.batch_size), device=device, max_batches=args.max_batches,
                 progress=not args.no_progress and is_main())
    seconds = time.perf_counter() - start
    if args.alpha is not None:
        ms.set_alpha(model, args.alpha)
    images = sum(all_gather_object(_seen(len(mine), args.batch_size, args.max_batches)))
    if is_main():
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        ms.save(model, out)
    return {"state": str(args.out), "sites": len(ms.operators(model)), "images": images,
            "ranks": world_size(), "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 1) if seconds > 0 else None}


def _seen(n: int, batch_size: int, max_batches: int | None) -> int:
    if max_batches is None:
        return n
    return min(n, batch_size * max_batches)
