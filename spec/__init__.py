"""dpkd.spec — the NumPy float64 reference specification of the DPKD loss family.

This package IS the specification: every backend (``dpkd.backends.torch``, ``dpkd.backends.jax``, or a
third party's) is proven equal to it by ``pytest conformance/``. It imports neither torch nor jax.

Naming (the convention DPO trainers use, so the losses drop into them): policy = the student q_θ,
reference = the teacher p, chosen = the teacher's output y_t, rejected = the student's output y_s.
The mathematics is in ``spec/README.md``; the exact calling contract in ``spec/CONVENTIONS.md``.
"""

from .distill import (
    akl,
    akl_grad,
    cross_entropy,
    cross_entropy_grad,
    first_token_divergence,
    forward_kl,
    forward_kl_grad,
    generalized_jsd,
    generalized_jsd_grad,
    reverse_kl,
    reverse_kl_grad,
)
from .logps import (
    sequence_logps,
    sequence_logps_grad,
    shift_for_causal_lm,
    token_logps,
    token_logps_grad,
)
from .metrics import implicit_reward, preference_metrics
from .objective import DISTIL_ONLY, PAPER_OBJECTIVE, RELEASED_OBJECTIVE, ObjectiveConfig, objective, objective_grad
from .results import PreferenceLoss, TokenPreferenceLoss
from .sequence import (
    cpo_loss,
    cpo_loss_grad,
    dpkd_loss,
    dpkd_loss_grad,
    dpop_loss,
    dpop_loss_grad,
    ipo_loss,
    ipo_loss_grad,
    simpo_loss,
    simpo_loss_grad,
)
from .token import dpkd_token_loss, dpkd_token_loss_grad
from .validation import DPKDInputError

# The array library the functions of this module take (read by the conformance suite's adapters).
DPKD_FRAMEWORK = "numpy"

__all__ = [
    "DPKD_FRAMEWORK",
    "DPKDInputError",
    "PreferenceLoss",
    "TokenPreferenceLoss",
    # log-probabilities
    "token_logps",
    "sequence_logps",
    "shift_for_causal_lm",
    # sequence-level preference losses
    "dpkd_loss",
    "ipo_loss",
    "cpo_loss",
    "simpo_loss",
    "dpop_loss",
    # token-level
    "dpkd_token_loss",
    "cross_entropy",
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "akl",
    # metrics
    "implicit_reward",
    "preference_metrics",
    "first_token_divergence",
    # objective
    "ObjectiveConfig",
    "objective",
    "PAPER_OBJECTIVE",
    "RELEASED_OBJECTIVE",
    "DISTIL_ONLY",
    # analytic gradients (spec only)
    "token_logps_grad",
    "sequence_logps_grad",
    "dpkd_loss_grad",
    "ipo_loss_grad",
    "cpo_loss_grad",
    "simpo_loss_grad",
    "dpop_loss_grad",
    "dpkd_token_loss_grad",
    "cross_entropy_grad",
    "forward_kl_grad",
    "reverse_kl_grad",
    "generalized_jsd_grad",
    "akl_grad",
    "objective_grad",
]
