"""RobustBench's preprocessing re-implemented on Pillow (meansparse.data.preprocessing) gives exactly the
tensors of robustbench.data.PREPROCESSINGS (torchvision transforms, imported through the shim)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from meansparse.data import PREPROCESSINGS, Preprocessing, decode_image, get_preprocessing

# odd sizes, portrait and landscape, already at the target size, smaller than the crop (zero padding)
SIZES = [(500, 375), (375, 500), (257, 1000), (224, 224), (256, 300), (300, 200), (32, 32), (287, 290), (33, 17)]


@pytest.fixture(scope="module")
def robustbench_preprocessings():
    from meansparse.zoo import import_robustbench

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import_robustbench()
        except ImportError as e:  # pragma: no cover - the [zoo] extra is installed in development
            pytest.skip(str(e))
        from robustbench.data import PREPROCESSINGS as reference
    return reference


def _image(rng, size, mode="RGB"):
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    return im.convert(mode)


@pytest.mark.parametrize("name", list(PREPROCESSINGS))
def test_equals_robustbench_bit_for_bit(robustbench_preprocessings, name):
    rng = np.random.default_rng(0)
    ours, theirs = get_preprocessing(name), robustbench_preprocessings[name]
    for size in SIZES:
        im = _image(rng, size)
        a, b = ours(im), theirs(im)
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), (name, size)
        assert ours.output_size(size[1], size[0]) == tuple(a.shape[1:])


def test_a_timm_style_spec_equals_torchvision(robustbench_preprocessings):
    """The dict form (what ms.zoo.preprocessing returns for RobustBench's timm-configured models)."""
    from meansparse.zoo.torchvision_shim import import_torchvision

    import_torchvision()
    from torchvision import transforms as T

    spec = {"resize": 248, "crop": [224, 224], "interpolation": "bicubic"}
    theirs = T.Compose([T.Resize(248, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor()])
    rng = np.random.default_rng(1)
    for size in SIZES[:5]:
        im = _image(rng, size)
        assert torch.equal(get_preprocessing(spec)(im), theirs(im))


def test_decode_converts_to_rgb_as_robustbench_loader_does():
    """Grey, palette and RGBA files become RGB (torchvision's pil_loader: ``convert('RGB')``) before resizing."""
    rng = np.random.default_rng(2)
    for mode, fmt in (("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("RGB", "JPEG")):
        im = _image(rng, (40, 30), mode)
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        with Image.open(io.BytesIO(buf.getvalue())) as reread:
            expected = get_preprocessing("Res224")(reread.convert("RGB"))
        got = decode_image(buf.getvalue(), get_preprocessing("Res224"))
        assert got.shape == (3, 224, 224) and torch.equal(got, expected)


def test_specs_and_errors():
    assert get_preprocessing(None) is get_preprocessing("none") is PREPROCESSINGS[None]
    assert str(get_preprocessing("BicubicRes256Crop224")) == "BicubicRes256Crop224"
    custom = get_preprocessing({"resize": [8, 6], "crop": None})
    assert custom == Preprocessing((8, 6)) and custom.output_size(100, 50) == (8, 6)
    with pytest.raises(ValueError, match="unknown preprocessing 'Res999'.*BicubicRes256Crop224"):
        get_preprocessing("Res999")
    with pytest.raises(ValueError, match="interpolation"):
        Preprocessing(256, interpolation="cubic-ish")
    with pytest.raises(ValueError, match="resize must be"):
        Preprocessing(0)


def test_zoo_names_each_models_own_preprocessing(robustbench_preprocessings):
    import meansparse as ms

    assert ms.zoo.preprocessing("Wang2023Better_WRN-70-16", "cifar10") is None
    assert ms.zoo.preprocessing("Liu2023Comprehensive_Swin-L", "imagenet") == "BicubicRes256Crop224"
    assert ms.zoo.preprocessing("Salman2020Do_R50", "imagenet") == "Res256Crop224"
    assert ms.zoo.preprocessing("Wong2020Fast", "imagenet") == "Crop288"
    with pytest.raises(KeyError, match="not a robustbench imagenet"):
        ms.zoo.preprocessing("NoSuchModel", "imagenet")
