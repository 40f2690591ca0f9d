"""Fused, token-chunked log-probabilities over a vocab-sharded lm_head weight (integrations/megatron/README.md).

``vocab_parallel_linear_token_logps(hidden, weight_shard, labels)`` = ``vocab_parallel_token_logps(hidden @
weight_shardᵀ, labels)`` without ever holding more than ``chunk_size × V_local`` logits: the forward keeps
only the per-token log-prob and logsumexp; the backward recomputes each chunk's logits to form the gradient
of the hidden states and accumulates the weight (and bias) gradient in float32.

Tensor parallelism: ``hidden`` is replicated over the TP group (the input of Megatron's column-parallel
output layer) and ``weight_shard`` is this rank's [V_local, H] rows. Per chunk the forward needs three O(chunk)
all-reduces (MAX and SUM for logZ, SUM for the owner-gathered target logit). Every rank's contribution to
∂/∂hidden is partial, so the backward all-reduces it once — the same [N, H] reduction Megatron's
ColumnParallelLinear performs for the materialised path — and each rank gets the complete, replicated
gradient of ``hidden`` and the exact gradient of its own weight rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from dpkd.spec import validation as v

from ._collectives import all_reduce_max, all_reduce_sum_no_grad
from ._shard import Shard, check_finite_shard, check_float, check_labels, make_shard

__all__ = ["vocab_parallel_linear_token_logps"]

_DEFAULT_BUFFER_FLOATS = 16 * 1024 * 1024  # 64 MiB of float32 logits per chunk


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, shard: Shard) -> torch.Tensor:
    dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    x = h.to(dtype) @ w.to(dtype).t()
    if b is not None:
        x = x + b.to(dtype)
    if shard.valid is not None:
        x = x.masked_fill(~shard.valid, float("-inf"))
    return x


def _owned(labels: torch.Tensor, shard: Shard, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    local = labels - shard.start
    owned = (labels != ignore_index) & (local >= 0) & (local < shard.local)
    return owned, torch.where(owned, local, 0)


class _LinearTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, shard: Shard, chunk_size: int, ignore_index: int):
        n = hidden.shape[0]
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        logps = torch.zeros(n, dtype=dtype, device=hidden.device)
        log_z = torch.zeros(n, dtype=dtype, device=hidden.device)
        with torch.no_grad():
            for lo in range(0, n, chunk_size):
                hi = min(lo + chunk_size, n)
                x = _chunk_logits(hidden[lo:hi], weight, bias, shard)
                m = all_reduce_max(x.amax(dim=-1), shard.group)
                s = all_reduce_sum_no_grad(torch.exp(x - m.unsqueeze(-1)).sum(dim=-1), shard.group)
                owned, idx = _owned(labels[lo:hi], shard, ignore_index)
                picked = x.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
                target = all_reduce_sum_no_grad(torch.where(owned, picked, torch.zeros_like(picked)), shard.group)
                log_z[lo:hi] = m + torch.log(s)
                logps[lo:hi] = torch.where(labels[lo:hi] != ignore_index, target - log_z[lo:hi], 0.0)
        ctx.save_for_backward(hidden, weight, bias, labels, log_z)
        ctx.shard, ctx.chunk_size, ctx.ignore_index = shard, chunk_size, ignore_index
        return logps

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, labels, log_z = ctx.saved_tensors
        shard: Shard = ctx.shard
        n = hidden.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        grad_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=acc, device=bias.device)
        keep = labels != ctx.ignore_index
        g_all = torch.where(keep, grad_out.to(acc), 0.0)
        for lo in range(0, n, ctx.chunk_size):
            hi = min(lo + ctx.chunk_size, n)
            x = _chunk_logits(hidden[lo:hi], weight, bias, shard)
            g = g_all[lo:hi]
            # d logp / d x = onehot_owned − softmax; softmax is exp(x − logZ) and 0 at padded columns.
            grad_x = -torch.exp(x - log_z[lo:hi].unsqueeze(-1)) * g.unsqueeze(-1)
            owned, idx = _owned(labels[lo:hi], shard, ctx.ignore_index)
            grad_x.scatter_add_(-1, idx.unsqueeze(-1), torch.where(owned, g, 0.0).unsqueeze(-1))
            grad_hidden[lo:hi] = grad_x @ weight.to(acc)
            grad_weight.addmm_(grad_x.t(), hidden[lo:hi].to(acc))  # in place: no [V_shard, H] temporary
            if grad_bias is not None:
                grad_bias += grad_x.sum(dim=0)
        # hidden is replicated: its full gradient is the sum of every rank's vocabulary contribution.
        dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=shard.group)
        return (
            grad_hidden.to(hidden.dtype),
            grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None, None, None, None,
        )


def vocab_parallel_linear_token_logps(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Per-token log q(label) with q = softmax(hidden · Wᵀ + b), W sharded over the vocabulary, chunked.

    Formula: o_j = m_j (x_{j, y_j} − logsumexp_v x_{j, v}), x_j = W h_j + b (spec/README.md §1), computed
    ``chunk_size`` tokens at a time; gradients by recomputation (spec/CONVENTIONS.md "The fused lm_head path").

    Args:
        hidden: [..., H] replicated over the TP group (e.g. the final-LayerNorm output of a GPTModel).
        weight_shard: [V_local, H] this rank's rows of the lm_head (``output_layer.weight`` or the tied
            word embedding). bias: optional [V_local] (this rank's rows of the lm_head bias).
        labels: [...] global token ids (``ignore_index`` → 0 output, no gradient).
        chunk_size: tokens per chunk (> 0); the result does not depend on it. Default: as many rows as fit
            a 64 MiB float32 buffer of V_local columns.
    Returns:
        [...] float32 (float64 for float64 input), replicated. Gradients: ``hidden`` complete on every
        rank; ``weight_shard``/``bias`` exact for this rank's rows, in their own dtype.
    Example:
        >>> logps = vocab_parallel_linear_token_logps(h, model.output_layer.weight, labels, chunk_size=2048)
    See also: ``vocab_parallel_token_logps`` (materialised), ``dpkd.backends.torch`` ``linear_token_logps``.
    """
    func = "vocab_parallel_linear_token_logps"
    chunk = v.check_chunk_options(func, chunk_size, ignore_index)
    ignore = int(ignore_index)
    for name, x in (("hidden", hidden), ("weight", weight_shard), ("labels", labels)):
        if x is None:
            v.fail(func, name, "is required, got None")
    check_float(func, "hidden", hidden)
    check_float(func, "weight", weight_shard)
    if weight_shard.ndim != 2:
        v.fail(func, "weight", f"must have shape [V_local, H], got {tuple(weight_shard.shape)}")
    if hidden.ndim < 1 or hidden.shape[-1] != weight_shard.shape[1]:
        v.fail(func, "hidden", f"has shape {tuple(hidden.shape)}, expected [..., {weight_shard.shape[1]}] "
               "(the hidden size of `weight`)")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        v.fail(func, "labels", f"has shape {tuple(labels.shape)}, expected {tuple(hidden.shape[:-1])} "
               "(the shape of `hidden` without its hidden axis)")
    if bias is not None and tuple(bias.shape) != (weight_shard.shape[0],):
        v.fail(func, "bias", f"has shape {tuple(bias.shape)}, expected ({weight_shard.shape[0]},)")
    if chunk is None:
        chunk = max(1, _DEFAULT_BUFFER_FLOATS // max(1, int(weight_shard.shape[0])))
    # the vocabulary axis of the shard is the weight's first axis
    shard = make_shard(func, weight_shard.t(), group, vocab_size)
    check_finite_shard(func, "hidden", hidden, shard)
    check_finite_shard(func, "weight", weight_shard, shard)
    check_labels(func, labels, shard, ignore)
    lead = hidden.shape[:-1]
    flat = _LinearTokenLogps.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight_shard, bias, labels.reshape(-1), shard, chunk, ignore
    )
    return flat.reshape(lead)
