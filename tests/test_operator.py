"""The MeanSparse operator against an independent NumPy implementation of the formula."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meansparse import MeanSparse, SiteInfo

CHANNEL_DIM = {"NCHW": 1, "NC": 1, "NLC": 2, "NHWC": 3}
SHAPES = {"NCHW": (2, 5, 3, 4), "NC": (6, 5), "NLC": (2, 7, 5), "NHWC": (2, 3, 4, 5)}


def make_op(c=5, layout="NCHW", centering="channel", seed=0, name="blk.act"):
    g = torch.Generator().manual_seed(seed)
    op = MeanSparse(c, layout=layout, centering=centering, site=SiteInfo(name=name))
    op.set_statistics(torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.1, num_samples=100)
    return op


def formula(x: np.ndarray, mu: np.ndarray, var: np.ndarray, alpha: float, cd: int, centering="channel"):
    """out = mu_c if |x - mu_c| < alpha*sigma_c else x, per channel, in x's float32 arithmetic."""
    x = np.asarray(x, dtype=np.float32)
    mu = mu.astype(np.float32)
    sigma = np.sqrt(var.astype(np.float32))
    if centering == "zero":
        mu = np.zeros_like(mu)
    if centering == "global":
        g = mu.astype(np.float64).mean()
        gv = (var.astype(np.float64) + (mu.astype(np.float64) - g) ** 2).mean()
        mu = np.full_like(mu, np.float32(g))
        sigma = np.full_like(sigma, np.sqrt(np.float32(gv)))
    out = x.copy()
    for c in range(x.shape[cd]):
        idx = [slice(None)] * x.ndim
        idx[cd] = c
        xc = x[tuple(idx)]
        t = np.float32(alpha) * sigma[c]
        out[tuple(idx)] = np.where(np.abs(xc - mu[c]) < t, mu[c], xc)
    return out


@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.7, 50.0])
def test_matches_formula(layout, alpha):
    op = make_op(layout=layout)
    op.set_alpha(alpha)
    x = torch.randn(SHAPES[layout], generator=torch.Generator().manual_seed(3)) * 1.5
    got = op(x).numpy()
    want = formula(x.numpy(), op.running_mean.numpy(), op.running_var.numpy(), alpha, CHANNEL_DIM[layout])
    np.testing.assert_array_equal(got, want)
    frac = float((got != x.numpy()).mean())
    if alpha == 50.0:
        assert frac > 0.9  # everything collapses onto the means
    elif alpha == 0.0:
        assert frac == 0.0


@settings(max_examples=40, deadline=None)
@given(
    layout=st.sampled_from(list(SHAPES)),
    alpha=st.floats(0.0, 5.0, allow_nan=False),
    centering=st.sampled_from(["channel", "zero", "global"]),
    seed=st.integers(0, 2**16),
)
def test_matches_formula_property(layout, alpha, centering, seed):
    op = make_op(layout=layout, centering=centering, seed=seed)
    op.set_alpha(alpha)
    x = torch.randn(SHAPES[layout], generator=torch.Generator().manual_seed(seed + 1)) * 2
    want = formula(x.numpy(), op.running_mean.numpy(), op.running_var.numpy(), alpha, CHANNEL_DIM[layout], centering)
    out = op(x)
    np.testing.assert_array_equal(out.numpy(), want)
    # properties: every output is either the input or the centre of its channel
    cd = CHANNEL_DIM[layout]
    changed = out != x
    if centering == "channel":
        shape = [1] * x.ndim
        shape[cd] = -1
        centre = op.running_mean.reshape(shape).expand_as(x)
        assert torch.equal(out[changed], centre[changed])


