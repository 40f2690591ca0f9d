"""Sequence-level DPKD without length normalisation IS TRL's DPO "sigmoid" loss with the teacher as reference;
``hinge_loss`` and ``robust_loss`` are TRL's "hinge" and "robust" loss types.

The mapping (spec/CONVENTIONS.md "General"): TRL's policy = the student q_θ, TRL's ref_model = the teacher p,
TRL's chosen response = the teacher's output y_t, TRL's rejected response = the student's output y_s. So
  policy_chosen_logps = log q_θ(y_t), policy_rejected_logps = log q_θ(y_s),
  reference_chosen_logps = log p(y_t), reference_rejected_logps = log p(y_s).

TRL 1.16's ``DPOTrainer._compute_loss`` (trl/trainer/dpo_trainer.py, written out here from that source), per
pair, with logits = δ = (policy_chosen − ref_chosen) − (policy_rejected − ref_rejected):
  "sigmoid": −logσ(β·δ)                                   — it does NOT read ``label_smoothing``
  "hinge":   relu(1 − β·δ)
  "robust":  (−(1 − ε)·logσ(β·δ) + ε·logσ(−β·δ)) / (1 − 2ε)  — ε = ``label_smoothing`` ∈ [0, 0.5)
  rewards β·(policy − ref) per side, detached; the trainer takes the mean over pairs.
DPKD Eq. 8 is "sigmoid" with h = δ. Its cDPO smoothing (ε > 0: (1−ε)·(−logσ(βδ)) + ε·(−logσ(−βδ))) is
Mitchell's, the form TRL 1.16 keeps for "aot" (on sorted log-ratios) but no longer applies to "sigmoid".
"""

from __future__ import annotations

import dpkd.backends.torch as dt
import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(1)


def trl_dpo_sigmoid(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing=0.0):
    """TRL 1.16 "sigmoid" for ε = 0; for ε > 0 the cDPO form (Mitchell; TRL's "aot" expression)."""
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
              - F.logsigmoid(-beta * logits) * label_smoothing)
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def trl_hinge(logits, beta):
    return torch.relu(1 - beta * logits)


def trl_robust(logits, beta, label_smoothing):
    clean_loss_term = -(1 - label_smoothing) * F.logsigmoid(beta * logits)
    flipped_loss_term = -label_smoothing * F.logsigmoid(-beta * logits)
    return (clean_loss_term - flipped_loss_term) / (1 - 2 * label_smoothing)


@pytest.mark.parametrize(("name", "options"), [("hinge", {"beta": 0.1}), ("hinge", {"beta": 0.8}),
                                               ("robust", {"beta": 0.1, "label_smoothing": 0.0}),
                                               ("robust", {"beta": 0.4, "label_smoothing": 0.3})])
def test_hinge_and_robust_losses_equal_trl(name, options) -> None:
    g = torch.Generator().manual_seed(5)
    a, b, c, d = (torch.randn(16, generator=g, dtype=torch.float64) * 4 for _ in range(4))
    a.requires_grad_(True)
    logits = (a - b) - (c - d)
    ours = getattr(dt, f"{name}_loss")(a, b, c, d, reduction="none", **options)
    theirs = trl_hinge(logits, **options) if name == "hinge" else trl_robust(logits, **options)
    assert name == "robust" or bool(((1 - options["beta"] * logits) < 0).any())  # both sides of the hinge
    torch.testing.assert_close(ours.loss, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.chosen_rewards, options["beta"] * (a - c).detach(), rtol=1e-12, atol=0)
    (g_ours,) = torch.autograd.grad(ours.loss.mean(), a)
    (g_theirs,) = torch.autograd.grad(theirs.mean(), a)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-12, atol=1e-15)


