"""Every vocab-parallel primitive at TP=2 equals the float64 spec, in values and in the gradient of every
rank's shard (student and teacher), including vocabularies not divisible by TP and a rank whose whole shard
is padding.

The losses' cases are the registry's (``dpkd.spec.cases``: every variant of every function with a
``vocab_parallel`` counterpart, drawn as the conformance suite draws them); the reference is the spec
function and its analytic gradient on the full float64 arrays, computed in the pytest process. Bodies are
module-level functions run on both ranks of the persistent gloo pool (gloo_pool.py): each rank takes its
shard of the same arrays (padded columns filled with LARGE values, so a padded column that leaked into a
softmax or an argmax would change the result), runs the vocab-parallel function and returns its value and
its shards' gradients. The lower-level primitives (logsumexp, argmax, sampling, the fused logps) are
checked against the Torch backend on materialised logits.
"""


import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (the `megatron` extra)")
from dpkd.conformance import testing as t  # noqa: E402
from dpkd.spec import registry  # noqa: E402

PAD_VALUE = 40.0  # would dominate every softmax and argmax if padding were not masked


def _reference(name):
    """The Torch backend's function (the lower-level primitives' reference on materialised logits)."""
    import dpkd.backends.torch as backend

    return getattr(backend, name)


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


def body_registry(function, args, kwargs, logit_names, vocab, local):
    """One registry call of the vocab-parallel ``function``: its logits arguments sharded, the backward of
    the sum of its first output; returns that output (all fields) and each logits shard's gradient."""
    import dpkd.integrations.megatron as mp
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    converted, shards = [], {}
    for name, x in zip(logit_names, args):
        t = torch.from_numpy(x)
        if name is not None:  # a logits argument: this rank's shard, a leaf
            t = _shard_of(t, rank, world, local).requires_grad_()
            shards[name] = t
        converted.append(t)
    out = getattr(mp, function)(*converted, vocab_size=vocab, **kwargs)
    first = out[0] if isinstance(out, tuple) else out
    first.sum().backward()
    values = [x.detach() if torch.is_tensor(x) else torch.tensor(x) for x in (out if isinstance(out, tuple) else [out])]
    return {"value": values, "grads": {k: torch.zeros_like(t) if t.grad is None else t.grad for k, t in shards.items()}}


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


# The registry's cases of every function that has a vocab-parallel counterpart: each variant on the
# non-divisible vocabulary; each function's first variant on the other layouts too.
VP = [c for c in t.cases(lambda s: s.vocab_parallel is not None)]
REGISTRY_RUNS = [(c, 11, 6) for c in VP] + [
    (c, v, loc) for c in VP if c.variant == c.spec.variants[0] and c.spec.kind == "token" for v, loc in VOCABS
    if v != 11]


def _registry_call(case, vocab):
    draw = registry.default_draw(case.spec, case.variant, seed=7, batch=(2,), tokens=5, vocab=vocab)
    return registry.build_call(case.spec, case.variant, draw)


@pytest.mark.parametrize("case,vocab,local", REGISTRY_RUNS, ids=[f"{c}-V{v}/{lo}" for c, v, lo in REGISTRY_RUNS])
def test_vocab_parallel_function_equals_the_spec(gloo_pool, case, vocab, local):
    call = _registry_call(case, vocab)
    logit_names = [a.name if a.role == "logits" else None for a in case.spec.positional]
    results = gloo_pool.run(body_registry, case.spec.vocab_parallel, call.args, dict(call.kwargs), logit_names,
                            vocab, local)
    expected = case.spec.reference_function()(*call.args, **call.kwargs)
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    grads = case.spec.gradient_function()(*call.args, **call.kwargs)
    for rank, r in enumerate(results):
        assert len(r["value"]) == len(expected)
        for i, (got, want) in enumerate(zip(r["value"], expected, strict=True)):
            torch.testing.assert_close(got.double(), torch.as_tensor(want).double(), **TOL,
                                       msg=lambda m, i=i, rank=rank: f"{case} rank {rank} output {i}: {m}\n{call}")
        for name, g in r["grads"].items():
            want = _grad_shard(torch.from_numpy(grads[name]), rank, 2, local)
            torch.testing.assert_close(g, want, **TOL, msg=lambda m, name=name, rank=rank:
                                       f"{case} rank {rank} d/d {name}: {m}\n{call}")


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
