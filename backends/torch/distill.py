"""Distillation baselines in PyTorch (spec/README.md §5): cross-entropy, forward/reverse KL, generalised JSD, AKL.

Common: p = softmax(T/τ), q = softmax(S/τ) (no τ² factor: TRL's GKD convention). Every divergence is
written from log-softmax values, so p·log p is 0·(finite) = 0 where p underflows: finite for any finite
logits, ±1e4 included. Mask and normalizer as ``dpkd_token_loss``: mean = Σ mℓ / (normalizer or Σ m),
sum = Σ mℓ, none = m·ℓ [..., T].
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._base import kl_divergence, options, reduce_tokens, token_inputs
from .logps import _token_logps

__all__ = ["cross_entropy", "forward_kl", "reverse_kl", "generalized_jsd", "akl"]


class _LogProbs(NamedTuple):
    """log q = log_softmax(S/τ), log p = log_softmax(T/τ), the mask and the mean's denominator."""

    log_q: torch.Tensor
    log_p: torch.Tensor
    mask: torch.Tensor
    denominator: torch.Tensor | float


def _akl_head_sorted(p_sorted: torch.Tensor, mu: float) -> torch.Tensor:
    """AKL's head in sorted order (``dpkd.spec``'s tie rule): C(k) = the cumulative sum at the end of k's run
    of tied probabilities ≤ μ, or p_k the maximum."""
    n = p_sorted.shape[-1]
    last_of_run = torch.cat([p_sorted[..., :-1] != p_sorted[..., 1:],
                             torch.ones_like(p_sorted[..., :1], dtype=torch.bool)], dim=-1)
    index = torch.arange(n, device=p_sorted.device).expand_as(p_sorted)
    marked = torch.where(last_of_run, index, torch.full_like(index, n)).flip(-1)
    run_end = torch.cummin(marked, dim=-1).values.flip(-1)
    cumulative = torch.cumsum(p_sorted, dim=-1)
    return (torch.gather(cumulative, -1, run_end) <= mu) | (p_sorted == p_sorted[..., :1])


def _tempered(func: str, student_logits, teacher_logits, mask, temperature, normalizer, reduction, **own
              ) -> _LogProbs:
    """Options (signature order), then the validated inputs and their log-softmaxes at temperature τ."""
    normalizer = options(func, **own, temperature=temperature, normalizer=normalizer, reduction=reduction)["normalizer"]
    x = token_inputs(func, student_logits, teacher_logits, mask, normalizer=normalizer, reduction=reduction,
                     temperature=temperature)
    return _LogProbs(torch.log_softmax(x.student, dim=-1), torch.log_softmax(x.teacher, dim=-1), x.mask,
                     x.denominator)


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, normalizer: float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """``dpkd.spec.cross_entropy`` in PyTorch: token cross-entropy of a model on dataset labels (SFT / LM loss;
    spec/README.md §5 "SFT", §7 CE_D). Formula, arguments, errors and references: the spec function. Dtypes and checks:
    ``dpkd.backends.torch``.

    Example:
        >>> import torch
        >>> round(cross_entropy(torch.zeros(1, 2, 4), torch.tensor([[1, -100]])).item(), 4)   # log 4
        1.3863
    """
    func = "cross_entropy"
    o = options(func, ignore_index=ignore_index, normalizer=normalizer, reduction=reduction)
    ignore, normalizer = o["ignore_index"], o["normalizer"]
    per_token, keep = _token_logps(func, logits, labels, ignore, presence=False,
                                   require_tokens=(reduction == "mean" and normalizer is None))
    if reduction == "none":
        return -per_token
    total = -per_token.sum()
    if reduction == "sum":
        return total
    return total / (normalizer if normalizer is not None else keep.sum().to(per_token.dtype))




def forward_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *, temperature: float = 1.0,
    normalizer: float | None = None, reduction: str = "mean",
) -> torch.Tensor:
    """``dpkd.spec.forward_kl`` in PyTorch: token-level forward KL, KL(p_i‖q_i) (word-level KD; spec/README.md §5, §7
    FKD_Dp). Formula, arguments, errors and references: the spec function. Dtypes and checks: ``dpkd.backends.torch``.

    Example:
        >>> import torch
        >>> forward_kl(torch.zeros(1, 1, 3), torch.zeros(1, 1, 3), torch.ones(1, 1)).item()
        0.0
    """
    lp = _tempered("forward_kl", student_logits, teacher_logits, mask, temperature, normalizer, reduction)
    return reduce_tokens(kl_divergence(lp.log_p, lp.log_q), lp.mask, reduction, lp.denominator)


