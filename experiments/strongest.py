"""The strongest known attack in the worst case (issue #25): the old default, the new default and the union of
every attack this tool has at a large budget, on the reference checkpoints, on the same test images.

    python experiments/strongest.py --models relu-pgd --alphas 0.35,0.2,0 --n 200 --threads 2

Per (checkpoint, α):
  A  ``ms.evaluate`` with its defaults: the default attack list, the budget ladder, the indicators;
  B  the attacks of the old default (before this change: aa, bpda-apgd-ce, bpda-apgd-t, transfer, square)
     that A does not run, every one on every clean-correct image (individual mode, one rung);
  C  large-budget extras (EXTRAS) on the images that A's first rung and B both leave robust.
Old default = the old default's attacks that A runs (transfer) ∧ B (aa too since it left the default);
union = A ∧ B ∧ C (per image: robust only if nothing broke it).
C attacks what A's first rung and B leave robust (a superset of what the whole of A leaves), so ``--part B`` and
``--part C`` can run in other processes while A climbs its ladder (``--part A`` runs the new default alone, for a
first answer; ``--part A --climb 2,4,8`` climbs one rung more where the default ladder did not converge). Every run
is resumable (state files under results/cache/state/strongest/, or $MEANSPARSE_EXPERIMENT_STATE/strongest); the
per-image verdicts go to experiments/results/strongest/results-*.json and the table to table.md. ``--report`` only
rebuilds the table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

import meansparse as ms
from meansparse._utils import resolve_device
from meansparse.cli.evaluate import ladder_factors
from meansparse.plots import binomial_se, pyplot, save_figure

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablations import MODELS, RESULTS, Ctx  # noqa: E402
from ablations import STATE as STATE_ROOT  # noqa: E402
from paired_ci import paired  # noqa: E402

OUT = RESULTS / "strongest"
STATE = STATE_ROOT / "strongest"
#: the default batch size: part of every state file's configuration (another size starts the setting anew)
BATCH = 250
#: the default attack list before issue #25
OLD_DEFAULT = ("aa", "bpda-apgd-ce", "bpda-apgd-t", "transfer", "square")
#: the large-budget extras of the union (name, options); each runs individually on what A and B leave robust
EXTRAS: dict[str, tuple[str, dict[str, Any]]] = {
    "sg-apgd-mt-300": ("sg-apgd-mt", {"steps": 300, "sharpness": [16]}),
    "sg-apgd-margin-300": ("sg-apgd-margin", {"steps": 300, "sharpness": [2, 16], "restarts": 2}),
    "bpda-apgd-t-300": ("bpda-apgd-t", {"steps": 300}),
    "ens-apgd-margin-300": ("ens-apgd-margin", {"steps": 300, "sharpness": [8]}),
    "smooth-apgd-margin-300": ("smooth-apgd-margin", {"steps": 300, "sharpness": [8]}),
    "square-warm-5000": ("square-warm", {"queries": 5000, "start": "sg-apgd-margin",
                                         "start_options": {"steps": 300, "sharpness": [8]}}),
}


def _attack(label: str, base: torch.nn.Module) -> ms.evaluation.Attack:
    name, opts = EXTRAS[label]
    a = ms.evaluation.build_attack(name, eps=8 / 255, base_model=base, **json.loads(json.dumps(opts)))
    a.name = label
    return a


def _robust_vector(report: ms.Report, names: list[str] | None = None) -> list[bool]:
    """Per image: clean-correct and broken by none of ``names`` (all of the report's attacks when None)."""
    names = report.attacks if names is None else names
    return [bool(c) and all(report.robust_masks[a][i] != 0 for a in names)
            for i, c in enumerate(report.clean_correct)]


def _state_verdicts(path: Path, n: int, unattacked: Collection[int] = (), *,
                    unreached_robust: bool = False) -> dict[str, list[bool]]:
    """Per attack stored in an evaluation state file: per image, attacked and not broken.  An image the attack
    has not reached counts as robust to it if it is in ``unattacked`` (or, with ``unreached_robust``, among the
    file's clean-correct images: no evidence of a break from an unfinished attack in a partial summary), else as
    broken (clean errors, images earlier attacks broke)."""
    batches = json.loads(path.read_text()).get("batches", {})
    keep = _clean_correct(batches) if unreached_robust else set(unattacked)
    out = {}
    for name, per in batches.items():
        robust = [i in keep for i in range(n)]
        for rec in per.values():
            for i, r in zip(rec["indices"], rec["robust"], strict=True):
                robust[i] = bool(r)
        out[name] = robust
    return out


def partial(key: str, alpha: float, n: int) -> tuple[str, dict[str, list[bool]], dict[str, list[str]]]:
    """What the state files of an unfinished (checkpoint, α, n) already say, with the attack probe's verdicts
    on the same images (experiments/results/attack-probe): per attack set, robust % and paired differences
    (the text), the per-image verdicts of every stored attack and the attack sets."""
    tag = f"{key}-{alpha:g}-n{n}"
    found: dict[str, list[bool]] = {}
    for part in "AB":  # C covers a subset of the images: _extras_verdicts maps it back
        path = STATE / f"{tag}-{part}.json"
        if path.exists():  # an attack still running: the clean-correct images it has not reached count as robust
            found.update(_state_verdicts(path, n, unreached_robust=True))
    found.update(_extras_verdicts(tag, n))
    probes = (RESULTS / "attack-probe").glob(f"{key}-{alpha:g}*.json")  # relu-pgd-0.35.json, ...-sharpness.json
    for path in sorted(p for p in probes if p.stem.removeprefix(f"{key}-{alpha:g}") in ("", "-sharpness")):
        # the probe's verdicts are per image of its own draw: the same images only for the same n
        found.update({f"probe:{k}": v for k, v in json.loads(path.read_text()).items() if len(v) == n})
    sets = {"new default, rung 1": [a for a in ms.evaluation.DEFAULT_ATTACKS if a in found],
            "new default with its ladder so far": [a for a in found
                                                   if a.partition("@")[0] in ms.evaluation.DEFAULT_ATTACKS],
            "old default (stored part)": [a for a in OLD_DEFAULT if a in found or f"probe:{a}" in found],
            "union of everything stored": list(found)}
    sets["old default (stored part)"] = [a if a in found else f"probe:{a}" for a in sets["old default (stored part)"]]
    vec = {k: [all(found[a][i] for a in names) for i in range(n)] for k, names in sets.items()}
    lines = [f"# Partial: {key}, α = {alpha:g}, {n} images (what is stored so far)", "",
             "| attack set | attacks | robust % |", "|---|---|---:|"]
    lines += [f"| {k} | {', '.join(sets[k])} | {_pct(sum(v) / n)} |" for k, v in vec.items()]
    new, ladder, old, union = vec.values()
    gained, lost = sum(o and not w for o, w in zip(old, new)), sum(w and not o for o, w in zip(old, new))
    lines += ["", f"- new default − union: rung 1 {_ci(new, union)}, with its ladder so far {_ci(ladder, union)}; "
                  f"old − new (rung 1): {_ci(old, new)}",
              f"- images the new default breaks that the stored old attacks leave robust: {gained}; reverse: {lost}"]
    return "\n".join(lines) + "\n", found, sets


def against_base(key: str, n: int, runs: dict[float, tuple[dict[str, list[bool]], dict[str, list[str]]]]) -> str:
    """MeanSparse (α > 0) against its base model (α = 0) under the same stored attack set, paired per image."""
    if 0.0 not in runs:
        return ""
    base_found = runs[0.0][0]
    lines = [f"# Partial: {key}, MeanSparse against its base model (α = 0), {n} images", "",
             "Each row: robust % at α, at α = 0, and the paired difference (95 % interval), under the attacks of "
             "the set that both runs have stored so far.", "",
             "| α | attack set | attacks (both runs) | α % | α = 0 % | α − base |", "|---:|---|---|---:|---:|---:|"]
    for alpha, (found, sets) in sorted(runs.items()):
        if alpha == 0:
            continue
        for name, attacks in sets.items():
            both = [a for a in attacks if a in base_found]
            if not both:
                continue
            v, b = ([all(f[a][i] for a in both) for i in range(n)] for f in (found, base_found))
            lines.append(f"| {alpha:g} | {name} | {', '.join(both)} | {_pct(sum(v) / n)} | {_pct(sum(b) / n)} | "
                         f"{_ci(v, b)} |")
    return "\n".join(lines) + "\n"


def _extras_verdicts(tag: str, n: int) -> dict[str, list[bool]]:
    """Per large-budget extra stored in C's state file, per image of all n: robust to it (True where C did not
    attack: those images are already broken by A's first rung or B, as ``run_one`` picks C's images)."""
    a_state, b_state, c_state = (STATE / f"{tag}-{part}.json" for part in "ABC")
    first = _rung1_robust(a_state, ms.evaluation.DEFAULT_ATTACKS, n)
    if first is None or not c_state.exists():
        return {}
    b_found = _state_verdicts(b_state, n) if b_state.exists() else {}
    idx = _c_images(first, [all(v[i] for v in b_found.values()) for i in range(n)])
    out = {}
    # an extra still running: the images it has not reached are robust to it so far (a partial summary)
    for name, local in _state_verdicts(c_state, len(idx), range(len(idx))).items():
        robust = [True] * n
        for j, i in enumerate(idx):
            robust[i] = local[j]
        out[name] = robust
    return out


def _clean_correct(batches: dict[str, dict[str, Any]]) -> set[int]:
    """The clean-correct images of an individual-mode state file's batches: those its widest attack covered."""
    return max(({i for rec in per.values() for i in rec["indices"]} for per in batches.values()), key=len,
               default=set())


def _c_images(first: list[bool], b_robust: list[bool]) -> list[int]:
    """The images part C attacks: robust to A's first rung and to every attack of B."""
    return [i for i, (x, y) in enumerate(zip(first, b_robust, strict=True)) if x and y]


def _rung1_robust(state: Path, names: tuple[str, ...], n: int) -> list[bool] | None:
    """Per image, robust to every rung-1 attack of A as stored in A's state file (None until all are there):
    lets B and C run beside A's budget ladder."""
    found = _state_verdicts(state, n) if state.exists() else {}
    if any(name not in found for name in names):
        return None
    return [all(found[name][i] for name in names) for i in range(n)]


def context(n: int, batch_size: int = BATCH, device: str = "cpu", progress: bool = False) -> Ctx:
    """The images, calibration and attack options of every run of this script (and of arms_eval.py's start
    and post rows, which share its state files)."""
    return Ctx(argparse.Namespace(n=n, batch_size=batch_size, device=device, steps=100, queries=5000,
                                  progress=progress, attack_set="aware", out=str(RESULTS)))


def new_default(ctx: Ctx, key: str, alpha: float, progress: bool) -> ms.Report:
    """Part A: ``ms.evaluate``'s defaults (attack list, ladder, indicators) on the checkpoint at ``alpha``,
    resumable on its state file."""
    _, model, tag, common = _setting(ctx, key, alpha, progress)
    return _part_a(ctx, model, tag, common)


def _part_a(ctx: Ctx, model: torch.nn.Module, tag: str, common: dict[str, Any], **kw: Any) -> ms.Report:
    return ms.evaluate(model, ctx.x, ctx.y, state_path=STATE / f"{tag}-A.json", **common, **kw)


def _setting(ctx: Ctx, key: str, alpha: float, progress: bool
             ) -> tuple[torch.nn.Module, torch.nn.Module, str, dict[str, Any]]:
    """(base model, MeanSparse model at ``alpha``, state tag, the keywords every evaluation of it shares)."""
    base, model = ctx.prepared(key)
    ms.set_alpha(model, alpha)
    STATE.mkdir(parents=True, exist_ok=True)
    return base, model, f"{key}-{alpha:g}-n{ctx.n}", dict(base_model=base, batch_size=ctx.batch, seed=0,
                                                         progress=progress)


def run_one(ctx: Ctx, key: str, alpha: float, progress: bool, part: str = "all") -> dict[str, Any] | None:
    """One (checkpoint, α). ``part`` "A" / "B" / "C" runs only that part (resumable; B and C can run beside a
    process running A's ladder: C attacks what A's first rung and B leave robust), "all" everything and returns
    the record."""
    base, model, tag, common = _setting(ctx, key, alpha, progress)
    missing = [n for n in OLD_DEFAULT if n not in ms.evaluation.DEFAULT_ATTACKS]
    b = ms.evaluate(model, ctx.x, ctx.y, attacks=missing, individual=True, ladder=False, indicators=False,
                    state_path=STATE / f"{tag}-B.json", **common) if missing and part in ("all", "B", "C") else None
    if part == "A":  # the new default alone (its ladder included): the number a MeanSparse-vs-base comparison needs
        _part_a(ctx, model, tag, common)
        return None
    if part == "B":
        return None
    first = _rung1_robust(STATE / f"{tag}-A.json", ms.evaluation.DEFAULT_ATTACKS, ctx.n)
    a = None
    if part == "all" or first is None:
        t0 = time.time()
        a = _part_a(ctx, model, tag, common)
        t_a = time.time() - t0
        first = _rung1_robust(STATE / f"{tag}-A.json", ms.evaluation.DEFAULT_ATTACKS, ctx.n)
    b_robust = _robust_vector(b) if b is not None else [True] * ctx.n
    idx = _c_images(first, b_robust)
    c = None
    if idx:
        c = ms.evaluate(model, ctx.x[idx], ctx.y[idx], attacks=[_attack(k, base) for k in EXTRAS], individual=True,
                        ladder=False, indicators=False, state_path=STATE / f"{tag}-C.json", **common)
    if a is None:  # part C
        return None
    old_names_a = [n for n in OLD_DEFAULT if n in a.attacks]
    old = [x and y for x, y in zip(_robust_vector(a, old_names_a), b_robust)]
    new = list(a.worst_case_robust)
    both = [x and y for x, y in zip(old, new)]
    union = list(both)
    broke_extra: dict[str, list[int]] = {}
    if c is not None:
        for j, i in enumerate(idx):
            hit = [k for k in EXTRAS if c.robust_masks[k][j] == 0]
            union[i] = both[i] and not hit
            for k in hit:
                broke_extra.setdefault(k, []).append(i)
    # which attack broke what: per attack of A and B, the images it broke that the old default did not
    old_broken = [c0 and not r for c0, r in zip(a.clean_correct, old)]
    broke = {}
    for rep in filter(None, (a, b)):
        for name in rep.attacks:
            broke[name] = [i for i, m in enumerate(rep.robust_masks[name]) if m == 0]
    return {
        "model": key, "alpha": alpha, "n": ctx.n, "clean": a.clean_accuracy,
        "old": old, "new": new, "union": union,
        "old_acc": sum(old) / ctx.n, "new_acc": sum(new) / ctx.n, "union_acc": sum(union) / ctx.n,
        "ladder": a.ladder, "converged": a.converged, "indicators": a.indicators,
        "broke": broke, "broke_extra": broke_extra,
        "beyond_old": {k: sum(1 for i in v if not old_broken[i]) for k, v in broke.items()},
        "seconds": {"A": t_a, "A_attacks": a.metadata["run"]["attack_seconds"],
                    "B_attacks": b.metadata["run"]["attack_seconds"] if b is not None else {}},
        "attacks_new": a.attacks,
    }


def climb(ctx: Ctx, key: str, alpha: float, factors: tuple[int, ...], out: Path, progress: bool) -> Path:
    """A's evaluation climbing every rung of ``factors``, on from A's state (the rungs in common are reused): where
    the default ladder did not converge, how far the worst case still falls; where one model's ladder stopped
    earlier than the other's, the same rungs for both.  The record keeps the default ladder's number; the rungs
    go to ladder-<tag>.md."""
    _, model, tag, common = _setting(ctx, key, alpha, progress)
    ladder = ms.evaluation.Ladder(factors=factors, min_rungs=len(factors))
    a = _part_a(ctx, model, tag, common, ladder=ladder, indicators=False)
    command = (f"python experiments/strongest.py --models {key} --alphas {alpha:g} --n {ctx.n} --batch-size "
               f"{ctx.batch} --part A --climb {','.join(map(str, factors))}")
    path = out / f"ladder-{tag}.md"
    path.write_text(_ladder_md(a, tag, command))
    return path


def _ladder_md(a: ms.Report, tag: str, command: str) -> str:
    """The rungs of a climbed ladder (``--part A --climb``)."""
    lines = [f"# {tag}: every rung of the ladder up to x{a.ladder[-1]['factor']}", "",
             f"Command: `{command}` (the default's rungs are reused from its state).", "",
             "| rung | budget | attacks | attacked | broken | worst case after % |", "|---:|---|---|---:|---:|---:|"]
    lines += [f"| {x['rung']} | x{x['factor']} | {', '.join(x['attacks'])} | {x['n_attacked']} | {x['n_broken']} | "
              f"{_pct(x['worst_case_after'])} |" for x in a.ladder]
    verdict = "converged" if a.converged else "not converged"
    return "\n".join(lines + ["", f"Worst case {_pct(a.worst_case_accuracy)} % ({verdict})."]) + "\n"


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _ci(x: list[bool], y: list[bool]) -> str:
    d = paired([int(v) for v in x], [int(v) for v in y])
    return f"{100 * d['delta']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


def _old_cost(r: dict[str, Any]) -> float:
    s = {**r["seconds"]["A_attacks"], **r["seconds"]["B_attacks"]}
    return sum(s.get(n, 0.0) for n in OLD_DEFAULT)


def table(results: list[dict[str, Any]], command: str) -> str:
    lines = ["# The strongest known attack in the worst case", "",
             f"Command: `{command}`", "",
             "Same images in every column (random test images, seed 0). Old default: aa, bpda-apgd-ce, "
             "bpda-apgd-t, transfer, square (individual). New default: `ms.evaluate`'s defaults (attack list, "
             "budget ladder). Union: both, plus the large-budget extras below on the images both leave robust. "
             "Δ columns are paired (95 % interval).", "",
             "| model | α | clean % | old default % | new default % | union % | new − union | old − union | "
             "ladder | attack time new / old |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in results:
        rungs = " → ".join(f"x{x['factor']}: −{x['n_broken']}" for x in r["ladder"][1:]) or "-"
        verdict = "converged" if r["converged"] else "not converged"
        ratio = sum(r["seconds"]["A_attacks"].values()) / max(_old_cost(r), 1e-9)
        lines.append(f"| {r['model']} | {r['alpha']:g} | {_pct(r['clean'])} | {_pct(r['old_acc'])} | "
                     f"**{_pct(r['new_acc'])}** | {_pct(r['union_acc'])} | {_ci(r['new'], r['union'])} | "
                     f"{_ci(r['old'], r['union'])} | {rungs} ({verdict}) | {ratio:.2f} |")
    lines += ["", "## MeanSparse against its own base model (same attack set on both, paired)", "",
              "| model | α | old default Δ | new default Δ | union Δ |", "|---|---:|---:|---:|---:|"]
    base = {(r["model"]): r for r in results if r["alpha"] == 0}
    for r in results:
        if r["alpha"] == 0 or r["model"] not in base:
            continue
        b = base[r["model"]]
        lines.append(f"| {r['model']} | {r['alpha']:g} | {_ci(r['old'], b['old'])} | {_ci(r['new'], b['new'])} | "
                     f"{_ci(r['union'], b['union'])} |")
    lines += ["", "## Which attack broke what", "",
              "Images each attack broke that the whole old default left robust (first rung attacks of the new "
              "default and the old default's own), and images each large-budget extra broke that both defaults "
              "left robust.", ""]
    for r in results:
        beyond = ", ".join(f"{k} {v}" for k, v in sorted(r["beyond_old"].items(), key=lambda kv: -kv[1]) if v)
        extra = ", ".join(f"{k} {len(v)}" for k, v in sorted(r["broke_extra"].items(), key=lambda kv: -len(kv[1])))
        lines.append(f"- {r['model']} α = {r['alpha']:g}: beyond the old default: {beyond or 'none'}; "
                     f"extras beyond both: {extra or 'none'}")
    lines += ["", "## Large-budget extras", ""] + [f"- {k}: {n} {json.dumps(o)}" for k, (n, o) in EXTRAS.items()]
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> bool:
    """Robust accuracy against α per checkpoint for the three attack sets (±1 binomial standard error): the gap
    between the old default and the others is what the old set overstated.  False if nothing to draw."""
    models = sorted({r["model"] for r in results})
    if not models:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.8), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], models):
        rows = sorted((r for r in results if r["model"] == key), key=lambda r: r["alpha"])
        alphas = [r["alpha"] for r in rows]
        for col, style, label in (("old_acc", "s--", "old default (AA, BPDA, transfer, Square)"),
                                  ("new_acc", "^-", "new default (with its ladder)"),
                                  ("union_acc", "o:", "union of everything run")):
            acc = [100 * r[col] for r in rows]
            err = [100 * binomial_se(r[col], r["n"]) for r in rows]
            ax.errorbar(alphas, acc, yerr=err, fmt=style, capsize=3, label=label)
        ax.set(title=f"{key} ({rows[0]['n']} test images, Linf 8/255)", xlabel="α", xticks=alphas)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("robust accuracy %")
    axes[0][-1].legend(fontsize=8)
    save_figure(fig, path)
    return True


