"""Token-level distillation baselines (spec/README.md §5): the reference definitions and analytic gradients.

Symbols (spec/README.md §0, §4). At each position i of a ``[..., T, V]`` logits array:

* S_i, T_i ∈ R^V — student and teacher logits; τ > 0 the temperature;
* q_i = softmax(S_i/τ) (student q_θ), p_i = softmax(T_i/τ) (teacher p);
* m_i ∈ {0, 1} — the loss mask (1 on response positions);
* KL(p‖q) = Σ_v p(v)[log p(v) − log q(v)] — always the true KL, never the cross-entropy form.

One mechanism serves every loss here and the token-level DPKD loss: both log-softmaxes come from
``_common.token_inputs`` (validation in the contract's order, float64, max-shifted so logits of magnitude 1e4
are exact to rounding), each loss is a small per-position piece ``ℓ_i = f(log q_i, log p_i)``, and the masked
reduction is ``_common.reduce_tokens``: mean = Σ m_i ℓ_i / (normalizer or Σ m_i), sum = Σ m_i ℓ_i,
none = m_i ℓ_i. No τ² factor (the TRL GKD convention).

Every gradient piece returns (∂ℓ_i/∂z^S_i, ∂ℓ_i/∂z^T_i) with z = logits/τ; the chain rule then multiplies by
(∂ reduction/∂ℓ_i)·(1/τ). Each ``*_grad`` returns the gradient of S = sum(loss) as a dict keyed by argument
name (CONVENTIONS.md, "General").

References: G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network" (2015);
R. Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes" (GKD,
ICLR 2024); T. Wu et al., "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for Large
Language Models" (AKL, 2024); microsoft/LMOps ``dpkd/main.py`` ``get_distil_loss`` (the KD baseline).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import validation as v
from ._common import (
    as_float_arrays,
    as_int,
    float64_array,
    log_softmax,
    reduce_tokens,
    reduce_tokens_grad,
    token_denominator,
    token_inputs,
)

__all__ = [
    "cross_entropy",
    "cross_entropy_grad",
    "forward_kl",
    "forward_kl_grad",
    "reverse_kl",
    "reverse_kl_grad",
    "generalized_jsd",
    "generalized_jsd_grad",
    "akl",
    "akl_grad",
    "first_token_divergence",
]

Grads = tuple[np.ndarray, np.ndarray]

# The options beyond the shared ones of ``validation``: TRL's JSD β ∈ [0, 1] (end points = the KLs) and
# AKL's head mass μ ∈ (0, 1).
JSD_BETA = v.Option("beta", 0.5, low=0.0, high=1.0, low_inclusive=True, high_inclusive=True, draw=(0.05, 0.95))
MU = v.Option("mu", 0.5, low=0.0, high=1.0, draw=(0.2, 0.8))

# --------------------------------------------------------------------------------------------------
# Per-position pieces. Arguments are log-probabilities over the last axis; results drop that axis
# (values) or keep it (gradients w.r.t. the temperature-scaled logits).


def _kl(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """KL(p‖q) per position. p = exp(log p) underflows to exactly 0 where log p ≪ 0, and 0·finite = 0:
    log-probabilities are always finite here, so no 0·log 0 NaN can arise."""
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def _softmax_vjp(log_q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """∂/∂z of Σ_v g_v q_v-weighted terms: the softmax Jacobian applied to g, q ⊙ (g − Σ q g)."""
    q = np.exp(log_q)
    return q * (g - np.sum(q * g, axis=-1, keepdims=True))


def _fkl(log_q: np.ndarray, log_p: np.ndarray) -> np.ndarray:
    return _kl(log_p, log_q)


def _fkl_grad(log_q: np.ndarray, log_p: np.ndarray) -> Grads:
    # ∂KL(p‖q)/∂z^S = q − p;  ∂KL(p‖q)/∂z^T = p ⊙ (log p − log q − KL(p‖q))
    return np.exp(log_q) - np.exp(log_p), _softmax_vjp(log_p, log_p - log_q)


def _rkl(log_q: np.ndarray, log_p: np.ndarray) -> np.ndarray:
    return _kl(log_q, log_p)


def _rkl_grad(log_q: np.ndarray, log_p: np.ndarray) -> Grads:
    # ∂KL(q‖p)/∂z^S = q ⊙ (log q − log p − KL(q‖p));  ∂KL(q‖p)/∂z^T = p − q
    return _softmax_vjp(log_q, log_q - log_p), np.exp(log_p) - np.exp(log_q)


def _log_mixture(log_q: np.ndarray, log_p: np.ndarray, beta: float) -> np.ndarray:
    """log M with M = (1−β) q + β p, as a stable log-sum-exp (0 < β < 1)."""
    return np.logaddexp(log_q + math.log1p(-beta), log_p + math.log(beta))


def _jsd(log_q: np.ndarray, log_p: np.ndarray, beta: float) -> np.ndarray:
    if beta == 0.0:
        return _fkl(log_q, log_p)
    if beta == 1.0:
        return _rkl(log_q, log_p)
    log_m = _log_mixture(log_q, log_p, beta)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def _jsd_grad(log_q: np.ndarray, log_p: np.ndarray, beta: float) -> Grads:
    if beta == 0.0:
        return _fkl_grad(log_q, log_p)
    if beta == 1.0:
        return _rkl_grad(log_q, log_p)
    # JSD = β Σ p log p + (1−β) Σ q log q − Σ M log M, so ∂/∂q_v = (1−β)(log q_v − log M_v) and
    # ∂/∂p_v = β (log p_v − log M_v); the softmax Jacobian turns these into
    # ∂/∂z^S = (1−β) q ⊙ (log q − log M − KL(q‖M)),  ∂/∂z^T = β p ⊙ (log p − log M − KL(p‖M)).
    log_m = _log_mixture(log_q, log_p, beta)
    return (1.0 - beta) * _softmax_vjp(log_q, log_q - log_m), beta * _softmax_vjp(log_p, log_p - log_m)


def _akl_head_sorted(p_sorted: np.ndarray, mu: float) -> np.ndarray:
    """AKL's head in sorted order, by the tie rule (spec/README.md "AKL"): with p sorted descending, token k
    is in the head iff C(k) = Σ_{u: p_u ≥ p_k} p_u ≤ μ — a run of tied probabilities counts whole, at its
    last member's cumulative sum — or p_k is the maximum (every tied maximum). Without ties this is the
    official code's rule (C_k ≤ μ, plus the first token); with ties it does not depend on their order.

    Example:
        >>> import numpy as np
        >>> _akl_head_sorted(np.full(6, 1 / 6), 0.5)  # six tied maxima: all head (C_3 = μ does not split them)
        array([ True,  True,  True,  True,  True,  True])
    """
    n = p_sorted.shape[-1]
    cumulative = np.cumsum(p_sorted, axis=-1)
    last_of_run = np.concatenate([p_sorted[..., :-1] != p_sorted[..., 1:], np.ones_like(p_sorted[..., :1], bool)],
                                 axis=-1)
    run_end = np.minimum.accumulate(np.where(last_of_run, np.arange(n), n)[..., ::-1], axis=-1)[..., ::-1]
    return (np.take_along_axis(cumulative, run_end, axis=-1) <= mu) | (p_sorted == p_sorted[..., :1])


def _akl_weights(log_q: np.ndarray, log_p: np.ndarray, mu: float) -> tuple[np.ndarray, np.ndarray]:
    """(w_head, w_tail) per position, from stop-gradient copies of p and q (Wu et al. 2024, official code),
    the head by ``_akl_head_sorted``'s tie rule. When g_head + g_tail = 0 (p = q) the weights are set to 0.5
    so the loss is exactly 0.
    """
    p, q = np.exp(log_p), np.exp(log_q)
    order = np.argsort(-p, axis=-1, kind="stable")
    head_sorted = _akl_head_sorted(np.take_along_axis(p, order, axis=-1), mu)
    head = np.empty_like(head_sorted)
    np.put_along_axis(head, order, head_sorted, axis=-1)
    gap = np.abs(p - q)
    g_head = np.sum(np.where(head, gap, 0.0), axis=-1)
    g_tail = np.sum(np.where(head, 0.0, gap), axis=-1)
    total = g_head + g_tail
    w_head = np.where(total > 0, g_head / np.where(total > 0, total, 1.0), 0.5)
    return w_head, 1.0 - w_head


def _akl(log_q: np.ndarray, log_p: np.ndarray, mu: float) -> np.ndarray:
    w_head, w_tail = _akl_weights(log_q, log_p, mu)
    return w_head * _fkl(log_q, log_p) + w_tail * _rkl(log_q, log_p)


def _akl_grad(log_q: np.ndarray, log_p: np.ndarray, mu: float) -> Grads:
    # The weights are constants (stop-gradient): a weighted sum of the FKL and RKL gradients.
    w_head, w_tail = (w[..., None] for w in _akl_weights(log_q, log_p, mu))
    fs, ft = _fkl_grad(log_q, log_p)
    rs, rt = _rkl_grad(log_q, log_p)
    return w_head * fs + w_tail * rs, w_head * ft + w_tail * rt


# --------------------------------------------------------------------------------------------------
# Shared drivers: options → token_inputs → per-position piece → masked reduction (or its chain rule).


_SHARED = ("temperature", "normalizer", "reduction")


class _LogProbs(NamedTuple):
    """log q = log_softmax(S/τ), log p = log_softmax(T/τ), the mask, the mean's denominator, τ, and the
    loss's own options (JSD β, AKL μ)."""

    log_q: np.ndarray
    log_p: np.ndarray
    mask: np.ndarray
    denominator: float
    temperature: float
    own: dict


