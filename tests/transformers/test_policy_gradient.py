"""MiniLLM's policy gradient: unbiased for ∇ KL(q‖p) (exact enumeration, float64), its returns, and the
teacher-mixed sampler."""

import itertools

import pytest
import torch
from dpkd.integrations.transformers.batching import generate
from dpkd.integrations.transformers.heads import HeadOutput
from dpkd.integrations.transformers.policy_gradient import future_returns, minillm_loss

V, T = 3, 3


def _tables(seed):
    g = torch.Generator().manual_seed(seed)
    prefixes = [p for n in range(T) for p in itertools.product(range(V), repeat=n)]
    return {p: torch.randn(V, generator=g, dtype=torch.float64) for p in prefixes}


def _logits(table, y):
    return torch.stack([table[tuple(y[:j])] for j in range(T)])[None]  # [1, T, V]


def _seq_logp(table, y):
    return sum(torch.log_softmax(table[tuple(y[:j])], -1)[y[j]] for j in range(T))


def test_surrogate_gradient_in_expectation_is_the_reverse_kl_gradient():
    """Σ_y q(y)·∇L_surr(y) == ∇ Σ_y q(y) log q(y)/p(y) over every length-3 sequence of a 3-token vocabulary
    (a tabular autoregressive student; α = 0, no length normalisation)."""
    theta = {k: v.clone().requires_grad_(True) for k, v in _tables(0).items()}
    phi = _tables(1)
    seqs = [list(y) for y in itertools.product(range(V), repeat=T)]
    expected = sum(_seq_logp(theta, y).exp() * (_seq_logp(theta, y) - _seq_logp(phi, y)) for y in seqs)
    grad_exact = torch.autograd.grad(expected, list(theta.values()))
    surrogate = 0.0
    for y in seqs:
        labels = torch.tensor([y])
        s, t = HeadOutput(labels, logits=_logits(theta, y)), HeadOutput(labels, logits=_logits(phi, y))
        weight = _seq_logp(theta, y).exp().detach()  # y ∼ q: the sampling probability carries no gradient
        loss = minillm_loss(s, t, mix_alpha=0.0, length_norm=False, single_step=True, normalizer=1.0).loss
        surrogate = surrogate + weight * loss
    grad_pg = torch.autograd.grad(surrogate, list(theta.values()))
    for a, b in zip(grad_pg, grad_exact, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # without the single-step term (or with the return including step t twice) it is biased: the test can fail
    partial = 0.0
    for y in seqs:
        labels = torch.tensor([y])
        s, t = HeadOutput(labels, logits=_logits(theta, y)), HeadOutput(labels, logits=_logits(phi, y))
        partial = partial + _seq_logp(theta, y).exp().detach() * minillm_loss(
            s, t, mix_alpha=0.0, length_norm=False, single_step=False, normalizer=1.0).loss
    grad_partial = torch.autograd.grad(partial, list(theta.values()))
    assert any(not torch.allclose(a, b) for a, b in zip(grad_partial, grad_exact, strict=True))


def test_future_returns():
    r = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 5.0, 6.0, 7.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(future_returns(r, m, length_norm=False),
                               torch.tensor([[5.0, 3.0, 0.0, 0.0], [18.0, 13.0, 7.0, 0.0]]))
    torch.testing.assert_close(future_returns(r, m, length_norm=True),
                               torch.tensor([[2.5, 3.0, 0.0, 0.0], [6.0, 6.5, 7.0, 0.0]]))


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_teacher_mixture_with_alpha_one_decodes_like_the_teacher(toy, tiny, family):
    """Greedy decoding of the mixture α·p + (1−α)·q at α = 1 is the teacher's own greedy decoding: the teacher's
    incremental KV cache and position ids agree with generate()'s, under left padding of unequal prompts."""
    tok, train, _ = toy
    student, teacher = tiny(family, tok, 0), tiny(family, tok, 1)
    prompts = [ex.prompt_ids for ex in train[:6]]
    assert len({len(p) for p in prompts}) > 1
    kw = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=12, do_sample=False)
    mixed = generate(student, prompts, mix_teacher=teacher, mix_alpha=1.0, **kw)
    assert mixed == generate(teacher, prompts, **kw)
    assert mixed != generate(student, prompts, **kw)


def test_teacher_mixture_scores_are_the_mixture(toy, tiny):
    from dpkd.integrations.transformers.batching import TeacherMixture, left_pad

    tok, train, _ = toy
    teacher = tiny("gpt2", tok, 1, torch.float64)
    ids, mask = left_pad([ex.prompt_ids for ex in train[:3]], tok.pad_token_id)
    mix = TeacherMixture(teacher, mask, 0.3)
    scores = torch.randn(3, len(tok), dtype=torch.float64)
    got = mix(ids, scores)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        p = torch.softmax(teacher(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1], -1)
    want = torch.log(0.3 * p + 0.7 * torch.softmax(scores, -1))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="alpha"):
        TeacherMixture(teacher, mask, 0.0)
