"""The experiment protocol of the trainer: continuing the SFT start (optimizer state, data stream, RNG), the
warm-up + cosine schedule, the objective presets and the sampling temperatures."""

import pytest
import torch
from dpkd.integrations.transformers.batching import generate
from dpkd.integrations.transformers.checkpoint import latest_checkpoint
from dpkd.integrations.transformers.trainer import DistillConfig, DistillTrainer


def _cfg(out, method="sft", **kw):
    base = dict(output_dir=str(out), method=method, max_steps=4, per_device_train_batch_size=4, logging_steps=1,
                disable_tqdm=True, report_to="none", objective="distil-only", lr_scheduler_type="constant",
                learning_rate=1e-2, max_new_tokens=8)
    base.update(kw)
    return DistillConfig(**base)


def _trainer(tok, train, student, cfg, teacher=None, **kw):
    return DistillTrainer(student, teacher, train, cfg, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          **kw)


def test_continuation_equals_one_uninterrupted_run(tmp_path, toy, tiny):
    """4 SFT steps, then 3 more continuing them (init_from) == 7 steps in one run: the AdamW moments and step
    count, the data stream (batch 4 follows batch 3, nothing replayed) and the RNG all carry over (float64)."""
    tok, train, _ = toy
    whole = tiny("gpt2", tok, 0, torch.float64)
    _trainer(tok, train, whole, _cfg(tmp_path / "whole", max_steps=7)).train()
    first = tiny("gpt2", tok, 0, torch.float64)
    _trainer(tok, train, first, _cfg(tmp_path / "first", max_steps=4)).train()
    second = tiny("gpt2", tok, 7, torch.float64)  # other weights: they must be replaced by the checkpoint's
    tr = _trainer(tok, train, second, _cfg(tmp_path / "second", max_steps=3))
    res = tr.train(init_from=latest_checkpoint(tmp_path / "first"))
    assert res.global_step == 7 and [r["step"] for r in res.log_history] == [5, 6, 7]
    assert int(tr.optimizer.state_dict()["state"][0]["step"]) == 7  # AdamW's bias correction went on
    for (n, p), (_, q) in zip(whole.named_parameters(), second.named_parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14, msg=n)
    # the naive protocol (fresh optimizer, data from batch 0) ends elsewhere: the test can fail
    naive = tiny("gpt2", tok, 0, torch.float64)
    _trainer(tok, train, naive, _cfg(tmp_path / "n1", max_steps=4)).train()
    _trainer(tok, train, naive, _cfg(tmp_path / "n2", max_steps=3)).train()
    assert any(not torch.allclose(p, q) for p, q in zip(whole.parameters(), naive.parameters(), strict=True))


def test_continuing_method_reads_new_batches(tmp_path, toy, tiny):
    tok, train, _ = toy
    model = tiny("gpt2", tok, 0)
    _trainer(tok, train, model, _cfg(tmp_path / "init", max_steps=4)).train()
    tr = _trainer(tok, train, model, _cfg(tmp_path / "kd", "kd", max_steps=2), teacher=tiny("gpt2", tok, 1))
    seen = []
    tr.callbacks.append(lambda t, step, logs: seen.append(step))
    original = tr._batch_indices
    used = []
    tr._batch_indices = lambda gb: used.append(gb) or original(gb)
    tr.train(init_from=latest_checkpoint(tmp_path / "init"))
    assert used == [4, 5] and seen == [5, 6]


def test_warmup_then_cosine_is_the_released_schedule(tmp_path, toy, tiny):
    """transformers' warm-up (lr·s/W), then lr_at equals torch's CosineAnnealingLR (eta_min = min_learning_rate)
    step by step: the released code's cosine."""
    tok, train, _ = toy
    cfg = _cfg(tmp_path, max_steps=20, warmup_steps=4, lr_scheduler_type="cosine", learning_rate=5e-4,
               min_learning_rate=1e-7)
    tr = _trainer(tok, train, tiny("gpt2", tok, 0), cfg)
    assert [tr.lr_at(s) for s in range(4)] == pytest.approx([5e-4 * k / 4 for k in (0, 1, 2, 3)], rel=1e-12)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=16, eta_min=1e-7)
    ref = []
    for _ in range(16):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [tr.lr_at(s) for s in range(4, 20)] == pytest.approx(ref, rel=1e-9)


def test_schedule_restarts_for_a_continuing_run(tmp_path, toy, tiny):
    tok, train, _ = toy
    model = tiny("gpt2", tok, 0)
    _trainer(tok, train, model, _cfg(tmp_path / "init", max_steps=3)).train()
    cfg = _cfg(tmp_path / "m", max_steps=4, warmup_steps=2, lr_scheduler_type="cosine", learning_rate=1e-3)
    res = _trainer(tok, train, model, cfg).train(init_from=latest_checkpoint(tmp_path / "init"))
    # warm-up over this run's first 2 steps (transformers: lr·s/W), then CosineAnnealingLR(T_max = 2)
    assert [r["learning_rate"] for r in res.log_history] == pytest.approx([0.0, 5e-4, 1e-3, 0.5e-3 + 0.5e-7],
                                                                         rel=1e-9)


PRESET_COEFFICIENTS = [("paper", (0.0, 1.0, 0.5, 0.0)), ("released", (0.5, 0.5, 0.25, 0.25)),
                       ("half", (0.5, 0.5, 0.0, 0.0)), ("distil-only", (0.0, 1.0, 0.0, 0.0))]


