"""Token-level DPKD in PyTorch: the released LMOps code's argmax-preference loss (spec/README.md §4).

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
    """``dpkd.spec.dpkd_token_loss`` in PyTorch: token-level DPKD (LMOps ``get_distil_loss``, flag ``--seqKD-DPO``;
    spec/README.md §4, §10 (D1)). Formula, arguments, errors and references: the spec function. Dtypes and checks:
    ``dpkd.backends.torch``.

    Example:
        >>> import torch
        >>> S = torch.tensor([[[0.0, 1.0, 0.0]]]); T = torch.tensor([[[2.0, 0.0, 0.0]]])
        >>> out = dpkd_token_loss(S, T, torch.ones(1, 1), beta=1.0)
        >>> round(out.loss.item(), 4), out.agreement_rate.item()   # h = (0 − 1) − (2 − 0) = −3
        (3.0486, 0.0)
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

