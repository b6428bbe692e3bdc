"""The small measurements behind docs/benchmarks.md's explanations of the fused operator's cost.

1. GELU on 4 M elements: ATen's kernel vs a torch.compile'd GELU vs a compiled sparsify + GELU (the fully
   compiled alternative to the split path), with whether the compiled result is bit-identical to ATen's.
2. ReLU on 1 M elements: ATen's bare ReLU vs meansparse's compiled sparsify + ReLU kernel.
3. The fixed cost of one compiled call: meansparse's compiled ReLU kernel vs the same eager ops on a tiny
   tensor (the difference is dynamo's guards and the inductor wrapper).
4. A ResNet-18 (width 16, batch 256, ReLU and GELU) forward as the eager module vs flattened by
   ``torch.fx.symbolic_trace`` (no operators inserted), one batch repeated and a pass over 4 batches: the
   allocator effect of a different free order.
5. One site, eval BatchNorm then GELU / ReLU on 4 M elements (a width-16 ResNet-18's first stage at batch 256):
   the base model vs the eager operator vs ``ms.fuse(producers=False)`` (sparsify kernel between ATen's BN and
   activation) vs ``ms.fuse()`` (BN computed inside the sparsify kernel), with bit-identity to the eager site.
6. The compiled sparsify on 16.7 M elements (a Swin-tiny GELU site's hidden tensor at batch 256) into a new
   tensor vs over its private input (what a site whose input nobody else reads does), alone and followed by
   ATen's GELU: with glibc's default allocator a fresh block that size is paid in page faults.
7. The exact-mode band mask on the same 16.7 M elements, recomputed from the site's output (what the fused
   backward does) vs read from a mask saved in the forward, bit-packed (uint8, 8 positions a byte) or bool,
   and the forward's cost of saving it: the alternatives issue #14 tried for the Swin/ConvNeXt exact-mode
   step, rejected because inductor does not vectorize the bit and bool loads.

    python benchmarks/bench_kernels.py --threads 2
    python benchmarks/bench_kernels.py --threads 2 --cases in_place        # one case
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=2147483648:glibc.malloc.trim_threshold=4294967296 \\
        python benchmarks/bench_kernels.py --threads 2
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from _common import base_parser, describe, environment, fmt_table, interleaved, set_clock, setup, write_json

import meansparse as ms
from meansparse._compile import compile_disabled_reason, compile_enabled
from meansparse.accel import kernels
from meansparse.models import create_model


def _no_grad(fn, *args):
    def run():
        with torch.no_grad():
            fn(*args)

    return run


def gelu_case(repeats: int) -> tuple[list[list[str]], dict]:
    x = torch.randn(64, 64, 32, 32)  # 4 M elements
    m, t = torch.randn(1, 64, 1, 1) * 0.1, torch.rand(1, 64, 1, 1) * 0.3
    compiled_gelu = torch.compile(lambda v: F.gelu(v), dynamic=True, fullgraph=True)
    compiled_both = torch.compile(lambda v, c, h: F.gelu(torch.where((v - c).abs() < h, c, v)), dynamic=True,
                                  fullgraph=True)
    res = interleaved({"ATen GELU": _no_grad(F.gelu, x), "compiled GELU": _no_grad(compiled_gelu, x),
                       "compiled sparsify+GELU": _no_grad(compiled_both, x, m, t)}, repeats, warmup=2)
    compiled_erf = torch.compile(torch.erf, dynamic=True, fullgraph=True)
    with torch.no_grad():
        identical = torch.equal(compiled_gelu(x), F.gelu(x))
        erf_identical = torch.equal(compiled_erf(x), torch.erf(x))  # the formula's one transcendental
    rows = [["GELU, 4 M elements", k, f"{1e3 * v['median']:.3f}", "" if k == "ATen GELU" else
             ("yes" if identical else "no") if k == "compiled GELU" else ""] for k, v in res.items()]
    rows.append(["GELU, 4 M elements", "compiled erf (not timed)", "", "yes" if erf_identical else "no"])
    return rows, {"gelu": {k: v["median"] for k, v in res.items()}, "compiled_gelu_bit_identical": identical,
                  "compiled_erf_bit_identical": erf_identical}


def relu_case(repeats: int) -> tuple[list[list[str]], dict]:
    x = torch.randn(64, 16, 32, 32)  # 1 M elements
    m, t = torch.randn(1, 16, 1, 1) * 0.1, torch.rand(1, 16, 1, 1) * 0.3
    k = kernels.kernel("relu", (), "forward", ("contiguous", 4, 1))
    res = interleaved({"ATen ReLU": _no_grad(torch.relu, x), "compiled sparsify+ReLU": _no_grad(k, x, m, t)},
                      repeats, warmup=2)
    rows = [["ReLU, 1 M elements", name, f"{1e3 * v['median']:.3f}", ""] for name, v in res.items()]
    return rows, {"relu": {name: v["median"] for name, v in res.items()}}


def call_overhead_case(repeats: int) -> tuple[list[list[str]], dict]:
    x = torch.randn(1, 4, 2, 2)
    m, t = torch.zeros(1, 4, 1, 1), torch.full((1, 4, 1, 1), 0.1)
    k = kernels.kernel("relu", (), "forward", ("contiguous", 4, 1))

    def eager(v, c, h):
        return torch.relu(torch.where((v - c).abs() < h, c, v))

    def many(fn):
        def run():
            with torch.no_grad():
                for _ in range(100):
                    fn(x, m, t)

        return run

    res = interleaved({"eager ops": many(eager), "compiled call": many(k)}, repeats, warmup=2)
    per_call = {name: v["median"] / 100 for name, v in res.items()}
    rows = [["one call, 16 elements", name, f"{1e3 * v:.4f}", ""] for name, v in per_call.items()]
    rows.append(["one call, 16 elements", "compiled − eager (fixed cost)",
                 f"{1e3 * (per_call['compiled call'] - per_call['eager ops']):.4f}", ""])
    return rows, {"call_seconds": per_call}


def fx_case(repeats: int) -> tuple[list[list[str]], dict]:
    """One batch repeated, and a pass over 4 different batches (what calibration and evaluation do)."""
    rows, out = [], {}
    for act in ("relu", "gelu"):
        torch.manual_seed(0)
        net = create_model("resnet18", width=16, activation=act).eval()
        traced = torch.fx.symbolic_trace(net)
        data = [torch.rand(256, 3, 32, 32) for _ in range(4)]

        def loop(m, data=data):
            def run():
                with torch.no_grad():
                    for x in data:
                        m(x)

            return run

        res = interleaved({"eager module": _no_grad(net, data[0]), "fx-flattened": _no_grad(traced, data[0]),
                           "eager module, 4 batches": loop(net), "fx-flattened, 4 batches": loop(traced)},
                          repeats, warmup=2)
        case = f"ResNet-18 w16 {act.upper() if act == 'gelu' else 'ReLU'}, batch 256"
        for name, v in res.items():
            rows.append([case, name, f"{1e3 * v['median']:.1f}", ""])
        for suffix in ("", ", 4 batches"):
            ratio = res[f"fx-flattened{suffix}"]["median"] / res[f"eager module{suffix}"]["median"]
            rows.append([case, f"fx-flattened / eager{suffix}", f"{ratio:.3f}", ""])
            out[f"fx_ratio_{act}{suffix.replace(', ', '_').replace(' ', '_')}"] = ratio
        out[f"fx_{act}"] = {name: v["median"] for name, v in res.items()}
    return rows, out


class _Site(torch.nn.Module):
    def __init__(self, c: int, activation: str) -> None:
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(c)
        self.act = torch.nn.GELU() if activation == "gelu" else torch.nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(x))


def producer_case(repeats: int) -> tuple[list[list[str]], dict]:
    rows, out = [], {}
    x = torch.randn(256, 16, 32, 32)  # 4 M elements
    for act in ("gelu", "relu"):
        torch.manual_seed(0)
        base = _Site(16, act).eval()
        with torch.no_grad():
            base.bn.running_mean.normal_()
            base.bn.running_var.uniform_(0.5, 2.0)
        eager = ms.prepare(copy.deepcopy(base), example_inputs=(x[:2],))
        ms.calibrate(eager, [x[:64]], progress=False, check_inputs=False)  # a block's features, not images
        ms.set_alpha(eager, 0.25)
        variants = {"base model (BN, activation)": base, "eager operator": eager,
                    "fused, producers=False": ms.fuse(copy.deepcopy(eager), producers=False),
                    "fused (BN inside the kernel)": ms.fuse(copy.deepcopy(eager))}
        res = interleaved({k: _no_grad(m, x) for k, m in variants.items()}, repeats, warmup=2)
        with torch.no_grad():
            ref = eager(x)
            same = {k: torch.equal(m(x), ref) for k, m in variants.items() if k.startswith("fused")}
        for k, v in res.items():
            rows.append([f"BN + {act.upper() if act == 'gelu' else 'ReLU'} site, 4 M elements", k,
                         f"{1e3 * v['median']:.3f}", ("yes" if same[k] else "no") if k in same else ""])
        out[f"site_{act}"] = {k: v["median"] for k, v in res.items()} | {"bit_identical": same}
    return rows, out


def in_place_case(repeats: int) -> tuple[list[list[str]], dict]:
    x = torch.randn(256, 256, 256)  # (batch, tokens, hidden): NLC, channels last
    m, t = torch.zeros(256), torch.full((256,), 0.1)
    layout = kernels.KernelLayout("contiguous", 3, 2)
    new, over = (kernels.kernel("", (), role, layout) for role in ("sparsify", "sparsify_in_place"))
    with torch.no_grad():
        same = torch.equal(new(x, m, t), over(x.clone(), m, t))
    res = interleaved({"sparsify into a new tensor": lambda: new(x, m, t),
                       "sparsify over its input": lambda: over(x, m, t),  # idempotent: x stays sparsified
                       "new tensor, then GELU": lambda: F.gelu(new(x, m, t)),
                       "over its input, then GELU": lambda: F.gelu(over(x, m, t)),
                       "GELU alone": lambda: F.gelu(x)}, repeats, warmup=2)
    rows = [["sparsify, 16.7 M elements", k, f"{1e3 * v['median']:.2f}",
             ("yes" if same else "no") if k == "sparsify over its input" else ""] for k, v in res.items()]
    return rows, {"in_place": {k: v["median"] for k, v in res.items()} | {"bit_identical": same}}


def saved_mask_case(repeats: int) -> tuple[list[list[str]], dict]:
    from meansparse.core.band import band_from_output, in_band, sparsify

    x = torch.randn(256, 256, 256)
    m, t = torch.randn(256) * 0.1, torch.rand(256) * 0.5
    bit = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)

    def sparsify_bits(v, c, h, b):  # the forward saving a bit-packed mask next to the sparsified values
        inside = in_band(v, c, h)
        packed = (inside.reshape(-1, 8).to(torch.uint8) * b).sum(-1, dtype=torch.uint8)
        return v.copy_(torch.where(inside, c, v)), packed

    def sparsify_bool(v, c, h):
        inside = in_band(v, c, h)
        return v.copy_(torch.where(inside, c, v)), inside

    def from_output(g, y, c, h):
        return g.copy_(torch.where(band_from_output(y, c, h), 0.0, g))

    def from_bits(g, bits, b):
        return g.copy_(torch.where(((bits.unsqueeze(-1) & b) != 0).reshape(g.shape), 0.0, g))

    def from_bool(g, inside):
        return g.copy_(torch.where(inside, 0.0, g))

    c = {f.__name__: torch.compile(f, dynamic=True, fullgraph=True)
         for f in (sparsify_bits, sparsify_bool, from_output, from_bits, from_bool)}
    plain = kernels.kernel("", (), "sparsify_in_place", kernels.KernelLayout("contiguous", 3, 2))
    with torch.no_grad():
        y, bits = c["sparsify_bits"](x.clone(), m, t, bit)
        _, inside = c["sparsify_bool"](x.clone(), m, t)
        g = torch.randn_like(x)
        ref = torch.where(band_from_output(y, m, t), 0.0, g)
        expected = sparsify(x, m, t)
        same = {"from a saved bit mask": torch.equal(c["from_bits"](g.clone(), bits, bit), ref),
                "from a saved bool mask": torch.equal(c["from_bool"](g.clone(), inside), ref),
                "forward: sparsify in place": torch.equal(plain(x.clone(), m, t), expected),
                "forward: + bit mask": torch.equal(y, expected)}
    gg = g.clone()  # masking is idempotent: repeated rounds over the same buffer do the same work
    res = interleaved({"forward: sparsify in place": lambda: plain(x, m, t),
                       "forward: + bit mask": lambda: c["sparsify_bits"](x, m, t, bit),
                       "forward: + bool mask": lambda: c["sparsify_bool"](x, m, t),
                       "backward: from the output (fused)": lambda: c["from_output"](gg, y, m, t),
                       "from a saved bit mask": lambda: c["from_bits"](gg, bits, bit),
                       "from a saved bool mask": lambda: c["from_bool"](gg, inside)}, repeats, warmup=2)
    rows = [["band mask, 16.7 M elements", k, f"{1e3 * v['median']:.2f}",
             ("yes" if same[k] else "no") if k in same else ""] for k, v in res.items()]
    return rows, {"saved_mask": {k: v["median"] for k, v in res.items()} | {"bit_identical": same}}


CASES = {"gelu": gelu_case, "relu": relu_case, "call_overhead": call_overhead_case, "fx": fx_case,
         "producer": producer_case, "in_place": in_place_case,
         "saved_mask": saved_mask_case}


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="which cases (default all)")
    args = p.parse_args()
    args.repeats = args.repeats or (5 if args.quick else 15)
    setup(args.threads)
    set_clock(args.clock, args.threads)
    if not compile_enabled():
        raise SystemExit(f"torch.compile is unavailable here ({compile_disabled_reason()})")
    rows, out = [], {"environment": environment(args.threads)}
    for name in args.cases:
        r, d = CASES[name](args.repeats)
        rows += r
        out.update(d)
    env = out["environment"]
    print(f"{describe(env)}, GLIBC_TUNABLES={'set' if env['glibc_tunables'] else 'unset'}\n"
          "medians of interleaved rounds (ms)\n")
    print(fmt_table(rows, ["case", "variant", "ms", "bit-identical to ATen / the eager site"]))
    write_json(args.json, out)


if __name__ == "__main__":
    main()
