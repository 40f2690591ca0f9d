"""Diagnostics of sequence-level preference training: the implicit reward (paper Eq. 29) and TRL's
preference metrics. (``first_token_divergence``, the Table 3 diagnostic, lives in ``distill.py``.)

Naming: policy = student q_θ, reference = teacher p, chosen = teacher output y_t, rejected = student
output y_s. Metrics have no gradient (CONVENTIONS.md).
"""

from __future__ import annotations

import numpy as np

from . import validation as v
from ._common import LS, LT, A, B, C, D, Margin, sequence_inputs

__all__ = ["implicit_reward", "preference_metrics"]


@v.options(v.BETA)
def implicit_reward(
    policy_logps: np.ndarray,
    reference_logps: np.ndarray,
    *,
    beta: float = 0.1,
    lengths: np.ndarray | None = None,
) -> np.ndarray:
    """The DPO/DPKD implicit reward of a response, elementwise.

    Symbols: log q_θ(y|x) = ``policy_logps``, log p(y|x) = ``reference_logps``, β, |y| = ``lengths``.

    Formula (paper Eq. 29; Sec. 4.3):  r̂_θ(x, y) = β · log[q_θ(y|x) / p(y|x)]  [ / |y| when lengths given,
    the per-token reward inside Eq. 9 ].  It omits the β log Z(x) of Eq. 5, which cancels in every
    preference (Eq. 6).

    Args:
        policy_logps: float array [...], summed student log-probs.
        reference_logps: float array, same shape, summed teacher log-probs.
        beta: β > 0.
        lengths: optional token counts (int or float, > 0), same shape.

    Returns:
        float64 array [...] (never reduced).

    Example:
        >>> import numpy as np
        >>> print(implicit_reward(np.array([-5.0, -3.0]), np.array([-4.0, -9.0]), beta=0.5))
        [-0.5  3. ]
        >>> print(implicit_reward(np.array([-5.0]), np.array([-9.0]), beta=0.5, lengths=np.array([4])))
        [0.5]

    References: Li et al. 2024 Eq. 29 (= Eq. 5 without β log Z); Rafailov et al. 2023 §5.
    See also: ``preference_metrics``, ``dpkd_loss`` (its rewards are this function of each side).
    """
    func = "implicit_reward"
    beta = v.check_options(func, beta=beta)["beta"]
    arrays = {"policy_logps": policy_logps, "reference_logps": reference_logps, "lengths": lengths}
    x = sequence_inputs(func, arrays, optional=("lengths",), lengths=("lengths",))
    ratio = x["policy_logps"] - x["reference_logps"]
    return beta * (ratio / x["lengths"] if x["lengths"] is not None else ratio)


@v.options(v.BETA)
def preference_metrics(
    policy_chosen_logps: np.ndarray,
    policy_rejected_logps: np.ndarray,
    reference_chosen_logps: np.ndarray,
    reference_rejected_logps: np.ndarray,
    *,
    beta: float = 0.1,
    chosen_lengths: np.ndarray | None = None,
    rejected_lengths: np.ndarray | None = None,
) -> dict[str, float]:
    """The metrics TRL's DPOTrainer logs, for one batch of (y_t, y_s) pairs.

    Symbols: a, b, c, d, L_t, L_s as in ``dpkd_loss``; r_t = β(a − c)[/L_t], r_s = β(b − d)[/L_s] (the
    ``chosen_rewards`` / ``rejected_rewards`` of ``dpkd_loss``); mean over all elements.

    Formula:
        rewards/chosen = mean r_t          rewards/rejected = mean r_s
        rewards/accuracies = mean 1[r_t > r_s]   (strict: a tie counts as wrong)
        rewards/margins = mean (r_t − r_s)  logps/chosen = mean a    logps/rejected = mean b

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps:
            a, b, c, d, float arrays of one non-empty shape [...].
        beta: β > 0.  chosen_lengths, rejected_lengths: both or neither (Eq. 9 rewards), > 0.

    Returns:
        dict of Python floats with the six keys above.

    Example:
        >>> import numpy as np
        >>> m = preference_metrics(np.array([-5.0, -2.0]), np.array([-3.0, -4.0]), np.array([-4.0, -4.0]),
        ...                        np.array([-9.0, -4.0]), beta=0.5)
        >>> for key, value in m.items():
        ...     print(key, round(value, 4))
        rewards/chosen 0.25
        rewards/rejected 1.5
        rewards/accuracies 0.5
        rewards/margins -1.25
        logps/chosen -3.5
        logps/rejected -3.5

    References: TRL ``DPOTrainer`` metric names; Li et al. 2024 Eq. 29.
    See also: ``implicit_reward``, ``dpkd_loss``.
    """
    func = "preference_metrics"
    beta = v.check_options(func, beta=beta)["beta"]
    normalize = v.check_lengths_pair(func, chosen_lengths, rejected_lengths)
    x = sequence_inputs(func, {A: policy_chosen_logps, B: policy_rejected_logps, C: reference_chosen_logps,
                        D: reference_rejected_logps, LT: chosen_lengths, LS: rejected_lengths},
                        optional=(LT, LS), lengths=(LT, LS), reduction="mean")
    m = Margin.of(x, normalize=normalize)
    chosen, rejected = beta * m.chosen, beta * m.rejected
    return {
        "rewards/chosen": float(np.mean(chosen)),
        "rewards/rejected": float(np.mean(rejected)),
        "rewards/accuracies": float(np.mean(chosen > rejected)),
        "rewards/margins": float(np.mean(chosen - rejected)),
        "logps/chosen": float(np.mean(x[A])),
        "logps/rejected": float(np.mean(x[B])),
    }
