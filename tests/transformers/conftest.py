"""Shared fixtures: the embedded toy task at a tiny size, a word-level tokenizer, tiny GPT-2 / OPT / Llama models."""

import pytest
import torch
from dpkd.integrations.transformers.data import format_prompt, tokenize_records
from dpkd.integrations.transformers.models import build_word_tokenizer, tiny_causal_lm
from dpkd.integrations.transformers.toy_task import make_task


@pytest.fixture(scope="session")
def toy():
    torch.set_num_threads(1)
    task = make_task(64, 8, 8, seed=0)
    tok = build_word_tokenizer([format_prompt(r) + " " + r.response for s in task.values() for r in s])
    train = tokenize_records(task["train"], tok)
    probe = tokenize_records(task["valid"], tok)
    return tok, train, probe


def _tiny(family, tok, seed, dtype=torch.float32):
    # Llama: grouped-query attention (2 query heads share 1 key/value head), RMSNorm, RoPE, SwiGLU, tied
    kv = {"n_kv_heads": 1} if family == "llama" else {}
    return tiny_causal_lm(family, len(tok), d_model=16, n_layers=1, n_heads=2, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id, seed=seed, **kv).to(dtype)


@pytest.fixture(scope="session")
def tiny():
    """tiny(family, tok, seed, dtype=float32) -> a 1-layer, 16-wide causal LM of that family (gpt2, opt, llama)."""
    return _tiny


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the cached folder (float32, eval mode)."""
    from dpkd.integrations.transformers.pretrained import load_pretrained

    return load_pretrained(smollm2_dir)
