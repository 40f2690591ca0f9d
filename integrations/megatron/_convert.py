"""Pieces every Hugging Face ↔ Megatron-Core converter shares: TP slicing, vocabulary padding, key lookup,
and loading a converted state dict into a GPTModel with every key and shape checked."""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["split", "pad_rows", "hf_tensor", "load_converted"]


def split(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous 1/``size`` part of ``t`` along ``dim`` (a copy)."""
    if t.shape[dim] % size:
        raise ValueError(f"cannot shard a dimension of {t.shape[dim]} over tensor-parallel size {size}")
    return t.chunk(size, dim=dim)[rank].clone()


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with zero rows appended up to ``rows`` rows (the padded vocabulary)."""
    if rows < t.shape[0]:
        raise ValueError(f"cannot pad {t.shape[0]} rows down to {rows}")
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if rows > t.shape[0] else t


def hf_tensor(state: Mapping[str, torch.Tensor], key: str, family: str) -> torch.Tensor:
    """``state[key]``, or ``state[key without "model."]`` (checkpoints of the bare model, without LM head)."""
    if key in state:
        return state[key]
    if key.startswith("model.") and key[len("model."):] in state:
        return state[key[len("model."):]]
    raise KeyError(f"the Hugging Face {family} state dict has no `{key}`")


def load_converted(model: torch.nn.Module, converted: Mapping[str, torch.Tensor], family: str) -> None:
    """Load a converted state dict; every model key but ``*._extra_state`` must be present with its shape."""
    ref = model.state_dict()
    unexpected = [k for k in converted if k not in ref]
    missing = [k for k in ref if k not in converted and not k.endswith("._extra_state")]
    if missing or unexpected:
        raise KeyError(f"{family} conversion mismatch: missing {missing}, unexpected {unexpected}")
    for k, t in converted.items():
        if tuple(t.shape) != tuple(ref[k].shape):
            raise ValueError(f"{family} conversion: `{k}` has shape {tuple(t.shape)}, "
                             f"the model expects {tuple(ref[k].shape)}")
    model.load_state_dict({k: t.to(dtype=ref[k].dtype, device=ref[k].device) for k, t in converted.items()},
                          strict=False)
