"""The paper's ablations (appendix A.1-A.10) on the reference checkpoints, with the honest columns added.

One command per ablation, e.g.::

    python experiments/ablations.py a7 --n 200
    python experiments/ablations.py all --n 200 --steps 20

Each writes experiments/results/<name>/{table.md, results.json, plot.png} with the command that made it
and the scale (model width, number of test images, attack budget). Every table has the paper's metric
AND a BPDA / worst-case column: the paper's numbers come from gradient attacks that MeanSparse masks.
Calibration (full training split minus the held-out part) is computed once per checkpoint and cached as
a MeanSparse state file under experiments/results/cache/.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

import meansparse as ms
from meansparse._utils import resolve_device
from meansparse.data import Batches, holdout_split, load_dataset
from meansparse.evaluation import AdaptivePGD

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation_plots import plot_result  # noqa: E402

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
#: the experiments' resumable evaluation state (per attack × batch).  MEANSPARSE_EXPERIMENT_STATE moves it, e.g. into
#: a tracked folder, so that a round of many core-hours keeps its finished batches across a lost checkout
STATE = Path(os.environ.get("MEANSPARSE_EXPERIMENT_STATE", RESULTS / "cache" / "state"))
CKPT = ROOT.parent / "checkpoints"
MODELS = {
    "gelu-pgd": "cifar10-resnet18-gelu-pgd",
    "relu-pgd": "cifar10-resnet18-relu-pgd",
    "gelu-trades": "cifar10-resnet18-gelu-trades",
    "gelu-standard": "cifar10-resnet18-gelu-standard",
}
ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4)


def attack_options(steps: int, queries: int) -> dict[str, dict[str, int]]:
    """The tables' budget: every APGD (wrapped ones read their inner attack's entry) and transfer at ``steps``,
    PGD at 50 (A.4 / A.10), Square at ``queries``."""
    apgd = {k: {"steps": steps} for k in ("apgd-ce", "apgd-t", "apgd-dlr", "apgd-margin", "apgd-mt", "transfer")}
    return {**apgd, "pgd": {"steps": 50}, "square": {"queries": queries}}


def test_images(n: int) -> Any:
    """The first ``n`` of a seed-0 random draw of CIFAR-10 test images, in index order: the images of every
    experiment's test numbers (a prefix of a larger draw, so 200 of them are among 1,000)."""
    test = load_dataset("cifar10-jpg", "test")
    return test.subset(torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:n].sort().values)