def test_alpha_zero_is_identity_bit_for_bit():
    op = MeanSparse(site=SiteInfo(name="s"))  # even uncalibrated and with unknown layout
    x = torch.randn(2, 3, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    assert op(x) is x
    op = make_op()
    op.set_alpha(0.0)
    assert op(x) is x


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision(dtype):
    op = make_op(layout="NCHW")
    op.set_alpha(0.8)
    x = torch.randn(2, 5, 3, 3).to(dtype)
    out = op(x)
    assert out.dtype == dtype
    m = op.running_mean.to(dtype).reshape(-1, 1, 1)
    t = (op.alpha * op.running_var.sqrt()).to(dtype).reshape(-1, 1, 1)
    assert torch.equal(out, torch.where((x - m).abs() < t, m, x))
    assert (out != x).any()


def test_strict_inequality_at_the_threshold():
    op = MeanSparse(1, layout="NC", site=SiteInfo(name="s"))
    op.set_statistics(torch.tensor([1.0]), torch.tensor([4.0]))
    op.set_alpha(0.5)  # threshold exactly 1.0
    x = torch.tensor([[2.0], [0.0], [1.5], [0.5000001]])
    assert op(x).flatten().tolist() == [2.0, 0.0, 1.0, 1.0]


def test_gradients_exact_and_straight_through():
    op = make_op(layout="NCHW")
    op.set_alpha(0.6)
    x = (torch.randn(2, 5, 3, 3) * 2).requires_grad_()
    upstream = torch.randn(2, 5, 3, 3)
    y_exact = op(x)
    (g_exact,) = torch.autograd.grad(y_exact, x, upstream)
    op.gradient = "straight_through"
    y_st = op(x)
    (g_st,) = torch.autograd.grad(y_st, x, upstream)
    assert torch.equal(y_exact, y_st)  # forward identical in both modes
    assert torch.equal(g_st, upstream)
    inside = (x.detach() - op.running_mean.reshape(-1, 1, 1)).abs() < (0.6 * op.running_var.sqrt()).reshape(-1, 1, 1)
    assert inside.any() and (~inside).any()
    assert torch.equal(g_exact[inside], torch.zeros_like(g_exact[inside]))
    assert torch.equal(g_exact[~inside], upstream[~inside])


def test_inplace_mode_mutates_input():
    op = make_op(layout="NCHW")
    op.site = replace(op.site, inplace=True)
    op.set_alpha(0.6)
    x = torch.randn(2, 5, 3, 3) * 2
    ref = make_op(layout="NCHW")
    ref.set_alpha(0.6)
    want = ref(x.clone())
    out = op(x)
    assert out is x and torch.equal(x, want)


def test_layout_inferred_from_rank_and_hint():
    assert MeanSparse()(torch.zeros(2, 3)).shape == (2, 3)
    for shape, hint, layout, c in [
        ((2, 3), None, "NC", 3),
        ((2, 3, 7), None, "NLC", 7),
        ((2, 3, 7), "first", "NCL", 3),
        ((2, 3, 4, 5), None, "NCHW", 3),
        ((2, 3, 4, 5), "last", "NHWC", 5),
    ]:
        op = MeanSparse(site=SiteInfo(layout_hint=hint))
        op(torch.zeros(shape))
        assert (op.layout, op.channels) == (layout, c)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_bad_alpha_names_site(bad):
    op = make_op(name="layer3.relu")
    with pytest.raises(ValueError, match="layer3.relu"):
        op.set_alpha(bad)
    assert op.alpha_value == 0.0


def test_uncalibrated_site_with_alpha_raises():
    op = MeanSparse(site=SiteInfo(name="blocks.2.act"))
    op.set_alpha(0.3)
    with pytest.raises(RuntimeError, match="blocks.2.act.*not calibrated"):
        op(torch.randn(2, 4, 3, 3))


def test_channel_mismatch_names_site_and_counts():
    op = make_op(c=5, name="stage.act")
    op.set_alpha(0.3)
    with pytest.raises(ValueError, match=r"stage\.act.*has 4 channels.*expects 5|stage\.act.*4 channels.*5"):
        op(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="statistics have 3 channels but the site has 5"):
        op.set_statistics(torch.zeros(3), torch.ones(3))


def test_invalid_options():
    with pytest.raises(ValueError):
        MeanSparse(centering="median")
    with pytest.raises(ValueError):
        MeanSparse(gradient="bpda")
    with pytest.raises(ValueError):
        MeanSparse(layout="CHW")


def test_state_dict_round_trip_syncs_python_mirrors():
    op = make_op(c=5, layout="NLC")
    op.set_alpha(0.25)
    fresh = MeanSparse(layout="NLC", site=SiteInfo(name="copy"))  # lazy: channels unknown
    fresh.load_state_dict(op.state_dict())
    assert fresh.alpha_value == 0.25 and fresh.calibrated and fresh.channels == 5
    x = torch.randn(2, 3, 5)
    assert torch.equal(fresh(x), op(x))
    sd = op.state_dict()
    sd["alpha"] = torch.tensor(-1.0)
    with pytest.raises(RuntimeError, match="alpha"):
        MeanSparse(layout="NLC").load_state_dict(sd)
    with pytest.raises(RuntimeError, match="checkpoint has 5 channels but the site has 7"):
        MeanSparse(7, layout="NLC", site=SiteInfo(name="x")).load_state_dict(op.state_dict())


def test_half_model_keeps_working():
    op = make_op(layout="NCHW")
    op.set_alpha(0.5)
    op.half()
    x = torch.randn(2, 5, 3, 3, dtype=torch.float16)
    assert op(x).dtype == torch.float16
    assert op.alpha_value == 0.5


def test_torch_compile():
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    op = make_op(layout="NCHW")
    op.set_alpha(0.6)
    x = (torch.randn(2, 5, 3, 3) * 2).requires_grad_()
    up = torch.randn_like(x)
    try:
        compiled = torch.compile(op, backend="aot_eager", fullgraph=True)
        y = compiled(x)
    except Exception as e:  # noqa: BLE001 - a missing backend/compiler is an environment issue
        pytest.skip(f"torch.compile unavailable: {e}")
    assert torch.equal(y, op(x))
    assert torch.equal(torch.autograd.grad(y, x, up)[0], torch.autograd.grad(op(x), x, up)[0])
    op.gradient = "straight_through"
    y2 = compiled(x)
    assert torch.equal(y2, y)
    assert torch.equal(torch.autograd.grad(y2, x, up)[0], up)


def test_global_centering_uses_pooled_statistics():
    op = MeanSparse(2, layout="NC", centering="global", site=SiteInfo(name="g"))
    op.set_statistics(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0]))
    op.set_alpha(1.0)
    # pooled mean 1, pooled var 1 + 1 = 2 -> threshold sqrt(2)
    x = torch.tensor([[2.4, 0.0], [2.5, 3.0]])
    t = math.sqrt(2.0)
    want = [[1.0 if abs(v - 1.0) < t else v for v in row] for row in x.tolist()]
    assert op(x).tolist() == want


