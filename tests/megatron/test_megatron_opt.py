"""The OPT converter: round trips at several TP sizes, the opt-350m refusal, and a converted random tiny
Hugging Face OPT matching HF's logits, loss and every parameter gradient at TP=1 and TP=2."""

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (the `megatron` extra)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

VOCAB = 51  # odd: padded to 52 at TP=2


def _tiny_hf_opt(seed=0, **overrides):
    cfg = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=4,
               max_position_embeddings=20, word_embed_proj_dim=16, dropout=0.0, attention_dropout=0.0,
               activation_dropout=0.0, layerdrop=0.0, pad_token_id=1, do_layer_norm_before=True)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = transformers.OPTForCausalLM(transformers.OPTConfig(**cfg)).eval()
    with torch.no_grad():  # HF initialises LayerNorms and biases trivially: randomise them too
        for name, p in model.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_round_trip(tp):
    from dpkd.integrations.megatron.opt_convert import OPT_POSITION_OFFSET, hf_to_megatron, megatron_to_hf
    from dpkd.integrations.megatron.opt_model import opt_shape

    hf = _tiny_hf_opt()
    shape = opt_shape(hf.config)
    state = hf.state_dict()
    shards = [hf_to_megatron(state, shape, tp_rank=r, tp_size=tp) for r in range(tp)]
    back = megatron_to_hf(shards, shape)
    assert set(back) == set(state)
    for k, t in state.items():
        if k == "model.decoder.embed_positions.weight":
            assert torch.equal(back[k][OPT_POSITION_OFFSET:], t[OPT_POSITION_OFFSET:])
            assert torch.all(back[k][:OPT_POSITION_OFFSET] == 0)
        else:
            assert torch.equal(back[k], t), k
    again = [hf_to_megatron(back, shape, tp_rank=r, tp_size=tp) for r in range(tp)]
    for s, a in zip(shards, again, strict=True):
        assert s.keys() == a.keys() and all(torch.equal(s[k], a[k]) for k in s)
    # per-head fused layout: rank r's qkv rows are heads [r·nh/tp, (r+1)·nh/tp) as [q_h; k_h; v_h]
    qkv = shards[-1]["decoder.layers.0.self_attention.linear_qkv.weight"]
    head_dim = 4
    last_head = shape.num_heads - 1
    q_last = state["model.decoder.layers.0.self_attn.q_proj.weight"][last_head * head_dim:]
    v_last = state["model.decoder.layers.0.self_attn.v_proj.weight"][last_head * head_dim:]
    assert torch.equal(qkv[-3 * head_dim:-2 * head_dim], q_last)
    assert torch.equal(qkv[-head_dim:], v_last)


def test_opt_350m_layout_refused():
    from dpkd.integrations.megatron.opt_model import UnsupportedOPTLayout, opt_shape

    cfg = transformers.OPTConfig(hidden_size=1024, word_embed_proj_dim=512, do_layer_norm_before=False,
                                 num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16)
    with pytest.raises(UnsupportedOPTLayout, match="opt-350m") as err:
        opt_shape(cfg)
    assert "post-LN" in str(err.value) and "project_in" in str(err.value)


def body_hf_parity():
    """Logits shard, vocab-parallel CE and every parameter gradient of the converted model vs HF."""
    import dpkd.integrations.megatron as mp
    import torch.distributed as dist
    from dpkd.integrations.megatron.opt_convert import hf_to_megatron, load_hf_state_dict
    from dpkd.integrations.megatron.opt_model import build_opt_gpt_model, opt_shape
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    hf = _tiny_hf_opt(seed=3)
    shape = opt_shape(hf.config)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, VOCAB, (3, 9), generator=g)  # no pad token (HF zeroes its embedding gradient)

    hf_logits = hf(input_ids=ids).logits
    hf_loss = torch.nn.functional.cross_entropy(hf_logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    hf_loss.backward()
    hf_grads = {k: p.grad for k, p in hf.named_parameters()}
    hf_grads["model.decoder.embed_positions.weight"] = hf.model.decoder.embed_positions.weight.grad
    want_grads = hf_to_megatron(hf_grads, shape, tp_rank=rank, tp_size=tp)

    model = build_opt_gpt_model(shape, tp_size=tp)
    load_hf_state_dict(model, hf.state_dict(), shape, tp_rank=rank, tp_size=tp)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    logits = model(ids, positions, None)
    loss = mp.vocab_parallel_cross_entropy(logits[:, :-1], ids[:, 1:], vocab_size=VOCAB)
    loss.backward()
    local = logits.shape[-1]
    padded = torch.cat([hf_logits, torch.zeros(3, 9, tp * local - VOCAB)], -1)
    want_logits = padded[..., rank * local:(rank + 1) * local]
    got_grads = {k: p.grad for k, p in model.named_parameters()}
    assert dist.get_world_size() == 2
    return {"logits": (logits.detach(), want_logits.detach()), "loss": (loss.detach(), hf_loss.detach()),
            "grads": {k: (got_grads[k], want_grads[k]) for k in want_grads}}


@pytest.mark.parametrize("tp", [1, 2])
def test_converted_model_matches_hf(gloo_pool, tp):
    for rank, r in enumerate(gloo_pool.run(body_hf_parity, tp=tp)):
        torch.testing.assert_close(*r["logits"], rtol=1e-5, atol=1e-5, msg=lambda m, rank=rank: f"rank {rank}: {m}")
        torch.testing.assert_close(*r["loss"], rtol=1e-5, atol=1e-6)
        assert len(r["grads"]) == 4 + 12 * 2  # every parameter of the 2-layer model has a gradient to compare
        for k, (got, want) in r["grads"].items():
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
