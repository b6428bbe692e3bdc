"""What compiling the fused kernels costs, against what they save per attack step: the numbers behind the
rule that decides when meansparse fuses by default (``meansparse.accel.auto``).

For each architecture, in fresh child processes: the first fused attack step (forward + backward, which
compiles every kernel the model needs) with an empty inductor cache ("cold") and again with the cache the
cold run left ("warm", a second run on the same machine), then the steady-state step time of the eager and
the fused model.  Break-even = compile overhead / (eager step - fused step): the number of attack steps
after which fusing has paid for itself.

    python benchmarks/bench_compile.py --threads 2
    python benchmarks/bench_compile.py --threads 2 --quick
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from _common import base_parser, describe, environment, fmt_table, hidden, setup, write_json
from bench_operator import attack_step, build

from meansparse._compile import compile_enabled

CASES = {"resnet18-gelu-16": ("resnet18", 16, "gelu", 16), "dm_wrn-16-4": ("dm_wrn", 4, "silu", 16)}


def child(args) -> dict:
    setup(args.threads)
    arch, width, act, depth = CASES[args.case]
    _, eager, fused, x = build(width, act, args.batch, 0.25, "cpu", arch, depth)
    step_f, step_e = attack_step(fused, x, "exact"), attack_step(eager, x, "exact")
    t = time.perf_counter()
    step_f()  # compiles every kernel of this model (cold or warm cache)
    first = time.perf_counter() - t
    fused_t, eager_t = [], []
    for _ in range(args.repeats):
        for run, sink in ((step_f, fused_t), (step_e, eager_t)):
            t = time.perf_counter()
            run()
            sink.append(time.perf_counter() - t)
    fused_s, eager_s = sorted(fused_t)[len(fused_t) // 2], sorted(eager_t)[len(eager_t) // 2]
    return {"first_fused_step": first, "fused_step": fused_s, "eager_step": eager_s,
            "compile_overhead": first - fused_s, "environment": environment(args.threads)}


def run_child(argv: list[str], cache: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
    out = subprocess.run([sys.executable, __file__, *argv, "--child"], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--case", default=None, help=hidden())
    p.add_argument("--child", action="store_true", help=hidden())
    args = p.parse_args()
    args.batch = args.batch or (64 if args.quick else 256)
    args.repeats = args.repeats or (3 if args.quick else 5)
    if args.child:
        print(json.dumps(child(args)))
        return
    if not compile_enabled():
        raise SystemExit("torch.compile is unavailable here: nothing to measure")
    rows, results = [], {}
    base = [a for a in sys.argv[1:] if a not in ("--child",)]
    for case in args.cases:
        with tempfile.TemporaryDirectory() as cache:
            cold = run_child([*base, "--case", case], cache)
            warm = run_child([*base, "--case", case], cache)
        saving = cold["eager_step"] - cold["fused_step"]
        results[case] = {"cold": cold, "warm": warm}
        rows.append([case, args.batch, f"{cold['eager_step']:.2f}", f"{cold['fused_step']:.2f}",
                     f"{cold['compile_overhead']:.1f}", f"{warm['compile_overhead']:.1f}",
                     f"{cold['compile_overhead'] / saving:.0f}" if saving > 0 else "never",
                     f"{warm['compile_overhead'] / saving:.0f}" if saving > 0 else "never"])
    env = results[args.cases[0]]["cold"]["environment"]
    print(f"{describe(env)}\nattack step = forward + backward w.r.t. the input (exact gradient), seconds; "
          "break-even in attack steps\n")
    print(fmt_table(rows, ["case", "batch", "eager step s", "fused step s", "compile cold s", "compile warm s",
                           "break-even cold", "break-even warm"]))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
