"""Tokenizers and small models built from scratch (the embedded job and the tests; no hub needed).

* :func:`build_word_tokenizer` — a word-level ``tokenizers`` model over the words of some texts, wrapped as
  ``transformers.PreTrainedTokenizerFast`` (so ``save_pretrained`` / ``from_pretrained`` work as usual).
* :func:`tiny_causal_lm` — a GPT-2, OPT or Llama causal LM from a ``transformers`` config, dropout off.
* :func:`load_causal_lm` / :func:`load_tokenizer` — local checkpoints, safetensors only
  (``use_safetensors=True``: a pickled ``pytorch_model.bin`` is refused, never unpickled).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["build_word_tokenizer", "tiny_causal_lm", "load_causal_lm", "load_tokenizer", "max_positions",
           "SPECIAL_TOKENS", "TINY_MAX_POSITIONS"]

SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "<|endoftext|>", "unk_token": "<unk>"}


def build_word_tokenizer(texts: Iterable[str]) -> Any:
    """Word-level tokenizer (split on whitespace and punctuation) whose vocabulary is every word of
    ``texts``, plus ``<pad>`` (id 0), ``<|endoftext|>`` (EOS, id 1) and ``<unk>`` (id 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words: set[str] = set()
    for t in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(t))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre
    # no decoder: tokenizers then joins tokens with single spaces (a WordPiece decoder would eat "##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


TINY_MAX_POSITIONS = 256  # tiny_causal_lm's default: the GPT-2-small-config students' position table


def max_positions(model_or_config: Any) -> int | None:
    """How many positions a causal LM (or its config) has: ``max_position_embeddings`` (``n_positions`` for
    GPT-2), or None when the config says nothing. A longer sequence indexes past a learned position table."""
    config = getattr(model_or_config, "config", model_or_config)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def tiny_causal_lm(
    family: str,
    vocab_size: int,
    *,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    max_positions: int = TINY_MAX_POSITIONS,
    pad_token_id: int = 0,
    eos_token_id: int = 1,
    seed: int = 0,
    n_kv_heads: int | None = None,
    tie_word_embeddings: bool = True,
) -> Any:
    """A small ``GPT2LMHeadModel`` (``family="gpt2"``), ``OPTForCausalLM`` (``"opt"``) or ``LlamaForCausalLM``
    (``"llama"``: RMSNorm, RoPE, SwiGLU MLP of width ``4 · d_model``, ``n_kv_heads`` key/value heads —
    default ``n_heads`` — and ``tie_word_embeddings``), initialised with ``seed``; dropout 0 so training is
    deterministic given the seed. ``n_kv_heads`` and ``tie_word_embeddings`` apply to Llama only."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_positions=max_positions, n_embd=d_model, n_layer=n_layers,
                         n_head=n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        return GPT2LMHeadModel(cfg)
    if family == "opt":
        cfg = OPTConfig(vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=n_layers,
                        ffn_dim=4 * d_model, num_attention_heads=n_heads, max_position_embeddings=max_positions,
                        word_embed_proj_dim=d_model, dropout=0.0, attention_dropout=0.0,
                        pad_token_id=pad_token_id, bos_token_id=eos_token_id, eos_token_id=eos_token_id)
        return OPTForCausalLM(cfg)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=4 * d_model,
                          num_hidden_layers=n_layers, num_attention_heads=n_heads,
                          num_key_value_heads=n_kv_heads or n_heads, max_position_embeddings=max_positions,
                          tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id,
                          bos_token_id=eos_token_id, eos_token_id=eos_token_id)
        return LlamaForCausalLM(cfg)
    raise ValueError(f"tiny_causal_lm: `family` must be 'gpt2', 'opt' or 'llama', got {family!r}")


def load_causal_lm(path: str | Path) -> Any:
    """A local causal-LM checkpoint (GPT-2, OPT, ...) from safetensors weights only."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True)


def load_tokenizer(path: str | Path) -> Any:
    """A local tokenizer; a missing pad token is set to EOS (GPT-2 has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
