"""The Torch backend under torch.compile, torch.func.grad and torch.func.vmap.

Data-dependent validation (NaN/Inf, lengths > 0, binary masks, ...) is skipped while tracing, detected by
``torch.compiler.is_compiling()`` and by a functorch interpreter on the stack (``_base.tracing``); option,
shape, dtype and device checks still run. ``fullgraph=True`` proves the validation glue causes no graph
break. Shapes are tiny: compilation is slow on 2 cores.
"""

from __future__ import annotations

import dpkd.backends.torch as dt
import pytest
import torch
from dpkd.backends.torch import _base
from dpkd.spec import DPKDInputError
from torch.func import grad, vmap

torch.set_num_threads(1)


def _seq(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g) * 4 for _ in range(4)]


def _tok(seed=0):
    g = torch.Generator().manual_seed(seed)
    S, T = torch.randn(2, 4, 7, generator=g), torch.randn(2, 4, 7, generator=g)
    return S, T, torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]])


def _compare_compiled(backend: str) -> None:
    torch._dynamo.reset()
    a, b, c, d = _seq()
    lengths = torch.tensor([3, 4, 5, 6, 7, 8])
    seq = torch.compile(dt.dpkd_loss, backend=backend, fullgraph=True)
    for kw in (dict(beta=0.3), dict(beta=0.3, chosen_lengths=lengths, rejected_lengths=lengths + 1)):
        ae, ac = a.clone().requires_grad_(True), a.clone().requires_grad_(True)
        eager, compiled = dt.dpkd_loss(ae, b, c, d, **kw), seq(ac, b, c, d, **kw)
        torch.testing.assert_close(compiled.loss, eager.loss)
        torch.testing.assert_close(compiled.chosen_rewards, eager.chosen_rewards)
        torch.testing.assert_close(torch.autograd.grad(compiled.loss, ac)[0], torch.autograd.grad(eager.loss, ae)[0])

    S, T, m = _tok()
    tok = torch.compile(dt.dpkd_token_loss, backend=backend, fullgraph=True)
    Se, Sc = S.clone().requires_grad_(True), S.clone().requires_grad_(True)
    eager, compiled = dt.dpkd_token_loss(Se, T, m, beta=0.5), tok(Sc, T, m, beta=0.5)
    for x, y in zip(compiled, eager, strict=True):
        torch.testing.assert_close(x, y)
    torch.testing.assert_close(torch.autograd.grad(compiled.loss, Sc)[0], torch.autograd.grad(eager.loss, Se)[0])


def test_compile_aot_eager_fullgraph() -> None:
    _compare_compiled("aot_eager")


@pytest.mark.slow
def test_compile_inductor_fullgraph() -> None:
    _compare_compiled("inductor")


def test_compile_still_checks_options_and_shapes() -> None:
    # (under fullgraph=True dynamo wraps a raised error in its own Unsupported; without it the error is ours)
    torch._dynamo.reset()
    S, T, m = _tok()
    tok = torch.compile(dt.dpkd_token_loss, backend="aot_eager")
    with pytest.raises(DPKDInputError, match="`beta` must be > 0"):
        tok(S, T, m, beta=0.0)
    with pytest.raises(DPKDInputError, match="`teacher_logits` has vocabulary size 6"):
        tok(S, T[..., :6], m)


def test_func_grad_equals_autograd() -> None:
    a, b, c, d = _seq(seed=1)
    ga = grad(lambda x: dt.dpkd_loss(x, b, c, d, beta=0.2).loss)(a)
    ar = a.clone().requires_grad_(True)
    torch.testing.assert_close(ga, torch.autograd.grad(dt.dpkd_loss(ar, b, c, d, beta=0.2).loss, ar)[0])

    S, T, m = _tok(seed=2)
    for fn in (lambda s: dt.dpkd_token_loss(s, T, m).loss, lambda s: dt.forward_kl(s, T, m),
               lambda s: dt.akl(s, T, m)):
        gs = grad(fn)(S)
        sr = S.clone().requires_grad_(True)
        torch.testing.assert_close(gs, torch.autograd.grad(fn(sr), sr)[0])


def test_vmap_over_examples_equals_loop() -> None:
    """vmap of the per-example token loss over a batch equals calling it row by row."""
    S, T, m = _tok(seed=3)
    m = torch.ones_like(m)

    def per_row(s, t, mm):
        return dt.dpkd_token_loss(s, t, mm, beta=0.4, normalizer=4.0).loss

    batched = vmap(per_row)(S, T, m)
    looped = torch.stack([per_row(S[i], T[i], m[i]) for i in range(S.shape[0])])
    torch.testing.assert_close(batched, looped)

    a, b, c, d = (x.reshape(2, 3) for x in _seq(seed=4))
    batched = vmap(lambda *x: dt.dpkd_loss(*x, beta=0.1).loss)(a, b, c, d)
    looped = torch.stack([dt.dpkd_loss(a[i], b[i], c[i], d[i], beta=0.1).loss for i in range(2)])
    torch.testing.assert_close(batched, looped)
    # per-example gradients
    pg = vmap(grad(lambda x, y, z, w: dt.dpkd_loss(x, y, z, w).loss))(a, b, c, d)
    assert pg.shape == a.shape and torch.isfinite(pg).all()


def test_value_checks_run_eagerly_and_are_skipped_while_traced() -> None:
    a, b, c, d = _seq()
    bad = a.clone()
    bad[0] = float("nan")
    with pytest.raises(DPKDInputError, match="`policy_chosen_logps` contains NaN or Inf"):
        dt.dpkd_loss(bad, b, c, d)
    assert not _base.tracing()
    seen = []
    vmap(lambda x: seen.append(_base.tracing()) or x.sum())(a.reshape(2, 3))
    grad(lambda x: seen.append(_base.tracing()) or x.sum())(a)
    assert seen == [True, True]
    # under vmap a NaN cannot be turned into a Python bool, so no error: the NaN propagates (documented)
    out = vmap(lambda x: dt.dpkd_loss(x, x, x, x).loss)(bad.reshape(2, 3))
    assert torch.isnan(out[0])
