"""Shared fixtures of the evaluation tests (loaded with ``pytest_plugins``): a tiny digits CNN trained here,
with MeanSparse on its pixels at alpha 0.8 so that plain gradient attacks are masked (see ``evaluation_helpers``).
"""

from __future__ import annotations

import pytest
import torch
from evaluation_helpers import fgsm_rs_train, net, run

import meansparse as ms


@pytest.fixture(scope="session")
def digits_xy():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    return x[:1400], y[:1400], x[1400:], y[1400:]


@pytest.fixture(scope="session")
def models(digits_xy):
    """(base model, prepared model with alpha 0.8 on the pixel site); shared parameters."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead, and the box may be busy
    torch.manual_seed(0)
    xtr, ytr, _, _ = digits_xy
    base = net()
    fgsm_rs_train(base, xtr, ytr)
    model = ms.prepare(base).eval()
    ms.calibrate(model, [(xtr[i:i + 200], ytr[i:i + 200]) for i in range(0, len(xtr), 200)], progress=False)
    ms.set_alpha(model, {0: 0.8})
    yield base, model
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def test_set(digits_xy):
    _, _, xte, yte = digits_xy
    return xte[:60], yte[:60]


@pytest.fixture(scope="session")
def masked_report(models, test_set):
    """Individual-mode report of the masked model under APGD-CE and three masking-proof attacks."""
    _, model = models
    return run(model, *test_set, ("apgd-ce", "bpda-apgd-ce", "transfer", "square"), batch_size=32)
