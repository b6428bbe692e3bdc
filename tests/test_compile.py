"""Compilation with a fallback (:mod:`meansparse._compile`): a failing compiler switches to the same eager
functions once, and the environment variable turns compilation off."""

from __future__ import annotations

import logging

import torch

from meansparse import SiteInfo, _compile
from meansparse.accel import FusedMeanSparse, kernels
from meansparse.placement.registry import ActivationSpec


def make_op(c=16):
    g = torch.Generator().manual_seed(0)
    op = FusedMeanSparse(c, layout="NCHW", site=SiteInfo(name="s"))
    op.set_statistics(torch.randn(c, generator=g) * 0.3, torch.rand(c, generator=g) + 0.5, num_samples=10)
    op.set_alpha(0.5)
    return op


def run(op, x, spec, mode, up=None):
    """(output, input gradient, upstream gradient) of ``op`` with ``spec`` fused, or eagerly when spec is None."""
    op.gradient = mode
    xr = x.clone().requires_grad_()
    y = op(xr, activation=spec) if spec is not None else torch.relu(op(xr))
    up = torch.linspace(-1, 1, y.numel()).reshape(y.shape) if up is None else up
    (g,) = torch.autograd.grad(y, xr, up)
    return y.detach(), g, up


def test_compile_failure_falls_back_once_with_a_debug_log(monkeypatch, caplog):
    previous = _compile.compile_disabled_reason()
    _compile.forget_failure()

    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    op = make_op()
    x = torch.randn(8, 16, 16, 16)
    spec = ActivationSpec("relu", (), False)
    try:
        with kernels.separate_cache(), caplog.at_level(logging.DEBUG, logger=_compile.log.name):
            y, g, up = run(op, x, None, "exact")
            fy, fg, _ = run(op, x, spec, "exact", up)
            run(op, x, spec, "straight_through", up)
        assert torch.equal(fy, y) and torch.equal(fg, g)
        assert "no C++ compiler" in _compile.compile_disabled_reason() and not _compile.compile_enabled()
        assert len([r for r in caplog.records if r.name == _compile.log.name]) == 1
    finally:
        _compile.forget_failure()
        if previous is not None:
            _compile.disable_compile(previous)


def test_env_var_disables_compilation(monkeypatch):
    monkeypatch.setenv(_compile.ENV_VAR, "0")
    assert not _compile.compile_enabled()
    monkeypatch.setenv(_compile.ENV_VAR, "1")
    assert _compile.compile_enabled() == (_compile.compile_disabled_reason() is None)
