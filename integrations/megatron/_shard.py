"""Where this rank's vocabulary shard sits in the global vocabulary, and the checks every primitive shares.

Megatron-Core splits a (padded) vocabulary of V_pad = TP · V_local columns into equal contiguous shards:
rank r holds global columns [r · V_local, (r + 1) · V_local). When the true vocabulary V is smaller than
V_pad (Megatron pads it to a multiple of TP), the columns ≥ V are padding: they are masked to −inf before
anything else, so they carry no probability mass and never win an argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from dpkd.spec import validation as v

from ._collectives import all_true, group_rank_and_size, resolve_group

__all__ = [
    "Shard",
    "make_shard",
    "compute_dtype",
    "masked_logits",
    "check_float",
    "check_finite_shard",
    "check_mask",
    "check_labels",
]


@dataclass(frozen=True)
class Shard:
    group: dist.ProcessGroup
    rank: int
    world: int
    start: int  # global index of this shard's first column
    local: int  # V_local
    vocab: int  # the true vocabulary size V (≤ world · local)
    valid: torch.Tensor | None  # [V_local] bool, True for real columns; None when the shard has no padding


def make_shard(func: str, x: torch.Tensor, group: dist.ProcessGroup | None, vocab_size: object) -> Shard:
    """Shard geometry of ``x`` (a [..., V_local] logits shard) over ``group``."""
    g = resolve_group(group)
    rank, world = group_rank_and_size(g)
    local = int(x.shape[-1])
    padded = local * world
    if vocab_size is None:
        vocab = padded
    else:
        vocab = v.check_int_scalar(func, "vocab_size", vocab_size, low=1)
        if vocab > padded:
            v.fail(func, "vocab_size", f"must be <= the sharded vocabulary {padded} ({world} x {local}), got {vocab}")
    start = rank * local
    valid = None
    if start + local > vocab:
        valid = torch.arange(start, start + local, device=x.device) < vocab
    return Shard(g, rank, world, start, local, vocab, valid)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 math for float64 input, float32 for everything else (bf16/fp16 are upcast, as in the spec)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_logits(x: torch.Tensor, shard: Shard, temperature: float = 1.0) -> torch.Tensor:
    """``x`` in the compute dtype, divided by the temperature, with padded columns set to −inf."""
    out = x.to(compute_dtype(x.dtype))
    if temperature != 1.0:
        out = out / temperature
    if shard.valid is not None:
        out = out.masked_fill(~shard.valid, float("-inf"))
    return out


def check_float(func: str, name: str, x: torch.Tensor) -> None:
    v.check_floating_dtype(func, name, x.is_floating_point(), x.dtype)


def check_finite_shard(func: str, name: str, x: torch.Tensor, shard: Shard) -> None:
    """NaN/Inf anywhere in any rank's shard raises on every rank (never a hang, never a silent NaN)."""
    if x.is_meta:  # value checks need values; meta tensors (memory planning) carry shapes only
        return
    v.check_finite(func, name, all_true(bool(torch.isfinite(x).all()), shard.group, x.device))


def check_mask(func: str, name: str, mask: torch.Tensor) -> torch.Tensor:
    """A replicated bool or 0/1 mask → float mask (the same verdict on every rank: masks are global)."""
    if mask.dtype != torch.bool and not mask.is_meta:
        v.check_binary_mask(func, name, bool(((mask == 0) | (mask == 1)).all()))
    return mask


def check_labels(func: str, labels: torch.Tensor, shard: Shard, ignore_index: int, name: str = "labels") -> None:
    v.check_integer_dtype(func, name, not labels.is_floating_point() and labels.dtype != torch.bool, labels.dtype)
    if labels.is_meta:
        return
    keep = labels != ignore_index
    in_vocab = (labels >= 0) & (labels < shard.vocab)
    v.check_labels_in_vocab(func, name, bool((in_vocab | ~keep).all()), shard.vocab, ignore_index)
