"""Adversarial examples out: the per-example worst-case adversarial images of an evaluation, on disk.

While an evaluation runs, every valid candidate that breaks an example is kept per (attack, batch) in an
:class:`AdversarialStore` (a folder of safetensors files next to the resumable state, or memory), so a resumed
run has them too.  At the end :func:`write_adversarial` writes

* ``adversarial.pt``: one float tensor of the evaluated set's size ``[n, C, H, W]``, the format RobustBench's
  external-evaluation template asks for: the adversarial image where an attack broke the example, the clean
  image elsewhere (a plain tensor: ``torch.load(..., weights_only=True)`` reads it);
* ``adversarial.json``: for every example its index in the data the caller passed (``indices``), the attack
  that broke it first in attack order (``null`` if none), clean correctness, and the report's worst case.

Judging ``adversarial.pt`` again with the same model reproduces the report's worst-case accuracy: an example
counts as robust only if the image stored for it is classified correctly (:func:`rejudge`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._utils import atomic_path, writing

__all__ = ["AdversarialStore", "AdversarialSet", "worst_case_images", "write_adversarial", "load_adversarial",
           "rejudge"]

TENSOR_FILE = "adversarial.pt"
INDEX_FILE = "adversarial.json"


class AdversarialStore:
    """Breaking candidates per (attack, batch): ``indices`` (examples) and ``x`` (their adversarial images).

    With a folder every batch is one safetensors file written atomically (resumable); without one they stay in
    memory."""

    def __init__(self, folder: str | os.PathLike | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self._memory: dict[tuple[str, int], tuple[list[int], torch.Tensor]] = {}
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, attack: str, batch: int) -> Path:
        assert self.folder is not None
        return self.folder / f"{attack}.{batch}.safetensors"

    def put(self, attack: str, batch: int, indices: list[int], x: torch.Tensor) -> None:
        x = x.detach().cpu().contiguous()
        if self.folder is None:
            self._memory[(attack, batch)] = (list(indices), x)
            return
        path = self._path(attack, batch)
        with atomic_path(path) as tmp:  # a kill mid-write leaves no half file
            save_file({"x": x, "indices": torch.tensor(indices, dtype=torch.int64)}, str(tmp))

    def has(self, attack: str, batch: int) -> bool:
        return (attack, batch) in self._memory if self.folder is None else self._path(attack, batch).exists()

    def items(self, attack: str) -> list[tuple[list[int], torch.Tensor]]:
        """Every stored batch of ``attack`` (any order)."""
        if self.folder is None:
            return [v for (a, _), v in self._memory.items() if a == attack]
        out = []
        for path in sorted(self.folder.glob(f"{attack}.*.safetensors")):
            if path.name.removeprefix(f"{attack}.").removesuffix(".safetensors").isdigit():
                data = load_file(str(path))
                out.append((data["indices"].tolist(), data["x"]))
        return out

    def get(self, attack: str, batch: int) -> tuple[list[int], torch.Tensor] | None:
        if self.folder is None:
            return self._memory.get((attack, batch))
        path = self._path(attack, batch)
        if not path.exists():
            return None
        data = load_file(str(path))
        return data["indices"].tolist(), data["x"]


class AdversarialSet(NamedTuple):
    """The written examples: images ``[n, C, H, W]``, their indices, and per example the breaking attack."""

    x: torch.Tensor
    indices: list[int]
    attacks: list[str | None]
    clean_correct: list[bool]
    worst_case_robust: list[bool]


def worst_case_images(store: AdversarialStore, attacks: list[str], masks: dict[str, torch.Tensor]
                      ) -> dict[int, tuple[str, torch.Tensor]]:
    """Per broken example, the first attack (in evaluation order) that broke it and its image; only
    candidates the masks count as breaks are used."""
    broken: dict[int, tuple[str, torch.Tensor]] = {}
    for attack in attacks:
        mask = masks[attack]
        for indices, x in store.items(attack):
            for j, i in enumerate(indices):
                if i not in broken and int(mask[i]) == 0:
                    broken[i] = (attack, x[j])
    return broken


def write_adversarial(folder: str | os.PathLike, x: torch.Tensor, broken: dict[int, tuple[str, torch.Tensor]],
                      indices: list[int], clean_correct: list[bool], worst_case_robust: list[bool],
                      meta: dict) -> AdversarialSet:
    """Write ``adversarial.pt`` / ``adversarial.json`` into ``folder``: ``x`` with each broken example
    replaced by its adversarial image (``broken``: position -> (attack, image))."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = x.detach().cpu().clone()
    attacks: list[str | None] = [None] * len(out)
    for i, (attack, image) in broken.items():
        out[i] = image
        attacks[i] = attack
    with writing(folder / TENSOR_FILE), atomic_path(folder / TENSOR_FILE) as tmp:
        torch.save(out, tmp)
    record = {"format": "meansparse-adversarial/1", "tensor": TENSOR_FILE, "shape": list(out.shape),
              "indices": list(indices), "attack": attacks, "clean_correct": list(clean_correct),
              "worst_case_robust": list(worst_case_robust), "n_broken": sum(a is not None for a in attacks), **meta}
    with writing(folder / INDEX_FILE):
        (folder / INDEX_FILE).write_text(json.dumps(record) + "\n")
    return AdversarialSet(out, list(indices), attacks, list(clean_correct), list(worst_case_robust))


def load_adversarial(folder: str | os.PathLike) -> AdversarialSet:
    """Read what :func:`write_adversarial` wrote (the tensor with ``weights_only=True``)."""
    folder = Path(folder)
    record = json.loads((folder / INDEX_FILE).read_text())
    x = torch.load(folder / record["tensor"], map_location="cpu", weights_only=True)
    return AdversarialSet(x, record["indices"], record["attack"], record["clean_correct"],
                          record["worst_case_robust"])


@torch.no_grad()
def rejudge(model: nn.Module, adversarial: AdversarialSet, y: torch.Tensor, batch_size: int = 128) -> list[bool]:
    """Per example: whether ``model`` classifies the stored image correctly (the worst case, judged again)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    correct = []
    for s in range(0, len(adversarial.x), batch_size):
        pred = model(adversarial.x[s:s + batch_size].to(device)).argmax(1).cpu()
        correct += (pred == y[s:s + batch_size].cpu()).tolist()
    return correct
