"""dpkd.backends.torch — the dpkd API in PyTorch, proven equal to the NumPy spec by ``pytest conformance/``.

Same names and signatures as ``dpkd.spec`` (without the ``*_grad`` functions: autograd provides them), so
``from dpkd.backends.torch import dpkd_loss`` drops into a DPO-style trainer. Naming: policy = the student
q_θ, reference = the teacher p, chosen = the teacher's output y_t, rejected = the student's output y_s.

Dtypes: float64 in → float64 math; float32 → float32; bfloat16/float16 → log-softmax, logsumexp and
reductions in float32 and the loss returned in float32 (gradients in the input dtype). Errors are the
spec's ``DPKDInputError`` with the spec's messages; student/teacher tensors on different devices or with
different dtypes are refused by name. Data-dependent checks (NaN/Inf, lengths > 0, labels in range,
binary masks, empty means) run eagerly and are skipped under ``torch.compile`` and ``torch.func``
transforms (see ``_base``). CPU and CUDA alike; nothing assumes CUDA.

Also: ``nn.Module`` wrappers configured once (``DPKDLoss(beta=...)``, ``DPKDTokenLoss``, ``IPOLoss``,
``CPOLoss``, ``SimPOLoss``, ``DPOPLoss``, ``CrossEntropyLoss``, ``ForwardKL``, ``ReverseKL``,
``GeneralizedJSD``, ``AKL``).
"""

from dpkd.spec.results import FusedPreferenceLoss, PreferenceLoss, TokenPreferenceLoss
from dpkd.spec.validation import DPKDInputError

from .distill import akl, cross_entropy, forward_kl, generalized_jsd, reverse_kl
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
from .metrics import first_token_divergence, implicit_reward, preference_metrics
from .modules import (
    AKL,
    CPOLoss,
    CrossEntropyLoss,
    DPKDLoss,
    DPKDTokenLoss,
    DPOPLoss,
    ForwardKL,
    GeneralizedJSD,
    IPOLoss,
    ReverseKL,
    SimPOLoss,
)
from .objective import DISTIL_ONLY, PAPER_OBJECTIVE, RELEASED_OBJECTIVE, ObjectiveConfig, objective
from .sequence import cpo_loss, dpkd_loss, dpop_loss, ipo_loss, simpo_loss
from .token import dpkd_token_loss

# The array library the functions of this module take (read by the conformance suite's adapters).
DPKD_FRAMEWORK = "torch"

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
    # nn.Module wrappers
    "DPKDLoss",
    "IPOLoss",
    "CPOLoss",
    "SimPOLoss",
    "DPOPLoss",
    "DPKDTokenLoss",
    "CrossEntropyLoss",
    "ForwardKL",
    "ReverseKL",
    "GeneralizedJSD",
    "AKL",
    # fused token-chunked lm_head path
    "linear_token_logps",
    "fused_sequence_loss",
    "fused_dpkd_loss",
    "fused_ipo_loss",
    "fused_cpo_loss",
    "fused_simpo_loss",
    "fused_dpop_loss",
    "NamedSequenceLoss",
    "fused_token_loss",
    "fused_dpkd_token_loss",
    "fused_forward_kl",
    "fused_reverse_kl",
    "fused_generalized_jsd",
    "fused_akl",
    "fused_cross_entropy",
    "NamedTokenLoss",
    "TeacherLMHead",
    "TeacherLogps",
    "auto_chunk_size",
]
