"""Every method of the method table, as the trainer computes it, against an independent float64 computation:
the NumPy spec (``dpkd.spec``) applied to the models' own logits, TRL's GKD loss, and an explicit-loop
re-derivation of the MiniLLM surrogate."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from dpkd import spec
from dpkd.integrations.methods import METHODS, TABLE1, VARIANTS, PairLoss
from dpkd.integrations.transformers.methods import StepStats, compute_loss
from dpkd.integrations.transformers.trainer import DistillConfig, DistillTrainer

ARGS = {"kd": {"temperature": 2.0}, "akl": {"mu": 0.4}, "gkd": {"beta": 0.3, "lmbda": 1.0, "temperature": 1.5},
        "minillm": {"mix_alpha": 0.3}, "dpkd": {"beta": 0.7, "label_smoothing": 0.1}, "dpkd_eq8": {"beta": 0.05},
        "dpkd_token": {"beta": 0.4}, "ipo": {"tau": 0.5}, "cpo": {"beta": 0.3, "nll_weight": 0.7},
        "simpo": {"beta": 2.5, "gamma": 0.4}}


def _setup(tmp_path, toy, tiny, method, **kw):
    tok, train, _ = toy
    student, teacher = tiny("gpt2", tok, 0, torch.float64), tiny("gpt2", tok, 1, torch.float64)
    # pre-generated y_t (here: the dataset response); copies, the session fixture stays untouched
    train = [dataclasses.replace(ex, teacher_ids=ex.response_ids) for ex in train]
    cfg = DistillConfig(output_dir=str(tmp_path), method=method, method_args=ARGS.get(method, {}), max_steps=1,
                        per_device_train_batch_size=6, max_new_tokens=10, disable_tqdm=True, report_to="none",
                        teacher_outputs="pregenerated", objective=kw.pop("objective", "distil-only"), **kw)
    trainer = DistillTrainer(student, teacher, train, cfg, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, pt_sequences=[ex.prompt_ids for ex in train[:8]])
    return trainer, student, teacher


def _np_logits(model, batch):
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.numpy()
    return spec.shift_for_causal_lm(logits, batch.labels.numpy())


def _reference(method, trainer, pb, norms, student, teacher):
    """The method's loss from the spec, computed from scratch on the same batch."""
    hp = trainer.config.method_args
    if method == "sft":
        return spec.cross_entropy(*_np_logits(student, pb.data), normalizer=norms.data_tokens)
    if method == "seqkd":
        return spec.cross_entropy(*_np_logits(student, pb.chosen), normalizer=norms.chosen_tokens)
    if method in ("kd", "akl", "gkd", "dpkd_token"):
        target, n = {"kd": (pb.data, norms.data_tokens), "akl": (pb.data, norms.data_tokens),
                     "gkd": (pb.samples, norms.sample_tokens), "dpkd_token": (pb.chosen, norms.chosen_tokens)}[method]
        s, labels = _np_logits(student, target)
        t, _ = _np_logits(teacher, target)
        mask = labels != -100
        if method == "kd":
            return spec.forward_kl(s, t, mask, temperature=hp["temperature"], normalizer=n)
        if method == "akl":
            return spec.akl(s, t, mask, mu=hp["mu"], normalizer=n)
        if method == "gkd":
            return spec.generalized_jsd(s, t, mask, beta=hp["beta"], temperature=hp["temperature"], normalizer=n)
        return spec.dpkd_token_loss(s, t, mask, beta=hp["beta"], normalizer=n).loss
    if method == "minillm":
        return _minillm_loops(student, teacher, pb, norms, hp)
    ab, n_tok = spec.sequence_logps(*_np_logits(student, pb.pair))
    cd, _ = spec.sequence_logps(*_np_logits(teacher, pb.pair))
    k = pb.n_examples
    a, b, c, d = ab[:k], ab[k:], cd[:k], cd[k:]
    lt, ls = n_tok[:k].astype(float), n_tok[k:].astype(float)
    fn = {"dpkd": lambda: spec.dpkd_loss(a, b, c, d, chosen_lengths=lt, rejected_lengths=ls, beta=hp["beta"],
                                         label_smoothing=hp["label_smoothing"], reduction="sum"),
          "dpkd_eq8": lambda: spec.dpkd_loss(a, b, c, d, beta=hp["beta"], reduction="sum"),
          "ipo": lambda: spec.ipo_loss(a, b, c, d, tau=hp["tau"], chosen_lengths=lt, rejected_lengths=ls,
                                       length_normalize=True, reduction="sum"),
          "cpo": lambda: spec.cpo_loss(a, b, beta=hp["beta"], nll_weight=hp["nll_weight"], chosen_lengths=lt,
                                       reduction="sum"),
          "simpo": lambda: spec.simpo_loss(a, b, chosen_lengths=lt, rejected_lengths=ls, beta=hp["beta"],
                                           gamma=hp["gamma"], reduction="sum")}[method]
    return fn().loss / norms.examples


def _minillm_loops(student, teacher, pb, norms, hp):
    """MiniLLM's surrogate with explicit loops over rows and positions (MiniLLM Eq. 7): Σ_t w_t·[KL_t(q‖p) −
    R^Norm_{t+1}·log q(y_t)] / N, with R^Norm_{t+1} the mean of log p/q over the tokens after t."""
    s, labels = _np_logits(student, pb.samples)
    t, _ = _np_logits(teacher, pb.samples)
    total, alpha = 0.0, hp["mix_alpha"]
    for r in range(labels.shape[0]):
        pos = [j for j in range(labels.shape[1]) if labels[r, j] != -100]
        lq = [s[r, j] - np.logaddexp.reduce(s[r, j]) for j in pos]
        lp = [t[r, j] - np.logaddexp.reduce(t[r, j]) for j in pos]
        tok = [labels[r, j] for j in pos]
        rew = [lp[i][tok[i]] - lq[i][tok[i]] for i in range(len(pos))]
        for i in range(len(pos)):
            future = rew[i + 1 :]
            ret = sum(future) / len(future) if future else 0.0
            q_tok = math.exp(lq[i][tok[i]])
            w = q_tok / (alpha * math.exp(lp[i][tok[i]]) + (1 - alpha) * q_tok)
            kl = float(np.sum(np.exp(lq[i]) * (lq[i] - lp[i])))
            total += w * (kl - ret * lq[i][tok[i]])
    return total / norms.sample_tokens