def _prepare(func: str, student_logits: object, teacher_logits: object, mask: object, options: dict) -> _LogProbs:
    """The options (the function's own, then temperature, normalizer, reduction: signature order), then the
    validated inputs and both log-softmaxes."""
    o = v.check_options(func, **options)
    x = token_inputs(func, student_logits, teacher_logits, mask, normalizer=o["normalizer"], reduction=o["reduction"],
                     temperature=o["temperature"])
    return _LogProbs(log_softmax(x.student), log_softmax(x.teacher), x.mask, x.denominator, o["temperature"],
                     {k: val for k, val in o.items() if k not in _SHARED})


def _value(func, piece, student_logits, teacher_logits, mask, **options):
    lp = _prepare(func, student_logits, teacher_logits, mask, options)
    return reduce_tokens(piece(lp.log_q, lp.log_p, **lp.own), lp.mask, options["reduction"], lp.denominator)


def _grad(func, piece_grad, student_logits, teacher_logits, mask, **options) -> dict[str, np.ndarray]:
    lp = _prepare(func, student_logits, teacher_logits, mask, options)
    g_s, g_t = piece_grad(lp.log_q, lp.log_p, **lp.own)
    # d S / d ℓ_i per position, times d z / d logits = 1/τ.
    scale = reduce_tokens_grad(lp.mask, options["reduction"], lp.denominator)[..., None] / lp.temperature
    return {"student_logits": scale * g_s, "teacher_logits": scale * g_t}


