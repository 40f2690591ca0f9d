"""Token-level DPKD, the released code's argmax-preference loss (spec/README.md §4; CONVENTIONS.md).

Symbols (spec/README.md §0, §4). At each position i of a ``[..., T, V]`` logits array:

* S_i, T_i ∈ R^V — student and teacher logits; Q_i = log_softmax(S_i), P_i = log_softmax(T_i) (float64);
* y^t_i = argmax_v P_i (the teacher's greedy token: "chosen"), y^s_i = argmax_v Q_i (the student's:
  "rejected"); ties go to the lowest index; argmax is piecewise constant, so no gradient flows through it;
* a_i = Q_i[y^t_i], b_i = Q_i[y^s_i], c_i = P_i[y^t_i], d_i = P_i[y^s_i] (policy = student, reference =
  teacher, as in DPO trainers);
* h_i = (a_i − b_i) − (c_i − d_i) (``reference_free``: h_i = a_i − b_i); the softmax normalisers cancel,
  so h_i = (S_i[y^t] − S_i[y^s]) − (T_i[y^t] − T_i[y^s]);
* β > 0, ε = label smoothing, λ = the DPOP weight; m_i ∈ {0, 1} the loss mask.

Because y^t maximises P and y^s maximises Q, h_i ≤ 0 everywhere, with equality exactly where the argmaxes
agree (spec/README.md §4 (structural facts)): the loss is an argmax-matching margin loss, minimal (log 2 for "sigmoid",
1/(4β²) for "ipo") and with zero gradient wherever the student's greedy token already equals the teacher's.

It uses the same mechanism as the distillation baselines (``dpkd.spec.distill``): both log-softmaxes from
``_common.token_inputs``, a small per-position piece, and the masked reduction ``_common.reduce_tokens``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import numpy as np

from . import validation as v
from ._common import first_argmax, log_softmax, reduce_tokens, reduce_tokens_grad, sigmoid, softplus, token_inputs
from .results import TokenPreferenceLoss

__all__ = ["FORMS", "dpkd_token_loss", "dpkd_token_loss_grad"]

#: The released code's three per-token forms.
FORMS = ("sigmoid", "ipo", "dpop")

# The options beyond the shared ones of ``validation``. cDPO smoothing is only defined for the sigmoid form
# (the LMOps/Mitchell code ignores it elsewhere), hence ``requires``.
FORM = v.Option("form", "sigmoid", kind="choice", choices=FORMS)
TOKEN_LABEL_SMOOTHING = replace(v.LABEL_SMOOTHING, requires=("form", "sigmoid"))


class _Terms(NamedTuple):
    """One call's validated per-position quantities (the symbols of the module docstring)."""

    log_q: np.ndarray  # Q = log_softmax(S)  [..., T, V]
    log_p: np.ndarray  # P = log_softmax(T)  [..., T, V]
    mask: np.ndarray  # m (0/1)              [..., T]
    denominator: float  # the mean's denominator
    y_t: np.ndarray  # argmax P             [..., T]
    y_s: np.ndarray  # argmax Q             [..., T]
    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    d: np.ndarray
    h: np.ndarray
    options: dict  # the checked options


def _terms(func: str, student_logits: object, teacher_logits: object, mask: object, **options: object) -> _Terms:
    """Options (in signature order), then shapes, dtypes and values, then a, b, c, d and h."""
    o = v.check_options(func, **options)
    x = token_inputs(func, student_logits, teacher_logits, mask, normalizer=o["normalizer"], reduction=o["reduction"])
    log_q, log_p = log_softmax(x.student), log_softmax(x.teacher)

    def at(logp: np.ndarray, index: np.ndarray) -> np.ndarray:
        return np.take_along_axis(logp, index[..., None], axis=-1)[..., 0]

    y_t, y_s = first_argmax(log_p), first_argmax(log_q)
    a, b = at(log_q, y_t), at(log_q, y_s)
    c, d = at(log_p, y_t), at(log_p, y_s)
    h = (a - b) if o["reference_free"] else (a - b) - (c - d)
    return _Terms(log_q, log_p, x.mask, x.denominator, y_t, y_s, a, b, c, d, h, o)


def _per_token(t: _Terms) -> np.ndarray:
    beta, eps, lam, form = t.options["beta"], t.options["label_smoothing"], t.options["lambda_"], t.options["form"]
    if form == "ipo":
        return (t.h - 1.0 / (2.0 * beta)) ** 2
    if form == "dpop":
        return softplus(-beta * t.h) + lam * np.maximum(0.0, t.c - t.a)
    return (1.0 - eps) * softplus(-beta * t.h) + eps * softplus(beta * t.h)