@pytest.mark.parametrize("method", TABLE1 + VARIANTS)
def test_method_loss_equals_independent_float64(tmp_path, toy, tiny, method):
    trainer, student, teacher = _setup(tmp_path, toy, tiny, method)
    torch.manual_seed(3)
    (pb,) = trainer._prepare(0)
    norms = trainer.normalizers([pb])
    loss = compute_loss(method, student, teacher, pb, norms, trainer.config, StepStats())
    want = float(_reference(method, trainer, pb, norms, student, teacher))
    assert float(loss) == pytest.approx(want, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("method", ["dpkd", "kd"])
def test_paper_objective_adds_lambda_pt(tmp_path, toy, tiny, method):
    """paper preset: L = L_method + 0.5·CE(D_p) (Algorithm 1), the PT term recomputed from the spec."""
    trainer, student, teacher = _setup(tmp_path, toy, tiny, method, objective="paper")
    torch.manual_seed(3)
    (pb,) = trainer._prepare(0)
    norms = trainer.normalizers([pb])
    loss = compute_loss(method, student, teacher, pb, norms, trainer.config, StepStats())
    pt = spec.cross_entropy(*_np_logits(student, pb.pt), normalizer=norms.pt_tokens)
    want = float(_reference(method, trainer, pb, norms, student, teacher)) + 0.5 * float(pt)
    assert float(loss) == pytest.approx(want, rel=1e-10)


def test_cached_teacher_logps_are_used_and_equal(tmp_path, toy, tiny):
    """With c = log p(y_t) cached on the examples the teacher runs on y_s rows only; same loss either way."""
    trainer, student, teacher = _setup(tmp_path, toy, tiny, "dpkd")
    from dpkd.integrations.transformers.batching import pad_pairs
    from dpkd.integrations.transformers.heads import model_head, sequence_logps

    exs = trainer.examples
    with torch.no_grad():
        c, _ = sequence_logps(model_head(teacher, pad_pairs([e.prompt_ids for e in exs],
                                                            [e.teacher_ids for e in exs], 0), fused=False))
    for e, v in zip(exs, c.tolist(), strict=True):
        e.teacher_logp = v
    torch.manual_seed(3)
    (pb,) = trainer._prepare(0)
    assert pb.chosen_teacher_logps is not None
    norms = trainer.normalizers([pb])
    cached = compute_loss("dpkd", student, teacher, pb, norms, trainer.config, StepStats())
    rows = []
    handle = teacher.register_forward_hook(lambda m, args, kw, out: rows.append(kw["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        compute_loss("dpkd", student, teacher, pb, norms, trainer.config, StepStats())
    finally:
        handle.remove()
    assert rows == [pb.n_examples]  # y_s rows only
    pb.chosen_teacher_logps = None
    fresh = compute_loss("dpkd", student, teacher, pb, norms, trainer.config, StepStats())
    assert float(cached) == pytest.approx(float(fresh), rel=1e-12)


def test_gkd_divergence_equals_trl(toy, tiny):
    """Our generalised JSD on a batch == TRL's GKDTrainer.generalized_jsd_loss (TRL 1.16, same β convention)."""
    gkd_trainer = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    from dpkd.integrations.transformers.heads import model_head, token_divergence

    tok, train, _ = toy
    student, teacher = tiny("gpt2", tok, 0, torch.float64), tiny("opt", tok, 1, torch.float64)
    from dpkd.integrations.transformers.batching import pad_pairs

    batch = pad_pairs([e.prompt_ids for e in train[:5]], [e.response_ids for e in train[:5]], tok.pad_token_id)
    s, t = model_head(student, batch, fused=False), model_head(teacher, batch, fused=False)
    for beta in (0.0, 0.3, 0.9, 1.0):
        ours = token_divergence("generalized_jsd", s, t, normalizer=None, beta=beta, temperature=0.8)
        theirs = gkd_trainer.GKDTrainer.generalized_jsd_loss(s.logits, t.logits, labels=s.labels, beta=beta,
                                                             temperature=0.8)
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_gkd_lambda_picks_on_policy_steps(tmp_path, toy, tiny):
    """λ = 0: never on-policy; λ = 1: always; λ = 0.5: some steps of each (TRL's per-step coin)."""
    draws = {}
    for lmbda in (0.0, 0.5, 1.0):
        trainer, _, _ = _setup(tmp_path, toy, tiny, "gkd")
        trainer.loss_spec = METHODS["gkd"].loss({"lmbda": lmbda})
        draws[lmbda] = [trainer._on_policy_step(s) for s in range(40)]
    assert not any(draws[0.0]) and all(draws[1.0])
    assert 5 < sum(draws[0.5]) < 35


def test_every_table_method_has_a_reference_here():
    assert set(TABLE1 + VARIANTS) == set(METHODS)
    assert {m for m in METHODS if isinstance(METHODS[m].loss(), PairLoss)} == {"dpkd", "dpkd_eq8", "ipo", "cpo",
                                                                                "simpo"}
