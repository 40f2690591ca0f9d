"""The specification as data, the machinery: the types of the registry's cases, the NumPy input builders
and the bad-input battery derived from them. The cases themselves — every public function of
``dpkd.spec``, its arguments, named variants, closed-form special cases and extra bad-input cases — are
the data of ``dpkd.spec.cases``; each function's options and their valid ranges are the spec's own
declaration (``dpkd.spec.validation.options_of``), read here, never restated.

``conformance/`` parametrizes over :data:`REGISTRY`, so a variant or a special case added there is tested
in every backend without touching the suite, and test ids read like the spec
(``test_closed_form[torch-dpkd_loss: identical chosen and rejected => log 2]``). Declarative on purpose
(as array-api-tests builds its suite from the standard): no docstring parsing, no framework imports.
Reference functions are resolved from ``dpkd.spec`` only when called, so importing this module imports
nothing but NumPy.

Naming (DPO trainers' convention): policy = student q_θ, reference = teacher p, chosen = teacher output
y_t, rejected = student output y_s; a, b, c, d = policy_chosen, policy_rejected, reference_chosen,
reference_rejected summed log-probs (spec/README.md "Naming").

Input builders (:func:`build_call`) are plain NumPy driven by a :class:`Draw` (seed, shapes, options), so
the same inputs come from Hypothesis (``dpkd.conformance.testing``), from the golden-vector script and from
the bad-input battery.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from . import validation
from .validation import REDUCTIONS

__all__ = [
    "ArrayArg",
    "Param",
    "Variant",
    "Call",
    "Draw",
    "ClosedForm",
    "BadInput",
    "FunctionSpec",
    "GENERIC_FUSED",
    "REGISTRY",  # noqa: F822  (module __getattr__: the data of dpkd.spec.cases)
    "get",
    "build_call",
    "default_draw",
    "bad_inputs",
    "differentiable_positions",
    "without",
    "random_logits",
    "random_student_teacher",
    "random_mask",
    "random_labels",
    "random_logps",
    "random_lengths",
    "objective_config",
]

#: The generic functions of a backend's fused lm_head path: every sequence-level loss of the registry is fused
#: by ``fused_sequence_loss(NamedSequenceLoss(name, options), ...)``, every token-level one by
#: ``fused_token_loss(NamedTokenLoss(name, options), ...)``.
GENERIC_FUSED = ("fused_sequence_loss", "fused_token_loss")

# --------------------------------------------------------------------------------------------------
# The data types


@dataclass(frozen=True)
class ArrayArg:
    """An array argument. ``role`` says what it holds and how inputs are built for it:
    "logps" (summed log-probs, ≤ 0), "lengths" (token counts > 0, int), "logits" ([..., T, V]),
    "vocab_logits" ([..., V]), "labels" (int, may hold ignore_index), "mask" (bool [..., T]),
    "scalar_loss" (0-d loss value). ``keyword``: keyword-only (the lengths)."""

    name: str
    role: str
    differentiable: bool
    keyword: bool = False


#: A scalar option and its valid range: the option schema the spec declares beside each function
#: (``dpkd.spec.validation.Option``; CONVENTIONS.md "Scalar options ranges"), read here, never restated.
Param = validation.Option


@dataclass(frozen=True)
class Variant:
    """A named configuration of a function (e.g. DPKD Eq. 8 vs Eq. 9).

    ``options``: fixed keyword options; ``draw``: options Hypothesis draws from their ``Param.draw`` range;
    ``lengths``: which keyword length arrays are passed ("none", "both", "chosen");
    ``omit``: positional array arguments passed as None (reference-free without a reference)."""

    name: str
    description: str
    options: Mapping[str, Any] = field(default_factory=dict)
    draw: tuple[str, ...] = ()
    lengths: str = "none"
    omit: tuple[str, ...] = ()


@dataclass(frozen=True)
class Call:
    """One concrete call: ``dpkd.spec.<function>(*args, **kwargs)``. ``str(call)`` is runnable Python."""

    function: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    variant: str = ""

    def __str__(self) -> str:
        parts = [_fmt(a) for a in self.args] + [f"{k}={_fmt(v)}" for k, v in self.kwargs.items()]
        return f"dpkd.spec.{self.function}({', '.join(parts)})"

    def with_args(self, **changes: Any) -> Call:
        """A copy with positional (by name) or keyword arguments replaced."""
        spec = get(self.function)
        names = [a.name for a in spec.positional]
        args, kwargs = list(self.args), dict(self.kwargs)
        for k, v in changes.items():
            if k in names:
                args[names.index(k)] = v
            else:
                kwargs[k] = v
        return replace(self, args=tuple(args), kwargs=kwargs)

    def arg(self, name: str) -> Any:
        spec = get(self.function)
        names = [a.name for a in spec.positional]
        return self.args[names.index(name)] if name in names else self.kwargs.get(name)


@dataclass(frozen=True)
class Draw:
    """The random choices behind one call (Hypothesis draws these; arrays come from ``seed``).

    ``batch``: leading shape; ``tokens``: T; ``vocab``: V; ``scale``: logit scale; ``margin``: minimum gap
    between the largest and second-largest logit of every row (keeps argmax away from ties);
    ``agree``: fraction of positions where the student's argmax is made equal to the teacher's;
    ``options``: drawn scalar options (β, ε, ...) and the reduction."""

    seed: int = 0
    batch: tuple[int, ...] = (3,)
    tokens: int = 4
    vocab: int = 6
    scale: float = 2.0
    margin: float = 0.5
    agree: float = 0.3
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ClosedForm:
    """A known special case. ``make`` builds float64 inputs; ``expected`` gives the value field ``output``
    of the result must take (``relation`` "==" within tolerance + ``atol``; ">" strictly greater on the
    positions selected by ``where``, and "==" elsewhere)."""

    name: str
    make: Callable[[np.random.Generator], Call]
    expected: Callable[[Call], Any]
    relation: str = "=="
    output: int | str = 0
    atol: float = 0.0
    where: Callable[[Call], np.ndarray] | None = None


@dataclass(frozen=True)
class BadInput:
    """An invalid call: ``mutate`` turns the function's valid example call into one that must raise
    ``DPKDInputError`` whose message names ``argument``."""

    name: str
    argument: str
    mutate: Callable[[Call], Call]
    variant: str | None = None


@dataclass(frozen=True)
class FunctionSpec:
    """One public function of the API (spec/CONVENTIONS.md)."""

    name: str
    kind: str  # "logps" | "sequence" | "token" | "metric" | "objective"
    equation: str
    arrays: tuple[ArrayArg, ...]
    variants: tuple[Variant, ...]
    output: str  # "array" | "tuple" | "PreferenceLoss" | "TokenPreferenceLoss" | "dict"
    reductions: tuple[str, ...] = REDUCTIONS
    gradient: str | None = None
    closed_forms: tuple[ClosedForm, ...] = ()
    errors: tuple[BadInput, ...] = ()
    # Discontinuities of the value or the gradient (argmax ties, AKL's head set, DPOP's kink at c = a):
    # ``conditioning(call, delta)`` is False when the call lies within ``delta`` of one; tests `assume` it.
    conditioning: Callable[[Call, float], bool] | None = None
    # For a loss with internal stop-gradients (AKL weights), the function whose finite differences equal
    # the analytic gradient: ``fd_surrogate(call)(*float arrays) -> scalar``; None: sum of the loss itself.
    fd_surrogate: Callable[[Call], Callable[..., float]] | None = None
    # The backends' named function of the fused lm_head path that computes this one from hidden states
    # (``fused_dpkd_loss``; every sequence / token loss is also fused by the generic GENERIC_FUSED), and
    # Megatron's vocab-parallel one (``vocab_parallel_forward_kl``); None: there is none.
    fused: str | None = None
    vocab_parallel: str | None = None

    @property
    def reference(self) -> str:
        return self.name

    @property
    def params(self) -> tuple[Param, ...]:
        """The options, as the spec function declares them (``dpkd.spec.validation.options_of``)."""
        return validation.options_of(self.name)

    @property
    def positional(self) -> tuple[ArrayArg, ...]:
        return tuple(a for a in self.arrays if not a.keyword)

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    def reference_function(self) -> Callable[..., Any]:
        return getattr(importlib.import_module("dpkd.spec"), self.name)

    def gradient_function(self) -> Callable[..., Any]:
        assert self.gradient is not None, f"{self.name} has no gradient"
        return getattr(importlib.import_module("dpkd.spec"), self.gradient)


def differentiable_positions(spec: FunctionSpec, call: Call) -> list[int]:
    """Positions of the float array arguments a gradient is taken with respect to (None args excluded)."""
    return [i for i, a in enumerate(spec.positional) if a.differentiable and call.args[i] is not None]


# --------------------------------------------------------------------------------------------------
# Input builders (NumPy only)


def _rng(draw: Draw) -> np.random.Generator:
    return np.random.default_rng(draw.seed)


def random_logits(rng: np.random.Generator, shape: tuple[int, ...], scale: float, margin: float) -> np.ndarray:
    """Random logits whose largest entry beats the second by at least ``margin`` in every row."""
    x = rng.standard_normal(shape) * scale
    if shape[-1] > 1:
        srt = np.sort(x, axis=-1)
        gap = srt[..., -1] - srt[..., -2]
        top = np.argmax(x, axis=-1)
        np.put_along_axis(x, top[..., None], np.take_along_axis(x, top[..., None], -1)
                          + np.maximum(margin - gap, 0.0)[..., None], -1)
    return x


def random_student_teacher(rng: np.random.Generator, draw: Draw, shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    teacher = random_logits(rng, shape, draw.scale, draw.margin)
    student = random_logits(rng, shape, draw.scale, draw.margin)
    agree = rng.random(shape[:-1]) < draw.agree
    if shape[-1] > 1 and agree.any():
        # make the student's argmax the teacher's at these positions, keeping its margin
        t_top = np.argmax(teacher, axis=-1)
        s_max = np.max(student, axis=-1)
        boosted = student.copy()
        np.put_along_axis(boosted, t_top[..., None], (s_max + draw.margin)[..., None], -1)
        student = np.where(agree[..., None], boosted, student)
    return student, teacher


def random_mask(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A boolean loss mask with at least one loss token."""
    m = rng.random(shape) < 0.7
    if not m.any():
        m.flat[rng.integers(m.size)] = True
    return m


