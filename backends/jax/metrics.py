"""Metrics (TRL's names) and the implicit reward of the sequence-level losses, in JAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from dpkd.spec import validation as v

from . import _base
from ._base import LS, LT, A, B, C, D

__all__ = ["implicit_reward", "preference_metrics"]


def implicit_reward(
    policy_logps: jax.Array,
    reference_logps: jax.Array,
    *,
    beta: float = 0.1,
    lengths: jax.Array | None = None,
) -> jax.Array:
    """The DPO implicit reward of a response, elementwise (paper Eq. 29).

    Formula: r = β·(log q_θ(y|x) − log p(y|x)) [/ |y| when ``lengths`` is given].

    Args:
        policy_logps: [...] summed student log-probs.  reference_logps: [...] summed teacher log-probs.
        beta: β > 0 (static).  lengths: optional [...] token counts, > 0.

    Returns:
        [...] in the compute dtype (differentiable; the losses' rewards are the detached version).

    Example:
        >>> import jax.numpy as jnp
        >>> implicit_reward(jnp.array([-4.0]), jnp.array([-2.0]), beta=0.5, lengths=jnp.array([2])).tolist()
        [-0.5]

    See also: ``dpkd_loss`` (its rewards), ``preference_metrics``.
    """
    func = "implicit_reward"
    beta = _base.options(func, beta=beta)["beta"]
    arrays = {"policy_logps": policy_logps, "reference_logps": reference_logps, "lengths": lengths}
    x = _base.sequence_inputs(func, arrays, optional=("lengths",), lengths=("lengths",))
    ratio = x["policy_logps"] - x["reference_logps"]
    return beta * (ratio if x["lengths"] is None else ratio / x["lengths"])


def preference_metrics(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    reference_chosen_logps: jax.Array,
    reference_rejected_logps: jax.Array,
    *,
    beta: float = 0.1,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
) -> dict:
    """TRL's DPO metrics for a batch of (teacher output, student output) pairs.

    Formula, with chosen_rewards = β(a − c)[/L_t] and rejected_rewards = β(b − d)[/L_s] (as ``dpkd_loss``):
        rewards/chosen = mean chosen_rewards, rewards/rejected = mean rejected_rewards,
        rewards/accuracies = mean 1[chosen_rewards > rejected_rewards],
        rewards/margins = mean (chosen_rewards − rejected_rewards),
        logps/chosen = mean a, logps/rejected = mean b.

    Args:
        a, b, c, d as ``dpkd_loss`` (one shape, non-empty); beta (static); optional lengths (both or neither).

    Returns:
        dict of Python floats when called eagerly; of 0-dim arrays when traced (jit/vmap).

    Example:
        >>> import jax.numpy as jnp
        >>> m = preference_metrics(jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]), jnp.array([-2.0]),
        ...                        beta=1.0)
        >>> m["rewards/margins"], m["rewards/accuracies"]
        (2.0, 1.0)

    References: TRL ``DPOTrainer`` logged metrics; paper Eq. 29.
    See also: ``dpkd_loss``, ``implicit_reward``.
    """
    func = "preference_metrics"
    beta = _base.options(func, beta=beta)["beta"]
    normalize = v.check_lengths_pair(func, chosen_lengths, rejected_lengths)
    x = _base.sequence_inputs(func, {A: policy_chosen_logps, B: policy_rejected_logps, C: reference_chosen_logps,
                              D: reference_rejected_logps, LT: chosen_lengths, LS: rejected_lengths},
                              optional=(LT, LS), lengths=(LT, LS), reduction="mean")
    chosen, rejected = _base.margin(x, normalize=normalize)
    chosen, rejected = beta * chosen, beta * rejected
    dt = chosen.dtype
    values = {
        "rewards/chosen": jnp.mean(chosen),
        "rewards/rejected": jnp.mean(rejected),
        "rewards/accuracies": jnp.mean((chosen > rejected).astype(dt)),
        "rewards/margins": jnp.mean(chosen - rejected),
        "logps/chosen": jnp.mean(x[A]),
        "logps/rejected": jnp.mean(x[B]),
    }
    return {k: _base.scalar_out(jax.lax.stop_gradient(val)) for k, val in values.items()}
