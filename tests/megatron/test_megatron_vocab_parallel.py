"""Every vocab-parallel primitive at TP=2 equals the single-process Torch computation, in values and in the
gradient of every rank's shard (student and teacher), including vocabularies not divisible by TP and a rank
whose whole shard is padding.

Bodies are module-level functions run on both ranks of the persistent gloo pool (conftest.py). Each rank
builds the same full float64 tensors from one seed, takes its shard (padded columns filled with LARGE
values, so a padded column that leaked into a softmax or an argmax would change the result), runs the
vocab-parallel function and the single-process reference on the full tensors, and returns both.
The reference is ``dpkd.backends.torch`` when it exports the function, else the plain-torch formula below.
"""

import math

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (the `megatron` extra)")

PAD_VALUE = 40.0  # would dominate every softmax and argmax if padding were not masked


# --------------------------------------------------------------------------------------------------
# single-process references


def _ref_token_logps(logits, labels, *, ignore_index=-100):
    keep = labels != ignore_index
    lp = torch.log_softmax(logits, -1).gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, lp, torch.zeros_like(lp))


def _ref_reduce(per_token, m, normalizer, reduction):
    if reduction == "none":
        return per_token * m
    total = (per_token * m).sum()
    return total if reduction == "sum" else total / (normalizer if normalizer is not None else m.sum())


def _ref_cross_entropy(logits, labels, *, ignore_index=-100, normalizer=None, reduction="mean"):
    keep = (labels != ignore_index).double()
    return _ref_reduce(-_ref_token_logps(logits, labels, ignore_index=ignore_index), keep, normalizer, reduction)


def _kl(logp, logq):
    return (logp.exp() * (logp - logq)).sum(-1)


def _ref_forward_kl(s, t, mask, *, temperature=1.0, normalizer=None, reduction="mean"):
    lq, lp = torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1)
    return _ref_reduce(_kl(lp, lq), mask.double(), normalizer, reduction)


def _ref_reverse_kl(s, t, mask, *, temperature=1.0, normalizer=None, reduction="mean"):
    lq, lp = torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1)
    return _ref_reduce(_kl(lq, lp), mask.double(), normalizer, reduction)


def _ref_generalized_jsd(s, t, mask, *, beta=0.5, temperature=1.0, normalizer=None, reduction="mean"):
    lq, lp = torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1)
    if beta == 0:
        per = _kl(lp, lq)
    elif beta == 1:
        per = _kl(lq, lp)
    else:
        lm = torch.logsumexp(torch.stack([lq + math.log(1 - beta), lp + math.log(beta)]), 0)
        per = beta * _kl(lp, lm) + (1 - beta) * _kl(lq, lm)
    return _ref_reduce(per, mask.double(), normalizer, reduction)


def _ref_dpkd_token_loss(s, t, mask, *, beta=0.1, form="sigmoid", label_smoothing=0.0, reference_free=False,
                         lambda_=50.0, normalizer=None, reduction="mean"):
    q, p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    yt, ys = t.argmax(-1, keepdim=True), s.argmax(-1, keepdim=True)
    a, b = q.gather(-1, yt).squeeze(-1), q.gather(-1, ys).squeeze(-1)
    c, d = p.gather(-1, yt).squeeze(-1), p.gather(-1, ys).squeeze(-1)
    h = (a - b) if reference_free else (a - b) - (c - d)
    sp = torch.nn.functional.softplus
    if form == "sigmoid":
        per = (1 - label_smoothing) * sp(-beta * h) + label_smoothing * sp(beta * h)
    elif form == "ipo":
        per = (h - 1 / (2 * beta)) ** 2
    else:
        per = sp(-beta * h) + lambda_ * torch.relu(c - a)
    m = mask.double()
    agree = (m * (yt == ys).squeeze(-1).double()).sum() / m.sum().clamp(min=1)
    return _ref_reduce(per, m, normalizer, reduction), agree, beta * (a - c) * m, beta * (b - d) * m


