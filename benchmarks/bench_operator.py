"""Cost of the MeanSparse operator: base model vs eager operator vs fused operator (+ activation / producer).

Architectures (``--arch``): a ResNet-18 (ReLU / GELU), robustbench's DMWideResNet (the WRN-70-16 family: SiLU
and residual-add sites, preset dm_wrn), and small timm Swin / ConvNeXt models at 32x32 (token layouts, their
presets).

For each width and activation: eval forward (no grad) and forward+backward w.r.t. the input (the attack
step: parameters frozen, gradient of a logsumexp loss), the latter in both gradient modes.  All variants run
interleaved in one process, so the printed ratios are side by side.  Every measurement is done twice, in
child processes without and with GLIBC_TUNABLES (see _common.GLIBC_TUNABLES); a second table gives the
median minor page faults per call, the allocator's share of the time.

    python benchmarks/bench_operator.py --threads 1 --quick
    python benchmarks/bench_operator.py --threads 16 --widths 16 64 --batch 256
    python benchmarks/bench_operator.py --threads 2 --arch dm_wrn --depth 16 --widths 4 --batch 256
    python benchmarks/bench_operator.py --device cuda --glibc default --widths 16 64 --batch 256 1024
    python benchmarks/bench_operator.py --device cuda --glibc default --arch dm_wrn --widths 4 10 \\
        --whole-compile reduce-overhead    # + the base and MeanSparse models under one whole-model torch.compile

``--whole-compile MODE`` adds two variants: the base model and the (eager-operator) MeanSparse model each wrapped
in ``torch.compile(model, mode=MODE)`` (``reduce-overhead``: CUDA graphs on a GPU).  Their first calls (the
compilation) run before the timed rounds and are reported as compile seconds.
"""

from __future__ import annotations

import copy
import json
import sys
import time

import torch
from _common import (
    base_parser,
    describe,
    environment,
    fmt_table,
    hidden,
    interleaved,
    ratios,
    run_variants,
    set_clock,
    setup,
    write_json,
)

import meansparse as ms
from meansparse._compile import compile_disabled_reason, compile_enabled
from meansparse.models import create_model

ARCH_ACTIVATION = {"dm_wrn": "silu", "swin": "gelu", "convnext": "gelu"}


def architecture(arch: str, width: int, activation: str, depth: int) -> tuple[torch.nn.Module, str | None]:
    """(base model, preset): the paper's families at CIFAR scale, random weights."""
    if arch == "resnet18":
        return create_model("resnet18", width=width, activation=activation), None
    if arch == "dm_wrn":  # the WRN-70-16 family: pre-activation blocks, SiLU, residual-add sites
        ms.zoo.import_robustbench()
        from robustbench.model_zoo.architectures.dm_wide_resnet import DMWideResNet

        return DMWideResNet(num_classes=10, depth=depth, width=width, activation_fn=torch.nn.SiLU), "dm_wrn"
    timm = ms.zoo.import_timm()
    if arch == "swin":  # NLC tokens: GELU in the MLP, fc2 outputs and both block adds
        from timm.models.swin_transformer import SwinTransformer

        net = SwinTransformer(img_size=32, patch_size=2, embed_dim=width, depths=(2, 2), num_heads=(2, 4),
                              window_size=4, num_classes=10, drop_path_rate=0.0)
        return net, "swin"
    from timm.models.convnext import ConvNeXt  # NHWC GELU sites and NCHW drop_path outputs

    net = ConvNeXt(depths=(1, 1, 1, 1), dims=(width, width, 2 * width, 2 * width), patch_size=2, num_classes=10)
    del timm
    return net, "convnext"


def build(width: int, activation: str, batch: int, alpha: float, device: str = "cpu", arch: str = "resnet18",
          depth: int = 16):
    torch.manual_seed(0)
    net, preset = architecture(arch, width, activation, depth)
    base = net.eval().to(device)
    for p in base.parameters():
        p.requires_grad_(False)
    x = torch.rand(batch, 3, 32, 32).to(device)
    eager = ms.prepare(base, example_inputs=(x[:2],), preset=preset)
    ms.calibrate(eager, [x[: min(batch, 64)]], progress=False)
    ms.set_alpha(eager, alpha)
    fused = ms.fuse(copy.deepcopy(eager))
    assert len(ms.fused_sites(fused)) == len(ms.operators(fused)), "every site should fuse"
    return base, eager, fused, x


def forward(model, x):
    def run():
        with torch.no_grad():
            model(x)

    return run


def attack_step(model, x, mode: str | None):
    ops = ms.operators(model)

    def run():
        for o in ops:
            o.gradient = mode
        xr = x.detach().requires_grad_()
        loss = model(xr).logsumexp(1).sum()
        torch.autograd.grad(loss, xr)

    return run


