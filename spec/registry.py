"""The specification as data: every public function of ``dpkd.spec``, its arguments, options and their
valid ranges, its named variants, its closed-form special cases and its bad-input cases.

``conformance/`` parametrizes over :data:`REGISTRY`, so a variant or a special case added here is tested
in every backend without touching the suite, and test ids read like the spec
(``test_closed_form[torch-dpkd_loss: identical chosen and rejected => log 2]``). Declarative on purpose
(as array-api-tests builds its suite from the standard): no docstring parsing, no framework imports.
Reference functions are named (``reference="dpkd_loss"``, ``gradient="dpkd_loss_grad"``) and resolved
from ``dpkd.spec`` only when called, so importing this module imports nothing but NumPy.

Naming (DPO trainers' convention): policy = student q_θ, reference = teacher p, chosen = teacher output
y_t, rejected = student output y_s; a, b, c, d = policy_chosen, policy_rejected, reference_chosen,
reference_rejected summed log-probs (SPEC-MATH §1, CONVENTIONS.md).

Input builders (:func:`build_call`) are plain NumPy driven by a :class:`Draw` (seed, shapes, options), so
the same inputs come from Hypothesis (``dpkd.spec.testing``), from the golden-vector script and from the
bad-input battery.
"""

from __future__ import annotations

import importlib
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
    "REGISTRY",
    "get",
    "build_call",
    "default_draw",
    "bad_inputs",
    "differentiable_positions",
]

LOG2 = math.log(2.0)


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
    """One public function of the API (DESIGN.md §2)."""

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


def _logits(rng: np.random.Generator, shape: tuple[int, ...], scale: float, margin: float) -> np.ndarray:
    """Random logits whose largest entry beats the second by at least ``margin`` in every row."""
    x = rng.standard_normal(shape) * scale
    if shape[-1] > 1:
        srt = np.sort(x, axis=-1)
        gap = srt[..., -1] - srt[..., -2]
        top = np.argmax(x, axis=-1)
        np.put_along_axis(x, top[..., None], np.take_along_axis(x, top[..., None], -1)
                          + np.maximum(margin - gap, 0.0)[..., None], -1)
    return x


def _student_teacher(rng: np.random.Generator, draw: Draw, shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    teacher = _logits(rng, shape, draw.scale, draw.margin)
    student = _logits(rng, shape, draw.scale, draw.margin)
    agree = rng.random(shape[:-1]) < draw.agree
    if shape[-1] > 1 and agree.any():
        # make the student's argmax the teacher's at these positions, keeping its margin
        t_top = np.argmax(teacher, axis=-1)
        s_max = np.max(student, axis=-1)
        boosted = student.copy()
        np.put_along_axis(boosted, t_top[..., None], (s_max + draw.margin)[..., None], -1)
        student = np.where(agree[..., None], boosted, student)
    return student, teacher


def _mask(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A boolean loss mask with at least one loss token."""
    m = rng.random(shape) < 0.7
    if not m.any():
        m.flat[rng.integers(m.size)] = True
    return m


def _labels(rng: np.random.Generator, shape: tuple[int, ...], vocab: int, ignore_index: int) -> np.ndarray:
    """Labels in [0, V) with some ``ignore_index``, at least one not ignored."""
    y = rng.integers(0, vocab, size=shape).astype(np.int64)
    keep = _mask(rng, shape)
    return np.where(keep, y, ignore_index).astype(np.int64)


def _logps(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return -rng.uniform(0.5, 30.0, size=shape)


def _lengths(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
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
            values[a.name] = _logps(rng, lead)
        elif a.role == "lengths":
            wanted = variant.lengths == "both" or (variant.lengths == "chosen" and a.name == "chosen_lengths")
            values[a.name] = _lengths(rng, lead) if wanted else None
        elif a.role == "logits" and a.name in ("student_logits", "teacher_logits"):
            if student_teacher is None:
                student_teacher = _student_teacher(rng, draw, logit_shape)
            values[a.name] = student_teacher[0 if a.name == "student_logits" else 1]
        elif a.role == "logits":
            values[a.name] = _logits(rng, logit_shape, draw.scale, draw.margin)
        elif a.role == "vocab_logits":
            if student_teacher is None:
                student_teacher = _student_teacher(rng, draw, lead + (draw.vocab,))
            values[a.name] = student_teacher[0 if a.name == "student_logits" else 1]
        elif a.role == "labels":
            ignore = int(options.get("ignore_index", -100))
            values[a.name] = _labels(rng, token_shape, draw.vocab, ignore)
        elif a.role == "mask":
            values[a.name] = _mask(rng, token_shape)
        elif a.role == "scalar_loss":
            values[a.name] = np.asarray(rng.uniform(0.1, 5.0))
        else:  # pragma: no cover - a registry typo
            raise ValueError(f"unknown array role {a.role!r}")
    for name in variant.omit:
        values[name] = None
    if spec.kind == "objective":
        options["config"] = _objective_config(options.pop("config"))
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


def _objective_config(preset: str) -> Any:
    return getattr(importlib.import_module("dpkd.spec"), preset)


# --------------------------------------------------------------------------------------------------
# Small independent float64 formulas used by closed forms and conditioning (not the spec's code)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def _kl(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def _softplus(z: Any) -> Any:
    return np.logaddexp(0.0, z)


def _h(call: Call) -> np.ndarray:
    a, b, c, d = call.args[:4]
    c = 0.0 if c is None or call.kwargs.get("reference_free") else c
    d = 0.0 if d is None or call.kwargs.get("reference_free") else d
    lt = call.kwargs.get("chosen_lengths", 1.0)
    ls = call.kwargs.get("rejected_lengths", 1.0)
    return (a - c) / lt - (b - d) / ls


def _top2_gap(x: np.ndarray) -> np.ndarray:
    if x.shape[-1] < 2:
        return np.full(x.shape[:-1], np.inf)
    s = np.sort(x, axis=-1)
    return s[..., -1] - s[..., -2]


def _token_conditioning(call: Call, delta: float) -> bool:
    s, t, m = call.args
    sel = np.asarray(m, bool)
    ok = bool(np.all(_top2_gap(s)[sel] >= delta) and np.all(_top2_gap(t)[sel] >= delta))
    if call.kwargs.get("form") == "dpop":
        yt = np.argmax(t, axis=-1)[..., None]
        a = np.take_along_axis(_log_softmax(s), yt, -1)[..., 0]
        c = np.take_along_axis(_log_softmax(t), yt, -1)[..., 0]
        ok = ok and bool(np.all(np.abs(c - a)[sel] >= delta))
    return ok


def _dpop_conditioning(call: Call, delta: float) -> bool:
    a, _, c, _ = call.args
    return bool(np.all(np.abs(c - a) >= delta))


def _akl_parts(call: Call) -> tuple[np.ndarray, ...]:
    s, t, _ = call.args
    tau = float(call.kwargs.get("temperature", 1.0))
    mu = float(call.kwargs.get("mu", 0.5))
    lq, lp = _log_softmax(s / tau), _log_softmax(t / tau)
    p, q = np.exp(lp), np.exp(lq)
    order = np.argsort(-p, axis=-1, kind="stable")
    p_sorted = np.take_along_axis(p, order, -1)
    cum = np.cumsum(p_sorted, axis=-1)
    head_sorted = cum <= mu
    head_sorted[..., 0] = True
    head = np.zeros_like(head_sorted)
    np.put_along_axis(head, order, head_sorted, -1)
    diff = np.abs(p - q)
    g_head = np.sum(np.where(head, diff, 0.0), axis=-1)
    g_tail = np.sum(np.where(head, 0.0, diff), axis=-1)
    return lp, lq, p_sorted, cum, mu, g_head, g_tail


def _akl_conditioning(call: Call, delta: float) -> bool:
    _, _, p_sorted, cum, mu, g_head, g_tail = _akl_parts(call)
    m = np.asarray(call.args[2], bool)
    gaps = -np.diff(p_sorted, axis=-1)
    return bool(
        np.all(gaps[m] >= delta) and np.all(np.abs(cum - mu)[m] >= delta) and np.all((g_head + g_tail)[m] >= delta)
    )


def _akl_surrogate(call: Call) -> Callable[..., float]:
    """AKL with its weights frozen at ``call`` (they are stop-gradient in the spec, CONVENTIONS.md)."""
    _, _, _, _, _, g_head, g_tail = _akl_parts(call)
    total = g_head + g_tail
    # p = q exactly gives 0/0; conditioning keeps that off the mask, but a masked-out position can have it
    # (found by Hypothesis: teacher = student + a constant), and NaN·0 would poison the sum
    w_head = np.divide(g_head, total, out=np.zeros_like(total), where=total > 0)
    mask = np.asarray(call.args[2], np.float64)
    reduction = call.kwargs.get("reduction", "mean")
    denom = call.kwargs.get("normalizer") or (mask.sum() if reduction == "mean" else 1.0)
    spec = importlib.import_module("dpkd.spec")
    tau = call.kwargs.get("temperature", 1.0)

    def f(student: np.ndarray, teacher: np.ndarray) -> float:
        fkl = spec.forward_kl(student, teacher, call.args[2], temperature=tau, reduction="none")
        rkl = spec.reverse_kl(student, teacher, call.args[2], temperature=tau, reduction="none")
        return float(np.sum(mask * (w_head * fkl + (1.0 - w_head) * rkl)) / denom)

    return f


# --------------------------------------------------------------------------------------------------
# Closed-form makers


def _seq_call(name: str, a: Any, b: Any, c: Any = None, d: Any = None, **kwargs: Any) -> Call:
    spec = get(name)
    n = len(spec.positional)
    args = tuple(np.asarray(x, np.float64) if x is not None else None for x in (a, b, c, d)[:n])
    return Call(name, args, {"reduction": "none", **kwargs})


def _token_call(name: str, student: np.ndarray, teacher: np.ndarray, mask: np.ndarray | None = None,
                **kwargs: Any) -> Call:
    mask = np.ones(student.shape[:-1], bool) if mask is None else mask
    return Call(name, (student, teacher, mask), {"reduction": "none", **kwargs})


def _agreeing(rng: np.random.Generator, shape: tuple[int, ...] = (2, 3, 5)) -> tuple[np.ndarray, np.ndarray]:
    """Student and teacher logits with the same argmax at every position but different values."""
    teacher = _logits(rng, shape, 2.0, 0.5)
    student = _logits(rng, shape, 2.0, 0.5)
    top = np.argmax(teacher, axis=-1)[..., None]
    np.put_along_axis(student, top, np.max(student, axis=-1, keepdims=True) + 0.5, -1)
    return student, teacher


def _disagreeing(rng: np.random.Generator, shape: tuple[int, ...] = (2, 3, 5)) -> tuple[np.ndarray, np.ndarray]:
    """Student and teacher logits whose argmaxes differ at every position (by a clear margin)."""
    teacher = _logits(rng, shape, 2.0, 0.5)
    student = _logits(rng, shape, 2.0, 0.5)
    top = np.argmax(teacher, axis=-1)[..., None]
    other = (top + 1 + rng.integers(0, shape[-1] - 1, size=top.shape)) % shape[-1]
    np.put_along_axis(student, other, np.max(student, axis=-1, keepdims=True) + 0.5, -1)
    return student, teacher


def _uniform_logits_call(name: str, rng: np.random.Generator, **kwargs: Any) -> Call:
    logits = np.full((2, 4, 7), 3.25)
    labels = _labels(rng, (2, 4), 7, -100)
    return Call(name, (logits, labels), kwargs)


def _loss_positions(call: Call) -> np.ndarray:
    """The ``where`` of the strict token-level bounds: every loss position."""
    return np.asarray(call.args[2], bool)


def _no_penalty_dpop(rng: np.random.Generator, form: str) -> Call:
    a = _logps(rng, (5,))
    c = a - rng.uniform(0.1, 3.0, size=5)  # c < a: log p(y_t) below log q(y_t), the penalty is 0
    return _seq_call("dpop_loss", a, _logps(rng, (5,)), c, _logps(rng, (5,)), beta=0.3, lambda_=50.0,
                     form=form)


def _penalised_dpop(rng: np.random.Generator, form: str) -> Call:
    a = _logps(rng, (5,))
    c = a + rng.uniform(0.1, 3.0, size=5)  # c > a: the DPOP penalty λ(c − a) is active
    return _seq_call("dpop_loss", a, _logps(rng, (5,)), c, _logps(rng, (5,)), beta=0.3, lambda_=2.0,
                     form=form)


# --------------------------------------------------------------------------------------------------
# The registry


_SEQ4 = (
    ArrayArg("policy_chosen_logps", "logps", True),
    ArrayArg("policy_rejected_logps", "logps", True),
    ArrayArg("reference_chosen_logps", "logps", True),
    ArrayArg("reference_rejected_logps", "logps", True),
)
_SEQ2 = _SEQ4[:2]
_LENGTHS = (ArrayArg("chosen_lengths", "lengths", False, keyword=True),
            ArrayArg("rejected_lengths", "lengths", False, keyword=True))
_TOKEN = (ArrayArg("student_logits", "logits", True), ArrayArg("teacher_logits", "logits", True),
          ArrayArg("mask", "mask", False))
_LOGITS_LABELS = (ArrayArg("logits", "logits", True), ArrayArg("labels", "labels", False))

_DIVERGENCE_VARIANTS = (
    Variant("default", "temperature 1, mean over the mask's own count"),
    Variant("temperature", "p = softmax(T/τ), q = softmax(S/τ) (no τ² factor, TRL GKD)", draw=("temperature",)),
    Variant("normalizer", "mean divided by the caller's global token count (gradient accumulation)",
            options={"reduction": "mean"}, draw=("normalizer",)),
)


def _p_equals_q(name: str, **kw: Any) -> ClosedForm:
    def make(rng: np.random.Generator) -> Call:
        t = _logits(rng, (2, 3, 6), 2.0, 0.5)
        return _token_call(name, t.copy(), t, **kw)

    return ClosedForm(f"{name}: p = q => 0", make, lambda call: np.zeros(call.args[2].shape), atol=1e-14)


def _kl_closed_form(name: str, label: str, forward: bool, **kw: Any) -> ClosedForm:
    """``name`` equals a KL computed here from its definition, Σ p (log p − log q)."""

    def expected(call: Call) -> np.ndarray:
        tau = call.kwargs.get("temperature", 1.0)
        lq, lp = _log_softmax(call.args[0] / tau), _log_softmax(call.args[1] / tau)
        return (_kl(lp, lq) if forward else _kl(lq, lp)) * call.args[2]

    def make(rng: np.random.Generator) -> Call:
        s, t = _disagreeing(rng)
        return _token_call(name, s, t, **kw)

    return ClosedForm(f"{name}: {label}", make, expected)


REGISTRY: tuple[FunctionSpec, ...] = (
    FunctionSpec(
        "token_logps", "logps", "SPEC-MATH §3A: log_softmax(logits)[label], 0 where ignored",
        _LOGITS_LABELS,
        (Variant("default", "ignore_index -100"),
         Variant("ignore_index", "a custom ignore_index (-1)", options={"ignore_index": -1})),
        "array", reductions=(), gradient="token_logps_grad",
        closed_forms=(
            ClosedForm("token_logps: uniform logits => -log V, 0 where ignored",
                       lambda rng: _uniform_logits_call("token_logps", rng),
                       lambda call: np.where(call.args[1] != -100, -math.log(7), 0.0)),
        ),
    ),
    FunctionSpec(
        "sequence_logps", "logps", "SPEC-MATH §3A: a = Σ_j m_j log q(y_j); (sum, token count)",
        _LOGITS_LABELS,
        (Variant("default", "ignore_index -100"),
         Variant("ignore_index", "a custom ignore_index (-1)", options={"ignore_index": -1})),
        "tuple", reductions=(), gradient="sequence_logps_grad",
        closed_forms=(
            ClosedForm("sequence_logps: uniform logits => sum = -n log V",
                       lambda rng: _uniform_logits_call("sequence_logps", rng),
                       lambda call: -math.log(7) * np.sum(call.args[1] != -100, axis=-1)),
            ClosedForm("sequence_logps: n_tokens counts the labels that are not ignored",
                       lambda rng: _uniform_logits_call("sequence_logps", rng),
                       lambda call: np.sum(call.args[1] != -100, axis=-1), output=1),
        ),
    ),
    FunctionSpec(
        "dpkd_loss", "sequence", "paper Eq. 8 / Eq. 9; SPEC-MATH §3A; cDPO smoothing",
        _SEQ4 + _LENGTHS,
        (Variant("eq8", "paper Eq. 8: h = (a − c) − (b − d)", draw=("beta",)),
         Variant("eq9", "paper Eq. 9: h = (a − c)/L_t − (b − d)/L_s", draw=("beta",), lengths="both"),
         Variant("cdpo", "label smoothing ε: (1−ε)softplus(−βh) + ε softplus(βh)",
                 draw=("beta", "label_smoothing")),
         Variant("reference_free", "c = d = 0 (reference arrays given, unused)", options={"reference_free": True},
                 draw=("beta",)),
         Variant("reference_free_no_reference", "c = d = 0, reference arrays None",
                 options={"reference_free": True}, draw=("beta",),
                 omit=("reference_chosen_logps", "reference_rejected_logps"))),
        "PreferenceLoss", gradient="dpkd_loss_grad",
        closed_forms=(
            ClosedForm("dpkd_loss: identical chosen and rejected => log 2",
                       lambda rng: _seq_call("dpkd_loss", *(lambda a, c: (a, a, c, c))(_logps(rng, (6,)),
                                                                                       _logps(rng, (6,))),
                                             beta=0.7),
                       lambda call: np.full(6, LOG2)),
            ClosedForm("dpkd_loss: cDPO at h = 0 => log 2 for any label_smoothing",
                       lambda rng: _seq_call("dpkd_loss", *(lambda a: (a, a, a, a))(_logps(rng, (4,))),
                                             beta=0.3, label_smoothing=0.37),
                       lambda call: np.full(4, LOG2)),
            ClosedForm("dpkd_loss: h -> +inf => 0",
                       lambda rng: _seq_call("dpkd_loss", np.zeros(3), np.full(3, -1e4), np.zeros(3), np.zeros(3),
                                             beta=0.5),
                       lambda call: np.zeros(3), atol=1e-300),
            ClosedForm("dpkd_loss: h -> -inf => -beta h",
                       lambda rng: _seq_call("dpkd_loss", np.full(3, -1e4), np.zeros(3), np.zeros(3), np.zeros(3),
                                             beta=0.5),
                       lambda call: np.full(3, 0.5e4)),
            ClosedForm("dpkd_loss: Eq. 9 with unit lengths => Eq. 8",
                       lambda rng: _seq_call("dpkd_loss", _logps(rng, (5,)), _logps(rng, (5,)), _logps(rng, (5,)),
                                             _logps(rng, (5,)), beta=0.2, chosen_lengths=np.ones(5, np.int64),
                                             rejected_lengths=np.ones(5, np.int64)),
                       lambda call: _softplus(-0.2 * ((call.args[0] - call.args[2]) - (call.args[1] - call.args[3])))),
            ClosedForm("dpkd_loss: reference_free => c = d = 0",
                       lambda rng: _seq_call("dpkd_loss", _logps(rng, (5,)), _logps(rng, (5,)), _logps(rng, (5,)),
                                             _logps(rng, (5,)), beta=0.2, reference_free=True),
                       lambda call: _softplus(-0.2 * (call.args[0] - call.args[1]))),
            ClosedForm("dpkd_loss: chosen_rewards = beta (a - c) / L_t",
                       lambda rng: _seq_call("dpkd_loss", _logps(rng, (5,)), _logps(rng, (5,)), _logps(rng, (5,)),
                                             _logps(rng, (5,)), beta=0.2, chosen_lengths=_lengths(rng, (5,)),
                                             rejected_lengths=_lengths(rng, (5,))),
                       lambda call: 0.2 * (call.args[0] - call.args[2]) / call.kwargs["chosen_lengths"], output=1),
        ),
    ),
    FunctionSpec(
        "ipo_loss", "sequence", "paper Table 2 / Azar 2024 Eq. 17: (h − 1/(2τ))²",
        _SEQ4 + _LENGTHS,
        (Variant("summed", "summed log-ratios (the released code)", options={"length_normalize": False},
                 draw=("tau",)),
         Variant("length_averaged", "log-ratios divided by the lengths (TRL)", options={"length_normalize": True},
                 draw=("tau",), lengths="both")),
        "PreferenceLoss", gradient="ipo_loss_grad",
        closed_forms=(
            ClosedForm("ipo_loss: identical chosen and rejected => 1/(4 tau^2)",
                       lambda rng: _seq_call("ipo_loss", *(lambda a, c: (a, a, c, c))(_logps(rng, (4,)),
                                                                                      _logps(rng, (4,))),
                                             tau=0.25, length_normalize=False),
                       lambda call: np.full(4, 4.0)),
            ClosedForm("ipo_loss: h = 1/(2 tau) => 0",
                       lambda rng: _seq_call("ipo_loss", np.full(3, -1.0), np.full(3, -2.0), np.full(3, -2.0),
                                             np.full(3, -2.0), tau=0.5, length_normalize=False),
                       lambda call: np.zeros(3), atol=1e-15),
        ),
    ),
    FunctionSpec(
        "cpo_loss", "sequence", "Xu 2024 / paper Table 2 (typo D13 corrected): softplus(−β(a − b)) − w·a",
        _SEQ2 + _LENGTHS[:1],
        (Variant("default", "NLL on the summed chosen log-prob", draw=("beta", "nll_weight")),
         Variant("length_normalised_nll", "NLL divided by |y_t|", draw=("beta", "nll_weight"), lengths="chosen"),
         Variant("cdpo", "label-smoothed preference term", draw=("beta", "nll_weight", "label_smoothing")),
         Variant("preference_only", "nll_weight = 0", options={"nll_weight": 0.0}, draw=("beta",))),
        "PreferenceLoss", gradient="cpo_loss_grad",
        closed_forms=(
            ClosedForm("cpo_loss: a = b => log 2 - w a",
                       lambda rng: _seq_call("cpo_loss", *(lambda a: (a, a))(_logps(rng, (4,))), beta=0.4,
                                             nll_weight=0.75),
                       lambda call: LOG2 - 0.75 * call.args[0]),
        ),
    ),
    FunctionSpec(
        "simpo_loss", "sequence", "Meng 2024 / paper Table 2: softplus(−(βa/L_t − βb/L_s − γ))",
        _SEQ2 + _LENGTHS,
        (Variant("default", "reference-free, margin γ inside σ, length-normalised", draw=("beta", "gamma"),
                 lengths="both"),
         Variant("cdpo", "label-smoothed", draw=("beta", "gamma", "label_smoothing"), lengths="both")),
        "PreferenceLoss", gradient="simpo_loss_grad",
        closed_forms=(
            ClosedForm("simpo_loss: beta a/L_t - beta b/L_s = gamma => log 2",
                       lambda rng: _seq_call("simpo_loss", np.array([-4.0, -9.0]), np.array([-12.0, -8.0]),
                                             chosen_lengths=np.array([2, 3]), rejected_lengths=np.array([4, 2]),
                                             beta=2.0, gamma=2.0),
                       lambda call: np.full(2, LOG2)),
        ),
    ),
    FunctionSpec(
        "dpop_loss", "sequence", "Pal 2024 Eq. 3 (smaug) and the released code (released); P = max(0, c − a)",
        _SEQ4,
        (Variant("smaug", "penalty inside σ, scaled by β: softplus(−β(h − λP))", options={"form": "smaug"},
                 draw=("beta", "lambda_")),
         Variant("released", "penalty outside σ, unscaled: softplus(−βh) + λP", options={"form": "released"},
                 draw=("beta", "lambda_"))),
        "PreferenceLoss", gradient="dpop_loss_grad", conditioning=_dpop_conditioning,
        closed_forms=tuple(
            ClosedForm(f"dpop_loss: {form}: c < a (no penalty) => DPKD Eq. 8",
                       lambda rng, form=form: _no_penalty_dpop(rng, form),
                       lambda call: _softplus(-0.3 * _h(call)))
            for form in ("smaug", "released")
        ) + (
            ClosedForm("dpop_loss: smaug: c > a => softplus(-beta (h - lambda (c - a)))",
                       lambda rng: _penalised_dpop(rng, "smaug"),
                       lambda call: _softplus(-0.3 * (_h(call) - 2.0 * (call.args[2] - call.args[0])))),
            ClosedForm("dpop_loss: released: c > a => softplus(-beta h) + lambda (c - a)",
                       lambda rng: _penalised_dpop(rng, "released"),
                       lambda call: _softplus(-0.3 * _h(call)) + 2.0 * (call.args[2] - call.args[0])),
        ),
    ),
    FunctionSpec(
        "dpkd_token_loss", "token", "released code get_distil_loss; SPEC-MATH §3B (argmax preference per token)",
        _TOKEN,
        (Variant("sigmoid", "softplus(−βh), h = (a − b) − (c − d)", options={"form": "sigmoid"}, draw=("beta",)),
         Variant("cdpo", "label-smoothed sigmoid form", options={"form": "sigmoid"},
                 draw=("beta", "label_smoothing")),
         Variant("ipo", "(h − 1/(2β))²", options={"form": "ipo"}, draw=("beta",)),
         Variant("dpop", "softplus(−βh) + λ max(0, c − a)", options={"form": "dpop"}, draw=("beta", "lambda_")),
         Variant("reference_free", "h = a − b", options={"form": "sigmoid", "reference_free": True},
                 draw=("beta",)),
         Variant("normalizer", "mean divided by the caller's global token count",
                 options={"form": "sigmoid", "reduction": "mean"}, draw=("beta", "normalizer"))),
        "TokenPreferenceLoss", gradient="dpkd_token_loss_grad", conditioning=_token_conditioning,
        closed_forms=(
            ClosedForm("dpkd_token_loss: argmaxes agree => per-token loss = log 2",
                       lambda rng: _token_call("dpkd_token_loss", *_agreeing(rng), beta=0.3),
                       lambda call: np.full(call.args[2].shape, LOG2)),
            ClosedForm("dpkd_token_loss: argmaxes differ => per-token loss > log 2",
                       lambda rng: _token_call("dpkd_token_loss", *_disagreeing(rng), beta=0.3),
                       lambda call: np.full(call.args[2].shape, LOG2), relation=">",
                       where=_loss_positions),
            ClosedForm("dpkd_token_loss: ipo: argmaxes agree => 1/(4 beta^2)",
                       lambda rng: _token_call("dpkd_token_loss", *_agreeing(rng), beta=0.5, form="ipo"),
                       lambda call: np.full(call.args[2].shape, 1.0)),
            ClosedForm("dpkd_token_loss: ipo: argmaxes differ => loss > 1/(4 beta^2)",
                       lambda rng: _token_call("dpkd_token_loss", *_disagreeing(rng), beta=0.5, form="ipo"),
                       lambda call: np.full(call.args[2].shape, 1.0), relation=">",
                       where=_loss_positions),
            ClosedForm("dpkd_token_loss: argmaxes agree => agreement_rate = 1",
                       lambda rng: _token_call("dpkd_token_loss", *_agreeing(rng), beta=0.3),
                       lambda call: 1.0, output=1),
            ClosedForm("dpkd_token_loss: argmaxes differ => agreement_rate = 0",
                       lambda rng: _token_call("dpkd_token_loss", *_disagreeing(rng), beta=0.3),
                       lambda call: 0.0, output=1),
        ),
    ),
    FunctionSpec(
        "cross_entropy", "token", "SFT: −log q[label] over non-ignored tokens (SPEC-MATH §6)",
        _LOGITS_LABELS,
        (Variant("default", "mean over the non-ignored labels"),
         Variant("normalizer", "mean divided by the caller's global token count",
                 options={"reduction": "mean"}, draw=("normalizer",))),
        "array", gradient="cross_entropy_grad",
        closed_forms=(
            ClosedForm("cross_entropy: uniform logits => log V",
                       lambda rng: _uniform_logits_call("cross_entropy", rng, reduction="mean"),
                       lambda call: math.log(7)),
        ),
    ),
    FunctionSpec(
        "forward_kl", "token", "KL(p‖q) = Σ p (log p − log q) (SPEC-MATH §6, word-level KD)",
        _TOKEN, _DIVERGENCE_VARIANTS, "array", gradient="forward_kl_grad",
        closed_forms=(_p_equals_q("forward_kl"),
                      _kl_closed_form("forward_kl", "= sum p (log p - log q)", True, temperature=1.5)),
    ),
    FunctionSpec(
        "reverse_kl", "token", "KL(q‖p) = Σ q (log q − log p) (SPEC-MATH §6)",
        _TOKEN, _DIVERGENCE_VARIANTS, "array", gradient="reverse_kl_grad",
        closed_forms=(_p_equals_q("reverse_kl"),
                      _kl_closed_form("reverse_kl", "= sum q (log q - log p)", False, temperature=1.5)),
    ),
    FunctionSpec(
        "generalized_jsd", "token", "TRL GKD: β KL(p‖M) + (1−β) KL(q‖M), M = (1−β)q + βp; end points KLs",
        _TOKEN,
        (Variant("beta_0", "β = 0: forward KL(p‖q) (end-point convention)", options={"beta": 0.0}),
         Variant("beta_1", "β = 1: reverse KL(q‖p) (end-point convention)", options={"beta": 1.0}),
         Variant("interior", "0 < β < 1: the mixture form", draw=("beta",)),
         Variant("temperature", "interior β with temperature τ", draw=("beta", "temperature")),
         Variant("normalizer", "mean divided by the caller's global token count",
                 options={"reduction": "mean"}, draw=("beta", "normalizer"))),
        "array", gradient="generalized_jsd_grad",
        closed_forms=(
            _kl_closed_form("generalized_jsd", "beta = 0 => KL(p || q)", True, beta=0.0),
            _kl_closed_form("generalized_jsd", "beta = 1 => KL(q || p)", False, beta=1.0),
            _p_equals_q("generalized_jsd", beta=0.3),
        ),
    ),
    FunctionSpec(
        "akl", "token", "Wu 2024 AKL: w_head KL(p‖q) + w_tail KL(q‖p), weights stop-gradient (SPEC-MATH §6)",
        _TOKEN,
        (Variant("default", "μ drawn, temperature 1", draw=("mu",)),
         Variant("temperature", "μ and temperature drawn", draw=("mu", "temperature")),
         Variant("normalizer", "mean divided by the caller's global token count",
                 options={"reduction": "mean"}, draw=("mu", "normalizer"))),
        "array", gradient="akl_grad", conditioning=_akl_conditioning, fd_surrogate=_akl_surrogate,
        closed_forms=(_p_equals_q("akl", mu=0.5),),
    ),
    FunctionSpec(
        "implicit_reward", "metric", "paper Eq. 29: β (log q − log p) [/ length]",
        (ArrayArg("policy_logps", "logps", False), ArrayArg("reference_logps", "logps", False),
         ArrayArg("lengths", "lengths", False, keyword=True)),
        (Variant("summed", "β (policy − reference)", draw=("beta",)),
         Variant("length_normalised", "β (policy − reference) / length", draw=("beta",), lengths="both")),
        "array", reductions=(),
        closed_forms=(
            ClosedForm("implicit_reward: policy = reference => 0",
                       lambda rng: (lambda a: Call("implicit_reward", (a, a.copy()), {"beta": 0.1}))(_logps(rng, (4,))),
                       lambda call: np.zeros(4)),
        ),
    ),
    FunctionSpec(
        "preference_metrics", "metric", "TRL's logged names: rewards/chosen, rewards/accuracies, ...",
        _SEQ4 + _LENGTHS,
        (Variant("summed", "rewards from summed log-ratios", draw=("beta",)),
         Variant("length_normalised", "rewards from length-normalised log-ratios", draw=("beta",), lengths="both")),
        "dict", reductions=(),
        closed_forms=(
            ClosedForm("preference_metrics: every margin positive => rewards/accuracies = 1",
                       lambda rng: Call("preference_metrics", (np.array([-1.0, -2.0]), np.array([-5.0, -6.0]),
                                                               np.array([-3.0, -3.0]), np.array([-4.0, -4.0])),
                                        {"beta": 0.1}),
                       lambda call: 1.0, output="rewards/accuracies"),
            ClosedForm("preference_metrics: logps/chosen = mean a",
                       lambda rng: Call("preference_metrics", (np.array([-1.0, -2.0]), np.array([-5.0, -6.0]),
                                                               np.array([-3.0, -3.0]), np.array([-4.0, -4.0])),
                                        {"beta": 0.1}),
                       lambda call: -1.5, output="logps/chosen"),
        ),
    ),
    FunctionSpec(
        "first_token_divergence", "metric", "Table 3 first-token KLD / rKLD (SPEC-MATH §2, Sec 4.5 reading)",
        (ArrayArg("student_logits", "vocab_logits", False), ArrayArg("teacher_logits", "vocab_logits", False)),
        (Variant("default", "mean over the leading positions"),), "dict", reductions=(),
        closed_forms=(
            ClosedForm("first_token_divergence: p = q => kld = 0",
                       lambda rng: (lambda t: Call("first_token_divergence", (t.copy(), t), {}))(
                           _logits(rng, (3, 6), 2.0, 0.5)),
                       lambda call: 0.0, output="kld", atol=1e-14),
            ClosedForm("first_token_divergence: p = q => rkld = 0",
                       lambda rng: (lambda t: Call("first_token_divergence", (t.copy(), t), {}))(
                           _logits(rng, (3, 6), 2.0, 0.5)),
                       lambda call: 0.0, output="rkld", atol=1e-14),
        ),
    ),
    FunctionSpec(
        "objective", "objective", "L = (1−α) sft + α distil + λ[(1−κ) pt_lm + κ pt_kd] (Algorithm 1, LMOps runner)",
        (ArrayArg("sft_loss", "scalar_loss", True), ArrayArg("distil_loss", "scalar_loss", True),
         ArrayArg("pt_lm_loss", "scalar_loss", True), ArrayArg("pt_kd_loss", "scalar_loss", True)),
        (Variant("paper", "Algorithm 1: L = L_kd + λ L_pt", options={"config": "PAPER_OBJECTIVE"},
                 omit=("pt_kd_loss",)),
         Variant("released", "LMOps runner: α = λ = κ = 0.5", options={"config": "RELEASED_OBJECTIVE"}),
         Variant("distil_only", "L = L_distil", options={"config": "DISTIL_ONLY"},
                 omit=("pt_lm_loss", "pt_kd_loss"))),
        "array", reductions=(), gradient="objective_grad",
        closed_forms=(
            ClosedForm("objective: distil_only => L = distil_loss",
                       lambda rng: Call("objective", (np.asarray(1.25), np.asarray(0.5), None, None),
                                        {"config": _objective_config("DISTIL_ONLY")}),
                       lambda call: 0.5),
            ClosedForm("objective: released => 0.5 sft + 0.5 distil + 0.25 pt_lm + 0.25 pt_kd",
                       lambda rng: Call("objective", (np.asarray(1.0), np.asarray(2.0), np.asarray(3.0),
                                                      np.asarray(4.0)),
                                        {"config": _objective_config("RELEASED_OBJECTIVE")}),
                       lambda call: 0.5 + 1.0 + 0.75 + 1.0),
        ),
    ),
)

_BY_NAME = {s.name: s for s in REGISTRY}


def get(name: str) -> FunctionSpec:
    return _BY_NAME[name]


# --------------------------------------------------------------------------------------------------
# The bad-input battery (DESIGN.md §2): derived from the data above, plus a few per-function cases


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
    """Every invalid-input case of ``spec``: option ranges, shapes, values (see CONVENTIONS.md)."""
    cases: list[BadInput] = []
    # options out of range / unknown choices (checked first, so any valid arrays do)
    for p in spec.params:
        # the normalizer only exists under a mean: test its range there, not the reduction rule
        extra = {"reduction": "mean"} if p.name == "normalizer" else {}
        for bad in p.invalid_values():
            cases.append(BadInput(f"{p.name}={bad!r}", p.name,
                                  lambda c, n=p.name, b=bad, e=extra: c.with_args(**{n: b}, **e)))
    positional = spec.positional
    floats = [a for a in spec.arrays if a.role in ("logps", "logits", "vocab_logits", "scalar_loss")]
    for a in floats:
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
    if any(a.role == "lengths" for a in spec.arrays):
        for a in (a for a in spec.arrays if a.role == "lengths"):
            for bad in (0, -3):
                cases.append(BadInput(f"{a.name} = {bad}", a.name,
                                      lambda c, n=a.name, b=bad: c.with_args(**{n: _set_first(c.arg(n), b)}),
                                      variant=_variant_with_lengths(spec)))
    names = [a.name for a in positional]
    if "teacher_logits" in names and "mask" in names:
        cases += [
            BadInput("teacher vocabulary differs from the student's", "teacher_logits",
                     lambda c: c.with_args(teacher_logits=c.arg("teacher_logits")[..., :-1])),
            BadInput("teacher has a different number of positions", "teacher_logits",
                     lambda c: c.with_args(teacher_logits=c.arg("teacher_logits")[..., :-1, :])),
            BadInput("mask has a different shape", "mask", lambda c: c.with_args(mask=c.arg("mask")[..., :-1])),
            BadInput("mask is not binary", "mask", lambda c: c.with_args(mask=np.where(c.arg("mask"), 0.5, 0.0))),
            BadInput("mask selects no token under a mean", "mask",
                     lambda c: c.with_args(mask=np.zeros_like(c.arg("mask")), reduction="mean")),
        ]
    if spec.kind == "metric" and "teacher_logits" in names:
        cases.append(BadInput("teacher vocabulary differs from the student's", "teacher_logits",
                              lambda c: c.with_args(teacher_logits=c.arg("teacher_logits")[..., :-1])))
    if "labels" in names:
        v = lambda c: c.arg("logits").shape[-1]  # noqa: E731
        cases += [
            BadInput("labels have a different shape", "labels",
                     lambda c: c.with_args(labels=c.arg("labels")[..., :-1])),
            BadInput("label = V (outside the vocabulary)", "labels",
                     lambda c: c.with_args(labels=_set_first(c.arg("labels"), v(c)))),
            BadInput("label = -5 (negative, not the ignore_index)", "labels",
                     lambda c: c.with_args(labels=_set_first(c.arg("labels"), -5))),
            BadInput("float labels", "labels", lambda c: c.with_args(labels=c.arg("labels").astype(np.float64))),
        ]
    if spec.name == "cross_entropy":
        cases.append(BadInput("every label ignored under a mean", "labels",
                              lambda c: c.with_args(labels=np.full_like(c.arg("labels"), -100), reduction="mean")))
    if any(p.name == "normalizer" for p in spec.params):
        for red in ("sum", "none"):
            cases.append(BadInput(f"normalizer with reduction={red!r}", "normalizer",
                                  lambda c, r=red: c.with_args(normalizer=4.0, reduction=r)))
    return tuple(cases) + spec.errors


def _variant_with_lengths(spec: FunctionSpec) -> str | None:
    return next((v.name for v in spec.variants if v.lengths != "none"), None)


def _drop(name: str) -> Callable[[Call], Call]:
    def mutate(c: Call) -> Call:
        return replace(c, kwargs={k: v for k, v in c.kwargs.items() if k != name})

    return mutate


def _with_errors(name: str, *errors: BadInput) -> None:
    global REGISTRY
    spec = get(name)
    new = replace(spec, errors=spec.errors + errors)
    REGISTRY = tuple(new if s.name == name else s for s in REGISTRY)
    _BY_NAME[name] = new


# one-sided lengths, lengths that contradict an option, option combinations
_with_errors(
    "dpkd_loss",
    BadInput("chosen_lengths without rejected_lengths", "rejected_lengths", _drop("rejected_lengths"), "eq9"),
    BadInput("rejected_lengths without chosen_lengths", "chosen_lengths", _drop("chosen_lengths"), "eq9"),
    BadInput("reference None without reference_free", "reference_chosen_logps",
             lambda c: c.with_args(reference_chosen_logps=None, reference_free=False), "eq8"),
)
_with_errors(
    "ipo_loss",
    BadInput("length_normalize without rejected_lengths", "rejected_lengths", _drop("rejected_lengths"),
             "length_averaged"),
    BadInput("length_normalize without chosen_lengths", "chosen_lengths", _drop("chosen_lengths"),
             "length_averaged"),
    BadInput("lengths with length_normalize=False", "chosen_lengths",
             lambda c: c.with_args(length_normalize=False), "length_averaged"),
)
_with_errors(
    "simpo_loss",
    BadInput("chosen_lengths None", "chosen_lengths", lambda c: c.with_args(chosen_lengths=None)),
    BadInput("rejected_lengths None", "rejected_lengths", lambda c: c.with_args(rejected_lengths=None)),
)
_with_errors(
    "preference_metrics",
    BadInput("chosen_lengths without rejected_lengths", "rejected_lengths", _drop("rejected_lengths"),
             "length_normalised"),
)
_with_errors(
    "dpkd_token_loss",
    BadInput("label_smoothing with form='ipo'", "label_smoothing",
             lambda c: c.with_args(form="ipo", label_smoothing=0.1)),
    BadInput("label_smoothing with form='dpop'", "label_smoothing",
             lambda c: c.with_args(form="dpop", label_smoothing=0.1)),
)
_with_errors(
    "objective",
    BadInput("pt_lm_loss None while lm_coef > 0", "pt_lm_loss", lambda c: c.with_args(pt_lm_loss=None), "paper"),
    BadInput("pt_kd_loss None while pt_kd_ratio > 0", "pt_kd_loss", lambda c: c.with_args(pt_kd_loss=None),
             "released"),
)


# --------------------------------------------------------------------------------------------------


def _fmt(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"np.array({x.tolist()!r}, dtype=np.{x.dtype})"
    if isinstance(x, float) and not math.isfinite(x):
        return f"float({str(x)!r})"
    return repr(x)