def reverse_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *, temperature: float = 1.0,
    normalizer: float | None = None, reduction: str = "mean",
) -> torch.Tensor:
    """``dpkd.spec.reverse_kl`` in PyTorch: token-level reverse KL, KL(q_i‖p_i) (spec/README.md §5 "Reverse KL").
    Formula, arguments, errors and references: the spec function. Dtypes and checks: ``dpkd.backends.torch``.

    Example:
        >>> import torch
        >>> reverse_kl(torch.zeros(1, 1, 3), torch.zeros(1, 1, 3), torch.ones(1, 1)).item()
        0.0
    """
    lp = _tempered("reverse_kl", student_logits, teacher_logits, mask, temperature, normalizer, reduction)
    return reduce_tokens(kl_divergence(lp.log_q, lp.log_p), lp.mask, reduction, lp.denominator)


def generalized_jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *, beta: float = 0.5,
    temperature: float = 1.0, normalizer: float | None = None, reduction: str = "mean",
) -> torch.Tensor:
    """``dpkd.spec.generalized_jsd`` in PyTorch: generalised Jensen–Shannon divergence, TRL's GKD convention
    (spec/README.md §5; Agarwal et al. 2024). Formula, arguments, errors and references: the spec function. Dtypes and
    checks: ``dpkd.backends.torch``.

    Example:
        >>> import torch
        >>> generalized_jsd(torch.zeros(1, 1, 3), torch.zeros(1, 1, 3), torch.ones(1, 1)).item()
        0.0
    """
    lp = _tempered("generalized_jsd", student_logits, teacher_logits, mask, temperature, normalizer, reduction,
                   beta=beta)
    log_q, log_p = lp.log_q, lp.log_p
    if beta == 0.0:
        per_token = kl_divergence(log_p, log_q)
    elif beta == 1.0:
        per_token = kl_divergence(log_q, log_p)
    else:
        log_m = torch.logaddexp(log_q + math.log(1.0 - beta), log_p + math.log(beta))
        per_token = beta * kl_divergence(log_p, log_m) + (1.0 - beta) * kl_divergence(log_q, log_m)
    return reduce_tokens(per_token, lp.mask, reduction, lp.denominator)


def akl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *, mu: float = 0.5,
    temperature: float = 1.0, normalizer: float | None = None, reduction: str = "mean",
) -> torch.Tensor:
    """``dpkd.spec.akl`` in PyTorch: adaptive KL (AKL; Wu et al. 2024, official ``wutaiqiang/LLM_KD_AKL/AKL.py``;
    spec/README.md §5). Formula, arguments, errors and references: the spec function. Dtypes and checks:
    ``dpkd.backends.torch``.

    Example:
        >>> import torch
        >>> akl(torch.zeros(1, 1, 3), torch.zeros(1, 1, 3), torch.ones(1, 1)).item()
        0.0
    """
    lp = _tempered("akl", student_logits, teacher_logits, mask, temperature, normalizer, reduction, mu=mu)
    log_q, log_p = lp.log_q, lp.log_p
    with torch.no_grad():
        p, q = log_p.exp(), log_q.exp()
        p_sorted, order = torch.sort(p, dim=-1, descending=True, stable=True)
        head = _akl_head_sorted(p_sorted, mu)
        gap = torch.gather((p - q).abs(), -1, order)
        g_head = (gap * head).sum(dim=-1)
        g_tail = (gap * ~head).sum(dim=-1)
        total = g_head + g_tail
        w_head = torch.where(total > 0, g_head / torch.where(total > 0, total, 1.0), 0.5)
    per_token = w_head * kl_divergence(log_p, log_q) + (1.0 - w_head) * kl_divergence(log_q, log_p)
    return reduce_tokens(per_token, lp.mask, reduction, lp.denominator)
