"""Float64 references for the fused lm_head path, built ONLY from the NumPy spec (dpkd.spec).

The fused functions take hidden states and an lm_head; the spec takes logits. So the references form the
logits in float64 (logits = hidden @ Wᵀ + b), call the spec, and chain the spec's analytic gradients back
through the projection: with G = d S / d logits (from the spec's ``*_grad``), grad_hidden = G @ W,
grad_weight = Gᵀ @ hidden, grad_bias = Σ G. Nothing here calls the code under test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

spec = pytest.importorskip("dpkd.spec")

IGNORE = -100


@dataclass
class LMHeadCase:
    """One random problem: student rows [..., H], lm_head [V, H] (+ bias), labels [...]; teacher [..., H_t]."""

    hidden: np.ndarray
    weight: np.ndarray
    bias: np.ndarray | None
    labels: np.ndarray
    teacher_hidden: np.ndarray
    teacher_weight: np.ndarray
    teacher_bias: np.ndarray | None


def make_case(seed: int, lead: tuple[int, ...], hidden_size: int, vocab: int, *, teacher_size: int | None = None,
              bias: bool = True, ignore_frac: float = 0.25) -> LMHeadCase:
    rng = np.random.default_rng(seed)
    teacher_size = teacher_size or hidden_size + 5  # a different hidden size by default
    labels = rng.integers(0, vocab, lead)
    labels[rng.random(lead) < ignore_frac] = IGNORE
    return LMHeadCase(
        hidden=rng.standard_normal((*lead, hidden_size)),
        weight=rng.standard_normal((vocab, hidden_size)) / np.sqrt(hidden_size) * 3.0,
        bias=rng.standard_normal(vocab) if bias else None,
        labels=labels,
        teacher_hidden=rng.standard_normal((*lead, teacher_size)),
        teacher_weight=rng.standard_normal((vocab, teacher_size)) / np.sqrt(teacher_size) * 3.0,
        teacher_bias=rng.standard_normal(vocab) if bias else None,
    )


def logits_of(hidden: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    out = hidden @ weight.T
    return out if bias is None else out + bias


def chain(grad_logits: np.ndarray, hidden: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, ...]:
    """(grad_hidden, grad_weight, grad_bias) from d S/d logits through logits = hidden @ Wᵀ + b."""
    g2 = grad_logits.reshape(-1, weight.shape[0])
    h2 = hidden.reshape(-1, hidden.shape[-1])
    return (g2 @ weight).reshape(hidden.shape), g2.T @ h2, g2.sum(0)


def ref_linear_token_logps(case: LMHeadCase, upstream: np.ndarray):
    """Value, and gradients of S = Σ upstream·logp, from spec.token_logps / token_logps_grad."""
    logits = logits_of(case.hidden, case.weight, case.bias)
    value = spec.token_logps(logits, case.labels, ignore_index=IGNORE)
    # each output depends on its own row only, so the gradient of Σ g·logp is g-scaled rows of d Σ logp
    g = upstream[..., None] * spec.token_logps_grad(logits, case.labels, ignore_index=IGNORE)["logits"]
    return value, chain(g, case.hidden, case.weight)


A, B, C, D = "policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps"


def _spec_sequence_call(name: str, options: dict, a, b, c, d, lc, ls, reduction: str):
    """(fn, args, kwargs) for the spec's sequence loss ``name`` as the fused wrapper calls the backend."""
    fn, fn_grad = getattr(spec, name), getattr(spec, name + "_grad")
    if name in ("cpo_loss",):
        return fn, fn_grad, (a, b), {"chosen_lengths": lc, "reduction": reduction, **options}
    if name in ("simpo_loss",):
        return fn, fn_grad, (a, b), {"chosen_lengths": lc, "rejected_lengths": ls, "reduction": reduction,
                                     **options}
    if name == "dpop_loss":
        return fn, fn_grad, (a, b, c, d), {"reduction": reduction, **options}
    return fn, fn_grad, (a, b, c, d), {"chosen_lengths": lc, "rejected_lengths": ls, "reduction": reduction,
                                       **options}


def ref_sequence(name: str, options: dict, chosen: LMHeadCase, rejected: LMHeadCase, *, use_lengths: bool,
                 reduction: str, teacher: str = "lm_head"):
    """Spec value, rewards and the gradients of S = Σ loss w.r.t. (chosen_hidden, rejected_hidden, W, b).

    chosen/rejected share weight and bias (chosen.weight is used); teacher "lm_head" uses the cases'
    teacher arrays, "none" gives c = d = None."""
    w, bias = chosen.weight, chosen.bias
    lc_logits = logits_of(chosen.hidden, w, bias)
    ls_logits = logits_of(rejected.hidden, w, bias)
    a, n_c = spec.sequence_logps(lc_logits, chosen.labels, ignore_index=IGNORE)
    b, n_s = spec.sequence_logps(ls_logits, rejected.labels, ignore_index=IGNORE)
    c = d = None
    if teacher == "lm_head":
        c, _ = spec.sequence_logps(logits_of(chosen.teacher_hidden, chosen.teacher_weight, chosen.teacher_bias),
                                   chosen.labels, ignore_index=IGNORE)
        d, _ = spec.sequence_logps(logits_of(rejected.teacher_hidden, chosen.teacher_weight, chosen.teacher_bias),
                                   rejected.labels, ignore_index=IGNORE)
    lc, ls = (n_c, n_s) if use_lengths else (None, None)
    fn, fn_grad, args, kwargs = _spec_sequence_call(name, options, a, b, c, d, lc, ls, reduction)
    out = fn(*args, **kwargs)
    grads = fn_grad(*args, **kwargs)
    # a_i = Σ_t logp(row i, t): d S/d logits of row i = (∂S/∂a_i) · d a_i/d logits
    g_c = grads[A][:, None, None] * spec.sequence_logps_grad(lc_logits, chosen.labels, ignore_index=IGNORE)["logits"]
    g_s = grads[B][:, None, None] * spec.sequence_logps_grad(ls_logits, rejected.labels, ignore_index=IGNORE)["logits"]
    gh_c, gw_c, gb_c = chain(g_c, chosen.hidden, w)
    gh_s, gw_s, gb_s = chain(g_s, rejected.hidden, w)
    return out, (gh_c, gh_s, gw_c + gw_s, gb_c + gb_s), (c, d)


def ref_token_loss(name: str, options: dict, case: LMHeadCase, mask: np.ndarray, reduction: str):
    """Spec value (and extras) and the student gradients of S = Σ loss for a token-level loss."""
    s_logits = logits_of(case.hidden, case.weight, case.bias)
    if name == "cross_entropy":
        args = (s_logits, case.labels)
        kwargs = {"ignore_index": IGNORE, "reduction": reduction, **options}
        key = "logits"
    else:
        t_logits = logits_of(case.teacher_hidden, case.teacher_weight, case.teacher_bias)
        args = (s_logits, t_logits, mask)
        kwargs = {"reduction": reduction, **options}
        key = "student_logits"
    out = getattr(spec, name)(*args, **kwargs)
    g = getattr(spec, name + "_grad")(*args, **kwargs)[key]
    return out, chain(g, case.hidden, case.weight)


@pytest.fixture
def refs():
    """The reference helpers, as one namespace (test files import nothing from each other)."""

    class Refs:
        make_case = staticmethod(make_case)
        logits_of = staticmethod(logits_of)
        linear_token_logps = staticmethod(ref_linear_token_logps)
        sequence = staticmethod(ref_sequence)
        token_loss = staticmethod(ref_token_loss)
        IGNORE = IGNORE

    return Refs
