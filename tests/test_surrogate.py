"""The MeanSparse-aware attacks: the soft-threshold surrogate, its gradient modes, the surrogate / smooth /
ensemble wrappers, the margin losses and warm-started Square."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from evaluation_helpers import EPS, FAST, run

import meansparse as ms
from meansparse.core.band import SurrogateGradient, soft_sparsify, sparsify
from meansparse.evaluation import build_attack
from meansparse.evaluation.attacks import GradientMix, SquareWarm, margin_loss, zero_alphas
from meansparse.evaluation.budget import attack_passes
from meansparse.placement import gradient_mode

pytest_plugins = ["evaluation_fixtures"]


@pytest.mark.parametrize("k", [0.5, 1.0, 2.0, 4.0])
def test_surrogate_gradient_is_the_soft_thresholds_and_forward_is_real(k):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    m = torch.randn(1, 3, 1, 1, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64).view(1, 3, 1, 1)  # channel 0: no band
    y = SurrogateGradient.apply(x, m, t, k)
    assert torch.equal(y, sparsify(x, m, t))
    (gs,) = torch.autograd.grad(y.sum(), x)
    (gsoft,) = torch.autograd.grad(soft_sparsify(x, m, t, k).sum(), x)
    torch.testing.assert_close(gs, gsoft)
    assert torch.equal(gs[:, 0], torch.ones_like(gs[:, 0]))  # t = 0: the identity
    # the soft threshold: m at the centre, close to x far outside the band
    far = m + 50 * t.clamp_min(1e-3)
    soft = soft_sparsify(torch.cat([m, far]).expand(2, 3, 5, 5), m, t, k)
    assert torch.allclose(soft[0, 1:], m[0, 1:].expand(2, 5, 5))
    torch.testing.assert_close(soft[1, 1:], far[0, 1:].expand(2, 5, 5), rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_surrogate_backward_is_the_soft_gate_formula_bit_for_bit_and_never_nan(dtype):
    """The fast backward (clamped u, in place) equals ``grad·(1 − e·(1 − k·u))`` from soft_gate wherever that
    is finite; where u overflows to inf (a tiny threshold, a large k) that formula gives NaN, which spread to
    every pixel of the example, and the fast one gives the derivative far outside the band, 1."""
    from meansparse.core.band import soft_gate, surrogate_backward, surrogate_backward_eager

    g = torch.Generator().manual_seed(1)
    for k in (0.5, 1.0, 2.0, 3.0, 4.0, 8.0, 16.0, 64.0):
        for scale in (0.01, 0.1, 1.0, 10.0):
            x = torch.randn(6, 5, 7, 7, generator=g, dtype=dtype) * scale
            m = torch.randn(1, 5, 1, 1, generator=g, dtype=dtype) * 0.1
            t = torch.tensor([0.0, 1e-7, 0.05, 0.3, 1.0], dtype=dtype).view(1, 5, 1, 1)
            grad = torch.randn(x.shape, generator=g, dtype=dtype)
            safe_t = torch.where(t > 0, t, torch.ones_like(t))
            u = ((x - m).abs() / safe_t).pow(k)  # soft_gate's u before its clamp
            e = torch.where(t > 0, torch.exp(-u), torch.zeros_like(u))
            reference = grad * (1 - e * (1 - k * u))
            assert torch.equal(grad * (1 - soft_gate(x - m, t, k)[1] * (1 - k * soft_gate(x - m, t, k)[0])),
                               torch.where(finite := ~reference.isnan(), reference, grad))
            fast = surrogate_backward_eager(grad, x, m, t, k)
            assert torch.equal(surrogate_backward(grad, x, m, t, k), fast)  # small: the eager path
            assert torch.equal(fast[finite], reference[finite]), (k, scale)
            assert not fast.isnan().any()
            assert torch.equal(fast[~finite], grad[~finite])  # overflowed u: far outside the band
    x = torch.tensor([0.0, 1.0, 1e3]).view(1, 3, 1, 1).expand(1, 3, 2, 2).contiguous().requires_grad_()
    t = torch.full((1, 3, 1, 1), 1e-7)
    (gx,) = torch.autograd.grad(SurrogateGradient.apply(x, torch.zeros_like(t), t, 8.0).sum(), x)
    assert torch.equal(gx[0, 2], torch.ones(2, 2))  # 1e3 / 1e-7 = 1e10 thresholds out: u = inf before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_surrogate_backward_matches_eager_for_every_sharpness(dtype):
    """Large inputs take one compiled kernel (whole k: power by squaring); it agrees with the eager formula to
    rounding for every k in turn in one process (a float k once gave a wrong graph after a recompile), with
    as many channels as pixels per row (shapes that share a symbol) and never NaN."""
    from meansparse._compile import COMPILE_MIN_NUMEL, compile_enabled
    from meansparse.core import band

    if not compile_enabled():
        pytest.skip("torch.compile is not available here")
    g = torch.Generator().manual_seed(2)
    for c in (32, 12):
        x = torch.randn(4, c, 32, 32, generator=g, dtype=dtype)
        m = torch.randn(1, c, 1, 1, generator=g, dtype=dtype) * 0.1
        t = torch.rand(1, c, 1, 1, generator=g, dtype=dtype) * 0.5
        t[0, 0], t[0, 1] = 0.0, 1e-7
        grad = torch.randn(x.shape, generator=g, dtype=dtype)
        assert x.numel() >= COMPILE_MIN_NUMEL
        for k in (4.0, 8.0, 2.5, 64.0, 4.0):
            fast = band.surrogate_backward(grad, x, m, t, k)
            torch.testing.assert_close(fast, band.surrogate_backward_eager(grad, x, m, t, k), rtol=1e-4,
                                       atol=1e-5 if dtype == torch.float32 else 1e-9)
            assert not fast.isnan().any()
        # the forward of the attack modes: compiled too, and bit-identical to the operator's
        x[0, 2, 0, :4] = m[0, 2, 0, 0]
        x[0, 3, 0, 0] = float("nan")
        for y in (band.SurrogateGradient.apply(x, m, t, 8.0), band.StraightThrough.apply(x, m, t)):
            assert torch.equal(y.isnan(), x.isnan())
            assert torch.equal(y.nan_to_num(), band.sparsify(x, m, t).nan_to_num())
    assert band._SURROGATE_KERNELS[8].compiled and band._SURROGATE_KERNELS[0].compiled
    assert band._SPARSIFY_KERNEL.compiled


def test_smooth_surrogate_gradient_is_finite_where_u_overflows():
    """The smooth model's backward (autograd through soft_sparsify) at a tiny threshold and k = 64: before the
    clamp u was inf there and the gradient NaN."""
    x = torch.tensor([0.0, 0.5, 1e3]).view(1, 3, 1, 1).expand(2, 3, 2, 2).contiguous().requires_grad_()
    t = torch.full((1, 3, 1, 1), 1e-7)
    y = soft_sparsify(x, torch.zeros_like(t), t, 64.0)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(gx).all() and torch.equal(gx[:, 1:], torch.ones_like(gx[:, 1:]))
    torch.testing.assert_close(y, sparsify(x, torch.zeros_like(t), t))


def test_gradient_mode_sets_and_restores_every_operator(models):
    _, model = models
    ops = ms.operators(model)
    before = [(o.gradient, o.sharpness) for o in ops]
    with gradient_mode(model, "smooth", 3.0):
        assert all(o.gradient == "smooth" and o.sharpness == 3.0 for o in ops)
    assert [(o.gradient, o.sharpness) for o in ops] == before
    with pytest.raises(ValueError, match="sharpness"):
        with gradient_mode(model, "surrogate", -1):
            pass
    assert [(o.gradient, o.sharpness) for o in ops] == before


def test_surrogate_modes_on_the_real_model(models, test_set):
    """surrogate: same logits, other gradient than exact; smooth: other logits; the fused model agrees."""
    _, model = models
    x, y = test_set[0][:16], test_set[1][:16]

    def logits_and_grad(m, mode):
        xg = x.clone().requires_grad_(True)
        with gradient_mode(m, mode, 2.0):
            out = m(xg)
            (gr,) = torch.autograd.grad(F.cross_entropy(out, y), xg)
        return out.detach(), gr

    exact_out, exact_g = logits_and_grad(model, "exact")
    sg_out, sg_g = logits_and_grad(model, "surrogate")
    smooth_out, _ = logits_and_grad(model, "smooth")
    assert torch.equal(exact_out, sg_out)
    assert not torch.equal(exact_g, sg_g)
    assert not torch.equal(exact_out, smooth_out)
    ms.fuse(model)
    try:
        fused_out, fused_g = logits_and_grad(model, "surrogate")
    finally:
        ms.accel.unfuse(model)
    assert torch.equal(fused_out, sg_out) and torch.equal(fused_g, sg_g)


def test_gradient_mix_has_real_values_and_mixed_gradient(models, test_set):
    _, model = models
    x = test_set[0][:8]
    mix = GradientMix(model, None, 0.25, 2.0)
    xg = x.clone().requires_grad_(True)
    out = mix(xg)
    with torch.no_grad():
        assert torch.allclose(out, model(x), atol=1e-6)
    (g_mix,) = torch.autograd.grad(out.sum(), xg)
    with gradient_mode(model, "surrogate", 2.0):
        (g_sur,) = torch.autograd.grad(model(xg).sum(), xg)
    with zero_alphas(model):
        (g_base,) = torch.autograd.grad(model(xg).sum(), xg)
    torch.testing.assert_close(g_mix, 0.25 * g_sur + 0.75 * g_base, rtol=1e-5, atol=1e-6)


def test_margin_loss():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    y = torch.tensor([0, 2])
    assert torch.equal(margin_loss(logits, y), torch.tensor([-1.0, 4.0]))
    assert torch.equal(margin_loss(logits, y, torch.tensor([1, 0])), torch.tensor([-2.0, -1.0]))


def test_wrapped_names_options_and_budget():
    a = build_attack("sg-apgd-mt", eps=EPS, steps=7, n_target_classes=3, sharpness=[1, 2, 8])
    assert a.name == "sg-apgd-mt" and a.family == "surrogate" and a.sharpness == (1.0, 2.0, 8.0)
    assert a.inner.steps == 7 and a.inner.loss == "margin"
    assert attack_passes(a.settings()) == 7 * 3 * 3
    ens = build_attack("ens-apgd-ce", eps=EPS, steps=5, sharpness=2)
    assert attack_passes(ens.settings()) == 5 * 2
    with pytest.raises(ValueError, match="sharpness"):
        build_attack("smooth-apgd-ce", eps=EPS, sharpness=0)
    with pytest.raises(ValueError, match="weight"):
        build_attack("ens-apgd-ce", eps=EPS, weight=2)
    with pytest.raises(ValueError, match="unknown attack"):
        build_attack("sg-square", eps=EPS)


def test_scaled_attacks_double_the_budget_under_their_own_seeds():
    a = build_attack("sg-apgd-ce", eps=EPS, steps=10)
    b = a.scaled(2)
    assert b.name == "sg-apgd-ce@x2" and b.inner.steps == 20 and a.inner.steps == 10
    assert b.seed_key != a.seed_key
    t = build_attack("transfer", eps=EPS, steps=10).scaled(4)
    assert [s.steps for s in t.sources] == [40, 40]
    p = build_attack("pgd", eps=EPS, steps=10).scaled(2)
    assert p.steps == 20 and p.step_size == pytest.approx(2.5 * EPS / 20)
    w = build_attack("square-warm", eps=EPS, queries=10, start="sg-apgd-ce", start_options={"steps": 3}).scaled(3)
    assert w.queries == 30 and w.start.inner.steps == 9


def test_surrogate_attacks_beat_bpda_on_the_masked_model(models, test_set):
    """On the masked digits model the soft-threshold gradient breaks more than the identity (BPDA) and the
    plain gradient; the smooth model's candidates, judged on the real one, break examples too."""
    _, model = models
    r = run(model, *test_set, ("apgd-ce", "bpda-apgd-ce", "sg-apgd-ce", "smooth-apgd-ce", "ens-apgd-ce"),
            batch_size=32, ladder=False, indicators=False)
    acc = r.robust_accuracy
    assert acc["sg-apgd-ce"] < acc["bpda-apgd-ce"] < acc["apgd-ce"]
    assert acc["smooth-apgd-ce"] < acc["apgd-ce"] and acc["ens-apgd-ce"] < acc["apgd-ce"]
    assert r.breakdown[2]["kind"] == "surrogate"


