"""The trainer's fused lm_head path (use_fused=True) against the materialised one, on GPT-2 and OPT (float64)."""

import dataclasses

import pytest
import torch
from dpkd.integrations.cli import build_parser
from dpkd.integrations.methods import PairLoss
from dpkd.integrations.transformers.heads import check_fusable, model_head
from dpkd.integrations.transformers.job import PRESETS
from dpkd.integrations.transformers.methods import METHODS, StepStats, compute_loss
from dpkd.integrations.transformers.trainer import DistillConfig, DistillTrainer

FAMILIES = ["gpt2", "opt"]


@pytest.mark.parametrize("family", FAMILIES)
def test_last_hidden_state_is_what_the_lm_head_consumes(toy, tiny, family):
    """base_model's last_hidden_state == hidden_states[-1] (post final norm) and lm_head(it) == logits."""
    tok, train, _ = toy
    model = tiny(family, tok, 0, torch.float64)
    ids = torch.tensor([train[0].prompt_ids + train[0].response_ids])
    mask = torch.ones_like(ids)
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    base = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    head = model.get_output_embeddings()
    torch.testing.assert_close(base, out.hidden_states[-1], rtol=0, atol=0)
    torch.testing.assert_close(head(base), out.logits, rtol=1e-12, atol=1e-12)
    # the pre-final-norm state (GPT-2 ln_f, OPT decoder.final_layer_norm) would give other logits
    assert not torch.allclose(head(out.hidden_states[-2]), out.logits, rtol=1e-3, atol=1e-3)
    fused = model_head(model, _batch(ids, mask), fused=True)
    plain = model_head(model, _batch(ids, mask), fused=False)
    torch.testing.assert_close(fused.hidden @ fused.weight.t(), plain.logits, rtol=1e-12, atol=1e-12)
    assert torch.equal(fused.labels, plain.labels)


def _batch(ids, mask):
    from dpkd.integrations.transformers.batching import SequenceBatch

    return SequenceBatch(ids, mask, ids.clone())


def _cfg(tmp_path, method, **kw):
    base = dict(output_dir=str(tmp_path / method), method=method, max_steps=1, per_device_train_batch_size=4,
                max_new_tokens=10, disable_tqdm=True, report_to="none", teacher_outputs="online",
                objective="released")  # α = 0.5, λ = 0.5, κ = 0.5: CE_D, method, PT LM and PT KD terms all on
    base.update(kw)
    return DistillConfig(**base)


def _lm_head_calls(model):
    calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def _step(method, student, teacher, pb, norms, hp):
    student.zero_grad(set_to_none=True)
    stats = StepStats()
    calls, handle = _lm_head_calls(student)
    try:
        loss = compute_loss(method, student, teacher, pb, norms, hp, stats)
        loss.backward()
    finally:
        handle.remove()
    grads = {n: p.grad.detach().clone() for n, p in student.named_parameters() if p.grad is not None}
    return loss.detach(), grads, stats, len(calls)