@pytest.mark.parametrize(("preset", "expected"), PRESET_COEFFICIENTS)
def test_objective_presets(tmp_path, preset, expected):
    coef = DistillConfig(output_dir=str(tmp_path), objective=preset).objective.coefficients()
    assert tuple(coef[k] for k in ("sft_loss", "distil_loss", "pt_lm_loss", "pt_kd_loss")) == expected
    with pytest.raises(ValueError, match="objective preset"):
        DistillConfig(output_dir=str(tmp_path), objective="nope")


def test_sampling_temperature_reaches_the_samples(tmp_path, toy, tiny):
    """y_s at a tiny temperature is the greedy response; at T = 1 it is not (so the knob is wired)."""
    tok, train, _ = toy
    student, teacher = tiny("gpt2", tok, 0), tiny("gpt2", tok, 1)
    greedy = generate(student, [ex.prompt_ids for ex in train[:4]], pad_id=tok.pad_token_id,
                      eos_id=tok.eos_token_id, max_new_tokens=8, do_sample=False)

    def y_s(temperature):
        tr = _trainer(tok, train, student, _cfg(tmp_path, "dpkd", sample_temperature=temperature,
                                                teacher_outputs="dataset"), teacher=teacher)
        tr._batch_indices = lambda gb: [0, 1, 2, 3]
        torch.manual_seed(0)
        (pb,) = tr._prepare(0)
        return [row[row != -100].tolist() for row in pb.pair.labels[4:]]

    cold, hot = y_s(1e-4), y_s(1.0)
    assert cold == greedy
    assert hot != greedy


def test_config_range_errors(tmp_path):
    for kw, match in (({"sample_temperature": 0.0}, "sample_temperature"), ({"warmup_steps": 200}, "warmup_steps"),
                      ({"min_learning_rate": 1.0}, "min_learning_rate"),
                      ({"method": "dpkd", "method_args": {"beta": -1.0}}, "beta"),
                      ({"method": "dpkd", "method_args": {"tau": 1.0}}, "no hyper-parameter 'tau'")):
        with pytest.raises(ValueError, match=match):
            DistillConfig(output_dir=str(tmp_path), **kw)


def test_probe_frozen_pairs_against_spec(toy, tiny):
    """Frozen pairs are fixed by the start student and the seed (not by later calls); their rewards are
    β·(log q/p) of Eq. 29 recomputed from the spec; fresh pairs obey margin/β = −(kl_seq + rkl_seq)."""
    import numpy as np
    from dpkd import spec
    from dpkd.integrations.transformers.batching import pad_pairs
    from dpkd.integrations.transformers.probe import Probe, ProbeOptions

    tok, _, probe_ex = toy
    student, teacher = tiny("gpt2", tok, 0, torch.float64), tiny("opt", tok, 1, torch.float64)
    opts = ProbeOptions(beta=0.3, max_new_tokens=8, seed=5)
    p1 = Probe(probe_ex, teacher, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, options=opts)
    p2 = Probe(probe_ex, teacher, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, options=opts)
    p1.start(student)
    torch.manual_seed(99)  # the caller's RNG does not matter
    p2.start(student)
    assert p1.frozen[0] == p2.frozen[0] and p1.y_t == p2.y_t

    def logps(model, responses):
        b = pad_pairs([e.prompt_ids for e in probe_ex], responses, tok.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.numpy()
        return spec.sequence_logps(*spec.shift_for_causal_lm(logits, b.labels.numpy()))[0]

    m = p1.metrics(student, step=3)
    a, c = logps(student, p1.y_t), logps(teacher, p1.y_t)
    b, d = logps(student, p1.frozen[0]), logps(teacher, p1.frozen[0])
    margin = 0.3 * ((a - c) - (b - d))
    assert m["eval/frozen/rewards/margins"] == pytest.approx(float(np.mean(margin)), rel=1e-10)
    distinct = np.array([list(t) != list(y) for t, y in zip(p1.y_t, p1.frozen[0], strict=True)])
    assert distinct.any()
    assert m["eval/frozen/rewards/accuracies"] == pytest.approx(float(np.mean(margin[distinct] > 0)))
    assert m["eval/frozen/ties"] == pytest.approx(float(np.mean(~distinct)))
    # DPO's probe on the same pairs (start student as reference): 0 at the start, then margin − start margin
    start = p1.metrics(student, step=0)
    assert start["eval/frozen/gain/margins"] == 0.0 and start["eval/frozen/gain/accuracies"] == 0.0
    moved = tiny("gpt2", tok, 3, torch.float64)
    m2 = p1.metrics(moved, step=4)
    a2, b2 = logps(moved, p1.y_t), logps(moved, p1.frozen[0])
    gain = 0.3 * ((a2 - a) - (b2 - b))
    assert m2["eval/frozen/gain/margins"] == pytest.approx(float(np.mean(gain[distinct])), rel=1e-10)
    assert m2["eval/frozen/gain/accuracies"] == pytest.approx(float(np.mean(gain[distinct] > 0)))
    assert m["eval/fresh/rewards/margins"] / 0.3 == pytest.approx(-(m["eval/fresh/kl_seq"] + m["eval/fresh/rkl_seq"]),
                                                                  rel=1e-9)
    restored = Probe(probe_ex, teacher, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, options=opts)
    restored.load_state(p1.state())
    assert restored.metrics(student, step=3) == m
