"""Measure the reference checkpoints on the CIFAR-10 test split with our own `evaluate`.

    python experiments/reference_metrics.py --n 1000

Clean accuracy on all 10,000 test images; PGD-20 and APGD-CE (Linf 8/255) on the first `--n` of a fixed
random permutation (seed 0). Results go into each checkpoint's JSON ("metrics") and into
checkpoints/README.md and docs/checkpoints.md, with this command.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

import meansparse as ms
from meansparse.data import load_dataset

ROOT = Path(__file__).resolve().parent.parent
CKPT = ROOT / "checkpoints"
NAMES = ["cifar10-resnet18-gelu-pgd", "cifar10-resnet18-relu-pgd", "cifar10-resnet18-gelu-trades",
         "cifar10-resnet18-gelu-standard"]


@torch.no_grad()
def clean_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    hits = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return hits / len(x)


def _row(name: str, cfg: dict) -> str:
    tr, m = cfg["training"], cfg["metrics"]
    pgd = next(v for k, v in m.items() if k.startswith("test_pgd20"))
    apgd = next(v for k, v in m.items() if k.startswith("test_apgd_ce"))
    n = next(k for k in m if k.startswith("test_pgd20")).rsplit("_n", 1)[1]
    method = tr["method"] + (f" ({tr['steps']} steps)" if tr["method"] in ("pgd", "trades") else "")
    return (f"| `{name}` | {cfg['model_kwargs'].get('width')} | {method} | {tr['epochs']} (chosen "
            f"{cfg['best_epoch']['epoch']}) | {100 * m['test_clean_accuracy_10000']:.2f} | {100 * pgd:.2f} | "
            f"{100 * apgd:.2f} | {n} | `{cfg['command']}` |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--names", nargs="+", default=NAMES)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python experiments/reference_metrics.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    test = load_dataset("cifar10-jpg", "test")
    x_all, y_all = test.float(), test.labels
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[: args.n].sort().values
    x, y = x_all[idx], y_all[idx]
    rows = []
    for name in args.names:
        path = CKPT / f"{name}.json"
        if not path.exists():
            print(f"skip {name}: no checkpoint", file=sys.stderr)
            continue
        model = ms.models.load(CKPT / name)
        t0 = time.time()
        clean = clean_accuracy(model, x_all, y_all)
        rep = ms.evaluate(model, x, y, eps=8 / 255, attacks=("pgd", "apgd-ce"), individual=True, seed=0,
                          attack_options={"pgd": {"steps": 20, "step_size": 2 / 255}}, batch_size=250,
                          ladder=False, indicators=False)  # the plain PGD-20 / APGD-CE numbers of checkpoints.md
        cfg = json.loads(path.read_text())
        cfg["metrics"] = {
            "test_clean_accuracy_10000": clean,
            f"test_pgd20_linf_8_255_n{args.n}": rep.robust_accuracy["pgd"],
            f"test_apgd_ce_linf_8_255_n{args.n}": rep.robust_accuracy["apgd-ce"],
            "test_subset_clean_accuracy": rep.clean_accuracy,
            "measured_by": command,
        }
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        print(name, cfg["metrics"], f"({time.time() - t0:.0f} s)", file=sys.stderr)
    for name in NAMES:  # every checkpoint measured so far, by this run or an earlier one
        path = CKPT / f"{name}.json"
        cfg = json.loads(path.read_text()) if path.exists() else {}
        if cfg.get("metrics"):
            rows.append(_row(name, cfg))
    table = "\n".join([
        "Measured with `python experiments/reference_metrics.py` (the exact command is in each JSON's metrics) on "
        "the CIFAR-10 test split of the JPEG copy (`../shared/data`): clean on all 10,000 images; PGD-20 (step "
        "2/255, random start) and APGD-CE (100 steps) at Linf ε = 8/255 on N images (fixed random subset, seed 0). "
        "Chosen epoch: highest PGD-10 accuracy on 1,000 held-out TRAINING images "
        "(`experiments/reselect_best_epoch.py`, recorded in each JSON's `selection`).",
        "",
        "| checkpoint | width | training | epochs | clean % | PGD-20 % | APGD-CE % | N | training command |",
        "|---|---:|---|---|---:|---:|---:|---:|---|", *rows])
    for doc in (CKPT / "README.md", ROOT / "docs" / "checkpoints.md"):
        head = doc.read_text().split("<!-- metrics -->")[0] if doc.exists() else "# Reference checkpoints\n\n"
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(head + "<!-- metrics -->\n" + table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
