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

from dpkd.spec.results import PreferenceLoss, TokenPreferenceLoss
from dpkd.spec.validation import DPKDInputError

from .distill import akl, cross_entropy, forward_kl, generalized_jsd, reverse_kl
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
]
