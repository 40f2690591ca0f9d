"""DPKD inside TRL 1.16: the DistillationTrainer and DPOTrainer subclasses give the loss and gradients of
dpkd's own trainer on the same batch (float64), TRL's own DPO losses with the teacher as reference are DPKD
Eq. 8 / Eq. 9, and a few real training steps log TRL's metric names."""

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from dpkd.integrations.transformers.batching import pad_pairs  # noqa: E402
from dpkd.integrations.transformers.methods import Normalizers, PreparedBatch, StepStats, compute_loss  # noqa: E402
from dpkd.integrations.transformers.trainer import DistillConfig  # noqa: E402
from dpkd.integrations.trl import (  # noqa: E402
    TRL_METRICS,
    DPKDDistillationConfig,
    DPKDDistillationTrainer,
    DPKDDPOConfig,
    DPKDDPOTrainer,
    dpkd_preference_rows,
)

N = 4


def _batch(toy):
    tok, train, _ = toy
    exs = train[:N]
    prompts = [ex.prompt_ids for ex in exs]
    y_t = [ex.response_ids for ex in exs]  # the teacher outputs (given)
    y_s = [ex.response_ids[-2::-1][:5] + [tok.eos_token_id] for ex in exs]  # other responses (given), EOS last
    return tok, exs, prompts, y_t, y_s


def _reference(method, args, student, teacher, prompts, y_t, y_s, pad):
    """dpkd's own trainer path: compute_loss on the prepared pair batch, global normalisers of the step."""
    cfg = DistillConfig(output_dir="unused", method=method, method_args=args, objective="distil-only")
    chosen = pad_pairs(prompts, y_t, pad)
    pb = PreparedBatch(data=chosen, chosen=chosen, pair=pad_pairs(prompts + prompts, y_t + y_s, pad), n_examples=N)
    norms = Normalizers(examples=N, data_tokens=chosen.n_response_tokens, chosen_tokens=chosen.n_response_tokens)
    student.zero_grad(set_to_none=True)
    loss = compute_loss(method, student, teacher, pb, norms, cfg, StepStats())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _close(got, ref):
    loss, grads = got
    ref_loss, ref_grads = ref
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    assert grads.keys() == ref_grads.keys()
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-9, atol=1e-13 * scale, msg=k)


def _distill_args(tmp_path, method, args, **kw):
    return DPKDDistillationConfig(str(tmp_path), dpkd_method=method, dpkd_args=args, use_cpu=True, bf16=False,
                                  gradient_checkpointing=False, report_to="none", per_device_train_batch_size=N,
                                  max_completion_length=8, logging_steps=1, save_strategy="no", **kw)


