"""Calibration: exact pooled statistics, pass-through while observing, restored state, error paths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import meansparse as ms
from meansparse.core import Moments
from meansparse.data import Batches, ImageSet


def captured_reference(model, batches):
    """torch.mean/var over the concatenation of every operator's inputs (captured by pre-hooks)."""
    ops = ms.operators(model)
    feats: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(ops))}
    hooks = [
        op.register_forward_pre_hook(lambda m, a, i=i: feats[i].append(a[0].detach().clone()))
        for i, op in enumerate(ops)
    ]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    out = []
    for i, op in enumerate(ops):
        x = torch.cat(feats[i]).double()
        cd = op.channel_dim(x.ndim)
        dims = [d for d in range(x.ndim) if d != cd]
        out.append((x.mean(dims), x.var(dims, unbiased=False), x.numel() // x.shape[cd]))
    return out


@pytest.mark.parametrize("name", ["resnet18", "vit", "convnext"])
def test_statistics_equal_concatenated_features(name, build_model):
    torch.manual_seed(0)
    sizes = [5, 3, 7, 2]  # unequal batches, short last batch
    batches = [torch.randn(n, 3, 16, 16) * (1 + i) for i, n in enumerate(sizes)]
    model = ms.prepare(build_model(name))
    ms.calibrate(model, [(b, torch.zeros(len(b))) for b in batches], progress=False, check_inputs=False)
    ref = captured_reference(model, batches)
    for op, (mean, var, count) in zip(ms.operators(model), ref, strict=True):
        torch.testing.assert_close(op.running_mean.double(), mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(op.running_var.double(), var, rtol=1e-6, atol=1e-7)
        assert op.calibrated and int(op.num_samples) == count


def test_num_samples_counts_elements_per_channel(build_model, images):
    model = ms.prepare(build_model("convnext"), example_inputs=images)
    ms.calibrate(model, [images, images[:1]], progress=False)
    # 5 images, NHWC 4x4 tokens after the stride-4 stem: 5*16 elements per channel
    assert [int(o.num_samples) for o in ms.operators(model)] == [80, 80]


def test_loader_forms_and_max_batches(build_model):
    torch.manual_seed(0)
    batches = [torch.randn(3, 3, 16, 16) + i for i in range(4)]
    results = []
    for form in (lambda b: b, lambda b: (b, 0), lambda b: [b, 0]):
        model = ms.prepare(build_model("se"))
        ms.calibrate(model, [form(b) for b in batches], max_batches=2, progress=False, check_inputs=False)
        results.append([o.running_mean.clone() for o in ms.operators(model)])
    ref = captured_reference(model, batches[:2])
    for r in results:
        for got, (mean, _, _) in zip(r, ref, strict=True):
            torch.testing.assert_close(got.double(), mean, rtol=1e-6, atol=1e-7)

    class CountingLoader:
        fetched = 0

        def __iter__(self):
            for b in batches:
                CountingLoader.fetched += 1
                yield b

    ms.calibrate(model, CountingLoader(), max_batches=2, progress=False, check_inputs=False)
    assert CountingLoader.fetched == 2  # no extra batch is fetched


def test_operators_do_not_sparsify_while_calibrating(build_model, images):
    model = ms.prepare(build_model("resnet18"), example_inputs=images)
    ms.calibrate(model, [images], progress=False)
    first = [o.running_var.clone() for o in ms.operators(model)]
    ms.set_alpha(model, 5.0)  # would change every later feature if applied
    ms.calibrate(model, [images], progress=False)
    for o, v in zip(ms.operators(model), first, strict=True):
        assert torch.equal(o.running_var, v)
        assert o.alpha_value == 5.0 and not o.observing


def test_restores_modes_and_does_not_touch_batchnorm(build_model, images):
    model = ms.prepare(build_model("preact_wrn"))
    model.train()
    model.blocks[1].eval()  # mixed modes must come back exactly
    bn = model.bn.running_mean.clone()
    ms.calibrate(model, [images], progress=False)
    assert model.training and model.blocks[0].training and not model.blocks[1].training
    assert torch.equal(model.bn.running_mean, bn)  # ran in eval mode


def test_progress_bar_reports_images_per_second(build_model, images, capsys):
    model = ms.prepare(build_model("se"))
    ms.calibrate(model, [images, images], progress=True)
    err = capsys.readouterr().err
    assert "img" in err and "images_per_s" in err


def test_zero_batches_and_bad_arguments(build_model, images):
    model = ms.prepare(build_model("se"))
    with pytest.raises(ValueError, match="no batches"):
        ms.calibrate(model, [], progress=False)
    with pytest.raises(ValueError, match="max_batches"):
        ms.calibrate(model, [images], max_batches=0, progress=False)
    with pytest.raises(ValueError, match="prepare"):
        ms.calibrate(nn.Sequential(nn.ReLU()), [images], progress=False)
    assert not any(o.calibrated or o.observing for o in ms.operators(model))


def test_non_finite_feature_names_site_and_batch(build_model, images):
    model = ms.prepare(build_model("se"), example_inputs=images)
    ms.calibrate(model, [images], progress=False)
    before = [o.running_mean.clone() for o in ms.operators(model)]
    bad = images.clone()
    bad[1, 0, 0, 0] = float("inf")
    model.train()
    with pytest.raises(ValueError, match=r"site 'act1'.*NaN/Inf.*batch 2"):
        ms.calibrate(model, [images, images, bad], progress=False, check_inputs=False)
    assert model.training
    for o, b in zip(ms.operators(model), before, strict=True):
        assert torch.equal(o.running_mean, b) and not o.observing and o.batch_index is None


def test_unreached_site_warns_and_stays_uncalibrated(images):
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.ReLU(), nn.ReLU()

        def forward(self, x):
            return self.a(x)

    model = ms.prepare(Branchy(), method="modules", example_inputs=images)
    with pytest.warns(UserWarning, match="no input"):
        ms.calibrate(model, [images], progress=False)
    assert [o.calibrated for o in ms.operators(model)] == [True, False]


def test_calibrate_accepts_device(build_model, images):
    model = ms.prepare(build_model("se"))
    assert ms.calibrate(model, [images], device="cpu", progress=False) is model
    assert all(o.running_mean.device.type == "cpu" for o in ms.operators(model))


def test_calibration_keeps_batches_exact_and_merges_per_batch(build_model):
    torch.manual_seed(0)
    model = ms.prepare(build_model("vit"))
    batches = [torch.randn(n, 3, 16, 16) * (1 + i) for i, n in enumerate([3, 1, 4])]
    ms.calibrate(model, batches, progress=False, check_inputs=False)
    ref = ms.prepare(build_model("vit"))
    for op in ms.operators(ref):
        op.start_observing()
    feats = {i: [] for i in range(2)}
    hooks = [op.register_forward_pre_hook(lambda m, a, i=i: feats[i].append(a[0])) for i, op in
             enumerate(ms.operators(ref))]
    with torch.no_grad():
        for b in batches:
            ref(b)
    for h in hooks:
        h.remove()
    for i, op in enumerate(ms.operators(model)):
        whole = Moments()
        for f in feats[i]:
            whole.update(f, -1)
        torch.testing.assert_close(op.running_var.double(), whole.var, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------- resuming
def _stats(model):
    return [(op.running_mean.clone(), op.running_var.clone(), int(op.num_samples)) for op in ms.operators(model)]


def _interrupted(batches, at):
    """The batches, then Ctrl-C while batch ``at`` is being fetched."""
    for i, b in enumerate(batches):
        if i == at:
            raise KeyboardInterrupt
        yield b


def test_an_interrupted_calibration_resumes_to_the_same_statistics(build_model, tmp_path):
    torch.manual_seed(0)
    batches = [torch.rand(16, 3, 32, 32) for _ in range(6)]
    reference = ms.calibrate(ms.prepare(build_model("resnet18"), example_inputs=batches[0][:2]), batches,
                             progress=False)
    model = ms.prepare(build_model("resnet18"), example_inputs=batches[0][:2])
    state = tmp_path / "calibration.partial"
    with pytest.raises(KeyboardInterrupt):
        ms.calibrate(model, _interrupted(batches, 4), progress=False, state_path=state, save_every=100)
    assert state.exists() and not any(op.calibrated for op in ms.operators(model))  # progress kept, nothing set
    # a different loader (other order) is refused, and the file kept
    with pytest.raises(ValueError, match="not the batch the interrupted calibration ended with"):
        ms.calibrate(model, batches[:3] + batches[3:5][::-1] + batches[5:], progress=False, state_path=state)
    assert state.exists()
    ms.calibrate(model, batches, progress=False, state_path=state)
    assert not state.exists()  # done: removed
    for (m1, v1, n1), (m2, v2, n2) in zip(_stats(model), _stats(reference), strict=True):
        assert torch.equal(m1, m2) and torch.equal(v1, v2) and n1 == n2


def test_a_bad_batch_keeps_the_batches_before_it(build_model, tmp_path):
    torch.manual_seed(0)
    batches = [torch.rand(16, 3, 32, 32) for _ in range(4)]
    bad = [b.clone() for b in batches]
    bad[2][0, 0, 0, 0] = float("nan")
    model = ms.prepare(build_model("resnet18"), example_inputs=batches[0][:2])
    state = tmp_path / "calibration.partial"
    with pytest.raises(ValueError, match="non-finite|NaN"):
        ms.calibrate(model, bad, progress=False, state_path=state, check_inputs=False)
    reference = ms.calibrate(ms.prepare(build_model("resnet18"), example_inputs=batches[0][:2]), batches,
                             progress=False)
    ms.calibrate(model, batches, progress=False, state_path=state)  # the two good batches are not re-run
    for (m1, v1, n1), (m2, v2, n2) in zip(_stats(model), _stats(reference), strict=True):
        assert torch.equal(m1, m2) and torch.equal(v1, v2) and n1 == n2
    other = ms.prepare(build_model("preact_wrn"), example_inputs=batches[0][:2])
    ms.calibrate(model, bad[:2], progress=False, state_path=state)  # leaves nothing behind on success
    with pytest.raises(KeyboardInterrupt):
        ms.calibrate(model, _interrupted(batches, 2), progress=False, state_path=state)
    with pytest.raises(ValueError, match="other MeanSparse sites"):
        ms.calibrate(other, batches, progress=False, state_path=state)


def test_progress_of_another_model_data_or_batching_is_refused(build_model, tmp_path):
    """Issue #22.1: a progress file resumes only onto the model (weights hash), sites, data and batch settings
    it was measured with; anything else is refused and the file kept (the statistics would be mixed)."""
    torch.manual_seed(0)
    batches = [torch.rand(8, 3, 16, 16) for _ in range(4)]
    state = tmp_path / "calibration.partial"
    model_a = ms.prepare(build_model("resnet18"), example_inputs=batches[0][:2])
    with pytest.raises(KeyboardInterrupt):
        ms.calibrate(model_a, _interrupted(batches, 2), progress=False, state_path=state)
    model_b = ms.prepare(build_model("resnet18"), example_inputs=batches[0][:2])
    with torch.no_grad():
        next(model_b.parameters()).add_(0.01)  # same architecture and sites, other weights
    with pytest.raises(ValueError, match="another model"):
        ms.calibrate(model_b, batches, progress=False, state_path=state)
    other_data = [torch.rand(8, 3, 16, 16) for _ in range(4)]
    with pytest.raises(ValueError, match="batch 0 is not the first batch"):
        ms.calibrate(model_a, other_data, progress=False, state_path=state)
    with pytest.raises(ValueError, match="other batch settings"):
        ms.calibrate(model_a, Batches(ImageSet(torch.zeros(32, 3, 16, 16, dtype=torch.uint8),
                                               torch.zeros(32, dtype=torch.long)), 16),
                     progress=False, state_path=state)
    with pytest.raises(ValueError, match="other batch settings"):
        ms.calibrate(model_a, batches, progress=False, state_path=state, max_batches=3)
    assert state.exists() and not any(op.calibrated for op in ms.operators(model_b))
    ms.calibrate(model_a, batches, progress=False, state_path=state)  # the right call still resumes
    assert not state.exists()
