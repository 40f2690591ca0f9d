"""The tensor-parallel collectives the vocab-parallel primitives are built from, and their gradient rules.

Convention: **replicated result**. Every rank of the tensor-parallel group ends with the full value of a loss
and calls ``backward`` on it; the backward pass then hands each rank the gradient of its own vocabulary
shard. For that to be exact:

* a SUM reduction of per-shard partial terms into a replicated value has an IDENTITY backward
  (``reduce_sum``): the upstream gradient is the same on every rank, and each rank's partial term only
  depends on its own shard;
* a MAX reduction is used only for a numerically-stabilising shift that cancels mathematically, so it
  carries no gradient (``all_reduce_max`` takes detached input);
* a replicated value must never feed back into a per-shard partial term that is summed again — that would
  need the gradient contributions of the other ranks. Where a loss needs it (the KL family uses
  log-softmax shards), ``log_softmax_shard`` is a custom autograd function whose backward all-reduces the
  O(N) sum of the incoming shard gradients, which is the exact log-softmax backward over the global row.

Every collective moves O(N) floats for N rows (tokens); nothing of shape [N, V] is ever gathered.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "resolve_group",
    "group_rank_and_size",
    "reduce_sum",
    "all_reduce_max",
    "all_reduce_min",
    "all_reduce_sum_no_grad",
    "all_true",
]


def resolve_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """``group`` itself, or Megatron-Core's tensor-model-parallel group when ``group`` is None."""
    if group is not None:
        return group
    from megatron.core import parallel_state  # deferred: importing megatron.core costs seconds

    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "dpkd.integrations.megatron: no `group` was given and Megatron-Core's model parallel state is "
            "not initialised; call megatron.core.parallel_state.initialize_model_parallel(...) or pass group="
        )
    return parallel_state.get_tensor_model_parallel_group()


def group_rank_and_size(group: dist.ProcessGroup) -> tuple[int, int]:
    return dist.get_rank(group=group), dist.get_world_size(group=group)


class _ReduceSumIdentityBackward(torch.autograd.Function):
    """Forward: all-reduce SUM over the group. Backward: identity (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def reduce_sum(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Σ over ranks of per-shard partials → a replicated value; identity backward (replicated convention)."""
    return _ReduceSumIdentityBackward.apply(x, group)


def all_reduce_max(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out


def all_reduce_min(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MIN, group=group)
    return out


def all_reduce_sum_no_grad(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def all_true(flag: bool, group: dist.ProcessGroup, device: torch.device) -> bool:
    """True on every rank iff ``flag`` is True on every rank.

    A value check on a shard must reach the same verdict on all ranks: if one rank raised and the others
    went on to the next collective, the group would hang."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item() == 1)