# --------------------------------------------------------------------------------------------------
# Public API


@v.options(v.IGNORE_INDEX, v.NORMALIZER, v.REDUCTION)
def cross_entropy(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    ignore_index: int = -100,
    normalizer: float | None = None,
    reduction: str = "mean",
) -> np.ndarray:
    """Token cross-entropy of a model on dataset labels (SFT / LM loss; spec/README.md §5 "SFT", §7 CE_D).

    ℓ_i = −log q_i[y_i] with q_i = softmax(logits_i), on positions whose label is not ``ignore_index``
    (m_i = 1[y_i ≠ ignore_index]); reduced as Σ m ℓ / (normalizer or Σ m), Σ m ℓ, or m ℓ (``"none"``).
    The mean matches ``torch.nn.CrossEntropyLoss(ignore_index=-100)`` (LMOps ``get_distil_loss``'s CE_D).

    Args:
        logits: ``[..., T, V]`` float.
        labels: ``[..., T]`` integer, each in [0, V) or equal to ``ignore_index``.
        ignore_index: label value that marks a position without loss.
        normalizer: the mean's denominator (e.g. the global token count under gradient accumulation);
            only with ``reduction="mean"``; default the number of non-ignored labels (0 → error on
            ``labels``).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.

    Returns:
        A float64 scalar, or ``[..., T]`` (0 at ignored positions) under ``"none"``.

    Example:
        >>> import numpy as np
        >>> logits = np.array([[0.0, 0.0], [2.0, 0.0]])
        >>> round(float(cross_entropy(logits, np.array([0, -100]))), 6)  # log 2
        0.693147
        >>> cross_entropy(logits, np.array([1, 0]), reduction="none").round(6)  # log 2, log(1 + e^-2)
        array([0.693147, 0.126928])

    References: Hinton et al. 2015 (the hard-label term of KD); microsoft/LMOps ``dpkd/main.py``.

    See also: ``cross_entropy_grad``, ``forward_kl``, ``dpkd.spec.token_logps``.
    """
    func = "cross_entropy"
    ce = _cross_entropy_parts(func, logits, labels, ignore_index, normalizer, reduction)
    return reduce_tokens(ce.per_token, ce.mask, reduction, ce.denominator)


