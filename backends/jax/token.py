"""Token-level DPKD, the released code's argmax-preference loss (SPEC-MATH §3B), in JAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from dpkd.spec.results import TokenPreferenceLoss
from dpkd.spec.token import FORMS

from . import _base

__all__ = ["dpkd_token_loss", "FORMS"]



def dpkd_token_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    mask: jax.Array,
    *,
    beta: float = 0.1,
    form: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    lambda_: float = 50.0,
    normalizer: float | None = None,
    reduction: str = "mean",
) -> TokenPreferenceLoss:
    """Token-level DPKD (LMOps ``get_distil_loss``, flag ``--seqKD-DPO``): at every loss position the
    teacher's greedy token is "chosen" and the student's greedy token is "rejected".

    Symbols: S, T the student/teacher logits at one position; Q = log_softmax(S), P = log_softmax(T);
    y^t = argmax T, y^s = argmax S (ties → lowest index; taken on the logits themselves, which have the
    same argmax as P and Q without the rounding of the shift); m the mask.

    Formula (SPEC-MATH §3B):
        a = Q[y^t], b = Q[y^s], c = P[y^t], d = P[y^s]
        h = (a − b) − (c − d) = (S[y^t] − S[y^s]) − (T[y^t] − T[y^s])   (reference_free: h = a − b)
        sigmoid: ℓ = (1−ε)·softplus(−βh) + ε·softplus(βh)
        ipo:     ℓ = (h − 1/(2β))²
        dpop:    ℓ = softplus(−βh) + λ·max(0, c − a)   (derivative k = 1[c > a])
        loss = Σ m·ℓ / (normalizer or Σ m)  ("mean"),  Σ m·ℓ ("sum"),  m·ℓ [..., T] ("none")
    h is formed from raw logit gaps (the softmax normalisers cancel exactly), so ∂h/∂S = e_{y^t} − e_{y^s}
    with no cancellation error; h ≤ 0 everywhere, = 0 where the argmaxes agree.

    Args:
        student_logits: float [..., T, V] (trainable).  teacher_logits: float [..., T, V], same vocabulary.
        mask: [..., T] bool or 0/1 numbers — the loss positions.
        beta: β > 0.  form: "sigmoid" | "ipo" | "dpop".  label_smoothing: ε ∈ [0, 0.5], sigmoid only.
        reference_free: drop the teacher log-ratio.  lambda_: λ ≥ 0 (dpop).
        normalizer: the mean's denominator (global loss-token count, for exact gradient accumulation);
            only with reduction="mean".  reduction: "mean" | "sum" | "none".
        (Every keyword argument is static under jit: ``dpkd.backends.jax.jit`` marks them.)

    Returns:
        ``TokenPreferenceLoss(loss, agreement_rate, chosen_rewards, rejected_rewards)``: loss scalar (or
        [..., T]); agreement_rate = Σ m·1[y^t = y^s] / max(Σ m, 1); rewards β(a − c)·m and β(b − d)·m
        [..., T], detached. Float outputs in the compute dtype (float32 for bfloat16 logits).

    Example:
        >>> import jax.numpy as jnp
        >>> s = jnp.array([[[2.0, 0.0], [0.0, 1.0]]]); t = jnp.array([[[2.0, 0.0], [3.0, 0.0]]])
        >>> out = dpkd_token_loss(s, t, jnp.array([[True, True]]), beta=1.0)
        >>> round(float(out.loss), 4), float(out.agreement_rate)
        (2.3556, 0.5)

    References: microsoft/LMOps ``dpkd`` (released code); Li et al. 2024 (arXiv:2406.19774); SPEC-MATH §3B.
    See also: ``dpkd_loss`` (sequence level), ``forward_kl``, ``dpkd.spec.dpkd_token_loss_grad``.
    """
    func = "dpkd_token_loss"
    o = _base.options(func, beta=beta, form=form, label_smoothing=label_smoothing, reference_free=reference_free,
                      lambda_=lambda_, normalizer=normalizer, reduction=reduction)
    beta, form, eps, reference_free = o["beta"], o["form"], o["label_smoothing"], o["reference_free"]
    lam, normalizer, reduction = o["lambda_"], o["normalizer"], o["reduction"]
    pair = _base.token_inputs(func, student_logits, teacher_logits, mask, normalizer=normalizer, reduction=reduction)
    s, t, m = pair.student, pair.teacher, pair.mask

    # argmax is piecewise constant: no gradient flows through the choice of tokens
    y_t = jnp.argmax(jax.lax.stop_gradient(t), axis=-1)
    y_s = jnp.argmax(jax.lax.stop_gradient(s), axis=-1)
    s_t, s_s = _base.gather_last(s, y_t), _base.gather_last(s, y_s)
    t_t, t_s = _base.gather_last(t, y_t), _base.gather_last(t, y_s)
    h = s_t - s_s if reference_free else (s_t - s_s) - (t_t - t_s)
    # a, b, c, d from the max-shifted logits (accurate for ±1e4 logits, see _base.shifted_normalizer)
    (ms, zs), (mt, zt) = _base.shifted_normalizer(s), _base.shifted_normalizer(t)
    ms, zs, mt, zt = ms[..., 0], zs[..., 0], mt[..., 0], zt[..., 0]
    a, b = (s_t - ms) - zs, (s_s - ms) - zs
    c, d = (t_t - mt) - zt, (t_s - mt) - zt

    if form == "ipo":
        per_token = jnp.square(h - 1.0 / (2.0 * beta))
    elif form == "dpop":
        per_token = _base.softplus(-beta * h) + lam * jnp.where(c > a, c - a, jnp.zeros((), h.dtype))
    else:
        per_token = _base.smoothed_sigmoid_loss(beta * h, eps)

    loss = _base.reduce_tokens(per_token, m, reduction, pair.denominator)
    agreement = jnp.sum(m * (y_t == y_s)) / jnp.maximum(jnp.sum(m), 1.0)
    chosen = jax.lax.stop_gradient(beta * (a - c) * m)
    rejected = jax.lax.stop_gradient(beta * (b - d) * m)
    return TokenPreferenceLoss(loss, agreement, chosen, rejected)
