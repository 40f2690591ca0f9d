"""The one base mechanism of the JAX backend: dtype policy, validation glue, stable primitives, reductions.

Every loss module builds on these; none re-implements them. The mathematics is written against ``jax.numpy``
directly (never by calling ``dpkd.spec``), while every error is raised through ``dpkd.spec.validation`` so
that the message is the spec's, word for word.

Dtype policy (spec/CONVENTIONS.md, "General"): float64 in → float64 math (needs ``jax_enable_x64``);
float32 in → float32 math; bfloat16/float16 in → the math runs in float32 and every float output (loss,
rewards, log-probs, metrics) comes back in float32. Mixed inputs run in the widest of them (at least
float32). The cast is an ordinary ``astype``, so ``jax.grad`` hands gradients back in the caller's dtype.

Validation, and what happens under the JAX transforms:

* options (reduction, form, β, …) and shapes/dtypes are Python facts: they are checked on every call,
  eager, under ``jax.jit`` (options must then be static — ``dpkd.backends.jax.jit`` marks them), under
  ``jax.vmap`` (on the per-problem shapes) and under ``jax.grad``;
* value checks (finite inputs, lengths > 0, labels in the vocabulary, binary mask, non-empty mean) need the
  data. They raise eagerly whenever the predicate is concrete (plain calls, and ``jax.grad`` /
  ``jax.value_and_grad`` of eager calls); they are skipped while the predicate is traced (``jax.jit``,
  ``jax.vmap``) — unless the call runs inside ``dpkd.backends.jax.checked``, which turns each of them into
  a ``jax.experimental.checkify`` check carrying the identical message.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from dpkd.spec import validation as v
from jax.experimental import checkify

__all__ = [
    "compute_dtype",
    "index_dtype",
    "emitting_checks",
    "value_check",
    "option",
    "options",
    "require",
    "shape_of",
    "as_array",
    "float_arg",
    "integer_arg",
    "mask_arg",
    "check_finite",
    "check_positive",
    "check_labels",
    "check_labelled_rows",
    "check_binary",
    "ValueChecks",
    "softplus",
    "smoothed_sigmoid_loss",
    "log_softmax",
    "logsumexp",
    "shifted_normalizer",
    "picked_log_softmax",
    "gather_last",
    "reduce_elements",
    "token_denominator",
    "reduce_tokens",
    "scalar_out",
    "TokenInputs",
    "token_inputs",
    "A",
    "B",
    "C",
    "D",
    "LT",
    "LS",
    "Arrays",
    "sequence_inputs",
    "margin",
]

# --------------------------------------------------------------------------------------------------
# Dtype policy


def compute_dtype(*arrays: jax.Array | None) -> np.dtype:
    """The dtype the math runs in: the widest floating input, at least float32.

    Integer inputs (accepted for float arguments, like the spec) do not vote; with no floating input at all
    the math runs in JAX's default float (float64 under x64, else float32)."""
    floats = [x.dtype for x in arrays if x is not None and jnp.issubdtype(x.dtype, jnp.floating)]
    if not floats:
        return jnp.result_type(float)
    return jnp.promote_types(jnp.result_type(*floats), jnp.float32)


def index_dtype() -> np.dtype:
    """int64 under x64 (the spec's token-count dtype), else int32 (JAX has no int64 without x64)."""
    return jax.dtypes.canonicalize_dtype(jnp.int64)


# --------------------------------------------------------------------------------------------------
# Value checks: eager when concrete, checkify checks inside `checked`, skipped otherwise

_EMIT_CHECKIFY = contextvars.ContextVar("dpkd_jax_emit_checkify", default=False)


@contextlib.contextmanager
def emitting_checks() -> Iterator[None]:
    """While active, traced value checks become ``checkify.check`` calls (used by ``checked``)."""
    token = _EMIT_CHECKIFY.set(True)
    try:
        yield
    finally:
        _EMIT_CHECKIFY.reset(token)


def _message(raise_fn: Callable[[], None]) -> str:
    """The exact message the validation helper raises (so checkify reports the spec's words)."""
    try:
        raise_fn()
    except v.DPKDInputError as e:
        return str(e)
    raise AssertionError("a validation raise_fn must raise")  # pragma: no cover