def cross_entropy_grad(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    ignore_index: int = -100,
    normalizer: float | None = None,
    reduction: str = "mean",
) -> dict[str, np.ndarray]:
    """Gradient of S = sum(cross_entropy(...)) w.r.t. ``logits``: (m_i/denominator)·(q_i − e_{y_i}).

    Returns ``{"logits": [..., T, V]}`` (float64). Same arguments and errors as ``cross_entropy``.

    Example:
        >>> import numpy as np
        >>> cross_entropy_grad(np.zeros((1, 2)), np.array([0]))["logits"]
        array([[-0.5,  0.5]])

    See also: ``cross_entropy``.
    """
    func = "cross_entropy"
    ce = _cross_entropy_parts(func, logits, labels, ignore_index, normalizer, reduction)
    log_q, safe_labels, mask, denominator = ce.log_q, ce.safe_labels, ce.mask, ce.denominator
    one_hot = np.zeros_like(log_q)
    np.put_along_axis(one_hot, safe_labels[..., None], 1.0, axis=-1)
    scale = reduce_tokens_grad(mask, reduction, denominator)[..., None]
    return {"logits": scale * (np.exp(log_q) - one_hot)}


class _CrossEntropyParts(NamedTuple):
    per_token: np.ndarray  # −log q[label], [..., T] (any value where ignored: multiplied by m = 0)
    mask: np.ndarray  # m = 1[label ≠ ignore_index]
    denominator: float  # the mean's denominator
    log_q: np.ndarray  # log_softmax(logits)
    safe_labels: np.ndarray  # labels with the ignored ones replaced by 0


def _cross_entropy_parts(func, logits, labels, ignore_index, normalizer, reduction) -> _CrossEntropyParts:
    o = v.check_options(func, ignore_index=ignore_index, normalizer=normalizer, reduction=reduction)
    ignore_index, normalizer = o["ignore_index"], o["normalizer"]
    v.check_logits_labels_shapes(func, np.shape(logits), np.shape(labels))
    x = float64_array(func, "logits", logits)
    y = as_int(func, "labels", labels)
    v.check_finite(func, "logits", bool(np.all(np.isfinite(x))))
    vocab = x.shape[-1]
    ignored = y == ignore_index
    v.check_labels_in_vocab(func, "labels", bool(np.all(ignored | ((y >= 0) & (y < vocab)))), vocab,
                            ignore_index)
    mask = (~ignored).astype(np.float64)
    denominator = token_denominator(func, mask, normalizer, reduction, mask_name="labels")
    safe_labels = np.where(ignored, 0, y)  # any valid index: these positions are multiplied by m = 0
    log_q = log_softmax(x)
    per_token = -np.take_along_axis(log_q, safe_labels[..., None], axis=-1)[..., 0]
    return _CrossEntropyParts(per_token, mask, denominator, log_q, safe_labels)