def _per_token_derivatives(t: _Terms) -> tuple[np.ndarray, np.ndarray]:
    """(dℓ/dh, dℓ/dc) per position; for DPOP dℓ/da = −dℓ/dc = −λ·1[c > a] (strict, CONVENTIONS.md)."""
    beta, eps, lam, form = t.options["beta"], t.options["label_smoothing"], t.options["lambda_"], t.options["form"]
    h = t.h
    if form == "ipo":
        return 2.0 * (h - 1.0 / (2.0 * beta)), np.zeros_like(h)
    if form == "dpop":
        return -beta * sigmoid(-beta * h), lam * (t.c > t.a).astype(np.float64)
    # σ(βh) − (1−ε) as ε − σ(−βh): no cancellation when βh is large
    return beta * (eps - sigmoid(-beta * h)), np.zeros_like(h)


def _one_hot(index: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(shape)
    np.put_along_axis(out, index[..., None], 1.0, axis=-1)
    return out


@v.options(v.BETA, FORM, TOKEN_LABEL_SMOOTHING, v.REFERENCE_FREE, v.LAMBDA, v.NORMALIZER, v.REDUCTION)
def dpkd_token_loss(
    student_logits: np.ndarray,
    teacher_logits: np.ndarray,
    mask: np.ndarray,
    *,
    beta: float = 0.1,
    form: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    lambda_: float = 50.0,
    normalizer: float | None = None,
    reduction: str = "mean",
) -> TokenPreferenceLoss:
    """Token-level DPKD (LMOps ``get_distil_loss``, flag ``--seqKD-DPO``; spec/README.md §4, §10 (D1)).

    Per position (symbols in the module docstring), in the released code's three forms:

    * ``"sigmoid"`` (DPO / cDPO):  ℓ_i = (1−ε) softplus(−β h_i) + ε softplus(β h_i);
    * ``"ipo"``:                   ℓ_i = (h_i − 1/(2β))²  (β plays IPO's τ, as in the code);
    * ``"dpop"`` (released form):  ℓ_i = softplus(−β h_i) + λ max(0, c_i − a_i).

    Reduction over loss positions: mean = Σ m ℓ / (normalizer or Σ m), sum = Σ m ℓ, none = m ℓ.
    This is the paper's loss applied per position with argmax tokens under teacher forcing, not the
    sequence-level Eq. 8/9 (for those see ``dpkd_loss``). log-softmax is float64 here (the released code
    runs it in bfloat16, spec/README.md §10 (D14)).

    Args:
        student_logits: ``[..., T, V]`` float (the policy, q_θ).
        teacher_logits: ``[..., T, V]`` float (the reference, p); same shape and vocabulary.
        mask: ``[..., T]`` bool or 0/1 — loss positions (``labels != -100`` in the code).
        beta: β > 0.
        form: ``"sigmoid"`` | ``"ipo"`` | ``"dpop"``.
        label_smoothing: ε ∈ [0, 0.5]; only with ``form="sigmoid"``.
        reference_free: drop the teacher's log-ratio from h (h_i = a_i − b_i).
        lambda_: λ ≥ 0, the DPOP penalty weight (used only by ``form="dpop"``).
        normalizer: the mean's denominator (global loss-token count under gradient accumulation); only with
            ``reduction="mean"``; default Σ mask (0 → error on ``mask``).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.

    Returns:
        ``TokenPreferenceLoss(loss, agreement_rate, chosen_rewards, rejected_rewards)``: loss a float64
        scalar (``[..., T]``, 0 off the mask, under ``"none"``); agreement_rate = Σ m·1[y^t = y^s] /
        max(Σ m, 1); chosen_rewards = β(a − c)·m and rejected_rewards = β(b − d)·m, each ``[..., T]``
        (computed with the teacher terms also when ``reference_free``, as the released code does).

    Example:
        >>> import numpy as np
        >>> s = np.array([[0.0, 1.0], [2.0, 0.0]])  # student argmax: 1, then 0
        >>> t = np.array([[1.0, 0.0], [1.0, 0.0]])  # teacher argmax: 0, 0
        >>> out = dpkd_token_loss(s, t, np.array([1, 1]))
        >>> round(float(out.loss), 6)  # (softplus(0.2) + log 2) / 2: h = −2, then h = 0 (agreement)
        0.745643
        >>> float(out.agreement_rate)
        0.5
        >>> out.chosen_rewards.round(6), out.rejected_rewards.round(6)  # β(a − c), β(b − d)
        (array([-0.1     ,  0.018633]), array([0.1     , 0.018633]))

    References: Li et al., "Direct Preference Knowledge Distillation for Large Language Models" (2024),
    arXiv:2406.19774; microsoft/LMOps ``dpkd/main.py`` ``get_distil_loss``; Rafailov et al. 2023 (DPO);
    Azar et al. 2023 (IPO); Pal et al. 2024 (DPOP / Smaug).

    See also: ``dpkd_token_loss_grad``, ``dpkd_loss`` (sequence level), ``forward_kl``, ``cross_entropy``.
    """
    t = _terms("dpkd_token_loss", student_logits, teacher_logits, mask, beta=beta, form=form,
               label_smoothing=label_smoothing, reference_free=reference_free, lambda_=lambda_, normalizer=normalizer,
               reduction=reduction)
    m, beta = t.mask, t.options["beta"]
    loss = reduce_tokens(_per_token(t), m, reduction, t.denominator)
    agreement_rate = np.sum(m * (t.y_t == t.y_s)) / max(float(np.sum(m)), 1.0)
    return TokenPreferenceLoss(loss, agreement_rate, beta * (t.a - t.c) * m, beta * (t.b - t.d) * m)


def dpkd_token_loss_grad(
    student_logits: np.ndarray,
    teacher_logits: np.ndarray,
    mask: np.ndarray,
    *,
    beta: float = 0.1,
    form: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    lambda_: float = 50.0,
    normalizer: float | None = None,
    reduction: str = "mean",
) -> dict[str, np.ndarray]:
    """Gradients of S = sum(dpkd_token_loss(...).loss), the argmaxes held constant (spec/README.md §4 (gradient)).

    With w_i = ∂S/∂ℓ_i (m_i/denominator, or m_i), g_i = dℓ_i/dh_i, e_v the one-hot vector of v, and
    q_i = softmax(S_i), p_i = softmax(T_i):

        ∂S/∂S_i = w_i [ g_i (e_{y^t} − e_{y^s}) − λ k_i (e_{y^t} − q_i) ],
        ∂S/∂T_i = w_i [ −g_i (e_{y^t} − e_{y^s}) + λ k_i (e_{y^t} − p_i) ],

    g = β[σ(βh) − (1−ε)] (sigmoid), 2(h − 1/(2β)) (ipo), −β σ(−βh) (dpop); k_i = 1[c_i > a_i] for "dpop",
    else 0. With ``reference_free`` the teacher's −g(e_{y^t} − e_{y^s}) term is absent. Where y^t = y^s
    only the DPOP term can be non-zero. (The released code computes the teacher under no_grad; the spec
    gives the teacher's mathematical gradient and leaves detaching to the caller, CONVENTIONS.md.)

    Returns ``{"student_logits": [..., T, V], "teacher_logits": [..., T, V]}`` (float64). Same arguments
    and errors as ``dpkd_token_loss``. Not differentiable where an argmax is tied (the gradient given is
    that of the lowest-index choice).

    Example:
        >>> import numpy as np
        >>> s = np.array([[0.0, 1.0], [2.0, 0.0]])
        >>> t = np.array([[1.0, 0.0], [1.0, 0.0]])
        >>> g = dpkd_token_loss_grad(s, t, np.array([1, 1]))
        >>> g["student_logits"].round(6) + 0.0  # (1/2)(−β σ(0.2))(e_0 − e_1); zero where they agree
        array([[-0.027492,  0.027492],
               [ 0.      ,  0.      ]])
        >>> bool(np.all(g["teacher_logits"] == -g["student_logits"]))
        True

    See also: ``dpkd_token_loss``, ``dpkd_loss_grad``.
    """
    t = _terms("dpkd_token_loss", student_logits, teacher_logits, mask, beta=beta, form=form,
               label_smoothing=label_smoothing, reference_free=reference_free, lambda_=lambda_, normalizer=normalizer,
               reduction=reduction)
    dl_dh, dl_dc = _per_token_derivatives(t)
    w = reduce_tokens_grad(t.mask, reduction, t.denominator)[..., None]
    e_t, e_s = _one_hot(t.y_t, t.log_q.shape), _one_hot(t.y_s, t.log_q.shape)
    dh_ds = e_t - e_s  # ∂h/∂S_i; also −∂h/∂T_i unless reference-free
    dl_dh, dl_dc = dl_dh[..., None], dl_dc[..., None]
    # a = Q[y^t] gives ∂a/∂S = e_{y^t} − q;  c = P[y^t] gives ∂c/∂T = e_{y^t} − p;  dℓ/da = −dℓ/dc.
    g_student = dl_dh * dh_ds - dl_dc * (e_t - np.exp(t.log_q))
    g_teacher = dl_dc * (e_t - np.exp(t.log_p))
    if not t.options["reference_free"]:
        g_teacher = g_teacher - dl_dh * dh_ds
    return {"student_logits": w * g_student, "teacher_logits": w * g_teacher}