def _reference(name):
    """The Torch backend's function when it exists, else the plain-torch reference above."""
    try:
        import dpkd.backends.torch as backend

        fn = getattr(backend, name, None)
    except ImportError:
        fn = None
    return fn if fn is not None else globals()[f"_ref_{name}"]


# --------------------------------------------------------------------------------------------------
# bodies (run on every rank)


def _shard_of(full, rank, world, local, dim=-1):
    """This rank's [.., local] slice of ``full`` padded with PAD_VALUE up to world·local columns."""
    v = full.shape[dim]
    pad_shape = list(full.shape)
    pad_shape[dim] = world * local - v
    padded = torch.cat([full.detach(), torch.full(pad_shape, PAD_VALUE, dtype=full.dtype)], dim=dim)
    return padded.narrow(dim, rank * local, local).clone()


def _grad_shard(grad, rank, world, local, dim=-1):
    """The expected gradient of a shard: the full gradient's slice, 0 at padded columns."""
    v = grad.shape[dim]
    pad_shape = list(grad.shape)
    pad_shape[dim] = world * local - v
    padded = torch.cat([grad, torch.zeros(pad_shape, dtype=grad.dtype)], dim=dim)
    return padded.narrow(dim, rank * local, local)


def _inputs(vocab, seed=0, batch=(2, 5)):
    g = torch.Generator().manual_seed(seed)
    s = 3 * torch.randn(*batch, vocab, generator=g, dtype=torch.float64)
    t = 3 * torch.randn(*batch, vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, batch, generator=g)
    labels[0, 1] = -100
    mask = labels != -100
    weights = torch.rand(*batch, generator=g, dtype=torch.float64) + 0.5
    return s, t, labels, mask, weights


def _grad(x):
    """x.grad, or zeros when x did not reach the loss (e.g. the teacher under reference_free)."""
    return torch.zeros_like(x) if x.grad is None else x.grad


def _scalar(out, weights):
    """A scalar with a non-uniform upstream gradient: Σ w·out for per-token outputs."""
    x = out[0] if isinstance(out, tuple) else out
    return (x * weights).sum() if x.ndim == weights.ndim else x.sum()


def body_pair(name, vocab, local, kwargs):
    """A student/teacher loss (KL family, token DPKD): value and both shards' gradients vs the reference."""
    import dpkd.integrations.megatron as mp
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    s, t, _, mask, w = _inputs(vocab)
    s_sh = _shard_of(s, rank, world, local).requires_grad_()
    t_sh = _shard_of(t, rank, world, local).requires_grad_()
    out = getattr(mp, f"vocab_parallel_{name}")(s_sh, t_sh, mask, vocab_size=vocab, **kwargs)
    _scalar(out, w).backward()
    s_full, t_full = s.clone().requires_grad_(), t.clone().requires_grad_()
    ref = _reference(name)(s_full, t_full, mask, **kwargs)
    _scalar(ref, w).backward()
    as_list = (lambda o: [x.detach() if torch.is_tensor(x) else torch.tensor(x) for x in o]) if isinstance(
        out, tuple) else (lambda o: [o.detach()])
    return {
        "value": as_list(out), "ref": as_list(ref),
        "grad_s": _grad(s_sh), "ref_grad_s": _grad_shard(_grad(s_full), rank, world, local),
        "grad_t": _grad(t_sh), "ref_grad_t": _grad_shard(_grad(t_full), rank, world, local),
    }


