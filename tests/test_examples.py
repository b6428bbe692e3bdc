"""evaluate / search_alpha over a data set instead of tensors (meansparse.evaluation.examples): the same
report, only the batches being worked on fetched, per-batch validation, resume and the streamed data hash."""

from __future__ import annotations

import json

import pytest
import torch
from evaluation_helpers import run
from torch.utils.data import DataLoader, Dataset, TensorDataset

import meansparse as ms
from meansparse.evaluation.examples import DatasetExamples, TensorExamples, as_examples
from meansparse.evaluation.hashing import example_digests, examples_hash

pytest_plugins = ("evaluation_fixtures",)

ATTACKS = ("apgd-ce", "bpda-apgd-ce", "square")
ONE_RUNG = dict(ladder=False, indicators=False)  # the fetch counts below are the runner's alone


class Counting(Dataset):
    """(image, label) by index, counting fetches; optionally corrupting one example."""

    def __init__(self, x, y, bad: int | None = None, value: float = float("nan"), label: int | None = None):
        self.x, self.y, self.bad, self.value, self.label = x, y, bad, value, label
        self.fetched: list[int] = []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.fetched.append(i)
        x = self.x[i].clone()
        y = int(self.y[i])
        if i == self.bad:
            x[0, 0, 0] = self.value
            y = self.label if self.label is not None else y
        return x, y


def strip(report) -> dict:
    d = json.loads(report.to_json())
    d["metadata"].pop("run")
    d["metadata"].pop("data_hash")
    return d


@pytest.mark.parametrize("individual", [True, False])
def test_a_dataset_gives_the_tensor_report(models, test_set, individual):
    _, model = models
    x, y = test_set
    tensors = run(model, x, y, ATTACKS, batch_size=16, individual=individual)
    streamed = run(model, TensorDataset(x, y), None, ATTACKS, batch_size=16, individual=individual)
    assert strip(streamed) == strip(tensors)
    assert streamed.metadata["data_hash"] != tensors.metadata["data_hash"]  # a different (per-example) scheme


def test_workers_and_batch_size_do_not_change_the_streamed_hash(models, test_set):
    _, model = models
    x, y = test_set
    a = run(model, TensorDataset(x, y), None, ("apgd-ce",), batch_size=16, workers=2)
    b = run(model, TensorDataset(x, y), None, ("apgd-ce",), batch_size=25)
    assert a.metadata["data_hash"] == b.metadata["data_hash"]
    assert a.metadata["data_hash"] == examples_hash(example_digests(x, y), x.dtype, tuple(x.shape[1:]))
    assert strip(a) == strip(run(model, x, y, ("apgd-ce",), batch_size=16))


