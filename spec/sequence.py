"""Sequence-level preference losses (paper Eq. 8 / Eq. 9, the Table 2 variants, hinge, robust), float64.

Naming, as in DPO trainers: policy = the student q_θ, reference = the teacher p, chosen = the teacher's
output y_t, rejected = the student's output y_s. Per example

    a = log q_θ(y_t|x)  (policy_chosen_logps)      c = log p(y_t|x)  (reference_chosen_logps)
    b = log q_θ(y_s|x)  (policy_rejected_logps)    d = log p(y_s|x)  (reference_rejected_logps)
    L_t = |y_t|  (chosen_lengths)                  L_s = |y_s|  (rejected_lengths)

One mechanism serves every loss (spec/README.md §2, §3): each loss is a function of the two per-side log-ratios  r_t =
(a − c)/L_t  and  r_s = (b − d)/L_s  (reference terms 0 for the reference-free losses, lengths 1 when not normalising),
of the margin  h = r_t − r_s, and of a few extra terms. ``_common.sequence_inputs`` checks the inputs once, ``Margin``
builds r_t, r_s, h and their partial derivatives (``_eq9_margin`` both, for the losses on the Eq. 8 / Eq. 9 margin), and
``_Core`` turns a per-element loss and its per-element partials into the reduced result or the gradient dict. Each
public loss is then a few lines on top.

Validation order (spec/CONVENTIONS.md, "General", Errors): options (``reduction``, ``form``, scalars in signature
order), then which arguments are needed (the lengths pair), then presence (required arrays not None), shapes (all
exactly equal, no broadcasting), dtypes (float or integer), then values: finite (signature order), lengths > 0 (chosen,
then rejected), and a non-empty input under ``reduction="mean"``.

Gradients: ``<loss>_grad(<same arguments>)`` returns ``{argument name: ∂S/∂argument}`` for the float
array arguments (the four log-prob arrays when given; lengths never), S = sum(loss output).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import validation as v
from ._common import (
    LS,
    LT,
    A,
    B,
    C,
    D,
    Margin,
    reduce_elements,
    reduce_elements_grad,
    sequence_inputs,
    sigmoid,
    softplus,
)
from .results import PreferenceLoss

__all__ = [
    "DPOP_FORMS",
    "dpkd_loss",
    "dpkd_loss_grad",
    "ipo_loss",
    "ipo_loss_grad",
    "cpo_loss",
    "cpo_loss_grad",
    "simpo_loss",
    "simpo_loss_grad",
    "dpop_loss",
    "dpop_loss_grad",
    "hinge_loss",
    "hinge_loss_grad",
    "robust_loss",
    "robust_loss_grad",
]

#: DPOP's two forms: the Smaug paper's (penalty inside σ) and the released DPKD code's (outside).
DPOP_FORMS = ("smaug", "released")

# The options of these losses beyond the shared ones of ``validation`` (their valid ranges, once)
TAU = v.Option("tau", 0.1, low=0.0, draw=(0.1, 2.0))
LENGTH_NORMALIZE = v.Option("length_normalize", True, kind="flag")
NLL_WEIGHT = v.Option("nll_weight", 1.0, low=0.0, low_inclusive=True, draw=(0.0, 2.0))
SIMPO_BETA = replace(v.BETA, default=2.0, draw=(0.5, 4.0))
GAMMA = v.Option("gamma", 1.0, draw=(-2.0, 2.0))
DPOP_FORM = v.Option("form", "smaug", kind="choice", choices=DPOP_FORMS)



# --------------------------------------------------------------------------------------------------
# The shared mechanism


@dataclass(frozen=True)
class _Core:
    """A per-element loss, its per-element partials (∂ℓ_n/∂x_n), the rewards, and the reduction."""

    losses: np.ndarray
    partials: dict[str, np.ndarray]
    chosen_rewards: np.ndarray
    rejected_rewards: np.ndarray
    reduction: str

    def result(self) -> PreferenceLoss:
        return PreferenceLoss(reduce_elements(self.losses, self.reduction), self.chosen_rewards,
                              self.rejected_rewards)

    def grad(self) -> dict[str, np.ndarray]:
        # S = sum(reduced loss): each per-element partial times d(S)/d(ℓ_n) (1/N for "mean", else 1)
        scale = reduce_elements_grad(np.shape(self.losses), self.reduction)
        return {name: p * scale for name, p in self.partials.items()}


def _logistic(z: np.ndarray, label_smoothing: float) -> tuple[np.ndarray, np.ndarray]:
    """ℓ(z) = (1−ε)·softplus(−z) + ε·softplus(z) = −(1−ε) log σ(z) − ε log σ(−z), and dℓ/dz = σ(z) − (1−ε)."""
    eps = label_smoothing
    # dℓ/dz = σ(z) − (1−ε), written as ε − σ(−z): the first form cancels to ~1e-6 relative error at z ≈ 26
    return (1.0 - eps) * softplus(-z) + eps * softplus(z), eps - sigmoid(-z)


def _chain(dl_dh: np.ndarray, margin: Margin) -> dict[str, np.ndarray]:
    return {name: dl_dh * dh for name, dh in margin.dh.items()}


def _eq9_margin(func: str, a: object, b: object, c: object, d: object, chosen_lengths: object,
                rejected_lengths: object, reduction: str, reference_free: bool = False
                ) -> tuple[dict[str, np.ndarray | None], Margin]:
    """The validated arrays and the margin of a loss on h = (a − c) − (b − d) (Eq. 8), or
    (a − c)/L_t − (b − d)/L_s (Eq. 9) with both lengths; ``reference_free``: c = d = 0 (they may be None)."""
    normalize = v.check_lengths_pair(func, chosen_lengths, rejected_lengths)
    x = sequence_inputs(func, {A: a, B: b, C: c, D: d, LT: chosen_lengths, LS: rejected_lengths},
                        optional=(C, D, LT, LS) if reference_free else (LT, LS), lengths=(LT, LS),
                        reduction=reduction)
    return x, Margin.of(x, reference=not reference_free, normalize=normalize)




# --------------------------------------------------------------------------------------------------
# DPKD (Eq. 8 / Eq. 9)


def _dpkd(func, a, b, c, d, chosen_lengths, rejected_lengths, beta, label_smoothing, reference_free,
          reduction) -> _Core:
    o = v.check_options(func, beta=beta, label_smoothing=label_smoothing, reference_free=reference_free,
                        reduction=reduction)
    beta, eps, reference_free, reduction = o["beta"], o["label_smoothing"], o["reference_free"], o["reduction"]
    x, m = _eq9_margin(func, a, b, c, d, chosen_lengths, rejected_lengths, reduction, reference_free)
    losses, dl_dz = _logistic(beta * m.h, eps)
    partials = _chain(beta * dl_dz, m)
    if reference_free:
        # the reference arrays are unused: given ones get an explicit zero gradient
        partials.update({name: np.zeros_like(x[name]) for name in (C, D) if x[name] is not None})
    return _Core(losses, partials, beta * m.chosen, beta * m.rejected, reduction)


@v.options(v.BETA, v.LABEL_SMOOTHING, v.REFERENCE_FREE, v.REDUCTION)
def dpkd_loss(
    policy_chosen_logps: np.ndarray,
    policy_rejected_logps: np.ndarray,
    reference_chosen_logps: np.ndarray | None,
    reference_rejected_logps: np.ndarray | None,
    *,
    chosen_lengths: np.ndarray | None = None,
    rejected_lengths: np.ndarray | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    reduction: str = "mean",
) -> PreferenceLoss:
    """Sequence-level DPKD: the DPO loss with the teacher as the reference model (paper Eq. 8 / Eq. 9).

    Symbols: a, b, c, d the summed log-probs (policy = student q_θ, reference = teacher p, chosen = teacher
    output y_t, rejected = student output y_s); L_t, L_s the two responses' token counts; β the
    temperature; ε the label smoothing (cDPO).

    Formula:
        h = (a − c) − (b − d)                       (Eq. 8, no lengths)
        h = (a − c)/L_t − (b − d)/L_s               (Eq. 9, both lengths given)
        ℓ = (1−ε)·softplus(−βh) + ε·softplus(βh)    (= −log σ(βh) for ε = 0)
    ``reference_free=True`` sets c = d = 0 (Mitchell / TRL option; released code ``--reference-free``).
    ℓ(h = 0) = log 2 for every ε; dℓ/dh = β[σ(βh) − (1−ε)].

    Args:
        policy_chosen_logps: a, float array of any shape [...] (usually [B]).
        policy_rejected_logps: b, same shape.
        reference_chosen_logps: c, same shape (may be None only with ``reference_free=True``).
        reference_rejected_logps: d, same shape (may be None only with ``reference_free=True``).
        chosen_lengths, rejected_lengths: L_t, L_s (int or float, > 0, same shape); both or neither.
        beta: β > 0.  label_smoothing: ε ∈ [0, 0.5].
        reduction: "mean" (default, paper's E), "sum" (Algorithm 1's Σ) or "none".

    Returns:
        ``PreferenceLoss(loss, chosen_rewards, rejected_rewards)``: loss scalar (or [...] under "none");
        rewards β(a − c)[/L_t] and β(b − d)[/L_s], shape [...], never reduced.

    Raises:
        DPKDInputError (in this order): bad ``reduction``/``beta``/``label_smoothing``; one length without
        the other; a required array None; shapes not all equal; a non-numeric dtype; NaN/Inf; a length
        ≤ 0; an empty input under "mean".

    Example (the FD example of the README: h = −7, βh = −4.9, loss = softplus(4.9)):
        >>> import numpy as np
        >>> out = dpkd_loss(np.array([-5.0]), np.array([-3.0]), np.array([-4.0]), np.array([-9.0]), beta=0.7)
        >>> print(np.round(out.loss, 4), out.chosen_rewards, np.round(out.rejected_rewards, 4))
        4.9074 [-0.7] [4.2]
        >>> print(np.round(dpkd_loss(np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(3)).loss, 4))
        0.6931

    References: Li et al. 2024 (arXiv:2406.19774) Eq. 8, Eq. 9; Rafailov et al. 2023 Eq. 7;
    spec/README.md §2 (sequence-level DPKD).
    See also: ``dpkd_loss_grad``, ``ipo_loss``, ``dpop_loss``, ``dpkd_token_loss`` (released-code form),
    ``implicit_reward``.
    """
    return _dpkd("dpkd_loss", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                 reference_rejected_logps, chosen_lengths, rejected_lengths, beta, label_smoothing,
                 reference_free, reduction).result()


def dpkd_loss_grad(
    policy_chosen_logps: np.ndarray,
    policy_rejected_logps: np.ndarray,
    reference_chosen_logps: np.ndarray | None,
    reference_rejected_logps: np.ndarray | None,
    *,
    chosen_lengths: np.ndarray | None = None,
    rejected_lengths: np.ndarray | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    reduction: str = "mean",
) -> dict[str, np.ndarray]:
    """Analytic gradient of S = sum(dpkd_loss(...).loss) w.r.t. a, b, c, d.

    Formula (spec/README.md §2), g = dℓ/dh = β[σ(βh) − (1−ε)]  (= −β σ(−βh) for ε = 0):
        ∂ℓ/∂a = g/L_t,  ∂ℓ/∂b = −g/L_s,  ∂ℓ/∂c = −g/L_t,  ∂ℓ/∂d = g/L_s,
    times 1/N under "mean". The weight is σ(−βh) — large when the student's implicit reward of its own
    output beats that of the teacher's output — NOT the σ(βh) printed in paper Eq. 11/28/30.
    ``reference_free``: c, d get zero entries when given, no entry when None.

    Returns:
        dict with keys "policy_chosen_logps", "policy_rejected_logps" and (when given)
        "reference_chosen_logps", "reference_rejected_logps"; float64, each the shape of the inputs.

    Example (finite differences give ∂L/∂a = −0.6948; the printed Eq. 11 would give −0.0052):
        >>> import numpy as np
        >>> a, b, c, d = np.array([-5.0]), np.array([-3.0]), np.array([-4.0]), np.array([-9.0])
        >>> g = dpkd_loss_grad(a, b, c, d, beta=0.7)
        >>> print(np.round(g["policy_chosen_logps"], 4), np.round(g["reference_rejected_logps"], 4))
        [-0.6948] [-0.6948]

    Args/Raises: exactly as ``dpkd_loss`` (same validation, same messages).
    References: spec/README.md §2; paper Eq. 10/11 (corrected, D12).
    See also: ``dpkd_loss``.
    """
    return _dpkd("dpkd_loss_grad", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                 reference_rejected_logps, chosen_lengths, rejected_lengths, beta, label_smoothing,
                 reference_free, reduction).grad()


# --------------------------------------------------------------------------------------------------
# IPO (Table 2; Azar et al. 2024 Eq. 17)


def _ipo(func, a, b, c, d, tau, chosen_lengths, rejected_lengths, length_normalize, reduction) -> _Core:
    o = v.check_options(func, tau=tau, length_normalize=length_normalize, reduction=reduction)
    tau, length_normalize, reduction = o["tau"], o["length_normalize"], o["reduction"]
    v.check_length_normalize(func, length_normalize, chosen_lengths, rejected_lengths)
    x = sequence_inputs(func, {A: a, B: b, C: c, D: d, LT: chosen_lengths, LS: rejected_lengths},
                        optional=(LT, LS), lengths=(LT, LS), reduction=reduction)
    m = Margin.of(x, normalize=bool(length_normalize))
    gap = m.h - 1.0 / (2.0 * tau)
    return _Core(gap**2, _chain(2.0 * gap, m), tau * m.chosen, tau * m.rejected, reduction)


@v.options(TAU, LENGTH_NORMALIZE, v.REDUCTION)
def ipo_loss(
    policy_chosen_logps: np.ndarray,
    policy_rejected_logps: np.ndarray,
    reference_chosen_logps: np.ndarray,
    reference_rejected_logps: np.ndarray,
    *,
    tau: float = 0.1,
    chosen_lengths: np.ndarray | None = None,
    rejected_lengths: np.ndarray | None = None,
    length_normalize: bool = True,
    reduction: str = "mean",
) -> PreferenceLoss:
    """IPO with the teacher as reference: a squared loss pulling the margin to 1/(2τ).

    Symbols: a, b, c, d, L_t, L_s as in ``dpkd_loss``; τ the IPO regulariser.

    Formula (paper Table 2; Azar et al. 2024 Eq. 17):
        h = (a − c)/L_t − (b − d)/L_s     (length_normalize=True, TRL's length-averaged log-probs)
        h = (a − c) − (b − d)             (length_normalize=False, the paper's/released code's summed form)
        ℓ = (h − 1/(2τ))²
    The minimum ℓ = 0 is at h = 1/(2τ); at h = 0, ℓ = 1/(4τ²) (25 for τ = 0.1).

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps:
            a, b, c, d, float arrays of one shape [...].
        tau: τ > 0.
        chosen_lengths, rejected_lengths: required (> 0) when ``length_normalize=True``; must be None
            when it is False.
        length_normalize: choose the margin (explicit; no silent default from the presence of lengths).
        reduction: "mean" | "sum" | "none".

    Returns:
        ``PreferenceLoss``; rewards τ(a − c)[/L_t], τ(b − d)[/L_s].

    Example:
        >>> import numpy as np
        >>> z = np.zeros(2)
        >>> print(ipo_loss(z, z, z, z, length_normalize=False).loss)
        25.0
        >>> out = ipo_loss(np.array([-6.0]), np.array([-9.0]), np.array([-8.0]), np.array([-8.0]), tau=0.25,
        ...                chosen_lengths=np.array([2]), rejected_lengths=np.array([4]))
        >>> print(np.round(out.loss, 4))   # h = 1 + 0.25 = 1.25, target 2
        0.5625

    References: Azar et al. 2024 (arXiv:2310.12036) Eq. 17; spec/README.md §3 (Table 2), §10 (D8).
    See also: ``ipo_loss_grad``, ``dpkd_loss``, ``dpkd_token_loss`` (form="ipo").
    """
    return _ipo("ipo_loss", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                reference_rejected_logps, tau, chosen_lengths, rejected_lengths, length_normalize,
                reduction).result()


def ipo_loss_grad(
    policy_chosen_logps: np.ndarray,
    policy_rejected_logps: np.ndarray,
    reference_chosen_logps: np.ndarray,
    reference_rejected_logps: np.ndarray,
    *,
    tau: float = 0.1,
    chosen_lengths: np.ndarray | None = None,
    rejected_lengths: np.ndarray | None = None,
    length_normalize: bool = True,
    reduction: str = "mean",
) -> dict[str, np.ndarray]:
    """Analytic gradient of S = sum(ipo_loss(...).loss) w.r.t. a, b, c, d.

    Formula: g = 2(h − 1/(2τ));  (∂a, ∂b, ∂c, ∂d) = (g/L_t, −g/L_s, −g/L_t, g/L_s)  (L = 1 when summed),
    times 1/N under "mean".

    Example:
        >>> import numpy as np
        >>> z = np.zeros(1)
        >>> g = ipo_loss_grad(z, z, z, z, length_normalize=False)
        >>> print(g["policy_chosen_logps"], g["policy_rejected_logps"])
        [-10.] [10.]

    Args/Raises: exactly as ``ipo_loss`` (same validation, same messages).
    References: spec/README.md §3 (gradients).
    See also: ``ipo_loss``.
    """
    return _ipo("ipo_loss_grad", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                reference_rejected_logps, tau, chosen_lengths, rejected_lengths, length_normalize,
                reduction).grad()


# --------------------------------------------------------------------------------------------------
# CPO (Table 2, with the typo corrected; Xu et al. 2024)


def _cpo(func, a, b, beta, nll_weight, chosen_lengths, label_smoothing, reduction) -> _Core:
    o = v.check_options(func, beta=beta, nll_weight=nll_weight, label_smoothing=label_smoothing, reduction=reduction)
    beta, w, eps, reduction = o["beta"], o["nll_weight"], o["label_smoothing"], o["reduction"]
    x = sequence_inputs(func, {A: a, B: b, LT: chosen_lengths}, optional=(LT,), lengths=(LT,), reduction=reduction)
    m = Margin.of(x, reference=False)  # h = a − b: no reference, no length inside σ
    pref, dl_dz = _logistic(beta * m.h, eps)
    lt = x[LT] if x[LT] is not None else np.ones_like(x[A])
    partials = _chain(beta * dl_dz, m)
    partials[A] = partials[A] - w / lt  # the NLL term −w·a/L_t
    return _Core(pref - w * x[A] / lt, partials, beta * x[A], beta * x[B], reduction)


@v.options(v.BETA, NLL_WEIGHT, v.LABEL_SMOOTHING, v.REDUCTION)
def cpo_loss(
    policy_chosen_logps: np.ndarray,
    policy_rejected_logps: np.ndarray,
    *,
    beta: float = 0.1,
    nll_weight: float = 1.0,
    chosen_lengths: np.ndarray | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> PreferenceLoss:
    """CPO: a reference-free preference term plus an NLL term on the teacher's output.

    Symbols: a = log q_θ(y_t|x), b = log q_θ(y_s|x); β; w the NLL weight; ε label smoothing; L_t.

    Formula (paper Table 2 with its typo corrected — the printed denominator q_θ(y_t|x) is q_θ(y_s|x);
    Xu et al. 2024):
        z = β(a − b)
        ℓ = (1−ε)·softplus(−z) + ε·softplus(z) + w·(−a/L_t)    (−a when ``chosen_lengths`` is None)
    With the printed typo the preference term would be the constant log 2.

    Args:
        policy_chosen_logps: a, float array [...].
        policy_rejected_logps: b, same shape.
        beta: β > 0.  nll_weight: w ≥ 0 (TRL ``cpo_alpha``, default 1).  label_smoothing: ε ∈ [0, 0.5].
        chosen_lengths: L_t > 0 (same shape): each sequence's NLL becomes its per-token mean −a_i/L_i, so
            under "mean" the NLL term is mean_i(−a_i/L_i). TRL's ``CPOTrainer`` and Liger-Kernel take instead
            the token mean over the whole batch, Σ_i(−a_i)/Σ_i L_i (``nn.CrossEntropyLoss`` over every chosen
            token); that is exactly ``chosen_lengths=None, nll_weight=w·B/Σ_i L_i, reduction="mean"``
            (B pairs). The two agree when every L_i is equal. None: the summed −a_i.
        reduction: "mean" | "sum" | "none".

    Returns:
        ``PreferenceLoss``; rewards βa, βb.

    Example:
        >>> import numpy as np
        >>> out = cpo_loss(np.array([-2.0]), np.array([-2.0]), chosen_lengths=np.array([4]))
        >>> print(np.round(out.loss, 4))   # log 2 + 2/4
        1.1931

    References: Xu et al. 2024 (arXiv:2401.08417) Eq. 3–6; spec/README.md §3, §10 (D7, D13).
    See also: ``cpo_loss_grad``, ``simpo_loss``, ``dpkd_loss`` (reference_free=True).
    """
    return _cpo("cpo_loss", policy_chosen_logps, policy_rejected_logps, beta, nll_weight, chosen_lengths,
                label_smoothing, reduction).result()


def cpo_loss_grad(
    policy_chosen_logps: np.ndarray,
    policy_rejected_logps: np.ndarray,
    *,
    beta: float = 0.1,
    nll_weight: float = 1.0,
    chosen_lengths: np.ndarray | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> dict[str, np.ndarray]:
    """Analytic gradient of S = sum(cpo_loss(...).loss) w.r.t. a and b.

    Formula: g = β[σ(β(a − b)) − (1−ε)];  ∂ℓ/∂a = g − w/L_t,  ∂ℓ/∂b = −g  (times 1/N under "mean").

    Example:
        >>> import numpy as np
        >>> g = cpo_loss_grad(np.array([-2.0]), np.array([-2.0]), beta=1.0, nll_weight=0.5)
        >>> print(g["policy_chosen_logps"], g["policy_rejected_logps"])
        [-1.] [0.5]

    Args/Raises: exactly as ``cpo_loss`` (same validation, same messages).
    References: spec/README.md §3 (gradients).
    See also: ``cpo_loss``.
    """
    return _cpo("cpo_loss_grad", policy_chosen_logps, policy_rejected_logps, beta, nll_weight,
                chosen_lengths, label_smoothing, reduction).grad()


# --------------------------------------------------------------------------------------------------
# SimPO (Table 2; Meng et al. 2024)


def _simpo(func, a, b, chosen_lengths, rejected_lengths, beta, gamma, label_smoothing, reduction) -> _Core:
    o = v.check_options(func, beta=beta, gamma=gamma, label_smoothing=label_smoothing, reduction=reduction)
    beta, gamma, eps, reduction = o["beta"], o["gamma"], o["label_smoothing"], o["reduction"]
    x = sequence_inputs(func, {A: a, B: b, LT: chosen_lengths, LS: rejected_lengths}, lengths=(LT, LS),
                        reduction=reduction)
    m = Margin.of(x, reference=False, normalize=True)  # h = a/L_t − b/L_s
    losses, dl_dz = _logistic(beta * m.h - gamma, eps)
    return _Core(losses, _chain(beta * dl_dz, m), beta * m.chosen, beta * m.rejected, reduction)


@v.options(SIMPO_BETA, GAMMA, v.LABEL_SMOOTHING, v.REDUCTION)
def simpo_loss(
    policy_chosen_logps: np.ndarray,
    policy_rejected_logps: np.ndarray,
    *,
    chosen_lengths: np.ndarray,
    rejected_lengths: np.ndarray,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> PreferenceLoss:
    """SimPO: reference-free, length-normalised, with a target margin γ inside σ.

    Symbols: a, b the student's summed log-probs of y_t, y_s; L_t, L_s their lengths; β; γ; ε.

    Formula (paper Table 2; Meng et al. 2024 Eq. 6):
        z = β·a/L_t − β·b/L_s − γ
        ℓ = (1−ε)·softplus(−z) + ε·softplus(z)
    (The released code's ``--simpo`` is different: reference-based, no γ, rescaled outside σ — §7 D6.)

    Args:
        policy_chosen_logps: a, float array [...].  policy_rejected_logps: b, same shape.
        chosen_lengths, rejected_lengths: L_t, L_s, required (> 0, same shape).
        beta: β > 0 (default 2.0, Meng et al.).  gamma: γ, any finite real (default 1.0).
        label_smoothing: ε ∈ [0, 0.5].  reduction: "mean" | "sum" | "none".

    Returns:
        ``PreferenceLoss``; rewards βa/L_t, βb/L_s.

    Example:
        >>> import numpy as np
        >>> out = simpo_loss(np.array([-2.0]), np.array([-6.0]), chosen_lengths=np.array([2]),
        ...                  rejected_lengths=np.array([3]), gamma=2.0)
        >>> print(np.round(out.loss, 4))   # z = 2·(−1) − 2·(−2) − 2 = 0
        0.6931

    References: Meng et al. 2024 (arXiv:2405.14734) Eq. 6; spec/README.md §3, §10 (D6).
    See also: ``simpo_loss_grad``, ``cpo_loss``.
    """
    return _simpo("simpo_loss", policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths,
                  beta, gamma, label_smoothing, reduction).result()


def simpo_loss_grad(
    policy_chosen_logps: np.ndarray,
    policy_rejected_logps: np.ndarray,
    *,
    chosen_lengths: np.ndarray,
    rejected_lengths: np.ndarray,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> dict[str, np.ndarray]:
    """Analytic gradient of S = sum(simpo_loss(...).loss) w.r.t. a and b.

    Formula: g = σ(z) − (1−ε);  ∂ℓ/∂a = gβ/L_t,  ∂ℓ/∂b = −gβ/L_s  (times 1/N under "mean").

    Example:
        >>> import numpy as np
        >>> g = simpo_loss_grad(np.array([-2.0]), np.array([-6.0]), chosen_lengths=np.array([2]),
        ...                     rejected_lengths=np.array([3]), gamma=2.0)
        >>> print(np.round(g["policy_chosen_logps"], 4), np.round(g["policy_rejected_logps"], 4))
        [-0.5] [0.3333]

    Args/Raises: exactly as ``simpo_loss`` (same validation, same messages).
    References: spec/README.md §3 (gradients).
    See also: ``simpo_loss``.
    """
    return _simpo("simpo_loss_grad", policy_chosen_logps, policy_rejected_logps, chosen_lengths,
                  rejected_lengths, beta, gamma, label_smoothing, reduction).grad()


# --------------------------------------------------------------------------------------------------
# DPOP (Smaug, Pal et al. 2024; and the released code's --DPOP)

def _dpop(func, a, b, c, d, beta, lambda_, form, reduction) -> _Core:
    o = v.check_options(func, beta=beta, lambda_=lambda_, form=form, reduction=reduction)
    beta, lam, form, reduction = o["beta"], o["lambda_"], o["form"], o["reduction"]
    x = sequence_inputs(func, {A: a, B: b, C: c, D: d}, reduction=reduction)
    m = Margin.of(x)  # summed margin (Eq. 8)
    penalty = np.maximum(0.0, x[C] - x[A])  # P = max(0, c − a): the chosen log-ratio fell below 0
    k = (x[C] > x[A]).astype(np.float64)  # dP/dc = k, dP/da = −k (strict: no subgradient at c = a)
    if form == "smaug":
        # ℓ = softplus(−β(h − λP)): the penalty inside σ, scaled by β (Pal et al. Eq. 3)
        losses, dl_dz = _logistic(beta * (m.h - lam * penalty), 0.0)
        partials = _chain(beta * dl_dz, m)
        partials[A] = partials[A] + beta * dl_dz * lam * k
        partials[C] = partials[C] - beta * dl_dz * lam * k
    else:
        # ℓ = softplus(−βh) + λP: the penalty outside σ, not scaled by β (LMOps get_distil_loss)
        pref, dl_dz = _logistic(beta * m.h, 0.0)
        losses = pref + lam * penalty
        partials = _chain(beta * dl_dz, m)
        partials[A] = partials[A] - lam * k
        partials[C] = partials[C] + lam * k
    return _Core(losses, partials, beta * m.chosen, beta * m.rejected, reduction)


@v.options(v.BETA, v.LAMBDA, DPOP_FORM, v.REDUCTION)
def dpop_loss(
    policy_chosen_logps: np.ndarray,
    policy_rejected_logps: np.ndarray,
    reference_chosen_logps: np.ndarray,
    reference_rejected_logps: np.ndarray,
    *,
    beta: float = 0.1,
    lambda_: float = 50.0,
    form: str = "smaug",
    reduction: str = "mean",
) -> PreferenceLoss:
    """DPO-Positive: DPKD plus a penalty when the student's log-prob of the teacher output falls below the
    teacher's.

    Symbols: a, b, c, d as in ``dpkd_loss``; h = (a − c) − (b − d) (summed, Eq. 8); P = max(0, c − a); λ.

    Formula:
        form="smaug"    (Pal et al. 2024 Eq. 3):   ℓ = softplus(−β(h − λP))
        form="released" (LMOps ``--DPOP``):        ℓ = softplus(−βh) + λP
    The gradient uses k = 1[c > a] (strict), so exactly at c = a the penalty contributes nothing.

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps:
            a, b, c, d, float arrays of one shape [...].
        beta: β > 0.  lambda_: λ ≥ 0 (default 50, the released code's).  form: "smaug" | "released".
        reduction: "mean" | "sum" | "none".

    Returns:
        ``PreferenceLoss``; rewards β(a − c), β(b − d) (without the penalty).

    Example (a − c = −2, so P = 2, h = −2 − 0 = −2):
        >>> import numpy as np
        >>> a, b, c, d = np.array([-5.0]), np.array([-4.0]), np.array([-3.0]), np.array([-4.0])
        >>> print(np.round(dpop_loss(a, b, c, d, beta=0.5, lambda_=1.0, form="released").loss, 4))
        3.3133
        >>> print(np.round(dpop_loss(a, b, c, d, beta=0.5, lambda_=1.0).loss, 4))   # softplus(2)
        2.1269

    References: Pal et al. 2024 (arXiv:2402.13228) Eq. 3; spec/README.md §3, §10 (D9).
    See also: ``dpop_loss_grad``, ``dpkd_loss``, ``dpkd_token_loss`` (form="dpop", the released form).
    """
    return _dpop("dpop_loss", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                 reference_rejected_logps, beta, lambda_, form, reduction).result()


def dpop_loss_grad(
    policy_chosen_logps: np.ndarray,
    policy_rejected_logps: np.ndarray,
    reference_chosen_logps: np.ndarray,
    reference_rejected_logps: np.ndarray,
    *,
    beta: float = 0.1,
    lambda_: float = 50.0,
    form: str = "smaug",
    reduction: str = "mean",
) -> dict[str, np.ndarray]:
    """Analytic gradient of S = sum(dpop_loss(...).loss) w.r.t. a, b, c, d.

    Formula, k = 1[c > a]:
        smaug:    H = h − λP, g = β(σ(βH) − 1);   (∂a, ∂b, ∂c, ∂d) = g·(1 + λk, −1, −1 − λk, 1)
        released: g = β(σ(βh) − 1);               (∂a, ∂b, ∂c, ∂d) = (g − λk, −g, −g + λk, g)
    times 1/N under "mean".

    Example:
        >>> import numpy as np
        >>> a, b, c, d = np.array([-5.0]), np.array([-4.0]), np.array([-3.0]), np.array([-4.0])
        >>> g = dpop_loss_grad(a, b, c, d, beta=0.5, lambda_=1.0, form="released")
        >>> print(np.round(g["policy_chosen_logps"], 4), np.round(g["reference_chosen_logps"], 4))
        [-1.3655] [1.3655]

    Args/Raises: exactly as ``dpop_loss`` (same validation, same messages).
    References: spec/README.md §3 (gradients).
    See also: ``dpop_loss``.
    """
    return _dpop("dpop_loss_grad", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                 reference_rejected_logps, beta, lambda_, form, reduction).grad()


# --------------------------------------------------------------------------------------------------
# Hinge (SLiC-HF, Zhao et al. 2023; TRL loss_type="hinge")


def _hinge(func, a, b, c, d, chosen_lengths, rejected_lengths, beta, reduction) -> _Core:
    o = v.check_options(func, beta=beta, reduction=reduction)
    beta, reduction = o["beta"], o["reduction"]
    _, m = _eq9_margin(func, a, b, c, d, chosen_lengths, rejected_lengths, reduction)
    gap = 1.0 - beta * m.h
    active = (gap > 0).astype(np.float64)  # dℓ/dh = −β·1[βh < 1] (strict: no subgradient at the kink)
    return _Core(np.maximum(gap, 0.0), _chain(-beta * active, m), beta * m.chosen, beta * m.rejected, reduction)


@v.options(v.BETA, v.REDUCTION)
def hinge_loss(
    policy_chosen_logps: np.ndarray,
    policy_rejected_logps: np.ndarray,
    reference_chosen_logps: np.ndarray,
    reference_rejected_logps: np.ndarray,
    *,
    chosen_lengths: np.ndarray | None = None,
    rejected_lengths: np.ndarray | None = None,
    beta: float = 0.1,
    reduction: str = "mean",
) -> PreferenceLoss:
    """The hinge preference loss (SLiC-HF) with the teacher as reference: a margin of 1/β, then no gradient.

    Symbols: a, b, c, d, L_t, L_s as in ``dpkd_loss``; β the temperature (1/β is the target margin).

    Formula:
        h = (a − c) − (b − d)                   (Eq. 8, no lengths)
        h = (a − c)/L_t − (b − d)/L_s           (Eq. 9, both lengths given)
        ℓ = max(0, 1 − βh)
    Zero loss and zero gradient once βh ≥ 1; dℓ/dh = −β below (strict: 0 at βh = 1). Without lengths this
    is TRL's ``loss_type="hinge"`` (``relu(1 − β·logits)``) with ref_model = teacher, chosen = teacher
    output, rejected = student output.

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps:
            a, b, c, d, float arrays of one shape [...].
        chosen_lengths, rejected_lengths: L_t, L_s (> 0), both or neither.
        beta: β > 0.  reduction: "mean" | "sum" | "none".

    Returns:
        ``PreferenceLoss(loss, chosen_rewards, rejected_rewards)``; rewards β(a − c)[/L_t], β(b − d)[/L_s].

    Raises:
        DPKDInputError, in the order of ``dpkd_loss``.

    Example:
        >>> import numpy as np
        >>> a, b, c, d = np.array([-5.0]), np.array([-3.0]), np.array([-4.0]), np.array([-9.0])
        >>> print(np.round(hinge_loss(a, b, c, d, beta=0.5).loss, 4))   # h = −7: max(0, 1 + 3.5)
        4.5
        >>> print(hinge_loss(a, b - 20.0, c, d, beta=0.5).loss)   # h = 13: βh ≥ 1, no loss
        0.0

    References: Zhao et al. 2023, SLiC-HF (arXiv:2305.10425) Eq. 1; TRL ``DPOTrainer`` loss_type "hinge".
    See also: ``hinge_loss_grad``, ``dpkd_loss``, ``ipo_loss``.
    """
    return _hinge("hinge_loss", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                  reference_rejected_logps, chosen_lengths, rejected_lengths, beta, reduction).result()


def hinge_loss_grad(
    policy_chosen_logps: np.ndarray,
    policy_rejected_logps: np.ndarray,
    reference_chosen_logps: np.ndarray,
    reference_rejected_logps: np.ndarray,
    *,
    chosen_lengths: np.ndarray | None = None,
    rejected_lengths: np.ndarray | None = None,
    beta: float = 0.1,
    reduction: str = "mean",
) -> dict[str, np.ndarray]:
    """Analytic gradient of S = sum(hinge_loss(...).loss) w.r.t. a, b, c, d.

    Formula: g = dℓ/dh = −β·1[βh < 1]; (∂a, ∂b, ∂c, ∂d) = (g/L_t, −g/L_s, −g/L_t, g/L_s) (L = 1 without
    lengths), times 1/N under "mean".

    Example:
        >>> import numpy as np
        >>> z = np.zeros(1)
        >>> print(hinge_loss_grad(z, z, z, z, beta=0.5)["policy_chosen_logps"])
        [-0.5]

    Args/Raises: exactly as ``hinge_loss``.
    See also: ``hinge_loss``.
    """
    return _hinge("hinge_loss_grad", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                  reference_rejected_logps, chosen_lengths, rejected_lengths, beta, reduction).grad()


# --------------------------------------------------------------------------------------------------
# Robust DPO (Chowdhury et al. 2024; TRL loss_type="robust")

# ε < 1/2: the loss divides by 1 − 2ε
ROBUST_LABEL_SMOOTHING = replace(v.LABEL_SMOOTHING, high_inclusive=False, draw=(0.05, 0.4))


def _robust(func, a, b, c, d, chosen_lengths, rejected_lengths, beta, label_smoothing, reduction) -> _Core:
    o = v.check_options(func, beta=beta, label_smoothing=label_smoothing, reduction=reduction)
    beta, eps, reduction = o["beta"], o["label_smoothing"], o["reduction"]
    _, m = _eq9_margin(func, a, b, c, d, chosen_lengths, rejected_lengths, reduction)
    z = beta * m.h
    losses = ((1.0 - eps) * softplus(-z) - eps * softplus(z)) / (1.0 - 2.0 * eps)
    # dℓ/dz = σ(z) − (1−ε)/(1−2ε), written as −σ(−z) − ε/(1−2ε): no cancellation when z is large
    dl_dz = -sigmoid(-z) - eps / (1.0 - 2.0 * eps)
    return _Core(losses, _chain(beta * dl_dz, m), beta * m.chosen, beta * m.rejected, reduction)


@v.options(v.BETA, ROBUST_LABEL_SMOOTHING, v.REDUCTION)
def robust_loss(
    policy_chosen_logps: np.ndarray,
    policy_rejected_logps: np.ndarray,
    reference_chosen_logps: np.ndarray,
    reference_rejected_logps: np.ndarray,
    *,
    chosen_lengths: np.ndarray | None = None,
    rejected_lengths: np.ndarray | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> PreferenceLoss:
    """Robust DPO with the teacher as reference: the DPO loss de-biased for preferences flipped with rate ε.

    Symbols: a, b, c, d, L_t, L_s as in ``dpkd_loss``; β the temperature; ε the flip rate.

    Formula (Chowdhury et al. 2024 Eq. 10, z = βh, h as in ``dpkd_loss``: Eq. 8, or Eq. 9 with lengths):
        ℓ = [(1 − ε)·(−log σ(z)) + ε·log σ(−z)] / (1 − 2ε)
          = [(1 − ε)·softplus(−z) − ε·softplus(z)] / (1 − 2ε)
    Unbiased: (1 − ε)·ℓ(h) + ε·ℓ(−h) = softplus(−βh), the clean DPKD loss; ε = 0 is ``dpkd_loss`` exactly;
    ℓ(h = 0) = log 2 for every ε. Unlike cDPO smoothing (``dpkd_loss(label_smoothing=ε)``, the convex
    combination with the flipped term) ℓ is not bounded below: it decreases without limit as h → +∞ when
    ε > 0. TRL's ``loss_type="robust"`` (without lengths).

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps:
            a, b, c, d, float arrays of one shape [...].
        chosen_lengths, rejected_lengths: L_t, L_s (> 0), both or neither.
        beta: β > 0.  label_smoothing: ε ∈ [0, 0.5).  reduction: "mean" | "sum" | "none".

    Returns:
        ``PreferenceLoss(loss, chosen_rewards, rejected_rewards)``; rewards β(a − c)[/L_t], β(b − d)[/L_s].

    Raises:
        DPKDInputError, in the order of ``dpkd_loss``.

    Example:
        >>> import numpy as np
        >>> z = np.zeros(1)
        >>> print(np.round(robust_loss(z, z, z, z, label_smoothing=0.3).loss, 4))   # h = 0: log 2
        0.6931

    References: Chowdhury, Kini, Natarajan 2024, Provably Robust DPO (arXiv:2403.00409) Eq. 10; TRL
    ``DPOTrainer`` loss_type "robust".
    See also: ``robust_loss_grad``, ``dpkd_loss`` (cDPO smoothing), ``hinge_loss``.
    """
    return _robust("robust_loss", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                   reference_rejected_logps, chosen_lengths, rejected_lengths, beta, label_smoothing,
                   reduction).result()


def robust_loss_grad(
    policy_chosen_logps: np.ndarray,
    policy_rejected_logps: np.ndarray,
    reference_chosen_logps: np.ndarray,
    reference_rejected_logps: np.ndarray,
    *,
    chosen_lengths: np.ndarray | None = None,
    rejected_lengths: np.ndarray | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> dict[str, np.ndarray]:
    """Analytic gradient of S = sum(robust_loss(...).loss) w.r.t. a, b, c, d.

    Formula: g = dℓ/dh = β[σ(βh) − (1−ε)/(1−2ε)]; (∂a, ∂b, ∂c, ∂d) = (g/L_t, −g/L_s, −g/L_t, g/L_s),
    times 1/N under "mean".

    Example:
        >>> import numpy as np
        >>> z = np.zeros(1)
        >>> print(np.round(robust_loss_grad(z, z, z, z, beta=1.0, label_smoothing=0.25)["policy_chosen_logps"], 4))
        [-1.]

    Args/Raises: exactly as ``robust_loss``.
    See also: ``robust_loss``.
    """
    return _robust("robust_loss_grad", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                   reference_rejected_logps, chosen_lengths, rejected_lengths, beta, label_smoothing,
                   reduction).grad()