@v.options(v.TEMPERATURE, v.NORMALIZER, v.REDUCTION)
def forward_kl(
    student_logits: np.ndarray,
    teacher_logits: np.ndarray,
    mask: np.ndarray,
    *,
    temperature: float = 1.0,
    normalizer: float | None = None,
    reduction: str = "mean",
) -> np.ndarray:
    """Token-level forward KL, KL(p_i‖q_i) (word-level KD; spec/README.md §5, §7 FKD_Dp).

    ℓ_i = Σ_v p_i(v)[log p_i(v) − log q_i(v)], p_i = softmax(T_i/τ), q_i = softmax(S_i/τ). This is the true
    KL; LMOps/MiniLLM use the cross-entropy −Σ p log q, which differs by the teacher entropy H(p_i) (a
    constant for the student: ∂/∂S is identical, ∂/∂T is not). No τ² factor.

    Args:
        student_logits: ``[..., T, V]`` float (student q_θ).
        teacher_logits: ``[..., T, V]`` float (teacher p); same shape and vocabulary.
        mask: ``[..., T]`` bool or 0/1 — the loss positions.
        temperature: τ > 0.
        normalizer: the mean's denominator (global loss-token count); only with ``reduction="mean"``;
            default Σ mask (0 → error on ``mask``).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.

    Returns:
        A float64 scalar, or ``[..., T]`` values m_i ℓ_i under ``"none"``.

    Example:
        >>> import numpy as np
        >>> s, t = np.zeros((1, 2)), np.array([[np.log(3.0), 0.0]])  # q = (1/2, 1/2), p = (3/4, 1/4)
        >>> round(float(forward_kl(s, t, np.array([1]))), 6)  # 3/4 log(3/2) + 1/4 log(1/2)
        0.130812

    References: Hinton et al. 2015; Agarwal et al. 2024 (GKD, β = 0); LMOps ``get_distil_loss``.

    See also: ``forward_kl_grad``, ``reverse_kl``, ``generalized_jsd``, ``akl``, ``cross_entropy``.
    """
    func = "forward_kl"
    return _value(func, _fkl, student_logits, teacher_logits, mask, temperature=temperature,
                  normalizer=normalizer, reduction=reduction)


def forward_kl_grad(
    student_logits: np.ndarray,
    teacher_logits: np.ndarray,
    mask: np.ndarray,
    *,
    temperature: float = 1.0,
    normalizer: float | None = None,
    reduction: str = "mean",
) -> dict[str, np.ndarray]:
    """Gradients of S = sum(forward_kl(...)), with w_i = ∂S/∂ℓ_i (m_i/denominator, or m_i):

    ∂S/∂S_i = (w_i/τ)(q_i − p_i);  ∂S/∂T_i = (w_i/τ) p_i ⊙ (log p_i − log q_i − KL(p_i‖q_i)).

    Returns ``{"student_logits": [..., T, V], "teacher_logits": [..., T, V]}`` (float64).

    Example:
        >>> import numpy as np
        >>> s, t = np.zeros((1, 2)), np.array([[np.log(3.0), 0.0]])
        >>> forward_kl_grad(s, t, np.array([1]))["student_logits"]  # q − p
        array([[-0.25,  0.25]])

    See also: ``forward_kl``.
    """
    func = "forward_kl"
    return _grad(func, _fkl_grad, student_logits, teacher_logits, mask, temperature=temperature,
                 normalizer=normalizer, reduction=reduction)


