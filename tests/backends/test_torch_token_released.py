"""Token-level DPKD equals the released LMOps code's formula (spec/README.md §4), on a hand-worked example.

The released ``get_distil_loss`` (flag --seqKD-DPO), as spec/README.md §4 states it:
  Q = log_softmax(S), P = log_softmax(T); y^t = argmax P, y^s = argmax Q;
  a = Q[y^t], b = Q[y^s], c = P[y^t], d = P[y^s];  logits = (a − b) − (c − d)
  losses = −logσ(β·logits) (default), (logits − 1/(2β))² (--ipo), −logσ(β·logits) + λ·max(0, c − a) (--DPOP)
  loss = Σ m·losses / Σ m
``released_formula`` below writes exactly that, step by step (in float64: the code's bf16 log-softmax is the
documented deviation we do not reproduce).
"""

from __future__ import annotations

import math

import dpkd.backends.torch as dt
import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(1)


def released_formula(S, T, mask, beta, form="sigmoid", lam=50.0, reference_free=False):
    Q, P = S.log_softmax(-1), T.log_softmax(-1)
    y_t, y_s = P.argmax(-1, keepdim=True), Q.argmax(-1, keepdim=True)
    a, b = Q.gather(-1, y_t).squeeze(-1), Q.gather(-1, y_s).squeeze(-1)
    c, d = P.gather(-1, y_t).squeeze(-1), P.gather(-1, y_s).squeeze(-1)
    logits = (a - b) if reference_free else (a - b) - (c - d)
    if form == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif form == "dpop":
        losses = -F.logsigmoid(beta * logits) + lam * torch.clamp(c - a, min=0)
    else:
        losses = -F.logsigmoid(beta * logits)
    return (losses * mask).sum() / mask.sum()


# The hand-worked example: V = 3, one row of 3 positions, β = 0.2, the last position masked out.
#
# position 0: S = [0, 2, 1], T = [3, 0, 1] → y^t = argmax T = 0, y^s = argmax S = 1 (they disagree).
#   The softmax normalisers cancel in h: a − b = S[0] − S[1] = −2, c − d = T[0] − T[1] = 3, so h = −5,
#   βh = −1 and ℓ_0 = −logσ(−1) = log(1 + e) ≈ 1.3132617.
#   With L_S = log(1 + e² + e) = log 11.1073379 ≈ 2.4076059 and L_T = log(e³ + 1 + e) = log 23.8038187
#   ≈ 3.1698460: a = 0 − L_S ≈ −2.4076059, b = 2 − L_S ≈ −0.4076059, c = 3 − L_T ≈ −0.1698460,
#   d = 0 − L_T ≈ −3.1698460. Rewards: β(a − c) ≈ −0.4475520, β(b − d) ≈ 0.5524480 (difference −1 = βh ✓).
# position 1: S = [1, 0, 0], T = [2, 0, 1] → y^t = y^s = 0 (they agree): h = 0, ℓ_1 = log 2 ≈ 0.6931472.
#   a = b = 1 − log(e + 2) ≈ −0.5514448, c = d = 2 − log(e² + 1 + e) ≈ −0.4076059;
#   rewards both β(a − c) ≈ −0.0287678.
# position 2 (mask 0): S = [0, 0, 5], T = [5, 0, 0]; would give h = −10 but does not count.
#
# loss (mean over the two loss tokens) = (log(1 + e) + log 2) / 2 ≈ 1.0032044; agreement rate = 1/2.
# Gradient w.r.t. S (spec/README.md §4 (gradient)): only position 0, (m/Σm)·dℓ/dh·(e_{y^t} − e_{y^s}) with
#   dℓ/dh = −β·σ(−βh) = −0.2·σ(1) ≈ −0.1462117, so ∂L/∂S[0] = [−0.0731059, +0.0731059, 0]; ∂L/∂T[0] is
#   its negative (h depends on T through −(T[y^t] − T[y^s])); every other entry 0.
# IPO form: ℓ_0 = (−5 − 1/(2·0.2))² = 56.25, ℓ_1 = (0 − 2.5)² = 6.25 → mean 31.25.
# DPOP form, λ = 1: ℓ_0 = log(1 + e) + (c − a) = log(1 + e) + 3 − L_T + L_S ≈ 1.3132617 + 2.2377599,
#   ℓ_1 = log 2 + (c − a) ≈ 0.6931472 + 0.1438389.
S_EX = [[[0.0, 2.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 5.0]]]
T_EX = [[[3.0, 0.0, 1.0], [2.0, 0.0, 1.0], [5.0, 0.0, 0.0]]]
MASK_EX = [[1, 1, 0]]
E = math.e
L_S0, L_T0 = math.log(1 + E**2 + E), math.log(E**3 + 1 + E)
L_S1, L_T1 = math.log(E + 2), math.log(E**2 + 1 + E)
SIG1 = 1 / (1 + math.exp(-1))