def test_square_warm_starts_from_its_start(models, test_set):
    """A start candidate that already fools the model is where the search starts and ends (Linf); under L2
    Square searches from scratch and stays in the ball."""
    _, model = models
    x, y = test_set[0][:24], test_set[1][:24]
    start = build_attack("sg-apgd-ce", eps=EPS, steps=10)
    begin = start.run(model, x, y, seed=3)
    with torch.no_grad():
        fooled = model(begin).argmax(1) != y
    assert fooled.any()
    out = SquareWarm(eps=EPS, queries=5, start=start).run(model, x, y, seed=3)
    assert torch.allclose(out[fooled], begin[fooled], atol=1e-6)  # x + eps * (begin - x) / eps, rounded
    with torch.no_grad():
        assert (model(out[fooled]).argmax(1) != y[fooled]).all()
    assert (out - x).abs().max() <= EPS + 1e-6
    l2 = SquareWarm(norm="L2", eps=1.0, queries=5, start=build_attack("sg-apgd-ce", norm="L2", eps=1.0, steps=5))
    out2 = l2.run(model, x, y, seed=3)
    assert (out2 - x).flatten(1).norm(dim=1).max() <= 1.0 + 1e-4


def test_square_warm_takes_its_start_attacks_options(models, test_set):
    _, model = models
    opts = dict(FAST, **{"square-warm": {"queries": 5, "start": "sg-apgd-margin"}, "apgd-margin": {"steps": 3}})
    r = run(model, test_set[0][:8], test_set[1][:8], ("square-warm",), attack_options=opts, ladder=False,
            indicators=False)
    start = r.metadata["attack_settings"]["square-warm"]["start"]
    assert start["name"] == "sg-apgd-margin" and start["inner"]["steps"] == 3


def test_a_wrapped_attack_takes_its_inner_attacks_options_and_its_own():
    from meansparse.evaluation.attacks import options_for

    opts = {"apgd-mt": {"steps": 5, "rho": 0.5}, "sg-apgd-mt": {"sharpness": [4], "steps": 7}}
    assert options_for("sg-apgd-mt", opts) == {"steps": 7, "rho": 0.5, "sharpness": [4]}
    assert options_for("bpda-apgd-mt", opts) == {"steps": 5, "rho": 0.5}
    assert options_for("apgd-mt", opts) == {"steps": 5, "rho": 0.5}
    assert options_for("square", opts) == {}
