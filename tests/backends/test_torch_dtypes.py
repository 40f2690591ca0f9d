"""Dtype policy and numerical stability of the Torch backend (CONVENTIONS.md "General"; issue 3).

bfloat16/float16 inputs: log-softmax, logsumexp and reductions run in float32, the loss comes back in
float32 and equals the float64 spec evaluated on the same (rounded) inputs to float32 accuracy; gradients
come back in the input's dtype. Every loss is finite, with finite gradients, for logits of magnitude 1e4,
for fully agreeing argmaxes and for AKL at p = q.
"""

from __future__ import annotations

import math

import dpkd.backends.torch as dt
import dpkd.spec as spec
import numpy as np
import pytest
import torch

torch.set_num_threads(1)

LOW = [torch.bfloat16, torch.float16]
TOKEN_LOSSES = {
    "dpkd_token_loss": lambda S, T, m: dt.dpkd_token_loss(S, T, m, beta=0.5).loss,
    "dpkd_token_loss_ipo": lambda S, T, m: dt.dpkd_token_loss(S, T, m, beta=0.5, form="ipo").loss,
    "dpkd_token_loss_dpop": lambda S, T, m: dt.dpkd_token_loss(S, T, m, beta=0.5, form="dpop").loss,
    "forward_kl": lambda S, T, m: dt.forward_kl(S, T, m),
    "reverse_kl": lambda S, T, m: dt.reverse_kl(S, T, m),
    "generalized_jsd": lambda S, T, m: dt.generalized_jsd(S, T, m, beta=0.3),
    "akl": lambda S, T, m: dt.akl(S, T, m),
}
SPEC_TOKEN = {
    "dpkd_token_loss": lambda S, T, m: spec.dpkd_token_loss(S, T, m, beta=0.5).loss,
    "dpkd_token_loss_ipo": lambda S, T, m: spec.dpkd_token_loss(S, T, m, beta=0.5, form="ipo").loss,
    "dpkd_token_loss_dpop": lambda S, T, m: spec.dpkd_token_loss(S, T, m, beta=0.5, form="dpop").loss,
    "forward_kl": lambda S, T, m: spec.forward_kl(S, T, m),
    "reverse_kl": lambda S, T, m: spec.reverse_kl(S, T, m),
    "generalized_jsd": lambda S, T, m: spec.generalized_jsd(S, T, m, beta=0.3),
    "akl": lambda S, T, m: spec.akl(S, T, m),
}


