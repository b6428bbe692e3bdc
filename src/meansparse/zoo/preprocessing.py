"""The test-time preprocessing RobustBench uses for one of its models, as a spec ``meansparse.data`` reads."""

from __future__ import annotations

from typing import Any

from .imports import import_robustbench

__all__ = ["preprocessing"]


def _describe(compose: Any) -> dict[str, Any]:
    """A torchvision ``Compose`` of ``Resize`` / ``CenterCrop`` / ``ToTensor`` as ``Preprocessing`` fields."""
    spec: dict[str, Any] = {"resize": None, "crop": None, "interpolation": "bilinear"}
    for t in getattr(compose, "transforms", [compose]):
        kind = type(t).__name__
        if kind == "Resize" and getattr(t, "max_size", None) is None:
            spec["resize"] = t.size if isinstance(t.size, int) else list(t.size)
            spec["interpolation"] = t.interpolation.value
        elif kind == "CenterCrop":
            spec["crop"] = list(t.size)
        elif kind != "ToTensor":
            raise ValueError(f"unsupported step in RobustBench's preprocessing: {t!r}")
    return spec


def preprocessing(name: str, dataset: str = "cifar10", threat_model: str = "Linf") -> str | dict[str, Any] | None:
    """RobustBench's own preprocessing choice for model ``name`` (``robustbench.data.get_preprocessing``):
    ``None`` (``ToTensor`` only) for CIFAR models, the model-zoo entry's name for ImageNet ones
    (``"Res256Crop224"``, ``"BicubicRes256Crop224"``, ``"Crop288"``, ``"Res224"``), or, for the models
    RobustBench sizes from their timm config, a dict of :class:`meansparse.data.Preprocessing` fields.
    Pass the result to ``meansparse.data.open_stream(..., preprocessing=...)``."""
    import_robustbench()
    from robustbench.data import PREPROCESSINGS, get_preprocessing
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    try:
        ds, tm = BenchmarkDataset(dataset), ThreatModel(threat_model)
    except ValueError as e:
        raise ValueError(f"unknown RobustBench dataset / threat model {dataset!r} / {threat_model!r}: {e}") from None
    zoo = model_dicts[ds].get(ThreatModel(tm.value.replace("_3d", "")), {})
    if ds == BenchmarkDataset.imagenet and name not in zoo:
        raise KeyError(f"{name!r} is not a robustbench {dataset} {threat_model} model")
    compose = get_preprocessing(ds, tm, name, None)
    for key, value in PREPROCESSINGS.items():
        if value is compose:
            return key
    return _describe(compose)