def test_resume_fetches_only_unfinished_batches_and_detects_other_data(models, test_set, tmp_path):
    _, model = models
    x, y = test_set
    state = tmp_path / "state.json"
    data = Counting(x, y)
    stop = {"n": 0}

    def interrupt(attack, batch):
        stop["n"] += 1
        if stop["n"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(model, data, None, ATTACKS, batch_size=16, state_path=state, callback=interrupt, **ONE_RUNG)
    data.fetched.clear()
    resumed = run(model, data, None, ATTACKS, batch_size=16, state_path=state, **ONE_RUNG)
    full = run(model, TensorDataset(x, y), None, ATTACKS, batch_size=16, **ONE_RUNG)
    assert strip(resumed) == strip(full) and resumed.metadata["run"]["resumed_batches"] == 2
    clean_correct = sum(resumed.clean_correct)
    attacked = len(ATTACKS) * clean_correct  # individual mode: every attack sees every clean-correct example
    # the plan's first example + the clean pass + every attacked example except the two stored batches'
    assert len(data.fetched) == 1 + len(x) + attacked - 32
    data.fetched.clear()
    run(model, data, None, ATTACKS, batch_size=16, state_path=state, **ONE_RUNG)  # all stored: no attack batch
    assert len(data.fetched) == 1 + len(x)
    other = x.clone()
    other[5, 0, 3, 3] = 1 - other[5, 0, 3, 3]
    with pytest.raises(ValueError, match="different evaluation .*data_hash"):
        run(model, TensorDataset(other, y), None, ATTACKS, batch_size=16, state_path=state, **ONE_RUNG)
    with pytest.raises(ValueError, match="data_hash"):  # the same examples in another order are other data
        run(model, TensorDataset(x.flip(0), y.flip(0)), None, ATTACKS, batch_size=16, state_path=state, **ONE_RUNG)


@pytest.mark.parametrize("bad, value, label, match", [
    (37, float("nan"), None, "examples 32-47: x contains NaN"),
    (40, 1.5, None, r"examples 32-47: x must lie in \[0, 1\]"),
    (50, 0.5, 10, r"examples 48-59: labels must be in \[0, 9\]"),
])
def test_a_bad_streamed_batch_fails_before_it_counts(models, test_set, tmp_path, bad, value, label, match):
    _, model = models
    x, y = test_set
    state = tmp_path / "s.json"
    with pytest.raises(ValueError, match=match):
        run(model, Counting(x, y, bad, value, label), None, ("apgd-ce",), batch_size=16, state_path=state)
    assert not state.exists()  # failed in the clean pass: the state is opened after it, nothing was stored


def test_sources_and_errors(models, test_set):
    _, model = models
    x, y = test_set
    assert isinstance(as_examples(x, y), TensorExamples)
    source = as_examples(TensorDataset(x, y), workers=1)
    assert isinstance(source, DatasetExamples) and as_examples(source) is source
    assert torch.equal(source.fetch([3, 1])[0], x[[3, 1]]) and len(source.head(7)) == 7
    with pytest.raises(ValueError, match="not a DataLoader"):
        ms.evaluate(model, DataLoader(TensorDataset(x, y)), attacks=["apgd-ce"])
    with pytest.raises(ValueError, match="y is None"):
        ms.evaluate(model, x, attacks=["apgd-ce"])
    with pytest.raises(ValueError, match="ImageSet"):
        ms.evaluate(model, ms.data.load_digits("test"), attacks=["apgd-ce"])
    with pytest.raises(ValueError, match="empty"):
        ms.evaluate(model, TensorDataset(x[:0], y[:0]), attacks=["apgd-ce"])
    with pytest.raises(ValueError, match="workers"):
        ms.evaluate(model, TensorDataset(x, y), attacks=["apgd-ce"], workers=-1)


def test_sanity_checks_run_on_a_dataset(models, test_set):
    _, model = models
    x, y = test_set
    kw = dict(batch_size=30, sanity=["apgd-ce"])
    assert run(model, TensorDataset(x[:30], y[:30]), None, ("apgd-ce",), **kw).sanity == \
        run(model, x[:30], y[:30], ("apgd-ce",), **kw).sanity


def test_search_alpha_on_a_dataset_equals_tensors(models, digits_xy, tmp_path):
    base, model = models
    _, _, xte, yte = digits_xy
    x, y = xte[:48], yte[:48]
    kw = dict(alphas=(0.0, 0.8), n_robust=20, eps=0.2, batch_size=16, progress=False,
              attack_options={"apgd-ce": {"steps": 3}})
    before = {op.name: op.alpha.clone() for op in ms.operators(model)}
    try:
        a = ms.search_alpha(model, x, y, **kw)
        b = ms.search_alpha(model, TensorDataset(x, y), None, workers=1, state_dir=tmp_path, **kw)
    finally:
        ms.set_alpha(model, {name: float(v) for name, v in before.items()})
    assert a.to_json() == b.to_json()
    assert len(list(tmp_path.glob("*.json"))) == 2  # resumable: one state per α


def test_an_attack_writing_into_its_batch_never_reaches_x(models, test_set):
    """Batches are copies (as ``x[idx]`` always was): an attack that scribbles on its input cannot change the
    examples the next attack or the judge sees."""
    from meansparse.evaluation import Attack

    class Scribble(Attack):
        name = "scribble"

        def _run(self, model, x, y, seed):
            x.zero_()
            return x.clone()

    _, model = models
    x, y = test_set
    before = x.clone()
    run(model, x, y, [Scribble(norm="Linf", eps=0.2), "apgd-ce"], batch_size=16)
    assert torch.equal(x, before)


def test_items_must_be_tensors_with_integer_labels(models, test_set):
    import numpy as np

    _, model = models
    x, y = test_set
    source = as_examples([(x[i].numpy(), np.array(int(y[i]))) for i in range(4)])
    assert torch.equal(source.fetch([0, 1])[1], y[:2])  # numpy images and 0-d numpy labels are fine
    with pytest.raises(ValueError, match="CHW tensors.*ToTensor"):
        as_examples([(object(), 1)]).fetch([0])
    with pytest.raises(ValueError, match="one integer"):
        as_examples([(x[0], 1.5)]).fetch([0])


def test_a_named_data_set_names_the_report(models, test_set):
    """A meansparse data set (ImageStream) carries a name; the Python flow's report says which data it ran on,
    as the command line's does."""
    _, model = models
    x, y = test_set
    data = TensorDataset(x[:16], y[:16])
    data.name = "my-images"
    report = run(model, data, None, ("apgd-ce",), batch_size=16)
    assert report.metadata["data"] == {"name": "my-images", "n": 16}
    assert "- data: my-images: 16 images" in report.to_markdown()
    assert "data" not in run(model, x[:16], y[:16], ("apgd-ce",), batch_size=16).metadata
