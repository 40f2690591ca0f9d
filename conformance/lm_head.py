"""Fused lm_head cases from the registry: every sequence-level, token-level and token-log-prob case of
``dpkd.spec.cases`` as a problem on hidden states and an lm_head, with its float64 reference from the spec.

A backend's fused functions (``fused_sequence_loss``, ``fused_token_loss``, ``linear_token_logps`` and the
named wrappers ``fused_dpkd_loss``, …) take hidden states and an lm_head instead of logits. The reference
is the spec function on the materialised logits ``hidden @ Wᵀ + b`` in float64, and its gradient in hidden,
weight and bias is the spec's analytic gradient chained through that projection: with G = ∂S/∂logits,
∂S/∂hidden = G W, ∂S/∂W = Gᵀ hidden, ∂S/∂b = Σ G. Nothing here calls a backend or imports a framework.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from dpkd.spec import registry as reg
from dpkd.spec.fused import NamedSequenceLoss, NamedTokenLoss
from dpkd.spec.registry import Call, FunctionSpec, Variant
from dpkd.spec.results import FusedPreferenceLoss, TeacherLMHead

from .testing import TOLERANCES, well_conditioned

__all__ = ["LMHeadCase", "fused_case", "wrapper_case", "SEQUENCE_SHAPE", "TOKEN_SHAPE"]

IGNORE = -100
#: (B, T_c, T_s, H, V, H_t): one fixed shape, so a backend that compiles per shape compiles once per case
SEQUENCE_SHAPE = (3, 4, 3, 5, 7, 6)
#: (B, T, H, V, H_t)
TOKEN_SHAPE = (2, 5, 5, 7, 6)
# draws within this distance of a discontinuity (argmax tie, DPOP kink, AKL head edge) are redrawn
_MARGIN = max(tol.margin for tol in TOLERANCES.values())


@dataclass(frozen=True)
class LMHeadCase:
    """One fused call and its float64 reference.

    ``function`` is called as ``function(*args, **kwargs)`` (NumPy arrays: the backend's adapter converts
    them, a teacher's included); ``wrt`` / ``wrt_kwargs`` are the positions / keywords of the student's
    differentiable arrays, named ``grad_names``; ``expected`` is the spec's result (the loss for the generic
    functions, every field for a named wrapper) and ``gradients`` ∂ sum(loss) per differentiable array.
    ``scale`` is the magnitude the values' absolute tolerance scales with (the logits'); ``spec_call`` the
    spec call on the materialised logits and ``parts`` what a named wrapper's case is built from.
    """

    name: str
    function: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    wrt: tuple[int, ...]
    wrt_kwargs: tuple[str, ...]
    grad_names: tuple[str, ...]
    expected: Any
    gradients: tuple[np.ndarray, ...]
    scale: float
    spec_call: Call
    parts: dict[str, Any]


def _spec(name: str) -> Any:
    return getattr(importlib.import_module("dpkd.spec"), name)


def _projection(rng: np.random.Generator, lead: tuple[int, ...], h: int, v: int) -> tuple[np.ndarray, ...]:
    hidden = rng.standard_normal((*lead, h))
    return hidden, rng.standard_normal((v, h)) * (2.0 / np.sqrt(h)), rng.standard_normal(v) * 0.5


def _logits(hidden: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return hidden @ weight.T + bias


def _chain(g_logits: np.ndarray, hidden: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, ...]:
    """(∂S/∂hidden, ∂S/∂weight, ∂S/∂bias) from ∂S/∂logits through logits = hidden @ Wᵀ + b."""
    g2 = g_logits.reshape(-1, weight.shape[0])
    return (g2 @ weight).reshape(hidden.shape), g2.T @ hidden.reshape(-1, hidden.shape[-1]), g2.sum(0)


def _labels(rng: np.random.Generator, shape: tuple[int, ...], vocab: int, ignore: int = IGNORE) -> np.ndarray:
    labels = reg.random_labels(rng, shape, vocab, ignore)
    labels[..., 0] = rng.integers(0, vocab, shape[:-1])  # every row keeps a token (lengths > 0)
    return labels


def _options(spec: FunctionSpec, variant: Variant, reduction: str) -> dict[str, Any]:
    """The variant's options at the middle of their draw ranges, and ``reduction`` unless it fixes one."""
    options = dict(reg.default_draw(spec, variant).options)
    options["reduction"] = variant.options.get("reduction", reduction)
    return {**options, **variant.options}


