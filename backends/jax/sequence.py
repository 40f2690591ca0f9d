"""Sequence-level preference losses (paper Eq. 8 / Eq. 9, the Table 2 variants, hinge, robust) in JAX.

Naming, as in DPO trainers: policy = the student q_θ, reference = the teacher p, chosen = the teacher's
output y_t, rejected = the student's output y_s. Per example

    a = log q_θ(y_t|x)  (policy_chosen_logps)      c = log p(y_t|x)  (reference_chosen_logps)
    b = log q_θ(y_s|x)  (policy_rejected_logps)    d = log p(y_s|x)  (reference_rejected_logps)
    L_t = |y_t|  (chosen_lengths)                  L_s = |y_s|  (rejected_lengths)

One mechanism serves every loss (spec/README.md §2, §3): ``_base.sequence_inputs`` checks and casts the inputs once,
``_base.margin`` builds the two per-side log-ratios r_t = (a − c)/L_t and r_s = (b − d)/L_s (reference terms absent for
the reference-free losses, lengths absent when not normalising), and ``_result`` reduces the per-element losses and
attaches the detached rewards. Each public loss is a few lines on top. Gradients are ``jax.grad``'s; they equal the
spec's ``*_grad`` (conformance/).

Every function is pure and composes with ``jax.jit`` (options static: ``dpkd.backends.jax.jit``),
``jax.vmap`` over a leading axis of problems, and ``jax.grad`` / ``jax.value_and_grad``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from dpkd.spec import validation as v
from dpkd.spec.results import PreferenceLoss
from dpkd.spec.sequence import DPOP_FORMS

from . import _base

__all__ = ["dpkd_loss", "ipo_loss", "cpo_loss", "simpo_loss", "dpop_loss", "hinge_loss", "robust_loss", "DPOP_FORMS"]

A, B, C, D, LT, LS = _base.A, _base.B, _base.C, _base.D, _base.LT, _base.LS


# --------------------------------------------------------------------------------------------------
# The shared mechanism


def _eq9_ratios(func: str, a: Any, b: Any, c: Any, d: Any, chosen_lengths: Any, rejected_lengths: Any, reduction: str,
                reference_free: bool = False) -> tuple[jax.Array, jax.Array]:
    """The validated per-side log-ratios (r_t, r_s) of a loss on h = r_t − r_s: r = policy − reference
    (Eq. 8), divided by the lengths when both are given (Eq. 9); ``reference_free``: the references are 0."""
    normalize = v.check_lengths_pair(func, chosen_lengths, rejected_lengths)
    x = _base.sequence_inputs(func, {A: a, B: b, C: c, D: d, LT: chosen_lengths, LS: rejected_lengths},
                              optional=(C, D, LT, LS) if reference_free else (LT, LS), lengths=(LT, LS),
                              reduction=reduction)
    return _base.margin(x, reference=not reference_free, normalize=normalize)


def _result(losses: jax.Array, chosen: jax.Array, rejected: jax.Array, scale: float,
            reduction: str) -> PreferenceLoss:
    """Reduce the per-element losses; rewards = scale·r (β or τ), per element, detached."""
    return PreferenceLoss(_base.reduce_elements(losses, reduction), jax.lax.stop_gradient(scale * chosen),
                          jax.lax.stop_gradient(scale * rejected))


# --------------------------------------------------------------------------------------------------
# DPKD (Eq. 8 / Eq. 9)


def dpkd_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    reference_chosen_logps: jax.Array | None,
    reference_rejected_logps: jax.Array | None,
    *,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    reduction: str = "mean",
) -> PreferenceLoss:
    """``dpkd.spec.dpkd_loss`` in JAX: sequence-level DPKD: the DPO loss with the teacher as the reference model (paper
    Eq. 8 / Eq. 9). Formula, arguments, errors and references: the spec function. Dtypes and checks (options static
    under ``jit``): ``dpkd.backends.jax``.

    Example:
        >>> import jax.numpy as jnp
        >>> out = dpkd_loss(jnp.array([-12.0]), jnp.array([-5.0]), jnp.array([-5.0]), jnp.array([-5.0]),
        ...                 beta=0.7)
        >>> round(float(out.loss), 4), round(float(out.chosen_rewards[0]), 4), float(out.rejected_rewards[0])
        (4.9074, -4.9, 0.0)
    """
    func = "dpkd_loss"
    o = _base.options(func, beta=beta, label_smoothing=label_smoothing, reference_free=reference_free,
                      reduction=reduction)
    beta, eps, reference_free, reduction = o["beta"], o["label_smoothing"], o["reference_free"], o["reduction"]
    chosen, rejected = _eq9_ratios(func, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                   reference_rejected_logps, chosen_lengths, rejected_lengths, reduction,
                                   reference_free)
    losses = _base.smoothed_sigmoid_loss(beta * (chosen - rejected), eps)
    return _result(losses, chosen, rejected, beta, reduction)


# --------------------------------------------------------------------------------------------------
# IPO (Table 2; Azar et al. 2024 Eq. 17)


def ipo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    reference_chosen_logps: jax.Array,
    reference_rejected_logps: jax.Array,
    *,
    tau: float = 0.1,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    length_normalize: bool = True,
    reduction: str = "mean",
) -> PreferenceLoss:
    """``dpkd.spec.ipo_loss`` in JAX: IPO with the teacher as reference: a squared loss pulling the margin to 1/(2τ).
    Formula, arguments, errors and references: the spec function. Dtypes and checks (options static under ``jit``):
    ``dpkd.backends.jax``.

    Example:
        >>> import jax.numpy as jnp
        >>> z = jnp.zeros(2)
        >>> float(ipo_loss(z, z, z, z, length_normalize=False).loss)
        25.0
    """
    func = "ipo_loss"
    o = _base.options(func, tau=tau, length_normalize=length_normalize, reduction=reduction)
    tau, normalize, reduction = o["tau"], o["length_normalize"], o["reduction"]
    v.check_length_normalize(func, normalize, chosen_lengths, rejected_lengths)
    x = _base.sequence_inputs(func, {A: policy_chosen_logps, B: policy_rejected_logps, C: reference_chosen_logps,
                              D: reference_rejected_logps, LT: chosen_lengths, LS: rejected_lengths},
                              optional=(LT, LS), lengths=(LT, LS), reduction=reduction)
    chosen, rejected = _base.margin(x, normalize=normalize)
    losses = jnp.square(chosen - rejected - 1.0 / (2.0 * tau))
    return _result(losses, chosen, rejected, tau, reduction)


# --------------------------------------------------------------------------------------------------
# CPO (Table 2, with the typo corrected; Xu et al. 2024)


def cpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    *,
    beta: float = 0.1,
    nll_weight: float = 1.0,
    chosen_lengths: jax.Array | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> PreferenceLoss:
    """``dpkd.spec.cpo_loss`` in JAX: CPO: a reference-free preference term plus an NLL term on the teacher's output.
    Formula, arguments, errors and references: the spec function. Dtypes and checks (options static under ``jit``):
    ``dpkd.backends.jax``.

    Example:
        >>> import jax.numpy as jnp
        >>> round(float(cpo_loss(jnp.array([-2.0]), jnp.array([-2.0])).loss), 4)  # log 2 + 2
        2.6931
    """
    func = "cpo_loss"
    o = _base.options(func, beta=beta, nll_weight=nll_weight, label_smoothing=label_smoothing, reduction=reduction)
    beta, w, eps, reduction = o["beta"], o["nll_weight"], o["label_smoothing"], o["reduction"]
    x = _base.sequence_inputs(func, {A: policy_chosen_logps, B: policy_rejected_logps, LT: chosen_lengths},
                              optional=(LT,), lengths=(LT,), reduction=reduction)
    a, rejected = x[A], x[B]
    nll = -a if x[LT] is None else -a / x[LT]
    losses = _base.smoothed_sigmoid_loss(beta * (a - rejected), eps) + w * nll
    return _result(losses, a, rejected, beta, reduction)


# --------------------------------------------------------------------------------------------------
# SimPO (Meng et al. 2024)


def simpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    *,
    chosen_lengths: jax.Array,
    rejected_lengths: jax.Array,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> PreferenceLoss:
    """``dpkd.spec.simpo_loss`` in JAX: SimPO: reference-free, length-normalised, with a target margin γ inside σ.
    Formula, arguments, errors and references: the spec function. Dtypes and checks (options static under ``jit``):
    ``dpkd.backends.jax``.

    Example:
        >>> import jax.numpy as jnp
        >>> z, n = jnp.zeros(1), jnp.ones(1)
        >>> round(float(simpo_loss(z, z, chosen_lengths=n, rejected_lengths=n, gamma=0.0).loss), 4)
        0.6931
    """
    func = "simpo_loss"
    o = _base.options(func, beta=beta, gamma=gamma, label_smoothing=label_smoothing, reduction=reduction)
    beta, gamma, eps, reduction = o["beta"], o["gamma"], o["label_smoothing"], o["reduction"]
    x = _base.sequence_inputs(func, {A: policy_chosen_logps, B: policy_rejected_logps, LT: chosen_lengths,
                              LS: rejected_lengths}, lengths=(LT, LS), reduction=reduction)
    chosen, rejected = _base.margin(x, reference=False, normalize=True)
    losses = _base.smoothed_sigmoid_loss(beta * (chosen - rejected) - gamma, eps)
    return _result(losses, chosen, rejected, beta, reduction)


# --------------------------------------------------------------------------------------------------
# DPOP (Smaug, Pal et al. 2024; and the released code's --DPOP)


def dpop_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    reference_chosen_logps: jax.Array,
    reference_rejected_logps: jax.Array,
    *,
    beta: float = 0.1,
    lambda_: float = 50.0,
    form: str = "smaug",
    reduction: str = "mean",
) -> PreferenceLoss:
    """``dpkd.spec.dpop_loss`` in JAX: DPO-Positive: DPKD plus a penalty when the student's log-prob of the teacher
    output falls below the teacher's. Formula, arguments, errors and references: the spec function. Dtypes and checks
    (options static under ``jit``): ``dpkd.backends.jax``.

    Example:
        >>> import jax.numpy as jnp
        >>> z = jnp.zeros(1)
        >>> round(float(dpop_loss(z - 1.0, z, z, z, beta=1.0, lambda_=1.0, form="released").loss), 4)
        2.3133
    """
    func = "dpop_loss"
    o = _base.options(func, beta=beta, lambda_=lambda_, form=form, reduction=reduction)
    beta, lam, form, reduction = o["beta"], o["lambda_"], o["form"], o["reduction"]
    x = _base.sequence_inputs(func, {A: policy_chosen_logps, B: policy_rejected_logps, C: reference_chosen_logps,
                              D: reference_rejected_logps}, reduction=reduction)
    chosen, rejected = _base.margin(x)
    a, c = x[A], x[C]
    penalty = jnp.where(c > a, c - a, jnp.zeros((), a.dtype))
    h = chosen - rejected
    if form == "smaug":
        losses = _base.softplus(-beta * (h - lam * penalty))
    else:
        losses = _base.softplus(-beta * h) + lam * penalty
    return _result(losses, chosen, rejected, beta, reduction)


def hinge_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    reference_chosen_logps: jax.Array,
    reference_rejected_logps: jax.Array,
    *,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    beta: float = 0.1,
    reduction: str = "mean",
) -> PreferenceLoss:
    """``dpkd.spec.hinge_loss`` in JAX: the hinge preference loss (SLiC-HF) with the teacher as reference: a margin of
    1/β, then no gradient. Formula, arguments, errors and references: the spec function. Dtypes and checks (options
    static under ``jit``): ``dpkd.backends.jax``.

    Example:
        >>> import jax.numpy as jnp
        >>> z = jnp.zeros(1)
        >>> float(hinge_loss(z, z - 20.0, z, z, beta=0.5).loss)   # βh = 10 ≥ 1: no loss
        0.0
    """
    func = "hinge_loss"
    o = _base.options(func, beta=beta, reduction=reduction)
    beta, reduction = o["beta"], o["reduction"]
    chosen, rejected = _eq9_ratios(func, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                   reference_rejected_logps, chosen_lengths, rejected_lengths, reduction)
    gap = 1.0 - beta * (chosen - rejected)
    losses = jnp.where(gap > 0, gap, jnp.zeros((), gap.dtype))
    return _result(losses, chosen, rejected, beta, reduction)


def robust_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    reference_chosen_logps: jax.Array,
    reference_rejected_logps: jax.Array,
    *,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> PreferenceLoss:
    """``dpkd.spec.robust_loss`` in JAX: robust DPO with the teacher as reference: the DPO loss de-biased for
    preferences flipped with rate ε. Formula, arguments, errors and references: the spec function. Dtypes and checks
    (options static under ``jit``): ``dpkd.backends.jax``.

    Example:
        >>> import jax.numpy as jnp
        >>> z = jnp.zeros(1)
        >>> round(float(robust_loss(z, z, z, z, label_smoothing=0.3).loss), 4)   # h = 0: log 2
        0.6931
    """
    func = "robust_loss"
    o = _base.options(func, beta=beta, label_smoothing=label_smoothing, reduction=reduction)
    beta, eps, reduction = o["beta"], o["label_smoothing"], o["reduction"]
    chosen, rejected = _eq9_ratios(func, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                   reference_rejected_logps, chosen_lengths, rejected_lengths, reduction)
    z = beta * (chosen - rejected)
    losses = ((1.0 - eps) * _base.softplus(-z) - eps * _base.softplus(z)) / (1.0 - 2.0 * eps)
    return _result(losses, chosen, rejected, beta, reduction)
