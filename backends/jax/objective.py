"""The full training objective for JAX losses (spec/README.md §7, §10 (D4)).

    L = (1 − α)·sft + α·distil + λ·[(1 − κ)·pt_lm + κ·pt_kd]

``ObjectiveConfig`` and the presets are the spec's own (plain Python data, framework-free; re-exported);
``objective`` is written here for jax arrays. ``config`` is a frozen dataclass, hence hashable: it is a
static argument under ``jax.jit``.
"""

from __future__ import annotations

from typing import Any

import jax
from dpkd.spec import validation as v
from dpkd.spec.objective import DISTIL_ONLY, PAPER_OBJECTIVE, RELEASED_OBJECTIVE, ObjectiveConfig

from . import _base

__all__ = ["ObjectiveConfig", "objective", "PAPER_OBJECTIVE", "RELEASED_OBJECTIVE", "DISTIL_ONLY"]

_TERMS = ("sft_loss", "distil_loss", "pt_lm_loss", "pt_kd_loss")


def objective(
    sft_loss: jax.Array | float | None,
    distil_loss: jax.Array | float | None,
    pt_lm_loss: jax.Array | float | None = None,
    pt_kd_loss: jax.Array | float | None = None,
    *,
    config: ObjectiveConfig,
) -> jax.Array:
    """``dpkd.spec.objective`` in JAX: combine the reduced losses of one step into the training loss. Formula,
    arguments, errors and references: the spec function. Dtypes and checks (options static under ``jit``):
    ``dpkd.backends.jax``.

    Example:
        >>> float(objective(2.0, 3.0, 4.0, 1.0, config=RELEASED_OBJECTIVE))  # 1 + 1.5 + 1 + 0.25
        3.75
    """
    func = "objective"
    _base.options(func, config=config)
    coef = config.coefficients()
    losses: dict[str, Any] = {"sft_loss": sft_loss, "distil_loss": distil_loss, "pt_lm_loss": pt_lm_loss,
                              "pt_kd_loss": pt_kd_loss}
    for name in _TERMS:
        if losses[name] is None and coef[name] != 0.0:
            _base.require(func, **{name: None})
    given = {name: x for name, x in losses.items() if x is not None}
    v.check_same_shape(func, {name: _base.shape_of(x) for name, x in given.items()})
    arrays = {name: _base.float_arg(func, name, x) for name, x in given.items()}
    for name, x in arrays.items():
        _base.check_finite(func, name, x)
    dt = _base.compute_dtype(*arrays.values())
    total = None
    for name, x in arrays.items():
        # a zero-weight term is skipped, not multiplied (no IEEE −0.0, no gradient path)
        if coef[name] != 0.0:
            term = coef[name] * x.astype(dt)
            total = term if total is None else total + term
    if total is None:  # pragma: no cover - the coefficients (1 − α) + α = 1 always leave a term
        raise AssertionError("objective without a non-zero term")
    return total
