"""Token-level DPKD in PyTorch: the released LMOps code's argmax-preference loss (SPEC-MATH §3B).

At every position the teacher's greedy token y^t is preferred over the student's greedy token y^s, with
the teacher as the reference: a = Q[y^t], b = Q[y^s], c = P[y^t], d = P[y^s] (Q, P the student's and
teacher's log-softmax). The margin h = (a − b) − (c − d) equals the raw-logit gap
(S[y^t] − S[y^s]) − (T[y^t] − T[y^s]) because the softmax normalisers cancel; it is computed that way,
which is exact in float32 even for logits of magnitude 1e4 and is exactly 0 where the argmaxes agree.
"""

from __future__ import annotations

import torch
from dpkd.spec.results import TokenPreferenceLoss
from dpkd.spec.token import FORMS

from ._base import (
    gather_last,
    options,
    positive_part,
    reduce_tokens,
    shifted_logits,
    smoothed_sigmoid_loss,
    softplus,
    token_inputs,
)

__all__ = ["FORMS", "dpkd_token_loss"]



def dpkd_token_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = 0.1,
    form: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    lambda_: float = 50.0,
    normalizer: float | None = None,
    reduction: str = "mean",
) -> TokenPreferenceLoss:
    """Token-level DPKD of the released code (``get_distil_loss`` with ``--seqKD-DPO``).

    Symbols: S, T the student/teacher logits [..., T, V]; Q = log_softmax(S), P = log_softmax(T);
    y^t = argmax T, y^s = argmax S (ties → lowest index); m the mask; β, ε, λ as below.

    Formula (SPEC-MATH §3B): h = (a − b) − (c − d) (``reference_free``: h = a − b), per token
      sigmoid: ℓ = (1−ε)softplus(−βh) + ε softplus(βh);  ipo: ℓ = (h − 1/(2β))²;
      dpop: ℓ = softplus(−βh) + λ·max(0, c − a)  (gradient with k = 1[c > a]);
    mean = Σ mℓ / (normalizer or Σ m), sum = Σ mℓ, none = m·ℓ. h ≤ 0 everywhere, so ℓ ≥ log 2
    (sigmoid); only the entries y^t and y^s of S receive gradient (except under dpop).

    Args:
        student_logits: [..., T, V], any float dtype (math in float32, float64 for float64).
        teacher_logits: [..., T, V], same shape, dtype and device (not detached: the caller decides).
        mask: [..., T] bool or 0/1 numbers (1 = loss token), same device.
        beta: β > 0 (code ``--dpo-beta``). form: "sigmoid" | "ipo" | "dpop".
        label_smoothing: ε ∈ [0, 0.5], sigmoid form only. reference_free: drop the teacher terms.
        lambda_: λ ≥ 0 (dpop). normalizer: global loss-token count (> 0, "mean" only) for exact gradient
        accumulation. reduction: "mean" | "sum" | "none".

    Returns:
        ``TokenPreferenceLoss(loss, agreement_rate, chosen_rewards, rejected_rewards)``: the loss (float32
        for low-precision inputs), the fraction of loss tokens whose argmaxes agree (0-dim), and the
        per-token rewards β(a−c)·m, β(b−d)·m [..., T] (detached).

    Example:
        >>> import torch
        >>> S = torch.tensor([[[0.0, 1.0, 0.0]]]); T = torch.tensor([[[2.0, 0.0, 0.0]]])
        >>> out = dpkd_token_loss(S, T, torch.ones(1, 1), beta=1.0)
        >>> round(out.loss.item(), 4), out.agreement_rate.item()   # h = (0 − 1) − (2 − 0) = −3
        (3.0486, 0.0)

    References: microsoft/LMOps dpkd/main.py ``get_distil_loss``; DPKD paper §3.
    See also: ``dpkd_loss`` (sequence level, paper Eq. 8/9), ``DPKDTokenLoss``, ``dpkd.spec.dpkd_token_loss``.
    """
    func = "dpkd_token_loss"
    normalizer = options(func, beta=beta, form=form, label_smoothing=label_smoothing, reference_free=reference_free,
                         lambda_=lambda_, normalizer=normalizer, reduction=reduction)["normalizer"]
    x = token_inputs(func, student_logits, teacher_logits, mask, normalizer=normalizer,
                               reduction=reduction)
    S, T, m = x.student, x.teacher, x.mask

    # argmax has no gradient; torch returns the first maximal index, the spec's tie rule
    y_t = torch.argmax(T.detach(), dim=-1)
    y_s = torch.argmax(S.detach(), dim=-1)
    s_gap = gather_last(S, y_t) - gather_last(S, y_s)  # a − b
    t_gap = gather_last(T, y_t) - gather_last(T, y_s)  # c − d
    h = s_gap if reference_free else s_gap - t_gap

    S_shift, lse_s = shifted_logits(S)  # log_softmax(S)[v] = S_shift[v] − lse_s
    T_shift, lse_t = shifted_logits(T)
    if form == "sigmoid":
        per_token = smoothed_sigmoid_loss(beta * h, label_smoothing)
    elif form == "ipo":
        per_token = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        a = gather_last(S_shift, y_t) - lse_s
        c = gather_last(T_shift, y_t) - lse_t
        per_token = softplus(-beta * h) + lambda_ * positive_part(c - a)
    loss = reduce_tokens(per_token, m, reduction, x.denominator)

    with torch.no_grad():
        agree = (y_t == y_s).to(m.dtype)
        agreement_rate = (agree * m).sum() / m.sum().clamp(min=1.0)
        # a − c and b − d, the per-side log-ratios of the released code's reward diagnostics
        chosen = (gather_last(S_shift, y_t) - lse_s) - (gather_last(T_shift, y_t) - lse_t)
        rejected = (gather_last(S_shift, y_s) - lse_s) - (gather_last(T_shift, y_s) - lse_t)
    return TokenPreferenceLoss(loss, agreement_rate, beta * chosen * m, beta * rejected * m)

