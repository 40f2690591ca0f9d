"""The fused, token-chunked lm_head path of the JAX backend: ``linear_token_logps`` and the sequence-level
losses (the token-level ones are in ``fused_token.py``; the per-chunk math in ``_lm_head.py``).

The same functions, arguments and error messages as the Torch backend's ``fused.py``, written for XLA:

* ``linear_token_logps`` — a ``jax.custom_vjp``: the forward maps over token chunks (``lax.map``) keeping
  only the per-token log-prob and logsumexp; the backward scans over the chunks again (``lax.scan``),
  recomputing each chunk's logits, emitting grad_hidden and carrying grad_weight/grad_bias in float32 or
  wider. Live logits are ``chunk × V`` whatever N is. Jit-compiled (chunk size and ignore_index static).
* ``fused_sequence_loss`` / ``fused_dpkd_loss`` (+ IPO/CPO/SimPO/DPOP) — a sequence-level loss on the summed
  log-probs. When whole pairs fit the chunk budget and the loss is reduced, one scan over pair chunks
  yields the loss and its gradient together (3 GEMMs; d loss/d token-logp is the per-sequence scalar
  (1/B)·∂ℓ_i/∂a_i) and the VJP only scales by the upstream scalar; otherwise the loss is taken on summed
  ``linear_token_logps`` (two passes, 4 GEMMs).

The teacher (hidden size may differ) runs without gradient. The loss is the JAX backend's own
(``dpkd.backends.jax.sequence``), named by a hashable ``NamedSequenceLoss`` so that jit caches stay valid
across calls.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from dpkd.spec import fused as contract
from dpkd.spec import validation as v
from dpkd.spec.fused import DEFAULT_CHUNK_BYTES, NamedSequenceLoss, auto_chunk_size
from dpkd.spec.results import FusedPreferenceLoss, PreferenceLoss, TeacherLMHead, TeacherLogps

from . import _base, sequence
from ._lm_head import accum_dtype, chunk_logps, describe, logp_backprop, pad_rows, project

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "NamedSequenceLoss",
    "TeacherLMHead",
    "TeacherLogps",
    "auto_chunk_size",
    "linear_token_logps",
    "fused_sequence_loss",
    "fused_dpkd_loss",
    "fused_ipo_loss",
    "fused_cpo_loss",
    "fused_simpo_loss",
    "fused_dpop_loss",
    "fused_concatenated",
]


# --------------------------------------------------------------------------------------------------
# linear_token_logps


def _ltl_forward(hidden, weight, bias, labels, chunk_size: int, ignore_index: int):
    n, size = hidden.shape
    k = n // chunk_size

    def body(args):
        rows, lab = args
        return chunk_logps(project(rows, weight, bias), lab, ignore_index)

    logp, lse = jax.lax.map(body, (hidden.reshape(k, chunk_size, size), labels.reshape(k, chunk_size)))
    return logp.reshape(n), lse.reshape(n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ltl(hidden, weight, bias, labels, chunk_size: int, ignore_index: int):
    return _ltl_forward(hidden, weight, bias, labels, chunk_size, ignore_index)[0]


def _ltl_fwd(hidden, weight, bias, labels, chunk_size, ignore_index):
    logp, lse = _ltl_forward(hidden, weight, bias, labels, chunk_size, ignore_index)
    return logp, (hidden, weight, bias, labels, lse)


def _ltl_bwd(chunk_size, ignore_index, res, g):
    hidden, weight, bias, labels, lse = res
    n, size = hidden.shape
    k = n // chunk_size
    acc = accum_dtype(weight.dtype)

    def step(carry, args):
        grad_w, grad_b = carry
        rows, lab, chunk_lse, chunk_g = args
        probs = jnp.exp(project(rows, weight, bias) - chunk_lse[:, None])  # softmax from the saved lse
        valid = lab != ignore_index
        g_rows = jnp.where(valid, chunk_g, 0.0).astype(probs.dtype)
        grad_rows, grad_w, grad_b = logp_backprop(probs, rows, weight, jnp.where(valid, lab, 0), g_rows,
                                                   grad_w, grad_b)
        return (grad_w, grad_b), grad_rows

    init = (jnp.zeros(weight.shape, acc), None if bias is None else jnp.zeros(weight.shape[:1], acc))
    xs = (hidden.reshape(k, chunk_size, size), labels.reshape(k, chunk_size), lse.reshape(k, chunk_size),
          g.reshape(k, chunk_size))
    (grad_w, grad_b), grad_h = jax.lax.scan(step, init, xs)
    grad_bias = None if bias is None else grad_b.astype(bias.dtype)
    return grad_h.reshape(n, size), grad_w.astype(weight.dtype), grad_bias, None


_ltl.defvjp(_ltl_fwd, _ltl_bwd)


def _padded_token_logps(rows, weight, bias, labels, chunk_size: int, ignore_index: int):
    """``_ltl`` on rows padded to a multiple of ``chunk_size`` (padding rows carry ``ignore_index``)."""
    n = rows.shape[0]
    n_pad = -n % chunk_size
    out = _ltl(pad_rows(rows, n_pad), weight, bias, pad_rows(labels, n_pad, ignore_index), chunk_size,
               ignore_index)
    return out[:n]


@functools.partial(jax.jit, static_argnames=("chunk_size", "ignore_index"))
def _linear_token_logps_jit(rows, weight, bias, labels, *, chunk_size: int, ignore_index: int):
    return _padded_token_logps(rows, weight, bias, labels, chunk_size, ignore_index)


def linear_token_logps(
    hidden: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    *,
    bias: jax.Array | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
) -> jax.Array:
    """Per-token log-probabilities of an lm_head, without materialising the logits.

    logp[n] = log_softmax(hidden[n] @ weightᵀ + bias)[labels[n]] (``dpkd.spec.token_logps`` on the logits), 0 where
    ``labels == ignore_index``; a ``jax.custom_vjp`` over token chunks whose backward recomputes each
    chunk's logits (grad_hidden = G @ W, grad_weight += Gᵀ @ hidden in float32 or wider,
    G = g·(onehot − softmax)). hidden [..., H], weight [V, H] (same dtype), labels [...] int, bias [V];
    ``chunk_size`` token rows per chunk (default from a 64 MiB budget); returns [...] (float32 for
    bfloat16/float16 inputs). Jit-compiled; value checks run when the inputs are concrete.

    Example:
        >>> h, w = jnp.ones((6, 4)), jnp.ones((10, 4))
        >>> linear_token_logps(h, w, jnp.array([1, 2, 3, -100, 0, 9]), chunk_size=4).shape
        (6,)

    See also: ``dpkd.backends.jax.token_logps`` (materialised), ``fused_dpkd_loss``.
    """
    func = "linear_token_logps"
    size = v.check_chunk_options(func, chunk_size, ignore_index)
    contract.check_logps_call(func, describe, _base.ValueChecks(func), hidden=hidden, weight=weight, bias=bias,
                              labels=labels, ignore_index=ignore_index)
    dtype = _base.compute_dtype(hidden, weight, bias)
    lead = tuple(labels.shape)
    rows = hidden.reshape(-1, hidden.shape[-1]).astype(dtype)
    n = rows.shape[0]
    if n == 0:
        return jnp.zeros(lead, dtype)
    size = size or auto_chunk_size(weight.shape[0], n_rows=n, itemsize=np.dtype(dtype).itemsize)
    out = _linear_token_logps_jit(rows, weight.astype(dtype), None if bias is None else bias.astype(dtype),
                                  labels.reshape(-1), chunk_size=min(size, n), ignore_index=int(ignore_index))
    return out.reshape(lead)


# --------------------------------------------------------------------------------------------------
# Sequence-level losses


@dataclass(frozen=True)
class _Plan:
    loss: Callable[..., PreferenceLoss]  # hashable: bound NamedSequenceLoss or the caller's callable
    reduction: str
    mode: str
    chunk_size: int  # token rows per chunk
    pairs_per_chunk: int
    ignore_index: int
    teacher: str  # "lm_head" | "logps" | "none"
    use_lengths: bool


def _sequence_sums(rows, weight, bias, labels, plan: _Plan) -> jax.Array:
    """Σ_t logp over each row of ``labels`` [B, T] (rows: [B, T, H]) via ``linear_token_logps``."""
    flat = _padded_token_logps(rows.reshape(-1, rows.shape[-1]), weight, bias, labels.reshape(-1),
                               min(plan.chunk_size, labels.size), plan.ignore_index)
    return flat.reshape(labels.shape).sum(1)


def _single_pass_fn(plan: _Plan):
    """The custom_vjp of one single-pass loss: (chosen_hidden, rejected_hidden, weight, bias, aux) →
    (loss, chosen_rewards, rejected_rewards, a, b); aux = (labels_c, labels_s, c, d, L_t, L_s) carries no
    gradient."""
    ig, k = plan.ignore_index, plan.pairs_per_chunk

    def run(chosen_hidden, rejected_hidden, weight, bias, aux):
        lab_c, lab_s, c, d, len_c, len_s = aux
        n_pairs, t_c, size = chosen_hidden.shape
        t_s = rejected_hidden.shape[1]
        n_pad = -n_pairs % k
        scale = 1.0 / n_pairs if plan.reduction == "mean" else 1.0
        live = pad_rows(jnp.ones(n_pairs, chosen_hidden.dtype), n_pad)  # padding pairs get no gradient

        def chunks(x, fill=0):
            x = pad_rows(x, n_pad, fill)
            return x.reshape(-1, k, *x.shape[1:])

        acc = accum_dtype(weight.dtype)

        def step(carry, xs):
            grad_w, grad_b = carry
            h_c, h_s, l_c, l_s, c_k, d_k, lc_k, ls_k, live_k = xs
            # one product over both sides' rows (as the Torch backend: wider GEMMs run faster per row)
            rows = jnp.concatenate([h_c.reshape(-1, size), h_s.reshape(-1, size)])
            lab = jnp.concatenate([l_c.reshape(-1), l_s.reshape(-1)])
            logits = project(rows, weight, bias)
            logp, lse = chunk_logps(logits, lab, ig)
            a_k, b_k = logp[: k * t_c].reshape(k, t_c).sum(1), logp[k * t_c:].reshape(k, t_s).sum(1)

            def pair_losses(a_k, b_k):
                return plan.loss(a_k, b_k, c_k, d_k, chosen_lengths=lc_k, rejected_lengths=ls_k,
                                 reduction="none").loss.sum()

            da, db = jax.grad(pair_losses, argnums=(0, 1))(a_k, b_k)
            g = jnp.concatenate([jnp.repeat(scale * da * live_k, t_c), jnp.repeat(scale * db * live_k, t_s)])
            g = jnp.where(lab != ig, g, 0.0).astype(rows.dtype)
            probs = jnp.exp(logits - lse[:, None])
            grad_rows, grad_w, grad_b = logp_backprop(probs, rows, weight, jnp.where(lab != ig, lab, 0), g,
                                                       grad_w, grad_b)
            return (grad_w, grad_b), (grad_rows[: k * t_c].reshape(k, t_c, size),
                                      grad_rows[k * t_c:].reshape(k, t_s, size), a_k, b_k)

        def optional_chunks(x, fill):  # None (no teacher, no lengths) stays None inside the scan
            return None if x is None else chunks(x, fill)

        # padding pairs: every label ignored, lengths 1 (no 0/0), and `live` = 0 so they get no gradient
        xs = (chunks(chosen_hidden), chunks(rejected_hidden), chunks(lab_c, ig), chunks(lab_s, ig),
              optional_chunks(c, 0), optional_chunks(d, 0), optional_chunks(len_c, 1), optional_chunks(len_s, 1),
              live.reshape(-1, k))
        init = (jnp.zeros(weight.shape, acc), None if bias is None else jnp.zeros(weight.shape[:1], acc))
        (grad_w, grad_b), (g_c, g_s, a, b) = jax.lax.scan(step, init, xs)
        a, b = a.reshape(-1)[:n_pairs], b.reshape(-1)[:n_pairs]
        result = plan.loss(a, b, c, d, chosen_lengths=len_c, rejected_lengths=len_s, reduction=plan.reduction)
        grads = (g_c.reshape(-1, t_c, size)[:n_pairs], g_s.reshape(-1, t_s, size)[:n_pairs],
                 grad_w.astype(weight.dtype), None if bias is None else grad_b.astype(bias.dtype))
        return (*result, a, b), grads

    @jax.custom_vjp
    def loss_fn(chosen_hidden, rejected_hidden, weight, bias, aux):
        return run(chosen_hidden, rejected_hidden, weight, bias, aux)[0]

    def fwd(chosen_hidden, rejected_hidden, weight, bias, aux):
        out, grads = run(chosen_hidden, rejected_hidden, weight, bias, aux)
        return out, (grads, aux)

    def bwd(res, cotangents):
        (g_c, g_s, g_w, g_b), aux = res
        g = cotangents[0]  # rewards and log-probs are detached outputs: their cotangents are dropped
        scaled = tuple(None if x is None else (g * x).astype(x.dtype) for x in (g_c, g_s, g_w, g_b))
        return (*scaled, jax.tree_util.tree_map(lambda _: None, aux))

    loss_fn.defvjp(fwd, bwd)
    return loss_fn


@functools.lru_cache(maxsize=64)
def _single_pass_cached(plan: _Plan):
    return _single_pass_fn(plan)


@functools.partial(jax.jit, static_argnames=("plan",))
def _fused_sequence_jit(chosen_hidden, rejected_hidden, weight, bias, lab_c, lab_s, teacher, *, plan: _Plan):
    ig = plan.ignore_index
    if plan.teacher == "lm_head":
        t_ch, t_rj, t_w, t_b = teacher
        c = jax.lax.stop_gradient(_sequence_sums(t_ch, t_w, t_b, lab_c, plan))
        d = jax.lax.stop_gradient(_sequence_sums(t_rj, t_w, t_b, lab_s, plan))
    elif plan.teacher == "logps":
        c, d = (jax.lax.stop_gradient(x.astype(weight.dtype)) for x in teacher)
    else:
        c = d = None
    len_c = len_s = None
    if plan.use_lengths:
        len_c, len_s = (lab_c != ig).sum(1), (lab_s != ig).sum(1)
    if plan.mode == "two_pass":
        a = _sequence_sums(chosen_hidden, weight, bias, lab_c, plan)
        b = _sequence_sums(rejected_hidden, weight, bias, lab_s, plan)
        out = plan.loss(a, b, c, d, chosen_lengths=len_c, rejected_lengths=len_s, reduction=plan.reduction)
        return (*out, a, b)
    return _single_pass_cached(plan)(chosen_hidden, rejected_hidden, weight, bias,
                                     (lab_c, lab_s, c, d, len_c, len_s))


def fused_sequence_loss(
    loss: NamedSequenceLoss | Callable[..., PreferenceLoss],
    chosen_hidden: jax.Array,
    rejected_hidden: jax.Array,
    weight: jax.Array,
    chosen_labels: jax.Array,
    rejected_labels: jax.Array,
    *,
    bias: jax.Array | None = None,
    teacher: TeacherLMHead | TeacherLogps | None = None,
    teacher_required: bool = True,
    use_lengths: bool = False,
    reduction: str = "mean",
    chunk_size: int | None = None,
    mode: str = "auto",
    ignore_index: int = -100,
    func: str = "fused_sequence_loss",
) -> FusedPreferenceLoss:
    """Any sequence-level loss on the student's lm_head (the Torch backend's ``fused_sequence_loss``: the
    same arguments, result and errors).

    a, b = the summed student log-probs of the chosen (teacher-output) and rejected (student-output) rows,
    c, d the teacher's; returns ``loss(a, b, c, d, chosen_lengths=, rejected_lengths=, reduction=)``
    (lengths = token counts when ``use_lengths``) and a, b. ``loss``: ``NamedSequenceLoss("dpkd_loss",
    {"beta": 0.1})`` (this backend's loss of that name) or a hashable callable with that contract,
    elementwise over pairs under reduction="none" — a static argument of the jitted computation, so an
    equal loss on the next call reuses the compiled code. mode "auto" takes the single pass (3 GEMMs) when
    the loss is reduced and one pair (T_c + T_s rows) fits ``chunk_size``, else two passes over
    ``linear_token_logps``. Shapes: chosen_hidden [B, T_c, H], rejected_hidden [B, T_s, H], weight [V, H],
    labels [B, T_c] / [B, T_s]; teacher ``TeacherLMHead`` (H_t may differ) or ``TeacherLogps``; the
    teacher gets no gradient. Returns ``FusedPreferenceLoss`` (all but the loss without gradient).
    """
    v.check_reduction(func, reduction)
    v.check_fused_mode(func, mode, reduction)
    size = v.check_chunk_options(func, chunk_size, ignore_index)
    loss_fn = contract.sequence_loss_function(func, loss, sequence)
    kind = contract.check_sequence_call(
        func, describe, _base.ValueChecks(func), chosen_hidden=chosen_hidden, rejected_hidden=rejected_hidden,
        weight=weight, bias=bias, chosen_labels=chosen_labels, rejected_labels=rejected_labels, teacher=teacher,
        teacher_required=teacher_required, length_labels=contract.length_labels(loss_fn, use_lengths),
        ignore_index=ignore_index)
    vocab = weight.shape[0]

    dtype = _base.compute_dtype(chosen_hidden, weight, bias)
    if chosen_hidden.shape[0] == 0:
        return _no_pairs(func, loss_fn, dtype, teacher if kind == "logps" else None, kind != "none", reduction,
                         use_lengths)
    teacher_arrays = None
    if kind == "logps":
        teacher_arrays = (teacher.chosen, teacher.rejected)
    elif kind == "lm_head":
        teacher_arrays = tuple(None if x is None else x.astype(dtype) for x in teacher)
    rows_per_pair = chosen_hidden.shape[1] + rejected_hidden.shape[1]
    size = size or auto_chunk_size(vocab, n_rows=chosen_hidden.shape[0] * rows_per_pair,
                                   itemsize=np.dtype(dtype).itemsize)
    if mode == "auto":
        mode = "single_pass" if reduction != "none" and rows_per_pair <= size else "two_pass"
    plan = _Plan(loss=loss_fn, reduction=reduction, mode=mode, chunk_size=size,
                 pairs_per_chunk=max(1, min(size // rows_per_pair, chosen_hidden.shape[0])),
                 ignore_index=int(ignore_index), teacher=kind, use_lengths=use_lengths)
    with v.reported_as(func, contract.SEQUENCE_ARGUMENTS):
        out = _fused_sequence_jit(chosen_hidden.astype(dtype), rejected_hidden.astype(dtype), weight.astype(dtype),
                                  None if bias is None else bias.astype(dtype), chosen_labels, rejected_labels,
                                  teacher_arrays, plan=plan)
    return FusedPreferenceLoss(out[0], *(jax.lax.stop_gradient(x) for x in out[1:]))


def _no_pairs(func: str, loss_fn: Any, dtype: Any, teacher_logps: TeacherLogps | None, has_teacher: bool,
              reduction: str, use_lengths: bool) -> FusedPreferenceLoss:
    """An empty batch (B = 0), with the materialised losses' contract: 'mean' is undefined, 'sum' is 0 and
    'none' is [0] (the gradients, of a result that does not depend on the inputs, are zeros)."""
    if reduction == "mean":
        v.fail(func, "chosen_hidden", "holds no pairs (B = 0), so reduction='mean' is undefined; use 'sum' or "
                                      "'none'")
    a = b = jnp.zeros((0,), dtype)
    c = d = (a if has_teacher else None)
    if teacher_logps is not None:
        c, d = teacher_logps.chosen.astype(dtype), teacher_logps.rejected.astype(dtype)
    lengths = (a, b) if use_lengths else (None, None)
    out = loss_fn(a, b, c, d, chosen_lengths=lengths[0], rejected_lengths=lengths[1], reduction=reduction)
    return FusedPreferenceLoss(out.loss, *(jax.lax.stop_gradient(x) for x in (out.chosen_rewards,
                                                                             out.rejected_rewards, a, b)))


def _named_wrapper(func: str, arguments: dict[str, Any]) -> FusedPreferenceLoss:
    """The ``fused_sequence_loss`` call of the named wrapper ``func`` given its ``arguments`` (the same in
    every backend: ``dpkd.spec.fused.sequence_call``)."""
    loss, kwargs = contract.sequence_call(func, arguments)
    return fused_sequence_loss(loss, **kwargs)


def fused_dpkd_loss(
    chosen_hidden: jax.Array, rejected_hidden: jax.Array, weight: jax.Array,
    chosen_labels: jax.Array, rejected_labels: jax.Array, *,
    teacher: TeacherLMHead | TeacherLogps | None = None, bias: jax.Array | None = None,
    length_normalize: bool = False, beta: float = 0.1, label_smoothing: float = 0.0,
    reference_free: bool = False, reduction: str = "mean", chunk_size: int | None = None, mode: str = "auto",
    ignore_index: int = -100,
) -> FusedPreferenceLoss:
    """``dpkd.spec.dpkd_loss`` (Eq. 8; Eq. 9 with ``length_normalize``: L = token counts) on the student's
    lm_head, with the same value and gradients as on materialised logits. Arguments as in
    ``fused_sequence_loss``; options as in ``dpkd_loss``.

    Example:
        >>> B, T, H, V = 2, 5, 8, 11
        >>> lab = jnp.zeros((B, T), jnp.int32)
        >>> out = fused_dpkd_loss(jnp.ones((B, T, H)), jnp.ones((B, T, H)), jnp.ones((V, H)), lab, lab,
        ...                       teacher=TeacherLogps(jnp.full(B, -9.0), jnp.full(B, -12.0)))
        >>> out.loss.shape
        ()
    """
    return _named_wrapper("fused_dpkd_loss", locals())


def fused_ipo_loss(
    chosen_hidden: jax.Array, rejected_hidden: jax.Array, weight: jax.Array,
    chosen_labels: jax.Array, rejected_labels: jax.Array, *,
    teacher: TeacherLMHead | TeacherLogps | None = None, bias: jax.Array | None = None,
    tau: float = 0.1, length_normalize: bool = True, reduction: str = "mean", chunk_size: int | None = None,
    mode: str = "auto", ignore_index: int = -100,
) -> FusedPreferenceLoss:
    """``dpkd.spec.ipo_loss`` (length-normalised h by default) on the student's lm_head; see fused_dpkd_loss."""
    return _named_wrapper("fused_ipo_loss", locals())


def fused_cpo_loss(
    chosen_hidden: jax.Array, rejected_hidden: jax.Array, weight: jax.Array,
    chosen_labels: jax.Array, rejected_labels: jax.Array, *, bias: jax.Array | None = None,
    beta: float = 0.1, nll_weight: float = 1.0, length_normalize: bool = False, label_smoothing: float = 0.0,
    reduction: str = "mean", chunk_size: int | None = None, mode: str = "auto", ignore_index: int = -100,
) -> FusedPreferenceLoss:
    """``dpkd.spec.cpo_loss`` (reference-free; the chosen NLL ÷ L_t with ``length_normalize``) on the
    student's lm_head; see fused_dpkd_loss."""
    return _named_wrapper("fused_cpo_loss", locals())


def fused_simpo_loss(
    chosen_hidden: jax.Array, rejected_hidden: jax.Array, weight: jax.Array,
    chosen_labels: jax.Array, rejected_labels: jax.Array, *, bias: jax.Array | None = None,
    beta: float = 2.0, gamma: float = 1.0, label_smoothing: float = 0.0, reduction: str = "mean",
    chunk_size: int | None = None, mode: str = "auto", ignore_index: int = -100,
) -> FusedPreferenceLoss:
    """``dpkd.spec.simpo_loss`` (reference-free, lengths = token counts) on the student's lm_head."""
    return _named_wrapper("fused_simpo_loss", locals())


def fused_dpop_loss(
    chosen_hidden: jax.Array, rejected_hidden: jax.Array, weight: jax.Array,
    chosen_labels: jax.Array, rejected_labels: jax.Array, *,
    teacher: TeacherLMHead | TeacherLogps | None = None, bias: jax.Array | None = None,
    beta: float = 0.1, lambda_: float = 50.0, form: str = "smaug", reduction: str = "mean",
    chunk_size: int | None = None, mode: str = "auto", ignore_index: int = -100,
) -> FusedPreferenceLoss:
    """``dpkd.spec.dpop_loss`` (penalty λ·max(0, c − a) on the summed h) on the student's lm_head."""
    return _named_wrapper("fused_dpop_loss", locals())


# --------------------------------------------------------------------------------------------------
# The concatenated (TRL / Liger) calling layout


def fused_concatenated(
    fused_loss: Callable[..., FusedPreferenceLoss],
    hidden: jax.Array,
    weight: jax.Array,
    target: jax.Array,
    *,
    bias: jax.Array | None = None,
    teacher_hidden: jax.Array | None = None,
    teacher_weight: jax.Array | None = None,
    teacher_bias: jax.Array | None = None,
    teacher_logps: jax.Array | None = None,
    **options: Any,
) -> FusedPreferenceLoss:
    """A fused sequence loss (``fused_dpkd_loss`` and siblings) in the layout TRL and Liger call with (the
    Torch backend's ``fused_concatenated``: the same arguments, result and errors).

    ``hidden`` [2B, T, H]: B chosen sequences then B rejected ones; ``target`` [2B, T] their shifted labels;
    the teacher as ``teacher_hidden`` [2B, T, H_t] + ``teacher_weight`` (+ ``teacher_bias``) or as
    ``teacher_logps`` [2B]. Returns ``fused_loss`` of the two halves: the split layout's result.

    Example:
        >>> B, T, H, V = 2, 5, 8, 11
        >>> out = fused_concatenated(fused_dpkd_loss, jnp.ones((2 * B, T, H)), jnp.ones((V, H)),
        ...                          jnp.zeros((2 * B, T), jnp.int32),
        ...                          teacher_logps=jnp.array([-9.0, -8.0, -12.0, -11.0]))
        >>> out.policy_chosen_logps.shape
        (2,)
    """
    func = getattr(fused_loss, "__name__", "fused_concatenated")
    n = contract.check_concatenated(func, describe(hidden), describe(target), teacher_hidden=describe(teacher_hidden),
                                    teacher_weight=describe(teacher_weight), teacher_logps=describe(teacher_logps))
    teacher = contract.concatenated_teacher(n, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                                            teacher_bias=teacher_bias, teacher_logps=teacher_logps)
    if teacher is not None:
        options["teacher"] = teacher
    return fused_loss(hidden[:n], hidden[n:], weight, target[:n], target[n:], bias=bias, **options)
