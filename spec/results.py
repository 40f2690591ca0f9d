"""Result types shared by the spec and the backends (the field order is TRL's ``dpo_loss`` order)."""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["PreferenceLoss", "TokenPreferenceLoss"]


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