def value_check(ok: jax.Array, raise_fn: Callable[[], None]) -> None:
    """Run one data-dependent check. ``ok`` is a boolean scalar; ``raise_fn`` raises the spec's error.

    Concrete ``ok`` (eager, or eager under ``jax.grad``): raise now if false. Traced ``ok`` (jit, vmap): a
    ``checkify.check`` when inside ``checked``, else skipped (a staged check that nobody functionalises
    would make ``jax.jit`` fail)."""
    try:
        holds = bool(ok)
    except jax.errors.ConcretizationTypeError:
        if _EMIT_CHECKIFY.get():
            # checkify formats its message with str.format: escape literal braces
            checkify.check(ok, _message(raise_fn).replace("{", "{{").replace("}", "}}"))
        return
    if not holds:
        raise_fn()


def check_finite(func: str, name: str, x: jax.Array | None) -> None:
    if x is not None and jnp.issubdtype(x.dtype, jnp.inexact):
        value_check(jnp.all(jnp.isfinite(x)), lambda: v.check_finite(func, name, False))


def check_positive(func: str, name: str, x: jax.Array | None) -> None:
    if x is not None:
        value_check(jnp.all(x > 0), lambda: v.check_positive_lengths(func, name, False))


def check_labels(func: str, name: str, labels: jax.Array, vocab_size: int, ignore_index: int) -> None:
    valid = ((labels >= 0) & (labels < vocab_size)) | (labels == ignore_index)
    value_check(jnp.all(valid), lambda: v.check_labels_in_vocab(func, name, False, vocab_size, ignore_index))


def check_labelled_rows(func: str, name: str, labels: jax.Array, ignore_index: int) -> None:
    """Every row of ``labels`` [B, T] has a label that is not ``ignore_index`` (its length is > 0)."""
    value_check(jnp.all(jnp.any(labels != ignore_index, axis=-1)),
                lambda: v.check_labelled_rows(func, name, False, ignore_index))


class ValueChecks:
    """The data-dependent checks of one call, as the framework-free checks of ``dpkd.spec.fused`` call them:
    each runs as it is added (``value_check``: eager, or a checkify check inside ``checked``); ``run`` has
    nothing left to do (the Torch backend's collects them for one host transfer)."""

    def __init__(self, func: str):
        self.func = func

    def finite_array(self, name: str, x: jax.Array | None) -> None:
        check_finite(self.func, name, x)

    def labels_in_vocab(self, name: str, labels: jax.Array, vocab_size: int, ignore_index: int) -> None:
        check_labels(self.func, name, labels, vocab_size, ignore_index)

    def binary(self, name: str, mask: jax.Array) -> None:
        check_binary(self.func, name, mask)

    def labelled_rows(self, name: str, labels: jax.Array, ignore_index: int) -> None:
        check_labelled_rows(self.func, name, labels, ignore_index)

    def run(self) -> None:
        return None


def check_binary(func: str, name: str, mask: jax.Array) -> None:
    if mask.dtype != jnp.bool_:
        value_check(jnp.all((mask == 0) | (mask == 1)), lambda: v.check_binary_mask(func, name, False))


# --------------------------------------------------------------------------------------------------
# Arguments


def option(func: str, name: str, x: Any) -> Any:
    """A scalar option as a Python value, ready for the validation helper.

    A concrete 0-dim array is read (eager convenience); a traced one is refused with a message that says
    how to fix it (options select the computation, so under ``jax.jit`` they must be static)."""
    if isinstance(x, jax.core.Tracer):
        v.fail(func, name, "must be a static Python value under jax.jit/vmap (mark it static, e.g. with "
                           "dpkd.backends.jax.jit), got a traced array")
    if isinstance(x, (jax.Array, np.ndarray)) and x.ndim == 0:
        return x.item()
    return x


def options(func: str, **values: Any) -> dict[str, Any]:
    """The call's options read as Python values (``option``), then checked against the spec's declaration
    (``dpkd.spec.validation.check_options``, signature order); returns the checked values."""
    return v.check_options(func, **{name: option(func, name, x) for name, x in values.items()})


def require(func: str, **arrays: Any) -> None:
    """The spec's presence check, in argument order: ``None`` for a required array is an error."""
    for name, x in arrays.items():
        v.require(func, name, x)


def as_array(x: Any) -> jax.Array:
    """jax arrays and tracers pass through; NumPy arrays, lists and Python numbers are wrapped."""
    if isinstance(x, jax.Array):
        return x
    return jnp.asarray(x)


def _is_number_dtype(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))


