"""The full training objective: how the distillation loss is mixed with SFT and pre-training terms
(spec/README.md §7, §10 (D4)).

    L = (1 − α)·sft + α·distil + λ·[(1 − κ)·pt_lm + κ·pt_kd]

α = ``alpha`` (released code ``--kd-ratio``), λ = ``lm_coef`` (``--lm-coef``), κ = ``pt_kd_ratio`` (the
released code reuses --kd-ratio for it). Every input is an already-reduced loss (usually a scalar).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import validation as v
from ._common import float64_array

__all__ = ["ObjectiveConfig", "objective", "objective_grad", "PAPER_OBJECTIVE", "RELEASED_OBJECTIVE",
           "DISTIL_ONLY"]

_TERMS = ("sft_loss", "distil_loss", "pt_lm_loss", "pt_kd_loss")


@dataclass(frozen=True)
class ObjectiveConfig:
    """Mixing weights of ``objective``.

    Attributes:
        alpha: α ∈ [0, 1], weight of the distillation loss against the SFT cross-entropy.
        lm_coef: λ ≥ 0, weight of the pre-training block.
        pt_kd_ratio: κ ∈ [0, 1], weight of forward KD against plain LM cross-entropy inside that block.

    Example:
        >>> ObjectiveConfig(alpha=0.5, lm_coef=0.5, pt_kd_ratio=0.5) == RELEASED_OBJECTIVE
        True
    """

    alpha: float
    lm_coef: float
    pt_kd_ratio: float

    def __post_init__(self) -> None:
        func = "ObjectiveConfig"
        v.check_scalar(func, "alpha", self.alpha, low=0.0, high=1.0, low_inclusive=True, high_inclusive=True)
        v.check_scalar(func, "lm_coef", self.lm_coef, low=0.0, low_inclusive=True)
        v.check_scalar(func, "pt_kd_ratio", self.pt_kd_ratio, low=0.0, high=1.0, low_inclusive=True,
                       high_inclusive=True)

    def coefficients(self) -> dict[str, float]:
        """The linear coefficient of each term: ∂L/∂term."""
        a, lam, k = float(self.alpha), float(self.lm_coef), float(self.pt_kd_ratio)
        return {"sft_loss": 1.0 - a, "distil_loss": a, "pt_lm_loss": lam * (1.0 - k), "pt_kd_loss": lam * k}


#: Paper, Algorithm 1: L = L_kd + λ·L_pt (λ is not given in the paper; 0.5 is the released runner's).
PAPER_OBJECTIVE = ObjectiveConfig(alpha=1.0, lm_coef=0.5, pt_kd_ratio=0.0)
#: Released LMOps runner: L = 0.5·CE_D + 0.5·L_tok + 0.5·(0.5·CE_Dp + 0.5·FKD_Dp).
RELEASED_OBJECTIVE = ObjectiveConfig(alpha=0.5, lm_coef=0.5, pt_kd_ratio=0.5)
#: The distillation loss alone.
DISTIL_ONLY = ObjectiveConfig(alpha=1.0, lm_coef=0.0, pt_kd_ratio=0.0)


CONFIG = v.Option("config", v.REQUIRED, kind="instance", cls=ObjectiveConfig)


def _terms(
    func: str, losses: dict[str, object], config: object
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Validate: ``config`` first, then presence (a term is required iff its coefficient is non-zero),
    shapes (all given terms alike), dtypes, finiteness."""
    v.check_options(func, config=config)
    coef = config.coefficients()
    for name in _TERMS:
        if losses[name] is None and coef[name] != 0.0:
            v.require(func, name, None)
    given = {name: x for name, x in losses.items() if x is not None}
    v.check_same_shape(func, {name: np.shape(x) for name, x in given.items()})
    arrays = {name: float64_array(func, name, x) for name, x in given.items()}
    for name, x in arrays.items():
        v.check_finite(func, name, bool(np.all(np.isfinite(x))))
    return arrays, coef