# ---------------------------------------------------------------------------------------------- lean operator


def lean_op(c=16, layout="NCHW", seed=0, cls=MeanSparse):
    """A calibrated operator (alpha 0.5) with random statistics; ``cls`` may be a subclass (a fused one)."""
    g = torch.Generator().manual_seed(seed)
    op = cls(c, layout=layout, site=SiteInfo(name="s"))
    op.set_statistics(torch.randn(c, generator=g) * 0.3, torch.rand(c, generator=g) + 0.5, num_samples=10)
    op.set_alpha(0.5)
    return op


def test_centre_threshold_cache_follows_every_change():
    op = lean_op(c=3, layout="NC")
    x = torch.randn(50, 3) * 2

    def fresh():
        m, t = (v.to(x.dtype) for v in op.center_threshold())
        return torch.where((x - m).abs() < t, m, x)

    assert torch.equal(op(x), fresh())
    op.set_alpha(1.5)
    assert torch.equal(op(x), fresh())
    op.set_statistics(torch.tensor([1.0, -1.0, 0.0]), torch.tensor([2.0, 0.5, 1.0]), num_samples=5)
    assert torch.equal(op(x), fresh())
    with torch.no_grad():
        op.running_mean.add_(0.25)  # in-place edit of a buffer
    assert torch.equal(op(x), fresh())
    op.centering = "global"
    assert torch.equal(op(x), fresh())
    op.load_state_dict(lean_op(c=3, layout="NC", seed=5).state_dict())
    assert torch.equal(op(x), fresh())
    op.double()  # new buffer objects
    x = x.double()
    assert torch.equal(op(x), fresh())
    with torch.inference_mode():  # inference tensors have no version counter: computed every call
        assert torch.equal(op(x), fresh())


def test_alpha_zero_returns_the_input_object():
    op = lean_op()
    op.set_alpha(0.0)
    x = torch.randn(2, 16, 3, 3)
    assert op(x) is x