def body_labels(name, vocab, local, kwargs):
    """A logits/labels function (token logps, sequence logps, cross-entropy)."""
    import dpkd.integrations.megatron as mp
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    s, _, labels, _, w = _inputs(vocab, seed=1)
    s_sh = _shard_of(s, rank, world, local).requires_grad_()
    out = getattr(mp, f"vocab_parallel_{name}")(s_sh, labels, vocab_size=vocab, **kwargs)
    s_full = s.clone().requires_grad_()
    if name == "sequence_logps":
        ref = (_reference("token_logps")(s_full, labels).sum(-1), (labels != -100).sum(-1))
        (out[0] * w[:, 0]).sum().backward()
        (ref[0] * w[:, 0]).sum().backward()
        value, ref_value = list(out), list(ref)
    else:
        ref = _reference(name)(s_full, labels, **kwargs)
        _scalar(out, w).backward()
        _scalar(ref, w).backward()
        value, ref_value = [out.detach()], [ref.detach()]
    return {"value": value, "ref": ref_value, "grad_s": s_sh.grad,
            "ref_grad_s": _grad_shard(s_full.grad, rank, world, local)}


def body_logsumexp(vocab, local):
    import dpkd.integrations.megatron as mp
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    s, _, _, _, w = _inputs(vocab, seed=2)
    s_sh = _shard_of(s, rank, world, local).requires_grad_()
    out = mp.vocab_parallel_logsumexp(s_sh, vocab_size=vocab)
    (out * w).sum().backward()
    s_full = s.clone().requires_grad_()
    ref = torch.logsumexp(s_full, -1)
    (ref * w).sum().backward()
    # log-softmax returns a shard: backward on this rank's partial Σ W·out must still be exact, because the
    # custom backward all-reduces Σ_v grad_v.
    s_sh2 = _shard_of(s, rank, world, local).requires_grad_()
    big_w = torch.rand(*s.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    lsm = mp.vocab_parallel_log_softmax(s_sh2, vocab_size=vocab)
    valid = torch.isfinite(lsm)
    (torch.where(valid, lsm, 0.0) * _grad_shard(big_w, rank, world, local)).sum().backward()
    s_full2 = s.clone().requires_grad_()
    ref_lsm = torch.log_softmax(s_full2, -1)
    (ref_lsm * big_w).sum().backward()
    ref_lsm_shard = _shard_of(ref_lsm, rank, world, local)
    return {
        "value": [out.detach(), torch.where(valid, lsm, 0.0).detach(), valid],
        "ref": [ref.detach(), torch.where(valid, ref_lsm_shard, 0.0), _grad_shard(torch.ones_like(s), rank, world,
                                                                                   local).bool()],
        "grad_s": torch.cat([s_sh.grad, s_sh2.grad]),
        "ref_grad_s": torch.cat([_grad_shard(s_full.grad, rank, world, local),
                                 _grad_shard(s_full2.grad, rank, world, local)]),
    }


def body_argmax(vocab, local):
    import dpkd.integrations.megatron as mp
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 4, (50, vocab), generator=g).double()  # many ties, within and across shards
    x[0] = 3.0  # a row of all ties → index 0
    x[1, -1] = 10.0  # the last real column
    out = mp.vocab_parallel_argmax(_shard_of(x, rank, world, local), vocab_size=vocab)
    return {"value": [out], "ref": [x.argmax(-1)]}


def body_sample(vocab, local, rows, seed):
    import dpkd.integrations.megatron as mp
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    logits = torch.linspace(-2.0, 1.5, vocab, dtype=torch.float64).expand(rows, vocab)
    gen = torch.Generator().manual_seed(seed)
    out = mp.vocab_parallel_sample(_shard_of(logits, rank, world, local), generator=gen, vocab_size=vocab,
                                   temperature=0.8)
    return out


