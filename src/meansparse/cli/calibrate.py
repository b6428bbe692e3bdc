"""``meansparse calibrate``: prepare a checkpoint, measure every site's statistics, write a state file.

    meansparse calibrate --checkpoint runs/r18/best --data cifar10-jpg --holdout 1000 --out r18.safetensors
    meansparse calibrate --checkpoint ... --data imagenet/ --split train --n-examples 20000 --workers 8 \
        --preprocessing BicubicRes256Crop224 --out swin.safetensors     # streamed: a few batches in memory
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
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .._utils import WriteError, atomic_path, writing
from ..calibration import calibrate
from ..core import operators
from ..data import SPLIT_NAMES, first_images, holdout_split
from ..distributed import all_gather_object, is_main, launch, shard, world_size
from ..placement import prepare, set_alpha
from ..serialization import save
from .common import (
    add_checkpoint_arg,
    add_class_mismatch_arg,
    add_data_args,
    add_device_arg,
    add_preset_arg,
    add_stream_args,
    add_threads_arg,
    check_data_fits,
    check_device,
    check_not_input,
    check_regexes,
    checkpoint_config,
    clamp_count,
    command_parser,
    data_loader,
    data_name,
    load_model_arg,
    non_negative_int,
    notice,
    open_data,
    positive_int,
    preset_of,
    seed_int,
    set_threads,
    writable_file,
)

__all__ = ["add_calibrate_parser", "run_calibrate", "calibrate_checkpoint"]


def add_calibrate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``calibrate`` sub-command."""
    p = command_parser(subparsers, "calibrate", __doc__,
                       "prepare a checkpoint and calibrate MeanSparse statistics (torchrun: data-parallel)")
    add_checkpoint_arg(p)
    add_preset_arg(p)
    add_data_args(p)
    add_stream_args(p)
    add_class_mismatch_arg(p)
    p.add_argument("--split", default="train", choices=SPLIT_NAMES,
                   help="split to calibrate on")
    p.add_argument("--holdout", type=non_negative_int, default=0,
                   help="leave out this many held-out images (holdout_split with --seed, as the α search uses; "
                        "default 0: none)")
    p.add_argument("--n-examples", type=positive_int, default=None,
                   help="calibrate on N randomly drawn remaining images (default: all of them)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per calibration batch")
    p.add_argument("--max-batches", type=positive_int, default=None,
                   help="stop after this many batches (per rank; default: the whole data)")
    p.add_argument("--include", action="append", default=None,
                   help="site regex to keep (repeatable; default: every site)")
    p.add_argument("--exclude", action="append", default=None, help="site regex to drop (repeatable; default: none)")
    p.add_argument("--centering", default="channel", choices=["channel", "zero", "global"],
                   help="what values inside the band are replaced by")
    p.add_argument("--method", default="auto", choices=["auto", "fx", "modules"], help="insertion strategy")
    p.add_argument("--alpha", type=float, default=None, help="alpha stored in the file (default 0: unchanged)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the held-out split and of the sample")
    add_device_arg(p)
    add_threads_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="state file to write (.safetensors)")
    p.set_defaults(func=run_calibrate)
    return p


def run_calibrate(args: argparse.Namespace) -> int:
    """Run the calibration described by ``args``; rank 0 writes ``args.out`` and prints a JSON summary."""
    set_threads(args.threads)
    check_device(args.device)
    with launch(args.device) as device:
        summary = calibrate_checkpoint(args, device)
        if is_main():
            print(json.dumps(summary))
    return 0


def _check_args(args: argparse.Namespace) -> None:
    """What can be checked before loading anything: regexes, α, the output file (a probe write)."""
    check_regexes(args.include, "--include")
    check_regexes(args.exclude, "--exclude")
    if args.alpha is not None and not (args.alpha >= 0 and args.alpha != float("inf")):
        raise ValueError(f"--alpha must be a finite number >= 0, got {args.alpha}")
    check_not_input(args.out, args)
    check_not_input(partial_path(args.out), args, "--out's progress file")
    if is_main():
        writable_file(args.out)