def _summed_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # TRL's get_batch_logps with ignore_index -100, written independently: Σ_j log_softmax(ℓ_j)[y_j]
    mask = labels != -100
    safe = torch.where(mask, labels, 0)
    per_token = torch.gather(logits.log_softmax(-1), -1, safe.unsqueeze(-1)).squeeze(-1)
    return (per_token * mask).sum(-1)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_dpkd_loss_equals_trl_dpo_sigmoid(beta: float, label_smoothing: float) -> None:
    g = torch.Generator().manual_seed(3)
    a, b, c, d = (torch.randn(16, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    a.requires_grad_(True)
    b.requires_grad_(True)
    ours = dt.dpkd_loss(a, b, c, d, beta=beta, label_smoothing=label_smoothing, reduction="none")
    theirs = trl_dpo_sigmoid(a, b, c, d, beta, label_smoothing)
    torch.testing.assert_close(ours.loss, theirs[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.chosen_rewards, theirs[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.rejected_rewards, theirs[2], rtol=1e-12, atol=1e-12)
    assert not ours.chosen_rewards.requires_grad and not ours.rejected_rewards.requires_grad

    mean_ours = dt.dpkd_loss(a, b, c, d, beta=beta, label_smoothing=label_smoothing).loss
    mean_theirs = theirs[0].mean()
    torch.testing.assert_close(mean_ours, mean_theirs, rtol=1e-12, atol=1e-12)
    g_ours = torch.autograd.grad(mean_ours, (a, b))
    g_theirs = torch.autograd.grad(mean_theirs, (a, b))
    for x, y in zip(g_ours, g_theirs, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-15)


def test_trl_mapping_end_to_end_from_logits() -> None:
    """Teacher-generated y_t as TRL's chosen, student-generated y_s as rejected, the teacher as ref_model."""
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 5, 11
    y_t = torch.randint(0, V, (B, T), generator=g)
    y_s = torch.randint(0, V, (B, T), generator=g)
    y_t[0, 3:] = -100  # padding / prompt positions
    y_s[2, :2] = -100
    student_t = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    student_s = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_t = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    teacher_s = torch.randn(B, T, V, generator=g, dtype=torch.float64)

    a, _ = dt.sequence_logps(student_t, y_t)
    b, _ = dt.sequence_logps(student_s, y_s)
    c, _ = dt.sequence_logps(teacher_t, y_t)
    d, _ = dt.sequence_logps(teacher_s, y_s)
    ours = dt.dpkd_loss(a, b, c, d, beta=0.1).loss

    theirs = trl_dpo_sigmoid(_summed_logps(student_t, y_t), _summed_logps(student_s, y_s),
                             _summed_logps(teacher_t, y_t), _summed_logps(teacher_s, y_s), 0.1)[0].mean()
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for x, y in zip(torch.autograd.grad(ours, (student_t, student_s)),
                    torch.autograd.grad(theirs, (student_t, student_s)), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-14)


def test_cpo_nll_maps_exactly_onto_trls_batch_token_mean() -> None:
    """TRL's CPOTrainer: losses.mean() + cpo_alpha·nll, nll = nn.CrossEntropyLoss over every chosen token of
    the batch = Σ_i(−a_i)/Σ_i L_i; ours with lengths is mean_i(−a_i/L_i). The documented mapping
    (chosen_lengths=None, nll_weight = w·B/Σ L_i) gives TRL's value and gradient exactly."""
    g = torch.Generator().manual_seed(2)
    B, T, V, beta, w = 4, 6, 9, 0.3, 0.7
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 2:] = -100  # lengths 2, 6, 4, 6
    labels[2, 4:] = -100
    b = -torch.rand(B, generator=g, dtype=torch.float64) * 10
    a, n = dt.sequence_logps(logits, labels)
    nll = torch.nn.CrossEntropyLoss()(logits.reshape(-1, V), labels.reshape(-1))  # TRL's cross_entropy_loss
    trl = (-F.logsigmoid(beta * (a - b))).mean() + w * nll
    mapped = dt.cpo_loss(a, b, beta=beta, nll_weight=w * B / float(n.sum())).loss
    torch.testing.assert_close(mapped, trl, rtol=1e-12, atol=1e-12)
    for x, y in zip(torch.autograd.grad(mapped, logits, retain_graph=True), torch.autograd.grad(trl, logits)):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-15)
    per_sequence = dt.cpo_loss(a, b, beta=beta, nll_weight=w, chosen_lengths=n).loss  # mean_i(−a_i/L_i)
    assert abs(float((per_sequence - trl).detach())) > 1e-3  # a different normalisation when the lengths differ
