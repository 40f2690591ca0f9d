"""Sequence-level preference losses in PyTorch: DPKD (paper Eq. 8/9), IPO, CPO, SimPO, DPOP, hinge, robust.

Naming (the DPO-trainer convention, so these drop into an existing trainer): **policy = the student q_θ,
reference = the teacher p, chosen = the teacher's output y_t, rejected = the student's output y_s.**
a = policy_chosen_logps, b = policy_rejected_logps, c = reference_chosen_logps,
d = reference_rejected_logps (summed log-probs, e.g. from ``sequence_logps``); L_t, L_s their lengths.

One mechanism serves every loss: ``_prepare`` validates and casts the arrays (spec order: options, presence, shapes,
device/dtype, values), ``_ratio`` forms one side's log-ratio (policy − reference)[/L] (``_eq9_ratios`` both, for the
losses on the Eq. 8 / Eq. 9 margin), and ``_finish`` reduces and detaches the rewards. Each loss adds only its own
margin and per-pair formula. Reference (teacher) tensors are not detached: as in TRL the caller decides (pass them under
no_grad).
"""

from __future__ import annotations

from typing import Any

import torch
from dpkd.spec import validation as v
from dpkd.spec.results import PreferenceLoss
from dpkd.spec.sequence import DPOP_FORMS

from ._base import (
    options,
    positive_part,
    reduce_elements,
    sequence_inputs,
    smoothed_sigmoid_loss,
    softplus,
)

__all__ = ["DPOP_FORMS", "dpkd_loss", "ipo_loss", "cpo_loss", "simpo_loss", "dpop_loss", "hinge_loss", "robust_loss"]

_LOGPS = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")
_LENGTHS = ("chosen_lengths", "rejected_lengths")


def _prepare(func: str, arrays: dict[str, Any], optional: tuple[str, ...], reduction: str
             ) -> dict[str, torch.Tensor | None]:
    return sequence_inputs(func, arrays, optional=optional, lengths=_LENGTHS, reduction=reduction)


def _ratio(policy: torch.Tensor, reference: torch.Tensor | None, length: torch.Tensor | None) -> torch.Tensor:
    """One side's log-ratio log q_θ(y)/p(y) (reference None: reference-free), divided by |y| if given."""
    r = policy if reference is None else policy - reference
    return r if length is None else r / length


