"""Honest robustness evaluation: per-example worst case over white-box, BPDA, transfer, black-box and
adaptive attacks, with integrity checks (gradient-masking warning, sanity checks).

``pyautoattack`` (the ``eval`` extra) is imported only when an APGD/FAB/Square/AutoAttack attack runs.
"""

from .adversarial import AdversarialSet, load_adversarial, rejudge
from .attacks import (
    APGD,
    ATTACK_NAMES,
    BPDA,
    BPDA_ATTACKS,
    DEFAULT_ATTACKS,
    PGD,
    AdaptivePGD,
    APGDTargeted,
    Attack,
    AutoAttackStandard,
    Clean,
    FABTargeted,
    Square,
    SquareWarm,
    Surrogate,
    Transfer,
    build_attack,
    zero_alphas,
)
from .evaluate import evaluate
from .hashing import derive_seed, model_hash
from .indicators import attack_failure_indicators
from .ladder import Ladder
from .masking import masking_findings
from .report import Report, attack_budget
from .sanity import SanityFinding, sanity_checks
from .spec import PATHS, EvaluationSpec
from .validation import check_attack_names

__all__ = [
    "AdversarialSet", "load_adversarial", "rejudge",
    "APGD", "ATTACK_NAMES", "BPDA", "BPDA_ATTACKS", "DEFAULT_ATTACKS", "PGD", "APGDTargeted", "AdaptivePGD",
    "Attack", "AutoAttackStandard", "Clean", "EvaluationSpec", "FABTargeted", "Ladder", "PATHS", "Report",
    "SanityFinding", "Square", "SquareWarm", "Surrogate", "Transfer", "attack_budget", "attack_failure_indicators",
    "build_attack", "check_attack_names", "derive_seed", "evaluate", "masking_findings",
    "model_hash", "sanity_checks", "zero_alphas"
]
