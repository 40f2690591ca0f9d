"""The full training objective for tensors (spec/README.md §7); the config and presets are the spec's own.

``ObjectiveConfig`` and the presets are plain Python data with no array math, so they are re-exported
from ``dpkd.spec.objective`` (one definition, one validation); only the combination is written in torch.
"""

from __future__ import annotations

import functools

import torch
from dpkd.spec import validation as v
from dpkd.spec.objective import DISTIL_ONLY, PAPER_OBJECTIVE, RELEASED_OBJECTIVE, ObjectiveConfig

from ._base import ValueChecks, check_same_placement, compute_dtype, float_arg, shape_of

__all__ = ["ObjectiveConfig", "objective", "PAPER_OBJECTIVE", "RELEASED_OBJECTIVE", "DISTIL_ONLY"]


def objective(
    sft_loss: torch.Tensor | float | None,
    distil_loss: torch.Tensor | float | None,
    pt_lm_loss: torch.Tensor | float | None = None,
    pt_kd_loss: torch.Tensor | float | None = None,
    *,
    config: ObjectiveConfig,
) -> torch.Tensor:
    """``dpkd.spec.objective`` in PyTorch: combine the reduced losses of one step into the training loss. Formula,
    arguments, errors and references: the spec function. Dtypes and checks: ``dpkd.backends.torch``.

    Example:
        >>> import torch
        >>> objective(torch.tensor(2.0), torch.tensor(0.8), torch.tensor(4.0), torch.tensor(1.0),
        ...           config=RELEASED_OBJECTIVE)
        tensor(2.6500)
    """
    func = "objective"
    v.check_options(func, config=config)
    coef = config.coefficients()
    losses = {"sft_loss": sft_loss, "distil_loss": distil_loss, "pt_lm_loss": pt_lm_loss, "pt_kd_loss": pt_kd_loss}
    for name, x in losses.items():
        if coef[name] != 0.0:
            v.require(func, name, x)
    given = {n: x for n, x in losses.items() if x is not None}
    v.check_same_shape(func, {n: shape_of(x) for n, x in given.items()})
    tensors = {n: float_arg(func, n, x) for n, x in given.items()}
    check_same_placement(func, list(tensors.items()))
    checks = ValueChecks(func)
    for name, t in tensors.items():
        checks.finite(name, t)
    checks.run()
    dtype = compute_dtype(functools.reduce(torch.promote_types, (t.dtype for t in tensors.values())))
    total = None
    for name, t in tensors.items():
        # a zero-weight term is skipped, not multiplied, so it cannot contribute even an IEEE −0.0
        if coef[name] != 0.0:
            term = coef[name] * t.to(dtype)
            total = term if total is None else total + term
    # (1 − α) + α = 1, so at least one term has a non-zero coefficient and is present
    return total
