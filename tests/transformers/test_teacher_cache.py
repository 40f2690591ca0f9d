"""The teacher log-prob cache: values against the float64 spec, exact at k = V, reused without a teacher
forward, invalidated by a changed teacher or tokenizer, and the trainer's results unchanged by it."""

import copy

import numpy as np
import pytest
import torch
from dpkd.integrations.transformers.batching import pad_pairs
from dpkd.integrations.transformers.teacher_cache import TeacherLogpCache, dense_teacher_logps, example_id
from dpkd.integrations.transformers.trainer import DistillConfig, DistillTrainer
from dpkd.spec import shift_for_causal_lm, token_logps


def _with_y_t(train, n=12):
    exs = copy.deepcopy(train[:n])
    for i, ex in enumerate(exs):  # a deterministic "teacher output": the response, shortened for some
        ex.teacher_ids = ex.response_ids[: 3 + i % 5] + ex.response_ids[-1:]
    return exs


def _forward_rows(model):
    rows = []
    model.register_forward_hook(lambda m, args, kw, out: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    return rows


def test_token_logps_are_the_teachers(tmp_path, toy, tiny):
    tok, train, _ = toy
    teacher = tiny("gpt2", tok, 1, torch.float64)
    exs = _with_y_t(train)
    got = TeacherLogpCache(tmp_path, teacher, tok, dtype=torch.float64).entries(exs)
    batch = pad_pairs([ex.prompt_ids for ex in exs], [ex.teacher_ids for ex in exs], tok.pad_token_id)
    with torch.no_grad():
        logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.numpy()
    lg, lb = shift_for_causal_lm(logits, batch.labels.numpy())
    ref = token_logps(lg, lb)  # the float64 spec
    for i, (ex, e) in enumerate(zip(exs, got, strict=True)):
        assert e.token_logps.shape == (len(ex.teacher_ids),)
        np.testing.assert_allclose(e.token_logps.numpy(), ref[i][lb[i] != -100], rtol=1e-12, atol=1e-12)


def test_fused_scoring_equals_the_materialised_one(tmp_path, toy, tiny):
    """``fused=True`` (the token-chunked lm_head path, no [B, T, V] logits) scores the same log-probs."""
    tok, train, _ = toy
    teacher = tiny("gpt2", tok, 1, torch.float64)
    exs = _with_y_t(train)
    plain = TeacherLogpCache(tmp_path / "plain", teacher, tok, dtype=torch.float64).entries(exs)
    fused = TeacherLogpCache(tmp_path / "fused", teacher, tok, dtype=torch.float64, fused=True).entries(exs)
    for a, b in zip(plain, fused, strict=True):
        torch.testing.assert_close(b.token_logps, a.token_logps, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="`fused`.*top_k = 0"):
        TeacherLogpCache(tmp_path, teacher, tok, fused=True, top_k=4)


def test_top_k_equal_to_vocabulary_is_exact_and_smaller_k_is_not(tmp_path, toy, tiny):
    tok, train, _ = toy
    teacher = tiny("gpt2", tok, 1, torch.float64)
    exs = _with_y_t(train, 6)
    vocab = len(tok)
    batch = pad_pairs([ex.prompt_ids for ex in exs], [ex.teacher_ids for ex in exs], tok.pad_token_id)
    with torch.no_grad():
        exact = torch.log_softmax(teacher(input_ids=batch.input_ids).logits[:, :-1], -1)
    labels = batch.labels[:, 1:]
    mask = labels != -100
    errors = []
    for k in (1, 8, vocab):
        ents = TeacherLogpCache(tmp_path / str(k), teacher, tok, dtype=torch.float64, top_k=k).entries(exs)
        dense = dense_teacher_logps(ents, labels, vocab)
        torch.testing.assert_close(dense[mask].exp().sum(-1), torch.ones(int(mask.sum()), dtype=torch.float64))
        errors.append(float((dense[mask].exp() - exact[mask].exp()).abs().sum(-1).max()))
    assert errors[2] < 1e-12 and errors[0] > errors[1] > 1e-6


def test_reused_without_teacher_and_invalidated_by_a_change(tmp_path, toy, tiny):
    tok, train, _ = toy
    teacher = tiny("gpt2", tok, 1)
    exs = _with_y_t(train)
    first = TeacherLogpCache(tmp_path, teacher, tok, top_k=4)
    a = first.entries(exs)
    assert first.scored == len(exs)
    rows = _forward_rows(teacher)
    again = TeacherLogpCache(tmp_path, teacher, tok, top_k=4)
    b = again.entries(exs[::-1])
    assert again.scored == 0 and rows == []  # no teacher forward on a warm cache
    assert all(torch.equal(x.token_logps, y.token_logps) and torch.equal(x.topk_ids, y.topk_ids)
               for x, y in zip(a, b[::-1], strict=True))
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # one file, no temporary left
    changed = copy.deepcopy(teacher)
    with torch.no_grad():
        changed.lm_head.weight[0, 0] += 1e-3
    other = TeacherLogpCache(tmp_path, changed, tok, top_k=4)
    assert other.path != first.path and other.entries(exs) and other.scored == len(exs)
    tok2 = copy.deepcopy(tok)
    tok2.add_tokens(["zzz-new-word"])
    assert TeacherLogpCache(tmp_path, teacher, tok2, top_k=4).path != first.path
    assert TeacherLogpCache(tmp_path, teacher, tok, top_k=4, dtype=torch.float64).path != first.path
    assert example_id([1, 2], [3]) != example_id([1], [2, 3])


def test_bad_arguments(tmp_path, toy, tiny):
    tok, train, _ = toy
    teacher = tiny("gpt2", tok, 1)
    with pytest.raises(ValueError, match="`top_k`"):
        TeacherLogpCache(tmp_path, teacher, tok, top_k=len(tok) + 1)
    with pytest.raises(ValueError, match="`dtype`"):
        TeacherLogpCache(tmp_path, teacher, tok, dtype=torch.float16)
    with pytest.raises(ValueError, match="teacher_ids"):
        TeacherLogpCache(tmp_path, teacher, tok).entries(train[:2])


@pytest.mark.parametrize(("method", "top_k"), [("dpkd", 0), ("dpkd_token", "V")])
def test_trainer_with_cache_equals_trainer_without(tmp_path, toy, tiny, method, top_k):
    """Same metrics and weights (float64) with the cache; the teacher runs on y_s rows only (pair loss) or
    not at all on y_t (token loss with k = V)."""
    tok, train, _ = toy
    exs = _with_y_t(train, 32)
    results = []
    for use_cache in (False, True):
        student, teacher = tiny("gpt2", tok, 0, torch.float64), tiny("gpt2", tok, 1, torch.float64)
        k = len(tok) if top_k == "V" else top_k
        cache = TeacherLogpCache(tmp_path / "cache", teacher, tok, dtype=torch.float64, top_k=k) if use_cache else None
        cfg = DistillConfig(output_dir=str(tmp_path / f"{use_cache}"), method=method, max_steps=2,
                            per_device_train_batch_size=4, logging_steps=1, max_new_tokens=8, disable_tqdm=True,
                            report_to="none", teacher_outputs="pregenerated", objective="distil-only")
        tr = DistillTrainer(student, teacher, exs, cfg, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                            teacher_cache=cache)
        rows = _forward_rows(teacher)
        res = tr.train()
        results.append((res.log_history, student.state_dict(), sum(rows)))
    (h0, w0, rows0), (h1, w1, rows1) = results
    for a, b in zip(h1, h0, strict=True):
        assert a == pytest.approx(b, rel=1e-10, abs=1e-12)
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k], rtol=1e-10, atol=1e-12)
    assert rows0 == 2 * 2 * 4 if method == "dpkd" else rows0 == 2 * 4
    assert rows1 == (2 * 4 if method == "dpkd" else 0)
