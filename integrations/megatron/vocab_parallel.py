"""Vocab-parallel log-probabilities, argmax and sampling over a tensor-parallel group.

See integrations/megatron/README.md, "Vocab-parallel primitives".

Each function is ``dpkd.backends.torch``'s function of the same name with the prefix ``vocab_parallel_``:
its logits argument is this rank's vocabulary shard ``[..., V_local]`` (Megatron-Core's
``parallel_output=True`` layout: rank r holds global columns [r·V_local, (r+1)·V_local)); labels and masks
are global (the same on every rank). The result is the full value on every rank (replicated) and its
backward gives each rank the exact gradient of its own shard. Keyword-only ``group`` (default:
Megatron-Core's tensor-model-parallel group) and ``vocab_size`` (the true vocabulary size when the sharded
one is padded to a multiple of TP: the padded columns are masked to −inf).

Collectives: O(N) floats each for N rows; never an all-gather of [N, V]. See ``_collectives`` for the
gradient convention (and integrations/megatron/README.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from dpkd.spec import validation as v

from ._collectives import all_reduce_max, all_reduce_min, all_reduce_sum_no_grad, reduce_sum
from ._shard import Shard, check_finite_shard, check_float, check_labels, make_shard, masked_logits

__all__ = [
    "vocab_parallel_logsumexp",
    "vocab_parallel_log_softmax",
    "vocab_parallel_token_logps",
    "vocab_parallel_sequence_logps",
    "vocab_parallel_argmax",
    "vocab_parallel_sample",
]


# --------------------------------------------------------------------------------------------------
# Building blocks (operate on already-masked compute-dtype shards; shared with the loss modules)


def logsumexp_shard(xm: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Replicated logsumexp over the global row: m = max_r max(x_r) (no gradient: it cancels),
    logZ = m + log Σ_r Σ exp(x_r − m) with an identity-backward SUM (replicated convention)."""
    m = all_reduce_max(xm.amax(dim=-1), shard.group)
    s = reduce_sum(torch.exp(xm - m.unsqueeze(-1)).sum(dim=-1), shard.group)
    return m + torch.log(s)


class _LogSoftmaxShard(torch.autograd.Function):
    """Log-softmax of the global row, returned as this rank's shard.

    Its output is a shard (each entry used only by the rank that holds it), so the incoming gradient g_r is
    the true gradient of this rank's entries; the exact backward g − softmax · Σ_v g_v needs the global sum
    Σ_v g_v: one O(N) all-reduce."""

    @staticmethod
    def forward(ctx, xm: torch.Tensor, shard: Shard) -> torch.Tensor:
        with torch.no_grad():
            out = xm - logsumexp_shard(xm, shard).unsqueeze(-1)
        ctx.shard = shard
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (out,) = ctx.saved_tensors
        shard: Shard = ctx.shard
        if shard.valid is not None:
            g = g.masked_fill(~shard.valid, 0.0)
        total = all_reduce_sum_no_grad(g.sum(dim=-1), shard.group)
        return g - torch.exp(out) * total.unsqueeze(-1), None


def log_softmax_shard(xm: torch.Tensor, shard: Shard) -> torch.Tensor:
    return _LogSoftmaxShard.apply(xm, shard)


def gather_owned(xm: torch.Tensor, index: torch.Tensor, shard: Shard, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per-rank partial of x[..., index] (global indices): the owner contributes the value, others 0.

    Sum the result over ranks (``reduce_sum``) to get the replicated gathered value; the gradient then
    reaches only the owner's entry, which is exact (``_collectives``)."""
    local = index - shard.start
    owned = (local >= 0) & (local < shard.local)
    if keep is not None:
        owned = owned & keep
    picked = xm.gather(-1, torch.where(owned, local, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(owned, picked, torch.zeros_like(picked))


def argmax_shard(xm: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Global argmax (int64, replicated), ties → lowest global index, as single-process ``torch.argmax``."""
    xd = xm.detach()
    local_max, local_idx = xd.max(dim=-1)  # the first maximal index within the shard
    global_max = all_reduce_max(local_max, shard.group)
    sentinel = torch.iinfo(torch.int64).max
    candidate = torch.where(local_max == global_max, local_idx + shard.start, torch.full_like(local_idx, sentinel))
    return all_reduce_min(candidate, shard.group)


def _logits_arg(func: str, logits: torch.Tensor, group, vocab_size, name: str = "logits", min_ndim: int = 1) -> Shard:
    if logits is None:
        v.fail(func, name, "is required, got None")
    check_float(func, name, logits)
    if logits.ndim < min_ndim:
        v.fail(func, name, f"must have at least {min_ndim} dims, got shape {tuple(logits.shape)}")
    shard = make_shard(func, logits, group, vocab_size)
    check_finite_shard(func, name, logits, shard)
    return shard


# --------------------------------------------------------------------------------------------------
# Public primitives


def vocab_parallel_logsumexp(
    logits_shard: torch.Tensor, *, group: dist.ProcessGroup | None = None, vocab_size: int | None = None
) -> torch.Tensor:
    """logsumexp over the global (sharded) vocabulary, replicated on every rank.

    Formula: m = max_v ℓ_v (all-reduce MAX, no gradient), logZ = m + log Σ_v exp(ℓ_v − m) (all-reduce SUM).

    Args:
        logits_shard: [..., V_local] this rank's shard. group, vocab_size: see the module docstring.
    Returns:
        [...] in float32 (float64 for float64 input), the same on every rank; its gradient w.r.t. this
        rank's shard is softmax restricted to the shard.
    Example:
        >>> logz = vocab_parallel_logsumexp(logits_shard)   # inside an initialised TP group
    See also: ``vocab_parallel_log_softmax``, ``torch.logsumexp``.
    """
    func = "vocab_parallel_logsumexp"
    shard = _logits_arg(func, logits_shard, group, vocab_size)
    return logsumexp_shard(masked_logits(logits_shard, shard), shard)


def vocab_parallel_log_softmax(
    logits_shard: torch.Tensor, *, group: dist.ProcessGroup | None = None, vocab_size: int | None = None
) -> torch.Tensor:
    """This rank's shard of the log-softmax over the global vocabulary: ℓ_v − logsumexp_u ℓ_u.

    Args:
        logits_shard: [..., V_local]. group, vocab_size: see the module docstring.
    Returns:
        [..., V_local] (float32, or float64 for float64 input); padded columns are −inf. The backward is
        exact for any downstream use of the shard (one O(N) all-reduce of Σ_v grad_v).
    Example:
        >>> logq_shard = vocab_parallel_log_softmax(student_logits_shard)
    See also: ``vocab_parallel_logsumexp``, ``vocab_parallel_token_logps``.
    """
    func = "vocab_parallel_log_softmax"
    shard = _logits_arg(func, logits_shard, group, vocab_size)
    return log_softmax_shard(masked_logits(logits_shard, shard), shard)


def vocab_parallel_token_logps(
    logits_shard: torch.Tensor,
    labels: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-token log q(label) over a vocab-sharded logits tensor; 0 where ``labels == ignore_index``.

    Formula (spec/README.md §1): o_j = m_j (ℓ_{j, y_j} − logZ_j), with ℓ_{j, y_j} gathered by the owning rank
    (others contribute 0) and summed over ranks, and logZ from ``vocab_parallel_logsumexp``.

    Args:
        logits_shard: [..., T, V_local] this rank's shard. labels: [..., T] global int labels, already
            aligned with the logits (see ``dpkd.backends.torch.shift_for_causal_lm``).
    Returns:
        [..., T] replicated (float32, or float64 for float64 input). Gradient w.r.t. this rank's shard:
        g · (onehot_owned − softmax_shard).
    Example:
        >>> logps = vocab_parallel_token_logps(output_shard, labels)   # [B, T]
    See also: ``dpkd.backends.torch.token_logps`` (the single-process function it equals).
    """
    func = "vocab_parallel_token_logps"
    ignore = v.check_options(func, ignore_index=ignore_index)["ignore_index"]
    if labels is None:
        v.fail(func, "labels", "is required, got None")
    if logits_shard is None:
        v.fail(func, "logits", "is required, got None")
    v.check_logits_labels_shapes(func, tuple(logits_shard.shape), tuple(labels.shape))
    shard = _logits_arg(func, logits_shard, group, vocab_size)
    check_labels(func, labels, shard, ignore)
    return token_logps_shard(masked_logits(logits_shard, shard), labels, shard, ignore)


def token_logps_shard(xm: torch.Tensor, labels: torch.Tensor, shard: Shard, ignore_index: int) -> torch.Tensor:
    keep = labels != ignore_index
    target = reduce_sum(gather_owned(xm, labels, shard, keep), shard.group)
    out = target - logsumexp_shard(xm, shard)
    return torch.where(keep, out, torch.zeros_like(out))


def vocab_parallel_sequence_logps(
    logits_shard: torch.Tensor,
    labels: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_j log q(y_j), number of non-ignored labels) per row — the inputs of the sequence-level losses.

    Feed the summed log-probs (student = policy, teacher = reference; chosen = teacher output y_t,
    rejected = student output y_s) to ``dpkd.backends.torch.dpkd_loss`` and its siblings: those act on
    replicated per-sequence scalars and need no tensor-parallel variant.

    Returns:
        (sum_logps [...], n_tokens [...] int64), both replicated.
    Example:
        >>> a, n_t = vocab_parallel_sequence_logps(student_on_yt_shard, yt_labels)
        >>> b, n_s = vocab_parallel_sequence_logps(student_on_ys_shard, ys_labels)
        >>> loss = dpkd_loss(a, b, c, d, chosen_lengths=n_t, rejected_lengths=n_s).loss
    See also: ``dpkd.backends.torch.sequence_logps``, ``vocab_parallel_token_logps``.
    """
    func = "vocab_parallel_sequence_logps"
    ignore = v.check_options(func, ignore_index=ignore_index)["ignore_index"]
    if labels is None:
        v.fail(func, "labels", "is required, got None")
    if logits_shard is None:
        v.fail(func, "logits", "is required, got None")
    v.check_logits_labels_shapes(func, tuple(logits_shard.shape), tuple(labels.shape))
    shard = _logits_arg(func, logits_shard, group, vocab_size)
    check_labels(func, labels, shard, ignore)
    per_token = token_logps_shard(masked_logits(logits_shard, shard), labels, shard, ignore)
    return per_token.sum(dim=-1), (labels != ignore).sum(dim=-1).to(torch.int64)


def vocab_parallel_argmax(
    logits_shard: torch.Tensor, *, group: dist.ProcessGroup | None = None, vocab_size: int | None = None
) -> torch.Tensor:
    """Global argmax over a vocab-sharded last axis, ties → the lowest global index.

    Two O(N) collectives: all-reduce MAX of the local maxima, then all-reduce MIN of the global indices of
    the ranks that attain it. Padded columns never win.

    Returns:
        [...] int64 global token ids, replicated. Example: ``greedy = vocab_parallel_argmax(shard[:, -1])``.
    See also: ``torch.argmax``, ``vocab_parallel_sample``.
    """
    func = "vocab_parallel_argmax"
    shard = _logits_arg(func, logits_shard, group, vocab_size)
    return argmax_shard(masked_logits(logits_shard, shard), shard)


def vocab_parallel_sample(
    logits_shard: torch.Tensor,
    *,
    temperature: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Sample a token from softmax(ℓ/τ) over the global vocabulary (Gumbel-max), identical on every rank.

    Gumbel-max: y = argmax_v (ℓ_v/τ + G_v), G_v = −log(−log U_v), U_v ~ Uniform(0, 1) i.i.d.; y is then
    distributed as softmax(ℓ/τ). Every rank draws the noise of the full padded row [..., TP·V_local] from
    ``generator`` and keeps its own columns, so with the generator in the same state on every rank (pass
    one seeded identically, or keep the default generator in step, as Megatron seeds it within a TP group)
    the sample does not depend on the TP size at all. ``generator`` may also be a list with one generator
    per row (leading dims flattened): a row's draw then depends only on its own generator, which makes
    sampling independent of how rows are split over data-parallel ranks too. The result is the same on
    every rank in any case: each column's noise is read only by its owner and the argmax is all-reduced.

    Memory: the noise is [..., TP·V_local] float64 per call; sampling is used on one position per row
    (generation), so that is B × V — not N × V.

    Returns:
        [...] int64 token ids, replicated. Example: ``tok = vocab_parallel_sample(shard[:, -1], generator=g)``.
    See also: ``vocab_parallel_argmax``, ``torch.multinomial``.
    """
    func = "vocab_parallel_sample"
    tau = v.check_scalar(func, "temperature", temperature, low=0.0)
    shard = _logits_arg(func, logits_shard, group, vocab_size)
    xm = masked_logits(logits_shard, shard).detach().to(torch.float64) / tau
    full_shape = (*xm.shape[:-1], shard.local * shard.world)
    if isinstance(generator, (list, tuple)):
        rows = math.prod(xm.shape[:-1])
        if len(generator) != rows:
            v.fail(func, "generator", f"has {len(generator)} generators, expected one per row ({rows})")
        u = torch.stack([torch.rand(full_shape[-1], generator=g, dtype=torch.float64, device=xm.device)
                         for g in generator]).reshape(full_shape)
    else:
        u = torch.rand(full_shape, generator=generator, dtype=torch.float64, device=xm.device)
    u = u[..., shard.start : shard.start + shard.local].clamp(min=torch.finfo(torch.float64).tiny)
    return argmax_shard(xm - torch.log(-torch.log(u)), shard)
