"""Write a tiny Llama as a real GGUF file (the `gguf` package's writer), in llama.cpp's layout.

The layout follows llama.cpp's HF → GGUF converter: ``token_embd`` / ``blk.<i>.attn_q|k|v|output`` /
``ffn_gate|up|down`` / ``attn_norm`` / ``ffn_norm`` / ``output_norm`` (no ``output`` tensor: tied), query and
key weights permuted from HF's rotate-half RoPE layout to GGML's interleaved one, a byte-level BPE
tokenizer (``tokenizer.ggml.model = "gpt2"``) and a ChatML chat template. MLP weights are stored Q8_0 and
the query weights Q4_1 (the types in the SmolLM2 file), so reading the file back exercises dequantisation;
:func:`expected_state_dict` gives the weights a correct reader must recover.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1 (BOS), 2 (EOS, pad), as in SmolLM2
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s"]
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
QUANTISED = {"ffn_gate": "Q8_0", "ffn_up": "Q8_0", "ffn_down": "Q8_0", "attn_q": "Q4_1"}


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def vocabulary() -> list[str]:
    merged = ["".join(m.split()) for m in MERGES]
    return SPECIALS + byte_level_alphabet() + merged


def ggml_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half query/key rows → GGML's interleaved pairs (llama.cpp's ``permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(model) -> dict[str, np.ndarray]:
    cfg = model.config
    sd = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                w = ggml_permute(w, cfg.num_attention_heads)
            elif gg == "attn_k":
                w = ggml_permute(w, cfg.num_key_value_heads)
            out[f"blk.{i}.{gg}.weight"] = w
    return out


def _quant_type(name: str):
    import gguf

    kind = name.split(".")[-2] if name.startswith("blk.") else None
    return getattr(gguf.GGMLQuantizationType, QUANTISED[kind]) if kind in QUANTISED else None


def write_tiny_llama_gguf(model, path: str | Path, *, name: str = "Tiny Llama") -> Path:
    """Write ``model`` (a tied ``LlamaForCausalLM`` whose vocabulary is :func:`vocabulary`) to ``path``."""
    import gguf

    cfg = model.config
    vocab = vocabulary()
    assert cfg.vocab_size == len(vocab) and cfg.tie_word_embeddings
    path = Path(path)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(len(vocab))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(vocab)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(vocab) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for tname, t in _gguf_tensors(model).items():
        qtype = _quant_type(tname)
        if qtype is None:
            w.add_tensor(tname, np.ascontiguousarray(t))
        else:
            w.add_tensor(tname, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def expected_state_dict(model) -> dict[str, torch.Tensor]:
    """``model``'s weights as the file stores them: quantised ones round-tripped through their type."""
    import gguf

    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = {"mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "self_attn.q_proj": "attn_q"}
    for i in range(model.config.num_hidden_layers):
        for hf, gg in names.items():
            key = f"model.layers.{i}.{hf}.weight"
            qtype = getattr(gguf.GGMLQuantizationType, QUANTISED[gg])
            w = out[key].numpy()
            out[key] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape))
    return out
