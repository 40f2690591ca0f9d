"""Megatron-Core GPTModel with the OPT architecture (pre-LN OPT: opt-125m, opt-1.3b, … opt-66b).

OPT maps onto GPTModel as (MEGATRON-CPU.md, "OPT in Megatron-Core"): learned absolute positions, ReLU MLP
without gating, LayerNorm ε = 1e-5, biases everywhere, tied input/output embeddings, pre-LN layers. The
project's ``SDPACoreAttention`` replaces Megatron's local DotProductAttention: it is the same math through
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU) and, unlike
the local module, allocates nothing on ``torch.cuda.current_device()`` and needs no CUDA RNG tracker, so one
model definition runs on GPUs and on CPU test machines alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = [
    "OPTShape",
    "UnsupportedOPTLayout",
    "SDPACoreAttention",
    "opt_shape",
    "padded_vocab_size",
    "opt_transformer_config",
    "build_opt_gpt_model",
]


class UnsupportedOPTLayout(ValueError):
    """An OPT checkpoint whose layout GPTModel cannot express (opt-350m: post-LN, project_in/out)."""


@dataclass(frozen=True)
class OPTShape:
    """The architecture numbers of an OPT model (a Hugging Face ``OPTConfig`` reduced to what matters)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    max_positions: int

    @property
    def parameters(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        h, f = self.hidden_size, self.ffn_dim
        per_layer = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h
        return self.vocab_size * h + self.max_positions * h + self.num_layers * per_layer + 2 * h


def _get(config: Any, name: str, default: Any = None) -> Any:
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def opt_shape(config: Any) -> OPTShape:
    """Validate a Hugging Face OPT config (object or dict) and return its shape.

    Raises ``UnsupportedOPTLayout`` for the layouts GPTModel cannot express: post-LN
    (``do_layer_norm_before=False``), a word-embedding projection (``word_embed_proj_dim != hidden_size``:
    project_in/project_out) — both are opt-350m — a removed final LayerNorm, no biases, LayerNorms without
    affine parameters, or an activation other than ReLU.
    """
    hidden = int(_get(config, "hidden_size"))
    problems = []
    if not _get(config, "do_layer_norm_before", True):
        problems.append("post-LN layers (do_layer_norm_before=False)")
    proj = _get(config, "word_embed_proj_dim", hidden)
    if proj is not None and int(proj) != hidden:
        problems.append(f"project_in/project_out (word_embed_proj_dim={proj} != hidden_size={hidden})")
    if _get(config, "_remove_final_layer_norm", False):
        problems.append("no final LayerNorm (_remove_final_layer_norm=True)")
    if not _get(config, "enable_bias", True):
        problems.append("linear layers without bias (enable_bias=False)")
    if not _get(config, "layer_norm_elementwise_affine", True):
        problems.append("LayerNorm without affine parameters")
    if _get(config, "activation_function", "relu") != "relu":
        problems.append(f"activation {_get(config, 'activation_function')!r} (GPTModel OPT mapping uses relu)")
    if problems:
        raise UnsupportedOPTLayout(
            "this OPT checkpoint does not map onto Megatron-Core GPTModel: " + "; ".join(problems)
            + ". opt-350m has this layout; every other released OPT size (125m, 1.3b, 2.7b, 6.7b, 13b, 30b, "
            "66b) is pre-LN without projections and is supported."
        )
    return OPTShape(
        vocab_size=int(_get(config, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(_get(config, "num_hidden_layers")),
        num_heads=int(_get(config, "num_attention_heads")),
        ffn_dim=int(_get(config, "ffn_dim")),
        max_positions=int(_get(config, "max_position_embeddings")),
    )


def padded_vocab_size(vocab_size: int, tp_size: int, multiple: int = 1) -> int:
    """The vocabulary rounded up to a multiple of lcm(``multiple``, ``tp_size``) (equal shards per rank).

    With ``multiple`` a multiple of every TP size in use (the driver's default 128 covers TP ≤ 128 powers
    of two) the padded size, and so a model's random initialisation, does not depend on the TP size. The
    padded columns are masked by every vocab-parallel primitive when given ``vocab_size=`` the true size.
    """
    step = math.lcm(multiple, tp_size)
    return -(-vocab_size // step) * step


class SDPACoreAttention(DotProductAttention):
    """Megatron's core attention computed by ``F.scaled_dot_product_attention``.

    Inputs [s, b, heads_per_partition, head_dim]; output [s, b, hidden_per_partition], as DotProductAttention.
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


def opt_transformer_config(
    shape: OPTShape,
    *,
    bf16: bool = False,
    use_cpu_initialization: bool = True,
    dropout: float = 0.0,
) -> TransformerConfig:
    """The TransformerConfig of an OPT model (every fusion off: they need apex/TE and change nothing)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_heads,
        ffn_hidden_size=shape.ffn_dim,
        activation_func=F.relu,
        gated_linear_unit=False,
        normalization="LayerNorm",
        layernorm_epsilon=1e-5,
        add_bias_linear=True,
        add_qkv_bias=True,
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


def build_opt_gpt_model(
    shape: OPTShape,
    *,
    tp_size: int,
    bf16: bool = False,
    use_cpu_initialization: bool = True,
    vocab_multiple: int = 1,
    dropout: float = 0.0,
) -> GPTModel:
    """A GPTModel for ``shape`` on the current tensor-parallel group (parallel state must be initialised).

    The vocabulary is padded to ``padded_vocab_size(shape.vocab_size, tp_size, vocab_multiple)``; the output
    logits are this rank's vocabulary shard (``parallel_output=True``): pass ``vocab_size=shape.vocab_size``
    to the vocab-parallel losses so the padded columns are masked.
    """
    config = opt_transformer_config(shape, bf16=bf16, use_cpu_initialization=use_cpu_initialization,
                                    dropout=dropout)
    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return GPTModel(
        config,
        spec,
        vocab_size=padded_vocab_size(shape.vocab_size, tp_size, vocab_multiple),
        max_sequence_length=shape.max_positions,
        position_embedding_type="learned_absolute",
        share_embeddings_and_output_weights=True,
        parallel_output=True,
    )
