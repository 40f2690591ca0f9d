"""Hugging Face ``OPTForCausalLM`` state dict ↔ Megatron-Core ``GPTModel`` (OPT configuration), any TP size.

Mapping for layer i, HF prefix ``model.decoder.layers.i.`` and
Megatron prefix ``decoder.layers.i.``:

    self_attn.{q,k,v}_proj          → self_attention.linear_qkv   per-head [q_h; k_h; v_h], column-parallel
    self_attn.out_proj              → self_attention.linear_proj  row-parallel (bias replicated)
    self_attn_layer_norm            → input_layernorm             replicated
    fc1 / fc2                       → mlp.linear_fc1 / linear_fc2 column- / row-parallel
    final_layer_norm                → pre_mlp_layernorm           replicated
    model.decoder.embed_tokens      → embedding.word_embeddings   vocab rows, padded with zeros, sharded
    model.decoder.embed_positions   → embedding.position_embeddings  minus OPT's first 2 (offset) rows
    model.decoder.final_layer_norm  → decoder.final_layernorm     replicated
    lm_head (tied to embed_tokens)  → the shared word embedding (share_embeddings_and_output_weights)

Column-parallel tensors (weights and biases) split along dim 0 and row-parallel weights along dim 1 into
``tp_size`` equal contiguous parts. The same functions convert gradients (they are linear maps), which is
how the tests compare Megatron's gradients with Hugging Face's.

The reverse direction fills OPT's 2 unused offset rows of the position table with zeros (HF never reads
them: positions start at 2), so HF → Megatron → HF is exact on every other entry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._convert import hf_tensor, load_converted, pad_rows, split
from .gpt_common import padded_vocab_size
from .opt_model import OPTShape

__all__ = ["OPT_POSITION_OFFSET", "hf_to_megatron", "megatron_to_hf", "load_hf_state_dict"]

OPT_POSITION_OFFSET = 2
_FAMILY = "OPT"

_COLUMN = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias", "mlp.linear_fc1.weight",
           "mlp.linear_fc1.bias")
_ROW = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
_LAYER_COPIES = {
    "self_attention.linear_proj.bias": "self_attn.out_proj.bias",
    "input_layernorm.weight": "self_attn_layer_norm.weight",
    "input_layernorm.bias": "self_attn_layer_norm.bias",
    "pre_mlp_layernorm.weight": "final_layer_norm.weight",
    "pre_mlp_layernorm.bias": "final_layer_norm.bias",
    "mlp.linear_fc2.bias": "fc2.bias",
}


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's separate q, k, v ([h, h] or [h]) → Megatron's per-head [q_h; k_h; v_h] layout ([3h, h] / [3h])."""
    head_dim = q.shape[0] // heads
    parts = [x.reshape(heads, head_dim, *x.shape[1:]) for x in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(3 * q.shape[0], *q.shape[1:])


def _unfuse_qkv(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = qkv.shape[0] // 3
    per_head = qkv.reshape(heads, 3, hidden // heads, *qkv.shape[1:])
    return tuple(per_head[:, i].reshape(hidden, *qkv.shape[1:]).clone() for i in range(3))  # type: ignore[return-value]


def hf_to_megatron(
    hf_state: Mapping[str, torch.Tensor],
    shape: OPTShape,
    *,
    tp_rank: int,
    tp_size: int,
    vocab_multiple: int = 1,
) -> dict[str, torch.Tensor]:
    """This TP rank's GPTModel state dict (without ``_extra_state`` entries) from an HF OPT state dict.

    Args:
        hf_state: ``OPTForCausalLM.state_dict()`` (or an equivalent mapping, e.g. a safetensors file).
        shape: ``opt_shape(hf_config)`` (which refuses the opt-350m layout).
        tp_rank, tp_size: this rank and the tensor-parallel size; vocab_multiple: as ``padded_vocab_size``.
    Example:
        >>> model.load_state_dict(hf_to_megatron(hf.state_dict(), opt_shape(hf.config), tp_rank=r, tp_size=2),
        ...                       strict=False)   # see load_hf_state_dict, which checks the keys
    """
    if shape.num_heads % tp_size:
        raise ValueError(f"num_attention_heads={shape.num_heads} is not divisible by tensor-parallel size {tp_size}")
    out: dict[str, torch.Tensor] = {}
    emb = hf_tensor(hf_state, "model.decoder.embed_tokens.weight", _FAMILY)
    vocab_padded = padded_vocab_size(shape.vocab_size, tp_size, vocab_multiple)
    out["embedding.word_embeddings.weight"] = split(pad_rows(emb, vocab_padded), 0, tp_rank, tp_size)
    pos = hf_tensor(hf_state, "model.decoder.embed_positions.weight", _FAMILY)
    out["embedding.position_embeddings.weight"] = pos[OPT_POSITION_OFFSET:].clone()
    for name in ("weight", "bias"):
        out[f"decoder.final_layernorm.{name}"] = hf_tensor(hf_state, f"model.decoder.final_layer_norm.{name}",
                                                           _FAMILY).clone()
    for i in range(shape.num_layers):
        hf = f"model.decoder.layers.{i}."
        mg = f"decoder.layers.{i}."
        full = {
            "self_attention.linear_qkv.weight": _fuse_qkv(
                *(hf_tensor(hf_state, f"{hf}self_attn.{x}_proj.weight", _FAMILY) for x in "qkv"), shape.num_heads),
            "self_attention.linear_qkv.bias": _fuse_qkv(
                *(hf_tensor(hf_state, f"{hf}self_attn.{x}_proj.bias", _FAMILY) for x in "qkv"), shape.num_heads),
            "self_attention.linear_proj.weight": hf_tensor(hf_state, f"{hf}self_attn.out_proj.weight", _FAMILY),
            "mlp.linear_fc1.weight": hf_tensor(hf_state, f"{hf}fc1.weight", _FAMILY),
            "mlp.linear_fc1.bias": hf_tensor(hf_state, f"{hf}fc1.bias", _FAMILY),
            "mlp.linear_fc2.weight": hf_tensor(hf_state, f"{hf}fc2.weight", _FAMILY),
        }
        for name, t in full.items():
            dim = 0 if name in _COLUMN else 1
            out[mg + name] = split(t, dim, tp_rank, tp_size)
        for name, hf_name in _LAYER_COPIES.items():
            out[mg + name] = hf_tensor(hf_state, hf + hf_name, _FAMILY).clone()
    return out


def megatron_to_hf(shards: Sequence[Mapping[str, Any]], shape: OPTShape) -> dict[str, torch.Tensor]:
    """An HF ``OPTForCausalLM`` state dict from the GPTModel state dicts of all TP ranks (in rank order).

    The vocabulary padding is dropped; ``lm_head.weight`` is the (tied) word embedding; the 2 offset rows of
    the position table are zeros.
    """
    def cat(key: str, dim: int) -> torch.Tensor:
        return torch.cat([s[key] for s in shards], dim=dim)

    first = shards[0]
    out: dict[str, torch.Tensor] = {}
    emb = cat("embedding.word_embeddings.weight", 0)[: shape.vocab_size].clone()
    out["model.decoder.embed_tokens.weight"] = emb
    out["lm_head.weight"] = emb.clone()
    pos = first["embedding.position_embeddings.weight"]
    out["model.decoder.embed_positions.weight"] = torch.cat([pos.new_zeros(OPT_POSITION_OFFSET, pos.shape[1]), pos])
    for name in ("weight", "bias"):
        out[f"model.decoder.final_layer_norm.{name}"] = first[f"decoder.final_layernorm.{name}"].clone()
    for i in range(shape.num_layers):
        hf = f"model.decoder.layers.{i}."
        mg = f"decoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = _unfuse_qkv(cat(f"{mg}self_attention.linear_qkv.{kind}", 0), shape.num_heads)
            out[f"{hf}self_attn.q_proj.{kind}"], out[f"{hf}self_attn.k_proj.{kind}"] = q, k
            out[f"{hf}self_attn.v_proj.{kind}"] = v
        out[f"{hf}self_attn.out_proj.weight"] = cat(f"{mg}self_attention.linear_proj.weight", 1)
        out[f"{hf}fc1.weight"] = cat(f"{mg}mlp.linear_fc1.weight", 0)
        out[f"{hf}fc1.bias"] = cat(f"{mg}mlp.linear_fc1.bias", 0)
        out[f"{hf}fc2.weight"] = cat(f"{mg}mlp.linear_fc2.weight", 1)
        for name, hf_name in _LAYER_COPIES.items():
            out[hf + hf_name] = first[mg + name].clone()
    return out


def load_hf_state_dict(model: torch.nn.Module, hf_state: Mapping[str, torch.Tensor], shape: OPTShape, *,
                       tp_rank: int, tp_size: int, vocab_multiple: int = 1) -> None:
    """Load an HF OPT state dict into this rank's GPTModel; every key but ``*._extra_state`` must match."""
    converted = hf_to_megatron(hf_state, shape, tp_rank=tp_rank, tp_size=tp_size, vocab_multiple=vocab_multiple)
    load_converted(model, converted, _FAMILY)