@v.options(v.TEMPERATURE, v.NORMALIZER, v.REDUCTION)
def reverse_kl(
    student_logits: np.ndarray,
    teacher_logits: np.ndarray,
    mask: np.ndarray,
    *,
    temperature: float = 1.0,
    normalizer: float | None = None,
    reduction: str = "mean",
) -> np.ndarray:
    """Token-level reverse KL, KL(q_i‖p_i) (spec/README.md §5 "Reverse KL").

    ℓ_i = Σ_v q_i(v)[log q_i(v) − log p_i(v)], q_i = softmax(S_i/τ), p_i = softmax(T_i/τ). No τ² factor.
    Arguments, reduction and errors as ``forward_kl``.

    Example:
        >>> import numpy as np
        >>> s, t = np.zeros((1, 2)), np.array([[np.log(3.0), 0.0]])
        >>> round(float(reverse_kl(s, t, np.array([True]))), 6)  # 1/2 log(2/3) + 1/2 log 2
        0.143841

    References: Agarwal et al. 2024 (GKD, β = 1); Gu et al. 2023 (MiniLLM's single-step term).

    See also: ``reverse_kl_grad``, ``forward_kl``, ``generalized_jsd``, ``akl``.
    """
    func = "reverse_kl"
    return _value(func, _rkl, student_logits, teacher_logits, mask, temperature=temperature,
                  normalizer=normalizer, reduction=reduction)


def reverse_kl_grad(
    student_logits: np.ndarray,
    teacher_logits: np.ndarray,
    mask: np.ndarray,
    *,
    temperature: float = 1.0,
    normalizer: float | None = None,
    reduction: str = "mean",
) -> dict[str, np.ndarray]:
    """Gradients of S = sum(reverse_kl(...)), with w_i = ∂S/∂ℓ_i:

    ∂S/∂S_i = (w_i/τ) q_i ⊙ (log q_i − log p_i − KL(q_i‖p_i));  ∂S/∂T_i = (w_i/τ)(p_i − q_i).

    Returns ``{"student_logits": [..., T, V], "teacher_logits": [..., T, V]}`` (float64).

    Example:
        >>> import numpy as np
        >>> s, t = np.zeros((1, 2)), np.array([[np.log(3.0), 0.0]])
        >>> reverse_kl_grad(s, t, np.array([1]))["teacher_logits"]  # p − q
        array([[ 0.25, -0.25]])

    See also: ``reverse_kl``.
    """
    func = "reverse_kl"
    return _grad(func, _rkl_grad, student_logits, teacher_logits, mask, temperature=temperature,
                 normalizer=normalizer, reduction=reduction)


@v.options(JSD_BETA, v.TEMPERATURE, v.NORMALIZER, v.REDUCTION)
def generalized_jsd(
    student_logits: np.ndarray,
    teacher_logits: np.ndarray,
    mask: np.ndarray,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    normalizer: float | None = None,
    reduction: str = "mean",
) -> np.ndarray:
    """Generalised Jensen–Shannon divergence, TRL's GKD convention (spec/README.md §5; Agarwal et al. 2024).

    For 0 < β < 1, with M_i = (1−β) q_i + β p_i (q = student, p = teacher, both at temperature τ):
        ℓ_i = β KL(p_i‖M_i) + (1−β) KL(q_i‖M_i);
    β = 0 → ℓ_i = KL(p_i‖q_i) (forward KL) and β = 1 → ℓ_i = KL(q_i‖p_i) (reverse KL).

    The end points are a convention with a discontinuity: the mixture form itself vanishes at both ends,
    JSD_β ≈ β·KL(p‖q) as β → 0 and ≈ (1−β)·KL(q‖p) as β → 1, so ``generalized_jsd(beta=1e-9)`` ≈ 1e-9·FKL
    while ``generalized_jsd(beta=0)`` is the forward KL itself. β = 1/2 is the ordinary JSD (≤ log 2).
    No τ² factor.

    Args:
        beta: β ∈ [0, 1], the teacher's weight in the mixture.
        Other arguments, reduction and errors as ``forward_kl``.

    Returns:
        A float64 scalar, or ``[..., T]`` values m_i ℓ_i under ``"none"``.

    Example:
        >>> import numpy as np
        >>> s, t, m = np.zeros((1, 2)), np.array([[np.log(3.0), 0.0]]), np.array([1])
        >>> round(float(generalized_jsd(s, t, m)), 6)  # M = (5/8, 3/8)
        0.033822
        >>> round(float(generalized_jsd(s, t, m, beta=0.0)), 6) == round(float(forward_kl(s, t, m)), 6)
        True

    References: Agarwal et al. 2024 (GKD); TRL ``GKDTrainer.generalized_jsd_loss``.

    See also: ``generalized_jsd_grad``, ``forward_kl``, ``reverse_kl``.
    """
    func = "generalized_jsd"
    return _value(func, _jsd, student_logits, teacher_logits, mask, temperature=temperature,
                  normalizer=normalizer, reduction=reduction, beta=beta)