def random_labels(rng: np.random.Generator, shape: tuple[int, ...], vocab: int, ignore_index: int) -> np.ndarray:
    """Labels in [0, V) with some ``ignore_index``, at least one not ignored."""
    y = rng.integers(0, vocab, size=shape).astype(np.int64)
    keep = random_mask(rng, shape)
    return np.where(keep, y, ignore_index).astype(np.int64)


def random_logps(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return -rng.uniform(0.5, 30.0, size=shape)


def random_lengths(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(1, 25, size=shape).astype(np.int64)


def build_call(spec: FunctionSpec, variant: Variant, draw: Draw) -> Call:
    """The call of ``spec`` under ``variant`` that ``draw`` describes (float64 inputs)."""
    rng = _rng(draw)
    lead = tuple(draw.batch)
    options: dict[str, Any] = {**variant.options}
    options.update({k: v for k, v in draw.options.items() if k not in variant.options})
    token_shape = lead + (draw.tokens,)
    logit_shape = token_shape + (draw.vocab,)
    values: dict[str, Any] = {}
    student_teacher: tuple[np.ndarray, ...] | None = None
    for a in spec.arrays:
        if a.role == "logps":
            values[a.name] = random_logps(rng, lead)
        elif a.role == "lengths":
            wanted = variant.lengths == "both" or (variant.lengths == "chosen" and a.name == "chosen_lengths")
            values[a.name] = random_lengths(rng, lead) if wanted else None
        elif a.role == "logits" and a.name in ("student_logits", "teacher_logits"):
            if student_teacher is None:
                student_teacher = random_student_teacher(rng, draw, logit_shape)
            values[a.name] = student_teacher[0 if a.name == "student_logits" else 1]
        elif a.role == "logits":
            values[a.name] = random_logits(rng, logit_shape, draw.scale, draw.margin)
        elif a.role == "vocab_logits":
            if student_teacher is None:
                student_teacher = random_student_teacher(rng, draw, lead + (draw.vocab,))
            values[a.name] = student_teacher[0 if a.name == "student_logits" else 1]
        elif a.role == "labels":
            ignore = int(options.get("ignore_index", -100))
            values[a.name] = random_labels(rng, token_shape, draw.vocab, ignore)
        elif a.role == "mask":
            values[a.name] = random_mask(rng, token_shape)
        elif a.role == "scalar_loss":
            values[a.name] = np.asarray(rng.uniform(0.1, 5.0))
        else:  # pragma: no cover - a registry typo
            raise ValueError(f"unknown array role {a.role!r}")
    for name in variant.omit:
        values[name] = None
    if spec.kind == "objective":
        options["config"] = objective_config(options.pop("config"))
    args = tuple(values[a.name] for a in spec.positional)
    kwargs = {a.name: values[a.name] for a in spec.arrays if a.keyword and values[a.name] is not None}
    kwargs.update(options)
    return Call(spec.name, args, kwargs, variant.name)


def default_draw(spec: FunctionSpec, variant: Variant, seed: int = 0, **changes: Any) -> Draw:
    """A fixed, well-conditioned draw: drawn options at the middle of their ``draw`` range."""
    options: dict[str, Any] = {}
    for name in variant.draw:
        lo, hi = spec.param(name).draw  # type: ignore[misc]
        options[name] = round((lo + hi) / 2.0, 3)
    if spec.reductions and "reduction" not in variant.options:
        options["reduction"] = "none"
    options.update(changes.pop("options", {}))
    return Draw(seed=seed, options=options, **changes)


def objective_config(preset: str) -> Any:
    return getattr(importlib.import_module("dpkd.spec"), preset)


# --------------------------------------------------------------------------------------------------
# The cases (``dpkd.spec.cases``, which imports this module: read on first use)


def __getattr__(name: str) -> Any:
    if name == "REGISTRY":
        return importlib.import_module(".cases", __package__).REGISTRY
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get(name: str) -> FunctionSpec:
    spec = next((s for s in importlib.import_module(".cases", __package__).REGISTRY if s.name == name), None)
    if spec is None:
        raise KeyError(name)
    return spec


# --------------------------------------------------------------------------------------------------
# The bad-input battery: derived from the data, plus each function's own cases (``FunctionSpec.errors``)


# --------------------------------------------------------------------------------------------------
# The bad-input battery (spec/CONVENTIONS.md): derived from the data above, plus a few per-function cases


def _set_first(x: np.ndarray, value: Any) -> np.ndarray:
    y = np.array(x, copy=True)
    y.flat[0] = value
    return y


def _grow(x: np.ndarray) -> np.ndarray:
    """The same array with one more element on its first axis (a shape mismatch)."""
    x = np.asarray(x)
    if x.ndim == 0:
        return np.stack([x, x])
    return np.concatenate([x, x[:1]], axis=0)


def bad_inputs(spec: FunctionSpec) -> tuple[BadInput, ...]:
    """Every invalid-input case of ``spec``: option ranges, shapes, values (see CONVENTIONS.md), derived from
    its declaration, plus the function's own ``errors``."""
    return (*_option_cases(spec), *_array_cases(spec), *_lengths_cases(spec), *_token_cases(spec),
            *_label_cases(spec), *spec.errors)


def _option_cases(spec: FunctionSpec) -> list[BadInput]:
    """Options out of range / unknown choices (checked first, so any valid arrays do)."""
    cases = []
    for p in spec.params:
        # the normalizer only exists under a mean: test its range there, not the reduction rule
        extra = {"reduction": "mean"} if p.name == "normalizer" else {}
        for bad in p.invalid_values():
            cases.append(BadInput(f"{p.name}={bad!r}", p.name,
                                  lambda c, n=p.name, b=bad, e=extra: c.with_args(**{n: b}, **e)))
    if any(p.name == "normalizer" for p in spec.params):
        for red in ("sum", "none"):
            cases.append(BadInput(f"normalizer with reduction={red!r}", "normalizer",
                                  lambda c, r=red: c.with_args(normalizer=4.0, reduction=r)))
    return cases


def _array_cases(spec: FunctionSpec) -> list[BadInput]:
    """NaN/Inf in every float array; a different shape for every per-example array."""
    cases = []
    for a in (a for a in spec.arrays if a.role in ("logps", "logits", "vocab_logits", "scalar_loss")):
        present = next((v.name for v in spec.variants if a.name not in v.omit), None)
        for bad in (math.nan, math.inf):
            cases.append(BadInput(f"{a.name} holds {bad}", a.name,
                                  lambda c, n=a.name, b=bad: c.with_args(**{n: _set_first(c.arg(n), b)}),
                                  variant=present))
    if spec.kind == "sequence" or spec.name in ("implicit_reward", "preference_metrics"):
        for a in spec.arrays[1:]:
            cases.append(BadInput(f"{a.name} has a different shape", a.name,
                                  lambda c, n=a.name: c.with_args(**{n: _grow(c.arg(n))}),
                                  variant=_variant_with_lengths(spec) if a.role == "lengths" else None))
    return cases


def _lengths_cases(spec: FunctionSpec) -> list[BadInput]:
    """Lengths ≤ 0; and one side's lengths alone where both are optional (Eq. 9 normalises both sides)."""
    variant = _variant_with_lengths(spec)
    lengths = [a.name for a in spec.arrays if a.role == "lengths"]
    cases = [BadInput(f"{n} = {bad}", n, lambda c, n=n, b=bad: c.with_args(**{n: _set_first(c.arg(n), b)}),
                      variant=variant) for n in lengths for bad in (0, -3)]
    both = next((v.name for v in spec.variants if v.lengths == "both"), None)
    params = inspect.signature(spec.reference_function()).parameters
    if both and lengths == ["chosen_lengths", "rejected_lengths"] and \
            params["chosen_lengths"].default is not inspect.Parameter.empty:  # required ones: a TypeError
        cases += [BadInput("chosen_lengths without rejected_lengths", "rejected_lengths", without("rejected_lengths"),
                           both),
                  BadInput("rejected_lengths without chosen_lengths", "chosen_lengths", without("chosen_lengths"),
                           both)]
    return cases


def _token_cases(spec: FunctionSpec) -> list[BadInput]:
    """Student/teacher logits and the mask: vocabulary, positions, shape, binary, non-empty mean."""
    names = [a.name for a in spec.positional]
    if "teacher_logits" not in names:
        return []
    cases = [BadInput("teacher vocabulary differs from the student's", "teacher_logits",
                      lambda c: c.with_args(teacher_logits=c.arg("teacher_logits")[..., :-1]))]
    if "mask" in names:
        cases += [
            BadInput("teacher has a different number of positions", "teacher_logits",
                     lambda c: c.with_args(teacher_logits=c.arg("teacher_logits")[..., :-1, :])),
            BadInput("mask has a different shape", "mask", lambda c: c.with_args(mask=c.arg("mask")[..., :-1])),
            BadInput("mask is not binary", "mask", lambda c: c.with_args(mask=np.where(c.arg("mask"), 0.5, 0.0))),
            BadInput("mask selects no token under a mean", "mask",
                     lambda c: c.with_args(mask=np.zeros_like(c.arg("mask")), reduction="mean")),
        ]
    return cases


def _label_cases(spec: FunctionSpec) -> list[BadInput]:
    """Labels: shape, outside the vocabulary, not integers; every label ignored under a mean."""
    if "labels" not in [a.name for a in spec.positional]:
        return []
    v = lambda c: c.arg("logits").shape[-1]  # noqa: E731
    cases = [
        BadInput("labels have a different shape", "labels", lambda c: c.with_args(labels=c.arg("labels")[..., :-1])),
        BadInput("label = V (outside the vocabulary)", "labels",
                 lambda c: c.with_args(labels=_set_first(c.arg("labels"), v(c)))),
        BadInput("label = -5 (negative, not the ignore_index)", "labels",
                 lambda c: c.with_args(labels=_set_first(c.arg("labels"), -5))),
        BadInput("float labels", "labels", lambda c: c.with_args(labels=c.arg("labels").astype(np.float64))),
    ]
    if spec.name == "cross_entropy":
        cases.append(BadInput("every label ignored under a mean", "labels",
                              lambda c: c.with_args(labels=np.full_like(c.arg("labels"), -100), reduction="mean")))
    return cases


def _variant_with_lengths(spec: FunctionSpec) -> str | None:
    return next((v.name for v in spec.variants if v.lengths != "none"), None)


def without(name: str) -> Callable[[Call], Call]:
    """A mutation that drops the keyword argument ``name`` from a call."""

    def mutate(c: Call) -> Call:
        return replace(c, kwargs={k: v for k, v in c.kwargs.items() if k != name})

    return mutate


# --------------------------------------------------------------------------------------------------




def _fmt(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"np.array({x.tolist()!r}, dtype=np.{x.dtype})"
    if isinstance(x, float) and not math.isfinite(x):
        return f"float({str(x)!r})"
    return repr(x)