def partial_path(out: str | Path) -> Path:
    """Where the resumable progress of ``--out`` is kept: ``<out>.partial`` beside it."""
    return Path(out).with_name(Path(out).name + ".partial")


def calibrate_checkpoint(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Load, prepare, calibrate (this rank's shard) and, on rank 0, save; returns a summary."""
    _check_args(args)
    model = load_model_arg(args, args.checkpoint, device)
    config = checkpoint_config(args.checkpoint)
    name = data_name(args, config)
    data = open_data(args, args.split, args.checkpoint, name=name)  # a named set in memory, a path streamed
    check_data_fits(model, data, name, config, args.checkpoint, args)
    if args.data is None and is_main():
        notice("calibrate", f"--data {name} (the data set recorded in {args.checkpoint})")
    if args.holdout:
        data, _ = holdout_split(data, args.holdout, seed=args.seed)
    what = f"the {name} {args.split} split" + (" after the held-out part" if args.holdout else "")
    data = data.sample(clamp_count(args.n_examples, len(data), "--n-examples", what, "calibrate", say=is_main()),
                       seed=0)
    mine = shard(data)
    example = first_images(data, 1).to(device)
    model = prepare(model, include=args.include, exclude=args.exclude, centering=args.centering,
                    method=args.method, example_inputs=(example,), preset=preset_of(args))
    start = time.perf_counter()
    # resumable in one process: the batches done so far survive Ctrl-C / a bad batch beside the output file
    partial = partial_path(args.out) if world_size() == 1 else None
    calibrate(model, data_loader(args, mine, args.batch_size), device=device, max_batches=args.max_batches,
              progress=not args.no_progress and is_main(), state_path=partial, keep_state=partial is not None)
    seconds = time.perf_counter() - start
    if args.alpha is not None:
        set_alpha(model, args.alpha)
    images = sum(all_gather_object(_seen(len(mine), args.batch_size, args.max_batches)))
    if is_main():
        _write_state(model, Path(args.out), partial)
    return {"state": str(args.out), "sites": len(operators(model)), "images": images,
            "ranks": world_size(), "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 1) if seconds > 0 else None,
            "data": {"name": name, "split": args.split, "holdout": args.holdout}}


def _write_state(model: Any, out: Path, partial: Path | None) -> None:
    """Save the calibrated state to ``out``, then drop the progress file; a failed write (a full disk) is one
    error saying where the calibration was kept: the progress file (a rerun skips every batch), or, without
    one (torchrun), a copy in the temporary folder."""
    if partial is None:
        try:
            with writing(out), atomic_path(out) as tmp:
                save(model, tmp)
        except WriteError as e:
            raise WriteError(e.errno, f"{e.strerror}; {_save_elsewhere(model, out)}") from e
        return
    kept = f"the calibration is kept in {partial}: free space and rerun the same command (no batch is computed again)"
    out.parent.mkdir(parents=True, exist_ok=True)
    with writing(out, kept), atomic_path(out) as tmp:  # a kill mid-write never leaves a half-written state file
        save(model, tmp)
    partial.unlink(missing_ok=True)


def _save_elsewhere(model: Any, out: Path) -> str:
    """Save the state in the temporary folder instead; says where (or that this failed too)."""
    spare = Path(tempfile.gettempdir()) / f"meansparse-{os.getpid()}-{out.name}"
    try:
        with writing(spare), atomic_path(spare) as tmp:
            save(model, tmp)
    except WriteError as e:
        return f"saving it to {spare} failed too ({e.strerror}); nothing is kept"
    return f"the calibrated state is saved to {spare} instead: move it to {out}"


def _seen(n: int, batch_size: int, max_batches: int | None) -> int:
    """Images one rank calibrates on: its whole shard, or ``max_batches`` full batches of it."""
    if max_batches is None:
        return n
    return min(n, batch_size * max_batches)
