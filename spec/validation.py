"""Input validation shared by the spec and every backend.

The mathematics of each backend is written independently of the spec (that is what makes conformance mean
something); the *contract* for bad input is not: the same inputs must raise the same error class with the
same message in NumPy, Torch and JAX. So the checks live here, written against plain Python values —
shapes as tuples, options as scalars, and value facts (``all finite?``) that each backend computes with its
own array library and passes in as booleans.

Every message has the form ``"<function>: `<argument>` <what is wrong>"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import NoReturn

__all__ = [
    "DPKDInputError",
    "REDUCTIONS",
    "fail",
    "check_reduction",
    "check_choice",
    "check_scalar",
    "check_int_scalar",
    "check_same_shape",
    "check_lengths_pair",
    "check_logits_labels_shapes",
    "check_student_teacher_shapes",
    "check_normalizer_option",
    "check_finite",
    "check_positive_lengths",
    "check_labels_in_vocab",
    "check_binary_mask",
    "check_nonempty",
    "check_integer_dtype",
    "check_floating_dtype",
    "require",
    "check_label_smoothing_form",
    "check_no_lengths_when_summed",
    "check_shiftable",
    "check_instance",
    "check_nonempty_elements",
    "check_nonempty_positions",
    "check_chunk_options",
    "check_lm_head_shapes",
    "check_same_dtype",
    "check_same_vocab",
]

REDUCTIONS = ("none", "mean", "sum")


class DPKDInputError(ValueError):
    """Raised for every invalid argument; the message names the function and the argument."""


def fail(func: str, arg: str, problem: str) -> NoReturn:
    raise DPKDInputError(f"{func}: `{arg}` {problem}")


# --------------------------------------------------------------------------------------------------
# Options (static: safe under jit)


def check_reduction(func: str, reduction: object) -> str:
    if reduction not in REDUCTIONS:
        fail(func, "reduction", f"must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction  # type: ignore[return-value]


def check_choice(func: str, name: str, value: object, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        fail(func, name, f"must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def check_scalar(
    func: str,
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = False,
    high_inclusive: bool = False,
) -> float:
    """A finite real Python/NumPy scalar within the given bounds (exclusive unless told)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not _is_numpy_scalar(value):
        fail(func, name, f"must be a real number, got {type(value).__name__}")
    v = float(value)  # type: ignore[arg-type]
    if not math.isfinite(v):
        fail(func, name, f"must be finite, got {v!r}")
    if low is not None and (v < low or (v == low and not low_inclusive)):
        op = ">=" if low_inclusive else ">"
        fail(func, name, f"must be {op} {low}, got {v!r}")
    if high is not None and (v > high or (v == high and not high_inclusive)):
        op = "<=" if high_inclusive else "<"
        fail(func, name, f"must be {op} {high}, got {v!r}")
    return v


def check_label_smoothing_form(func: str, label_smoothing: float, form: str) -> None:
    """cDPO label smoothing is defined for the sigmoid (Bradley–Terry) form only."""
    if label_smoothing != 0.0 and form != "sigmoid":
        fail(func, "label_smoothing", f"only applies to form='sigmoid', got form={form!r}")


def check_instance(func: str, name: str, value: object, cls: type) -> None:
    if not isinstance(value, cls):
        fail(func, name, f"must be an {cls.__name__}, got {type(value).__name__}")


