"""The MeanSparse operator: mean-centred feature sparsification placed before an activation.

Per channel c::

    y = mu_c  if |x - mu_c| < alpha * sigma_c  else  x        (strict <)

``mu``/``sigma`` are the per-channel mean and standard deviation (ddof=0) of the pre-activation measured
in one calibration pass (:func:`meansparse.calibrate`).  ``alpha == 0`` returns the input object itself,
so a prepared but unsparsified model is bit-identical to the original.

This operator is written by hand: no existing library implements it.  The element-wise math lives in
:mod:`meansparse.core.band`; the (centre, threshold) vectors come from :meth:`MeanSparse.center_threshold`
(cached per alpha/statistics change for the hot path).  :func:`meansparse.fuse` swaps an operator to a
subclass that also computes the activation after it (:mod:`meansparse.accel`); this class knows nothing of
that.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .._compile import is_compiling
from .._utils import same_versions, tensor_versions
from .band import StraightThrough, SurrogateGradient, in_band, soft_sparsify, sparsify, sparsify_lean
from .layout import LAYOUTS, broadcast_channel, channel_dim, infer_layout
from .moments import Moments
from .site import SiteInfo

__all__ = ["MeanSparse", "operators", "check_alpha", "check_centering", "check_momentum", "check_sharpness",
           "ATTACK_MODES", "CENTERINGS", "DEFAULT_SHARPNESS", "GRADIENTS", "TRAIN_STATISTICS"]

CENTERINGS = ("channel", "zero", "global")
GRADIENTS = ("exact", "straight_through", "surrogate", "smooth")
#: Modes that exist for attacks only (:func:`meansparse.placement.gradient_mode`): "surrogate" keeps the real
#: forward and back-propagates the soft threshold's derivative; "smooth" also computes the soft threshold
#: forward (a smooth surrogate model, whose candidates are judged on the real one).  Neither is fused.
ATTACK_MODES = ("surrogate", "smooth")
DEFAULT_SHARPNESS = 2.0
#: What a training operator sparsifies with in train mode: the running statistics after this batch's update
#: ("running", the default: see docs/usage.md for the measurement), or the batch's own ("batch", as BatchNorm).
TRAIN_STATISTICS = ("running", "batch")


def check_alpha(value: Any, site: str = "") -> float:
    """``value`` as a float, or a ValueError unless it is finite and >= 0 (``site`` names the operator)."""
    v = float(value)
    if not math.isfinite(v) or v < 0:
        where = f"MeanSparse site '{site}': " if site else ""
        raise ValueError(f"{where}alpha must be finite and >= 0, got {v}")
    return v


def check_centering(value: str) -> str:
    """``value`` if it names a centering, else a ValueError listing them."""
    if value not in CENTERINGS:
        raise ValueError(f"centering must be one of {CENTERINGS}, got {value!r}")
    return value


def check_sharpness(value: Any) -> float:
    """``value`` as a float, or a ValueError unless it is finite and > 0 (the soft threshold's exponent k)."""
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"surrogate sharpness must be a finite number > 0, got {value!r}")
    return v


def check_momentum(value: Any) -> float | None:
    """``value`` as a float in (0, 1], or None (the cumulative average); else a ValueError."""
    if value is None:
        return None
    v = float(value)
    if not 0 < v <= 1:
        raise ValueError(f"MeanSparse momentum must be in (0, 1] or None (cumulative), got {value!r}")
    return v


def operators(model: nn.Module) -> list[MeanSparse]:
    """All MeanSparse operators of ``model``, ordered by site index (execution order)."""
    ops = [m for m in model.modules() if isinstance(m, MeanSparse)]
    return sorted(ops, key=lambda o: o.site.index)