def whole_compiled(base, eager, x, mode: str) -> tuple[dict, dict]:
    """The base and MeanSparse models under one ``torch.compile`` each, and the seconds their first calls took
    (forward; attack step per gradient mode): compilation, outside the timed rounds."""
    models = {"base": torch.compile(base, mode=mode), "eager": torch.compile(eager, mode=mode)}
    seconds = {}
    for name, m in models.items():
        start = time.perf_counter()
        forward(m, x)()
        for mode_ in ([None] if name == "base" else ["exact", "straight_through"]):
            attack_step(m, x, mode_)()
        if str(x.device).startswith("cuda"):
            torch.cuda.synchronize()
        seconds[name] = time.perf_counter() - start
    return models, seconds


def check_identical(eager, fused, x, activation: str) -> dict:
    """Outputs/gradients of the fused model vs the eager reference on a slice of the batch (the full batch for
    a whole-model compiled one: CUDA graphs are recorded for one shape)."""
    xs = x if isinstance(fused, torch._dynamo.eval_frame.OptimizedModule) else x[:8]
    with torch.no_grad():
        a, b = eager(xs), fused(xs)
    out = {"forward_max_abs_diff": float((a - b).abs().max()), "forward_equal": bool(torch.equal(a, b))}
    for mode in ("exact", "straight_through"):
        grads = []
        for m in (eager, fused):
            for o in ms.operators(m):
                o.gradient = mode
            xr = xs.clone().requires_grad_()
            grads.append(torch.autograd.grad(m(xr).logsumexp(1).sum(), xr)[0])
        out[f"grad_{mode}_equal"] = bool(torch.equal(*grads))
        out[f"grad_{mode}_max_rel_diff"] = float((grads[0] - grads[1]).abs().max() / grads[0].abs().max())
    return out


def child(args) -> dict:
    setup(args.threads)
    set_clock(args.clock, args.threads, args.device)
    results = {"environment": environment(args.threads), "compile": compile_enabled(), "cases": []}
    acts = args.activations if args.arch == "resnet18" else [ARCH_ACTIVATION[args.arch]]
    for width, batch, act in ((w, b, a) for w in args.widths for b in args.batch for a in acts):
        base, eager, fused, x = build(width, act, batch, args.alpha, args.device, args.arch, args.depth)
        fwd_variants = {"base": forward(base, x), "eager": forward(eager, x), "fused": forward(fused, x)}
        step_variants = {
            "base": attack_step(base, x, None),
            "eager exact": attack_step(eager, x, "exact"),
            "fused exact": attack_step(fused, x, "exact"),
            "eager straight_through": attack_step(eager, x, "straight_through"),
            "fused straight_through": attack_step(fused, x, "straight_through"),
        }
        whole, compile_seconds = {}, {}
        if args.whole_compile:
            try:
                whole, compile_seconds = whole_compiled(base, copy.deepcopy(eager), x, args.whole_compile)
            except Exception as e:  # noqa: BLE001 - report it, time the other variants
                print(f"whole-model torch.compile failed: {type(e).__name__}: {e}", file=sys.stderr)
                compile_seconds = {"error": f"{type(e).__name__}: {e}"}
        if whole:
            fwd_variants |= {"base compiled": forward(whole["base"], x), "eager compiled": forward(whole["eager"], x)}
            step_variants |= {"base compiled": attack_step(whole["base"], x, None)} | {
                f"compiled {m}": attack_step(whole["eager"], x, m) for m in ("exact", "straight_through")}
        fwd = interleaved(fwd_variants, args.repeats, warmup=2)
        step = interleaved(step_variants, args.repeats, warmup=2)
        results["cases"].append({
            "arch": args.arch, "depth": args.depth if args.arch == "dm_wrn" else None,
            "width": width, "activation": act, "batch": batch,
            "forward": {k: v["median"] for k, v in fwd.items()}, "forward_ratio": ratios(fwd, "base"),
            "forward_ratio_min": ratios(fwd, "base", "min"),
            "attack_step": {k: v["median"] for k, v in step.items()}, "attack_step_ratio": ratios(step, "base"),
            "attack_step_ratio_min": ratios(step, "base", "min"),
            "minor_faults": {"forward": {k: v["minor_faults"] for k, v in fwd.items()},
                             "attack_step": {k: v["minor_faults"] for k, v in step.items()}},
            "identical": check_identical(eager, fused, x, act),
            "whole_compile": args.whole_compile,
            "whole_compile_seconds": compile_seconds,
            "whole_compile_identical": check_identical(eager, whole["eager"], x, act) if whole else None,
        })
    results["compile_disabled_reason"] = compile_disabled_reason()
    return results