def float_arg(func: str, name: str, x: Any) -> jax.Array:
    """A float array argument: required, floating or integer (integers are promoted, like the spec).

    Not yet checked for finiteness: every value check comes after every shape/dtype check."""
    require(func, **{name: x})
    if not isinstance(x, jax.Array):
        # judge the dtype on the host first: an object array (e.g. holding None) cannot become a jax array
        host = np.asarray(x)
        if host.dtype == object or not _is_number_dtype(host.dtype):
            v.check_floating_dtype(func, name, False, host.dtype)
    a = as_array(x)
    if not _is_number_dtype(a.dtype):
        v.check_floating_dtype(func, name, False, a.dtype)
    return a


def integer_arg(func: str, name: str, x: Any) -> jax.Array:
    require(func, **{name: x})
    a = as_array(x)
    v.check_integer_dtype(func, name, bool(jnp.issubdtype(a.dtype, jnp.integer)), a.dtype)
    return a


def mask_arg(func: str, name: str, x: Any) -> jax.Array:
    """A loss mask: bool, or numbers (values checked later by ``check_binary``)."""
    require(func, **{name: x})
    a = as_array(x)
    if a.dtype != jnp.bool_ and not _is_number_dtype(a.dtype):
        v.check_binary_mask(func, name, False)
    return a


def shape_of(x: Any) -> tuple[int, ...]:
    """The shape of an array argument before conversion (``()`` for None, like ``np.shape``)."""
    return tuple(np.shape(x)) if x is not None else ()


# --------------------------------------------------------------------------------------------------
# Stable primitives


def softplus(z: jax.Array) -> jax.Array:
    """log(1 + e^z) = −log σ(−z) for every finite z; its derivative σ(z) never overflows."""
    return jnp.logaddexp(jnp.zeros((), z.dtype), z)


def smoothed_sigmoid_loss(z: jax.Array, label_smoothing: float) -> jax.Array:
    """cDPO: (1−ε)·softplus(−z) + ε·softplus(z) = −(1−ε) log σ(z) − ε log σ(−z) (spec/README.md §2, §3)."""
    loss = softplus(-z)
    if label_smoothing == 0.0:
        return loss
    return (1.0 - label_smoothing) * loss + label_smoothing * softplus(z)


