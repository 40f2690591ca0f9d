"""dpkd.spec — the NumPy float64 reference specification of the DPKD loss family.

This package IS the specification: every backend (``dpkd.backends.torch``, ``dpkd.backends.jax``, or a
third party's) is proven equal to it by ``pytest conformance/``. It imports neither torch nor jax.

Naming (the convention DPO trainers use, so the losses drop into them): policy = the student q_θ,
reference = the teacher p, chosen = the teacher's output y_t, rejected = the student's output y_s.
The mathematics is in ``spec/README.md``; the exact calling contract in ``spec/CONVENTIONS.md``.
"""

# Every module exports what its ``__all__`` names; this package re-exports those names (so a function added
# to a module, with its name in that module's ``__all__``, is public without an edit here).
from . import distill as _distill
from . import logps as _logps
from . import metrics as _metrics
from . import objective as _objective
from . import results as _results
from . import sequence as _sequence
from . import token as _token
from .distill import *  # noqa: F403
from .logps import *  # noqa: F403
from .metrics import *  # noqa: F403
from .objective import *  # noqa: F403
from .results import *  # noqa: F403
from .sequence import *  # noqa: F403
from .token import *  # noqa: F403
from .validation import DPKDInputError

# The array library the functions of this module take (read by the conformance suite's adapters).
DPKD_FRAMEWORK = "numpy"

__all__ = ["DPKD_FRAMEWORK", "DPKDInputError",
           *(name for m in (_results, _logps, _sequence, _token, _distill, _metrics, _objective) for name in m.__all__)]
