"""Token-level distillation baselines (spec/README.md §5) in JAX: cross-entropy, forward/reverse KL,
generalised JSD (TRL's GKD convention) and AKL, plus the first-token divergence of Table 3.

Common: p = softmax(T/τ), q = softmax(S/τ) (no τ² factor); mask and normalizer as ``dpkd_token_loss``
(mean = Σ m·ℓ / (normalizer or Σ m), an empty mean is an error; "none" = m·ℓ [..., T]). Every divergence is
written on log-probabilities, p·(log p − log q) with p = exp(log p): p underflows to exactly 0 where
log p ≪ 0 and 0·finite = 0, so no 0·log 0 NaN (value or gradient) can arise for any finite logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from dpkd.spec import validation as v

from . import _base
from .logps import label_inputs, picked_logps

__all__ = ["cross_entropy", "forward_kl", "reverse_kl", "generalized_jsd", "akl", "first_token_divergence"]

Piece = Callable[[jax.Array, jax.Array], jax.Array]  # (log q, log p) → per-position value [..., T]


# --------------------------------------------------------------------------------------------------
# Per-position pieces, on log-probabilities over the last axis (the result drops that axis)


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """KL(p‖q) = Σ_v p_v (log p_v − log q_v)."""
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _forward(log_q: jax.Array, log_p: jax.Array) -> jax.Array:
    return _kl(log_p, log_q)


def _reverse(log_q: jax.Array, log_p: jax.Array) -> jax.Array:
    return _kl(log_q, log_p)


def _jsd_piece(*, beta: float) -> Piece:
    if beta == 0.0:
        return _forward  # TRL's convention at the end points (a documented discontinuity)
    if beta == 1.0:
        return _reverse

    def piece(log_q: jax.Array, log_p: jax.Array) -> jax.Array:
        # log M for M = (1−β) q + β p, as a stable log-sum-exp
        log_m = jnp.logaddexp(log_q + math.log1p(-beta), log_p + math.log(beta))
        return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)

    return piece


def _akl_head_sorted(p_sorted: jax.Array, mu: float) -> jax.Array:
    """AKL's head in sorted order (``dpkd.spec``'s tie rule): C(k) = the cumulative sum at the end of k's run
    of tied probabilities ≤ μ, or p_k the maximum."""
    n = p_sorted.shape[-1]
    last_of_run = jnp.concatenate([p_sorted[..., :-1] != p_sorted[..., 1:],
                                   jnp.ones_like(p_sorted[..., :1], dtype=bool)], axis=-1)
    marked = jnp.where(last_of_run, jnp.arange(n), n)
    run_end = jax.lax.cummin(marked, axis=marked.ndim - 1, reverse=True)
    cumulative = jnp.cumsum(p_sorted, axis=-1)
    return (jnp.take_along_axis(cumulative, run_end, axis=-1) <= mu) | (p_sorted == p_sorted[..., :1])


def _akl_piece(*, mu: float) -> Piece:
    def piece(log_q: jax.Array, log_p: jax.Array) -> jax.Array:
        # The weights come from stop-gradient copies of p and q (official AKL code): constants for autograd.
        p = jnp.exp(jax.lax.stop_gradient(log_p))
        q = jnp.exp(jax.lax.stop_gradient(log_q))
        # Sort p descending; negation is exact, so this is the order of p (ties: _akl_head_sorted's rule).
        order = jnp.argsort(-p, axis=-1, stable=True)
        head = _akl_head_sorted(jnp.take_along_axis(p, order, axis=-1), mu)
        gap = jnp.take_along_axis(jnp.abs(p - q), order, axis=-1)
        g_head = jnp.sum(jnp.where(head, gap, 0.0), axis=-1)
        g_tail = jnp.sum(jnp.where(head, 0.0, gap), axis=-1)
        total = g_head + g_tail
        # p = q gives 0/0: both KLs vanish there, and the weights are conventionally 1/2 (double where,
        # so neither branch ever divides by zero)
        w_head = jnp.where(total > 0, g_head / jnp.where(total > 0, total, 1.0), 0.5)
        return w_head * _kl(log_p, log_q) + (1.0 - w_head) * _kl(log_q, log_p)

    return piece


# --------------------------------------------------------------------------------------------------
# The shared driver: options → token_inputs → per-position piece → masked reduction


_SHARED = ("temperature", "normalizer", "reduction")


def _divergence(func: str, piece_of: Callable[..., Piece], student_logits: jax.Array, teacher_logits: jax.Array,
                mask: jax.Array, **options: Any) -> jax.Array:
    """The options (signature order), the log-softmax pair, then ``piece_of(**own options)`` per position."""
    o = _base.options(func, **options)
    pair = _base.token_inputs(func, student_logits, teacher_logits, mask, normalizer=o["normalizer"],
                            reduction=o["reduction"], temperature=o["temperature"])
    piece = piece_of(**{k: x for k, x in o.items() if k not in _SHARED})
    per_position = piece(_base.log_softmax(pair.student), _base.log_softmax(pair.teacher))
    return _base.reduce_tokens(per_position, pair.mask, o["reduction"], pair.denominator)


# --------------------------------------------------------------------------------------------------
# Public losses


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = -100,
    normalizer: float | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """``dpkd.spec.cross_entropy`` in JAX: token cross-entropy of a model on dataset labels (SFT / LM loss;
    spec/README.md §5 "SFT", §7 CE_D). Formula, arguments, errors and references: the spec function. Dtypes and checks
    (options static under ``jit``): ``dpkd.backends.jax``.

    Example:
        >>> import jax.numpy as jnp
        >>> round(float(cross_entropy(jnp.zeros((1, 2, 2)), jnp.array([[0, -100]]))), 6)
        0.693147
    """
    func = "cross_entropy"
    o = _base.options(func, ignore_index=ignore_index, normalizer=normalizer, reduction=reduction)
    ignore, normalizer, reduction = o["ignore_index"], o["normalizer"], o["reduction"]
    inputs = label_inputs(func, logits, labels, ignore, presence=False)
    dt = _base.compute_dtype(inputs.logits)
    mask = inputs.keep.astype(dt)
    denominator = _base.token_denominator(func, mask, normalizer, reduction, dt, mask_name="labels")
    return _base.reduce_tokens(-picked_logps(inputs), mask, reduction, denominator)


def forward_kl(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    mask: jax.Array,
    *,
    temperature: float = 1.0,
    normalizer: float | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """``dpkd.spec.forward_kl`` in JAX: token-level forward KL, KL(p_i‖q_i) (word-level KD; spec/README.md §5, §7
    FKD_Dp). Formula, arguments, errors and references: the spec function. Dtypes and checks (options static under
    ``jit``): ``dpkd.backends.jax``.

    Example:
        >>> import jax.numpy as jnp
        >>> s, t = jnp.array([[[0.0, 1.0]]]), jnp.array([[[1.0, 0.0]]])
        >>> round(float(forward_kl(s, t, jnp.ones((1, 1)))), 6)  # (2σ(1) − 1)·1
        0.462117
    """
    func = "forward_kl"
    return _divergence(func, lambda: _forward, student_logits, teacher_logits, mask, temperature=temperature,
                       normalizer=normalizer, reduction=reduction)


def reverse_kl(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    mask: jax.Array,
    *,
    temperature: float = 1.0,
    normalizer: float | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """``dpkd.spec.reverse_kl`` in JAX: token-level reverse KL, KL(q_i‖p_i) (spec/README.md §5 "Reverse KL"). Formula,
    arguments, errors and references: the spec function. Dtypes and checks (options static under ``jit``):
    ``dpkd.backends.jax``.

    Example:
        >>> import jax.numpy as jnp
        >>> s, t = jnp.array([[[0.0, 0.0]]]), jnp.array([[[0.0, 0.0]]])
        >>> float(reverse_kl(s, t, jnp.ones((1, 1))))
        0.0
    """
    func = "reverse_kl"
    return _divergence(func, lambda: _reverse, student_logits, teacher_logits, mask, temperature=temperature,
                       normalizer=normalizer, reduction=reduction)


def generalized_jsd(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    mask: jax.Array,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    normalizer: float | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """``dpkd.spec.generalized_jsd`` in JAX: generalised Jensen–Shannon divergence, TRL's GKD convention (spec/README.md
    §5; Agarwal et al. 2024). Formula, arguments, errors and references: the spec function. Dtypes and checks (options
    static under ``jit``): ``dpkd.backends.jax``.

    Example:
        >>> import jax.numpy as jnp
        >>> s, t = jnp.array([[[-50.0, 50.0]]]), jnp.array([[[50.0, -50.0]]])
        >>> round(float(generalized_jsd(s, t, jnp.ones((1, 1)))), 6)  # disjoint supports: log 2
        0.693147
    """
    func = "generalized_jsd"
    return _divergence(func, _jsd_piece, student_logits, teacher_logits, mask, beta=beta, temperature=temperature,
                       normalizer=normalizer, reduction=reduction)


def akl(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    mask: jax.Array,
    *,
    mu: float = 0.5,
    temperature: float = 1.0,
    normalizer: float | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """``dpkd.spec.akl`` in JAX: adaptive KL (AKL; Wu et al. 2024, official ``wutaiqiang/LLM_KD_AKL/AKL.py``;
    spec/README.md §5). Formula, arguments, errors and references: the spec function. Dtypes and checks (options static
    under ``jit``): ``dpkd.backends.jax``.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([[[1.0, 2.0, 3.0]]])
        >>> float(akl(x, x, jnp.ones((1, 1))))
        0.0
    """
    func = "akl"
    return _divergence(func, _akl_piece, student_logits, teacher_logits, mask, mu=mu, temperature=temperature,
                       normalizer=normalizer, reduction=reduction)


def first_token_divergence(student_logits: jax.Array, teacher_logits: jax.Array) -> dict:
    """``dpkd.spec.first_token_divergence`` in JAX: first-response-token KLD and rKLD of the paper's Table 3
    (spec/README.md §6, the literal reading). Formula, arguments, errors and references: the spec function. Dtypes and
    checks (options static under ``jit``): ``dpkd.backends.jax``.

    Example:
        >>> import jax.numpy as jnp
        >>> first_token_divergence(jnp.zeros((2, 3)), jnp.zeros((2, 3)))
        {'kld': 0.0, 'rkld': 0.0}
    """
    func = "first_token_divergence"
    v.check_student_teacher_shapes(func, _base.shape_of(student_logits), _base.shape_of(teacher_logits), None,
                                   min_ndim=1)
    s = _base.float_arg(func, "student_logits", student_logits)
    t = _base.float_arg(func, "teacher_logits", teacher_logits)
    _base.check_finite(func, "student_logits", s)
    _base.check_finite(func, "teacher_logits", t)
    v.check_nonempty_positions(func, "student_logits", s.shape)
    dt = _base.compute_dtype(s, t)
    log_q, log_p = _base.log_softmax(s.astype(dt)), _base.log_softmax(t.astype(dt))
    return {"kld": _base.scalar_out(jnp.mean(_kl(log_p, log_q))), "rkld": _base.scalar_out(jnp.mean(_kl(log_q, log_p)))}
