"""The evaluation paths side by side on one device: eager operator, fused kernels and the whole model compiled
(``ms.evaluate(path="eager" / "fused" / "compiled")``), each running the CLI's default attack list (AutoAttack,
BPDA, transfer, Square; fewer iterations) on a small digits CNN with MeanSparse.  It checks that every path
runs every attack (CUDA graphs included) and prints time, accuracies and whether the reports match the eager
one, then what ``path="auto"`` would choose for a full-size job on this device.

    python benchmarks/check_paths.py --device cuda
    python benchmarks/check_paths.py --threads 2          # the same on the CPU
"""

from __future__ import annotations

import copy
import time

import torch
from _common import base_parser, describe, environment, fmt_table, set_clock, setup, write_json
from bench_evaluate import digits_model

import meansparse as ms
from meansparse.data import Batches, load_dataset
from meansparse.evaluation.attacks.registry import DEFAULT_ATTACKS
from meansparse.fastpath import choose_path

OPTIONS = {"aa": {"steps": 10, "queries": 100}, "apgd-ce": {"steps": 10}, "apgd-t": {"steps": 10},
           "transfer": {"steps": 10}, "square": {"queries": 100}}


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=100)
    args = p.parse_args()
    setup(args.threads)
    set_clock(args.clock, args.threads, args.device)
    device = torch.device(args.device)
    base = digits_model().to(device)
    test = load_dataset("digits", "test").head(args.n)
    x, y = test.float(), test.labels
    model = ms.prepare(copy.deepcopy(base), example_inputs=(x[:2].to(device),))
    ms.calibrate(model, Batches(load_dataset("digits", "train"), 256), progress=False)
    ms.set_alpha(model, 0.5)
    rows, reports, out = [], {}, {"environment": environment(args.threads), "paths": {}}
    for name, path in (("eager operator", "eager"), ("fused", "fused"), ("whole model compiled", "compiled")):
        for run in ("first (compiles)", "second"):
            start = time.perf_counter()
            try:
                r = ms.evaluate(model, x, y, eps=0.1, attacks=DEFAULT_ATTACKS, attack_options=OPTIONS,
                                batch_size=args.batch_size, progress=False, path=path, base_model=base)
            except Exception as e:  # noqa: BLE001 - report every path
                rows.append([name, run, "failed", f"{type(e).__name__}: {str(e)[:150]}", "", ""])
                break
            seconds = time.perf_counter() - start
            reports[name] = r
            same = r.comparable() == reports["eager operator"].comparable()
            rows.append([name, run, f"{seconds:.2f}", f"{r.clean_accuracy:.3f}", f"{r.worst_case_accuracy:.3f}",
                         "yes" if same else "no"])
            out["paths"].setdefault(name, []).append({"seconds": seconds, "clean": r.clean_accuracy,
                                                      "worst_case": r.worst_case_accuracy,
                                                      "robust": r.robust_accuracy, "identical": same})
    print(f"{describe(out['environment'])}\ndigits small_cnn + MeanSparse (alpha 0.5), {args.n} test images, batch "
          f"{args.batch_size}; attacks {', '.join(DEFAULT_ATTACKS)} (10 steps, 100 queries)\n")
    print(fmt_table(rows, ["path", "run", "seconds", "clean", "worst case", "report = eager's"]))
    full = ms.EvaluationSpec().estimated_passes(10_000)  # the standard attacks on 10,000 images
    d = choose_path(model, x[: args.batch_size].to(device), full, "auto")
    out["auto_full_job"] = d.as_dict()
    print(f"\npath='auto' for the default attacks at full strength on 10,000 images: {d.description} ({d.reason})")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
