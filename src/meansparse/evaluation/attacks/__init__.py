"""Every attack behind one interface: ``Attack.run(model, x, y, seed=...) -> x_adv``, one attack per module.

The APGD/FAB/Square family and standard AutoAttack are the reference implementations from
``pyautoattack`` (imported lazily: it is the ``eval`` extra); only attacks that no torchvision-free library
offers are written here (PGD-k, the paper's adaptive PGD, the BPDA, surrogate and transfer wrappers, the
margin loss and warm start handed to the library's APGD and Square).
"""

from .adaptive import AdaptivePGD
from .apgd import APGD, APGDTargeted, margin_loss
from .autoattack import AutoAttackStandard, keep_tracer
from .base import FAMILIES, LIBRARY_LOGGER, NORMS, Attack, SuccessTracker, num_classes, require_pyautoattack
from .bpda import BPDA
from .clean import Clean
from .fab import FABTargeted
from .pgd import PGD
from .registry import (
    ATTACK_NAMES,
    BPDA_ATTACKS,
    DEFAULT_ATTACKS,
    SURROGATE_ATTACKS,
    build_attack,
    options_for,
    split_wrapper,
)
from .square import Square, SquareWarm
from .surrogate import GradientMix, Surrogate
from .transfer import Transfer, zero_alphas

__all__ = [
    "APGD", "ATTACK_NAMES", "BPDA", "BPDA_ATTACKS", "DEFAULT_ATTACKS", "FAMILIES", "LIBRARY_LOGGER", "NORMS",
    "PGD", "SURROGATE_ATTACKS", "APGDTargeted", "AdaptivePGD", "Attack", "AutoAttackStandard", "Clean", "FABTargeted",
    "GradientMix", "Square", "SquareWarm", "SuccessTracker", "Surrogate", "Transfer", "build_attack", "keep_tracer",
    "margin_loss", "num_classes", "options_for", "require_pyautoattack", "split_wrapper", "zero_alphas"
]