def _scale(*arrays: np.ndarray) -> float:
    return max(1.0, *(float(np.max(np.abs(x))) for x in arrays))


def _sequence(spec: FunctionSpec, variant: Variant, rng: np.random.Generator, reduction: str) -> LMHeadCase:
    b, t_c, t_s, h, v, h_t = SEQUENCE_SHAPE
    ch, weight, bias = _projection(rng, (b, t_c), h, v)
    rj = rng.standard_normal((b, t_s, h))
    tch, t_weight, t_bias = _projection(rng, (b, t_c), h_t, v)
    trj = rng.standard_normal((b, t_s, h_t))
    lab_c, lab_s = _labels(rng, (b, t_c), v), _labels(rng, (b, t_s), v)
    options = _options(spec, variant, reduction)
    reference = any(a.name == "reference_chosen_logps" for a in spec.arrays)
    teacher = reference and "reference_chosen_logps" not in variant.omit
    logits_c, logits_s = _logits(ch, weight, bias), _logits(rj, weight, bias)
    a, n_c = _spec("sequence_logps")(logits_c, lab_c)
    b_, n_s = _spec("sequence_logps")(logits_s, lab_s)
    args: list[Any] = [a, b_]
    if reference:
        c = d = None
        if teacher:
            c, _ = _spec("sequence_logps")(_logits(tch, t_weight, t_bias), lab_c)
            d, _ = _spec("sequence_logps")(_logits(trj, t_weight, t_bias), lab_s)
        args += [c, d]
    lengths = {"chosen_lengths": n_c, "rejected_lengths": n_s}
    lengths = {k: x for k, x in lengths.items() if variant.lengths == "both" or
               (variant.lengths == "chosen" and k == "chosen_lengths")}
    call = Call(spec.name, tuple(args), {**lengths, **options}, variant.name)
    expected = _spec(spec.name)(*call.args, **call.kwargs)
    grads = _spec(spec.gradient)(*call.args, **call.kwargs)
    g_c = grads["policy_chosen_logps"][:, None, None] * _spec("sequence_logps_grad")(logits_c, lab_c)["logits"]
    g_s = grads["policy_rejected_logps"][:, None, None] * _spec("sequence_logps_grad")(logits_s, lab_s)["logits"]
    (gh_c, gw_c, gb_c), (gh_s, gw_s, gb_s) = _chain(g_c, ch, weight), _chain(g_s, rj, weight)
    kwargs: dict[str, Any] = {"bias": bias, "use_lengths": variant.lengths != "none",
                              "reduction": options["reduction"], "teacher_required": teacher}
    if teacher:
        kwargs["teacher"] = TeacherLMHead(tch, trj, t_weight, t_bias)
    own = {k: x for k, x in options.items() if k != "reduction"}
    return LMHeadCase(
        f"{spec.name}[{variant.name}]", "fused_sequence_loss",
        (NamedSequenceLoss(spec.name, own), ch, rj, weight, lab_c, lab_s), kwargs, (1, 2, 3), ("bias",),
        ("chosen_hidden", "rejected_hidden", "weight", "bias"), expected.loss,
        (gh_c, gh_s, gw_c + gw_s, gb_c + gb_s), _scale(logits_c, logits_s, expected.chosen_rewards), call,
        {"result": FusedPreferenceLoss(*expected, a, b_), "options": own, "arrays": (ch, rj, weight, lab_c, lab_s)})


