"""Overhead of ``meansparse.evaluate`` with AutoAttack vs calling ``pyautoattack.AutoAttack`` directly.

Both sides get the same model, images, labels and batch size.  The reference is one
``AutoAttack(...).run_standard_evaluation(x, y, batch_size=batch_size)`` call; ours is
``ms.evaluate(model, x, y, attacks=["aa"], batch_size=batch_size, ladder=False, indicators=False)``, which runs
the same AutoAttack per batch (per-batch seeds) and adds its clean pass, the judging forward, hashing and the
resume file.  The two run interleaved (ours, reference, ours, reference ...).

    python benchmarks/bench_evaluate.py --threads 1 --quick          # digits CNN, cheap AutoAttack settings
    python benchmarks/bench_evaluate.py --checkpoint runs/cifar10-resnet18-gelu-pgd/best --data cifar10-jpg \\
        --n 64 --batch-size 32                                        # standard AutoAttack (100 steps, 5000 q)
    python benchmarks/bench_evaluate.py --device cuda --checkpoint checkpoints/cifar10-resnet18-gelu-pgd \
        --n 1000 --batch-size 500 --attack apgd-ce                    # APGD-CE alone: images/s on a GPU

``--attack apgd-ce`` compares ``ms.evaluate(attacks=["apgd-ce"])`` with pyautoattack's ``APGDAttack.perturb``
called per batch.  ``--fused-vs-eager`` instead compares ``ms.evaluate`` on the MeanSparse model with the eager
operator against the same model after ``ms.fuse`` (what ``--path fused`` changes on the command line), and checks
that the two reports are identical.

    python benchmarks/bench_evaluate.py --threads 2 --checkpoint checkpoints/cifar10-resnet18-gelu-pgd \
        --attack apgd-ce --steps 50 --n 128 --batch-size 64 --fused-vs-eager

``--defaults`` compares the default worst case (``ms.evaluate``'s defaults: the default attack list, the budget
ladder and the attack-failure indicators) with the old default (aa, bpda-apgd-ce, bpda-apgd-t, transfer,
square; one rung, no indicators) on the same images, interleaved, and prints both worst cases and the cost ratio.

    python benchmarks/bench_evaluate.py --threads 2 --checkpoint checkpoints/cifar10-resnet18-relu-pgd \
        --alpha 0.35 --n 64 --batch-size 64 --repeats 1 --defaults

``--whole-compile MODE`` (with ``--fused-vs-eager``) adds a third variant: the eager-operator model wrapped in
``torch.compile(model, mode=MODE)`` (``reduce-overhead``: CUDA graphs on a GPU), whose report is compared too.
"""

from __future__ import annotations

import copy
import tempfile
import time

import torch
from _common import base_parser, describe, environment, fmt_table, interleaved, set_clock, setup, write_json

import meansparse as ms
from meansparse.data import Batches, load_dataset
from meansparse.evaluation.attacks import APGD, AutoAttackStandard