def _logits(dtype, scale=3.0, seed=0, shape=(2, 5, 17)):
    g = torch.Generator().manual_seed(seed)
    S = (torch.randn(*shape, generator=g) * scale).to(dtype)
    T = (torch.randn(*shape, generator=g) * scale).to(dtype)
    return S, T, torch.ones(shape[:-1])


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("name", sorted(TOKEN_LOSSES))
def test_low_precision_token_losses_compute_in_float32(name: str, dtype: torch.dtype) -> None:
    S, T, m = _logits(dtype)
    S.requires_grad_(True)
    loss = TOKEN_LOSSES[name](S, T, m)
    assert loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss, S)
    assert grad.dtype == dtype and torch.isfinite(grad.float()).all()
    # the spec in float64 on exactly the values the backend saw (the rounding to dtype is exact in float64)
    expected = SPEC_TOKEN[name](S.detach().double().numpy(), T.double().numpy(), m.numpy())
    assert loss.item() == pytest.approx(float(expected), rel=2e-5, abs=1e-6)


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_sequence_losses_and_logps(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(4)
    a, b, c, d = ((torch.randn(8, generator=g) * 30).to(dtype) for _ in range(4))
    out = dt.dpkd_loss(a, b, c, d, beta=0.1)
    assert out.loss.dtype == torch.float32 and out.chosen_rewards.dtype == torch.float32
    expected = spec.dpkd_loss(*(x.double().numpy() for x in (a, b, c, d)), beta=0.1).loss
    assert out.loss.item() == pytest.approx(float(expected), rel=1e-6)

    S, _, _ = _logits(dtype, shape=(2, 6, 50))
    labels = torch.randint(0, 50, (2, 6), generator=g)
    logps = dt.token_logps(S, labels)
    assert logps.dtype == torch.float32
    np.testing.assert_allclose(logps.numpy(), spec.token_logps(S.double().numpy(), labels.numpy()),
                               rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_precision_dtypes_are_kept(dtype: torch.dtype) -> None:
    S, T, m = _logits(dtype)
    assert dt.dpkd_token_loss(S, T, m).loss.dtype == dtype
    assert dt.forward_kl(S, T, m).dtype == dtype
    a = torch.zeros(3, dtype=dtype)
    assert dt.dpkd_loss(a, a, a, a).loss.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(TOKEN_LOSSES))
def test_huge_logits_stay_finite(name: str, dtype: torch.dtype) -> None:
    """Logits of magnitude 1e4: every loss and gradient finite; the disagreeing token losses are huge but exact."""
    S, T, m = _logits(torch.float32, scale=1.0, seed=5)
    S = (torch.sign(S) * 1e4).to(dtype).requires_grad_(True)  # ±1e4, many exact ties
    T = (T * 1e4).to(dtype).requires_grad_(True)
    loss = TOKEN_LOSSES[name](S, T, m)
    gS, gT = torch.autograd.grad(loss, (S, T))
    assert torch.isfinite(loss) and torch.isfinite(gS.float()).all() and torch.isfinite(gT.float()).all()
    expected = SPEC_TOKEN[name](S.detach().double().numpy(), T.detach().double().numpy(), m.numpy())
    assert math.isfinite(float(expected))
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)


def test_huge_logits_logps_and_cross_entropy() -> None:
    logits = torch.tensor([[[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]]], requires_grad=True)
    labels = torch.tensor([[1, 2]])
    logps = dt.token_logps(logits, labels)
    torch.testing.assert_close(logps, torch.tensor([[-2e4, -math.log(3)]]))
    ce = dt.cross_entropy(logits, labels)
    (grad,) = torch.autograd.grad(ce, logits)
    assert torch.isfinite(ce) and torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_agreeing_argmaxes(dtype: torch.dtype) -> None:
    """y^t = y^s everywhere: h = 0 exactly, loss log 2 (sigmoid) / 1/(4β²) (ipo), and no gradient at all."""
    S, _, m = _logits(dtype, scale=1e4 if dtype == torch.float32 else 100.0)
    T = S * 2
    S.requires_grad_(True)
    out = dt.dpkd_token_loss(S, T, m, beta=0.1)
    assert out.loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert out.agreement_rate.item() == 1.0
    assert (torch.autograd.grad(out.loss, S)[0] == 0).all()
    ipo = dt.dpkd_token_loss(S, T, m, beta=0.1, form="ipo").loss
    assert ipo.item() == pytest.approx(25.0, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_akl_at_p_equals_q_is_zero_not_nan(dtype: torch.dtype) -> None:
    S, _, m = _logits(dtype)
    S.requires_grad_(True)
    loss = dt.akl(S, S.detach().clone(), m)
    (grad,) = torch.autograd.grad(loss, S)
    assert loss.item() == 0.0
    assert torch.isfinite(grad.float()).all() and (grad == 0).all()


def test_sequence_losses_extreme_margins_finite() -> None:
    big = torch.tensor([1e30, -1e30, 0.0], dtype=torch.float32, requires_grad=True)
    z = torch.zeros(3)
    for fn in (lambda: dt.dpkd_loss(big, z, z, z, label_smoothing=0.1).loss,
               lambda: dt.dpop_loss(big, z, z, z).loss,
               lambda: dt.simpo_loss(big, z, chosen_lengths=torch.ones(3), rejected_lengths=torch.ones(3)).loss,
               lambda: dt.cpo_loss(big, z, nll_weight=0.0).loss):
        loss = fn()
        (grad,) = torch.autograd.grad(loss, big)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