def _example(dtype=torch.float64):
    S = torch.tensor(S_EX, dtype=dtype, requires_grad=True)
    T = torch.tensor(T_EX, dtype=dtype, requires_grad=True)
    return S, T, torch.tensor(MASK_EX)


def test_hand_worked_sigmoid() -> None:
    S, T, m = _example()
    out = dt.dpkd_token_loss(S, T, m, beta=0.2)
    expected = (math.log1p(E) + math.log(2)) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-13)
    assert out.loss.item() == pytest.approx(1.0032044, abs=1e-7)  # the rounded hand value
    assert out.agreement_rate.item() == 0.5
    chosen = [0.2 * ((0 - L_S0) - (3 - L_T0)), 0.2 * ((1 - L_S1) - (2 - L_T1)), 0.0]
    rejected = [0.2 * ((2 - L_S0) - (0 - L_T0)), 0.2 * ((1 - L_S1) - (2 - L_T1)), 0.0]
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([chosen], dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([rejected], dtype=torch.float64))
    assert out.chosen_rewards[0, 0].item() == pytest.approx(-0.4475520, abs=1e-7)
    assert out.rejected_rewards[0, 0].item() == pytest.approx(0.5524480, abs=1e-7)

    gS, gT = torch.autograd.grad(out.loss, (S, T))
    g0 = 0.5 * (-0.2 * SIG1)  # (m/Σm)·dℓ/dh at position 0 ≈ −0.0731059
    expected_gS = torch.zeros(1, 3, 3, dtype=torch.float64)
    expected_gS[0, 0, 0], expected_gS[0, 0, 1] = g0, -g0
    torch.testing.assert_close(gS, expected_gS, rtol=1e-13, atol=1e-16)
    torch.testing.assert_close(gT, -expected_gS, rtol=1e-13, atol=1e-16)
    assert g0 == pytest.approx(-0.0731059, abs=1e-7)

    # the released formula, written out above, gives the same number
    assert released_formula(*_example(), beta=0.2).item() == pytest.approx(expected, rel=1e-13)


def test_hand_worked_ipo_and_dpop() -> None:
    S, T, m = _example()
    assert dt.dpkd_token_loss(S, T, m, beta=0.2, form="ipo").loss.item() == pytest.approx(31.25, rel=1e-13)
    expected = ((math.log1p(E) + 3 - L_T0 + L_S0) + (math.log(2) + (2 - L_T1) - (1 - L_S1))) / 2
    got = dt.dpkd_token_loss(S, T, m, beta=0.2, form="dpop", lambda_=1.0).loss.item()
    assert got == pytest.approx(expected, rel=1e-13)
    assert released_formula(*_example(), beta=0.2, form="ipo").item() == pytest.approx(31.25, rel=1e-13)
    assert released_formula(*_example(), beta=0.2, form="dpop", lam=1.0).item() == pytest.approx(expected, rel=1e-13)


@pytest.mark.parametrize("form", ["sigmoid", "ipo", "dpop"])
@pytest.mark.parametrize("reference_free", [False, True])
def test_equals_released_formula_on_random_inputs(form: str, reference_free: bool) -> None:
    g = torch.Generator().manual_seed(1)
    S = torch.randn(3, 6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    T = torch.randn(3, 6, 9, generator=g, dtype=torch.float64) * 2
    m = (torch.rand(3, 6, generator=g) > 0.3).to(torch.float64)
    ours = dt.dpkd_token_loss(S, T, m, beta=0.3, form=form, lambda_=2.0, reference_free=reference_free).loss
    theirs = released_formula(S, T, m, 0.3, form=form, lam=2.0, reference_free=reference_free)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours, S)[0], torch.autograd.grad(theirs, S)[0],
                               rtol=1e-10, atol=1e-14)


def test_h_never_positive_and_agreement_is_minimal() -> None:
    """spec/README.md §4 (structural facts): per-token ℓ ≥ log 2, equal (with zero gradient) exactly where the
    argmaxes agree."""
    g = torch.Generator().manual_seed(2)
    S = torch.randn(4, 8, 5, generator=g, dtype=torch.float64)
    T = torch.randn(4, 8, 5, generator=g, dtype=torch.float64)
    T[:, :4] = S[:, :4] * 3.0  # same argmax at the first 4 positions
    S.requires_grad_(True)
    out = dt.dpkd_token_loss(S, T, torch.ones(4, 8), beta=0.1, reduction="none")
    assert (out.loss >= math.log(2) - 1e-15).all()
    torch.testing.assert_close(out.loss[:, :4], torch.full((4, 4), math.log(2), dtype=torch.float64))
    grad = torch.autograd.grad(out.loss.sum(), S)[0]
    assert (grad[:, :4] == 0).all()