def digits_model(seed: int = 0) -> torch.nn.Module:
    """A small CNN trained on digits for a few epochs (seconds): most examples right, some robust."""
    from meansparse.models import create_model
    from meansparse.pgd import pgd

    torch.manual_seed(seed)
    net = create_model("small_cnn", width=8, normalization="digits")
    train = load_dataset("digits", "train")
    x, y = train.float(), train.labels
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(4):
        for s in range(0, len(x), 64):
            xb, yb = x[s:s + 64], y[s:s + 64]
            net.eval()
            xa = pgd(lambda a, t: torch.nn.functional.cross_entropy(net(a), t, reduction="none"), xb, yb,
                     eps=0.1, step_size=0.05, steps=3, norm="Linf", rand_init=True)
            net.train()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xa), yb).backward()
            opt.step()
    return net.eval()


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="model checkpoint (default: a digits CNN trained here)")
    p.add_argument("--data", default=None, help="data set for --checkpoint (default digits)")
    p.add_argument("--n", type=int, default=None, help="test examples")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--eps", type=float, default=None)
    p.add_argument("--alpha", type=float, default=0.2, help="MeanSparse alpha (0: the base model)")
    p.add_argument("--steps", type=int, default=None, help="APGD/FAB iterations (100 = standard)")
    p.add_argument("--queries", type=int, default=None, help="Square queries (5000 = standard)")
    p.add_argument("--attack", choices=["aa", "apgd-ce"], default="aa")
    p.add_argument("--fused-vs-eager", action="store_true",
                   help="time ms.evaluate on the eager-operator model vs the fused model (identical reports)")
    p.add_argument("--defaults", action="store_true",
                   help="time the default worst case (attacks, ladder, indicators) against the old default")
    p.add_argument("--whole-compile", default=None, metavar="MODE",
                   help="with --fused-vs-eager: also the eager-operator model under torch.compile(mode=MODE)")
    args = p.parse_args()
    setup(args.threads)
    set_clock(args.clock, args.threads, args.device)
    device = torch.device(args.device)
    quick = args.quick
    args.n = args.n or (24 if quick else 64)
    args.batch_size = args.batch_size or (12 if quick else 32)
    args.steps = args.steps or (10 if quick else 100)
    args.queries = args.queries or (100 if quick else 5000)
    args.repeats = args.repeats or (2 if quick else 3)
    if args.checkpoint:
        from meansparse.models import load

        base = load(args.checkpoint)
        data_name = args.data or "cifar10-jpg"
        eps = args.eps or 8 / 255
    else:
        base, data_name, eps = digits_model(), "digits", args.eps or 0.1
    base = base.to(device)
    for p_ in base.parameters():
        p_.requires_grad_(False)
    test = load_dataset(data_name, "test").head(args.n)
    x, y = test.float(), test.labels
    model = base
    if args.alpha > 0:
        train = load_dataset(data_name, "train").head(512)
        model = ms.prepare(copy.deepcopy(base), example_inputs=(x[:2].to(device),))
        ms.calibrate(model, Batches(train, 128), progress=False)
        ms.set_alpha(model, args.alpha)
        eager_model = copy.deepcopy(model).eval()
        ms.fuse(model)
    elif args.fused_vs_eager:
        raise SystemExit("--fused-vs-eager needs --alpha > 0")
    model.eval()
    if args.attack == "aa":
        attack = AutoAttackStandard(eps=eps, steps=args.steps, queries=args.queries)
    else:
        attack = APGD(eps=eps, steps=args.steps)
    n_classes = int(model(x[:1].to(device)).shape[1])
    last: dict = {}

    def warm(net) -> None:  # compile the fused kernels (forward, backward) outside the timed runs
        xb = x[: args.batch_size].to(device).requires_grad_()
        torch.autograd.grad(net(xb).sum(), xb)
        with torch.no_grad():
            net(xb)

    warm(model)
    compiled_model = None
    if args.fused_vs_eager:
        warm(eager_model)
        if args.whole_compile:
            compiled_model = torch.compile(copy.deepcopy(eager_model), mode=args.whole_compile)
            start = time.perf_counter()
            try:  # e.g. CUDA graphs refuse an attack that reads a model output after the next call
                warm(compiled_model)
                last["compile_seconds"] = time.perf_counter() - start
                ms.evaluate(compiled_model, x, y, eps=eps, attacks=[attack], batch_size=args.batch_size,
                            progress=False, path="eager", ladder=False, indicators=False)  # its batch shapes, compiled
            except Exception as e:  # noqa: BLE001 - report and time the other variants
                print(f"whole-model torch.compile({args.whole_compile}) failed: {type(e).__name__}: {e}")
                last["compile_error"] = f"{type(e).__name__}: {e}"
                compiled_model = None
    state_dir = tempfile.mkdtemp()

    def ours(net=model, key="report", path="auto"):  # with a resume file, as the CLI runs it (a fresh one each time)
        last["runs"] = last.get("runs", 0) + 1
        state = f"{state_dir}/state-{last['runs']}.json"
        last[key] = ms.evaluate(net, x, y, eps=eps, attacks=[attack], batch_size=args.batch_size,
                                progress=False, state_path=state, path=path, ladder=False, indicators=False)

    if args.defaults:
        defaults(args, model, base, x, y, eps, state_dir)
        return
    if args.fused_vs_eager:
        variants = {"evaluate, eager operator": lambda: ours(eager_model, "eager", path="eager"),
                    "evaluate, fused": ours}
        if compiled_model is not None:
            variants[f"evaluate, whole-model torch.compile({args.whole_compile})"] = \
                lambda: ours(compiled_model, "compiled", path="eager")
        fused_vs_eager(args, variants, last)
        return

    def reference():
        if args.attack == "aa":
            adversary = attack.build(model, seed=0, device=device, n_classes=n_classes)  # the library's AutoAttack
            adversary.run_standard_evaluation(x, y, batch_size=args.batch_size)
            return
        from pyautoattack.autopgd_base import APGDAttack

        adversary = APGDAttack(model, n_iter=args.steps, norm="Linf", eps=eps, seed=0, loss="ce", eot_iter=1,
                               rho=0.75, verbose=False, device=device)
        for s in range(0, len(x), args.batch_size):
            adversary.perturb(x[s:s + args.batch_size].to(device), y[s:s + args.batch_size].to(device))

    res = interleaved({"meansparse.evaluate": ours, "pyautoattack": reference}, args.repeats, warmup=0)
    report = last["report"]
    env = environment(args.threads)
    ratio = res["meansparse.evaluate"]["median"] / res["pyautoattack"]["median"]
    ratio_min = res["meansparse.evaluate"]["min"] / res["pyautoattack"]["min"]
    if args.attack == "aa":
        what = (f"AutoAttack standard version, {args.steps} steps, {args.queries} Square queries "
                f"({'standard' if attack.params()['standard'] else 'cheaper than standard'})")
    else:
        what = f"APGD-CE, {args.steps} steps, 1 restart"
    print(f"{describe(env)}\nmodel: {args.checkpoint or 'digits small_cnn (trained here)'}"
          f"{f', MeanSparse alpha={args.alpha} (fused)' if args.alpha > 0 else ''}; {data_name} test[:{args.n}], "
          f"eps={eps:.4g}, batch {args.batch_size}; {what}"
          f"\nclean {report.clean_accuracy:.3f}, robust {report.worst_case_accuracy:.3f}\n")
    rows = [[k, f"{v['median']:.2f}", f"{v['min']:.2f}", " ".join(f"{s:.2f}" for s in v["samples"])]
            for k, v in res.items()]
    print(fmt_table(rows, ["variant", "median s", "min s", "samples s"]))
    print(f"\nratio ours / reference: {ratio:.3f} (medians), {ratio_min:.3f} (minima); "
          f"{args.n / res['meansparse.evaluate']['median']:.3g} images/s (ours, all {args.n} test images)")
    write_json(args.json, {"environment": env, "results": res, "ratio": ratio})


