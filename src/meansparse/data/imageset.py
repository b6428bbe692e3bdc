"""The one in-memory container every loader returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageSet:
    """uint8 images (N, C, H, W) and int64 labels; `float()` gives the [0, 1] view models expect."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str] = field(default_factory=list)
    name: str = ""

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"{self.name or 'ImageSet'}: images must be (N, C, H, W), got {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(
                f"{self.name or 'ImageSet'}: {len(self.images)} images but {len(self.labels)} labels"
            )
        self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else int(self.labels.max()) + 1

    def float(self) -> torch.Tensor:
        """Images as float32 in [0, 1]."""
        if self.images.dtype == torch.uint8:
            return self.images.float().div_(255.0)
        return self.images.float()

    def subset(self, index: torch.Tensor | slice, name: str | None = None) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], list(self.classes), name or self.name)

    def head(self, n: int | None) -> ImageSet:
        """The first n examples (all if n is None). Data sets are stored class by class: for an evaluation
        subset use `sample`, or a split whose order is already random (`holdout_split`'s held-out part)."""
        _check_count(n)
        return self if n is None or n >= len(self) else self.subset(slice(0, n))

    def sample_indices(self, n: int | None, seed: int = 0) -> torch.Tensor:
        """The indices :meth:`sample` takes, in its order."""
        _check_count(n)
        n = len(self) if n is None else min(n, len(self))
        return torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]

    def sample(self, n: int | None, seed: int = 0) -> ImageSet:
        """n examples drawn uniformly without replacement (seeded), in random order, so any prefix of the
        result is an unbiased subset too; all examples (shuffled) if n is None or >= len."""
        perm = self.sample_indices(n, seed)
        return self.subset(perm, f"{self.name}-sample{len(perm)}")


def _check_count(n: int | None) -> None:
    """A number of examples is None (all) or a positive integer: a negative one never means "all but n"."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"the number of examples must be a positive integer (or None for all), got {n!r}")
