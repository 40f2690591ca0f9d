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

# Every module exports what its ``__all__`` names; this package re-exports those names (so a function added
# to a module, with its name in that module's ``__all__``, is public without an edit here).
from dpkd.spec.results import FusedPreferenceLoss, PreferenceLoss, TokenPreferenceLoss
from dpkd.spec.validation import DPKDInputError

from . import distill as _distill
from . import fused as _fused
from . import fused_token as _fused_token
from . import logps as _logps
from . import metrics as _metrics
from . import modules as _modules
from . import objective as _objective
from . import sequence as _sequence
from . import token as _token
from .distill import *  # noqa: F403
from .fused import *  # noqa: F403
from .fused_token import *  # noqa: F403
from .logps import *  # noqa: F403
from .metrics import *  # noqa: F403
from .modules import *  # noqa: F403
from .objective import *  # noqa: F403
from .sequence import *  # noqa: F403
from .token import *  # noqa: F403

_MODULES = (_logps, _sequence, _token, _distill, _metrics, _objective, _modules, _fused, _fused_token)

# The array library the functions of this module take (read by the conformance suite's adapters).
DPKD_FRAMEWORK = "torch"

__all__ = ["DPKD_FRAMEWORK", "DPKDInputError", "PreferenceLoss", "TokenPreferenceLoss", "FusedPreferenceLoss",
           *(name for m in _MODULES for name in m.__all__)]
