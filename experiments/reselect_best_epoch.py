"""Re-apply the best-epoch rule (highest held-out PGD-10 accuracy) with an unbiased held-out sample.

The reference runs were started before held-out subsets were drawn at random; their in-training held-out
metric used a class-biased prefix. Only two candidates are on disk per run (`best.*` and the final epoch in
`last.safetensors`); this script measures both on the first `--n` images of the (random-order) held-out split
with the run's own settings and writes the winner to checkpoints/NAME.{safetensors,json}, recording why.

    python experiments/reselect_best_epoch.py runs/cifar10-resnet18-gelu-pgd cifar10-resnet18-gelu-pgd
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import meansparse as ms
from meansparse.data import holdout_split, load_dataset
from meansparse.training import TrainConfig, holdout_metrics

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("name")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    state = json.loads((args.run / "state.json").read_text())
    cfg = TrainConfig(**state["config"])
    cfg.eval_n = args.n
    _, hold = holdout_split(load_dataset(cfg.dataset, "train"), cfg.n_holdout, seed=cfg.seed)
    best = ms.models.load(args.run / "best")
    last = ms.models.load(args.run / "best")
    last.load_state_dict({k[6:]: v for k, v in load_file(str(args.run / "last.safetensors")).items()
                          if k.startswith("model.")})
    key = "holdout_clean" if cfg.method == "standard" else "holdout_pgd"
    scores = {}
    for label, model, epoch in (("best", best, state["best"]["epoch"]), ("last", last, state["epoch"])):
        scores[label] = {"epoch": epoch, **holdout_metrics(model, hold, cfg, torch.device("cpu"))}
        print(label, scores[label], file=sys.stderr)
    win = max(scores, key=lambda k: (scores[k][key], scores[k]["epoch"]))
    model = best if win == "best" else last
    config = json.loads((args.run / "best.json").read_text())
    config["best_epoch"] = {**state["history"][scores[win]["epoch"] - 1]}
    config["selection"] = {
        "rule": f"highest {key} on the first {args.n} held-out images (random order, seed {cfg.seed})",
        "candidates": scores, "chosen": win,
        "command": "python experiments/reselect_best_epoch.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    ms.models.save_checkpoint(model, ROOT / "checkpoints" / args.name, config)
    print(json.dumps(config["selection"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
