"""Issue #22 (data and inputs) through the real entry point: no silent wrong number on users' own models, data
and files; every user error one line ``meansparse <cmd>: error: ...`` with exit code 2, nothing computed lost.

Tiny checkpoints, tiny image trees in tmp_path, tiny budgets."""

from __future__ import annotations

import pytest
from test_cli_errors import _checkpoint, cli, one_line_error

from meansparse import calibration


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEANSPARSE_CACHE", str(tmp_path / "cache"))


def _interrupt_after(monkeypatch, batches: int) -> None:
    """Ctrl-C while the calibration folds in batch ``batches`` (the ones before it are kept)."""
    real, calls = calibration._check_finite, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == batches + 1:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(calibration, "_check_finite", interrupted)


# ------------------------------------------------------------------ 1. a stale .partial of another model
def test_calibrate_refuses_the_progress_of_another_model(tmp_path, capsys, monkeypatch):
    a, b = _checkpoint(tmp_path / "a", seed=0), _checkpoint(tmp_path / "b", seed=1)
    out = tmp_path / "s.safetensors"
    args = ["calibrate", "--n-examples", 64, "--batch-size", 16, "--no-progress", "--device", "cpu", "--out", out]
    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        assert cli(capsys, *args, "--model", a)[0] == 2
    rc, _, err = cli(capsys, *args, "--model", b)
    one_line_error(rc, err, "calibrate", "s.safetensors.partial", "another model", "remove the file")
    assert not out.exists() and out.with_name("s.safetensors.partial").exists()
    rc, _, err = cli(capsys, *args, "--model", a, "--batch-size", 8)  # other batches: refused as well
    one_line_error(rc, err, "calibrate", "other batch settings")
    assert cli(capsys, *args, "--model", a)[0] == 0  # the command it belongs to resumes it
