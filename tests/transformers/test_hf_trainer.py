"""DistillTrainer with models built from transformers configs (GPT-2, OPT and Llama), and exact accumulation."""

import copy

import pytest
import torch
from dpkd.integrations.methods import PairLoss
from dpkd.integrations.transformers.methods import METHODS, Normalizers, PreparedBatch, StepStats, compute_loss
from dpkd.integrations.transformers.trainer import DistillConfig, DistillTrainer


def _cfg(tmp_path, method, **kw):
    base = dict(output_dir=str(tmp_path / method), method=method, max_steps=2, per_device_train_batch_size=4,
                logging_steps=1, eval_steps=2, max_new_tokens=12, disable_tqdm=True, report_to="none",
                teacher_outputs="online", objective="distil-only")
    base.update(kw)
    return DistillConfig(**base)


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_and_teacher_stays_frozen(tmp_path, toy, tiny, family, method):
    tok, train, probe = toy
    student, teacher = tiny(family, tok, 0), tiny(family, tok, 1)
    before_s = copy.deepcopy(student.state_dict())
    before_t = copy.deepcopy(teacher.state_dict())
    trainer = DistillTrainer(student, teacher, train, _cfg(tmp_path, method), pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, probe_examples=probe[:4])
    res = trainer.train()
    final = res.final_metrics
    assert final["step"] == 2 and torch.isfinite(torch.tensor(final["loss"]))
    assert {"grad_norm", "learning_rate", "eval/rkld", "eval/kld", "eval/frozen/rewards/margins",
            "eval/fresh/rewards/accuracies"} <= set(final)
    if isinstance(METHODS[method].loss(), PairLoss):
        assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"} <= set(final)
    assert any(not torch.equal(before_s[k], v) for k, v in student.state_dict().items())
    assert all(torch.equal(before_t[k], v) for k, v in teacher.state_dict().items())
    assert all(not p.requires_grad for p in teacher.parameters())


def test_tensorboard_events_written(tmp_path, toy, tiny):
    tok, train, _ = toy
    cfg = _cfg(tmp_path, "sft", report_to="tensorboard")
    DistillTrainer(tiny("gpt2", tok, 0), None, train, cfg, pad_token_id=tok.pad_token_id,
                   eos_token_id=tok.eos_token_id).train()
    assert list((tmp_path / "sft" / "runs").glob("events.out.tfevents.*"))


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _split(pb, k):
    """The same prepared micro-batch, cut into rows [:k] and [k:]."""
    from dpkd.integrations.transformers.batching import SequenceBatch

    def cut(b, sl):
        return None if b is None else SequenceBatch(b.input_ids[sl], b.attention_mask[sl], b.labels[sl])

    n = pb.n_examples

    def cut_pair(b, sl):  # pair = [chosen rows; rejected rows]
        if b is None:
            return None
        idx = torch.cat([torch.arange(n)[sl], n + torch.arange(n)[sl]])
        return SequenceBatch(b.input_ids[idx], b.attention_mask[idx], b.labels[idx])

    first, second = slice(0, k), slice(k, n)
    return [PreparedBatch(data=cut(pb.data, s), chosen=cut(pb.chosen, s), pair=cut_pair(pb.pair, s),
                          samples=cut(pb.samples, s), n_examples=len(range(n)[s]))
            for s in (first, second)]


@pytest.mark.parametrize("method", ["sft", "kd", "seqkd", "dpkd", "ipo", "cpo", "simpo", "dpkd_token"])
def test_accumulation_is_exact(tmp_path, toy, tiny, method):
    """Σ over micro-batches (global normalisers) of the gradient == the full-batch gradient, float64."""
    tok, train, _ = toy
    student, teacher = tiny("gpt2", tok, 0, torch.float64), tiny("gpt2", tok, 1, torch.float64)
    trainer = DistillTrainer(student, teacher, train, _cfg(tmp_path, method, per_device_train_batch_size=8),
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    (full,) = trainer._prepare(0)
    compute_loss(method, student, teacher, full, trainer.normalizers([full]), trainer.config, StepStats()).backward()
    g_full = _grads(student)
    student.zero_grad(set_to_none=True)
    parts = _split(full, 3)  # uneven halves with different token counts
    norms = trainer.normalizers(parts)
    assert norms == trainer.normalizers([full])
    for pb in parts:
        compute_loss(method, student, teacher, pb, norms, trainer.config, StepStats()).backward()
    g_acc = _grads(student)
    assert g_full.keys() == g_acc.keys()
    for k in g_full:
        torch.testing.assert_close(g_acc[k], g_full[k], rtol=1e-12, atol=1e-14)
    # the naive way (each micro-batch normalised by its own counts) is NOT exact: the test can fail
    student.zero_grad(set_to_none=True)
    for pb in parts:
        compute_loss(method, student, teacher, pb, trainer.normalizers([pb]), trainer.config, StepStats()).backward()
    naive = _grads(student)
    assert any(not torch.allclose(naive[k], g_full[k], rtol=1e-6, atol=0) for k in g_full)


def test_accumulation_end_to_end(tmp_path, toy, tiny):
    """B = 8 × G = 1 and B = 4 × G = 2 give the same parameters after three optimizer steps (float64)."""
    tok, train, _ = toy
    results = []
    for bs, ga in ((8, 1), (4, 2)):
        student, teacher = tiny("opt", tok, 0, torch.float64), tiny("opt", tok, 1, torch.float64)
        cfg = _cfg(tmp_path / f"{bs}", "kd", max_steps=3, per_device_train_batch_size=bs,
                   gradient_accumulation_steps=ga, eval_steps=0)
        DistillTrainer(student, teacher, train, cfg, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id).train()
        results.append(student.state_dict())
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-10, atol=1e-12)


def test_config_errors(tmp_path, toy, tiny):
    tok, train, _ = toy
    with pytest.raises(ValueError, match="`method`"):
        DistillConfig(output_dir=str(tmp_path), method="nope")
    with pytest.raises(ValueError, match="save_steps"):
        DistillConfig(output_dir=str(tmp_path), save_steps=3, logging_steps=2)
    with pytest.raises(ValueError, match="needs a `teacher`"):
        DistillTrainer(tiny("gpt2", tok, 0), None, train, _cfg(tmp_path, "dpkd"), pad_token_id=0, eos_token_id=1)
    big = tiny("gpt2", tok, 1)
    big.resize_token_embeddings(len(tok) + 3)
    with pytest.raises(ValueError, match="vocabulary sizes differ"):
        DistillTrainer(tiny("gpt2", tok, 0), big, train, _cfg(tmp_path, "kd"), pad_token_id=0, eos_token_id=1)


def test_normalizers_are_global():
    n = Normalizers(examples=8, data_tokens=40)
    assert n.chosen_tokens == 0 and n.pt_tokens == 0