def report(variants: list[tuple[str, dict]]) -> str:
    rows = []
    for name, res in variants:
        for c in res["cases"]:
            fr, sr = c["forward_ratio"], c["attack_step_ratio"]
            arch = c.get("arch", "resnet18") + (f"-{c['depth']}" if c.get("depth") else "")
            rows.append([name, arch, c["width"], c["activation"], c["batch"], f"{1e3 * c['forward']['base']:.0f}",
                         f"{fr['eager']:.3f}", f"{fr['fused']:.3f}", f"{1e3 * c['attack_step']['base']:.0f}",
                         f"{sr['eager exact']:.3f}", f"{sr['fused exact']:.3f}",
                         f"{sr['eager straight_through']:.3f}", f"{sr['fused straight_through']:.3f}",
                         "yes" if all(v for k, v in c["identical"].items() if k.endswith("equal")) else
                         f"no (max rel {max(c['identical'][k] for k in c['identical'] if 'rel' in k):.1e})"])
    header = ["malloc", "arch", "width", "act", "batch", "fwd base ms", "fwd eager", "fwd fused", "step base ms",
              "step eager exact", "step fused exact", "step eager ST", "step fused ST", "bit-identical"]
    env = variants[0][1]["environment"]
    out = (f"{describe(env)}, compile={variants[0][1]['compile']}\n"
           "ratios: median time of the variant / median time of the base model, same process, interleaved\n\n"
           + fmt_table(rows, header))
    faults = [[name, c.get("arch", "resnet18"), c["width"], c["activation"], c["batch"]]
              + [f"{c['minor_faults'][p][k]:.0f}" for p, k in (("forward", "base"), ("forward", "fused"),
                 ("attack_step", "base"), ("attack_step", "fused exact"), ("attack_step", "fused straight_through"))]
              for name, res in variants for c in res["cases"]]
    out += ("\n\nminor page faults per call (median; the allocator's share, not the operator's):\n\n"
            + fmt_table(faults, ["malloc", "arch", "width", "act", "batch", "fwd base", "fwd fused", "step base",
                                 "step fused exact", "step fused ST"]))
    whole = [(name, c) for name, res in variants for c in res["cases"] if c.get("whole_compile_identical")]
    if whole:
        rows = []
        for name, c in whole:
            fr, sr, ident = c["forward_ratio"], c["attack_step_ratio"], c["whole_compile_identical"]
            arch = c.get("arch", "resnet18") + (f"-{c['depth']}" if c.get("depth") else "")
            rows.append([name, arch, c["width"], c["activation"], c["batch"], f"{fr['base compiled']:.3f}",
                         f"{fr['eager compiled']:.3f}", f"{sr['base compiled']:.3f}", f"{sr['compiled exact']:.3f}",
                         f"{sr['compiled straight_through']:.3f}",
                         " / ".join(f"{v:.0f}" for v in c["whole_compile_seconds"].values()),
                         f"max rel {max(v for k, v in ident.items() if 'rel' in k):.1e}"])
        out += (f"\n\nwhole-model torch.compile(mode={whole[0][1]['whole_compile']!r}), ratios to the uncompiled "
                "base model (same rounds as above):\n\n"
                + fmt_table(rows, ["malloc", "arch", "width", "act", "batch", "fwd base", "fwd MeanSparse",
                                   "step base", "step MeanSparse exact", "step MeanSparse ST",
                                   "compile s (base / MS)", "MS vs eager operator"]))
    return out


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--arch", choices=["resnet18", "dm_wrn", "swin", "convnext"], default="resnet18",
                   help="resnet18 (--activations), dm_wrn (robustbench DMWideResNet, SiLU, --depth), or a small timm "
                        "swin / convnext at 32x32 (token layouts), each with its preset placement")
    p.add_argument("--depth", type=int, default=16, help="dm_wrn depth (16, 22, 28, ...)")
    p.add_argument("--widths", type=int, nargs="+", default=None,
                   help="resnet18 base width; dm_wrn width factor; swin / convnext embedding width")
    p.add_argument("--activations", nargs="+", default=["relu", "gelu"])
    p.add_argument("--batch", type=int, nargs="+", default=None)
    p.add_argument("--alpha", type=float, default=0.25)
    p.add_argument("--glibc", choices=["both", "default", "tuned"], default="both")
    p.add_argument("--whole-compile", default=None, metavar="MODE",
                   help="also time both models under torch.compile(model, mode=MODE), e.g. reduce-overhead")
    p.add_argument("--child", action="store_true", help=hidden())
    args = p.parse_args()
    default_widths = {"resnet18": [16, 64], "dm_wrn": [4, 10], "swin": [32], "convnext": [32]}[args.arch]
    args.widths = args.widths or (default_widths[:1] if args.quick else default_widths)
    args.batch = args.batch or [64 if args.quick else 256]
    args.repeats = args.repeats or (5 if args.quick else 10)
    if args.child:
        print(json.dumps(child(args)))
        return
    argv = [a for a in sys.argv[1:] if a != "--child"]
    variants = run_variants(argv, args.glibc)
    print(report(variants))
    write_json(args.json, dict(variants))



if __name__ == "__main__":
    main()
