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

# Every module exports what its ``__all__`` names; this package re-exports those names (so a function added
# to a module, with its name in that module's ``__all__``, is public without an edit here).
from dpkd.spec.results import FusedPreferenceLoss, PreferenceLoss, TokenPreferenceLoss
from dpkd.spec.validation import DPKDInputError

from . import distill as _distill
from . import fused as _fused
from . import fused_token as _fused_token
from . import logps as _logps
from . import metrics as _metrics
from . import objective as _objective
from . import sequence as _sequence
from . import token as _token
from . import transforms as _transforms
from .distill import *  # noqa: F403
from .fused import *  # noqa: F403
from .fused_token import *  # noqa: F403
from .logps import *  # noqa: F403
from .metrics import *  # noqa: F403
from .objective import *  # noqa: F403
from .sequence import *  # noqa: F403
from .token import *  # noqa: F403
from .transforms import *  # noqa: F403

_MODULES = (_logps, _sequence, _token, _distill, _metrics, _objective, _transforms, _fused, _fused_token)

# The array library the functions of this module take (read by the conformance suite's adapters).
DPKD_FRAMEWORK = "jax"

__all__ = ["DPKD_FRAMEWORK", "DPKDInputError", "PreferenceLoss", "TokenPreferenceLoss", "FusedPreferenceLoss",
           *(name for m in _MODULES for name in m.__all__)]
