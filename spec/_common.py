"""The one base mechanism of the NumPy reference: float64 conversion, stable primitives, validation glue
and reductions. Every loss module builds on these; none re-implements them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import validation as v

__all__ = [
    "as_float",
    "float64_array",
    "as_int",
    "as_mask",
    "log_softmax",
    "logsumexp",
    "softmax",
    "softplus",
    "sigmoid",
    "reduce_elements",
    "reduce_elements_grad",
    "reduce_tokens",
    "reduce_tokens_grad",
    "first_argmax",
    "token_denominator",
    "only_arrays",
    "as_float_arrays",
    "TokenInputs",
    "token_inputs",
    "A",
    "B",
    "C",
    "D",
    "LT",
    "LS",
    "sequence_inputs",
    "Margin",
]


def as_float(func: str, name: str, x: object, *, allow_none: bool = False) -> np.ndarray | None:
    """Validate a float array argument (finite) and return it in float64."""
    if x is None:
        if allow_none:
            return None
        v.require(func, name, x)
    arr = np.asarray(x)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        v.check_floating_dtype(func, name, False, arr.dtype)
    arr = arr.astype(np.float64)
    v.check_finite(func, name, bool(np.all(np.isfinite(arr))))
    return arr


def float64_array(func: str, name: str, x: object) -> np.ndarray:
    """The dtype half of ``as_float``: a required float (or integer) array, in float64, NOT yet checked for
    finiteness — for functions that must run every shape/dtype check before any value check."""
    v.require(func, name, x)
    arr = np.asarray(x)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        v.check_floating_dtype(func, name, False, arr.dtype)
    return arr.astype(np.float64)


def as_int(func: str, name: str, x: object) -> np.ndarray:
    arr = np.asarray(x)
    v.check_integer_dtype(func, name, np.issubdtype(arr.dtype, np.integer), arr.dtype)
    return arr.astype(np.int64)


def as_mask(func: str, name: str, x: object) -> np.ndarray:
    """A loss mask: bool, or numbers that are exactly 0 or 1; returned as float64 0/1."""
    arr = np.asarray(x)
    if arr.dtype == np.bool_:
        return arr.astype(np.float64)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        v.check_binary_mask(func, name, False)
    v.check_binary_mask(func, name, bool(np.all((arr == 0) | (arr == 1))))
    return arr.astype(np.float64)


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def log_softmax(x: np.ndarray) -> np.ndarray:
    return x - logsumexp(x)[..., None]


def softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(x))


def softplus(z: np.ndarray) -> np.ndarray:
    """log(1 + e^z) = −log σ(−z), stable for |z| large."""
    return np.logaddexp(0.0, z)


def sigmoid(z: np.ndarray) -> np.ndarray:
    # exp of a non-positive number only: no overflow for any finite z
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def first_argmax(x: np.ndarray) -> np.ndarray:
    """argmax over the last axis; ties resolve to the lowest index (NumPy's documented behaviour)."""
    return np.argmax(x, axis=-1)


# --------------------------------------------------------------------------------------------------
# Reductions. Sequence-level losses reduce over every element; token-level losses over masked positions.


def reduce_elements(losses: np.ndarray, reduction: str) -> np.ndarray:
    if reduction == "none":
        return losses
    if reduction == "sum":
        return np.sum(losses)
    return np.mean(losses)


def reduce_elements_grad(shape: tuple[int, ...], reduction: str) -> np.ndarray:
    """d(sum of the reduced output)/d(per-element losses)."""
    n = int(np.prod(shape)) if len(shape) else 1
    scale = 1.0 / n if reduction == "mean" else 1.0
    return np.full(shape, scale)


def token_denominator(func: str, mask: np.ndarray, normalizer: float | None, reduction: str,
                      mask_name: str = "mask") -> float:
    """The mean's denominator: the caller's global token count, else the mask's own count."""
    if reduction != "mean":
        return 1.0
    if normalizer is not None:
        return float(normalizer)
    count = float(np.sum(mask))
    v.check_nonempty(func, mask_name, count)
    return count


def reduce_tokens(per_token: np.ndarray, mask: np.ndarray, reduction: str, denominator: float) -> np.ndarray:
    masked = per_token * mask
    if reduction == "none":
        return masked
    return np.sum(masked) / denominator


def reduce_tokens_grad(mask: np.ndarray, reduction: str, denominator: float) -> np.ndarray:
    """d(sum of the reduced output)/d(per-token losses)."""
    return mask / denominator


def only_arrays(grads: Mapping[str, np.ndarray | None]) -> dict[str, np.ndarray]:
    return {k: g for k, g in grads.items() if g is not None}


# --------------------------------------------------------------------------------------------------
# Student/teacher token losses (token DPKD and the distillation baselines) share one preparation.


def as_float_arrays(func: str, arrays: Mapping[str, object]) -> list[np.ndarray]:
    """Several float array arguments in the contract's order: every dtype first, then every finiteness."""
    out = [float64_array(func, name, x) for name, x in arrays.items()]
    for name, arr in zip(arrays, out, strict=True):
        v.check_finite(func, name, bool(np.all(np.isfinite(arr))))
    return out


class TokenInputs(NamedTuple):
    """The validated inputs of a student/teacher token loss (the same bundle in every backend)."""

    student: np.ndarray  # S / τ, float64  [..., T, V]
    teacher: np.ndarray  # T / τ, float64  [..., T, V]
    mask: np.ndarray  # 0/1               [..., T]
    denominator: float  # the mean's denominator (1 for "sum" and "none")


def token_inputs(func: str, student_logits: object, teacher_logits: object, mask: object, *,
                 normalizer: float | None, reduction: str, temperature: float = 1.0) -> TokenInputs:
    """Shape, dtype and value checks of a student/teacher token loss, then the temperature.

    The caller has already checked its options (reduction, form, scalars, normalizer): that order is the
    contract. Here: shapes (incl. a vocabulary mismatch), dtypes, finiteness, mask binary, non-empty mean.
    """
    v.check_student_teacher_shapes(func, np.shape(student_logits), np.shape(teacher_logits), np.shape(mask))
    s, t = as_float_arrays(func, {"student_logits": student_logits, "teacher_logits": teacher_logits})
    m = as_mask(func, "mask", mask)
    denominator = token_denominator(func, m, normalizer, reduction)
    return TokenInputs(s / temperature, t / temperature, m, denominator)


# --------------------------------------------------------------------------------------------------
# Sequence-level losses (and the metrics) share one validation and one margin.

A, B = "policy_chosen_logps", "policy_rejected_logps"
C, D = "reference_chosen_logps", "reference_rejected_logps"
LT, LS = "chosen_lengths", "rejected_lengths"


def sequence_inputs(
    func: str,
    arrays: dict[str, object],
    *,
    optional: tuple[str, ...] = (),
    lengths: tuple[str, ...] = (),
    reduction: str | None = None,
) -> dict[str, np.ndarray | None]:
    """Presence, shapes, dtypes, then values, for the arrays of one call (given in signature order).

    ``optional`` names may be None (they stay None); ``lengths`` names are checked > 0 after finiteness;
    ``reduction="mean"`` refuses an empty input (a mean over nothing is 0/0).
    """
    for name, x in arrays.items():
        if name not in optional:
            v.require(func, name, x)
    given = {name: x for name, x in arrays.items() if x is not None}
    v.check_same_shape(func, {name: np.shape(x) for name, x in given.items()})
    out: dict[str, np.ndarray | None] = {name: None for name in arrays}
    for name, x in given.items():
        out[name] = float64_array(func, name, x)
    for name, x in out.items():
        if x is not None:
            v.check_finite(func, name, bool(np.all(np.isfinite(x))))
    for name in lengths:
        if out[name] is not None:
            v.check_positive_lengths(func, name, bool(np.all(out[name] > 0)))
    if reduction == "mean":
        first = next(iter(given))
        v.check_nonempty_elements(func, first, int(np.size(out[first])))
    return out


@dataclass(frozen=True)
class Margin:
    """r_t = (a − c)/L_t, r_s = (b − d)/L_s, h = r_t − r_s; ``dh[name]`` = ∂h/∂name (elementwise).

    Without a reference (c, d None) the reference terms are 0 and get no partial; without lengths the
    divisors are 1.
    """

    chosen: np.ndarray
    rejected: np.ndarray
    dh: dict[str, np.ndarray]

    @property
    def h(self) -> np.ndarray:
        return self.chosen - self.rejected

    @staticmethod
    def of(x: dict[str, np.ndarray | None], *, reference: bool = True, normalize: bool = False) -> Margin:
        a, b = x[A], x[B]
        c = x[C] if reference else None
        d = x[D] if reference else None
        lt = x[LT] if normalize else np.ones_like(a)
        ls = x[LS] if normalize else np.ones_like(b)
        chosen = (a - c if c is not None else a) / lt
        rejected = (b - d if d is not None else b) / ls
        dh = {A: 1.0 / lt, B: -1.0 / ls}
        if reference:
            dh[C], dh[D] = -1.0 / lt, 1.0 / ls
        return Margin(chosen, rejected, dh)
