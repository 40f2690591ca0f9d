"""nn.Module wrappers: configured once, equal to the functional form, bad options refused at construction."""

from __future__ import annotations

import dpkd.backends.torch as dt
import pytest
import torch
from dpkd.spec import DPKDInputError

torch.set_num_threads(1)

g = torch.Generator().manual_seed(0)
A, B, C, D = (torch.randn(5, generator=g, dtype=torch.float64) * 3 for _ in range(4))
LT, LS = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([5.0, 4.0, 3.0, 2.0, 1.5])
S, T = torch.randn(2, 3, 6, generator=g, dtype=torch.float64), torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
M = torch.tensor([[1, 0, 1], [1, 1, 1]])
LABELS = torch.tensor([[0, -100, 5], [1, 2, 3]])

# (module, its call, the functional call it must equal)
CASES = [
    (dt.DPKDLoss(beta=0.3, label_smoothing=0.1), (A, B, C, D), dict(chosen_lengths=LT, rejected_lengths=LS),
     lambda: dt.dpkd_loss(A, B, C, D, beta=0.3, label_smoothing=0.1, chosen_lengths=LT, rejected_lengths=LS)),
    (dt.IPOLoss(tau=0.2), (A, B, C, D), dict(chosen_lengths=LT, rejected_lengths=LS),
     lambda: dt.ipo_loss(A, B, C, D, tau=0.2, chosen_lengths=LT, rejected_lengths=LS)),
    (dt.CPOLoss(beta=0.2, nll_weight=0.5), (A, B), {}, lambda: dt.cpo_loss(A, B, beta=0.2, nll_weight=0.5)),
    (dt.SimPOLoss(gamma=0.5), (A, B), dict(chosen_lengths=LT, rejected_lengths=LS),
     lambda: dt.simpo_loss(A, B, gamma=0.5, chosen_lengths=LT, rejected_lengths=LS)),
    (dt.DPOPLoss(lambda_=2.0, form="released"), (A, B, C, D), {},
     lambda: dt.dpop_loss(A, B, C, D, lambda_=2.0, form="released")),
    (dt.DPKDTokenLoss(beta=0.5, form="ipo"), (S, T, M), dict(normalizer=10.0),
     lambda: dt.dpkd_token_loss(S, T, M, beta=0.5, form="ipo", normalizer=10.0)),
    (dt.CrossEntropyLoss(reduction="sum"), (S, LABELS), {}, lambda: dt.cross_entropy(S, LABELS, reduction="sum")),
    (dt.ForwardKL(temperature=2.0), (S, T, M), {}, lambda: dt.forward_kl(S, T, M, temperature=2.0)),
    (dt.ReverseKL(reduction="none"), (S, T, M), {}, lambda: dt.reverse_kl(S, T, M, reduction="none")),
    (dt.GeneralizedJSD(beta=0.2), (S, T, M), {}, lambda: dt.generalized_jsd(S, T, M, beta=0.2)),
    (dt.AKL(mu=0.3), (S, T, M), dict(normalizer=4.0), lambda: dt.akl(S, T, M, mu=0.3, normalizer=4.0)),
]


@pytest.mark.parametrize("case", CASES, ids=[type(c[0]).__name__ for c in CASES])
def test_module_equals_functional(case) -> None:
    module, args, per_call, functional = case
    got, expected = module(*args, **per_call), functional()
    if isinstance(expected, tuple):
        assert type(got) is type(expected)
        for x, y in zip(got, expected, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    else:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert isinstance(module, torch.nn.Module) and list(module.parameters()) == []


def test_module_is_differentiable_and_repr_shows_options() -> None:
    loss_fn = dt.DPKDTokenLoss(beta=0.2)
    s = S.clone().requires_grad_(True)
    loss_fn(s, T, M).loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert "beta=0.2" in repr(loss_fn) and "form='sigmoid'" in repr(loss_fn)


@pytest.mark.parametrize("make, message", [
    (lambda: dt.DPKDLoss(beta=0.0), "dpkd_loss: `beta` must be > 0"),
    (lambda: dt.DPKDLoss(label_smoothing=0.7), "dpkd_loss: `label_smoothing` must be <= 0.5"),
    (lambda: dt.IPOLoss(tau=-1.0), "ipo_loss: `tau` must be > 0"),
    (lambda: dt.CPOLoss(nll_weight=-0.1), "cpo_loss: `nll_weight` must be >= 0"),
    (lambda: dt.SimPOLoss(gamma=float("inf")), "simpo_loss: `gamma` must be finite"),
    (lambda: dt.DPOPLoss(form="inside"), "dpop_loss: `form` must be one of"),
    (lambda: dt.DPKDTokenLoss(form="dpop", label_smoothing=0.1), "dpkd_token_loss: `label_smoothing` only applies"),
    (lambda: dt.DPKDTokenLoss(reduction="avg"), "dpkd_token_loss: `reduction` must be one of"),
    (lambda: dt.CrossEntropyLoss(ignore_index=0.5), "cross_entropy: `ignore_index` must be an integer"),
    (lambda: dt.ForwardKL(temperature=0.0), "forward_kl: `temperature` must be > 0"),
    (lambda: dt.GeneralizedJSD(beta=1.5), "generalized_jsd: `beta` must be <= 1.0"),
    (lambda: dt.AKL(mu=1.0), "akl: `mu` must be < 1.0"),
])
def test_bad_options_refused_at_construction(make, message: str) -> None:
    with pytest.raises(DPKDInputError, match=message.replace("(", r"\(")):
        make()