class MeanSparse(nn.Module):
    """Mean-centred sparsification of one activation input (see module docstring).

    ``site``: where it sits (:class:`~meansparse.core.site.SiteInfo`, the record placement made; its name
    appears in every error message, its ``layout_hint`` and ``inplace`` are the only facts the operator uses).
    Buffers: ``running_mean`` / ``running_var`` (float32, ``[C]``; empty until the channel count is
    known), ``alpha`` (0-dim float32) and ``num_samples`` (int64, elements per channel seen at
    calibration; 0 means uncalibrated).  ``alpha`` and the calibrated flag are mirrored as Python values
    so the hot path never synchronises with the device.
    """

    running_mean: Tensor
    running_var: Tensor
    alpha: Tensor
    num_samples: Tensor
    #: What a fused operator (:mod:`meansparse.accel`) also computes: the activation after it, and the
    #: producer ("bn", "add", "bn+add") before it.  Plain operators compute neither.
    fused_activation: Any = None
    fused_producer: str | None = None

    def __init__(
        self,
        channels: int | None = None,
        layout: str | None = None,
        centering: str = "channel",
        gradient: str = "exact",
        *,
        site: SiteInfo | None = None,
    ) -> None:
        super().__init__()
        self.site = SiteInfo() if site is None else site
        self.centering = check_centering(centering)
        self.gradient = gradient  # validated by the property setter
        self.sharpness = DEFAULT_SHARPNESS  # of the soft threshold, in the attack-only modes
        self._layout: str | None = None
        if layout is not None:
            self.layout = layout
        self._channels: int | None = None
        self._alpha_value = 0.0
        self._calibrated = False
        self._observer: Moments | None = None
        #: opt-in (:func:`meansparse.placement.learn_statistics`): in train mode, sparsify with and update
        #: the statistics from every batch; off, train mode is eval mode for this operator (frozen statistics)
        self.learns = False
        self.momentum: float | None = 0.1  # None: cumulative (exact pooled moments of everything seen)
        self.train_statistics = "running"
        self.batch_index: int | None = None  # set by calibrate() so errors can name the batch
        self._ct_token: tuple | None = None  # (buffer, version) pairs the cached vectors were built from
        self._ct_cache: dict[tuple, tuple[Tensor, Tensor]] = {}
        self.register_buffer("alpha", torch.zeros((), dtype=torch.float32))
        self.register_buffer("num_samples", torch.zeros((), dtype=torch.int64))
        self.register_buffer("running_mean", torch.empty(0, dtype=torch.float32))
        self.register_buffer("running_var", torch.empty(0, dtype=torch.float32))
        if channels is not None:
            self._allocate(int(channels))

    # ------------------------------------------------------------------ descriptive state
    @property
    def name(self) -> str:
        return self.site.name or "<unnamed>"

    @property
    def layout(self) -> str | None:
        return self._layout

    @layout.setter
    def layout(self, value: str | None) -> None:
        if value is not None and value not in LAYOUTS:
            raise ValueError(f"MeanSparse site '{self.name}': layout must be one of {tuple(LAYOUTS)}, got {value!r}")
        self._layout = value

    @property
    def gradient(self) -> str:
        return self._gradient

    @gradient.setter
    def gradient(self, value: str) -> None:
        if value not in GRADIENTS:
            raise ValueError(f"gradient must be one of {GRADIENTS}, got {value!r}")
        self._gradient = value

    @property
    def channels(self) -> int | None:
        return self._channels

    @property
    def calibrated(self) -> bool:
        return self._calibrated

    @property
    def alpha_value(self) -> float:
        """Python mirror of the ``alpha`` buffer (no device sync)."""
        return self._alpha_value

    @property
    def observing(self) -> bool:
        return self._observer is not None

    @property
    def observer(self) -> Moments | None:
        """The accumulator of an observing operator (None otherwise); settable to restore a saved one."""
        return self._observer

    @observer.setter
    def observer(self, value: Moments | None) -> None:
        self._observer = value

    @property
    def active(self) -> bool:
        """Whether a forward changes its input: not observing and alpha > 0."""
        return self._observer is None and self._alpha_value != 0.0

    def channel_dim(self, ndim: int) -> int:
        if self._layout is None:
            raise RuntimeError(f"MeanSparse site '{self.name}': layout unknown before the first input")
        return channel_dim(self._layout, ndim)

    # ------------------------------------------------------------------ state changes
    def _home(self) -> torch.device:
        return self.alpha.device

    def _allocate(self, channels: int) -> None:
        dev = self._home()
        self.running_mean = torch.zeros(channels, dtype=torch.float32, device=dev)
        self.running_var = torch.ones(channels, dtype=torch.float32, device=dev)
        self._channels = channels

    def set_alpha(self, value: float | Tensor) -> None:
        """Set the threshold multiplier; must be finite and >= 0."""
        v = check_alpha(value, self.name)
        self.alpha.fill_(v)
        self._alpha_value = v

    def set_statistics(self, mean: Tensor, var: Tensor, num_samples: int | None = None) -> None:
        """Install calibrated per-channel mean and variance (ddof=0)."""
        mean = torch.as_tensor(mean).detach().flatten()
        var = torch.as_tensor(var).detach().flatten()
        if mean.shape != var.shape:
            raise ValueError(
                f"MeanSparse site '{self.name}': mean has {mean.numel()} entries but var has {var.numel()}"
            )
        c = mean.numel()
        if self._channels is not None and self._channels != c:
            raise ValueError(
                f"MeanSparse site '{self.name}': statistics have {c} channels but the site has {self._channels}"
            )
        if self._channels is None:
            self._allocate(c)
        self.running_mean.copy_(mean.to(self.running_mean.dtype))
        self.running_var.copy_(var.to(self.running_var.dtype))
        n = 1 if num_samples is None else int(num_samples)
        self.num_samples.fill_(n)
        self._calibrated = n > 0

    def start_observing(self) -> None:
        """Switch to observing: forward passes x through unchanged and accumulates its moments."""
        self._observer = Moments()

    def stop_observing(self) -> Moments:
        """Leave observing mode and return the accumulated moments (possibly empty)."""
        out, self._observer = self._observer, None
        return out if out is not None else Moments()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # Buffers are lazily sized: adopt the checkpoint's channel count when ours is still unknown.
        key = prefix + "running_mean"
        if key in state_dict:
            c = int(state_dict[key].numel())
            if self._channels is None and c > 0:
                self._allocate(c)
            elif self._channels is not None and c != self._channels:
                error_msgs.append(
                    f"MeanSparse site '{self.name}': checkpoint has {c} channels but the site has {self._channels}"
                )
                return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        a = float(self.alpha)
        try:
            check_alpha(a)
        except ValueError:
            error_msgs.append(f"MeanSparse site '{self.name}': loaded alpha must be finite and >= 0, got {a}")
        self._alpha_value = a
        self._calibrated = int(self.num_samples) > 0
        self._channels = self.running_mean.numel() or self._channels

    # ------------------------------------------------------------------ math
    def center_threshold(self) -> tuple[Tensor, Tensor]:
        """Per-channel centre and threshold (float32, shape ``[C]``, or 0-dim for ``global``)."""
        return self._center_threshold_of(self.running_mean.float(), self.running_var.float())

    def _center_threshold_of(self, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`center_threshold` of the given statistics (the running ones, or a batch's in training)."""
        alpha = self.alpha.float()
        if self.centering == "global":
            m64, v64 = mean.double(), var.double()
            g = m64.mean()
            gv = (v64 + (m64 - g) ** 2).mean()  # exact pooling: every channel saw the same count
            return g.float(), alpha * gv.float().clamp_min(0).sqrt()
        t = alpha * var.clamp_min(0).sqrt()
        if self.centering == "zero":
            return torch.zeros_like(mean), t
        return mean, t

    def _broadcast(self, v: Tensor, x: Tensor) -> Tensor:
        return broadcast_channel(v.to(dtype=x.dtype), x.ndim, self.channel_dim(x.ndim) if v.ndim else 0)

    def band_mask(self, z: Tensor) -> Tensor:
        """Positions of ``z`` (an input of this operator) that it replaces by its centre (all False at
        alpha 0)."""
        if self._alpha_value == 0.0:
            return torch.zeros_like(z, dtype=torch.bool)
        m, t = self.center_threshold()
        return in_band(z, self._broadcast(m.to(z.device), z), self._broadcast(t.to(z.device), z))

    def see(self, x: Tensor) -> None:
        """Fix the layout and channel count from the first input (a no-op once both are known)."""
        if self._layout is None:
            self.layout = infer_layout(x.ndim, self.site.layout_hint)
        if self._channels is None:
            self._allocate(int(x.shape[self.channel_dim(x.ndim)]))

    def check_channels(self, x: Tensor) -> None:
        c = x.shape[self.channel_dim(x.ndim)]
        if c != self._channels:
            raise ValueError(
                f"MeanSparse site '{self.name}': input has {c} channels (layout {self._layout}, "
                f"shape {tuple(x.shape)}) but the site expects {self._channels}"
            )

    def observe(self, x: Tensor) -> None:
        """Fold ``x`` into the observer: shifted per-group sums merged in float64, no full-size float64 copy
        and no device sync (non-finite inputs poison the accumulator; ``calibrate`` checks once per batch)."""
        self.check_channels(x)
        self._observer.update_fast(x, self.channel_dim(x.ndim))  # type: ignore[union-attr]

    def observer_finite(self) -> Tensor | None:
        """0-dim bool tensor: whether everything observed so far was finite (None before any input)."""
        o = self._observer
        if o is None or o.count is None:
            return None
        if o.finite is not None:
            return o.finite
        return torch.isfinite(o.mean_).all() & torch.isfinite(o.m2).all()

    def check_ready(self, x: Tensor) -> None:
        """Raise unless the operator can sparsify ``x``: calibrated, and ``x`` has the site's channels."""
        if not self._calibrated:
            raise RuntimeError(
                f"MeanSparse site '{self.name}' has alpha={self._alpha_value} but is not calibrated; "
                "run meansparse.calibrate(model, loader) or meansparse.load(...) first"
            )
        self.check_channels(x)

    def center_threshold_for(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(centre, threshold) in ``x``'s dtype, broadcastable against ``x``.  Cached until alpha, the
        statistics or the centering change (buffer identity + in-place version counter), so the hot path does
        no per-call arithmetic on them."""
        if is_compiling():
            m, t = self.center_threshold()
            return self._broadcast(m, x), self._broadcast(t, x)
        token = tensor_versions(self.running_mean, self.running_var, self.alpha)
        if token is not None:
            token = token + ((self.centering, 0),)
        if not same_versions(token, self._ct_token):
            self._ct_cache = {}
            self._ct_token = token
        key = (x.dtype, x.device, x.ndim)
        hit = self._ct_cache.get(key) if token is not None else None
        if hit is None:
            m, t = self.center_threshold()
            hit = (self._broadcast(m, x).to(device=x.device), self._broadcast(t, x).to(device=x.device))
            if token is not None:
                self._ct_cache[key] = hit
        return hit

    def apply_band(self, x: Tensor, in_place: bool) -> Tensor:
        """The operator on a ready input; ``in_place`` honours ``self.site.inplace`` (the activation after us is
        in-place: later users of x expect it mutated).  Same values as :func:`~meansparse.core.band.sparsify`,
        with fewer full-size temporaries: the mask is computed without autograd and, when no gradient is
        needed, the result reuses the ``x - m`` buffer (or ``x`` itself when in place)."""
        m, t = self.center_threshold_for(x)
        return self._band(x, m, t, in_place)

    def _band(self, x: Tensor, m: Tensor, t: Tensor, in_place: bool) -> Tensor:
        """:meth:`apply_band` with a given (centre, threshold), broadcastable and of ``x``'s dtype."""
        write_back = in_place and self.site.inplace
        if self._gradient in ATTACK_MODES:
            out = self._attack_band(x, m, t)
            return x.copy_(out) if write_back else out
        if is_compiling():  # keep the traced graph plain
            out = StraightThrough.apply(x, m, t) if self._gradient == "straight_through" else sparsify(x, m, t)
            return x.copy_(out) if write_back else out
        if torch.is_grad_enabled() and x.requires_grad:
            if self._gradient == "straight_through":
                out = StraightThrough.apply(x, m, t)
            else:
                with torch.no_grad():
                    inside = in_band(x, m, t)
                out = torch.where(inside, m, x)
            return x.copy_(out) if write_back else out
        return sparsify_lean(x, m, t, write_back)

    def _attack_band(self, x: Tensor, m: Tensor, t: Tensor) -> Tensor:
        """The attack-only modes: the soft threshold forward ("smooth"), or the real forward with the soft
        threshold's derivative ("surrogate", which without autograd is the real operator)."""
        if self._gradient == "smooth":
            return soft_sparsify(x, m, t, self.sharpness)
        if torch.is_grad_enabled() and x.requires_grad:
            return SurrogateGradient.apply(x, m, t, self.sharpness)
        return sparsify(x, m, t)

    # ------------------------------------------------------------------ training
    def update_statistics(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Fold ``x``'s exact per-channel moments into the running ones (exponential filter of ``momentum``,
        or the exact pooled moments when it is None; an uncalibrated operator adopts the batch's) and return
        the batch's (mean, var), float32.  No gradient flows through statistics (as BatchNorm's running ones)."""
        self.check_channels(x)
        cd = self.channel_dim(x.ndim)
        b = Moments.batch_stats_fast(x.detach(), cd)
        mean, var, n = b.mean, b.var, x.numel() // x.shape[cd]  # n from the shape: no device sync
        with torch.no_grad():
            if not self._calibrated:
                self.set_statistics(mean, var, num_samples=n)
            elif self.momentum is None:
                count = self.num_samples.double().expand_as(mean)
                seen = Moments.from_stats(count, self.running_mean.double(), self.running_var.double() * count)
                seen.merge(b)
                self.running_mean.copy_(seen.mean.float())
                self.running_var.copy_(seen.var.float())
                self.num_samples.add_(n)
            else:
                self.running_mean.lerp_(mean.float(), self.momentum)
                self.running_var.lerp_(var.float(), self.momentum)
                self.num_samples.add_(n)
        return mean.float(), var.float()

    def _train_forward(self, x: Tensor) -> Tensor:
        """Train mode of a learning operator: update the statistics, then sparsify with the running ones (or
        the batch's, ``train_statistics="batch"``); centre and threshold are fresh tensors, never the cache."""
        batch_mean, batch_var = self.update_statistics(x)
        if self._alpha_value == 0.0:
            return x
        if self.train_statistics == "batch":
            m, t = self._center_threshold_of(batch_mean, batch_var)
        else:
            m, t = self._center_threshold_of(self.running_mean.clone(), self.running_var.clone())
        return self._band(x, self._broadcast(m.to(x.device), x), self._broadcast(t.to(x.device), x), in_place=True)

    def forward(self, x: Tensor) -> Tensor:
        if self._layout is None or self._channels is None:
            self.see(x)
        if self._observer is not None:
            self.observe(x)
            return x
        if self.learns and self.training:
            return self._train_forward(x)
        if self._alpha_value == 0.0:
            return x
        self.check_ready(x)
        return self.apply_band(x, in_place=True)

    def extra_repr(self) -> str:
        fused = "" if self.fused_activation is None else f", fused={self.fused_activation[0]}"
        if self.fused_producer:
            fused += f"+{self.fused_producer}"
        return (
            f"site={self.name!r}, layout={self._layout}, channels={self._channels}, "
            f"centering={self.centering!r}, gradient={self._gradient!r}, alpha={self._alpha_value:g}{fused}"
            + (f", learns(momentum={self.momentum}, {self.train_statistics})" if self.learns else "")
        )