def _left(rows, pad):
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    return ids, (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()


def _right(rows, pad):
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    return ids, (torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()


@pytest.mark.parametrize(("method", "args"), [("dpkd", {"beta": 0.5}), ("dpkd_eq8", {}), ("dpkd_token", {}),
                                              ("ipo", {}), ("simpo", {})])
def test_distillation_trainer_loss_equals_dpkd_trainer(tmp_path, toy, tiny, method, args):
    tok, exs, prompts, y_t, y_s = _batch(toy)
    student, teacher = tiny("gpt2", tok, 0, torch.float64), tiny("gpt2", tok, 1, torch.float64)
    ds = Dataset.from_dict({"prompt": ["x"] * N, "teacher_completion": ["y"] * N})
    trainer = DPKDDistillationTrainer(student, teacher_model=teacher, args=_distill_args(tmp_path, method, args),
                                      train_dataset=ds, processing_class=tok)
    p_ids, p_mask = _left(prompts, tok.pad_token_id)  # TRL's layout: prompts left-, completions right-padded
    c_ids, c_mask = _right(y_s, tok.pad_token_id)
    inputs = {"prompt_ids": p_ids, "prompt_mask": p_mask, "completion_ids": c_ids, "completion_mask": c_mask,
              "teacher_ids": y_t, "num_pairs_in_batch": torch.tensor(float(N)),
              "num_teacher_tokens_in_batch": torch.tensor(float(sum(map(len, y_t)))),
              "num_items_in_batch": c_mask.sum()}
    trainer.model.train()
    student.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    ref = _reference(method, trainer.args.dpkd_args, student, teacher, prompts, y_t, y_s, tok.pad_token_id)
    _close((loss.detach(), _grads(student)), ref)
    if method != "dpkd_token":
        assert set(TRL_METRICS) <= set(trainer._metrics["train"])


def _dpo(tmp_path, tok, student, teacher, rows, method, args, loss_type="sigmoid", beta=0.1):
    cfg = DPKDDPOConfig(str(tmp_path), dpkd_method=method, dpkd_args=args, loss_type=loss_type, beta=beta,
                        use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=N,
                        gradient_checkpointing=False, logging_steps=1, save_strategy="no", max_length=None)
    return DPKDDPOTrainer(student, ref_model=teacher, args=cfg, train_dataset=Dataset.from_list(rows),
                          processing_class=tok)


@pytest.mark.parametrize(("method", "trl_loss"), [("dpkd_eq8", "sigmoid"), ("dpkd", "sigmoid_norm")])
def test_dpo_trainer_loss_equals_dpkd_and_trls_own(tmp_path, toy, tiny, method, trl_loss):
    """The DPOTrainer subclass == dpkd's trainer; TRL's own DPO loss with the teacher as reference ==
    DPKD Eq. 8 (sigmoid) / Eq. 9 (sigmoid_norm): an independent implementation agreeing."""
    tok, exs, prompts, y_t, y_s = _batch(toy)
    student, teacher = tiny("gpt2", tok, 0, torch.float64), tiny("gpt2", tok, 1, torch.float64)
    text = lambda ids: " " + tok.decode([t for t in ids if t != tok.eos_token_id])  # noqa: E731
    rows = [{"prompt": tok.decode(p), "chosen": text(t), "rejected": text(s)} for p, t, s in zip(prompts, y_t, y_s)]
    beta = 0.3
    trainer = _dpo(tmp_path, tok, student, teacher, rows, method, {"beta": beta}, loss_type=trl_loss, beta=beta)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(N)])
    seqs = [r[m.bool()].tolist() for r, m in zip(batch["input_ids"], batch["completion_mask"])]
    assert seqs == y_t + y_s  # TRL tokenised the text rows back into exactly these completions
    trainer.model.train()
    student.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    got = (loss.detach(), _grads(student))
    _close(got, _reference(method, {"beta": beta}, student, teacher, prompts, y_t, y_s, tok.pad_token_id))
    student.zero_grad(set_to_none=True)
    trl_own = trl.DPOTrainer.compute_loss(trainer, trainer.model, batch)  # TRL's loss_type, ref = teacher
    trl_own.backward()
    _close((trl_own.detach().double(), _grads(student)), got)
    assert set(TRL_METRICS) <= set(trainer._metrics["train"])


def test_training_steps_log_trls_metrics_and_keep_the_teacher(tmp_path, toy, tiny):
    tok, exs, prompts, y_t, _ = _batch(toy)
    student, teacher = tiny("gpt2", tok, 0), tiny("gpt2", tok, 1)
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    before_s = {k: v.clone() for k, v in student.state_dict().items()}
    texts = [tok.decode(ex.prompt_ids) for ex in exs]
    ds = Dataset.from_dict({"prompt": texts, "teacher_completion": [tok.decode(ex.response_ids[:-1]) for ex in exs]})
    distill = DPKDDistillationTrainer(student, teacher_model=teacher,
                                      args=_distill_args(tmp_path / "d", "dpkd", {}, max_steps=2), train_dataset=ds,
                                      processing_class=tok)
    res = distill.train()
    assert res.global_step == 2
    rows = dpkd_preference_rows(student, tok, prompts, y_t, max_new_tokens=8)
    assert rows == dpkd_preference_rows(student, tok, prompts, y_t, max_new_tokens=8)  # keyed: reproducible
    dpo = _dpo(tmp_path / "p", tok, student, teacher, rows, "dpkd", {})
    dpo.args.max_steps = 2
    dpo.train()
    distill_keys = set().union(*res_logs) if (res_logs := distill.state.log_history) else set()
    assert {"loss", "grad_norm", "learning_rate", "entropy", "completions/mean_length", *TRL_METRICS} <= distill_keys
    assert {"loss", "grad_norm", "learning_rate", *TRL_METRICS} <= set().union(*dpo.state.log_history)
    assert all(torch.equal(before_t[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(before_s[k], v) for k, v in student.state_dict().items())