# ------------------------------------------------------------------------------------------- training (issue 24)
def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, var ddof=0) of an NCHW tensor, in float64: the reference."""
    v, m = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    return m.float(), v.float()


def test_train_mode_keeps_frozen_statistics_unless_opted_in():
    op = make_op()
    op.set_alpha(0.5)
    before = (op.running_mean.clone(), op.running_var.clone(), int(op.num_samples))
    x = torch.randn(4, 5, 3, 3) * 3 + 1
    op.eval()
    y_eval = op(x.clone())
    op.train()
    assert torch.equal(op(x.clone()), y_eval)  # a post-training model in train mode is the eval-mode model
    assert torch.equal(op.running_mean, before[0]) and torch.equal(op.running_var, before[1])
    assert int(op.num_samples) == before[2]


@pytest.mark.parametrize("statistics", ["running", "batch"])
def test_learning_operator_filters_the_batch_moments(statistics):
    op = make_op()
    op.learns, op.momentum, op.train_statistics = True, 0.25, statistics
    op.set_alpha(0.5)
    old_m, old_v = op.running_mean.clone(), op.running_var.clone()
    x = torch.randn(4, 5, 3, 3) * 2 + 0.5
    bm, bv = _moments(x)
    op.train()
    y = op(x.clone())
    assert torch.allclose(op.running_mean, 0.75 * old_m + 0.25 * bm, atol=1e-6)
    assert torch.allclose(op.running_var, 0.75 * old_v + 0.25 * bv, atol=1e-6)
    mu, var = (op.running_mean, op.running_var) if statistics == "running" else (bm, bv)
    expected = formula(x.numpy(), mu.numpy(), var.numpy(), 0.5, 1)
    assert np.allclose(y.numpy(), expected, atol=1e-6)
    op.eval()  # eval mode: the running statistics, not updated
    frozen = op.running_mean.clone()
    y_eval = op(x.clone())
    assert torch.equal(op.running_mean, frozen)
    assert np.array_equal(y_eval.numpy(), formula(x.numpy(), op.running_mean.numpy(), op.running_var.numpy(), 0.5, 1))


def test_cumulative_statistics_are_the_pooled_moments():
    op = MeanSparse(5, layout="NCHW")
    op.learns, op.momentum = True, None
    op.train()
    a, b = torch.randn(3, 5, 2, 2) * 2 + 1, torch.randn(5, 5, 2, 2) - 3
    op(a)  # uncalibrated: adopts the first batch's moments
    op(b)
    m, v = _moments(torch.cat([a, b]))
    assert torch.allclose(op.running_mean, m, atol=1e-6) and torch.allclose(op.running_var, v, atol=1e-5)
    assert int(op.num_samples) == 8 * 4 and op.calibrated


def test_learning_at_alpha_zero_is_the_identity_and_still_tracks():
    op = MeanSparse(5, layout="NCHW")
    op.learns = True
    op.train()
    x = torch.randn(2, 5, 3, 3)
    assert op(x) is x
    assert op.calibrated and torch.allclose(op.running_mean, _moments(x)[0], atol=1e-6)


@pytest.mark.parametrize("gradient", ["exact", "straight_through"])
def test_learning_operator_band_gradient(gradient):
    op = make_op()
    op.learns, op.gradient = True, gradient
    op.set_alpha(0.8)
    op.train()
    x = (torch.randn(4, 5, 3, 3) * 2).requires_grad_()
    y = op(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    inside = y.detach() == op.running_mean.reshape(-1, 1, 1)
    assert inside.any() and (~inside).any()
    assert torch.equal(g[~inside], torch.ones_like(g[~inside]))
    assert torch.equal(g[inside], torch.zeros_like(g[inside]) if gradient == "exact" else torch.ones_like(g[inside]))


def test_learn_statistics_is_validated_and_applies_to_every_site():
    import meansparse as ms

    model = ms.prepare(torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Conv2d(3, 2, 1),
                                           torch.nn.ReLU()))
    with pytest.raises(ValueError, match="momentum"):
        ms.learn_statistics(model, momentum=1.5)
    with pytest.raises(ValueError, match="statistics"):
        ms.learn_statistics(model, statistics="ema")
    assert not any(o.learns for o in ms.operators(model))  # nothing changed by a refused call
    ms.learn_statistics(model, momentum=None, statistics="batch")
    assert all(o.learns and o.momentum is None and o.train_statistics == "batch" for o in ms.operators(model))
    with pytest.raises(ValueError, match="learn"):
        ms.fuse(model)
    ms.learn_statistics(model, enabled=False)
    ms.fuse(model)
    with pytest.raises(ValueError, match="unfuse"):
        ms.learn_statistics(model)