def generalized_jsd_grad(
    student_logits: np.ndarray,
    teacher_logits: np.ndarray,
    mask: np.ndarray,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    normalizer: float | None = None,
    reduction: str = "mean",
) -> dict[str, np.ndarray]:
    """Gradients of S = sum(generalized_jsd(...)), with w_i = ∂S/∂ℓ_i and log M_i as in the loss:

    ∂S/∂S_i = (w_i/τ)(1−β) q_i ⊙ (log q_i − log M_i − KL(q_i‖M_i)),
    ∂S/∂T_i = (w_i/τ) β p_i ⊙ (log p_i − log M_i − KL(p_i‖M_i))   (0 < β < 1);
    at β = 0 / β = 1 the gradients of ``forward_kl`` / ``reverse_kl``.

    Derivation: JSD = β Σ p log p + (1−β) Σ q log q − Σ M log M, so ∂/∂q = (1−β)(log q − log M) and
    ∂/∂p = β (log p − log M); then the softmax Jacobian, diag(q) − q qᵀ (resp. p).

    Returns ``{"student_logits": [..., T, V], "teacher_logits": [..., T, V]}`` (float64).

    Example:
        >>> import numpy as np
        >>> s, t = np.zeros((1, 2)), np.zeros((1, 2))
        >>> generalized_jsd_grad(s, t, np.array([1]))["student_logits"]  # p = q: a minimum
        array([[0., 0.]])

    See also: ``generalized_jsd``.
    """
    func = "generalized_jsd"
    return _grad(func, _jsd_grad, student_logits, teacher_logits, mask, temperature=temperature,
                 normalizer=normalizer, reduction=reduction, beta=beta)


@v.options(MU, v.TEMPERATURE, v.NORMALIZER, v.REDUCTION)
def akl(
    student_logits: np.ndarray,
    teacher_logits: np.ndarray,
    mask: np.ndarray,
    *,
    mu: float = 0.5,
    temperature: float = 1.0,
    normalizer: float | None = None,
    reduction: str = "mean",
) -> np.ndarray:
    """Adaptive KL (AKL; Wu et al. 2024, official ``wutaiqiang/LLM_KD_AKL/AKL.py``; spec/README.md §5).

    At each position, sort p_i descending with cumulative mass C_k; the head H is the first sorted token plus
    every token with C_k ≤ μ, a run of tied probabilities counting whole (C at the end of its run, every
    tied maximum in H: spec/README.md "Tie rule"); with q and p detached (stop-gradient),
        g_head = Σ_{v∈H} |p_i(v) − q_i(v)|,  g_tail = Σ_{v∉H} |p_i(v) − q_i(v)|,
        w_h = g_head/(g_head + g_tail),  w_t = 1 − w_h,
        ℓ_i = w_h KL(p_i‖q_i) + w_t KL(q_i‖p_i).
    When g_head + g_tail = 0 (p_i = q_i) the official code gives 0/0 = NaN; here w_h = w_t = 1/2 and
    ℓ_i = 0 exactly.

    Args:
        mu: μ ∈ (0, 1), the head's probability mass.
        Other arguments, reduction and errors as ``forward_kl``.

    Returns:
        A float64 scalar, or ``[..., T]`` values m_i ℓ_i under ``"none"``.

    Example:
        >>> import numpy as np
        >>> s, t, m = np.zeros((1, 2)), np.array([[np.log(3.0), 0.0]]), np.array([1])
        >>> round(float(akl(s, t, m)), 6)  # head {0}: g_head = g_tail = 1/4, so (FKL + RKL)/2
        0.137327
        >>> float(akl(t, t, m))  # p = q
        0.0

    References: Wu et al., "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for Large
    Language Models" (2024), arXiv:2404.02657.

    See also: ``akl_grad``, ``forward_kl``, ``reverse_kl``.
    """
    func = "akl"
    return _value(func, _akl, student_logits, teacher_logits, mask, temperature=temperature,
                  normalizer=normalizer, reduction=reduction, mu=mu)


