"""Cost of the α sweep (``meansparse.search_alpha``): it should grow with α values × examples still robust.

The statistics are calibrated once before the sweep; between α values only ``set_alpha`` runs.  For a few
(number of α values, number of robust-evaluation examples) settings this prints the sweep's time, the
number of (example, attack) pairs actually attacked (AutoAttack-style cascade: an attack only sees the
examples still robust), the seconds per attacked pair, and how many calibration passes ran during the sweep
(must be 0).

    python benchmarks/bench_sweep.py --threads 1 --quick
"""

from __future__ import annotations

import time

from _common import base_parser, describe, environment, fmt_table, set_clock, setup, write_json
from bench_evaluate import digits_model

import meansparse as ms
from meansparse import MeanSparse
from meansparse import search as search_module
from meansparse.data import Batches, load_dataset


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--alphas", type=int, nargs="+", default=None, help="numbers of α values to sweep")
    p.add_argument("--robust", type=int, nargs="+", default=None, help="robust-evaluation example counts")
    p.add_argument("--steps", type=int, default=None, help="APGD steps of the sweep attacks")
    args = p.parse_args()
    setup(args.threads)
    clock = set_clock(args.clock, args.threads)
    args.alphas = args.alphas or ([2, 4] if args.quick else [2, 4, 8])
    args.robust = args.robust or ([64, 128] if args.quick else [64, 128, 256])
    args.steps = args.steps or (20 if args.quick else 50)
    now = time.process_time if clock == "cpu" else time.perf_counter

    base = digits_model()
    for q in base.parameters():
        q.requires_grad_(False)
    train = load_dataset("digits", "train")
    fit, hold = train.subset(slice(0, 1000)), train.subset(slice(1000, None))
    model = ms.prepare(base, example_inputs=(hold.float()[:2],))
    ms.calibrate(model, Batches(fit, 256), progress=False)
    ms.fuse(model)
    x, y = hold.float(), hold.labels

    calibrations = {"n": 0}
    real_start = MeanSparse.start_observing

    def counting_start(self):
        calibrations["n"] += 1
        return real_start(self)

    attacked = {"n": 0}
    real_evaluate = search_module.evaluate  # what each α of the search runs

    def counting_evaluate(*a, **kw):
        report = real_evaluate(*a, **kw)
        attacked["n"] += sum(row["n_attacked"] for row in report.breakdown)
        return report

    def sweep(alphas, n_robust):
        ms.search_alpha(model, x, y, alphas, n_robust=n_robust, eps=0.1, batch_size=32, progress=False,
                        attack_options={"apgd-ce": {"steps": args.steps}})

    sweep([0.0, 0.1], 32)  # warm-up (first-call kernel compilation)
    MeanSparse.start_observing = counting_start
    search_module.evaluate = counting_evaluate
    rows, out = [], []
    try:
        for n_alpha in args.alphas:
            alphas = [0.0] + [0.05 * (i + 1) for i in range(n_alpha - 1)]
            for n_robust in args.robust:
                calibrations["n"] = attacked["n"] = 0
                t0 = now()
                sweep(alphas, n_robust)
                seconds = now() - t0
                rows.append([n_alpha, n_robust, f"{seconds:.2f}", attacked["n"],
                             f"{1e3 * seconds / max(attacked['n'], 1):.1f}", calibrations["n"]])
                out.append({"alphas": n_alpha, "n_robust": n_robust, "seconds": seconds, "attacked": attacked["n"],
                            "calibrations": calibrations["n"]})
    finally:
        MeanSparse.start_observing = real_start
        search_module.evaluate = real_evaluate
    env = environment(args.threads)
    print(f"{describe(env)}\ndigits small_cnn (fused MeanSparse), held-out {len(x)} images "
          f"(clean accuracy on all of them per α), batch 32, attacks apgd-ce ({args.steps} steps) then bpda-apgd-ce on "
          "the examples still robust\n")
    print(fmt_table(rows, ["α values", "robust examples", "sweep s", "attacked (example, attack) pairs",
                           "ms per attacked pair", "calibration passes"]))
    write_json(args.json, {"environment": env, "rows": out})


if __name__ == "__main__":
    main()
