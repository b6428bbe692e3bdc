"""Exactness of the streaming, mergeable moment accumulator."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from meansparse import MeanSparse, SiteInfo
from meansparse._compile import compile_disabled_reason, compile_enabled
from meansparse.core import Moments
from meansparse.core.moments import compiled_kernels


def reference(x: torch.Tensor, cd: int):
    dims = [d for d in range(x.ndim) if d != cd]
    xd = x.double()
    return xd.mean(dims), xd.var(dims, unbiased=False)


def test_unequal_batches_equal_single_pass():
    torch.manual_seed(0)
    sizes = [5, 3, 8, 1, 2]  # unequal, short last batch
    batches = [torch.randn(n, 4, 3, 3) * (i + 1) + i for i, n in enumerate(sizes)]
    acc = Moments()
    for b in batches:
        acc.update(b, channel_dim=1)
    mean, var = reference(torch.cat(batches), 1)
    torch.testing.assert_close(acc.mean, mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(acc.var, var, rtol=1e-12, atol=0)
    assert acc.count.tolist() == [sum(sizes) * 9] * 4


@pytest.mark.parametrize("cd,shape", [(1, (6, 3, 2, 2)), (-1, (6, 5, 3)), (3, (2, 2, 2, 4)), (1, (9, 3))])
def test_channel_dim(cd, shape):
    x = torch.randn(shape, dtype=torch.float32) + 3
    acc = Moments().update(x, channel_dim=cd)
    mean, var = reference(x, cd % x.ndim)
    torch.testing.assert_close(acc.mean, mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(acc.var, var, rtol=1e-12, atol=1e-14)


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 7), min_size=2, max_size=6),
    split=st.integers(1, 5),
    shift=st.floats(-1e3, 1e3, allow_nan=False),
    seed=st.integers(0, 2**16),
)
def test_merge_of_partials_equals_single_pass(sizes, split, shift, seed):
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(n, 3, 2, generator=g) * (1 + i) + shift for i, n in enumerate(sizes)]
    split = min(split, len(batches) - 1)
    a, b, whole = Moments(), Moments(), Moments()
    for x in batches[:split]:
        a.update(x, 1)
    for x in batches[split:]:
        b.update(x, 1)
    for x in batches:
        whole.update(x, 1)
    merged = a.copy().merge(b)
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(merged.var, whole.var, rtol=1e-8, atol=1e-9)
    assert torch.equal(merged.count, whole.count)
    mean, var = reference(torch.cat(batches), 1)
    torch.testing.assert_close(merged.var, var, rtol=1e-8, atol=1e-9)


def test_reference_average_of_batch_variances_is_biased():
    """The reference code averages per-batch variances: wrong when batch means differ (e.g. sorted data)."""
    batches = [torch.full((8, 1), 0.0) + torch.randn(8, 1) * 0.1, torch.full((2, 1), 10.0)]
    naive = torch.stack([b.double().var(0, unbiased=False) for b in batches]).mean(0)
    acc = Moments()
    for b in batches:
        acc.update(b, 1)
    _, true_var = reference(torch.cat(batches), 1)
    assert abs(float(naive[0]) - float(true_var[0])) > 10  # ~0.005 vs ~16: off by orders of magnitude
    torch.testing.assert_close(acc.var, true_var, rtol=1e-12, atol=0)


def test_pooled_is_exact():
    x = torch.randn(7, 3, 4) * torch.tensor([1.0, 2.0, 5.0]).reshape(1, 3, 1) + torch.tensor([0.0, 3.0, -2.0]).reshape(
        1, 3, 1
    )
    p = Moments().update(x, 1).pooled()
    assert p.channels == 1
    torch.testing.assert_close(p.mean, x.double().mean().reshape(1), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(p.var, x.double().var(unbiased=False).reshape(1), rtol=1e-12, atol=0)


def test_merge_edge_cases():
    x = torch.randn(4, 3)
    a = Moments().update(x, 1)
    empty = Moments()
    assert torch.equal(a.copy().merge(empty).mean, a.mean)
    assert torch.equal(empty.merge(a).var, a.var)
    zeros = Moments(3)
    torch.testing.assert_close(zeros.merge(a).var, a.var, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="3 and 2 channels"):
        a.merge(Moments().update(torch.randn(4, 2), 1))
    with pytest.raises(RuntimeError, match="empty"):
        Moments().mean  # noqa: B018


def test_all_reduce_without_process_group_is_noop():
    a = Moments().update(torch.randn(5, 3), 1)
    before = a.mean.clone()
    assert a.all_reduce() is a and torch.equal(a.mean, before)


def test_all_reduce_folds_ranks_with_the_same_merge(monkeypatch):
    """Simulate 2 ranks: rank 0 holds the first batches, the fake peer the rest."""
    torch.manual_seed(0)
    batches = [torch.randn(n, 3) + i for i, n in enumerate([4, 6, 3])]
    mine, peer, whole = Moments(), Moments(), Moments()
    mine.update(batches[0], 1)
    for b in batches[1:]:
        peer.update(b, 1)
    for b in batches:
        whole.update(b, 1)
    peer_payload = [torch.tensor([3]), torch.stack([peer.count, peer.mean, peer.m2])]

    def fake_all_gather(out, t, group=None):
        out[0].copy_(t)
        out[1].copy_(peer_payload.pop(0))

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "all_gather", fake_all_gather)
    mine.all_reduce()
    torch.testing.assert_close(mine.mean, whole.mean, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(mine.var, whole.var, rtol=1e-14, atol=1e-15)


# ---------------------------------------------------------------------------------------------- fast statistics


@pytest.mark.parametrize("shape,cd", [((6, 5, 7, 3), 1), ((4, 9, 5), 2), ((300, 4), 1), ((3, 6, 2, 4), 3),
                                      ((2, 3, 1, 1), 1), ((1, 4, 257), 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_fast_batch_stats_match_the_float64_reference(shape, cd, dtype):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 2 + 30).to(dtype)  # |mean| = 15 sigma: a naive sum of squares would fail
    fast, exact = Moments.batch_stats_fast(x, cd), Moments.batch_stats(x, cd)
    assert torch.equal(fast.count, exact.count)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(fast.mean, exact.mean, rtol=tol, atol=0)
    torch.testing.assert_close(fast.var, exact.var, rtol=tol * 10, atol=0)


def test_fast_batch_stats_compiled_path_and_chunks(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(16, 8, 16, 16) * 3 - 40
    exact = Moments.batch_stats(x, 1)
    monkeypatch.setattr("meansparse.core.moments.CHUNK_ELEMENTS", 1000)  # eager: many chunks
    for fast in (Moments.batch_stats_fast(x, 1), Moments.batch_stats_fast(x.permute(0, 2, 3, 1), 3)):
        torch.testing.assert_close(fast.mean, exact.mean, rtol=1e-9, atol=0)
        torch.testing.assert_close(fast.var, exact.var, rtol=1e-6, atol=0)
    if compile_enabled():
        fast = Moments.batch_stats_fast(x, 1)
        assert compiled_kernels()["first"]
        torch.testing.assert_close(fast.mean, exact.mean, rtol=1e-9, atol=0)
        torch.testing.assert_close(fast.var, exact.var, rtol=1e-6, atol=0)


def test_fused_moments_update_matches_the_reference_and_flags_non_finite():
    """``Moments.update_fast`` (batch moments + Chan merge + finiteness in one compiled call) equals the
    float64 reference over several batches of different sizes, and its flag catches NaN/Inf."""
    if not compile_enabled():
        pytest.skip(f"torch.compile unavailable here ({compile_disabled_reason()})")
    torch.manual_seed(0)
    batches = [torch.randn(n, 8, 16, 16) * (1 + i) - 20 for i, n in enumerate([16, 17, 40])]
    acc, ref = Moments(), Moments()
    for b in batches:
        acc.update_fast(b, 1)
        ref.update(b, 1)
        assert acc.finite is not None and bool(acc.finite)
    assert compiled_kernels()["update_first"]
    assert acc.total == ref.total == sum(b.numel() // 8 for b in batches)
    torch.testing.assert_close(acc.mean, ref.mean, rtol=1e-9, atol=0)
    torch.testing.assert_close(acc.var, ref.var, rtol=1e-6, atol=0)
    bad = batches[0].clone()
    bad[2, 5, 3, 3] = float("inf")
    acc.update_fast(bad, 1)
    assert not bool(acc.finite)
    op = MeanSparse(8, layout="NCHW", site=SiteInfo(name="s"))
    op.start_observing()
    op(bad)
    assert not bool(op.observer_finite())
