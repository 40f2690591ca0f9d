"""The Llama-family converter on random tiny Hugging Face models: round trips at several TP sizes (GQA ratios,
tied and untied embeddings, odd vocabularies, padded query groups, Qwen2 biases), the refusals, RoPE
frequencies against transformers' own, and converted models matching HF's logits, loss and every
parameter gradient at TP=1 and TP=2 in the 2-process gloo world."""

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (the `megatron` extra)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

VOCAB = 51  # odd: padded to 52 at TP=2, 52 at TP=4

# name -> (config overrides, model type). Heads/KV heads chosen to cover MHA, GQA 2:1 and 3:1, MQA, and a
# group count TP=2 does not divide (3 groups: padded to 4, as SmolLM2-135M is).
CONFIGS = {
    "gqa2-untied-llama3rope": (dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                    rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 16}), "llama"),
    "mha-tied": (dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True), "llama"),
    "mqa-linear-rope": (dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}), "llama"),
    "gqa3-3groups-tied": (dict(num_attention_heads=9, num_key_value_heads=3, hidden_size=36, head_dim=4,
                               tie_word_embeddings=True), "llama"),
    "qwen2-bias-headdim": (dict(num_attention_heads=4, num_key_value_heads=2, head_dim=6, tie_word_embeddings=False),
                           "qwen2"),
}


def _tiny_hf(name, seed=0):
    overrides, model_type = CONFIGS[name]
    cfg = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, intermediate_size=24,
               max_position_embeddings=64, rms_norm_eps=1e-5, attention_dropout=0.0,
               initializer_range=0.4)  # O(1) logits and peaked attention: a wrong rotation or head shows
    cfg.update(overrides)
    torch.manual_seed(seed)
    if model_type == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    model.eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: randomise them so a mix-up shows
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip(name, tp):
    from dpkd.integrations.megatron.llama_convert import hf_to_megatron, megatron_to_hf
    from dpkd.integrations.megatron.llama_model import llama_shape

    hf = _tiny_hf(name)
    shape = llama_shape(hf.config)
    if shape.ffn_dim % tp:
        pytest.skip("FFN not divisible")
    state = {k: v for k, v in hf.state_dict().items() if not (shape.tied_embeddings and k == "lm_head.weight")}
    shards = [hf_to_megatron(state, shape, tp_rank=r, tp_size=tp) for r in range(tp)]
    back = megatron_to_hf(shards, shape)
    assert set(back) == set(state)
    for k, t in state.items():
        assert torch.equal(back[k], t), k
    again = [hf_to_megatron(back, shape, tp_rank=r, tp_size=tp) for r in range(tp)]
    for s, a in zip(shards, again, strict=True):
        assert s.keys() == a.keys() and all(torch.equal(s[k], a[k]) for k in s)


def test_fused_layouts():
    """Megatron's per-group [q heads; k; v] rows and per-rank [gate_r; up_r] rows, read off directly."""
    from dpkd.integrations.megatron.llama_convert import hf_to_megatron
    from dpkd.integrations.megatron.llama_model import llama_shape

    hf = _tiny_hf("gqa3-3groups-tied")  # 9 heads in 3 groups, head_dim 4; TP=2 pads to 4 groups
    shape = llama_shape(hf.config)
    state = hf.state_dict()
    d, r = 4, 3
    q, k, v = (state[f"model.layers.1.self_attn.{x}_proj.weight"] for x in "qkv")
    shards = [hf_to_megatron(state, shape, tp_rank=rank, tp_size=2) for rank in range(2)]
    qkv0, qkv1 = (s["decoder.layers.1.self_attention.linear_qkv.weight"] for s in shards)
    assert qkv0.shape == qkv1.shape == (2 * (r + 2) * d, 36)
    # rank 1 holds group 2 (real) then group 3 (padding: zeros)
    assert torch.equal(qkv1[: r * d], q[2 * r * d:])
    assert torch.equal(qkv1[r * d:(r + 1) * d], k[2 * d:])
    assert torch.equal(qkv1[(r + 1) * d:(r + 2) * d], v[2 * d:])
    assert torch.all(qkv1[(r + 2) * d:] == 0)
    assert torch.equal(qkv0[(r + 2) * d:(2 * r + 2) * d], q[r * d:2 * r * d])  # rank 0, group 1's queries
    proj1 = shards[1]["decoder.layers.1.self_attention.linear_proj.weight"]
    assert torch.equal(proj1[:, : r * d], state["model.layers.1.self_attn.o_proj.weight"][:, 2 * r * d:])
    assert torch.all(proj1[:, r * d:] == 0)
    gate, up = state["model.layers.1.mlp.gate_proj.weight"], state["model.layers.1.mlp.up_proj.weight"]
    fc1 = shards[1]["decoder.layers.1.mlp.linear_fc1.weight"]
    assert torch.equal(fc1, torch.cat([gate[12:], up[12:]]))


