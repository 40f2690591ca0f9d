"""What every Megatron-Core ``GPTModel`` the project builds shares (OPT and Llama family alike).

* ``SDPACoreAttention`` replaces Megatron's local ``DotProductAttention``: the same math through
  ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU) with
  grouped-query attention; unlike the local module it allocates nothing on ``torch.cuda.current_device()``
  and needs no CUDA RNG tracker, so one model definition runs on GPUs and on CPU test machines alike.
* ``transformer_config`` — a ``TransformerConfig`` with every fusion flag off (they need apex or
  Transformer Engine and change no number) and sequence parallelism off (it needs them too).
* ``local_layer_spec`` — Megatron-Core's local (no Transformer Engine) layer spec with that attention.
* ``padded_vocab_size`` — the vocabulary rounded up so every TP rank holds an equal shard.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = ["SDPACoreAttention", "config_get", "padded_vocab_size", "transformer_config", "local_layer_spec"]


def config_get(config: Any, name: str, default: Any = None) -> Any:
    """``config[name]`` for a dict (a parsed config.json), ``config.name`` for a Hugging Face config object."""
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def padded_vocab_size(vocab_size: int, tp_size: int, multiple: int = 1) -> int:
    """The vocabulary rounded up to a multiple of lcm(``multiple``, ``tp_size``) (equal shards per rank).

    With ``multiple`` a multiple of every TP size in use (the driver's default 128 covers TP ≤ 128 powers
    of two) the padded size, and so a model's random initialisation and its checkpoint shapes, do not
    depend on the TP size. The padded columns are masked by every vocab-parallel primitive when given
    ``vocab_size=`` the true size.
    """
    step = math.lcm(multiple, tp_size)
    return -(-vocab_size // step) * step


class SDPACoreAttention(DotProductAttention):
    """Megatron's core attention computed by ``F.scaled_dot_product_attention``.

    Inputs [s, b, heads_per_partition, head_dim] (key/value: query groups per partition); output
    [s, b, heads_per_partition · head_dim], as DotProductAttention. Query head j of a partition attends with
    key/value group j // (heads / groups), Megatron's and Hugging Face's grouped-query convention.
    ``attention_mask`` (bool, True = masked, broadcastable to [b, heads, s, s]) is honoured when given;
    otherwise causal attention is used. Attention dropout follows ``config.attention_dropout`` in training.
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention supports neither packed sequences nor attention bias")
        group = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if group > 1:
            key = key.repeat_interleave(group, dim=2)
            value = value.repeat_interleave(group, dim=2)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, head_dim]
        dropout = self.config.attention_dropout if self.training else 0.0
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, dropout_p=dropout,
                                                 scale=self.softmax_scale)
        s, b = out.shape[2], out.shape[0]
        return out.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)


def transformer_config(*, bf16: bool = False, use_cpu_initialization: bool = True, dropout: float = 0.0,
                       **architecture: Any) -> TransformerConfig:
    """A TransformerConfig for ``architecture`` (num_layers, hidden_size, …) with the project's fixed choices."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    return TransformerConfig(
        **architecture,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=use_cpu_initialization,
        sequence_parallel=False,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        cross_entropy_loss_fusion=False,
    )


def local_layer_spec(normalization: str) -> ModuleSpec:
    """Megatron-Core's local GPT layer spec with ``SDPACoreAttention`` (``normalization``: LayerNorm | RMSNorm)."""
    spec = get_gpt_layer_local_spec(normalization=normalization)
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec
