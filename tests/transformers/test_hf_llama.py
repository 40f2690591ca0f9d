"""Llama-family students and teachers (RMSNorm, RoPE, grouped-query attention, SwiGLU, tied embeddings), built
from a transformers config: the fused lm_head path gives the tied input/output embedding the same gradient as
the materialised path."""

import dataclasses

import pytest
import torch
from dpkd.integrations.transformers.methods import StepStats, compute_loss
from dpkd.integrations.transformers.trainer import DistillConfig, DistillTrainer


def test_tiny_llama_is_the_family(toy, tiny):
    tok, _, _ = toy
    model = tiny("llama", tok, 0)
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.hidden_act == "silu"  # SwiGLU MLP
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    assert type(model.model.norm).__name__ == "LlamaRMSNorm" and hasattr(model.model, "rotary_emb")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied


def _shared_grad(method, student, teacher, pb, norms, cfg):
    student.zero_grad(set_to_none=True)
    compute_loss(method, student, teacher, pb, norms, cfg, StepStats()).backward()
    return student.model.embed_tokens.weight.grad.detach().clone()


@pytest.mark.parametrize("method", ["sft", "kd", "dpkd", "dpkd_token", "gkd"])
def test_tied_embedding_gets_the_same_gradient_fused(tmp_path, toy, tiny, method):
    """d loss / d W for the shared W (input embedding and lm_head): fused == materialised (float64). The
    embedding's own share is in it: an untied copy's lm_head gradient alone differs."""
    tok, train, _ = toy
    student, teacher = tiny("llama", tok, 0, torch.float64), tiny("llama", tok, 1, torch.float64)
    pt = [ex.prompt_ids + ex.response_ids for ex in train[:16]]
    cfg = DistillConfig(output_dir=str(tmp_path), method=method, max_steps=1, per_device_train_batch_size=4,
                        max_new_tokens=8, disable_tqdm=True, report_to="none", teacher_outputs="online",
                        objective="released", method_args={"lmbda": 1.0} if method == "gkd" else {})
    trainer = DistillTrainer(student, teacher, train, cfg, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, pt_sequences=pt)
    (pb,) = trainer._prepare(0)
    norms = trainer.normalizers([pb])
    plain = _shared_grad(method, student, teacher, pb, norms, cfg)
    fused = _shared_grad(method, student, teacher, pb, norms, dataclasses.replace(cfg, use_fused=True,
                                                                                   fused_chunk_size=5))
    torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-14 * float(plain.abs().max()))
    untied = tiny("llama", tok, 0, torch.float64)
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = torch.nn.Parameter(untied.model.embed_tokens.weight.detach().clone())
    untied.zero_grad(set_to_none=True)
    compute_loss(method, untied, teacher, pb, norms, cfg, StepStats()).backward()
    head_only = untied.lm_head.weight.grad
    assert not torch.allclose(head_only, plain, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(head_only + untied.model.embed_tokens.weight.grad, plain, rtol=1e-10,
                               atol=1e-14 * float(plain.abs().max()))