def _token(spec: FunctionSpec, variant: Variant, rng: np.random.Generator, reduction: str) -> LMHeadCase:
    b, t, h, v, h_t = TOKEN_SHAPE
    hidden, weight, bias = _projection(rng, (b, t), h, v)
    t_hidden, t_weight, t_bias = _projection(rng, (b, t), h_t, v)
    options = _options(spec, variant, reduction)
    logits = _logits(hidden, weight, bias)
    kwargs: dict[str, Any] = {"bias": bias, "reduction": options["reduction"]}
    if any(a.name == "labels" for a in spec.arrays):
        ignore = options.get("ignore_index", IGNORE)
        target = _labels(rng, (b, t), v, ignore)
        call_args: tuple[Any, ...] = (logits, target)
        kwargs.update(target_is_labels=True, ignore_index=ignore)
        key, teacher = "logits", ()
    else:
        target = reg.random_mask(rng, (b, t))
        call_args = (logits, _logits(t_hidden, t_weight, t_bias), target)
        kwargs.update(teacher_hidden=t_hidden, teacher_weight=t_weight, teacher_bias=t_bias)
        key, teacher = "student_logits", (t_hidden, t_weight)
    if options.get("normalizer") is not None:
        kwargs["normalizer"] = options["normalizer"]
    call = Call(spec.name, call_args, options, variant.name)
    expected = _spec(spec.name)(*call.args, **call.kwargs)
    g_h, g_w, g_b = _chain(_spec(spec.gradient)(*call.args, **call.kwargs)[key], hidden, weight)
    own = {k: x for k, x in options.items() if k not in ("reduction", "normalizer")}
    return LMHeadCase(
        f"{spec.name}[{variant.name}]", "fused_token_loss", (NamedTokenLoss(spec.name, own), hidden, weight, target),
        kwargs, (1, 2), ("bias",), ("hidden", "weight", "bias"),
        expected[0] if isinstance(expected, tuple) else expected, (g_h, g_w, g_b), _scale(*call_args[:2]), call,
        {"result": expected, "options": own, "arrays": (hidden, weight, *teacher, target)})


def _logps(spec: FunctionSpec, variant: Variant, rng: np.random.Generator, reduction: str) -> LMHeadCase:
    b, t, h, v, _ = TOKEN_SHAPE
    hidden, weight, bias = _projection(rng, (b, t), h, v)
    ignore = variant.options.get("ignore_index", IGNORE)
    labels = _labels(rng, (b, t), v, ignore)
    logits = _logits(hidden, weight, bias)
    call = Call(spec.name, (logits, labels), {"ignore_index": ignore}, variant.name)
    expected = _spec(spec.name)(*call.args, **call.kwargs)
    gradients = _chain(_spec(spec.gradient)(*call.args, **call.kwargs)["logits"], hidden, weight)
    return LMHeadCase(f"{spec.name}[{variant.name}]", spec.fused, (hidden, weight, labels),
                      {"bias": bias, "ignore_index": ignore}, (0, 1), ("bias",), ("hidden", "weight", "bias"),
                      expected, gradients, _scale(logits), call, {})


_BUILDERS = {"sequence": _sequence, "token": _token, "logps": _logps}


def fused_case(spec: FunctionSpec, variant: Variant, *, seed: int = 0, reduction: str = "mean") -> LMHeadCase:
    """The generic fused call of one registry variant (``fused_sequence_loss``, ``fused_token_loss``, or
    ``linear_token_logps`` for ``token_logps``), redrawn from the next seed while the materialised call lies
    within the tolerance table's margin of a discontinuity."""
    for k in range(64):
        case = _BUILDERS[spec.kind](spec, variant, np.random.default_rng(seed + k), reduction)
        if well_conditioned(spec, case.spec_call, _MARGIN):
            return case
    raise AssertionError(f"no well-conditioned draw for {spec.name}[{variant.name}]")  # pragma: no cover


def wrapper_case(case: LMHeadCase, spec: FunctionSpec) -> LMHeadCase:
    """The same problem through the named wrapper ``spec.fused`` (``fused_dpkd_loss``, ``fused_forward_kl``,
    …): its positional arrays, the loss's options as keywords; the expected value is the spec's whole result
    (a fused sequence loss also returns the policy log-probs a, b)."""
    options = dict(case.parts["options"])
    kwargs = {k: x for k, x in case.kwargs.items() if k in ("bias", "teacher", "teacher_bias", "normalizer",
                                                            "reduction", "ignore_index")}
    params = inspect.signature(_spec(spec.name)).parameters
    if spec.kind == "sequence" and "length_normalize" not in options and "chosen_lengths" in params \
            and params["chosen_lengths"].default is not inspect.Parameter.empty:
        options["length_normalize"] = case.kwargs["use_lengths"]  # fused_dpkd_loss, fused_cpo_loss
    if spec.kind == "token" and "labels" in params:
        options.pop("ignore_index", None)
    return replace(case, function=spec.fused, args=case.parts["arrays"], kwargs={**kwargs, **options},
                   expected=case.parts["result"])