def body_linear(vocab, local, chunk_size, with_bias):
    import dpkd.integrations.megatron as mp
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(4)
    n, h = 11, 6
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, h, generator=g, dtype=torch.float64)
    bias = torch.randn(vocab, generator=g, dtype=torch.float64) if with_bias else None
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[3] = -100
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    h_sh = hidden.clone().requires_grad_()
    w_sh = _shard_of(weight, rank, world, local, dim=0).requires_grad_()
    b_sh = _shard_of(bias, rank, world, local).requires_grad_() if with_bias else None
    out = mp.vocab_parallel_linear_token_logps(h_sh, w_sh, labels, bias=b_sh, chunk_size=chunk_size,
                                               vocab_size=vocab)
    (out * w).sum().backward()
    h_full, w_full = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b_full = bias.clone().requires_grad_() if with_bias else None
    logits = h_full @ w_full.t() + (b_full if with_bias else 0.0)
    ref = _reference("token_logps")(logits, labels)
    (ref * w).sum().backward()
    res = {"value": [out.detach()], "ref": [ref.detach()], "grad_s": h_sh.grad, "ref_grad_s": h_full.grad,
           "grad_t": w_sh.grad, "ref_grad_t": _grad_shard(w_full.grad, rank, world, local, dim=0)}
    if with_bias:
        res["grad_b"], res["ref_grad_b"] = b_sh.grad, _grad_shard(b_full.grad, rank, world, local)
    return res


def body_bad_input():
    """A NaN in ONE rank's shard raises the same DPKDInputError on every rank (no hang)."""
    import dpkd.integrations.megatron as mp
    import torch.distributed as dist
    from dpkd.spec.validation import DPKDInputError

    rank = dist.get_rank()
    x = torch.zeros(2, 3, 4, dtype=torch.float64)
    if rank == 1:
        x[0, 0, 0] = float("nan")
    messages = []
    for call in (
        lambda: mp.vocab_parallel_token_logps(x, torch.zeros(2, 3, dtype=torch.int64)),
        lambda: mp.vocab_parallel_token_logps(torch.zeros(2, 3, 4), torch.full((2, 3), 9)),
        lambda: mp.vocab_parallel_forward_kl(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), torch.ones(2, 3)),
        lambda: mp.vocab_parallel_argmax(torch.zeros(2, 4), vocab_size=9),
        lambda: mp.vocab_parallel_dpkd_token_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4),
                                                  torch.zeros(2, 3)),
    ):
        try:
            call()
            messages.append(None)
        except DPKDInputError as e:
            messages.append(str(e))
    return messages


# --------------------------------------------------------------------------------------------------
# tests (run in the pytest process)

# (vocab, local): divisible; not divisible (one padded column on rank 1); rank 1 entirely padding.
VOCABS = [(12, 6), (11, 6), (5, 6)]
TOL = {"rtol": 1e-10, "atol": 1e-12}

PAIR_CASES = [
    ("forward_kl", {}),
    ("forward_kl", {"temperature": 2.0, "reduction": "none"}),
    ("reverse_kl", {"normalizer": 7.0}),
    ("generalized_jsd", {"beta": 0.3}),
    ("generalized_jsd", {"beta": 0.0, "reduction": "sum"}),
    ("generalized_jsd", {"beta": 1.0}),
    ("dpkd_token_loss", {}),
    ("dpkd_token_loss", {"beta": 0.5, "label_smoothing": 0.2, "reduction": "none"}),
    ("dpkd_token_loss", {"form": "ipo", "beta": 0.3}),
    ("dpkd_token_loss", {"form": "dpop", "lambda_": 2.0, "reduction": "sum"}),
    ("dpkd_token_loss", {"reference_free": True, "normalizer": 3.0}),
]


def _assert_all(results, keys=("grad_s", "grad_t", "grad_b")):
    for rank, r in enumerate(results):
        assert len(r["value"]) == len(r["ref"])
        for i, (got, want) in enumerate(zip(r["value"], r["ref"], strict=True)):
            torch.testing.assert_close(got, want.to(got.dtype), **TOL, msg=lambda m, i=i, rank=rank:
                                       f"rank {rank} output {i}: {m}")
        for k in keys:
            if k in r:
                torch.testing.assert_close(r[k], r[f"ref_{k}"], **TOL, msg=lambda m, k=k, rank=rank:
                                           f"rank {rank} {k}: {m}")


