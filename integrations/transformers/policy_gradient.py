"""MiniLLM's reverse-KL policy gradient (Gu et al. 2024, Sec. 2.2) on a batch of sampled responses.

Objective: the sequence-level reverse KL  L(θ) = KL(q_θ‖p) = E_{y∼q_θ} log q_θ(y|x)/p(y|x).
With r_t = log p(y_t|y_<t, x) − log q_θ(y_t|y_<t, x) and R_{t+1} = Σ_{t' > t} r_{t'}, its gradient splits
(MiniLLM Eq. 5–7) into

* the single-step part Σ_t ∇ KL(q_θ(·|y_<t, x) ‖ p(·|y_<t, x)) — the exact per-position reverse KL over the
  vocabulary, differentiated directly (MiniLLM's ``_reg_loss``: cross-entropy minus entropy);
* the long-term part −Σ_t R_{t+1} ∇ log q_θ(y_t|y_<t, x) — REINFORCE with the return of the *future*
  tokens only, so the two parts do not count step t twice; with length normalisation the return is
  divided by the number of future tokens, R^Norm_{t+1} = R_{t+1} / (T − t − 1).

Teacher-mixed sampling: y is drawn from p̃ = α·p + (1 − α)·q_θ per token, and each position carries the
single-step importance weight w_t = q_θ(y_t|·) / p̃(y_t|·) (MiniLLM Eq. 7); α = 0 is plain on-policy
sampling (w = 1). The surrogate whose gradient is that estimator (w, R treated as constants) is

    L_surr = (1/N) Σ_t m_t · w_t · [ KL_t(q_θ‖p) − R^(Norm)_{t+1} · log q_θ(y_t) ],   N = global token count.

One gradient step is taken per batch of samples (on-policy), so the PPO ratio of the released code is 1
and its clipping inactive; its reward scaling, clipping and whitening are not applied (they rescale the
same estimator). In expectation over y ∼ q_θ (α = 0, no length normalisation) the surrogate's gradient is
exactly ∇ KL(q_θ‖p) — ``tests/transformers/test_policy_gradient.py`` checks that by enumerating every
sequence of a small vocabulary in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import heads

__all__ = ["PolicyGradientResult", "future_returns", "minillm_loss"]


@dataclass(frozen=True)
class PolicyGradientResult:
    loss: torch.Tensor
    reverse_kl: torch.Tensor  # Σ_t m_t r̃_t estimate of the sequence reverse KL per row [B], detached
    mean_weight: float


def future_returns(rewards: torch.Tensor, mask: torch.Tensor, *, length_norm: bool) -> torch.Tensor:
    """R_{t+1} = Σ_{t' > t} m_{t'} r_{t'} per position [B, T] (divided by Σ_{t' > t} m_{t'} when
    ``length_norm``; 0 where no future token exists)."""
    m = mask.to(rewards.dtype)
    rm = rewards * m
    after = rm.flip(-1).cumsum(-1).flip(-1) - rm  # suffix sums excluding position t
    if not length_norm:
        return after
    n_after = m.flip(-1).cumsum(-1).flip(-1) - m
    return torch.where(n_after > 0, after / n_after.clamp_min(1.0), torch.zeros_like(after))


def minillm_loss(student: heads.HeadOutput, teacher: heads.HeadOutput, *, mix_alpha: float, length_norm: bool,
                 single_step: bool, normalizer: float) -> PolicyGradientResult:
    """The MiniLLM surrogate (module docstring) on a batch of sampled responses (labels = the samples)."""
    mask = student.mask
    logq = heads.token_logps(student)  # [B, T-1], with gradient
    with torch.no_grad():
        logp = heads.token_logps(teacher)
        lq = logq.detach()
        rewards = (logp - lq) * mask
        if mix_alpha > 0:
            log_mix = torch.logaddexp(logp + torch.log(torch.tensor(mix_alpha, dtype=lq.dtype)),
                                      lq + torch.log(torch.tensor(1.0 - mix_alpha, dtype=lq.dtype)))
            w = torch.exp(lq - log_mix) * mask
        else:
            w = mask.to(lq.dtype)
        ret = future_returns(rewards, mask, length_norm=length_norm)
    per_token = -ret * w * logq
    if single_step:
        rkl = heads.token_divergence("reverse_kl", student, teacher, normalizer=None, reduction="none")
        per_token = per_token + w * rkl
    loss = (per_token * mask).sum() / normalizer
    n = mask.sum()
    return PolicyGradientResult(loss, -rewards.sum(-1), float(w.sum() / n.clamp_min(1)))
