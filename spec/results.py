"""Types shared by the spec and the backends: the loss results (field order: TRL's ``dpo_loss`` order) and
the fused lm_head path's teacher inputs. Framework-free: the fields hold whatever arrays a backend takes."""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["PreferenceLoss", "TokenPreferenceLoss", "FusedPreferenceLoss", "TeacherLMHead", "TeacherLogps"]


class PreferenceLoss(NamedTuple):
    """Sequence-level preference loss.

    loss:             the reduced loss (scalar) or per-example losses [...] under ``reduction="none"``.
    chosen_rewards:   the chosen-side term inside σ, β·(a − c)[/L_t] (teacher output y_t); per example.
    rejected_rewards: the rejected-side term inside σ, β·(b − d)[/L_s] (student output y_s); per example.
    Backends return the rewards detached from autograd.
    """

    loss: Any
    chosen_rewards: Any
    rejected_rewards: Any


class TokenPreferenceLoss(NamedTuple):
    """Token-level (released-code) DPKD loss.

    loss:             reduced loss, or per-token values [..., T] (0 where the mask is 0) under "none".
    agreement_rate:   fraction of loss tokens where the teacher's and the student's argmax agree (scalar).
    chosen_rewards:   per-token β·(a_i − c_i), 0 where the mask is 0 [..., T] (detached in backends).
    rejected_rewards: per-token β·(b_i − d_i), 0 where the mask is 0 [..., T] (detached in backends).
    """

    loss: Any
    agreement_rate: Any
    chosen_rewards: Any
    rejected_rewards: Any


class FusedPreferenceLoss(NamedTuple):
    """A sequence-level preference loss computed on the lm_head (the backends' ``fused_*_loss``).

    The fields of :class:`PreferenceLoss`, then the student's summed log-probs the loss was taken on (what
    TRL logs as ``logps/chosen`` and ``logps/rejected``):

    policy_chosen_logps:   a = Σ_t log q_θ(y_t) over the chosen (teacher-output) rows, per pair [B].
    policy_rejected_logps: b = Σ_t log q_θ(y_s) over the rejected (student-output) rows, per pair [B].
    Rewards and log-probs are detached from autograd; only ``loss`` carries a gradient.
    """

    loss: Any
    chosen_rewards: Any
    rejected_rewards: Any
    policy_chosen_logps: Any
    policy_rejected_logps: Any


class TeacherLMHead(NamedTuple):
    """The teacher of a fused sequence loss as hidden states + lm_head (no gradient flows into it).

    chosen_hidden [B, T_c, H_t] at the teacher-output rows, rejected_hidden [B, T_s, H_t] at the
    student-output rows, weight [V, H_t], bias [V] or None. H_t may differ from the student's H."""

    chosen_hidden: Any
    rejected_hidden: Any
    weight: Any
    bias: Any = None


class TeacherLogps(NamedTuple):
    """Precomputed teacher sequence log-probs of a fused sequence loss: c = log p(y_t|x) and
    d = log p(y_s|x), each [B]; constants (no gradient)."""

    chosen: Any
    rejected: Any