def akl_grad(
    student_logits: np.ndarray,
    teacher_logits: np.ndarray,
    mask: np.ndarray,
    *,
    mu: float = 0.5,
    temperature: float = 1.0,
    normalizer: float | None = None,
    reduction: str = "mean",
) -> dict[str, np.ndarray]:
    """Gradients of S = sum(akl(...)) with the weights w_h, w_t held constant (stop-gradient):

    ∂S/∂S_i = (w_i/τ)[w_h (q_i − p_i) + w_t q_i ⊙ (log q_i − log p_i − KL(q_i‖p_i))],
    ∂S/∂T_i = (w_i/τ)[w_h p_i ⊙ (log p_i − log q_i − KL(p_i‖q_i)) + w_t (p_i − q_i)],
    with w_i = ∂S/∂ℓ_i (spec/README.md §4).

    Returns ``{"student_logits": [..., T, V], "teacher_logits": [..., T, V]}`` (float64).

    Example:
        >>> import numpy as np
        >>> s, t = np.zeros((1, 2)), np.array([[np.log(3.0), 0.0]])
        >>> akl_grad(s, t, np.array([1]))["student_logits"].round(6)
        array([[-0.262327,  0.262327]])

    See also: ``akl``.
    """
    func = "akl"
    return _grad(func, _akl_grad, student_logits, teacher_logits, mask, temperature=temperature,
                 normalizer=normalizer, reduction=reduction, mu=mu)


@v.options()
def first_token_divergence(student_logits: np.ndarray, teacher_logits: np.ndarray) -> dict[str, float]:
    """First-response-token KLD and rKLD of the paper's Table 3 (spec/README.md §6, the literal reading).

    kld = mean over positions of KL(p‖q), rkld = mean of KL(q‖p), with p = softmax(teacher_logits),
    q = softmax(student_logits) at temperature 1, averaged over every leading position (one per prompt).

    Args:
        student_logits: ``[..., V]`` float, the student's next-token logits at each prompt's first response
            position.
        teacher_logits: ``[..., V]`` float, the teacher's, same shape.

    Returns:
        ``{"kld": float, "rkld": float}`` (Python floats).

    Example:
        >>> import numpy as np
        >>> d = first_token_divergence(np.zeros(2), np.array([np.log(3.0), 0.0]))
        >>> round(d["kld"], 6), round(d["rkld"], 6)
        (0.130812, 0.143841)

    References: Li et al., "Direct Preference Knowledge Distillation for Large Language Models" (2024),
    Sec. 4.5 / Table 3 (which gives no formula; this is an interpretation, see spec/README.md §6).

    See also: ``forward_kl``, ``reverse_kl``.
    """
    func = "first_token_divergence"
    shape = np.shape(student_logits)
    v.check_student_teacher_shapes(func, shape, np.shape(teacher_logits), None, min_ndim=1)
    # a mean over no prompts, or an empty vocabulary, would be a silent NaN
    v.check_nonempty_positions(func, "student_logits", shape)
    s, t = as_float_arrays(func, {"student_logits": student_logits, "teacher_logits": teacher_logits})
    log_q, log_p = log_softmax(s), log_softmax(t)
    return {"kld": float(np.mean(_kl(log_p, log_q))), "rkld": float(np.mean(_kl(log_q, log_p)))}
