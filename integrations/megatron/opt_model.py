"""Megatron-Core GPTModel with the OPT architecture (pre-LN OPT: opt-125m, opt-1.3b, … opt-66b).

OPT maps onto GPTModel as: learned absolute positions, ReLU MLP
without gating, LayerNorm ε = 1e-5, biases everywhere, tied input/output embeddings, pre-LN layers.
Attention is ``gpt_common.SDPACoreAttention`` (re-exported here with ``padded_vocab_size``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from .gpt_common import SDPACoreAttention, config_get, local_layer_spec, padded_vocab_size, transformer_config

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


def opt_shape(config: Any) -> OPTShape:
    """Validate a Hugging Face OPT config (object or dict) and return its shape.

    Raises ``UnsupportedOPTLayout`` for the layouts GPTModel cannot express: post-LN
    (``do_layer_norm_before=False``), a word-embedding projection (``word_embed_proj_dim != hidden_size``:
    project_in/project_out) — both are opt-350m — a removed final LayerNorm, no biases, LayerNorms without
    affine parameters, or an activation other than ReLU.
    """
    hidden = int(config_get(config, "hidden_size"))
    problems = []
    if not config_get(config, "do_layer_norm_before", True):
        problems.append("post-LN layers (do_layer_norm_before=False)")
    proj = config_get(config, "word_embed_proj_dim", hidden)
    if proj is not None and int(proj) != hidden:
        problems.append(f"project_in/project_out (word_embed_proj_dim={proj} != hidden_size={hidden})")
    if config_get(config, "_remove_final_layer_norm", False):
        problems.append("no final LayerNorm (_remove_final_layer_norm=True)")
    if not config_get(config, "enable_bias", True):
        problems.append("linear layers without bias (enable_bias=False)")
    if not config_get(config, "layer_norm_elementwise_affine", True):
        problems.append("LayerNorm without affine parameters")
    if config_get(config, "activation_function", "relu") != "relu":
        problems.append(f"activation {config_get(config, 'activation_function')!r} (GPTModel OPT mapping uses relu)")
    if problems:
        raise UnsupportedOPTLayout(
            "this OPT checkpoint does not map onto Megatron-Core GPTModel: " + "; ".join(problems)
            + ". opt-350m has this layout; every other released OPT size (125m, 1.3b, 2.7b, 6.7b, 13b, 30b, "
            "66b) is pre-LN without projections and is supported."
        )
    return OPTShape(
        vocab_size=int(config_get(config, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(config_get(config, "num_hidden_layers")),
        num_heads=int(config_get(config, "num_attention_heads")),
        ffn_dim=int(config_get(config, "ffn_dim")),
        max_positions=int(config_get(config, "max_position_embeddings")),
    )


def opt_transformer_config(
    shape: OPTShape,
    *,
    bf16: bool = False,
    use_cpu_initialization: bool = True,
    dropout: float = 0.0,
) -> TransformerConfig:
    """The TransformerConfig of an OPT model (every fusion off: they need apex/TE and change nothing)."""
    return transformer_config(
        bf16=bf16,
        use_cpu_initialization=use_cpu_initialization,
        dropout=dropout,
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
    return GPTModel(
        config,
        local_layer_spec("LayerNorm"),
        vocab_size=padded_vocab_size(shape.vocab_size, tp_size, vocab_multiple),
        max_sequence_length=shape.max_positions,
        position_embedding_type="learned_absolute",
        share_embeddings_and_output_weights=True,
        parallel_output=True,
    )
