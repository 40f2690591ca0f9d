"""The specification as data: one :class:`~dpkd.spec.registry.FunctionSpec` per public function of
``dpkd.spec`` — its array arguments, its named variants, its closed-form special cases and the bad-input
cases the derived battery does not cover — plus the small independent float64 formulas those cases use
(written here from the definitions, not taken from the spec's code).

The options of every function and their valid ranges are NOT restated here: they are the spec function's
own declaration (``validation.options_of``), which ``FunctionSpec.params`` reads. Adding a function is
one entry in :data:`REGISTRY` (see CONTRIBUTING.md).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .distill import _akl_head_sorted
from .registry import (
    ArrayArg,
    BadInput,
    Call,
    ClosedForm,
    FunctionSpec,
    Variant,
    get,
    objective_config,
    random_labels,
    random_lengths,
    random_logits,
    random_logps,
)

__all__ = ["REGISTRY"]

LOG2 = math.log(2.0)


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
    head_sorted = _akl_head_sorted(p_sorted, mu)
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


def _four_logps(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    """Random a, b, c, d of shape [n]."""
    return tuple(random_logps(rng, (n,)) for _ in range(4))


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
    teacher = random_logits(rng, shape, 2.0, 0.5)
    student = random_logits(rng, shape, 2.0, 0.5)
    top = np.argmax(teacher, axis=-1)[..., None]
    np.put_along_axis(student, top, np.max(student, axis=-1, keepdims=True) + 0.5, -1)
    return student, teacher


def _disagreeing(rng: np.random.Generator, shape: tuple[int, ...] = (2, 3, 5)) -> tuple[np.ndarray, np.ndarray]:
    """Student and teacher logits whose argmaxes differ at every position (by a clear margin)."""
    teacher = random_logits(rng, shape, 2.0, 0.5)
    student = random_logits(rng, shape, 2.0, 0.5)
    top = np.argmax(teacher, axis=-1)[..., None]
    other = (top + 1 + rng.integers(0, shape[-1] - 1, size=top.shape)) % shape[-1]
    np.put_along_axis(student, other, np.max(student, axis=-1, keepdims=True) + 0.5, -1)
    return student, teacher


def _uniform_logits_call(name: str, rng: np.random.Generator, **kwargs: Any) -> Call:
    logits = np.full((2, 4, 7), 3.25)
    labels = random_labels(rng, (2, 4), 7, -100)
    return Call(name, (logits, labels), kwargs)


def _loss_positions(call: Call) -> np.ndarray:
    """The ``where`` of the strict token-level bounds: every loss position."""
    return np.asarray(call.args[2], bool)


def _no_penalty_dpop(rng: np.random.Generator, form: str) -> Call:
    a = random_logps(rng, (5,))
    c = a - rng.uniform(0.1, 3.0, size=5)  # c < a: log p(y_t) below log q(y_t), the penalty is 0
    return _seq_call("dpop_loss", a, random_logps(rng, (5,)), c, random_logps(rng, (5,)), beta=0.3, lambda_=50.0,
                     form=form)


def _penalised_dpop(rng: np.random.Generator, form: str) -> Call:
    a = random_logps(rng, (5,))
    c = a + rng.uniform(0.1, 3.0, size=5)  # c > a: the DPOP penalty λ(c − a) is active
    return _seq_call("dpop_loss", a, random_logps(rng, (5,)), c, random_logps(rng, (5,)), beta=0.3, lambda_=2.0,
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
        t = random_logits(rng, (2, 3, 6), 2.0, 0.5)
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
        "token_logps", "logps", "spec/README.md §1: log_softmax(logits)[label], 0 where ignored",
        _LOGITS_LABELS,
        (Variant("default", "ignore_index -100"),
         Variant("ignore_index", "a custom ignore_index (-1)", options={"ignore_index": -1})),
        "array", reductions=(), gradient="token_logps_grad",
        closed_forms=(
            ClosedForm("token_logps: uniform logits => -log V, 0 where ignored",
                       lambda rng: _uniform_logits_call("token_logps", rng),
                       lambda call: np.where(call.args[1] != -100, -math.log(7), 0.0)),
        ),
        fused="linear_token_logps", vocab_parallel="vocab_parallel_token_logps",
    ),
    FunctionSpec(
        "sequence_logps", "logps", "spec/README.md §1: a = Σ_j m_j log q(y_j); (sum, token count)",
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
        vocab_parallel="vocab_parallel_sequence_logps",
    ),
    FunctionSpec(
        "dpkd_loss", "sequence", "paper Eq. 8 / Eq. 9; spec/README.md §2; cDPO smoothing",
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
                       lambda rng: _seq_call("dpkd_loss", *(lambda a, c: (a, a, c, c))(random_logps(rng, (6,)),
                                                                                       random_logps(rng, (6,))),
                                             beta=0.7),
                       lambda call: np.full(6, LOG2)),
            ClosedForm("dpkd_loss: cDPO at h = 0 => log 2 for any label_smoothing",
                       lambda rng: _seq_call("dpkd_loss", *(lambda a: (a, a, a, a))(random_logps(rng, (4,))),
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
                       lambda rng: _seq_call("dpkd_loss", *_four_logps(rng, 5), beta=0.2,
                                             chosen_lengths=np.ones(5, np.int64),
                                             rejected_lengths=np.ones(5, np.int64)),
                       lambda call: _softplus(-0.2 * ((call.args[0] - call.args[2]) - (call.args[1] - call.args[3])))),
            ClosedForm("dpkd_loss: reference_free => c = d = 0",
                       lambda rng: _seq_call("dpkd_loss", *_four_logps(rng, 5), beta=0.2, reference_free=True),
                       lambda call: _softplus(-0.2 * (call.args[0] - call.args[1]))),
            ClosedForm("dpkd_loss: chosen_rewards = beta (a - c) / L_t",
                       lambda rng: _seq_call("dpkd_loss", *_four_logps(rng, 5), beta=0.2,
                                             chosen_lengths=random_lengths(rng, (5,)),
                                             rejected_lengths=random_lengths(rng, (5,))),
                       lambda call: 0.2 * (call.args[0] - call.args[2]) / call.kwargs["chosen_lengths"], output=1),
        ),
        errors=(
            BadInput("reference None without reference_free", "reference_chosen_logps",
                     lambda c: c.with_args(reference_chosen_logps=None, reference_free=False), "eq8"),
        ),
        fused="fused_dpkd_loss",
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
                       lambda rng: _seq_call("ipo_loss", *(lambda a, c: (a, a, c, c))(random_logps(rng, (4,)),
                                                                                      random_logps(rng, (4,))),
                                             tau=0.25, length_normalize=False),
                       lambda call: np.full(4, 4.0)),
            ClosedForm("ipo_loss: h = 1/(2 tau) => 0",
                       lambda rng: _seq_call("ipo_loss", np.full(3, -1.0), np.full(3, -2.0), np.full(3, -2.0),
                                             np.full(3, -2.0), tau=0.5, length_normalize=False),
                       lambda call: np.zeros(3), atol=1e-15),
        ),
        errors=(
            BadInput("lengths with length_normalize=False", "chosen_lengths",
                     lambda c: c.with_args(length_normalize=False), "length_averaged"),
        ),
        fused="fused_ipo_loss",
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
                       lambda rng: _seq_call("cpo_loss", *(lambda a: (a, a))(random_logps(rng, (4,))), beta=0.4,
                                             nll_weight=0.75),
                       lambda call: LOG2 - 0.75 * call.args[0]),
        ),
        fused="fused_cpo_loss",
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
        errors=(
            BadInput("chosen_lengths None", "chosen_lengths", lambda c: c.with_args(chosen_lengths=None)),
            BadInput("rejected_lengths None", "rejected_lengths", lambda c: c.with_args(rejected_lengths=None)),
        ),
        fused="fused_simpo_loss",
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
        fused="fused_dpop_loss",
    ),
    FunctionSpec(
        "hinge_loss", "sequence", "SLiC-HF Eq. 1 / TRL 'hinge': max(0, 1 − βh), h as Eq. 8 / Eq. 9",
        _SEQ4 + _LENGTHS,
        (Variant("summed", "h = (a − c) − (b − d)", draw=("beta",)),
         Variant("length_normalised", "h = (a − c)/L_t − (b − d)/L_s", draw=("beta",), lengths="both")),
        "PreferenceLoss", gradient="hinge_loss_grad",
        conditioning=lambda call, delta: bool(np.all(np.abs(1.0 - call.kwargs["beta"] * _h(call)) >= delta)),
        closed_forms=(
            ClosedForm("hinge_loss: = max(0, 1 - beta h) (SLiC-HF, TRL 'hinge')",
                       lambda rng: _seq_call("hinge_loss", *_four_logps(rng, 6), beta=0.3),
                       lambda call: np.maximum(0.0, 1.0 - 0.3 * _h(call))),
            ClosedForm("hinge_loss: Eq. 9 => max(0, 1 - beta h) on the length-normalised h",
                       lambda rng: _seq_call("hinge_loss", *_four_logps(rng, 6), beta=2.0,
                                             chosen_lengths=random_lengths(rng, (6,)),
                                             rejected_lengths=random_lengths(rng, (6,))),
                       lambda call: np.maximum(0.0, 1.0 - 2.0 * _h(call))),
        ),
    ),
    FunctionSpec(
        "robust_loss", "sequence",
        "Chowdhury 2024 Eq. 10 / TRL 'robust': [(1−ε)(−log σ(βh)) + ε log σ(−βh)]/(1 − 2ε)",
        _SEQ4 + _LENGTHS,
        (Variant("summed", "h = (a − c) − (b − d)", draw=("beta", "label_smoothing")),
         Variant("length_normalised", "h = (a − c)/L_t − (b − d)/L_s", draw=("beta", "label_smoothing"),
                 lengths="both"),
         Variant("no_flips", "ε = 0: DPKD Eq. 8", options={"label_smoothing": 0.0}, draw=("beta",))),
        "PreferenceLoss", gradient="robust_loss_grad",
        closed_forms=(
            ClosedForm("robust_loss: = [(1-eps)(-log sigma(beta h)) + eps log sigma(-beta h)] / (1 - 2 eps)",
                       lambda rng: _seq_call("robust_loss", *_four_logps(rng, 6), beta=0.4, label_smoothing=0.2),
                       lambda call: ((1 - 0.2) * _softplus(-0.4 * _h(call)) - 0.2 * _softplus(0.4 * _h(call)))
                       / (1 - 2 * 0.2)),
            ClosedForm("robust_loss: label_smoothing = 0 => DPKD Eq. 8",
                       lambda rng: _seq_call("robust_loss", *_four_logps(rng, 6), beta=0.4),
                       lambda call: _softplus(-0.4 * _h(call))),
            ClosedForm("robust_loss: h = 0 => log 2 for any label_smoothing",
                       lambda rng: _seq_call("robust_loss", *(lambda a: (a, a, a, a))(random_logps(rng, (4,))),
                                             beta=0.9, label_smoothing=0.45),
                       lambda call: np.full(4, LOG2)),
        ),
    ),
    FunctionSpec(
        "dpkd_token_loss", "token", "released code get_distil_loss; spec/README.md §4 (argmax preference per token)",
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
        errors=(
            BadInput("label_smoothing with form='ipo'", "label_smoothing",
                     lambda c: c.with_args(form="ipo", label_smoothing=0.1)),
            BadInput("label_smoothing with form='dpop'", "label_smoothing",
                     lambda c: c.with_args(form="dpop", label_smoothing=0.1)),
        ),
        fused="fused_dpkd_token_loss", vocab_parallel="vocab_parallel_dpkd_token_loss",
    ),
    FunctionSpec(
        "cross_entropy", "token", "SFT: −log q[label] over non-ignored tokens (spec/README.md §5)",
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
        fused="fused_cross_entropy", vocab_parallel="vocab_parallel_cross_entropy",
    ),
    FunctionSpec(
        "forward_kl", "token", "KL(p‖q) = Σ p (log p − log q) (spec/README.md §5, word-level KD)",
        _TOKEN, _DIVERGENCE_VARIANTS, "array", gradient="forward_kl_grad",
        closed_forms=(_p_equals_q("forward_kl"),
                      _kl_closed_form("forward_kl", "= sum p (log p - log q)", True, temperature=1.5)),
        fused="fused_forward_kl", vocab_parallel="vocab_parallel_forward_kl",
    ),
    FunctionSpec(
        "reverse_kl", "token", "KL(q‖p) = Σ q (log q − log p) (spec/README.md §5)",
        _TOKEN, _DIVERGENCE_VARIANTS, "array", gradient="reverse_kl_grad",
        closed_forms=(_p_equals_q("reverse_kl"),
                      _kl_closed_form("reverse_kl", "= sum q (log q - log p)", False, temperature=1.5)),
        fused="fused_reverse_kl", vocab_parallel="vocab_parallel_reverse_kl",
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
        fused="fused_generalized_jsd", vocab_parallel="vocab_parallel_generalized_jsd",
    ),
    FunctionSpec(
        "akl", "token", "Wu 2024 AKL: w_head KL(p‖q) + w_tail KL(q‖p), weights stop-gradient (spec/README.md §5)",
        _TOKEN,
        (Variant("default", "μ drawn, temperature 1", draw=("mu",)),
         Variant("temperature", "μ and temperature drawn", draw=("mu", "temperature")),
         Variant("normalizer", "mean divided by the caller's global token count",
                 options={"reduction": "mean"}, draw=("mu", "normalizer"))),
        "array", gradient="akl_grad", conditioning=_akl_conditioning, fd_surrogate=_akl_surrogate,
        closed_forms=(_p_equals_q("akl", mu=0.5),),
        fused="fused_akl",
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
                       lambda rng: (lambda a: Call("implicit_reward", (a, a.copy()), {"beta": 0.1}))(
                           random_logps(rng, (4,))),
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
        "first_token_divergence", "metric", "Table 3 first-token KLD / rKLD (spec/README.md §6, Sec 4.5 reading)",
        (ArrayArg("student_logits", "vocab_logits", False), ArrayArg("teacher_logits", "vocab_logits", False)),
        (Variant("default", "mean over the leading positions"),), "dict", reductions=(),
        closed_forms=(
            ClosedForm("first_token_divergence: p = q => kld = 0",
                       lambda rng: (lambda t: Call("first_token_divergence", (t.copy(), t), {}))(
                           random_logits(rng, (3, 6), 2.0, 0.5)),
                       lambda call: 0.0, output="kld", atol=1e-14),
            ClosedForm("first_token_divergence: p = q => rkld = 0",
                       lambda rng: (lambda t: Call("first_token_divergence", (t.copy(), t), {}))(
                           random_logits(rng, (3, 6), 2.0, 0.5)),
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
                                        {"config": objective_config("DISTIL_ONLY")}),
                       lambda call: 0.5),
            ClosedForm("objective: released => 0.5 sft + 0.5 distil + 0.25 pt_lm + 0.25 pt_kd",
                       lambda rng: Call("objective", (np.asarray(1.0), np.asarray(2.0), np.asarray(3.0),
                                                      np.asarray(4.0)),
                                        {"config": objective_config("RELEASED_OBJECTIVE")}),
                       lambda call: 0.5 + 1.0 + 0.75 + 1.0),
        ),
        errors=(
            BadInput("pt_lm_loss None while lm_coef > 0", "pt_lm_loss", lambda c: c.with_args(pt_lm_loss=None),
                     "paper"),
            BadInput("pt_kd_loss None while pt_kd_ratio > 0", "pt_kd_loss", lambda c: c.with_args(pt_kd_loss=None),
                     "released"),
        ),
    ),
)
