"""One-pass calibration of every MeanSparse operator's per-channel mean and variance.

The pass runs the model in eval mode under ``torch.no_grad`` with the operators *observing*: they pass
their input through unchanged (so later sites see the original features) and fold it into an exact
:class:`~meansparse.core.Moments`.  Statistics are written only after the whole pass succeeded, and
merged across ranks first when torch.distributed is initialised (every rank then holds the same numbers).

Cost: each site reads its input about twice more (per-group shifted sums, see
:meth:`Moments.batch_stats_fast`; one compiled kernel when torch.compile works), keeps O(channels) state and
at most a fixed scratch buffer, and the finiteness check costs one device sync per batch, not per site.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._utils import atomic_path, model_device, tensors_sha256, warn_at_caller, writing
from .core import MeanSparse, Moments, operators
from .distributed import is_main, sum_over_ranks, world_size
from .placement import get_record

__all__ = ["calibrate"]


def _inputs(batch: Any) -> Any:
    """The model input of a loader item: ``x`` itself or the first element of ``(x, y)`` / ``[x, y]``."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("calibration loader yielded an empty batch")
        return batch[0]
    return batch


def _total(loader: Any, max_batches: int | None) -> int | None:
    """Images the pass will see, for the progress bar's total and ETA: a DataLoader's sampler length (less what
    ``drop_last`` drops), else the loader's data set size (:class:`~meansparse.data.Batches`), else its length
    times its batch size; at most ``max_batches`` full batches; None if unknown."""
    batch_size = getattr(loader, "batch_size", None)
    sampler = getattr(loader, "sampler", None)
    total = None
    try:
        if isinstance(batch_size, int) and sampler is not None:
            total = len(sampler)
            if getattr(loader, "drop_last", False):
                total -= total % batch_size
    except (TypeError, NotImplementedError):
        total = None
    if total is None:
        try:
            total = len(loader.dataset)
        except (AttributeError, TypeError):
            try:
                total = len(loader) * batch_size if isinstance(batch_size, int) else None
            except TypeError:
                return None
    if max_batches is not None:
        if not isinstance(batch_size, int):
            return None
        total = None if total is None else min(total, max_batches * batch_size)
    return total


def _check_batch(x: Tensor, batch: int) -> None:
    """Calibration inputs are what ``evaluate`` takes: float images in [0, 1] (normalisation belongs inside
    the model). uint8, 0-255 or normalised inputs would give statistics of other features than the ones
    the model sees at evaluation."""
    if not x.is_floating_point():
        raise ValueError(f"calibration batch {batch}: inputs must be floating point in [0, 1], got dtype {x.dtype}"
                         + (" (divide uint8 images by 255)" if x.dtype == torch.uint8 else "")
                         + "; check_inputs=False skips this check for a model that takes other inputs")
    if x.numel() == 0:
        return
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))
    if not (lo >= 0 and hi <= 1):  # also catches NaN
        raise ValueError(f"calibration batch {batch}: inputs must lie in [0, 1] as evaluate requires "
                         f"(normalisation belongs inside the model); got [{lo:.4g}, {hi:.4g}]"
                         + (" (0-255 pixels? divide by 255)" if hi > 1.5 and lo >= 0 else "")
                         + "; check_inputs=False skips this check for a model that takes other inputs")