def _commands(results: list[dict[str, Any]], default: str) -> list[str]:
    """One command per set of runs that differ only in their α (resumed runs named one α each): where the files
    went (``--out``) changes no number, so the table shows the command anyone reruns for the same records."""
    alphas: dict[str, set[float]] = {}
    for r in results:
        rest = re.sub(r" --(out|alphas) \S+", "", r.get("command", default))
        alphas.setdefault(rest, set()).add(r["alpha"])
    return sorted(f"{rest} --alphas {','.join(f'{a:g}' for a in sorted(found, reverse=True))}"
                  for rest, found in alphas.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="relu-pgd", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--alphas", default="0.35,0.2,0")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=BATCH)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the same images and seeds; state files are "
                                                   "shared, so a run resumes on either)")
    p.add_argument("--out", default=str(OUT), help="folder of the tables and per-setting records (default: the "
                                                    "committed one)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--report", action="store_true", help="only rebuild table.md from results.json")
    p.add_argument("--partial", action="store_true",
                   help="only summarise what the state files of --models/--alphas/--n already hold (unfinished runs)")
    p.add_argument("--climb", type=ladder_factors, default=None, metavar="FACTORS",
                   help="with --part A: climb every rung of these factors (e.g. 2,4,8) on from A's state, converged or "
                        "not; the rungs go to ladder-<model>-<α>-n<N>.md, the record keeps the default ladder's number")
    p.add_argument("--part", choices=["all", "A", "B", "C"], default="all",
                   help="run only A (the new default), only B, or only C once A's first rung is in its state file "
                        "(beside a process running the rest); 'all' also writes the record")
    args = p.parse_args(argv)
    if args.climb and args.part != "A":
        p.error("--climb goes with --part A")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.partial:
        for key in args.models.split(","):
            runs = {}
            for alpha in (float(a) for a in args.alphas.split(",")):
                text, *runs[alpha] = partial(key, alpha, args.n)
                (out / f"partial-{key}-{alpha:g}-n{args.n}.md").write_text(text)
                print(text)
            if text := against_base(key, args.n, runs):
                (out / f"partial-{key}-vs-base-n{args.n}.md").write_text(text)
                print(text)
        return 0
    command = "python experiments/strongest.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if not args.report:
        if args.threads:
            torch.set_num_threads(args.threads)
        device = resolve_device(args.device)
        if device.type == "cuda":
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        ctx = context(args.n, args.batch_size, str(device), args.progress)
        for key in args.models.split(","):
            for alpha in (float(a) for a in args.alphas.split(",")):
                t0 = time.time()
                if args.climb:
                    print(climb(ctx, key, alpha, args.climb, out, args.progress).read_text(), flush=True)
                    continue
                r = run_one(ctx, key, alpha, args.progress, args.part)
                if r is None:
                    print(f"[{key} α={alpha:g}] part {args.part} done ({time.time() - t0:.0f} s)", flush=True)
                    continue
                r["command"] = command
                # one file per (checkpoint, α, n): several processes can run different settings at once
                (out / f"results-{key}-{alpha:g}-n{args.n}.json").write_text(json.dumps(r) + "\n")
                print(f"[{key} α={alpha:g}] old {_pct(r['old_acc'])} new {_pct(r['new_acc'])} union "
                      f"{_pct(r['union_acc'])} ({time.time() - t0:.0f} s)", flush=True)
    done = {}
    legacy = out / "results.json"  # written by the first version of this script: a list under "results"
    for r in json.loads(legacy.read_text())["results"] if legacy.exists() else []:
        done[(r["model"], r["alpha"], r["n"])] = r
    for path in sorted(out.glob("results-*.json")):
        r = json.loads(path.read_text())
        done[(r["model"], r["alpha"], r["n"])] = r
    results = sorted(done.values(), key=lambda r: (r["model"], r["n"], r["alpha"]))
    if not results:  # only parts ran so far: no record to tabulate (--partial summarises their state files)
        print("no finished (checkpoint, α) yet; `--partial` summarises what the state files hold")
        return 0
    md = table(results, "`, `".join(_commands(results, command)))
    if climbed := sorted(out.glob("ladder-*.md")):  # --part A --climb: every rung up to a larger budget
        md += "\n## Longer ladders (`--part A --climb`)\n\n" + "".join(
            f"- [{p.stem.removeprefix('ladder-')}]({p.name}): {p.read_text().strip().splitlines()[-1]}\n"
            for p in climbed)
    if plot(results, out / "plot.png"):
        md += ("\n![robust accuracy against α for the three attack sets](plot.png)\n\nBars: ±1 binomial standard "
               "error of each number alone; the paired differences above are much tighter (same images).\n")
    (out / "table.md").write_text(md)
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
