"""Input validation shared by the spec and every backend.

The mathematics of each backend is written independently of the spec (that is what makes conformance mean
something); the *contract* for bad input is not: the same inputs must raise the same error class with the
same message in NumPy, Torch and JAX. So the checks live here, written against plain Python values —
shapes as tuples, options as scalars, and value facts (``all finite?``) that each backend computes with its
own array library and passes in as booleans.

Every message has the form ``"<function>: `<argument>` <what is wrong>"``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn, TypeVar

from .results import TeacherLMHead, TeacherLogps

__all__ = [
    "DPKDInputError",
    "REDUCTIONS",
    "Option",
    "options",
    "options_of",
    "check_options",
    "BETA",
    "LABEL_SMOOTHING",
    "REFERENCE_FREE",
    "REDUCTION",
    "NORMALIZER",
    "TEMPERATURE",
    "IGNORE_INDEX",
    "LAMBDA",
    "REQUIRED",
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
    "check_no_lengths_when_summed",
    "check_length_normalize",
    "check_shiftable",
    "check_instance",
    "check_nonempty_elements",
    "check_nonempty_positions",
    "check_chunk_options",
    "check_lm_head_shapes",
    "check_same_dtype",
    "check_same_vocab",
    "reported_as",
    "ArrayInfo",
    "FUSED_MODES",
    "check_fused_mode",
    "check_lm_head",
    "check_label_array",
    "check_same_device",
    "check_fused_sequence_inputs",
    "check_fused_teacher",
    "check_fused_token_inputs",
    "check_labelled_rows",
]

class DPKDInputError(ValueError):
    """Raised for every invalid argument; the message names the function and the argument.

    ``func``, ``argument`` and ``problem`` are the three parts of the message
    ``"<func>: `<argument>` <problem>"`` (read back from the message when only a message is given)."""

    def __init__(self, message: str, *, func: str | None = None, argument: str | None = None,
                 problem: str | None = None):
        super().__init__(message)
        if func is None:
            parts = _MESSAGE.match(message)
            func, argument, problem = parts.groups() if parts else (None, None, None)
        self.func, self.argument, self.problem = func, argument, problem


_MESSAGE = re.compile(r"^(\w+): `([^`]+)` (.*)$", re.DOTALL)


def fail(func: str, arg: str, problem: str) -> NoReturn:
    raise DPKDInputError(f"{func}: `{arg}` {problem}", func=func, argument=arg, problem=problem)


@contextlib.contextmanager
def reported_as(func: str, arguments: Mapping[str, str]) -> Iterator[None]:
    """Errors raised inside by another dpkd function are re-raised as ``func``'s, naming ``func``'s argument.

    A fused function computes its loss by calling the backend's loss on arrays it formed itself; an error
    there (``dpkd_loss: `beta` must be > 0``) is about an argument the caller passed to ``func`` under its
    own name: ``arguments`` maps the inner names to the caller's (``policy_chosen_logps`` → ``chosen_hidden``);
    options keep their names. The inner error stays attached as ``__cause__``."""
    try:
        yield
    except DPKDInputError as err:
        if err.func is None or err.func == func:
            raise
        argument = arguments.get(err.argument or "", err.argument or "")
        raise DPKDInputError(f"{func}: `{argument}` {err.problem}", func=func, argument=argument,
                             problem=err.problem) from err


# --------------------------------------------------------------------------------------------------
# The option schema: every function's options declared once, as data, beside the spec function


@dataclass(frozen=True)
class Option:
    """One keyword option of a dpkd function: its name, its default and which values are valid.

    kind:
        "real"      a finite real within the bounds (each exclusive unless ``*_inclusive``); None is also
                    valid when the default is None (the normalizer);
        "integer"   an integer, ≥ ``low`` when given;
        "choice"    one of ``choices`` (a form, a reduction);
        "flag"      True or False;
        "instance"  an instance of ``cls`` (the objective's config).
    requires: ``(other, value)``: a value other than the default only applies when the option ``other`` is
        ``value`` (cDPO smoothing needs form="sigmoid"; a normalizer needs reduction="mean").
    draw: the well-conditioned sub-range the conformance suite draws from (None: never drawn).
    """

    name: str
    default: Any
    kind: str = "real"
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = False
    high_inclusive: bool = False
    choices: tuple[Any, ...] = ()
    cls: type | None = None
    requires: tuple[str, Any] | None = None
    draw: tuple[float, float] | None = None

    def check(self, func: str, value: object, given: Mapping[str, Any]) -> Any:
        """The validated value (a float for reals, an int for integers); raises naming this option."""
        if self.kind == "choice":
            out = check_choice(func, self.name, value, self.choices)
        elif self.kind == "flag":
            if not isinstance(value, bool) and not _is_numpy_bool(value):
                fail(func, self.name, f"must be True or False, got {value!r}")
            out = bool(value)  # type: ignore[arg-type]
        elif self.kind == "instance":
            check_instance(func, self.name, value, self.cls)  # type: ignore[arg-type]
            out = value
        elif self.kind == "integer":
            out = check_int_scalar(func, self.name, value, low=None if self.low is None else int(self.low))
        elif value is None and self.default is None:
            out = None
        else:
            out = check_scalar(func, self.name, value, low=self.low, high=self.high,
                               low_inclusive=self.low_inclusive, high_inclusive=self.high_inclusive)
        if self.requires is not None and out != self.default:
            other, needed = self.requires
            actual = given.get(other, needed)
            if actual != needed:
                fail(func, self.name, f"only applies to {other}={needed!r}, got {other}={actual!r}")
        return out

    def invalid_values(self) -> tuple[Any, ...]:
        """Values the bad-input battery passes; each must raise an error naming this option."""
        if self.kind == "choice":
            return ("not-a-" + self.name.rstrip("_"),)
        if self.kind == "flag":
            return ("yes",)
        if self.kind == "instance":
            return ("not-a-" + self.name,)
        if self.kind == "integer":
            return (1.5,)
        out: list[Any] = []
        if self.low is not None:
            out.append(self.low - 0.25 if self.low_inclusive else self.low)
        if self.high is not None:
            out.append(self.high + 0.25 if self.high_inclusive else self.high)
        return (*out, math.nan, math.inf)


REDUCTIONS = ("none", "mean", "sum")

BETA = Option("beta", 0.1, low=0.0, draw=(0.05, 3.0))
LABEL_SMOOTHING = Option("label_smoothing", 0.0, low=0.0, high=0.5, low_inclusive=True, high_inclusive=True,
                         draw=(0.05, 0.45))
REFERENCE_FREE = Option("reference_free", False, kind="flag")
REDUCTION = Option("reduction", "mean", kind="choice", choices=REDUCTIONS)
NORMALIZER = Option("normalizer", None, low=0.0, requires=("reduction", "mean"), draw=(1.0, 40.0))
TEMPERATURE = Option("temperature", 1.0, low=0.0, draw=(0.5, 3.0))
IGNORE_INDEX = Option("ignore_index", -100, kind="integer")
LAMBDA = Option("lambda_", 50.0, low=0.0, low_inclusive=True, draw=(0.0, 60.0))  # the DPOP weight

#: The ``default`` of an option the caller must pass (keyword-only without a default: the objective's config).
REQUIRED = inspect.Parameter.empty

# keyword-only parameters that are arrays, not options
_ARRAY_KEYWORDS = ("chosen_lengths", "rejected_lengths", "lengths")
_SCHEMAS: dict[str, tuple[Option, ...]] = {}
_F = TypeVar("_F", bound=Callable[..., Any])


def options(*declared: Option) -> Callable[[_F], _F]:
    """Declare the options of a spec function, in its signature order (a decorator).

    The declaration must name every keyword-only option of the function with its default; it is then what
    ``check_options`` checks (in this backend and every other), and what the registry draws from."""

    def register(fn: _F) -> _F:
        params = inspect.signature(fn).parameters
        keyword = [(n, p.default) for n, p in params.items()
                   if p.kind is p.KEYWORD_ONLY and n not in _ARRAY_KEYWORDS]
        if keyword != [(o.name, o.default) for o in declared]:
            raise TypeError(f"options of {fn.__name__}: declared {[(o.name, o.default) for o in declared]}, "
                            f"the signature has {keyword}")
        _SCHEMAS[fn.__name__] = tuple(declared)
        return fn

    return register


def options_of(func: str) -> tuple[Option, ...]:
    """The declared options of ``func``. ``<f>_grad``, ``fused_<f>`` and ``vocab_parallel_<f>`` share
    ``<f>``'s (a fused or vocab-parallel function takes a few more arguments of its own)."""
    for name in (func, func.removesuffix("_grad"), func.removeprefix("fused_"), func.removeprefix("vocab_parallel_")):
        if name in _SCHEMAS:
            return _SCHEMAS[name]
    raise KeyError(f"no options are declared for {func!r}")


def check_options(func: str, /, **values: Any) -> dict[str, Any]:
    """Check the options of one call of ``func`` against its declaration, in signature order.

    Returns the validated values (reals as float, integers as int). An option not declared for ``func`` is a
    programming error (TypeError), not bad input."""
    schema = options_of(func)
    unknown = sorted(set(values) - {o.name for o in schema})
    if unknown:
        raise TypeError(f"check_options: {func} declares no option {unknown}")
    return {o.name: o.check(func, values[o.name], values) for o in schema if o.name in values}


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


def check_length_normalize(func: str, length_normalize: bool, chosen_lengths: object, rejected_lengths: object
                           ) -> None:
    """An explicit ``length_normalize`` (IPO): True needs both lengths (with neither given, the first is
    named), False refuses them (they would be silently unused)."""
    if length_normalize:
        if chosen_lengths is None and rejected_lengths is None:
            require(func, "chosen_lengths", None)
        check_lengths_pair(func, chosen_lengths, rejected_lengths)
    else:
        for name, given in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
            check_no_lengths_when_summed(func, name, given)


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
    """Teacher and student distributions are compared entry by entry: one vocabulary."""
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
# The fused lm_head path (static: safe under jit). Backends describe each array by an ``ArrayInfo``.


class ArrayInfo(NamedTuple):
    """What the framework-free checks need to know of one array.

    shape; dtype (as it prints in messages: NumPy's words, e.g. ``float32``); kind: "floating",
    "integer" or "other"; device: where it lives (None for backends with one memory space)."""

    shape: tuple[int, ...]
    dtype: object
    kind: str
    device: object = None


FUSED_MODES = ("auto", "single_pass", "two_pass")


def check_fused_mode(func: str, mode: object, reduction: str) -> str:
    check_choice(func, "mode", mode, FUSED_MODES)
    if mode == "single_pass" and reduction == "none":
        fail(func, "mode", "'single_pass' needs a reduced loss (reduction 'mean' or 'sum'); use 'two_pass'")
    return mode  # type: ignore[return-value]


def check_lm_head(func: str, hidden: ArrayInfo, weight: ArrayInfo, bias: ArrayInfo | None, *,
                  names: tuple[str, str, str], lead: tuple[int, ...] | None = None) -> None:
    """hidden [..., H] floating, weight [V, H] and bias [V] of hidden's dtype and on its device."""
    h_name, w_name, b_name = names
    for name, x in ((h_name, hidden), (w_name, weight), (b_name, bias)):
        if x is not None:
            check_floating_dtype(func, name, x.kind == "floating", x.dtype)
    check_lm_head_shapes(func, hidden.shape, weight.shape, None if bias is None else bias.shape, names=names,
                         lead=lead)
    for name, x in ((w_name, weight), (b_name, bias)):
        if x is None:
            continue
        check_same_dtype(func, name, x.dtype, h_name, hidden.dtype)
        check_same_device(func, name, x, h_name, hidden)


def check_label_array(func: str, name: str, labels: ArrayInfo, shape: tuple[int, ...],
                      hidden: ArrayInfo | None = None, hidden_name: str = "hidden") -> None:
    """Integer labels with one label per hidden-state row (on ``hidden``'s device when given)."""
    check_integer_dtype(func, name, labels.kind == "integer", labels.dtype)
    if tuple(labels.shape) != tuple(shape):
        fail(func, name, f"has shape {tuple(labels.shape)}, expected {tuple(shape)} "
                         "(the shape of the hidden states without their hidden axis)")
    if hidden is not None:
        check_same_device(func, name, labels, hidden_name, hidden)


def check_same_device(func: str, name: str, x: ArrayInfo, other_name: str, other: ArrayInfo) -> None:
    """``x`` on ``other``'s device (backends with one memory space describe no device: nothing to check)."""
    if x.device != other.device:
        fail(func, name, f"is on device {x.device} but `{other_name}` is on {other.device}; move them to one device")


def check_fused_sequence_inputs(func: str, chosen_hidden: ArrayInfo, rejected_hidden: ArrayInfo,
                                weight: ArrayInfo, bias: ArrayInfo | None, chosen_labels: ArrayInfo,
                                rejected_labels: ArrayInfo) -> None:
    """chosen_hidden [B, T_c, H], rejected_hidden [B, T_s, H], one lm_head, labels [B, T_c] / [B, T_s]."""
    for name, x in (("chosen_hidden", chosen_hidden), ("rejected_hidden", rejected_hidden)):
        if len(x.shape) != 3:
            fail(func, name, f"must have shape [B, T, H], got {tuple(x.shape)}")
    check_lm_head(func, chosen_hidden, weight, bias, names=("chosen_hidden", "weight", "bias"))
    check_lm_head(func, rejected_hidden, weight, bias, names=("rejected_hidden", "weight", "bias"))
    if rejected_hidden.shape[0] != chosen_hidden.shape[0]:
        fail(func, "rejected_hidden", f"has {rejected_hidden.shape[0]} pairs but `chosen_hidden` has "
                                      f"{chosen_hidden.shape[0]}")
    check_label_array(func, "chosen_labels", chosen_labels, chosen_hidden.shape[:2], chosen_hidden, "chosen_hidden")
    check_label_array(func, "rejected_labels", rejected_labels, rejected_hidden.shape[:2], rejected_hidden,
                      "rejected_hidden")


def check_fused_teacher(func: str, teacher: object, describe: Callable[[Any], ArrayInfo | None], *,
                        vocab: int, lead_c: tuple[int, ...], lead_s: tuple[int, ...], required: bool) -> str:
    """The ``teacher`` of a fused sequence loss; returns its kind, "none", "logps" or "lm_head".

    ``describe`` turns one of the backend's arrays into its ``ArrayInfo`` (None stays None)."""
    if teacher is None:
        if required:
            fail(func, "teacher", "is required: pass TeacherLMHead(chosen_hidden, rejected_hidden, weight) or "
                                  "TeacherLogps(chosen, rejected) (or reference_free=True)")
        return "none"
    if isinstance(teacher, TeacherLogps):
        for name, x in (("teacher.chosen", teacher.chosen), ("teacher.rejected", teacher.rejected)):
            info = describe(x)
            check_floating_dtype(func, name, info.kind == "floating", info.dtype)
            if tuple(info.shape) != tuple(lead_c[:1]):
                fail(func, name, f"has shape {tuple(info.shape)}, expected {tuple(lead_c[:1])} (one per pair)")
        return "logps"
    if not isinstance(teacher, TeacherLMHead):
        fail(func, "teacher", f"must be a TeacherLMHead or TeacherLogps, got {type(teacher).__name__}")
    weight, bias = describe(teacher.weight), describe(teacher.bias)
    if len(weight.shape) == 2:
        check_same_vocab(func, "teacher.weight", weight.shape[0], "weight", vocab)
    names = ("teacher.weight", "teacher.bias")
    check_lm_head(func, describe(teacher.chosen_hidden), weight, bias, lead=lead_c,
                  names=("teacher.chosen_hidden", *names))
    check_lm_head(func, describe(teacher.rejected_hidden), weight, bias, lead=lead_s,
                  names=("teacher.rejected_hidden", *names))
    return "lm_head"


def check_fused_token_inputs(func: str, student_hidden: ArrayInfo, weight: ArrayInfo, bias: ArrayInfo | None,
                             target: ArrayInfo, *, teacher_hidden: ArrayInfo | None = None,
                             teacher_weight: ArrayInfo | None = None, teacher_bias: ArrayInfo | None = None,
                             target_is_labels: bool = False, hidden_name: str = "student_hidden") -> str:
    """The arrays of a fused token loss (student lm_head, optional teacher lm_head, a mask or labels with
    one entry per row); returns the target's argument name, "labels" or "mask". ``hidden_name``: what the
    caller calls the student's hidden states (``fused_cross_entropy``: "hidden")."""
    check_lm_head(func, student_hidden, weight, bias, names=(hidden_name, "weight", "bias"))
    lead = tuple(student_hidden.shape[:-1])
    if teacher_hidden is not None or teacher_weight is not None:
        if teacher_hidden is None or teacher_weight is None:
            fail(func, "teacher_hidden" if teacher_hidden is None else "teacher_weight",
                 "is required with the other teacher argument")
        if len(teacher_weight.shape) == 2:
            check_same_vocab(func, "teacher_weight", teacher_weight.shape[0], "weight", weight.shape[0])
        check_lm_head(func, teacher_hidden, teacher_weight, teacher_bias, lead=lead,
                      names=("teacher_hidden", "teacher_weight", "teacher_bias"))
    if target_is_labels:
        check_label_array(func, "labels", target, lead, student_hidden, hidden_name)
        return "labels"
    if tuple(target.shape) != lead:
        fail(func, "mask", f"has shape {tuple(target.shape)}, expected {lead} "
                           f"(the shape of `{hidden_name}` without its hidden axis)")
    check_same_device(func, "mask", target, hidden_name, student_hidden)
    return "mask"


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


def check_labelled_rows(func: str, name: str, every_row_labelled: bool, ignore_index: int) -> None:
    """A length-normalised fused loss divides each row's summed log-prob by its labelled-token count."""
    if not every_row_labelled:
        fail(func, name, f"has a row whose labels are all the ignore_index {ignore_index}: its length is 0 and "
                         "the length-normalised loss divides by it (give every row a labelled token)")


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


def _is_numpy_bool(value: object) -> bool:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, np.bool_)


def _is_numpy_integer(value: object) -> bool:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, np.integer)
