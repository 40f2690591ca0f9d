"""Hugging Face Llama-family state dict (``LlamaForCausalLM``, Mistral, Qwen2) ↔ Megatron-Core GPTModel, any TP.

Mapping for layer i (HF prefix ``model.layers.i.``, Megatron prefix ``decoder.layers.i.``):

    self_attn.{q,k,v}_proj (+ Qwen2 biases) → self_attention.linear_qkv  per query group g:
                                              [q heads of g; k_g; v_g], column-parallel (groups split)
    self_attn.o_proj                        → self_attention.linear_proj  row-parallel
    input_layernorm                         → input_layernorm             replicated
    post_attention_layernorm                → pre_mlp_layernorm           replicated
    mlp.gate_proj, mlp.up_proj              → mlp.linear_fc1              rank r holds [gate_r; up_r]
    mlp.down_proj                           → mlp.linear_fc2              row-parallel
    model.embed_tokens                      → embedding.word_embeddings   vocab rows, padded with zeros, split
    model.norm                              → decoder.final_layernorm     replicated
    lm_head (untied)                        → output_layer                vocab rows, padded with zeros, split
    lm_head (tied)                          → the word embedding itself (share_embeddings_and_output_weights)

Grouped-query attention: Megatron's fused QKV stores, per query group, that group's heads/groups query
heads followed by its key and value head, so a contiguous split of the rows hands each TP rank whole groups.
When TP does not divide the groups, all-zero groups are appended (``llama_model``: exact). SwiGLU: Megatron
splits each rank's ``linear_fc1`` output in two halves (gate, up), so rank r's rows are gate's r-th part
followed by up's r-th part, not a contiguous slice of [gate; up].

The conversion is a linear map of each tensor, so the same functions convert gradients. Megatron → HF drops
the vocabulary padding and the zero groups (refusing groups that are not zero), so HF → Megatron → HF is
exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._convert import hf_tensor, load_converted, pad_rows, split
from .gpt_common import padded_vocab_size
from .llama_model import LlamaShape

__all__ = ["hf_to_megatron", "megatron_to_hf", "load_hf_state_dict"]

_FAMILY = "Llama"
_REPLICATED = {"input_layernorm.weight": "input_layernorm.weight",
               "pre_mlp_layernorm.weight": "post_attention_layernorm.weight"}


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: LlamaShape, groups: int) -> torch.Tensor:
    """HF's q [heads·d, …], k, v [kv_heads·d, …] → Megatron's [groups·(r + 2)·d, …] with zero padded groups."""
    rest = q.shape[1:]
    g, d, r = shape.num_kv_heads, shape.head_dim, shape.heads_per_group
    fused = torch.cat([q.reshape(g, r * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1)
    return pad_rows(fused, groups).reshape(groups * (r + 2) * d, *rest)


def _unfuse_qkv(qkv: torch.Tensor, shape: LlamaShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d, r = shape.num_kv_heads, shape.head_dim, shape.heads_per_group
    rest = qkv.shape[1:]
    per_group = qkv.reshape(-1, (r + 2) * d, *rest)
    _check_zero(per_group[g:], "linear_qkv")
    per_group = per_group[:g]
    q = per_group[:, : r * d].reshape(g * r * d, *rest).clone()
    k = per_group[:, r * d:(r + 1) * d].reshape(g * d, *rest).clone()
    v = per_group[:, (r + 1) * d:].reshape(g * d, *rest).clone()
    return q, k, v


def _pad_proj(o: torch.Tensor, shape: LlamaShape, groups: int) -> torch.Tensor:
    """o_proj [h, heads·d] → [h, groups·r·d] (zero columns for the padded groups)."""
    cols = shape.heads_per_group * shape.head_dim
    return torch.cat([o, o.new_zeros(o.shape[0], (groups - shape.num_kv_heads) * cols)], dim=1)


def _check_zero(padding: torch.Tensor, name: str) -> None:
    if padding.numel() and bool(padding.ne(0).any()):
        raise ValueError(f"the padded query groups of `{name}` are not zero: this is not a padded Llama model")


def _groups(shape: LlamaShape, tp_size: int, query_groups: int | None) -> int:
    groups = shape.query_groups(tp_size) if query_groups is None else query_groups
    if groups < shape.num_kv_heads or groups % tp_size:
        raise ValueError(f"query_groups={groups} must be >= num_key_value_heads={shape.num_kv_heads} and "
                         f"divisible by tensor-parallel size {tp_size}")
    return groups


def hf_to_megatron(
    hf_state: Mapping[str, torch.Tensor],
    shape: LlamaShape,
    *,
    tp_rank: int,
    tp_size: int,
    vocab_multiple: int = 1,
    query_groups: int | None = None,
) -> dict[str, torch.Tensor]:
    """This TP rank's GPTModel state dict (without ``_extra_state`` entries) from an HF Llama-family state dict.

    Args:
        hf_state: ``LlamaForCausalLM.state_dict()`` or any mapping of the same names (``hf_weights``' lazy
            safetensors view reads one tensor at a time).
        shape: ``llama_shape(hf_config)``.
        tp_rank, tp_size: this rank and the tensor-parallel size; vocab_multiple: as ``padded_vocab_size``;
        query_groups: the (padded) group count of the target model (default ``shape.query_groups(tp_size)``).
    Example:
        >>> load_hf_state_dict(model, hf.state_dict(), llama_shape(hf.config), tp_rank=r, tp_size=2)  # doctest: +SKIP
    """
    groups = _groups(shape, tp_size, query_groups)
    get = lambda key: hf_tensor(hf_state, key, _FAMILY)  # noqa: E731
    vocab_padded = padded_vocab_size(shape.vocab_size, tp_size, vocab_multiple)
    out = {"embedding.word_embeddings.weight": split(pad_rows(get("model.embed_tokens.weight"), vocab_padded), 0,
                                                     tp_rank, tp_size),
           "decoder.final_layernorm.weight": get("model.norm.weight").clone()}
    if not shape.tied_embeddings:
        out["output_layer.weight"] = split(pad_rows(get("lm_head.weight"), vocab_padded), 0, tp_rank, tp_size)
    for i in range(shape.num_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        kinds = ("weight", "bias") if shape.qkv_bias else ("weight",)
        for kind in kinds:
            qkv = _fuse_qkv(*(get(f"{hf}self_attn.{x}_proj.{kind}") for x in "qkv"), shape, groups)
            out[f"{mg}self_attention.linear_qkv.{kind}"] = split(qkv, 0, tp_rank, tp_size)
        proj = _pad_proj(get(f"{hf}self_attn.o_proj.weight"), shape, groups)
        out[f"{mg}self_attention.linear_proj.weight"] = split(proj, 1, tp_rank, tp_size)
        gate, up = get(f"{hf}mlp.gate_proj.weight"), get(f"{hf}mlp.up_proj.weight")
        out[f"{mg}mlp.linear_fc1.weight"] = torch.cat([split(gate, 0, tp_rank, tp_size),
                                                       split(up, 0, tp_rank, tp_size)])
        out[f"{mg}mlp.linear_fc2.weight"] = split(get(f"{hf}mlp.down_proj.weight"), 1, tp_rank, tp_size)
        for name, hf_name in _REPLICATED.items():
            out[mg + name] = get(hf + hf_name).clone()
    return out


def megatron_to_hf(shards: Sequence[Mapping[str, Any]], shape: LlamaShape) -> dict[str, torch.Tensor]:
    """An HF ``LlamaForCausalLM`` state dict from the GPTModel state dicts of all TP ranks (in rank order).

    Drops the vocabulary padding and the (zero) padded query groups; a tied model gets no ``lm_head.weight``
    entry (HF ties it to ``model.embed_tokens.weight`` on load).
    """
    def cat(key: str, dim: int) -> torch.Tensor:
        return torch.cat([s[key] for s in shards], dim=dim)

    first = shards[0]
    out = {"model.embed_tokens.weight": cat("embedding.word_embeddings.weight", 0)[: shape.vocab_size].clone(),
           "model.norm.weight": first["decoder.final_layernorm.weight"].clone()}
    if not shape.tied_embeddings:
        out["lm_head.weight"] = cat("output_layer.weight", 0)[: shape.vocab_size].clone()
    cols = shape.num_heads * shape.head_dim
    for i in range(shape.num_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        for kind in ("weight", "bias") if shape.qkv_bias else ("weight",):
            q, k, v = _unfuse_qkv(cat(f"{mg}self_attention.linear_qkv.{kind}", 0), shape)
            for x, t in zip("qkv", (q, k, v)):
                out[f"{hf}self_attn.{x}_proj.{kind}"] = t
        proj = cat(f"{mg}self_attention.linear_proj.weight", 1)
        _check_zero(proj[:, cols:], "linear_proj")
        out[f"{hf}self_attn.o_proj.weight"] = proj[:, :cols].clone()
        halves = [s[f"{mg}mlp.linear_fc1.weight"].chunk(2, dim=0) for s in shards]
        out[f"{hf}mlp.gate_proj.weight"] = torch.cat([h[0] for h in halves])
        out[f"{hf}mlp.up_proj.weight"] = torch.cat([h[1] for h in halves])
        out[f"{hf}mlp.down_proj.weight"] = cat(f"{mg}mlp.linear_fc2.weight", 1)
        for name, hf_name in _REPLICATED.items():
            out[hf + hf_name] = first[mg + name].clone()
    return out


def load_hf_state_dict(model: torch.nn.Module, hf_state: Mapping[str, torch.Tensor], shape: LlamaShape, *,
                       tp_rank: int, tp_size: int, vocab_multiple: int = 1) -> None:
    """Load an HF Llama-family state dict into this rank's GPTModel (built by ``build_llama_gpt_model``)."""
    groups = model.config.num_query_groups
    converted = hf_to_megatron(hf_state, shape, tp_rank=tp_rank, tp_size=tp_size, vocab_multiple=vocab_multiple,
                               query_groups=groups)
    load_converted(model, converted, _FAMILY)
