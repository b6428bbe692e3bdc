"""Where an evaluation's examples come from: one small interface, fetched one batch at a time.

The clean pass, the attack batches and the judge ask an :class:`ExampleSource` for the examples of a batch
(a list of indices) and never hold more than that.  Two kinds:

- :class:`TensorExamples`: in-memory ``x, y`` tensors, validated as a whole up front and hashed with
  :func:`~meansparse.evaluation.hashing.data_hash` (what ``evaluate(model, x, y)`` always did);
- :class:`DatasetExamples`: any sized data set returning ``(image, label)`` by index (a
  ``torch.utils.data.Dataset``, a ``meansparse.data`` stream): each batch is decoded when needed, in
  ``workers`` DataLoader processes when asked (the next batches decode while the current one is attacked),
  validated before anything about it is counted ([0, 1], no NaN, one image shape, labels in range), and
  hashed example by example during the clean pass (:func:`~meansparse.evaluation.hashing.examples_hash`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .hashing import data_hash
from .validation import check_tensors

__all__ = ["DatasetExamples", "ExampleSource", "TensorExamples", "as_examples", "chunk_indices"]


def chunk_indices(n: int, batch_size: int) -> list[list[int]]:
    """``[[0..b-1], [b..2b-1], ...]``: the batches of a pass over ``n`` examples in order."""
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


class ExampleSource:
    """Sized examples fetched by index.  ``batches(chunks)`` yields ``(x, y)`` CPU tensors for each list of
    indices in order (validated); ``data_hash()`` is the hash known without a pass (None: the clean pass
    computes it from :func:`example_digests`)."""

    #: set by the evaluation once the model's number of classes is known; streamed batches are checked against it
    n_classes: int | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def fetch(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples ``idx`` as one validated batch."""
        raise NotImplementedError

    def batches(self, chunks: Iterable[Sequence[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One validated ``(x, y)`` batch per list of indices, in order (a generator: ``close()`` it)."""
        for idx in chunks:
            yield self.fetch(idx)

    def first(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fetch([0])

    def head(self, n: int) -> ExampleSource:
        raise NotImplementedError

    def known_labels(self) -> torch.Tensor | None:
        """All labels when they are known without decoding images (checked up front), else None."""
        return None

    def data_hash(self) -> str | None:
        return None


class TensorExamples(ExampleSource):
    """In-memory CPU tensors (already validated by :func:`check_tensors`)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def fetch(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ii = torch.tensor(list(idx), dtype=torch.long)
        return self.x[ii], self.y[ii]  # copies, never views: nothing an attack does to its batch reaches x

    def head(self, n: int) -> TensorExamples:
        return TensorExamples(self.x[:n], self.y[:n])

    def known_labels(self) -> torch.Tensor:
        return self.y

    def data_hash(self) -> str:
        return data_hash(self.x, self.y)


def _label(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point():
            raise ValueError(f"a label must be one integer, got {value!r}")
        return int(value.item())
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "iu":
        return int(value.reshape(()))
    if isinstance(value, (bool, float)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"a label must be one integer, got {value!r}")
    return int(value)


def collate_examples(items: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image, label)`` items -> one ``(x, y)`` batch; images of different sizes are a clear error."""
    xs, ys = [], []
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise ValueError(f"the data set must return (image, label) pairs, got {type(item).__name__}")
        if not isinstance(item[0], (torch.Tensor, np.ndarray)):
            raise ValueError(f"images must be CHW tensors in [0, 1], got {type(item[0]).__name__}: give the data set "
                             "a transform to tensors (meansparse.data streams do this; torchvision: ToTensor())")
        xs.append(torch.as_tensor(item[0]))
        ys.append(_label(item[1]))
    shapes = sorted({tuple(x.shape) for x in xs})
    if len(shapes) > 1:
        raise ValueError(f"images differ in size ({shapes[0]} vs {shapes[1]}): give the data set a preprocessing "
                         "that fixes the size (e.g. RobustBench's 'Res256Crop224')")
    from torch.utils.data import default_collate

    return default_collate(xs), torch.tensor(ys, dtype=torch.int64)  # in a worker: straight into shared memory


class DatasetExamples(ExampleSource):
    """A sized data set of ``(image, label)`` by index, decoded batch by batch (``workers`` processes)."""

    def __init__(self, dataset: Any, workers: int = 0, labels: torch.Tensor | None = None) -> None:
        if not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
        self.dataset, self.workers = dataset, workers
        if labels is None:
            known = getattr(dataset, "labels", None)
            if isinstance(known, torch.Tensor) and known.ndim == 1 and len(known) == len(dataset):
                labels = known
        self._labels = labels
        self.shape: tuple[int, ...] | None = None  # per-example image shape, fixed by the first batch
        self.dtype: torch.dtype | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def _check(self, x: torch.Tensor, y: torch.Tensor, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        where = f"examples {idx[0]}-{idx[-1]}: " if len(idx) > 1 else f"example {idx[0]}: "
        x, y = check_tensors(x, y, where)
        if self.shape is None:
            self.shape, self.dtype = tuple(x.shape[1:]), x.dtype
        elif tuple(x.shape[1:]) != self.shape or x.dtype != self.dtype:
            raise ValueError(f"{where}images are {tuple(x.shape[1:])} {x.dtype}, earlier ones {self.shape} "
                             f"{self.dtype}: every example must have the same shape and dtype")
        if self.n_classes is not None and (int(y.min()) < 0 or int(y.max()) >= self.n_classes):
            raise ValueError(f"{where}labels must be in [0, {self.n_classes - 1}] (the model has {self.n_classes} "
                             f"outputs); got labels in [{int(y.min())}, {int(y.max())}]")
        return x, y

    def fetch(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = list(idx)
        x, y = collate_examples([self.dataset[i] for i in idx])
        return self._check(x, y, idx)

    def batches(self, chunks: Iterable[Sequence[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        chunks = [list(c) for c in chunks]
        if self.workers == 0 or not chunks:
            yield from super().batches(chunks)
            return
        from torch.utils.data import DataLoader

        loader = DataLoader(self.dataset, batch_sampler=chunks, num_workers=self.workers,
                            collate_fn=collate_examples, prefetch_factor=2)
        for idx, (x, y) in zip(chunks, loader):
            yield self._check(x, y, idx)

    def head(self, n: int) -> DatasetExamples:
        from torch.utils.data import Subset

        n = min(n, len(self))
        head = DatasetExamples(Subset(self.dataset, range(n)), self.workers,
                               self._labels[:n] if self._labels is not None else None)
        head.n_classes = self.n_classes
        return head

    def known_labels(self) -> torch.Tensor | None:
        return self._labels


def as_examples(x: Any, y: Any = None, workers: int = 0) -> ExampleSource:
    """The :class:`ExampleSource` of ``evaluate``'s ``x, y``: tensors (validated now), a data set of
    ``(image, label)`` with ``y`` None, or an ``ExampleSource`` as is."""
    if isinstance(x, ExampleSource):
        if y is not None:
            raise ValueError("y must be None when x is an ExampleSource (it holds the labels)")
        return x
    from torch.utils.data import DataLoader

    if isinstance(x, DataLoader):
        raise ValueError("pass the data set (loader.dataset), not a DataLoader: the evaluation fetches its "
                         "examples by index, batch by batch (workers=N decodes in worker processes)")
    if y is None:
        if isinstance(x, (torch.Tensor, np.ndarray)):
            raise ValueError("y is None: pass the labels with the image tensor, or a data set of (image, label)")
        if hasattr(x, "images") and hasattr(x, "labels") and not hasattr(x, "__getitem__"):
            raise ValueError("an in-memory ImageSet: pass data.float(), data.labels")
        if not (hasattr(x, "__getitem__") and hasattr(x, "__len__")):
            raise ValueError(f"x must be an image tensor or a sized data set of (image, label), got {type(x).__name__}")
        if len(x) == 0:
            raise ValueError("the data set is empty")
        return DatasetExamples(x, workers)
    return TensorExamples(*check_tensors(x, y))
