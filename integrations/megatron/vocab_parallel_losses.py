"""Vocab-parallel token-level losses: cross-entropy, forward/reverse KL, generalised JSD, token-level DPKD.

Same names and arguments as ``dpkd.backends.torch`` with the prefix ``vocab_parallel_`` (see
integrations/megatron/README.md): the logits are this rank's vocabulary shards [..., T, V_local];
``mask``/``labels`` are global; keyword-only ``group`` and ``vocab_size`` as in ``vocab_parallel``. The loss
is replicated on every rank and its backward gives each rank the exact gradient of its own shards (student AND
teacher: the caller decides what to detach, as in the single-process backend).

Conventions (spec/CONVENTIONS.md): p = softmax(T/τ) (teacher), q = softmax(S/τ) (student), no τ² factor;
reduction "mean" = Σ m ℓ / (normalizer or Σ m), "sum" = Σ m ℓ, "none" = m · ℓ [..., T].
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from dpkd.spec import validation as v
from dpkd.spec.results import TokenPreferenceLoss

from ._collectives import reduce_sum
from ._shard import Shard, check_float, check_labels, check_mask, make_shard, masked_logits
from ._shard import check_finite_shard as _finite
from .vocab_parallel import argmax_shard, gather_owned, log_softmax_shard, logsumexp_shard, token_logps_shard

__all__ = [
    "vocab_parallel_cross_entropy",
    "vocab_parallel_forward_kl",
    "vocab_parallel_reverse_kl",
    "vocab_parallel_generalized_jsd",
    "vocab_parallel_dpkd_token_loss",
]

def _reduce_tokens(func: str, values: torch.Tensor, weights: torch.Tensor, normalizer, reduction: str, name: str):
    """m·ℓ reduced as the spec says; an empty mean without a normalizer is an error (never 0/0)."""
    masked = values * weights
    if reduction == "none":
        return masked
    total = masked.sum()
    if reduction == "sum":
        return total
    if normalizer is not None:
        return total / normalizer
    count = float(weights.sum())
    v.check_nonempty(func, name, count)
    return total / count


def _pair_inputs(func, student, teacher, mask, group, vocab_size) -> tuple[Shard, torch.Tensor]:
    for name, x in (("student_logits", student), ("teacher_logits", teacher), ("mask", mask)):
        if x is None:
            v.fail(func, name, "is required, got None")
    v.check_student_teacher_shapes(func, tuple(student.shape), tuple(teacher.shape), tuple(mask.shape))
    check_float(func, "student_logits", student)
    check_float(func, "teacher_logits", teacher)
    shard = make_shard(func, student, group, vocab_size)
    _finite(func, "student_logits", student, shard)
    _finite(func, "teacher_logits", teacher, shard)
    check_mask(func, "mask", mask)
    return shard, mask


def _options(func: str, **options):
    """The options of ``func`` checked against the spec's declaration of the Torch backend's function of
    the same name (``dpkd.spec.validation.check_options``); returns (reduction, normalizer)."""
    o = v.check_options(func, **options)
    return o["reduction"], o["normalizer"]


def _log_probs(x: torch.Tensor, shard: Shard, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-softmax shard, probability shard), both exactly 0 at padded columns so no −inf ever enters a
    product (0 · −inf would be NaN in the value or in the gradient)."""
    logp = log_softmax_shard(masked_logits(x, shard, temperature), shard)
    if shard.valid is not None:
        logp = logp.masked_fill(~shard.valid, 0.0)
        return logp, torch.exp(logp).masked_fill(~shard.valid, 0.0)
    return logp, torch.exp(logp)


def _kl_per_token(logp, p, logq, shard) -> torch.Tensor:
    """KL(p‖q) per row: Σ_v p (log p − log q), partial sums reduced over ranks (identity backward)."""
    return reduce_sum((p * (logp - logq)).sum(dim=-1), shard.group)


