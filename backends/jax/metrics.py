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
    """``dpkd.spec.implicit_reward`` in JAX: the DPO/DPKD implicit reward of a response, elementwise. Formula,
    arguments, errors and references: the spec function. Dtypes and checks (options static under ``jit``):
    ``dpkd.backends.jax``.

    Example:
        >>> import jax.numpy as jnp
        >>> implicit_reward(jnp.array([-4.0]), jnp.array([-2.0]), beta=0.5, lengths=jnp.array([2])).tolist()
        [-0.5]
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
    """``dpkd.spec.preference_metrics`` in JAX: the metrics TRL's DPOTrainer logs, for one batch of (y_t, y_s) pairs.
    Formula, arguments, errors and references: the spec function. Dtypes and checks (options static under ``jit``):
    ``dpkd.backends.jax``.

    Example:
        >>> import jax.numpy as jnp
        >>> m = preference_metrics(jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]), jnp.array([-2.0]),
        ...                        beta=1.0)
        >>> m["rewards/margins"], m["rewards/accuracies"]
        (2.0, 1.0)
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
