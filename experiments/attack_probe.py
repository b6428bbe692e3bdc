"""Which MeanSparse-aware attack breaks what: each attack alone on every clean-correct image (one rung), on one
reference checkpoint at one α, and the union.  What chose the default attacks and sharpness values (#25).

    python experiments/attack_probe.py --model relu-pgd --alpha 0.35 --n 200 --out probe.json \\
        bpda-apgd-ce bpda-apgd-t sg-apgd-ce:sharpness=4@sg4-apgd-ce sg-apgd-mt:sharpness=2@sg2-apgd-mt

An attack is NAME[:OPTION=VALUE,...][@LABEL]; a list value is written a/b (``sharpness=4/16``).  Prints one
line per attack (robust %, seconds) and the union; ``--out`` keeps the per-image verdicts (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import meansparse as ms
from meansparse.evaluation import build_attack

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablations import Ctx  # noqa: E402


def _value(v: str):
    if "/" in v:
        return [float(u) for u in v.split("/")]
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse(spec: str, base: torch.nn.Module) -> ms.evaluation.Attack:
    spec, _, label = spec.partition("@")
    name, _, opts = spec.partition(":")
    kw = {k: _value(v) for k, v in (kv.split("=") for kv in filter(None, opts.split(",")))}
    attack = build_attack(name, eps=8 / 255, base_model=base, **kw)
    attack.name = label or name
    return attack


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="relu-pgd")
    p.add_argument("--alpha", type=float, default=0.35)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON file for the per-image verdicts")
    p.add_argument("specs", nargs="+")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ctx = Ctx(argparse.Namespace(n=args.n, batch_size=250, device="cpu", steps=100, queries=1000, progress=False))
    base, model = ctx.prepared(args.model)
    ms.set_alpha(model, args.alpha)
    verdicts = {}
    for attack in [parse(s, base) for s in args.specs]:
        t0 = time.time()
        r = ms.evaluate(model, ctx.x, ctx.y, attacks=[attack], base_model=base, batch_size=250, individual=True,
                        progress=False, ladder=False, indicators=False)
        verdicts[attack.name] = r.worst_case_robust
        print(f"{attack.name:28s} robust {100 * r.worst_case_accuracy:5.1f}%  clean {100 * r.clean_accuracy:.1f}%  "
              f"{time.time() - t0:6.0f}s", flush=True)
    union = [all(v[i] for v in verdicts.values()) for i in range(args.n)]
    print(f"union {100 * sum(union) / args.n:.1f}%")
    if args.out:
        Path(args.out).write_text(json.dumps(verdicts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