def _eq9_ratios(func: str, a: Any, b: Any, c: Any, d: Any, chosen_lengths: Any, rejected_lengths: Any, reduction: str,
                reference_free: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The validated per-side log-ratios of a loss on h = r_t − r_s: r = policy − reference (Eq. 8), divided
    by the lengths when both are given (Eq. 9); ``reference_free``: the references are 0 (they may be None)."""
    with_lengths = v.check_lengths_pair(func, chosen_lengths, rejected_lengths)
    t = _prepare(func, dict(zip(_LOGPS + _LENGTHS, (a, b, c, d, chosen_lengths, rejected_lengths))),
                 optional=(_LOGPS[2:] if reference_free else ()) + _LENGTHS, reduction=reduction)
    c_, d_ = (None, None) if reference_free else (t[_LOGPS[2]], t[_LOGPS[3]])
    lt, ls = (t["chosen_lengths"], t["rejected_lengths"]) if with_lengths else (None, None)
    return _ratio(t[_LOGPS[0]], c_, lt), _ratio(t[_LOGPS[1]], d_, ls)


def _finish(losses: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, reduction: str) -> PreferenceLoss:
    return PreferenceLoss(reduce_elements(losses, reduction), chosen.detach(), rejected.detach())


def dpkd_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None,
    reference_rejected_logps: torch.Tensor | None,
    *,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    reduction: str = "mean",
) -> PreferenceLoss:
    """``dpkd.spec.dpkd_loss`` in PyTorch: sequence-level DPKD: the DPO loss with the teacher as the reference model
    (paper Eq. 8 / Eq. 9). Formula, arguments, errors and references: the spec function. Dtypes and checks:
    ``dpkd.backends.torch``.

    Example:
        >>> import torch
        >>> out = dpkd_loss(torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-3.0]),
        ...                 torch.tensor([-6.0]), beta=0.5)
        >>> round(out.loss.item(), 4)   # h = (−5+3) − (−4+6) = −4; softplus(2)
        2.1269
    """
    func = "dpkd_loss"
    options(func, beta=beta, label_smoothing=label_smoothing, reference_free=reference_free, reduction=reduction)
    chosen, rejected = _eq9_ratios(func, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                   reference_rejected_logps, chosen_lengths, rejected_lengths, reduction,
                                   reference_free)
    losses = smoothed_sigmoid_loss(beta * (chosen - rejected), label_smoothing)
    return _finish(losses, beta * chosen, beta * rejected, reduction)



def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    tau: float = 0.1,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    length_normalize: bool = True,
    reduction: str = "mean",
) -> PreferenceLoss:
    """``dpkd.spec.ipo_loss`` in PyTorch: IPO with the teacher as reference: a squared loss pulling the margin to
    1/(2τ). Formula, arguments, errors and references: the spec function. Dtypes and checks: ``dpkd.backends.torch``.

    Example:
        >>> import torch
        >>> z = torch.zeros(1)
        >>> ipo_loss(z, z, z, z, tau=0.5, length_normalize=False).loss.item()   # (0 − 1)²
        1.0
    """
    func = "ipo_loss"
    o = options(func, tau=tau, length_normalize=length_normalize, reduction=reduction)
    v.check_length_normalize(func, o["length_normalize"], chosen_lengths, rejected_lengths)
    t = _prepare(func, dict(zip(_LOGPS + _LENGTHS, (
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        chosen_lengths, rejected_lengths))), optional=_LENGTHS, reduction=reduction)
    chosen = _ratio(t[_LOGPS[0]], t[_LOGPS[2]], t["chosen_lengths"])
    rejected = _ratio(t[_LOGPS[1]], t[_LOGPS[3]], t["rejected_lengths"])
    losses = (chosen - rejected - 1.0 / (2.0 * tau)) ** 2
    return _finish(losses, tau * chosen, tau * rejected, reduction)



def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    nll_weight: float = 1.0,
    chosen_lengths: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> PreferenceLoss:
    """``dpkd.spec.cpo_loss`` in PyTorch: CPO: a reference-free preference term plus an NLL term on the teacher's
    output. Formula, arguments, errors and references: the spec function. Dtypes and checks: ``dpkd.backends.torch``.

    Example:
        >>> import torch
        >>> round(cpo_loss(torch.tensor([-2.0]), torch.tensor([-2.0])).loss.item(), 4)   # log 2 + 2
        2.6931
    """
    func = "cpo_loss"
    options(func, beta=beta, nll_weight=nll_weight, label_smoothing=label_smoothing, reduction=reduction)
    t = _prepare(func, {_LOGPS[0]: policy_chosen_logps, _LOGPS[1]: policy_rejected_logps,
                        "chosen_lengths": chosen_lengths}, optional=("chosen_lengths",), reduction=reduction)
    a, b = t[_LOGPS[0]], t[_LOGPS[1]]
    chosen, rejected = beta * a, beta * b
    nll = -_ratio(a, None, t["chosen_lengths"])
    losses = smoothed_sigmoid_loss(chosen - rejected, label_smoothing) + nll_weight * nll
    return _finish(losses, chosen, rejected, reduction)



def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> PreferenceLoss:
    """``dpkd.spec.simpo_loss`` in PyTorch: SimPO: reference-free, length-normalised, with a target margin γ inside σ.
    Formula, arguments, errors and references: the spec function. Dtypes and checks: ``dpkd.backends.torch``.

    Example:
        >>> import torch
        >>> one = torch.ones(1)
        >>> round(simpo_loss(-one, -one, chosen_lengths=one, rejected_lengths=one, gamma=0.0).loss.item(), 4)
        0.6931
    """
    func = "simpo_loss"
    options(func, beta=beta, gamma=gamma, label_smoothing=label_smoothing, reduction=reduction)
    t = _prepare(func, {_LOGPS[0]: policy_chosen_logps, _LOGPS[1]: policy_rejected_logps,
                        "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}, (),
                 reduction)
    chosen = beta * _ratio(t[_LOGPS[0]], None, t["chosen_lengths"])
    rejected = beta * _ratio(t[_LOGPS[1]], None, t["rejected_lengths"])
    losses = smoothed_sigmoid_loss(chosen - rejected - gamma, label_smoothing)
    return _finish(losses, chosen, rejected, reduction)



def dpop_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    lambda_: float = 50.0,
    form: str = "smaug",
    reduction: str = "mean",
) -> PreferenceLoss:
    """``dpkd.spec.dpop_loss`` in PyTorch: DPO-Positive: DPKD plus a penalty when the student's log-prob of the teacher
    output falls below the teacher's. Formula, arguments, errors and references: the spec function. Dtypes and checks:
    ``dpkd.backends.torch``.

    Example:
        >>> import torch
        >>> z = torch.zeros(1)
        >>> round(dpop_loss(z - 1, z, z, z, beta=1.0, lambda_=1.0, form="released").loss.item(), 4)
        2.3133
    """
    func = "dpop_loss"
    options(func, beta=beta, lambda_=lambda_, form=form, reduction=reduction)
    t = _prepare(func, dict(zip(_LOGPS, (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                         reference_rejected_logps))), (), reduction)
    a, c = t[_LOGPS[0]], t[_LOGPS[2]]
    chosen, rejected = _ratio(a, c, None), _ratio(t[_LOGPS[1]], t[_LOGPS[3]], None)
    h = chosen - rejected
    penalty = positive_part(c - a)
    if form == "smaug":
        losses = softplus(-beta * (h - lambda_ * penalty))
    else:
        losses = softplus(-beta * h) + lambda_ * penalty
    return _finish(losses, beta * chosen, beta * rejected, reduction)


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    beta: float = 0.1,
    reduction: str = "mean",
) -> PreferenceLoss:
    """``dpkd.spec.hinge_loss`` in PyTorch: the hinge preference loss (SLiC-HF) with the teacher as reference: a margin
    of 1/β, then no gradient. Formula, arguments, errors and references: the spec function. Dtypes and checks:
    ``dpkd.backends.torch``.

    Example:
        >>> import torch
        >>> z = torch.zeros(1)
        >>> hinge_loss(z, z - 20.0, z, z, beta=0.5).loss.item()   # βh = 10 ≥ 1: no loss
        0.0
    """
    func = "hinge_loss"
    options(func, beta=beta, reduction=reduction)
    chosen, rejected = _eq9_ratios(func, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                   reference_rejected_logps, chosen_lengths, rejected_lengths, reduction)
    losses = positive_part(1.0 - beta * (chosen - rejected))
    return _finish(losses, beta * chosen, beta * rejected, reduction)


def robust_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> PreferenceLoss:
    """``dpkd.spec.robust_loss`` in PyTorch: robust DPO with the teacher as reference: the DPO loss de-biased for
    preferences flipped with rate ε. Formula, arguments, errors and references: the spec function. Dtypes and checks:
    ``dpkd.backends.torch``.

    Example:
        >>> import torch
        >>> z = torch.zeros(1)
        >>> round(robust_loss(z, z, z, z, label_smoothing=0.3).loss.item(), 4)   # h = 0: log 2
        0.6931
    """
    func = "robust_loss"
    eps = options(func, beta=beta, label_smoothing=label_smoothing, reduction=reduction)["label_smoothing"]
    chosen, rejected = _eq9_ratios(func, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                   reference_rejected_logps, chosen_lengths, rejected_lengths, reduction)
    z = beta * (chosen - rejected)
    losses = ((1.0 - eps) * softplus(-z) - eps * softplus(z)) / (1.0 - 2.0 * eps)
    return _finish(losses, beta * chosen, beta * rejected, reduction)