def test_nonzero_padding_refused():
    from dpkd.integrations.megatron.llama_convert import hf_to_megatron, megatron_to_hf
    from dpkd.integrations.megatron.llama_model import llama_shape

    hf = _tiny_hf("gqa3-3groups-tied")
    shape = llama_shape(hf.config)
    shards = [hf_to_megatron(hf.state_dict(), shape, tp_rank=r, tp_size=2) for r in range(2)]
    shards[1]["decoder.layers.0.self_attention.linear_qkv.weight"][-1, 0] = 1.0
    with pytest.raises(ValueError, match="padded query groups of `linear_qkv` are not zero"):
        megatron_to_hf(shards, shape)


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 100000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
])
def test_rope_frequencies_match_transformers(rope):
    from dpkd.integrations.megatron.llama_model import llama_shape
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                                   max_position_embeddings=131072, rope_parameters=rope)
    shape = llama_shape(cfg)
    if rope["rope_type"] == "default":
        want = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)[0]
    else:
        want = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, "cpu")[0]
    got = shape.rope.inv_freq(shape.head_dim)
    assert got.dtype == torch.float32 and got.shape == (32,)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("config,problem", [
    (lambda: transformers.MistralConfig(sliding_window=64, max_position_embeddings=256), "sliding-window"),
    (lambda: transformers.MixtralConfig(), "mixture of experts"),
    (lambda: transformers.LlamaConfig(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
     "'yarn'"),
    (lambda: transformers.LlamaConfig(hidden_act="gelu"), "activation 'gelu'"),
    (lambda: transformers.LlamaConfig(attention_bias=True), "attention/MLP biases"),
    (lambda: transformers.OPTConfig(), "model_type 'opt'"),
])
def test_unsupported_layouts_refused(config, problem):
    from dpkd.integrations.megatron.llama_model import UnsupportedLlamaLayout, llama_shape

    with pytest.raises(UnsupportedLlamaLayout, match="does not map onto Megatron-Core GPTModel") as err:
        llama_shape(config())
    assert problem in str(err.value)


def test_mistral_without_window_and_dict_config_accepted():
    from dpkd.integrations.megatron.llama_model import llama_shape

    shape = llama_shape(transformers.MistralConfig(sliding_window=None, num_key_value_heads=8).to_dict())
    assert (shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.tied_embeddings) == (32, 8, 128, False)
    config_json = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "num_hidden_layers": 16,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 8192,
                   "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": True,
                   "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    shape = llama_shape(config_json)  # Llama-3.2-1B's config.json, as the hub stores it (rope_scaling)
    assert shape.rope.rope_type == "llama3" and shape.rope.factor == 32.0 and shape.rope.theta == 500000.0
    assert shape.parameters == 1_235_814_400  # Llama-3.2-1B's published parameter count


def body_hf_parity(name):
    """Logits shard, vocab-parallel CE and every parameter gradient of the converted model vs HF."""
    import dpkd.integrations.megatron as mp
    from dpkd.integrations.megatron.llama_convert import hf_to_megatron, load_hf_state_dict
    from dpkd.integrations.megatron.llama_model import build_llama_gpt_model, llama_shape
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    hf = _tiny_hf(name, seed=3)
    shape = llama_shape(hf.config)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (3, 40), generator=g)  # 40 > original_max_position_embeddings=16

    hf_logits = hf(input_ids=ids).logits
    hf_loss = torch.nn.functional.cross_entropy(hf_logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    hf_loss.backward()
    hf_grads = {k: p.grad for k, p in hf.named_parameters()}
    model = build_llama_gpt_model(shape, tp_size=tp)
    want_grads = hf_to_megatron(hf_grads, shape, tp_rank=rank, tp_size=tp, query_groups=model.config.num_query_groups)
    load_hf_state_dict(model, hf.state_dict(), shape, tp_rank=rank, tp_size=tp)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    logits = model(ids, positions, None)
    loss = mp.vocab_parallel_cross_entropy(logits[:, :-1], ids[:, 1:], vocab_size=VOCAB)
    loss.backward()
    local = logits.shape[-1]
    padded = torch.cat([hf_logits, torch.zeros(3, 40, tp * local - VOCAB)], -1)
    want_logits = padded[..., rank * local:(rank + 1) * local]
    got_grads = {k: p.grad for k, p in model.named_parameters()}
    return {"logits": (logits.detach(), want_logits.detach()), "loss": (loss.detach(), hf_loss.detach()),
            "grads": {k: (got_grads[k], want_grads[k]) for k in want_grads}, "n_params": len(got_grads)}


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_converted_model_matches_hf(gloo_pool, name, tp):
    for rank, r in enumerate(gloo_pool.run(body_hf_parity, name, tp=tp)):
        torch.testing.assert_close(*r["logits"], rtol=1e-5, atol=2e-5, msg=lambda m, rank=rank: f"rank {rank}: {m}")
        torch.testing.assert_close(*r["loss"], rtol=1e-5, atol=1e-6)
        assert len(r["grads"]) == r["n_params"]  # every parameter has an HF gradient to compare with
        for k, (got, want) in r["grads"].items():
            torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-6, msg=lambda m, k=k: f"{k}: {m}")
