"""Splitting and batching (with the standard CIFAR augmentation) of in-memory image sets; `loader` batches
streamed data sets through a DataLoader (worker processes decode)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .imageset import ImageSet


def holdout_split(data: ImageSet, n_holdout: int, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Disjoint (train, held-out) parts of a TRAINING split; α is chosen on the held-out part, never on test.

    The held-out part comes in random order (data sets are stored class by class), so any prefix of it is an
    unbiased subset; the fitting part keeps the original order."""
    if not 0 < n_holdout < len(data):
        raise ValueError(f"n_holdout must be in (0, {len(data)}), got {n_holdout}")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    hold, train = perm[:n_holdout], perm[n_holdout:].sort().values
    return data.subset(train, f"{data.name}-fit"), data.subset(hold, f"{data.name}-holdout")


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int | None = None) -> torch.Tensor:
    """Random crop with zero padding (4 px on 32x32, scaled with size) and horizontal flip, per image."""
    n, _, h, w = x.shape
    pad = max(1, h // 8) if pad is None else pad
    padded = F.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, x.shape[1], h, w)
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def batches(data: ImageSet, batch_size: int, shuffle: bool = False, augment: bool = False,
            seed: int = 0, epoch: int = 0, drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (float images in [0, 1], labels); deterministic given (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(data), generator=g) if shuffle else torch.arange(len(data))
    stop = len(data) - (len(data) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        x = data.images[idx]
        if augment:
            x = random_crop_flip(x, g)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        yield x, data.labels[idx]


class Batches:
    """A re-iterable wrapper around `batches` so it can be passed where a DataLoader is expected."""

    def __init__(self, data: ImageSet, batch_size: int, **kwargs) -> None:
        self.data, self.batch_size, self.kwargs = data, batch_size, kwargs

    @property
    def dataset(self) -> ImageSet:
        """The images served (as ``DataLoader.dataset``: progress bars take their total from it)."""
        return self.data

    def __iter__(self):
        return batches(self.data, self.batch_size, **self.kwargs)

    def __len__(self) -> int:
        n, b = len(self.data), self.batch_size
        return n // b if self.kwargs.get("drop_last") else -(-n // b)


def collate(items: Sequence[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``default_collate`` for ``(image, label)`` items, with an error that says what to do when images differ
    in size (an ImageNet-style tree without a preprocessing)."""
    shapes = {tuple(x.shape) for x, _ in items}
    if len(shapes) > 1:
        a, b = sorted(shapes)[:2]
        raise ValueError(f"images in one batch differ in size ({'x'.join(map(str, a))} vs {'x'.join(map(str, b))}): "
                         "pass a preprocessing that fixes the size, e.g. preprocessing='Res256Crop224' "
                         "(--preprocessing Res256Crop224), the one the model was benchmarked with")
    from torch.utils.data import default_collate

    # default_collate stacks straight into shared memory inside a DataLoader worker (torch.stack would
    # allocate on the worker's heap and be copied there: glibc's heap then creeps up over thousands of batches)
    return default_collate([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items], dtype=torch.int64)


def loader(dataset: Any, batch_size: int, workers: int = 0, *, shuffle: bool = False, seed: int = 0,
           drop_last: bool = False, pin_memory: bool = False, prefetch_factor: int = 2,
           persistent_workers: bool = False) -> Any:
    """Batches of ``(float images, int64 labels)`` from a data set of ``(image, label)`` items (a stream,
    any ``torch.utils.data.Dataset``), or from an in-memory :class:`ImageSet`.

    ``workers`` > 0 decodes in that many worker processes, each holding at most ``prefetch_factor`` batches
    ahead, so memory stays at a few batches whatever the data set's size; 0 decodes in this process.  Order
    is the data set's, or a seeded shuffle.  Nothing is pinned unless ``pin_memory``.  An :class:`ImageSet`
    is already decoded: it gets the in-memory :class:`Batches` (same batches as before, ``workers`` unused).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
    if isinstance(dataset, ImageSet):
        return Batches(dataset, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=workers,
                      collate_fn=collate, pin_memory=pin_memory, drop_last=drop_last,
                      prefetch_factor=prefetch_factor if workers else None,
                      persistent_workers=persistent_workers and workers > 0)
