"""Every attack behind one interface: ``Attack.run(model, x, y, seed=...) -> x_adv``.

The APGD/FAB/Square family and standard AutoAttack are the reference implementations from
``pyautoattack`` (imported lazily: it is the ``eval`` extra); only attacks that no torchvision-free library
offers are written here (PGD-k, the paper's adaptive PGD, the BPDA and transfer wrappers).

An attack only *proposes* adversarial examples; ``evaluate`` judges them on the real model and rejects any
that leave the threat model, so a wrapper can never inflate a success rate.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("Linf", "L2")
# logger handed to pyautoattack's APGD so its zero-gradient alarms end up in the report (see evaluate.py)
LIBRARY_LOGGER = "meansparse.evaluation.pyautoattack"
KINDS = ("clean", "white-box", "bpda", "transfer", "black-box", "adaptive")


def _pyautoattack() -> Any:
    try:
        import pyautoattack
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the APGD/FAB/Square/AutoAttack attacks need pyautoattack: pip install 'meansparse[eval]'"
        ) from e
    return pyautoattack


def num_classes(model: nn.Module, x: torch.Tensor) -> int:
    """Number of logits, from one forward pass on one example."""
    with torch.no_grad():
        return int(model(x[:1]).shape[-1])


class Attack:
    """One attack under one threat model (norm, eps).

    Subclasses set ``name`` and ``kind`` and implement ``_run``; ``settings()`` is what the report records,
    so every parameter that changes the result must appear there.
    """

    name: str = "attack"
    kind: str = "white-box"

    def __init__(self, *, norm: str = "Linf", eps: float = 8 / 255) -> None:
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}: use one of {', '.join(NORMS)}")
        eps = float(eps)
        if not eps > 0 or eps != eps or eps == float("inf"):
            raise ValueError(f"eps must be a finite number > 0, got {eps}")
        self.norm = norm
        self.eps = eps

    @property
    def seed_key(self) -> str:
        """Name the per-batch seed derives from; BPDA reuses its inner attack's so the two differ only
        in the backward pass."""
        return self.name

    def params(self) -> dict[str, Any]:
        return {}

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "norm": self.norm, "eps": self.eps, **self.params()}

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
        """Adversarial candidates for (x, y); same shape as x, detached."""
        if len(x) == 0:
            return x.clone()
        return self._run(model, x, y, seed).detach()

    def _run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.settings().items())})"


class Clean(Attack):
    """No perturbation: the clean accuracy expressed as an attack (useful as a baseline row)."""

    name = "clean"
    kind = "clean"

    def _run(self, model, x, y, seed):
        return x.clone()


class _SuccessTracker:
    """Keeps, per sample, the first iterate that the model misclassifies.

    PGD is usually reported at its last iterate; any iterate inside the threat model that fools the model is
    an equally valid adversarial example, so keeping it can only make the attack stronger.
    """

    def __init__(self, x: torch.Tensor) -> None:
        self.found = x.detach().clone()
        self.fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)

    def update(self, x_adv: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        with torch.no_grad():
            new = (logits.argmax(1) != y) & ~self.fooled
            self.found[new] = x_adv.detach()[new]
            self.fooled |= new

    def merge(self, model: nn.Module, final: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            final_wrong = model(final).argmax(1) != y
        use_found = (self.fooled & ~final_wrong).view(-1, *[1] * (final.ndim - 1))
        return torch.where(use_found, self.found, final)


class PGD(Attack):
    """PGD-k on cross-entropy with a random start (Madry et al.; the paper's A.10 attack).

    Hand-written on top of ``meansparse.pgd``: pyautoattack has no plain PGD and torchattacks drags in
    torchvision. Default step size 2.5·eps/steps; the first misclassified iterate is kept.
    """

    name = "pgd"

    def __init__(self, *, norm: str = "Linf", eps: float = 8 / 255, steps: int = 50,
                 step_size: float | None = None, random_start: bool = True) -> None:
        super().__init__(norm=norm, eps=eps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps = int(steps)
        self.step_size = float(step_size) if step_size is not None else 2.5 * self.eps / self.steps
        self.random_start = bool(random_start)

    def params(self):
        return {"steps": self.steps, "step_size": self.step_size, "random_start": self.random_start,
                "loss": "ce"}

    def _loss(self, model: nn.Module, x: torch.Tensor, tracker: _SuccessTracker) -> Callable:
        def loss_fn(xa: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits = model(xa)
            tracker.update(xa, logits, y)
            return F.cross_entropy(logits, y, reduction="none")

        return loss_fn

    def _run(self, model, x, y, seed):
        from ..pgd import pgd

        tracker = _SuccessTracker(x)
        gen = torch.Generator().manual_seed(seed)
        final = pgd(self._loss(model, x, tracker), x, y, eps=self.eps, step_size=self.step_size,
                    steps=self.steps, norm=self.norm, rand_init=self.random_start, generator=gen)
        return tracker.merge(model, final, y)


class APGD(Attack):
    """APGD with the CE or DLR loss (pyautoattack's ``APGDAttack``, AutoAttack's settings)."""

    def __init__(self, *, norm: str = "Linf", eps: float = 8 / 255, loss: str = "ce", steps: int = 100,
                 restarts: int = 1, rho: float = 0.75) -> None:
        super().__init__(norm=norm, eps=eps)
        if loss not in ("ce", "dlr"):
            raise ValueError(f"APGD loss must be 'ce' or 'dlr', got {loss!r}")
        self.loss = loss
        self.name = f"apgd-{loss}"
        self.steps, self.restarts, self.rho = int(steps), int(restarts), float(rho)

    def params(self):
        return {"loss": self.loss, "steps": self.steps, "restarts": self.restarts, "rho": self.rho}

    def _run(self, model, x, y, seed):
        from pyautoattack.autopgd_base import APGDAttack

        _pyautoattack()
        attack = APGDAttack(model, n_iter=self.steps, norm=self.norm, n_restarts=self.restarts, eps=self.eps,
                            seed=seed, loss=self.loss, eot_iter=1, rho=self.rho, verbose=False,
                            device=x.device, logger=logging.getLogger(LIBRARY_LOGGER))
        return attack.perturb(x, y)


class APGDTargeted(Attack):
    """APGD on the targeted DLR loss over the top ``n_target_classes`` wrong classes (AutoAttack's APGD-T).

    ``n_target_classes`` is capped at (classes - 1): pyautoattack would index past the logits otherwise.
    """

    name = "apgd-t"

    def __init__(self, *, norm: str = "Linf", eps: float = 8 / 255, steps: int = 100, restarts: int = 1,
                 n_target_classes: int = 9, rho: float = 0.75) -> None:
        super().__init__(norm=norm, eps=eps)
        self.steps, self.restarts, self.rho = int(steps), int(restarts), float(rho)
        self.n_target_classes = int(n_target_classes)

    def params(self):
        return {"steps": self.steps, "restarts": self.restarts, "n_target_classes": self.n_target_classes,
                "rho": self.rho}

    def _run(self, model, x, y, seed):
        from pyautoattack.autopgd_base import APGDAttack_targeted

        _pyautoattack()
        targets = min(self.n_target_classes, num_classes(model, x) - 1)
        attack = APGDAttack_targeted(model, n_iter=self.steps, norm=self.norm, n_restarts=self.restarts,
                                     eps=self.eps, seed=seed, eot_iter=1, rho=self.rho, n_target_classes=targets,
                                     verbose=False, device=x.device, logger=logging.getLogger(LIBRARY_LOGGER))
        return attack.perturb(x, y)


class FABTargeted(Attack):
    """Targeted FAB (pyautoattack's ``FABAttack_PT``, AutoAttack's FAB-T settings); targets capped as APGD-T."""

    name = "fab-t"

    def __init__(self, *, norm: str = "Linf", eps: float = 8 / 255, steps: int = 100, restarts: int = 1,
                 n_target_classes: int = 9, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9) -> None:
        super().__init__(norm=norm, eps=eps)
        self.steps, self.restarts = int(steps), int(restarts)
        self.n_target_classes = int(n_target_classes)
        self.alpha_max, self.eta, self.beta = float(alpha_max), float(eta), float(beta)

    def params(self):
        return {"steps": self.steps, "restarts": self.restarts, "n_target_classes": self.n_target_classes,
                "alpha_max": self.alpha_max, "eta": self.eta, "beta": self.beta}

    def _run(self, model, x, y, seed):
        from pyautoattack.fab_pt import FABAttack_PT

        _pyautoattack()
        targets = min(self.n_target_classes, num_classes(model, x) - 1)
        attack = FABAttack_PT(model, norm=self.norm, n_restarts=self.restarts, n_iter=self.steps, eps=self.eps,
                              alpha_max=self.alpha_max, eta=self.eta, beta=self.beta, verbose=False, seed=seed,
                              targeted=True, device=x.device, n_target_classes=targets)
        return attack.perturb(x, y)


class Square(Attack):
    """Square Attack (black-box, score-based; pyautoattack's ``SquareAttack``, 5000 queries as in A.3).

    It never looks at gradients, so masking cannot fool it: a gap between it and the white-box attacks is a
    masking symptom.
    """

    name = "square"
    kind = "black-box"

    def __init__(self, *, norm: str = "Linf", eps: float = 8 / 255, queries: int = 5000, p_init: float = 0.8,
                 restarts: int = 1) -> None:
        super().__init__(norm=norm, eps=eps)
        self.queries, self.p_init, self.restarts = int(queries), float(p_init), int(restarts)

    def params(self):
        return {"queries": self.queries, "p_init": self.p_init, "restarts": self.restarts, "loss": "margin"}

    def _run(self, model, x, y, seed):
        from pyautoattack.square import SquareAttack

        _pyautoattack()
        attack = SquareAttack(model, norm=self.norm, n_queries=self.queries, eps=self.eps, p_init=self.p_init,
                              n_restarts=self.restarts, seed=seed, verbose=False, loss="margin",
                              resc_schedule=False, device=x.device)
        with torch.no_grad():
            return attack.perturb(x, y)


@contextlib.contextmanager
def _keep_tracer() -> Iterator[None]:
    """AutoAttack's ``check_dynamic`` calls ``sys.settrace(None)``, which would silently switch off a
    debugger or coverage; put the previous tracer back."""
    tracer = sys.gettrace()
    try:
        yield
    finally:
        sys.settrace(tracer)


class AutoAttackStandard(Attack):
    """Standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square in cascade) via ``pyautoattack.AutoAttack``.

    The whole batch goes to ``run_standard_evaluation`` in one chunk, so a run of this class on a batch is the
    reference run on that batch with the same seed. ``steps``/``queries`` other than 100/5000 are a
    non-standard (cheaper) AutoAttack, flagged as such in ``settings()``.
    """

    name = "aa"

    def __init__(self, *, norm: str = "Linf", eps: float = 8 / 255, steps: int = 100, queries: int = 5000) -> None:
        super().__init__(norm=norm, eps=eps)
        self.steps, self.queries = int(steps), int(queries)

    def params(self):
        return {"version": "standard", "steps": self.steps, "queries": self.queries,
                "standard": self.steps == 100 and self.queries == 5000}

    def build(self, model: nn.Module, seed: int, device: torch.device | str, n_classes: int) -> Any:
        """The configured ``pyautoattack.AutoAttack`` (also used by the cross-check test)."""
        pa = _pyautoattack()
        adversary = pa.AutoAttack(model, norm=self.norm, eps=self.eps, seed=seed, version="standard",
                                  device=device)
        adversary.verbose = False
        if self.steps != 100:
            # AutoAttack hard-codes n_iter=100 and APGD derives its step-size schedule in __init__, so the
            # sub-attacks must be rebuilt (mirroring AutoAttack's constructor), not just have n_iter set.
            from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
            from pyautoattack.fab_pt import FABAttack_PT

            common = dict(eps=self.eps, norm=self.norm, seed=seed, device=device)
            adversary.apgd = APGDAttack(model, n_restarts=5, n_iter=self.steps, verbose=False, eot_iter=1,
                                        rho=0.75, logger=adversary.logger, **common)
            adversary.apgd_targeted = APGDAttack_targeted(model, n_restarts=1, n_iter=self.steps, verbose=False,
                                                          eot_iter=1, rho=0.75, logger=adversary.logger,
                                                          **common)
            adversary.fab = FABAttack_PT(model, n_restarts=5, n_iter=self.steps, verbose=False, **common)
            adversary._set_version("standard")
        adversary.square.n_queries = self.queries
        targets = min(9, n_classes - 1)
        adversary.apgd_targeted.n_target_classes = targets
        adversary.fab.n_target_classes = targets
        return adversary

    def _run(self, model, x, y, seed):
        from pyautoattack import checks

        adversary = self.build(model, seed, x.device, num_classes(model, x))
        # check_dynamic's call counters are module globals that are never reset: one positive would stick
        # to every later run, so start each run from zero.
        for key in checks.funcs:
            checks.funcs[key] = 0
        with _keep_tracer():
            x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=len(x))
        return x_adv


class BPDA(Attack):
    """Run ``inner`` with identity gradients through every MeanSparse operator (``ms.straight_through``).

    The forward pass is unchanged, so every candidate is a genuine input for the real model. A wrapper of
    our own because only this package knows its operators; the inner attack is unchanged.
    """

    kind = "bpda"

    def __init__(self, inner: Attack) -> None:
        super().__init__(norm=inner.norm, eps=inner.eps)
        self.inner = inner
        self.name = f"bpda-{inner.name}"

    @property
    def seed_key(self) -> str:
        return self.inner.seed_key

    def params(self):
        return {"inner": self.inner.settings()}

    def _run(self, model, x, y, seed):
        import meansparse as ms

        with ms.straight_through(model):
            return self.inner.run(model, x, y, seed=seed)


@contextlib.contextmanager
def zero_alphas(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily set every operator's alpha to 0: the band is empty, the operators are the identity and
    the model is its base model."""
    import meansparse as ms

    ops = ms.operators(model)
    saved = [op.alpha_value for op in ops]  # the exact Python value, so restoring is bit-identical
    try:
        for op in ops:
            op.set_alpha(0.0)
        yield model
    finally:
        for op, a in zip(ops, saved):
            op.set_alpha(a)


class Transfer(Attack):
    """APGD-CE then APGD-T crafted on the base model, judged on the sparsified model.

    The base model is ``base_model`` when given, else the same model with all alphas 0 for the duration of
    the crafting. Per sample the APGD-CE candidate is kept if it fools the target model, else APGD-T's.
    Our own wrapper (pyautoattack has no transfer mode); the crafting attacks are pyautoattack's.
    """

    name = "transfer"
    kind = "transfer"

    def __init__(self, *, norm: str = "Linf", eps: float = 8 / 255, base_model: nn.Module | None = None,
                 steps: int = 100, n_target_classes: int = 9) -> None:
        super().__init__(norm=norm, eps=eps)
        self.base_model = base_model
        self.steps, self.n_target_classes = int(steps), int(n_target_classes)
        self.sources = (APGD(norm=norm, eps=eps, loss="ce", steps=steps),
                        APGDTargeted(norm=norm, eps=eps, steps=steps, n_target_classes=n_target_classes))

    def params(self):
        return {"base": "base_model" if self.base_model is not None else "alpha=0",
                "sources": [s.settings() for s in self.sources]}

    def _run(self, model, x, y, seed):
        x_adv = x.clone()
        todo = torch.ones(len(x), dtype=torch.bool, device=x.device)
        for source in self.sources:
            idx = todo.nonzero().flatten()
            if len(idx) == 0:
                break
            if self.base_model is not None:
                cand = source.run(self.base_model, x[idx], y[idx], seed=seed)
            else:
                with zero_alphas(model):
                    cand = source.run(model, x[idx], y[idx], seed=seed)
            with torch.no_grad():
                fooled = model(cand).argmax(1) != y[idx]
            x_adv[idx[fooled]] = cand[fooled]
            todo[idx[fooled]] = False
        return x_adv


def band_mask(op: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Positions of ``z`` (an operator input) that ``op`` replaces by its centre: |z - mu| < alpha * sigma."""
    if op.alpha_value == 0.0:
        return torch.zeros_like(z, dtype=torch.bool)
    m, t = op.center_threshold()
    cd = op.channel_dim(z.ndim)

    def bc(v: torch.Tensor) -> torch.Tensor:
        v = v.to(device=z.device, dtype=z.dtype)
        if v.ndim == 0:
            return v
        shape = [1] * z.ndim
        shape[cd] = -1
        return v.view(shape)

    return (z - bc(m)).abs() < bc(t)


class AdaptivePGD(Attack):
    """The paper's adaptive PGD (appendix A.4).

    Maximises CE(f(x+d), y) - lam * sum_k ||M_k * (z_k(x+d) - z_k(x))||^2, where z_k is the input of the
    k-th MeanSparse operator and M_k marks the positions that operator blocks on the clean input.
    Hand-written: the loss needs the operators' inputs, which no attack library can see.
    """

    name = "adaptive"
    kind = "adaptive"

    def __init__(self, *, norm: str = "Linf", eps: float = 8 / 255, lam: float = 1.0, steps: int = 50,
                 step_size: float | None = None, random_start: bool = True, name: str | None = None) -> None:
        super().__init__(norm=norm, eps=eps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if name is not None:  # e.g. two λ values side by side: AdaptivePGD(lam=10, name="adaptive-lam10")
            self.name = name
        self.lam = float(lam)
        self.steps = int(steps)
        self.step_size = float(step_size) if step_size is not None else 2.5 * self.eps / self.steps
        self.random_start = bool(random_start)

    def params(self):
        return {"lam": self.lam, "steps": self.steps, "step_size": self.step_size,
                "random_start": self.random_start}

    def _run(self, model, x, y, seed):
        import meansparse as ms

        from ..pgd import pgd

        ops = ms.operators(model)
        inputs: list[torch.Tensor | None] = [None] * len(ops)

        def hook(k: int) -> Callable:
            def fn(module, args):
                # an in-place operator overwrites its input, so keep a (differentiable) copy
                inputs[k] = args[0].clone() if getattr(module, "inplace", False) else args[0]

            return fn

        handles = [op.register_forward_pre_hook(hook(k)) for k, op in enumerate(ops)]
        try:
            with torch.no_grad():
                model(x)
                clean = [z.detach() for z in inputs]
                masks = [band_mask(op, z).to(z.dtype) for op, z in zip(ops, clean)]
            tracker = _SuccessTracker(x)

            def loss_fn(xa: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
                logits = model(xa)
                tracker.update(xa, logits, yy)
                loss = F.cross_entropy(logits, yy, reduction="none")
                for z, z0, m in zip(inputs, clean, masks):
                    loss = loss - self.lam * (m * (z - z0)).pow(2).flatten(1).sum(1)
                return loss

            gen = torch.Generator().manual_seed(seed)
            final = pgd(loss_fn, x, y, eps=self.eps, step_size=self.step_size, steps=self.steps, norm=self.norm,
                        rand_init=self.random_start, generator=gen)
        finally:
            for h in handles:
                h.remove()
        return tracker.merge(model, final, y)


# ------------------------------------------------------------------------------------------------ registry
_FACTORIES: dict[str, Callable[..., Attack]] = {
    "clean": Clean,
    "pgd": PGD,
    "apgd-ce": lambda **kw: APGD(loss="ce", **kw),
    "apgd-dlr": lambda **kw: APGD(loss="dlr", **kw),
    "apgd-t": APGDTargeted,
    "fab-t": FABTargeted,
    "square": Square,
    "aa": AutoAttackStandard,
    "transfer": Transfer,
    "adaptive": AdaptivePGD,
}
# attacks that use gradients, hence have a meaningful BPDA variant
BPDA_ATTACKS = ("pgd", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "aa", "adaptive")
ATTACK_NAMES: tuple[str, ...] = tuple(_FACTORIES) + tuple(f"bpda-{a}" for a in BPDA_ATTACKS)
DEFAULT_ATTACKS = ("aa", "bpda-apgd-ce", "bpda-apgd-t", "transfer", "square")


def build_attack(name: str, *, norm: str = "Linf", eps: float = 8 / 255, base_model: nn.Module | None = None,
                 **options: Any) -> Attack:
    """The attack called ``name`` (see ``ATTACK_NAMES``) with ``options`` overriding its defaults."""
    if name not in ATTACK_NAMES:
        raise ValueError(f"unknown attack {name!r}; valid attacks: {', '.join(ATTACK_NAMES)}")
    if name.startswith("bpda-"):
        return BPDA(build_attack(name[5:], norm=norm, eps=eps, **options))
    if name == "transfer":
        options["base_model"] = base_model
    try:
        return _FACTORIES[name](norm=norm, eps=eps, **options)
    except TypeError as e:
        raise ValueError(f"bad options for attack {name!r}: {e}") from e
