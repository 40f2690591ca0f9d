"""Token-level DPKD, the released code's argmax-preference loss (spec/README.md §4), in JAX."""

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
    """``dpkd.spec.dpkd_token_loss`` in JAX: token-level DPKD (LMOps ``get_distil_loss``, flag ``--seqKD-DPO``;
    spec/README.md §4, §10 (D1)). Formula, arguments, errors and references: the spec function. Dtypes and checks
    (options static under ``jit``): ``dpkd.backends.jax``.

    Example:
        >>> import jax.numpy as jnp
        >>> s = jnp.array([[[2.0, 0.0], [0.0, 1.0]]]); t = jnp.array([[[2.0, 0.0], [3.0, 0.0]]])
        >>> out = dpkd_token_loss(s, t, jnp.array([[True, True]]), beta=1.0)
        >>> round(float(out.loss), 4), float(out.agreement_rate)
        (2.3556, 0.5)
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