OLD_DEFAULT = ("aa", "bpda-apgd-ce", "bpda-apgd-t", "transfer", "square")


def defaults(args, model, base, x, y, eps, state_dir) -> None:
    """The default worst case against the old default, interleaved on the same images and budgets."""
    options = {} if args.steps == 100 and args.queries == 5000 else {
        name: {"steps": args.steps} for name in ("apgd-ce", "apgd-t", "apgd-mt", "apgd-margin", "transfer")}
    if options:
        options.update(aa={"steps": args.steps, "queries": args.queries}, square={"queries": args.queries},
                       **{"square-warm": {"queries": max(1, args.queries // 5)}})
    last: dict = {}

    def run(key, **kw):
        last["n"] = last.get("n", 0) + 1
        last[key] = ms.evaluate(model, x, y, eps=eps, base_model=base, batch_size=args.batch_size, progress=False,
                                attack_options=options, state_path=f"{state_dir}/d-{last['n']}.json", **kw)

    res = interleaved({"old default": lambda: run("old", attacks=OLD_DEFAULT, ladder=False, indicators=False),
                       "default": lambda: run("new")}, args.repeats, warmup=0)
    old, new = last["old"], last["new"]
    ratio = res["default"]["median"] / res["old default"]["median"]
    print(f"{describe(environment(args.threads))}\nmodel: {args.checkpoint or 'digits small_cnn'}, alpha "
          f"{args.alpha}; {len(x)} test images, eps={eps:.4g}, batch {args.batch_size}; budgets "
          f"{'standard' if not options else options}\n")
    rows = [[k, f"{v['median']:.1f}", f"{100 * r.worst_case_accuracy:.2f}", ", ".join(r.attacks)]
            for (k, v), r in zip(res.items(), (old, new))]
    print(fmt_table(rows, ["variant", "median s", "worst case %", "attacks run"]))
    print(f"\nratio default / old default: {ratio:.2f}; ladder: "
          + " ".join(f"x{r['factor']} broke {r['n_broken']}" for r in new.ladder[1:])
          + f" ({'converged' if new.converged else 'not converged'})")
    seconds = {k: r.metadata["run"].get("attack_seconds", {}) for k, r in (("old", old), ("default", new))}
    for key, per_attack in seconds.items():  # where the time goes (wall seconds of each attack, its rungs apart)
        print(f"{key}: " + ", ".join(f"{name} {sec:.0f} s" for name, sec in per_attack.items()))
    write_json(args.json, {"environment": environment(args.threads), "results": res, "ratio": ratio,
                           "worst_case": {"old": old.worst_case_accuracy, "default": new.worst_case_accuracy},
                           "attack_seconds": seconds,
                           "ladder": [{k: r[k] for k in ("factor", "n_attacked", "n_broken")} for r in new.ladder]})


def fused_vs_eager(args, variants: dict, last: dict) -> None:
    res = interleaved(variants, args.repeats, warmup=1)
    a, b = last["eager"], last["report"]
    same = a.comparable() == b.comparable()
    eager_s = res["evaluate, eager operator"]["median"]
    ratio = res["evaluate, fused"]["median"] / eager_s
    compiled = {k: v for k, v in res.items() if "torch.compile" in k}
    compiled_same = last["compiled"].comparable() == a.comparable() if compiled else None
    print(f"{describe(environment(args.threads))}\nmodel: {args.checkpoint or 'digits small_cnn'}, MeanSparse "
          f"alpha={args.alpha}; {args.n} test images, batch {args.batch_size}; attack {args.attack}, "
          f"{args.steps} steps\nclean {b.clean_accuracy:.3f}, robust {b.worst_case_accuracy:.3f}; "
          f"reports identical: {'yes' if same else 'NO'}\n")
    rows = [[k, f"{v['median']:.2f}", f"{v['min']:.2f}", f"{v['median'] / eager_s:.3f}"] for k, v in res.items()]
    print(fmt_table(rows, ["variant", "median s", "min s", "/ eager"]))
    print(f"\nfused / eager: {ratio:.3f} (medians)")
    if compiled:
        (name, v), = compiled.items()
        c = last["compiled"]
        print(f"{name} / eager: {v['median'] / eager_s:.3f} (medians; compiling took {last['compile_seconds']:.1f} s "
              f"before the timed runs, more for new batch shapes); clean {c.clean_accuracy:.3f}, robust "
              f"{c.worst_case_accuracy:.3f}; report identical to the eager one: {'yes' if compiled_same else 'no'}")
    write_json(args.json, {"environment": environment(args.threads), "results": res, "ratio": ratio,
                           "identical": same, "compiled_identical": compiled_same,
                           "compile_seconds": last.get("compile_seconds"), "compile_error": last.get("compile_error")})
    if not same:
        raise SystemExit("the fused model's report differs from the eager model's")


if __name__ == "__main__":
    main()