def _progress_bar(enabled: bool, total: int | None):
    """The tqdm bar of the pass (images), shown on rank 0 only: one bar per job, not per rank."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a runtime dependency
        return None
    return tqdm(total=total, unit="img", unit_scale=True, desc="meansparse calibrate",
                disable=not (enabled and is_main()))


# ---------------------------------------------------------------------------------------------- resuming
_FORMAT = "meansparse-calibration-progress-2"


def _model_sha256(model: nn.Module) -> str:
    """sha256 of the model's own tensors (the operators' buffers left out: they change while calibrating), so
    progress is only ever resumed onto the model it was measured on."""
    skip = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, MeanSparse) and name)
    return tensors_sha256(("", t) for k, t in model.state_dict().items() if not k.startswith(skip))


def _plan(loader: Any, max_batches: int | None) -> dict[str, Any]:
    """The batch settings a resume must share: images in the pass, the batch size and ``max_batches``."""
    size = getattr(loader, "batch_size", None)
    return {"images": _total(loader, max_batches), "batch_size": size if isinstance(size, int) else None,
            "max_batches": max_batches}


class _ResumeState:
    """What a resumable pass has folded so far: per-site (count, mean, M2) as of the last completed batch, how
    many batches and images that is, and what it belongs to (the model's weights hash, the sites, the batch
    settings, fingerprints of the first and the last batch), all checked before a later call continues it."""

    def __init__(self, path: Path, ops: list[MeanSparse], model_hash: str, plan: dict[str, Any]) -> None:
        self.path, self.ops = path, ops
        self.names = [op.name for op in ops]
        self.model_hash, self.plan = model_hash, plan
        self.batches = self.images = 0
        self.snapshot: dict[str, Tensor] = {}
        self.last_input: Tensor | None = None
        self.fingerprint: str | None = None
        self.first: str | None = None

    def _refuse(self, why: str) -> None:
        raise ValueError(f"{self.path}: {why}; resuming would mix its statistics into this pass: remove the file "
                         "to start over (or rerun with the settings it was written with)")

    def load(self, device: torch.device | None) -> None:
        """Restore the observers from a file left by an interrupted pass, if there is one and it belongs to
        this model, these sites and these batch settings (else a ValueError naming what differs)."""
        if not self.path.exists():
            return
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad file
            raise ValueError(f"{self.path} is not a readable calibration progress file ({e}); remove it to start "
                             "over") from None
        self._check(meta)
        for i, op in enumerate(self.ops):
            if f"{i}.count" in tensors:
                op.observer = Moments.from_stats(*(tensors[f"{i}.{k}"].to(device) if device is not None else
                                                   tensors[f"{i}.{k}"] for k in ("count", "mean", "m2")))
        self.batches, self.images = int(meta["batches"]), int(meta["images"])
        self.fingerprint, self.first = meta["fingerprint"], meta["first"]
        self.snapshot = tensors

    def _check(self, meta: dict[str, str]) -> None:
        """The file's model, sites and batch settings are this call's."""
        if meta.get("format") != _FORMAT:
            self._refuse("not a calibration progress file of this meansparse version (it does not record which "
                         "model and data it belongs to)")
        if json.loads(meta["sites"]) != self.names:
            self._refuse("holds calibration progress for other MeanSparse sites than this model's")
        if meta["model"] != self.model_hash:
            self._refuse(f"holds calibration progress of another model (weights sha256 {meta['model'][:12]}… in "
                         f"the file, {self.model_hash[:12]}… here)")
        saved = json.loads(meta["plan"])
        if saved != self.plan:
            self._refuse(f"was written for other batch settings ({_describe(saved)}; this call: "
                         f"{_describe(self.plan)})")

    def check_skipped(self, x: Any, i: int) -> None:
        """Batch ``i`` < the saved count is skipped; the first and the last of them must be the batches the file
        was measured on (other data, another sample or another order is refused)."""
        if not isinstance(x, Tensor):
            return
        if i == 0 and self.first and _fingerprint(x) != self.first:
            raise ValueError(f"{self.path}: batch 0 is not the first batch of the interrupted calibration (other "
                             "data, another sample or another order); remove the file to start over")
        if i == self.batches - 1 and _fingerprint(x) != self.fingerprint:
            raise ValueError(f"{self.path}: batch {i} is not the batch the interrupted calibration ended with; "
                             "the loader must yield the same batches in the same order to resume (no shuffling), "
                             "or remove the file to start over")

    def completed(self, x: Any, n: int) -> None:
        """Batch done and checked: remember the observers' state as of now (O(channels) per site)."""
        if self.batches == 0 and isinstance(x, Tensor):
            self.first = _fingerprint(x)
        self.batches += 1
        self.images += n
        self.last_input = x if isinstance(x, Tensor) else None
        self.snapshot = {f"{i}.{k}": v.detach().clone() for i, op in enumerate(self.ops)
                         if op.observer is not None and op.observer.count is not None
                         for k, v in (("count", op.observer.count), ("mean", op.observer.mean_),
                                      ("m2", op.observer.m2))}

    def save(self) -> None:
        """Write the last completed batch's state (atomically: a kill mid-write leaves the previous file)."""
        from safetensors.torch import save_file

        if self.last_input is not None:
            self.fingerprint = _fingerprint(self.last_input)
        meta = {"format": _FORMAT, "sites": json.dumps(self.names), "batches": str(self.batches),
                "images": str(self.images), "fingerprint": self.fingerprint or "", "first": self.first or "",
                "model": self.model_hash, "plan": json.dumps(self.plan, sort_keys=True)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with writing(self.path, "the previous progress file, if any, is kept"), atomic_path(self.path) as tmp:
            save_file({k: v.cpu().contiguous() for k, v in self.snapshot.items()}, str(tmp), metadata=meta)

    def save_after(self, cause: BaseException) -> None:
        """``cause`` stopped the pass: save what the completed batches folded in, if any, so that a later call
        continues from there; a failing write (a full disk) must not hide ``cause``."""
        if not (self.batches and self.snapshot):
            return
        try:
            self.save()
        except OSError as e:
            cause.add_note(str(e.strerror or e))

    def finish(self, keep: bool) -> None:
        """The pass succeeded: update the file to hold all of it (``keep``), else remove it."""
        if keep:
            self.save()  # the whole pass: the caller removes it once its own result is written
        elif self.path.exists():
            self.path.unlink()


def _describe(plan: dict[str, Any]) -> str:
    """Batch settings in words."""
    images = "an unknown number of" if plan.get("images") is None else plan["images"]
    size = plan.get("batch_size") or "?"
    cap = f", at most {plan['max_batches']} batches" if plan.get("max_batches") else ""
    return f"{images} images in batches of {size}{cap}"


def _stop_workers(items: Any) -> None:
    """Stop a DataLoader iterator's worker processes now.  After an error torch's re-raise leaves the iterator
    in a reference cycle, and when the garbage collector finally ends it the workers no longer get the stop
    message and each is waited for 5 s: the caller (a test, a notebook) would stall ten seconds."""
    stop = getattr(items, "_shutdown_workers", None)
    if callable(stop):
        stop()


def _fingerprint(x: Tensor) -> str:
    return tensors_sha256([("x", x)])


def _check_finite(ops: list[MeanSparse], batch: int) -> None:
    """One device sync per batch: a non-finite input poisons its site's accumulator, so checking the
    accumulators after each batch names the first bad site and the batch without a per-site sync."""
    flags = [(op, op.observer_finite()) for op in ops]
    flags = [(op, f) for op, f in flags if f is not None]
    if not flags:
        return
    ok = torch.stack([f.to(flags[0][1].device) for _, f in flags]).tolist()
    for (op, _), good in zip(flags, ok, strict=True):
        if not good:
            raise ValueError(
                f"MeanSparse site '{op.name}': non-finite values (NaN/Inf) in the input at calibration batch {batch} "
                "(or values whose squares overflow the input's dtype)"
            )


@dataclass
class _Tally:
    """What a pass has folded in: batches and images (those of a resumed pass included), the shape of a tensor
    input (recorded for ``load``) and the seconds it took."""

    batches: int = 0
    images: int = 0
    input_shape: list[int] | None = None
    elapsed: float = 0.0


def _resume_state(model: nn.Module, ops: list[MeanSparse], loader: Any, max_batches: int | None,
                  state_path: str | os.PathLike | None, save_every: int) -> _ResumeState | None:
    """The resumable pass's state for ``state_path`` (None: not resumable), its settings checked."""
    if state_path is None:
        return None
    if world_size() > 1:
        raise ValueError("calibrate: state_path (resuming) is not supported under torch.distributed")
    if save_every < 1:
        raise ValueError(f"save_every must be >= 1, got {save_every}")
    return _ResumeState(Path(state_path), ops, _model_sha256(model), _plan(loader, max_batches))


def _model_input(x: Any, batch: int, device: torch.device | None, check_inputs: bool) -> tuple[Any, int]:
    """A batch's model input on ``device`` (a tensor checked first, unless ``check_inputs`` is False), and the
    images it holds."""
    if not isinstance(x, Tensor):
        return x, 1
    if check_inputs:
        _check_batch(x, batch)
    if device is not None:
        x = x.to(device, non_blocking=True)
    return x, int(x.shape[0]) if x.ndim else 1


def _fold_batches(model: nn.Module, loader: Iterable[Any], ops: list[MeanSparse], device: torch.device | None,
                  check_inputs: bool, max_batches: int | None, resume: _ResumeState | None, bar: Any,
                  save_every: int) -> _Tally:
    """Run the model on each batch after those ``resume`` already holds (their first and last checked), with the
    operators observing; the state is saved every ``save_every`` batches."""
    tally = _Tally() if resume is None else _Tally(resume.batches, resume.images)
    start = time.perf_counter()
    items = iter(loader)
    try:
        with torch.no_grad():
            for i, batch in enumerate(items):
                x = _inputs(batch)
                if resume is not None and i < resume.batches:  # folded in before the interruption
                    resume.check_skipped(x, i)
                    if max_batches is not None and i + 1 >= max_batches:
                        break
                    continue
                x, n = _model_input(x, i, device, check_inputs)
                if tally.input_shape is None and isinstance(x, Tensor):
                    tally.input_shape = list(x.shape[1:])
                for op in ops:
                    op.batch_index = i
                model(x)
                _check_finite(ops, i)
                tally.batches += 1
                tally.images += n
                if resume is not None:
                    resume.completed(x, n)
                    if tally.batches % save_every == 0:
                        resume.save()
                if bar is not None:
                    bar.update(n)
                    bar.set_postfix(batches=tally.batches, refresh=False)
                if max_batches is not None and tally.batches >= max_batches:
                    break  # stop before fetching (and paying for) another batch
    finally:
        _stop_workers(items)
    tally.elapsed = time.perf_counter() - start
    return tally


def _install_statistics(ops: list[MeanSparse], batches: int) -> None:
    """End observing, merge every rank's moments (the same merge code; no-op without a process group) and give
    them to the operators; a site that received no input stays uncalibrated (warned)."""
    moments: list[Moments] = [op.stop_observing() for op in ops]
    for m in moments:
        m.all_reduce()
    if sum_over_ranks(batches) == 0:
        raise ValueError("calibration loader yielded no batches")
    unseen = [op.name for op, m in zip(ops, moments, strict=True) if m.count is None or m.total == 0]
    if unseen:
        warn_at_caller(
            f"meansparse.calibrate: {len(unseen)} site(s) received no input and stay uncalibrated: {unseen[:10]}")
    for op, m in zip(ops, moments, strict=True):
        if m.count is not None and m.total > 0:
            op.set_statistics(m.mean, m.var, num_samples=int(m.total))


def _record_input_shape(model: nn.Module, shape: list[int] | None) -> None:
    """Note the input shape in the prepared model's record: ``load`` probes a fresh model with it."""
    rec = get_record(model) or next((r for r in map(get_record, model.modules()) if r is not None), None)
    if rec is not None and shape is not None:
        rec.config["input_shape"] = shape


def calibrate(
    model: nn.Module,
    loader: Iterable[Any],
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    progress: bool = True,
    *,
    check_inputs: bool = True,
    state_path: str | os.PathLike | None = None,
    save_every: int = 50,
    keep_state: bool = False,
) -> nn.Module:
    """Measure exact per-channel mean/var (ddof=0) of every operator input in one pass over ``loader``.

    ``loader``: any iterable of batches ``x`` or ``(x, y, ...)``, e.g. a ``DataLoader`` over a streamed data
    set (``meansparse.data.loader(stream, 256, workers=8)``): batches are consumed one at a time, so memory
    holds what the loader keeps in flight.  The progress bar counts images (total from the loader's sampler
    or ``len(loader.dataset)``).
    ``device``: if given the model is moved there; inputs always go to the model's device.  The model's
    train/eval flags and the operators' modes are restored afterwards, also on error.  ``check_inputs``:
    tensor inputs must be float images in [0, 1], as :func:`meansparse.evaluate` requires (False for a model
    that takes other inputs, e.g. already normalised ones, and is evaluated on the same kind).

    ``state_path``: make the pass resumable.  What has been folded in is written there every ``save_every``
    batches and when the pass stops early (Ctrl-C, a bad batch: the batches before it); a later call with the
    same model, the same loader (same batches, same order: the last saved batch is checked) and the same
    ``state_path`` skips the saved batches and continues, with the statistics of one uninterrupted pass (the
    same float64 merges in the same order; bit for bit in the tests).  The file is removed once calibration
    succeeds, unless ``keep_state``: then it is updated to hold the whole pass, for a caller that removes it
    only after writing its own result (a failed write then loses nothing: a rerun skips every batch).  Not
    under torch.distributed.
    """
    ops: list[MeanSparse] = operators(model)
    if not ops:
        raise ValueError("model has no MeanSparse operators; call meansparse.prepare(model) first")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    if device is not None:
        model.to(device)
    dev = torch.device(device) if device is not None else model_device(model)
    resume = _resume_state(model, ops, loader, max_batches, state_path, save_every)
    modes = [(m, m.training) for m in model.modules()]
    previous = [op.observer for op in ops]
    bar = _progress_bar(progress, _total(loader, max_batches))
    try:
        model.eval()
        for op in ops:
            op.start_observing()
        if resume is not None:
            resume.load(dev)
            if bar is not None and resume.images:
                bar.update(resume.images)
        tally = _fold_batches(model, loader, ops, dev, check_inputs, max_batches, resume, bar, save_every)
        _install_statistics(ops, tally.batches)
        _record_input_shape(model, tally.input_shape)
        if bar is not None and tally.elapsed > 0:
            bar.set_postfix(images_per_s=f"{tally.images / tally.elapsed:.1f}", batches=tally.batches)
        if resume is not None:
            resume.finish(keep_state)
    except BaseException as e:
        if resume is not None:
            resume.save_after(e)  # nothing folded in so far is lost: a later call continues from here
        raise
    finally:
        if bar is not None:
            bar.close()
        for op, obs in zip(ops, previous, strict=True):
            op.observer = obs
            op.batch_index = None
        for m, t in modes:
            m.training = t
    return model