class Ctx:
    """Shared state of one invocation: data, scale, attack budget, output folder."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.eps = 8 / 255
        self.n = args.n
        self.batch = args.batch_size
        self.device = torch.device(args.device)
        self.honest = list(ATTACK_SETS[args.attack_set])
        self.set_tag = "" if args.attack_set == "v1" else f"-{args.attack_set}"  # v1's state names as before
        self.extra = [a for a in self.honest if a not in ATTACK_SETS["v1"]]  # added to a3 / a10's own sets too
        self.opts = attack_options(args.steps, args.queries)
        train = load_dataset("cifar10-jpg", "train")
        self.fit, self.hold = holdout_split(train, 1000, seed=0)
        self.test = test_images(self.n)
        self.x, self.y = self.test.float(), self.test.labels

    def base(self, key: str) -> torch.nn.Module:
        return ms.models.load(CKPT / MODELS[key]).to(self.device)

    def prepared(self, key: str, **prepare_kw: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(base, calibrated MeanSparse copy); statistics cached per (checkpoint, prepare arguments)."""
        base = self.base(key)
        example = (self.x[:2].to(self.device),)
        model = ms.prepare(copy.deepcopy(base), example_inputs=example, **prepare_kw)
        tag = "-".join(f"{k}={v}" for k, v in sorted(prepare_kw.items())) or "default"
        cache = RESULTS / "cache" / f"{MODELS[key]}-{tag}.safetensors"
        if cache.exists():
            model = ms.load(copy.deepcopy(base), cache, example_inputs=example).to(self.device)
        else:
            ms.calibrate(model, Batches(self.fit, 500), progress=self.args.progress)
            cache.parent.mkdir(parents=True, exist_ok=True)
            ms.save(model, cache)
        return base, model.eval()

    def evaluate(self, model, attacks, base=None, norm="Linf", eps=None, tag="", individual=True,
                 options=None) -> ms.Report:
        state = STATE / self.device.type / f"{tag}.json" if tag else None
        if state:
            state.parent.mkdir(parents=True, exist_ok=True)
        # one rung, no indicators: the tables name their attack sets (as they were run before the budget ladder)
        return ms.evaluate(model, self.x, self.y, norm=norm, eps=eps or self.eps, attacks=attacks,
                           base_model=base, batch_size=self.batch, seed=0, individual=individual,
                           attack_options=options or self.opts, progress=self.args.progress, state_path=state,
                           ladder=False, indicators=False)

    def scale(self) -> str:
        return (f"ResNet-18 width 16 (CIFAR-10 JPEG copy), {self.n} random test images (seed 0), "
                f"run on {self.device.type}, "
                f"APGD {self.args.steps} steps, Square {self.args.queries} queries, PGD-50 where named, "
                f"Linf ε = 8/255 unless stated; honest set {self.args.attack_set} ({', '.join(self.honest)}); "
                f"α chosen on nothing here (tables show every α)")


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def write(name: str, ctx: Ctx, title: str, header: list[str], rows: list[list[Any]], data: Any,
          note: str = "") -> None:
    out = Path(ctx.args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python experiments/ablations.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    md = [f"# {title}", "", f"Command: `{cmd}`", "", f"Scale: {ctx.scale()}.", ""]
    if note:
        md += [note, ""]
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    record = {"command": cmd, "scale": ctx.scale(), "title": title, "data": data}
    (out / "results.json").write_text(json.dumps(record, indent=2, default=float) + "\n")
    if plot_result(out / "plot.png", json.loads((out / "results.json").read_text())["data"], title):
        md += ["", "![plot](plot.png)"]
    (out / "table.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


#: the honest columns of every table.  "v1": the set of the tables made before issue #25 (their commands carry
#: no --attack-set; they ran v1); "aware" adds the two MeanSparse-aware attacks of the default worst case
#: (surrogate-gradient APGD with the untargeted and the targeted margin loss), which break images v1 counts as
#: robust (docs/results.md, "The strongest known attack changes the verdict")
ATTACK_SETS = {"v1": ("apgd-ce", "bpda-apgd-ce", "transfer"),
               "aware": ("apgd-ce", "bpda-apgd-ce", "transfer", "sg-apgd-margin", "sg-apgd-mt")}


def alpha_table(ctx: Ctx, key: str, attacks=None, norm="Linf", eps=None, alphas=ALPHAS, **prepare_kw):
    """Rows (α, clean, each attack, worst case) for one checkpoint: the building block of most ablations."""
    attacks = list(attacks or ctx.honest)
    centering = prepare_kw.pop("centering", "channel")
    base, model = ctx.prepared(key, **prepare_kw)
    for op in ms.operators(model):
        op.centering = centering  # centre/threshold derive from the per-channel statistics at forward time
    prepare_kw["centering"] = centering
    rows, data = [], []
    for a in alphas:
        ms.set_alpha(model, a)
        tag = f"{key}-{norm}-{eps or ctx.eps:.5f}-{a:g}-" + "-".join(attacks) + "-" + "-".join(
            f"{k}={v}" for k, v in sorted(prepare_kw.items())) + f"-n{ctx.n}-s{ctx.args.steps}"
        # every α, 0 included, gets the same attacks: at α = 0 BPDA is the plain attack and transfer is
        # APGD-CE + APGD-T on the base itself, so the base's worst case has the same attack power as the rest
        r = ctx.evaluate(model, attacks, base=base, norm=norm, eps=eps, tag=tag)
        rec = {"alpha": a, "clean": r.clean_accuracy, "worst_case": r.worst_case_accuracy,
               **{k: r.robust_accuracy.get(k) for k in attacks}, "warnings": r.warnings}
        data.append(rec)
        rows.append([f"{a:g}", _pct(rec["clean"])] + [_pct(rec[k]) for k in attacks]
                    + [f"**{_pct(rec['worst_case'])}**"])
    return rows, data, ["α", "clean %"] + [f"{k} %" for k in attacks] + ["**worst case %**"]


# ------------------------------------------------------------------------------------------ ablations
def _compare(ctx: Ctx, name: str, title: str, label: str, variants: dict[str, dict[str, Any]]) -> None:
    """One α table per variant (checkpoint key and alpha_table arguments), stacked in one result."""
    rows, data, header = [], {}, []
    for tag, kw in variants.items():
        r, d, header = alpha_table(ctx, **kw)
        rows += [[tag] + x for x in r]
        data[tag] = d
    write(name, ctx, title, [label] + header, rows, data)


def a1(ctx: Ctx) -> None:
    """A.1 activation functions × α (GELU vs ReLU, same PGD-AT recipe)."""
    _compare(ctx, "a1-activations", "A.1 Activation function × α", "model",
             {k: {"key": k} for k in ("gelu-pgd", "relu-pgd")})


def a2(ctx: Ctx) -> None:
    """A.2 Linf vs L2 threat model on the Linf-trained GELU model."""
    _compare(ctx, "a2-linf-vs-l2", "A.2 Linf vs L2", "threat",
             {f"{n} ε={e:.3g}": {"key": "gelu-pgd", "norm": n, "eps": e} for n, e in (("Linf", 8 / 255), ("L2", 0.5))})


def _single(ctx: Ctx, name: str, title: str, key: str, attacks: list[str] | None = None) -> None:
    """One checkpoint's α table, written with its plot."""
    rows, data, header = alpha_table(ctx, key, attacks=attacks)
    write(name, ctx, title, header, rows, data)


def a3(ctx: Ctx) -> None:
    """A.3 black-box Square attack vs α."""
    _single(ctx, "a3-square", "A.3 Square (black-box) vs α", "gelu-pgd",
            ["apgd-ce", "bpda-apgd-ce", "square", *ctx.extra])


def a4(ctx: Ctx) -> None:
    """A.4 the paper's adaptive attack with two λ values vs PGD-50 (same steps and step size)."""
    base, model = ctx.prepared("gelu-pgd")
    rows, data = [], []
    lams = ctx.args.lams
    for a in (0.0, 0.1, 0.2, 0.3):
        ms.set_alpha(model, a)
        attacks = ["pgd", *[AdaptivePGD(norm="Linf", eps=ctx.eps, lam=lam, steps=50, name=f"adaptive-lam{lam:g}")
                            for lam in lams], "bpda-pgd"]
        r = ctx.evaluate(model, attacks, base=base, tag=f"a4-{a:g}-n{ctx.n}-lam" + "_".join(f"{lam:g}" for lam in lams))
        rec = {"alpha": a, "clean": r.clean_accuracy, "worst_case": r.worst_case_accuracy, **r.robust_accuracy}
        data.append(rec)
        rows.append([f"{a:g}", _pct(r.clean_accuracy)] + [_pct(v) for v in r.robust_accuracy.values()]
                    + [f"**{_pct(r.worst_case_accuracy)}**"])
    header = ["α", "clean %", "PGD-50 %"] + [f"adaptive λ={lam:g} %" for lam in lams] + ["BPDA-PGD-50 %",
                                                                                         "**worst case %**"]
    write("a4-adaptive", ctx, "A.4 Adaptive attack vs PGD-50", header, rows, data,
          note="Adaptive loss as specified: CE − λ·Σ_k‖M_k⊙(z_k(x+δ)−z_k(x))‖², M_k = positions the operator "
               "blocks on the clean input; λ > 0 keeps blocked features in place, λ < 0 pushes them out.")


def a5(ctx: Ctx) -> None:
    """A.5 PGD-AT vs TRADES."""
    _compare(ctx, "a5-pgd-vs-trades", "A.5 PGD-AT vs TRADES", "model",
             {k: {"key": k} for k in ("gelu-pgd", "gelu-trades")})


def a6(ctx: Ctx) -> None:
    """A.6 a standard (non-robust) model: MeanSparse does not create robustness from nothing."""
    _single(ctx, "a6-standard", "A.6 Standard training", "gelu-standard")


def a7(ctx: Ctx) -> None:
    """A.7 centering reference: channel mean / zero / global mean (one calibration: all three derive from the
    same per-channel statistics)."""
    _compare(ctx, "a7-centering", "A.7 Centering reference", "centering",
             {c: {"key": "gelu-pgd", "centering": c} for c in ("channel", "zero", "global")})


def a8(ctx: Ctx) -> None:
    """A.8 attack power: ε sweep at a fixed α."""
    base, model = ctx.prepared("gelu-pgd")
    rows, data = [], []
    for eps in (2 / 255, 4 / 255, 8 / 255, 12 / 255, 16 / 255):
        recs = {}
        for a in (0.0, 0.2):
            ms.set_alpha(model, a)
            r = ctx.evaluate(model, ctx.honest, base=base, eps=eps,
                             tag=f"a8-{eps:.5f}-{a:g}-n{ctx.n}-s{ctx.args.steps}{ctx.set_tag}")
            recs[a] = r
        rows.append([f"{eps * 255:.0f}/255", _pct(recs[0.0].robust_accuracy["apgd-ce"]),
                     f"**{_pct(recs[0.0].worst_case_accuracy)}**",
                     _pct(recs[0.2].robust_accuracy["apgd-ce"]), _pct(recs[0.2].robust_accuracy["bpda-apgd-ce"]),
                     _pct(recs[0.2].robust_accuracy["transfer"]), f"**{_pct(recs[0.2].worst_case_accuracy)}**"])
        data.append({"eps": eps, "base": recs[0.0].robust_accuracy, "base_worst_case": recs[0.0].worst_case_accuracy,
                     "alpha0.2": recs[0.2].robust_accuracy, "worst_case": recs[0.2].worst_case_accuracy})
    write("a8-attack-power", ctx, "A.8 Attack power (ε sweep), α = 0.2",
          ["ε", "base APGD-CE %", "**base worst case %**", "MeanSparse APGD-CE %", "MeanSparse BPDA %",
           "MeanSparse transfer %", "**MeanSparse worst case %**"],
          rows, data, note="Worst case = minimum per image over APGD-CE, BPDA-APGD-CE and transfer (for the base "
                           "model: APGD-CE and APGD-T on itself).")


def a9(ctx: Ctx) -> None:
    """A.9 single-site and cumulative application by index; main path vs after residual add."""
    base, model = ctx.prepared("gelu-pgd")
    sites = ms.sites(model)
    alpha = ctx.args.alpha
    rows, data = [], []
    settings = [("none (base model)", 0.0), ("all sites", {s.index: alpha for s in sites})]
    settings += [("main path only", {s.index: alpha * (not s.after_residual_add) for s in sites}),
                 ("after residual add only", {s.index: alpha * s.after_residual_add for s in sites})]
    step = max(1, len(sites) // 4)
    for k in range(0, len(sites), step):
        settings.append((f"single site {k} ({sites[k].name})", {s.index: alpha * (s.index == k) for s in sites}))
    for k in range(step, len(sites) + 1, step):
        settings.append((f"cumulative sites 0..{k - 1}", {s.index: alpha * (s.index < k) for s in sites}))
    for label, spec in settings:
        ms.set_alpha(model, spec)
        tag = f"a9-{label.split(' (')[0].replace(' ', '_')}-{alpha:g}-n{ctx.n}-s{ctx.args.steps}{ctx.set_tag}"
        r = ctx.evaluate(model, ctx.honest, base=base, tag=tag)
        rows.append([label, _pct(r.clean_accuracy)] + [_pct(r.robust_accuracy[k]) for k in ctx.honest]
                    + [f"**{_pct(r.worst_case_accuracy)}**"])
        data.append({"setting": label, "clean": r.clean_accuracy, **r.robust_accuracy,
                     "worst_case": r.worst_case_accuracy})
    write("a9-sites", ctx, f"A.9 Which sites (α = {alpha:g})", ["sites", "clean %"] + [f"{k} %" for k in ctx.honest]
          + ["**worst case %**"], rows, data, note=f"{len(sites)} sites; after-residual-add sites: "
          + ", ".join(str(s.index) for s in sites if s.after_residual_add))


def a10(ctx: Ctx) -> None:
    """A.10 PGD-50 as the paper's metric, next to BPDA-PGD-50 and the worst case."""
    _single(ctx, "a10-pgd50", "A.10 PGD-50", "gelu-pgd", ["pgd", "bpda-pgd", "transfer", *ctx.extra])


def per_layer(ctx: Ctx) -> None:
    """Per-layer α (depth schedule α_k = a·r^k) vs the best global α, chosen on held-out, checked on test."""
    base, model = ctx.prepared("gelu-pgd")
    hold = ctx.hold.head(ctx.n)
    kw = dict(n_robust=ctx.n, attacks=("apgd-ce", "bpda-apgd-ce", *ctx.extra[:1]), attack_options=ctx.opts,
              batch_size=ctx.batch, progress=ctx.args.progress, clean_budget=0.01)
    glob = ms.search_alpha(model, hold.float(), hold.labels, (0.0, 0.1, 0.2, 0.3), **kw)
    sched = ms.search_schedule(model, hold.float(), hold.labels, (0.1, 0.2, 0.3), ratios=(0.7, 1.0, 1.4), **kw)
    rows, data = [], {"global": json.loads(glob.to_json()), "schedule": json.loads(sched.to_json())}
    ms.set_alpha(model, 0.0)
    r = ctx.evaluate(model, ctx.honest, base=base, tag=f"perlayer-base-n{ctx.n}-s{ctx.args.steps}{ctx.set_tag}")
    rows.append(["base model (α = 0)", "0", _pct(glob.rows[0]["clean"]), _pct(glob.rows[0]["worst_case"]),
                 _pct(r.clean_accuracy), f"**{_pct(r.worst_case_accuracy)}**"])
    data["base"] = {"test": r.robust_accuracy, "test_worst": r.worst_case_accuracy, "test_clean": r.clean_accuracy}
    for label, result in (("global α", glob), ("schedule a·r^k", sched)):
        ms.set_alpha(model, result.chosen_alpha)
        digest = hashlib.sha1(json.dumps(result.chosen, default=float, sort_keys=True).encode()).hexdigest()[:10]
        r = ctx.evaluate(model, ctx.honest, base=base,
                         tag=f"perlayer-{label[:6]}-n{ctx.n}-s{ctx.args.steps}-{digest}{ctx.set_tag}")
        rows.append([label, str(result.chosen["alpha"]), _pct(result.chosen["clean"]),
                     _pct(result.chosen["worst_case"]), _pct(r.clean_accuracy), f"**{_pct(r.worst_case_accuracy)}**"])
        data[label] = {"test": r.robust_accuracy, "test_worst": r.worst_case_accuracy, "test_clean": r.clean_accuracy}
    write("per-layer-alpha", ctx, "Per-layer α (depth schedule) vs global α", ["setting", "chosen",
          "held-out clean %", "held-out worst %", "test clean %", "**test worst case %**"], rows, data,
          note=f"Objective: worst case of {', '.join(kw['attacks'])} on held-out training images within a 1-point "
               f"clean budget; the test columns use {', '.join(ctx.honest)}.")


STRONG = ["apgd-ce", "apgd-t", "bpda-apgd-ce", "bpda-apgd-t", "transfer", "square"]


def strong(ctx: Ctx) -> None:
    """Does the best honest gain survive a stronger attack set? One checkpoint at α = 0 and --alpha, on the same
    images, under the 20-step set of the tables above (--attack-set) and under a cascade of APGD-CE, APGD-T, their
    BPDA versions, transfer and Square (--steps / --queries), with the paired 95 % interval of the change."""
    from paired_ci import paired

    key, alpha = ctx.args.strong_model, ctx.args.alpha
    base, model = ctx.prepared(key)
    rows, data = [], {}
    weak_opts = {**ctx.opts, **{k: {**v, "steps": 20} for k, v in ctx.opts.items() if "steps" in v}}
    for label, attacks, individual, opts in (
            (f"20-step set ({', '.join(ctx.honest)})", ctx.honest, True, weak_opts),
            ("strong cascade (" + ", ".join(STRONG) + ")", STRONG, False, ctx.opts)):
        reports = {}
        for a in (0.0, alpha):
            ms.set_alpha(model, a)
            tag = f"strong-{key}-{a:g}-{'-'.join(attacks)}-n{ctx.n}-s{ctx.args.steps}-q{ctx.args.queries}"
            reports[a] = ctx.evaluate(model, attacks, base=base, tag=tag, individual=individual, options=opts)
        r0, r1 = reports[0.0], reports[alpha]
        d = paired([int(v) for v in r1.worst_case_robust], [int(v) for v in r0.worst_case_robust])
        rows.append([label, _pct(r0.clean_accuracy), f"**{_pct(r0.worst_case_accuracy)}**",
                     _pct(r1.clean_accuracy), f"**{_pct(r1.worst_case_accuracy)}**",
                     f"{100 * d['delta']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]",
                     f"{d['plus']} / {d['minus']}"])
        data[label] = {"alpha0": {"clean": r0.clean_accuracy, "worst_case": r0.worst_case_accuracy,
                                  "robust": r0.robust_accuracy},
                       f"alpha{alpha:g}": {"clean": r1.clean_accuracy, "worst_case": r1.worst_case_accuracy,
                                           "robust": r1.robust_accuracy}, "paired": d}
    write("strong-attack", ctx, f"Stronger attacks on the best honest gain ({key}, α = {alpha:g})",
          ["attack set", "α = 0 clean %", "**α = 0 worst %**", f"α = {alpha:g} clean %", f"**α = {alpha:g} worst %**",
           "Δ worst [95 % CI]", "images gained / lost"], rows, data,
          note=f"Same {ctx.n} images for both sets. The strong set runs as a cascade (each attack sees the images "
               f"still robust); APGD/APGD-T/transfer at {ctx.args.steps} steps, APGD-T over 9 target classes, "
               f"Square at {ctx.args.queries} queries.")


ABLATIONS = {"a1": a1, "a2": a2, "a3": a3, "a4": a4, "a5": a5, "a6": a6, "a7": a7, "a8": a8, "a9": a9,
             "a10": a10, "per-layer": per_layer, "strong": strong}


def replot() -> int:
    """Redraw every result's plot from its saved data (no model, no data set, no attack)."""
    for path in sorted(RESULTS.glob("*/results.json")):
        rec = json.loads(path.read_text())
        table = path.parent / "table.md"
        md = table.read_text() if table.exists() else ""
        title = rec.get("title") or (md.splitlines()[0].lstrip("# ") if md else path.parent.name)
        drawn = plot_result(path.parent / "plot.png", rec["data"], title)
        if drawn and md and "![plot](plot.png)" not in md:
            table.write_text(md.rstrip("\n") + "\n\n![plot](plot.png)\n")
        print(f"{path.parent.name}: {'plot.png' if drawn else 'no plot for this shape'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help=f"{', '.join(ABLATIONS)} or all")
    p.add_argument("--replot", action="store_true", help="only redraw every plot.png from its results.json")
    p.add_argument("--n", type=int, default=200, help="test images")
    p.add_argument("--out", default=str(RESULTS), help="folder of the result folders (default: the committed ones)")
    p.add_argument("--steps", type=int, default=20, help="APGD iterations")
    p.add_argument("--queries", type=int, default=1000, help="Square queries")
    p.add_argument("--attack-set", choices=sorted(ATTACK_SETS), default="aware",
                   help="the honest columns: 'aware' (default) adds the MeanSparse-aware sg-apgd-margin and "
                        "sg-apgd-mt to 'v1' (apgd-ce, bpda-apgd-ce, transfer: the set of the tables made before "
                        "issue #25)")
    p.add_argument("--alpha", type=float, default=0.2, help="α for A.9")
    p.add_argument("--strong-model", default="relu-pgd", choices=sorted(MODELS), help="checkpoint of 'strong'")
    p.add_argument("--lams", type=float, nargs="+", default=[1.0, 0.01, 1e-4, -1e-4, -0.01, -1.0],
                   help="λ values of the adaptive attack in A.4 (the penalty sums over every blocked position, "
                        "so its scale relative to CE depends on the model)")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu or cuda (numbers agree up to floating-point order)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)  # a valid torch device that is available
    except ValueError as e:
        p.error(str(e))
    if device.type == "cuda":
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    if args.replot:
        return replot()
    if not args.names:
        p.error("name at least one ablation (or all), or pass --replot")
    names = list(ABLATIONS) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        p.error(f"unknown ablation(s) {unknown}: choose from {', '.join(ABLATIONS)}")
    ctx = Ctx(args)
    for name in names:
        t0 = time.time()
        ABLATIONS[name](ctx)
        print(f"[{name}] {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
