"""Megatron-Core GPTModel with the Llama-family architecture (Llama 2/3, SmolLM, Mistral, Qwen2).

The family maps onto GPTModel as: RMSNorm pre-norm layers (ε from the config), rotary position embeddings
with Hugging Face's inverse frequencies (base and scaling from the config), grouped-query attention
(``num_query_groups`` = the KV heads), a SwiGLU MLP (``gated_linear_unit`` with SiLU: Megatron's fused
``linear_fc1`` holds [gate; up]), no linear biases except Qwen2's q/k/v biases, and tied or untied
input/output embeddings.

Query-group padding. Megatron needs the tensor-parallel size to divide the number of query groups (and so
the heads). When it does not — SmolLM2-135M has 9 heads in 3 groups, and TP = 2 — the model is built with
``query_groups(tp)`` groups: the real ones followed by all-zero groups (zero q/k/v rows and zero
``linear_proj`` columns, each with heads/groups query heads). A zero group contributes exactly nothing to
the output, and its gradients are exactly zero (its output is zero and so is its ``linear_proj`` block), so
it stays zero under any optimizer step: the padded model is the same function in training and inference.
``head_dim`` (Megatron's ``kv_channels``) is unchanged, so ``hidden_size`` ≠ heads · head_dim is fine.

Refused with ``UnsupportedLlamaLayout``: sliding-window attention, mixtures of experts, q/k norms, partial
rotary, attention or MLP biases other than Qwen2's, activations other than SiLU, RoPE scalings whose
frequencies depend on the sequence length or rescale attention (dynamic, yarn, longrope), FFN sizes not
divisible by TP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from .gpt_common import config_get, local_layer_spec, padded_vocab_size, transformer_config

__all__ = [
    "LLAMA_MODEL_TYPES",
    "LlamaShape",
    "RoPE",
    "UnsupportedLlamaLayout",
    "HFRotaryEmbedding",
    "llama_shape",
    "padded_query_groups",
    "llama_transformer_config",
    "build_llama_gpt_model",
]

LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2")


class UnsupportedLlamaLayout(ValueError):
    """A Llama-family checkpoint whose layout GPTModel (as built here) cannot express."""


@dataclass(frozen=True)
class RoPE:
    """Rotary embedding parameters: base θ and a Hugging Face ``rope_type`` (default | linear | llama3)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """ω_i = θ^(−2i/d), i < d/2 (float32), then the scaling of ``rope_type``.

        linear: ω_i / factor. llama3 (Llama 3.1): wavelengths λ_i = 2π/ω_i longer than L/low_freq_factor
        (L = original_max_positions) are divided by ``factor``, shorter than L/high_freq_factor kept, and
        in between interpolated with s = (L/λ_i − low) / (high − low): (1 − s)·ω_i/factor + s·ω_i.
        """
        base = 1.0 / (self.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if self.rope_type == "default":
            return base
        if self.rope_type == "linear":
            return base / self.factor
        wavelength = 2 * math.pi / base
        long_wave = self.original_max_positions / self.low_freq_factor
        short_wave = self.original_max_positions / self.high_freq_factor
        scaled = torch.where(wavelength > long_wave, base / self.factor, base)
        s = (self.original_max_positions / wavelength - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - s) * scaled / self.factor + s * scaled
        medium = (wavelength >= short_wave) & (wavelength <= long_wave)
        return torch.where(medium, smoothed, scaled)


@dataclass(frozen=True)
class LlamaShape:
    """The architecture numbers of a Llama-family model (a Hugging Face config reduced to what matters)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int
    max_positions: int
    rms_norm_eps: float = 1e-6
    tied_embeddings: bool = False
    qkv_bias: bool = False
    rope: RoPE = field(default_factory=RoPE)

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def query_groups(self, tp_size: int) -> int:
        """Query groups the model is built with at ``tp_size``: the KV heads, padded to a multiple of TP."""
        return padded_query_groups(self.num_kv_heads, tp_size)

    @property
    def parameters(self) -> int:
        """Parameter count of the unpadded model (tied embeddings counted once)."""
        h, d, f = self.hidden_size, self.head_dim, self.ffn_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = h * (q + 2 * kv) + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        per_layer = attn + 3 * h * f + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tied_embeddings else 2)
        return embeddings + self.num_layers * per_layer + h


def padded_query_groups(groups: int, tp_size: int) -> int:
    """``groups`` rounded up to a multiple of ``tp_size`` (see the module docstring: zero groups are exact)."""
    return -(-groups // tp_size) * tp_size


def _rope(config: Any) -> RoPE:
    params = config_get(config, "rope_parameters") or config_get(config, "rope_scaling") or {}
    theta = float(params.get("rope_theta", config_get(config, "rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return RoPE(theta=theta)
    if rope_type == "linear":
        return RoPE(theta=theta, rope_type="linear", factor=float(params["factor"]))
    if rope_type == "llama3":
        return RoPE(theta=theta, rope_type="llama3", factor=float(params["factor"]),
                    low_freq_factor=float(params["low_freq_factor"]),
                    high_freq_factor=float(params["high_freq_factor"]),
                    original_max_positions=int(params["original_max_position_embeddings"]))
    raise UnsupportedLlamaLayout(
        f"RoPE scaling {rope_type!r} is not supported (supported: default, linear, llama3); dynamic/yarn/longrope "
        "frequencies depend on the sequence length or rescale attention")


def _layout_problems(config: Any, model_type: str) -> list[str]:
    problems = []
    if model_type not in LLAMA_MODEL_TYPES:
        problems.append(f"model_type {model_type!r} (supported: {', '.join(LLAMA_MODEL_TYPES)})")
    window = config_get(config, "sliding_window")
    uses_window = config_get(config, "use_sliding_window", model_type != "qwen2")
    max_positions = int(config_get(config, "max_position_embeddings"))
    if window is not None and uses_window and int(window) < max_positions:
        problems.append(f"sliding-window attention (sliding_window={window})")
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        if (config_get(config, name) or 0) > 1:
            problems.append(f"a mixture of experts ({name}={config_get(config, name)})")
    if config_get(config, "hidden_act", "silu") != "silu":
        problems.append(f"activation {config_get(config, 'hidden_act')!r} (the SwiGLU mapping uses silu)")
    if config_get(config, "attention_bias", False) or config_get(config, "mlp_bias", False):
        problems.append("attention/MLP biases (attention_bias or mlp_bias)")
    if float(config_get(config, "partial_rotary_factor", 1.0)) != 1.0:
        problems.append("partial rotary embeddings (partial_rotary_factor != 1)")
    if config_get(config, "use_qk_norm", False):
        problems.append("q/k normalisation")
    return problems


def llama_shape(config: Any) -> LlamaShape:
    """Validate a Hugging Face Llama/Mistral/Qwen2 config (object or dict) and return its shape.

    Raises ``UnsupportedLlamaLayout`` listing every feature GPTModel cannot express (module docstring).
    """
    model_type = config_get(config, "model_type", "llama")
    problems = _layout_problems(config, model_type)
    hidden = int(config_get(config, "hidden_size"))
    heads = int(config_get(config, "num_attention_heads"))
    kv_heads = int(config_get(config, "num_key_value_heads") or heads)
    if heads % kv_heads:
        problems.append(f"num_attention_heads={heads} not a multiple of num_key_value_heads={kv_heads}")
    try:
        rope = _rope(config)
    except UnsupportedLlamaLayout as err:
        problems.append(str(err))
        rope = RoPE()
    if problems:
        raise UnsupportedLlamaLayout("this checkpoint does not map onto Megatron-Core GPTModel: " + "; ".join(problems))
    return LlamaShape(
        vocab_size=int(config_get(config, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(config_get(config, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(config_get(config, "head_dim") or hidden // heads),
        ffn_dim=int(config_get(config, "intermediate_size")),
        max_positions=int(config_get(config, "max_position_embeddings")),
        rms_norm_eps=float(config_get(config, "rms_norm_eps", 1e-6)),
        tied_embeddings=bool(config_get(config, "tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        rope=rope,
    )


class HFRotaryEmbedding(RotaryEmbedding):
    """Megatron's RotaryEmbedding with given inverse frequencies, kept as a (non-persistent) buffer.

    Megatron's own class computes only the default and its fixed Llama-3.1 scaling, and moves its frequencies
    to ``torch.cuda.current_device()`` on first use; this one takes ``RoPE.inv_freq`` (any supported
    scaling) and follows the module's device like any buffer (``model.to(device)``), so it runs on CPUs too.
    The embedding is Megatron's non-interleaved [ω; ω] layout, which is Hugging Face's rotate-half RoPE.
    """

    def __init__(self, inv_freq: torch.Tensor, cp_group=None) -> None:
        super().__init__(kv_channels=2 * inv_freq.numel(), rotary_percent=1.0, use_cpu_initialization=True,
                         cp_group=cp_group)
        del self.inv_freq
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]


def llama_transformer_config(shape: LlamaShape, *, tp_size: int, query_groups: int | None = None,
                             bf16: bool = False, use_cpu_initialization: bool = True,
                             dropout: float = 0.0) -> TransformerConfig:
    """The TransformerConfig of a Llama-family model at ``tp_size`` with ``query_groups`` groups (default:
    ``shape.query_groups(tp_size)``; a checkpoint converted at another TP size may carry more)."""
    if shape.ffn_dim % tp_size:
        raise UnsupportedLlamaLayout(f"intermediate_size={shape.ffn_dim} is not divisible by tensor-parallel size "
                                     f"{tp_size}")
    groups = shape.query_groups(tp_size) if query_groups is None else query_groups
    if groups < shape.num_kv_heads or groups % tp_size:
        raise UnsupportedLlamaLayout(f"{groups} query groups (padded from {shape.num_kv_heads}) cannot be split over "
                                     f"tensor-parallel size {tp_size}; convert the checkpoint again at this TP size")
    return transformer_config(
        bf16=bf16,
        use_cpu_initialization=use_cpu_initialization,
        dropout=dropout,
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=groups * shape.heads_per_group,
        num_query_groups=groups,
        kv_channels=shape.head_dim,
        ffn_hidden_size=shape.ffn_dim,
        activation_func=F.silu,
        gated_linear_unit=True,
        normalization="RMSNorm",
        layernorm_epsilon=shape.rms_norm_eps,
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
    )


def build_llama_gpt_model(
    shape: LlamaShape,
    *,
    tp_size: int,
    query_groups: int | None = None,
    bf16: bool = False,
    use_cpu_initialization: bool = True,
    vocab_multiple: int = 1,
    dropout: float = 0.0,
) -> GPTModel:
    """A GPTModel for ``shape`` on the current tensor-parallel group (parallel state must be initialised).

    The vocabulary is padded to ``padded_vocab_size(shape.vocab_size, tp_size, vocab_multiple)`` and the
    query groups to ``query_groups`` (default ``shape.query_groups(tp_size)``); the output logits are this
    rank's vocabulary shard: pass ``vocab_size=shape.vocab_size`` to the vocab-parallel losses so the padded
    columns are masked.
    A randomly initialised model has its padded query groups zeroed, as a converted one does.
    """
    config = llama_transformer_config(shape, tp_size=tp_size, query_groups=query_groups, bf16=bf16,
                                      use_cpu_initialization=use_cpu_initialization, dropout=dropout)
    model = GPTModel(
        config,
        local_layer_spec("RMSNorm"),
        vocab_size=padded_vocab_size(shape.vocab_size, tp_size, vocab_multiple),
        max_sequence_length=shape.max_positions,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=shape.tied_embeddings,
        parallel_output=True,
    )
    rope = HFRotaryEmbedding(shape.rope.inv_freq(shape.head_dim), cp_group=model.rotary_pos_emb.cp_group)
    model.rotary_pos_emb = rope.to(next(model.parameters()).device)
    _zero_padded_groups(model, shape, tp_size)
    return model


def _zero_padded_groups(model: GPTModel, shape: LlamaShape, tp_size: int) -> None:
    """Zero this rank's padded query groups (q/k/v rows, biases and linear_proj columns) in every layer."""
    groups = model.config.num_query_groups
    if groups == shape.num_kv_heads:
        return
    from megatron.core import parallel_state

    local = groups // tp_size
    first = parallel_state.get_tensor_model_parallel_rank() * local
    pad_from = max(shape.num_kv_heads - first, 0)  # local index of this rank's first padded group
    if pad_from >= local:
        return
    rows = (shape.heads_per_group + 2) * shape.head_dim
    cols = shape.heads_per_group * shape.head_dim
    with torch.no_grad():
        for layer in model.decoder.layers:
            attn = layer.self_attention
            attn.linear_qkv.weight[pad_from * rows:].zero_()
            if attn.linear_qkv.bias is not None:
                attn.linear_qkv.bias[pad_from * rows:].zero_()
            attn.linear_proj.weight[:, pad_from * cols:].zero_()
