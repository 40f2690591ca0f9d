"""dpkd.backends.jax — the dpkd API as pure functions on ``jax.Array``.

The same names and signatures as ``dpkd.spec`` (spec/CONVENTIONS.md; ``*_grad`` excepted: ``jax.grad`` is
the gradient), written against ``jax.numpy`` independently of the NumPy spec and proven equal to it by
``pytest conformance/``. Errors come from ``dpkd.spec.validation`` (identical messages), result types from
``dpkd.spec.results``.

Naming (DPO trainers' convention): policy = student q_θ, reference = teacher p, chosen = teacher output
y_t, rejected = student output y_s.

Transforms:
* ``jax.grad`` / ``jax.value_and_grad``: every loss; gradients equal the spec's ``*_grad``.
* ``jax.jit``: options are keyword arguments and must be static — use ``jit(fn)`` here, or
  ``jax.jit(fn, static_argnames=STATIC_ARGNAMES[name])``. Array keywords (lengths) stay traced.
* ``jax.vmap`` over a leading axis of problems: shape checks see the per-problem shapes.
* Value checks (NaN/Inf, lengths ≤ 0, labels out of range, non-binary mask, empty mean) raise eagerly,
  are skipped when traced, and run under jit through checkify: ``err, out = jit(checked(fn))(...)``,
  then ``throw(err)``.

Dtypes: float64 math for float64 inputs (``jax_enable_x64``), float32 for float32, and float32 (outputs
included) for bfloat16/float16 inputs; gradients come back in the input's dtype.
"""

from dpkd.spec.results import FusedPreferenceLoss, PreferenceLoss, TokenPreferenceLoss
from dpkd.spec.validation import DPKDInputError

from .distill import akl, cross_entropy, first_token_divergence, forward_kl, generalized_jsd, reverse_kl
from .fused import (
    NamedSequenceLoss,
    TeacherLMHead,
    TeacherLogps,
    auto_chunk_size,
    fused_cpo_loss,
    fused_dpkd_loss,
    fused_dpop_loss,
    fused_ipo_loss,
    fused_sequence_loss,
    fused_simpo_loss,
    linear_token_logps,
)
from .fused_token import (
    NamedTokenLoss,
    fused_akl,
    fused_cross_entropy,
    fused_dpkd_token_loss,
    fused_forward_kl,
    fused_generalized_jsd,
    fused_reverse_kl,
    fused_token_loss,
)
from .logps import sequence_logps, shift_for_causal_lm, token_logps
from .metrics import implicit_reward, preference_metrics
from .objective import DISTIL_ONLY, PAPER_OBJECTIVE, RELEASED_OBJECTIVE, ObjectiveConfig, objective
from .sequence import cpo_loss, dpkd_loss, dpop_loss, ipo_loss, simpo_loss
from .token import dpkd_token_loss
from .transforms import STATIC_ARGNAMES, checked, jit, throw

# The array library the functions of this module take (read by the conformance suite's adapters).
DPKD_FRAMEWORK = "jax"

__all__ = [
    "DPKD_FRAMEWORK",
    "DPKDInputError",
    "PreferenceLoss",
    "TokenPreferenceLoss",
    "FusedPreferenceLoss",
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
    # transforms
    "jit",
    "checked",
    "throw",
    "STATIC_ARGNAMES",
    # fused token-chunked lm_head path
    "linear_token_logps",
    "fused_sequence_loss",
    "fused_dpkd_loss",
    "fused_ipo_loss",
    "fused_cpo_loss",
    "fused_simpo_loss",
    "fused_dpop_loss",
    "NamedSequenceLoss",
    "TeacherLMHead",
    "TeacherLogps",
    "auto_chunk_size",
    "NamedTokenLoss",
    "fused_token_loss",
    "fused_dpkd_token_loss",
    "fused_forward_kl",
    "fused_reverse_kl",
    "fused_generalized_jsd",
    "fused_akl",
    "fused_cross_entropy",
]