@v.options(CONFIG)
def objective(
    sft_loss: np.ndarray | float | None,
    distil_loss: np.ndarray | float | None,
    pt_lm_loss: np.ndarray | float | None = None,
    pt_kd_loss: np.ndarray | float | None = None,
    *,
    config: ObjectiveConfig,
) -> np.ndarray:
    """Combine the reduced losses of one step into the training loss.

    Symbols: sft = CE of the student on the training labels (CE_D); distil = the distillation loss
    (sequence-level ``dpkd_loss``, token-level ``dpkd_token_loss``, or a baseline); pt_lm = CE on the
    pre-training batch (CE_Dp); pt_kd = forward KD on the pre-training batch (FKD_Dp); α, λ, κ from
    ``config``.

    Formula (spec/README.md §7; paper Algorithm 1 step 7 is α = 1, κ = 0):
        L = (1 − α)·sft + α·distil + λ·[(1 − κ)·pt_lm + κ·pt_kd]
    A term whose coefficient is 0 may be None (then it is left out); one with a non-zero coefficient is
    required.

    Args:
        sft_loss, distil_loss, pt_lm_loss, pt_kd_loss: finite float scalars (or arrays of one shape).
        config: an ``ObjectiveConfig`` (e.g. ``PAPER_OBJECTIVE``, ``RELEASED_OBJECTIVE``, ``DISTIL_ONLY``).

    Returns:
        float64 array of the common shape (0-d for scalars).

    Example:
        >>> print(objective(2.0, 0.8, 4.0, 1.0, config=RELEASED_OBJECTIVE))   # 1 + 0.4 + 1 + 0.25
        2.65
        >>> print(objective(None, 0.8, 4.0, config=PAPER_OBJECTIVE))          # 0.8 + 0.5·4
        2.8

    References: Li et al. 2024 Algorithm 1; LMOps dpkd/main.py ``finetune``/``get_lmpt_loss``;
    spec/README.md §7, §10 (D4).
    See also: ``objective_grad``, ``ObjectiveConfig``.
    """
    arrays, coef = _terms("objective", {"sft_loss": sft_loss, "distil_loss": distil_loss,
                                        "pt_lm_loss": pt_lm_loss, "pt_kd_loss": pt_kd_loss}, config)
    # the coefficients sum (1 − α) + α = 1, so at least one term is present
    total = np.zeros(next(iter(arrays.values())).shape)
    for name, x in arrays.items():
        # a zero-weight term is skipped, not multiplied, so it cannot contribute even an IEEE -0.0
        if coef[name] != 0.0:
            total = total + coef[name] * x
    return total


def objective_grad(
    sft_loss: np.ndarray | float | None,
    distil_loss: np.ndarray | float | None,
    pt_lm_loss: np.ndarray | float | None = None,
    pt_kd_loss: np.ndarray | float | None = None,
    *,
    config: ObjectiveConfig,
) -> dict[str, np.ndarray]:
    """Gradient of S = sum(objective(...)) w.r.t. each loss given: its linear coefficient.

    Formula: ∂L/∂sft = 1 − α, ∂L/∂distil = α, ∂L/∂pt_lm = λ(1 − κ), ∂L/∂pt_kd = λκ.

    Args/Raises: exactly as ``objective``.

    Returns:
        dict keyed by the argument names of the terms that are not None; float64, each the terms' shape.

    Example:
        >>> g = objective_grad(2.0, 0.8, 4.0, 1.0, config=RELEASED_OBJECTIVE)
        >>> print({k: float(x) for k, x in g.items()})
        {'sft_loss': 0.5, 'distil_loss': 0.5, 'pt_lm_loss': 0.25, 'pt_kd_loss': 0.25}

    See also: ``objective``.
    """
    arrays, coef = _terms("objective_grad", {"sft_loss": sft_loss, "distil_loss": distil_loss,
                                             "pt_lm_loss": pt_lm_loss, "pt_kd_loss": pt_kd_loss}, config)
    return {name: np.full(x.shape, coef[name]) for name, x in arrays.items()}