def check_int_scalar(func: str, name: str, value: object, *, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not _is_numpy_integer(value):
        fail(func, name, f"must be an integer, got {type(value).__name__}")
    v = int(value)  # type: ignore[arg-type]
    if low is not None and v < low:
        fail(func, name, f"must be >= {low}, got {v}")
    return v


def check_normalizer_option(func: str, normalizer: object, reduction: str) -> float | None:
    """``normalizer`` is the global loss-token count; it only has a meaning under ``reduction="mean"``."""
    if normalizer is None:
        return None
    if reduction != "mean":
        fail(func, "normalizer", f"only applies to reduction='mean', got reduction={reduction!r}")
    return check_scalar(func, "normalizer", normalizer, low=0.0)


# --------------------------------------------------------------------------------------------------
# Shapes (static: safe under jit)


def check_same_shape(func: str, shapes: Mapping[str, tuple[int, ...] | None]) -> tuple[int, ...]:
    """All given (non-None) arrays have exactly the same shape; no broadcasting."""
    items = [(k, tuple(v)) for k, v in shapes.items() if v is not None]
    first_name, first = items[0]
    for name, shape in items[1:]:
        if shape != first:
            fail(func, name, f"has shape {shape}, expected {first} (the shape of `{first_name}`)")
    return first


def require(func: str, name: str, value: object) -> None:
    if value is None:
        fail(func, name, "is required, got None")


def check_no_lengths_when_summed(func: str, name: str, lengths: object) -> None:
    """IPO with length_normalize=False uses summed log-ratios: lengths would be silently unused."""
    if lengths is not None:
        fail(func, name, "must be None when length_normalize=False (summed log-ratios are used)")


def check_shiftable(func: str, name: str, n_positions: int) -> None:
    if n_positions < 2:
        fail(func, name, f"needs at least 2 positions to shift (T >= 2), got T={n_positions}")


def check_lengths_pair(func: str, chosen_lengths: object, rejected_lengths: object) -> bool:
    """Both lengths or neither; returns whether lengths are given."""
    if (chosen_lengths is None) != (rejected_lengths is None):
        missing = "rejected_lengths" if rejected_lengths is None else "chosen_lengths"
        fail(func, missing, "is required when the other side's lengths are given (Eq. 9 normalises both)")
    return chosen_lengths is not None


def check_logits_labels_shapes(
    func: str,
    logits_shape: tuple[int, ...],
    labels_shape: tuple[int, ...],
    *,
    logits_name: str = "logits",
    labels_name: str = "labels",
) -> None:
    if len(logits_shape) < 2:
        fail(func, logits_name, f"must have shape [..., T, V] (at least 2 dims), got {tuple(logits_shape)}")
    if tuple(labels_shape) != tuple(logits_shape[:-1]):
        fail(
            func,
            labels_name,
            f"has shape {tuple(labels_shape)}, expected {tuple(logits_shape[:-1])} "
            f"(the shape of `{logits_name}` without its vocabulary axis)",
        )
    if logits_shape[-1] < 1:
        fail(func, logits_name, "has an empty vocabulary axis")


def check_student_teacher_shapes(
    func: str,
    student_shape: tuple[int, ...],
    teacher_shape: tuple[int, ...],
    mask_shape: tuple[int, ...] | None,
    *,
    student_name: str = "student_logits",
    teacher_name: str = "teacher_logits",
    mask_name: str = "mask",
    min_ndim: int = 2,
) -> None:
    student_shape, teacher_shape = tuple(student_shape), tuple(teacher_shape)
    if len(student_shape) < min_ndim:
        what = "[..., T, V]" if min_ndim == 2 else "[..., V]"
        fail(func, student_name, f"must have shape {what} (at least {min_ndim} dims), got {student_shape}")
    if len(teacher_shape) != len(student_shape) or teacher_shape[-1] != student_shape[-1]:
        if len(teacher_shape) >= 1:
            check_same_vocab(func, teacher_name, teacher_shape[-1], student_name, student_shape[-1])
        fail(func, teacher_name, f"has shape {teacher_shape}, expected {student_shape}")
    if teacher_shape != student_shape:
        fail(func, teacher_name, f"has shape {teacher_shape}, expected {student_shape}")
    if student_shape[-1] < 1:
        fail(func, student_name, "has an empty vocabulary axis")
    if mask_shape is not None and tuple(mask_shape) != student_shape[:-1]:
        fail(
            func,
            mask_name,
            f"has shape {tuple(mask_shape)}, expected {student_shape[:-1]} "
            f"(the shape of `{student_name}` without its vocabulary axis)",
        )


def check_chunk_options(func: str, chunk_size: object, ignore_index: object) -> int | None:
    """The fused path's options: ``chunk_size`` None (automatic) or a positive int; an integer ignore_index."""
    check_int_scalar(func, "ignore_index", ignore_index)
    if chunk_size is None:
        return None
    return check_int_scalar(func, "chunk_size", chunk_size, low=1)


def check_lm_head_shapes(
    func: str,
    hidden_shape: tuple[int, ...],
    weight_shape: tuple[int, ...],
    bias_shape: tuple[int, ...] | None,
    *,
    names: tuple[str, str, str],
    lead: tuple[int, ...] | None = None,
) -> None:
    """hidden [..., H], weight [V, H], bias [V]; ``lead`` pins hidden's leading dims (one row per label)."""
    h_name, w_name, b_name = names
    hidden_shape, weight_shape = tuple(hidden_shape), tuple(weight_shape)
    if len(hidden_shape) < 1:
        fail(func, h_name, f"must have shape [..., H] (at least 1 dim), got {hidden_shape}")
    if lead is not None and hidden_shape[:-1] != tuple(lead):
        fail(func, h_name, f"has shape {hidden_shape}, expected leading dims {tuple(lead)}")
    size = hidden_shape[-1]
    if len(weight_shape) != 2 or weight_shape[1] != size:
        fail(func, w_name, f"has shape {weight_shape}, expected [V, {size}] (the hidden size of `{h_name}` is {size})")
    if weight_shape[0] < 1:
        fail(func, w_name, "has an empty vocabulary axis")
    if bias_shape is not None and tuple(bias_shape) != (weight_shape[0],):
        fail(func, b_name, f"has shape {tuple(bias_shape)}, expected ({weight_shape[0]},) (one per vocabulary row)")


def check_same_vocab(func: str, name: str, vocab: int, ref_name: str, ref_vocab: int) -> None:
    """Teacher and student distributions are compared entry by entry: one vocabulary (ANCHORS bug #16)."""
    if vocab != ref_vocab:
        fail(func, name, f"has vocabulary size {vocab} but `{ref_name}` has {ref_vocab}; "
                         "teacher and student must share one vocabulary (pad or slice the lm_head first)")


def check_same_dtype(func: str, name: str, dtype: object, ref_name: str, ref_dtype: object) -> None:
    if dtype != ref_dtype:
        fail(func, name, f"has dtype {dtype} but `{ref_name}` has {ref_dtype}; cast them to one dtype")


def check_integer_dtype(func: str, name: str, is_integer: bool, dtype: object) -> None:
    if not is_integer:
        fail(func, name, f"must have an integer dtype, got {dtype}")


def check_floating_dtype(func: str, name: str, is_floating: bool, dtype: object) -> None:
    if not is_floating:
        fail(func, name, f"must have a floating dtype, got {dtype}")


# --------------------------------------------------------------------------------------------------
# Values (need the data: eager only; JAX exposes them through checkify)


def check_finite(func: str, name: str, all_finite: bool) -> None:
    if not all_finite:
        fail(func, name, "contains NaN or Inf")


def check_positive_lengths(func: str, name: str, all_positive: bool) -> None:
    if not all_positive:
        fail(func, name, "must be > 0 everywhere (a response with no tokens has no length-normalised log-ratio)")


def check_labels_in_vocab(func: str, name: str, all_valid: bool, vocab_size: int, ignore_index: int) -> None:
    if not all_valid:
        fail(func, name, f"has a value outside [0, {vocab_size}) that is not the ignore_index {ignore_index}")


def check_binary_mask(func: str, name: str, is_binary: bool) -> None:
    if not is_binary:
        fail(func, name, "must be boolean or contain only 0 and 1")


def check_nonempty(func: str, name: str, count: float) -> None:
    """A mean over zero loss tokens is 0/0: refuse it instead of returning NaN."""
    if not count > 0:
        fail(func, name, "selects no loss tokens, so reduction='mean' is undefined; pass `normalizer` or use 'sum'")


def check_nonempty_elements(func: str, name: str, count: int) -> None:
    """A mean over zero examples is 0/0."""
    if not count > 0:
        fail(func, name, "is empty, so reduction='mean' is undefined; use 'sum' or 'none'")


def check_nonempty_positions(func: str, name: str, shape: tuple[int, ...]) -> None:
    if len(shape) == 0 or 0 in tuple(shape):
        fail(func, name, f"has no positions or an empty vocabulary, got shape {tuple(shape)}")


def _is_numpy_scalar(value: object) -> bool:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, (np.floating, np.integer)) or (isinstance(value, np.ndarray) and value.ndim == 0)


def _is_numpy_integer(value: object) -> bool:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, np.integer)