def shifted_normalizer(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(m, z) with logsumexp(x) = m + z over the last axis, m = max x (stop-gradient), z = log Σ e^{x−m}.

    log-softmax is then (x − m) − z: the shift x − m is exact near the maximum and z ∈ [0, log V] keeps its
    full relative precision, whereas x − logsumexp(x) rounds at the scale of |x| (with ±1e4 float32 logits
    that turns p = 0.99999 into 1.0). The max carries no gradient: its contributions cancel exactly."""
    m = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    z = jnp.log(jnp.sum(jnp.exp(x - m), axis=-1, keepdims=True))
    return m, z


def logsumexp(x: jax.Array) -> jax.Array:
    """Over the last axis; the max is shifted out first, so ±1e4 logits are fine."""
    m, z = shifted_normalizer(x)
    return (m + z)[..., 0]


def log_softmax(x: jax.Array) -> jax.Array:
    m, z = shifted_normalizer(x)
    return (x - m) - z


def picked_log_softmax(x: jax.Array, index: jax.Array) -> jax.Array:
    """log_softmax(x)[..., index] without materialising the whole log-softmax: (x_i − m) − z."""
    m, z = shifted_normalizer(x)
    return (gather_last(x, index) - m[..., 0]) - z[..., 0]


def gather_last(x: jax.Array, index: jax.Array) -> jax.Array:
    """x[..., index[...]] along the last axis: [..., V] × [...] → [...]."""
    return jnp.take_along_axis(x, index[..., None].astype(jnp.int32), axis=-1)[..., 0]


# --------------------------------------------------------------------------------------------------
# Reductions. Sequence-level losses reduce over every element; token-level losses over masked positions.


def reduce_elements(losses: jax.Array, reduction: str) -> jax.Array:
    if reduction == "none":
        return losses
    if reduction == "sum":
        return jnp.sum(losses)
    return jnp.mean(losses)



def token_denominator(func: str, mask: jax.Array, normalizer: float | None, reduction: str, dtype: np.dtype,
                      mask_name: str = "mask") -> jax.Array | float:
    """The mean's denominator: the caller's global token count (exact gradient accumulation), else the
    mask's own count — which must be > 0 (a value check; under an unchecked jit an empty mean is 0/0)."""
    if reduction != "mean":
        return 1.0
    if normalizer is not None:
        return float(normalizer)
    count = jnp.sum(mask != 0)
    value_check(count > 0, lambda: v.check_nonempty(func, mask_name, 0.0))
    return count.astype(dtype)


def reduce_tokens(per_token: jax.Array, mask: jax.Array, reduction: str,
                  denominator: jax.Array | float) -> jax.Array:
    """none: m·ℓ [..., T]; sum: Σ m·ℓ; mean: Σ m·ℓ / denominator."""
    masked = per_token * mask
    if reduction == "none":
        return masked
    total = jnp.sum(masked)
    return total if reduction == "sum" else total / denominator


def scalar_out(x: jax.Array) -> float | jax.Array:
    """A metric as a Python float when concrete (the spec's type), the 0-dim array when traced."""
    if isinstance(x, jax.core.Tracer):
        return x
    return float(x)



# --------------------------------------------------------------------------------------------------
# Student/teacher token losses (token DPKD and the distillation baselines) share one preparation.


class TokenInputs(NamedTuple):
    """The validated inputs of a student/teacher token loss (the same bundle in every backend), in the
    compute dtype."""

    student: jax.Array  # S / τ  [..., T, V]
    teacher: jax.Array  # T / τ  [..., T, V]
    mask: jax.Array  # 0/1      [..., T]
    denominator: jax.Array | float  # the mean's denominator (1 for "sum" and "none")


def token_inputs(func: str, student_logits: Any, teacher_logits: Any, mask: Any, *, normalizer: float | None,
                 reduction: str, temperature: float = 1.0) -> TokenInputs:
    """Shape, dtype and value checks of a student/teacher token loss, then the cast and the temperature.

    The caller has already checked its options (reduction, form, scalars, normalizer): that order is the
    contract. Here, as in the spec: shapes (incl. a vocabulary mismatch), dtypes, finiteness, mask binary,
    non-empty mean."""
    v.check_student_teacher_shapes(func, shape_of(student_logits), shape_of(teacher_logits), shape_of(mask))
    s = float_arg(func, "student_logits", student_logits)
    t = float_arg(func, "teacher_logits", teacher_logits)
    check_finite(func, "student_logits", s)
    check_finite(func, "teacher_logits", t)
    m = mask_arg(func, "mask", mask)
    check_binary(func, "mask", m)
    dt = compute_dtype(s, t)
    denominator = token_denominator(func, m, normalizer, reduction, dt)
    s, t = s.astype(dt), t.astype(dt)
    if temperature != 1.0:
        s, t = s / temperature, t / temperature
    return TokenInputs(s, t, m.astype(dt), denominator)


# --------------------------------------------------------------------------------------------------
# Sequence-level losses (and the metrics) share one validation and one margin.

A, B = "policy_chosen_logps", "policy_rejected_logps"
C, D = "reference_chosen_logps", "reference_rejected_logps"
LT, LS = "chosen_lengths", "rejected_lengths"

Arrays = dict[str, jax.Array | None]


def sequence_inputs(func: str, arrays: dict[str, Any], *, optional: tuple[str, ...] = (),
              lengths: tuple[str, ...] = (), reduction: str | None = None) -> Arrays:
    """Presence, shapes, dtypes, then values, for the arrays of one call (given in signature order);
    returns them cast to the compute dtype (None stays None).

    ``optional`` names may be None; ``lengths`` names are checked > 0 after finiteness; under
    ``reduction="mean"`` an empty input is refused (a shape fact, so it holds under jit too)."""
    for name, x in arrays.items():
        if name not in optional:
            v.require(func, name, x)
    given = {name: x for name, x in arrays.items() if x is not None}
    shape = v.check_same_shape(func, {name: shape_of(x) for name, x in given.items()})
    out: Arrays = {name: None for name in arrays}
    for name, x in given.items():
        out[name] = float_arg(func, name, x)
    for name, x in out.items():
        check_finite(func, name, x)
    for name in lengths:
        check_positive(func, name, out[name])
    if reduction == "mean":
        size = 1
        for n in shape:
            size *= n
        v.check_nonempty(func, next(iter(given)), float(size))
    dt = compute_dtype(*out.values())
    return {name: None if x is None else x.astype(dt) for name, x in out.items()}


def margin(x: Arrays, *, reference: bool = True, normalize: bool = False) -> tuple[jax.Array, jax.Array]:
    """(r_t, r_s): r_t = (a − c)/L_t, r_s = (b − d)/L_s; the margin is h = r_t − r_s (Eq. 8 / Eq. 9)."""
    chosen, rejected = x[A], x[B]
    if reference:
        chosen, rejected = chosen - x[C], rejected - x[D]
    if normalize:
        chosen, rejected = chosen / x[LT], rejected / x[LS]
    return chosen, rejected