CASES = [(m, None) for m in sorted(METHODS)] + [("dpkd", 5), ("dpkd_token", 5), ("kd", 5), ("sft", 5)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("method", "chunk"), CASES)
def test_fused_step_equals_materialised(tmp_path, toy, tiny, family, method, chunk):
    """Loss, every parameter gradient and the step's statistics agree (float64, rtol 1e-10). chunk=5 forces
    several token chunks and, for the sequence methods, the two-pass path (one pair has > 5 rows)."""
    tok, train, _ = toy
    student, teacher = tiny(family, tok, 0, torch.float64), tiny(family, tok, 1, torch.float64)
    pt = [ex.prompt_ids + ex.response_ids for ex in train[:16]]
    cfg = _cfg(tmp_path, method)
    trainer = DistillTrainer(student, teacher, train, cfg, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, pt_sequences=pt)
    (pb,) = trainer._prepare(0)
    norms = trainer.normalizers([pb])
    fused_cfg = dataclasses.replace(cfg, use_fused=True, fused_chunk_size=chunk)
    loss0, g0, s0, calls0 = _step(method, student, teacher, pb, norms, cfg)
    loss1, g1, s1, calls1 = _step(method, student, teacher, pb, norms, fused_cfg)
    assert calls0 > 0 and calls1 == 0  # the fused path never runs the lm_head module (no logits)
    torch.testing.assert_close(loss1, loss0, rtol=1e-10, atol=0)
    assert g0.keys() == g1.keys() and len(g0) == len(list(student.parameters()))
    # atol: rounding relative to the largest gradient entry (the key-projection bias has an analytically zero
    # gradient, so both paths hold rounding noise there)
    scale = max(float(g.abs().max()) for g in g0.values())
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-10, atol=1e-14 * scale, msg=name)
    assert s0.terms.keys() == s1.terms.keys() >= {"sft_loss", "distil_loss", "pt_lm_loss", "pt_kd_loss"}
    for k in s0.terms:
        assert s1.terms[k] == pytest.approx(s0.terms[k], rel=1e-10, abs=0)
    for field in ("chosen_rewards", "rejected_rewards", "logps_chosen", "logps_rejected"):
        a, b = getattr(s0, field), getattr(s1, field)
        assert len(a) == len(b) == (1 if isinstance(METHODS[method].loss(), PairLoss) else 0)
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=1e-10, atol=0)
    assert len(s0.agreement) == len(s1.agreement)
    for (r0, n0), (r1, n1) in zip(s0.agreement, s1.agreement):
        assert n0 == n1 and r1 == pytest.approx(r0, rel=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_training_run_matches(tmp_path, toy, tiny, family):
    """Two optimizer steps of DPKD (generation, probe, AdamW) give the same parameters and logs either way."""
    tok, train, probe = toy
    states, logs = [], []
    for fused in (False, True):
        student, teacher = tiny(family, tok, 0, torch.float64), tiny(family, tok, 1, torch.float64)
        cfg = _cfg(tmp_path / str(fused), "dpkd", max_steps=2, objective="half", logging_steps=1, eval_steps=2,
                   use_fused=fused)
        res = DistillTrainer(student, teacher, train, cfg, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, probe_examples=probe[:4]).train()
        states.append(student.state_dict())
        logs.append(res.log_history)
    for k in states[0]:
        torch.testing.assert_close(states[1][k], states[0][k], rtol=1e-10, atol=1e-12)
    assert [r.keys() for r in logs[0]] == [r.keys() for r in logs[1]]
    for r0, r1 in zip(*logs):
        for k in r0:
            assert r1[k] == pytest.approx(r0[k], rel=1e-10, abs=1e-12), k


def test_unfusable_head_is_refused(toy, tiny):
    tok, _, _ = toy
    model = tiny("gpt2", tok, 0)
    check_fusable(model)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        check_fusable(model, "student")
    model.config.final_logit_softcapping = None
    model.set_output_embeddings(torch.nn.Identity())
    with pytest.raises(ValueError, match="no linear lm_head"):
        check_fusable(model, "student")


def test_config_and_cli_flag(tmp_path):
    assert DistillConfig(output_dir=str(tmp_path)).use_fused is False
    with pytest.raises(ValueError, match="fused_chunk_size"):
        DistillConfig(output_dir=str(tmp_path), fused_chunk_size=0)
    assert build_parser().parse_args(["distill"]).fused is False
    assert build_parser().parse_args(["distill", "--fused"]).fused is True
    assert PRESETS["default"].use_fused is False


def test_opt_with_project_out(toy):
    """OPT-350m style (word_embed_proj_dim < hidden_size): the lm_head consumes the state after project_out."""
    from transformers import OPTConfig, OPTForCausalLM

    tok, train, _ = toy
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=16, word_embed_proj_dim=8, num_hidden_layers=1,
                                     ffn_dim=32, num_attention_heads=2, dropout=0.0, pad_token_id=tok.pad_token_id,
                                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).double()
    assert model.model.decoder.project_out is not None
    ids = torch.tensor([train[1].prompt_ids + train[1].response_ids])
    fused = model_head(model, _batch(ids, torch.ones_like(ids)), fused=True)
    plain = model_head(model, _batch(ids, torch.ones_like(ids)), fused=False)
    assert fused.hidden.shape[-1] == 8
    torch.testing.assert_close(fused.hidden @ fused.weight.t(), plain.logits, rtol=1e-12, atol=1e-12)