# Every case on the non-divisible vocabulary; the plain forms on every vocabulary layout (time budget).
PAIR_RUNS = [(n, k, 11, 6) for n, k in PAIR_CASES] + [
    (n, k, v, loc) for n, k in (PAIR_CASES[0], PAIR_CASES[3], PAIR_CASES[6]) for v, loc in VOCABS if v != 11]
LABEL_CASES = [("token_logps", {}), ("sequence_logps", {}), ("cross_entropy", {}),
               ("cross_entropy", {"reduction": "none"}), ("cross_entropy", {"normalizer": 4.0})]
LABEL_RUNS = [(n, k, 11, 6) for n, k in LABEL_CASES] + [
    (n, k, v, loc) for n, k in LABEL_CASES[:1] for v, loc in VOCABS if v != 11]


@pytest.mark.parametrize("name,kwargs,vocab,local", PAIR_RUNS, ids=[f"{n}-{k}-V{v}/{lo}" for n, k, v, lo in PAIR_RUNS])
def test_pair_losses_equal_single_process(gloo_pool, name, kwargs, vocab, local):
    _assert_all(gloo_pool.run(body_pair, name, vocab, local, kwargs))


@pytest.mark.parametrize("name,kwargs,vocab,local", LABEL_RUNS,
                         ids=[f"{n}-{k}-V{v}/{lo}" for n, k, v, lo in LABEL_RUNS])
def test_label_functions_equal_single_process(gloo_pool, name, kwargs, vocab, local):
    _assert_all(gloo_pool.run(body_labels, name, vocab, local, kwargs))


@pytest.mark.parametrize("vocab,local", VOCABS, ids=lambda x: str(x))
def test_logsumexp_and_log_softmax(gloo_pool, vocab, local):
    _assert_all(gloo_pool.run(body_logsumexp, vocab, local))


@pytest.mark.parametrize("vocab,local", VOCABS, ids=lambda x: str(x))
def test_argmax_ties_lowest_global_index_padding_never_wins(gloo_pool, vocab, local):
    _assert_all(gloo_pool.run(body_argmax, vocab, local))


@pytest.mark.parametrize("vocab,local", [(7, 4), (7, 7)], ids=lambda x: str(x))
def test_sample_identical_on_ranks_and_tp_invariant(gloo_pool, vocab, local):
    rows = 20000
    tp2 = gloo_pool.run(body_sample, vocab, local, rows, 5)
    tp1 = gloo_pool.run(body_sample, vocab, 2 * local, rows, 5, tp=1)  # each rank alone holds everything
    assert torch.equal(tp2[0], tp2[1])
    assert torch.equal(tp2[0], tp1[0])  # the same draw whatever the TP layout
    # distributed as softmax(l / 0.8): every frequency within 5 standard errors
    p = torch.softmax(torch.linspace(-2.0, 1.5, vocab, dtype=torch.float64) / 0.8, 0)
    freq = torch.bincount(tp2[0], minlength=local * 2).double()[:vocab] / rows
    assert int(tp2[0].max()) < vocab
    se = (p * (1 - p) / rows).sqrt()
    assert torch.all((freq - p).abs() < 5 * se), (freq, p)


@pytest.mark.parametrize("vocab,local", [(12, 6), (11, 6)], ids=lambda x: str(x))
@pytest.mark.parametrize("chunk_size,with_bias", [(3, True), (100, False)])
def test_linear_token_logps_equals_materialised(gloo_pool, vocab, local, chunk_size, with_bias):
    _assert_all(gloo_pool.run(body_linear, vocab, local, chunk_size, with_bias))


def test_bad_input_raises_on_every_rank(gloo_pool):
    r0, r1 = gloo_pool.run(body_bad_input)
    assert r0 == r1
    assert all(m is not None for m in r0), r0
    assert "`logits` contains NaN or Inf" in r0[0]
    assert "`labels`" in r0[1]
    assert "`teacher_logits`" in r0[2]
    assert "`vocab_size`" in r0[3]
    assert "`mask`" in r0[4]
