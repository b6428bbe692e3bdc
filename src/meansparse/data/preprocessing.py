"""RobustBench's test-time preprocessing, by name, on PIL images and without torchvision.

``robustbench.data.PREPROCESSINGS`` maps a name to a torchvision ``Compose`` of ``Resize`` / ``CenterCrop`` /
``ToTensor``; each RobustBench ImageNet model names the one it was benchmarked with (``'preprocessing'`` in
its model-zoo entry; CIFAR models use ``None``, i.e. ``ToTensor`` alone).  :class:`Preprocessing` performs the
same three steps with the same arithmetic (torchvision's output-size rule for ``Resize``, its rounding and
zero padding for ``CenterCrop``, and ``ToTensor``'s ``uint8 -> float / 255``) on Pillow, so a model sees the
very tensors RobustBench feeds it; ``tests/test_preprocessing.py`` checks equality with torchvision's
transforms bit for bit.  Images are converted to RGB first, as torchvision's ``ImageFolder`` loader (which
RobustBench uses) does.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["INTERPOLATIONS", "PREPROCESSINGS", "Preprocessing", "decode_image", "get_preprocessing", "to_tensor"]

#: torchvision's ``InterpolationMode`` values -> Pillow's resampling filters (``pil_modes_mapping``)
INTERPOLATIONS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


@dataclass(frozen=True)
class Preprocessing:
    """Resize, center crop, to tensor: torchvision's ``Resize(resize, interpolation)``, ``CenterCrop(crop)``,
    ``ToTensor()`` on a PIL image.

    ``resize``: an int resizes the *shorter* side to it (aspect ratio kept, the longer side truncated as
    torchvision does), a pair ``(h, w)`` resizes to exactly that size, None skips the step; ``crop``: an int
    or ``(h, w)`` center crop (zero padding where the crop is larger than the image), None skips it.
    Frozen and picklable, so DataLoader workers receive it as is.
    """

    resize: int | tuple[int, int] | None = None
    crop: int | tuple[int, int] | None = None
    interpolation: str = "bilinear"
    name: str | None = None

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; use one of {', '.join(INTERPOLATIONS)}")
        for label, value in (("resize", self.resize), ("crop", self.crop)):
            sizes = [] if value is None else [value] if isinstance(value, int) else list(value)
            if value is not None and (not 1 <= len(sizes) <= 2 or any(not isinstance(s, int) or s < 1 for s in sizes)):
                raise ValueError(f"{label} must be a positive int or an (h, w) pair of them, got {value!r}")
        if isinstance(self.resize, list):
            object.__setattr__(self, "resize", tuple(self.resize))
        if isinstance(self.crop, list):
            object.__setattr__(self, "crop", tuple(self.crop))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the result for an input of that size."""
        if self.resize is not None:
            height, width = _resized_size(height, width, self.resize)
        if self.crop is not None:
            height, width = _pair(self.crop)
        return height, width

    def pil(self, image: Any) -> Any:
        """The resized and cropped PIL image (no tensor conversion)."""
        if self.resize is not None:
            h, w = _resized_size(image.height, image.width, self.resize)
            if (h, w) != (image.height, image.width):  # torchvision returns the image itself then
                image = image.resize((w, h), INTERPOLATIONS[self.interpolation])
        if self.crop is not None:
            image = _center_crop(image, *_pair(self.crop))
        return image

    def __call__(self, image: Any) -> torch.Tensor:
        """Float CHW tensor in [0, 1], as ``transforms.Compose([...])(image)`` gives it."""
        return to_tensor(self.pil(image))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        if self.name is not None or (self.resize is None and self.crop is None):
            return str(self.name)
        return f"resize={self.resize}, crop={self.crop}, {self.interpolation}"


#: The names of ``robustbench.data.PREPROCESSINGS`` (robustbench 1.1.1): None is ``ToTensor`` alone.
PREPROCESSINGS: dict[str | None, Preprocessing] = {
    None: Preprocessing(),
    "Res256Crop224": Preprocessing(256, 224, "bilinear", "Res256Crop224"),
    "Crop288": Preprocessing(None, 288, "bilinear", "Crop288"),
    "Res224": Preprocessing((224, 224), None, "bilinear", "Res224"),
    "BicubicRes256Crop224": Preprocessing(256, 224, "bicubic", "BicubicRes256Crop224"),
}


def get_preprocessing(spec: str | Mapping[str, Any] | Preprocessing | None) -> Preprocessing:
    """A :class:`Preprocessing` from a RobustBench name (``"Res256Crop224"``, ...; None or ``"none"``:
    ``ToTensor`` only), a dict of its fields (what :func:`meansparse.zoo.preprocessing` returns for
    timm-configured models) or an instance."""
    if isinstance(spec, Preprocessing):
        return spec
    if spec is None or (isinstance(spec, str) and spec.lower() == "none"):
        return PREPROCESSINGS[None]
    if isinstance(spec, Mapping):
        fields = dict(spec)
        for key in ("resize", "crop"):
            if isinstance(fields.get(key), list):
                fields[key] = tuple(fields[key])
        return Preprocessing(**fields)
    if isinstance(spec, str) and spec in PREPROCESSINGS:
        return PREPROCESSINGS[spec]
    names = ", ".join(str(k) if k is not None else "none" for k in PREPROCESSINGS)
    raise ValueError(f"unknown preprocessing {spec!r}; use one of RobustBench's: {names}")


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))


def _resized_size(height: int, width: int, size: int | tuple[int, int]) -> tuple[int, int]:
    """torchvision's ``_compute_resized_output_size`` (no ``max_size``): (h, w) after ``Resize(size)``."""
    if not isinstance(size, int) and len(size) == 2:
        return int(size[0]), int(size[1])
    requested = size if isinstance(size, int) else int(size[0])
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = requested, int(requested * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return new_h, new_w


def _center_crop(image: Any, crop_h: int, crop_w: int) -> Any:
    """torchvision's ``center_crop`` on PIL: zero-pad where the crop is larger, then round((size - crop) / 2)."""
    width, height = image.size
    if crop_w > width or crop_h > height:
        from PIL import ImageOps

        left = (crop_w - width) // 2 if crop_w > width else 0
        top = (crop_h - height) // 2 if crop_h > height else 0
        right = (crop_w - width + 1) // 2 if crop_w > width else 0
        bottom = (crop_h - height + 1) // 2 if crop_h > height else 0
        image = ImageOps.expand(image, border=(left, top, right, bottom), fill=0)
        width, height = image.size
        if (crop_w, crop_h) == (width, height):
            return image
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return image.crop((left, top, left + crop_w, top + crop_h))


def to_tensor(image: Any) -> torch.Tensor:
    """``transforms.ToTensor()`` of an 8-bit PIL image: CHW, ``float / 255`` in the default float dtype."""
    array = np.array(image, dtype=np.uint8, copy=True)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().to(torch.get_default_dtype()).div(255)


def decode_image(data: bytes, preprocessing: Preprocessing | None = None) -> torch.Tensor:
    """Encoded image bytes -> RGB -> ``preprocessing`` (default: ``ToTensor`` only) -> float CHW in [0, 1]."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
    return (preprocessing or PREPROCESSINGS[None])(rgb)