def vocab_parallel_cross_entropy(
    logits_shard: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    normalizer: float | None = None,
    reduction: str = "mean",
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy −log q(label) over vocab-sharded logits (SFT / LM term of the objective).

    Unlike ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy`` it never overwrites its input,
    masks padded columns, and reduces like the spec: mean = Σ ℓ / (normalizer or #non-ignored labels).

    Returns: the reduced loss (replicated), or [..., T] under "none" (0 at ignored positions).
    See also: ``dpkd.backends.torch.cross_entropy``, ``vocab_parallel_token_logps``.
    """
    func = "vocab_parallel_cross_entropy"
    o = v.check_options(func, ignore_index=ignore_index, normalizer=normalizer, reduction=reduction)
    ignore, normalizer, reduction = o["ignore_index"], o["normalizer"], o["reduction"]
    for name, x in (("logits", logits_shard), ("labels", labels)):
        if x is None:
            v.fail(func, name, "is required, got None")
    v.check_logits_labels_shapes(func, tuple(logits_shard.shape), tuple(labels.shape))
    check_float(func, "logits", logits_shard)
    shard = make_shard(func, logits_shard, group, vocab_size)
    _finite(func, "logits", logits_shard, shard)
    check_labels(func, labels, shard, ignore)
    logps = token_logps_shard(masked_logits(logits_shard, shard), labels, shard, ignore)
    keep = (labels != ignore).to(logps.dtype)
    return _reduce_tokens(func, -logps, keep, normalizer, reduction, "labels")


def vocab_parallel_forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    normalizer: float | None = None,
    reduction: str = "mean",
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Forward KL(p‖q) = Σ_v p_v (log p_v − log q_v) per token (spec/README.md §5), over vocab shards.

    Args: student_logits, teacher_logits [..., T, V_local] shards; mask [..., T] global.
    Returns: reduced loss (replicated) or [..., T] under "none".
    Example: ``loss = vocab_parallel_forward_kl(s_shard, t_shard.detach(), mask)``.
    See also: ``dpkd.backends.torch.forward_kl``.
    """
    func = "vocab_parallel_forward_kl"
    reduction, normalizer = _options(func, temperature=temperature, normalizer=normalizer, reduction=reduction)
    shard, mask = _pair_inputs(func, student_logits, teacher_logits, mask, group, vocab_size)
    logq, _ = _log_probs(student_logits, shard, temperature)
    logp, p = _log_probs(teacher_logits, shard, temperature)
    per_token = _kl_per_token(logp, p, logq, shard)
    return _reduce_tokens(func, per_token, mask.to(per_token.dtype), normalizer, reduction, "mask")


def vocab_parallel_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    normalizer: float | None = None,
    reduction: str = "mean",
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Reverse KL(q‖p) = Σ_v q_v (log q_v − log p_v) per token, over vocab shards.

    See ``vocab_parallel_forward_kl`` for the arguments; see also ``dpkd.backends.torch.reverse_kl``.
    """
    func = "vocab_parallel_reverse_kl"
    reduction, normalizer = _options(func, temperature=temperature, normalizer=normalizer, reduction=reduction)
    shard, mask = _pair_inputs(func, student_logits, teacher_logits, mask, group, vocab_size)
    logq, q = _log_probs(student_logits, shard, temperature)
    logp, _ = _log_probs(teacher_logits, shard, temperature)
    per_token = _kl_per_token(logq, q, logp, shard)
    return _reduce_tokens(func, per_token, mask.to(per_token.dtype), normalizer, reduction, "mask")


def vocab_parallel_generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    normalizer: float | None = None,
    reduction: str = "mean",
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Generalised JSD (TRL GKD convention, spec/README.md §5) over vocab shards.

    0 < β < 1: M = (1−β) q + β p, JSD_β = β KL(p‖M) + (1−β) KL(q‖M); β = 0 → KL(p‖q), β = 1 → KL(q‖p)
    (a documented discontinuity at both end points). log M is formed per column by logaddexp, so it needs
    no communication; one O(N) all-reduce sums the partial rows.

    See ``vocab_parallel_forward_kl`` for the arguments; see also ``dpkd.backends.torch.generalized_jsd``.
    """
    func = "vocab_parallel_generalized_jsd"
    reduction, normalizer = _options(func, beta=beta, temperature=temperature, normalizer=normalizer,
                                     reduction=reduction)
    b = float(beta)
    shard, mask = _pair_inputs(func, student_logits, teacher_logits, mask, group, vocab_size)
    logq, q = _log_probs(student_logits, shard, temperature)
    logp, p = _log_probs(teacher_logits, shard, temperature)
    if b == 0.0:
        per_token = _kl_per_token(logp, p, logq, shard)
    elif b == 1.0:
        per_token = _kl_per_token(logq, q, logp, shard)
    else:
        log_m = torch.logaddexp(logq + math.log(1.0 - b), logp + math.log(b))
        partial = b * p * (logp - log_m) + (1.0 - b) * q * (logq - log_m)
        per_token = reduce_sum(partial.sum(dim=-1), shard.group)
    return _reduce_tokens(func, per_token, mask.to(per_token.dtype), normalizer, reduction, "mask")


def vocab_parallel_dpkd_token_loss(
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
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
) -> TokenPreferenceLoss:
    """Token-level DPKD of the released code (spec/README.md §4) over vocab-sharded logits.

    Symbols: Q = log_softmax(S), P = log_softmax(T); y^t = argmax T, y^s = argmax S (global, ties → lowest
    index); a = Q[y^t], b = Q[y^s], c = P[y^t], d = P[y^s]; h = (a − b) − (c − d) (reference_free: a − b).
    Per token: sigmoid (1−ε) softplus(−βh) + ε softplus(βh); ipo (h − 1/(2β))²; dpop softplus(−βh) +
    λ max(0, c − a).

    Communication: 2 argmaxes (2 collectives each), 2 logsumexps (MAX + SUM each) and ONE all-reduce of the
    four owner-gathered logits — all O(N).

    Args: student_logits, teacher_logits [..., T, V_local] shards; mask [..., T] global (bool or 0/1).
    Returns: ``TokenPreferenceLoss(loss, agreement_rate, chosen_rewards, rejected_rewards)``, replicated;
    rewards β(a−c)·m, β(b−d)·m detached.
    Example: ``out = vocab_parallel_dpkd_token_loss(s_shard, t_shard.detach(), labels != -100)``.
    See also: ``dpkd.backends.torch.dpkd_token_loss``.
    """
    func = "vocab_parallel_dpkd_token_loss"
    o = v.check_options(func, beta=beta, form=form, label_smoothing=label_smoothing, reference_free=reference_free,
                        lambda_=lambda_, normalizer=normalizer, reduction=reduction)
    beta, eps, lam = o["beta"], o["label_smoothing"], o["lambda_"]
    normalizer, reduction = o["normalizer"], o["reduction"]
    shard, mask = _pair_inputs(func, student_logits, teacher_logits, mask, group, vocab_size)

    s = masked_logits(student_logits, shard)
    t = masked_logits(teacher_logits, shard)
    y_t = argmax_shard(t, shard)
    y_s = argmax_shard(s, shard)
    partial = torch.stack(
        [gather_owned(s, y_t, shard), gather_owned(s, y_s, shard),
         gather_owned(t, y_t, shard), gather_owned(t, y_s, shard)], dim=-1,
    )
    s_yt, s_ys, t_yt, t_ys = reduce_sum(partial, shard.group).unbind(dim=-1)
    log_zs, log_zt = logsumexp_shard(s, shard), logsumexp_shard(t, shard)
    a, b, c, d = s_yt - log_zs, s_ys - log_zs, t_yt - log_zt, t_ys - log_zt

    h = (a - b) if reference_free else (a - b) - (c - d)
    if form == "sigmoid":
        per_token = (1.0 - eps) * F.softplus(-beta * h) + eps * F.softplus(beta * h)
    elif form == "ipo":
        per_token = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        per_token = F.softplus(-beta * h) + lam * torch.relu(c - a)

    m = mask.to(per_token.dtype)
    loss = _reduce_tokens(func, per_token, m, normalizer, reduction, "mask")
    agree = (m * (y_t == y_s).to(m.dtype)).sum() / torch.clamp(m.sum(), min=1.0)
    chosen = (beta * (a - c) * m).detach()
    rejected = (beta * (b - d) * m).detach()
    return TokenPreferenceLoss(loss, agree.detach(), chosen, rejected)
