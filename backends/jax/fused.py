"""The fused, token-chunked lm_head path of the JAX backend (DESIGN.md §5).

The same two building blocks as ``dpkd.backends.torch.fused``, written for XLA:

* ``linear_token_logps`` — a ``jax.custom_vjp``: the forward maps over token chunks (``lax.map``) keeping
  only the per-token log-prob and logsumexp; the backward scans over the chunks again (``lax.scan``),
  recomputing each chunk's logits, emitting grad_hidden and carrying grad_weight/grad_bias in float32 or
  wider. Live logits are ``chunk × V`` whatever N is. Jit-compiled (chunk size and ignore_index static).
* ``fused_sequence_loss`` / ``fused_dpkd_loss`` (+ IPO/CPO/SimPO/DPOP) — a sequence-level loss on the summed
  log-probs. When whole pairs fit the chunk budget and the loss is reduced, one scan over pair chunks
  yields the loss and its gradient together (3 GEMMs; d loss/d token-logp is the per-sequence scalar
  (1/B)·∂ℓ_i/∂a_i) and the VJP only scales by the upstream scalar; otherwise the loss is taken on summed
  ``linear_token_logps`` (two passes, 4 GEMMs).

The teacher (hidden size may differ) runs without gradient. The loss formulas are the JAX backend's own
(``dpkd.backends.jax.sequence``), called by name so that jit caches stay valid across calls.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from dpkd.spec import validation as v
from dpkd.spec.results import PreferenceLoss

from . import _base as b

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
]

#: Bytes one chunk's logits may take when ``chunk_size`` is not given (same budget as the Torch backend).
DEFAULT_CHUNK_BYTES = 64 * 2**20


def auto_chunk_size(vocab_size: int, *, n_rows: int, itemsize: int = 4, buffers: int = 1,
                    budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that ``buffers`` live ``[rows, vocab_size]`` arrays fit ``budget_bytes``; in [1, n_rows]."""
    rows = budget_bytes // max(1, vocab_size * itemsize * buffers)
    return int(max(1, min(rows, max(1, n_rows))))


class TeacherLMHead(NamedTuple):
    """The teacher as hidden states + lm_head (no gradient): chosen_hidden [B, T_c, H_t],
    rejected_hidden [B, T_s, H_t], weight [V, H_t], bias [V] or None."""

    chosen_hidden: jax.Array
    rejected_hidden: jax.Array
    weight: jax.Array
    bias: jax.Array | None = None


class TeacherLogps(NamedTuple):
    """Precomputed teacher sequence log-probs c, d, each [B]; constants."""

    chosen: jax.Array
    rejected: jax.Array


# --------------------------------------------------------------------------------------------------
# Validation (the same messages as the Torch backend's fused path)


def _check_lm_head(func: str, hidden: jax.Array, weight: jax.Array, bias: jax.Array | None, *,
                   names: tuple[str, str, str], lead: tuple[int, ...] | None = None) -> None:
    h_name, w_name, b_name = names
    for name, t in ((h_name, hidden), (w_name, weight), (b_name, bias)):
        if t is not None:
            v.check_floating_dtype(func, name, bool(jnp.issubdtype(t.dtype, jnp.floating)), t.dtype)
    v.check_lm_head_shapes(func, tuple(hidden.shape), tuple(weight.shape),
                           None if bias is None else tuple(bias.shape), names=names, lead=lead)
    for name, t in ((w_name, weight), (b_name, bias)):
        if t is not None:
            v.check_same_dtype(func, name, t.dtype, h_name, hidden.dtype)


def _check_labels(func: str, name: str, labels: jax.Array, shape: tuple[int, ...]) -> None:
    v.check_integer_dtype(func, name, bool(jnp.issubdtype(labels.dtype, jnp.integer)), labels.dtype)
    if tuple(labels.shape) != tuple(shape):
        v.fail(func, name, f"has shape {tuple(labels.shape)}, expected {tuple(shape)} "
                           "(the shape of the hidden states without their hidden axis)")


def _check_values(func: str, floats: dict[str, jax.Array | None], labels: dict[str, jax.Array],
                  vocab_size: int, ignore_index: int) -> None:
    for name, x in floats.items():
        b.check_finite(func, name, x)
    for name, lab in labels.items():
        b.check_labels(func, name, lab, vocab_size, ignore_index)


# --------------------------------------------------------------------------------------------------
# Per-chunk math


def _project(rows: jax.Array, weight: jax.Array, bias: jax.Array | None) -> jax.Array:
    logits = rows @ weight.T
    return logits if bias is None else logits + bias


def _chunk_logps(logits: jax.Array, labels: jax.Array, ignore_index: int) -> tuple[jax.Array, jax.Array]:
    """(per-token logp, 0 where ignored; logsumexp) of one chunk of logits."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    valid = labels != ignore_index
    picked = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[:, None], axis=-1)[:, 0]
    return jnp.where(valid, picked - lse, 0.0), lse


def _logp_backprop(probs: jax.Array, rows: jax.Array, weight: jax.Array, safe_labels: jax.Array, g: jax.Array, *,
                   with_bias: bool) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(grad_rows, grad_weight, grad_bias) of Σ g·logp through one chunk, from its softmax ``probs``.

    G = g·(onehot − probs) = diag(−g)·probs + onehot·g: both products take ``probs`` as it is and the row
    factors act on [rows, H] arrays, so no [rows, V] gradient array is formed (see the Torch backend's
    ``_backprop_logp_chunk``)."""
    grad_rows = -g[:, None] * (probs @ weight) + g[:, None] * weight[safe_labels]
    grad_w = (probs.T @ (-g[:, None] * rows)).at[safe_labels].add(g[:, None] * rows)
    grad_b = (probs.T @ -g).at[safe_labels].add(g) if with_bias else None
    return grad_rows, grad_w, grad_b


def _accum_dtype(dtype: Any) -> Any:
    return jnp.promote_types(dtype, jnp.float32)


def _pad_rows(x: jax.Array, n_pad: int, value: Any = 0) -> jax.Array:
    if n_pad == 0:
        return x
    return jnp.concatenate([x, jnp.full((n_pad, *x.shape[1:]), value, x.dtype)])


# --------------------------------------------------------------------------------------------------
# linear_token_logps


def _ltl_forward(hidden, weight, bias, labels, chunk_size: int, ignore_index: int):
    n, size = hidden.shape
    k = n // chunk_size

    def body(args):
        rows, lab = args
        return _chunk_logps(_project(rows, weight, bias), lab, ignore_index)

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
    acc = _accum_dtype(weight.dtype)

    def step(carry, args):
        grad_w, grad_b = carry
        rows, lab, chunk_lse, chunk_g = args
        probs = jnp.exp(_project(rows, weight, bias) - chunk_lse[:, None])  # softmax from the saved lse
        valid = lab != ignore_index
        g_rows = jnp.where(valid, chunk_g, 0.0).astype(probs.dtype)
        grad_rows, dw, db = _logp_backprop(probs, rows, weight, jnp.where(valid, lab, 0), g_rows,
                                           with_bias=bias is not None)
        grad_w = grad_w + dw.astype(acc)
        if bias is not None:
            grad_b = grad_b + db.astype(acc)
        return (grad_w, grad_b), grad_rows

    init = (jnp.zeros(weight.shape, acc), jnp.zeros(weight.shape[:1], acc))
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
    out = _ltl(_pad_rows(rows, n_pad), weight, bias, _pad_rows(labels, n_pad, ignore_index), chunk_size,
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

    logp[n] = log_softmax(hidden[n] @ weightᵀ + bias)[labels[n]] (SPEC-MATH §1), 0 where
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
    _check_lm_head(func, hidden, weight, bias, names=("hidden", "weight", "bias"))
    _check_labels(func, "labels", labels, tuple(hidden.shape[:-1]))
    _check_values(func, {"hidden": hidden, "weight": weight, "bias": bias}, {"labels": labels}, weight.shape[0],
                  ignore_index)
    dtype = b.compute_dtype(hidden, weight, bias)
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
class NamedSequenceLoss:
    """A backend sequence loss by name with its options: hashable, so jit caches survive across calls.

    Called as ``loss(a, b, c, d, chosen_lengths=..., rejected_lengths=..., reduction=...)``;
    ``reference`` says whether it takes c, d (CPO and SimPO do not); ``lengths`` which lengths it takes.
    """

    name: str
    options: tuple[tuple[str, Any], ...] = ()
    reference: bool = True
    lengths: tuple[str, ...] = ("chosen_lengths", "rejected_lengths")

    def __call__(self, a, b_, c, d, *, chosen_lengths=None, rejected_lengths=None, reduction="mean"):
        fn = getattr(importlib.import_module("dpkd.backends.jax.sequence"), self.name)
        given = {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
        kw = {k: given[k] for k in self.lengths}
        refs = (c, d) if self.reference else ()
        return fn(a, b_, *refs, reduction=reduction, **kw, **dict(self.options))


@dataclass(frozen=True)
class _Plan:
    loss: Callable[..., PreferenceLoss]
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
    (loss, chosen_rewards, rejected_rewards); aux = (labels_c, labels_s, c, d, L_t, L_s) carries no gradient."""
    ig, k = plan.ignore_index, plan.pairs_per_chunk

    def run(chosen_hidden, rejected_hidden, weight, bias, aux):
        lab_c, lab_s, c, d, len_c, len_s = aux
        n_pairs, t_c, size = chosen_hidden.shape
        t_s = rejected_hidden.shape[1]
        n_pad = -n_pairs % k
        scale = 1.0 / n_pairs if plan.reduction == "mean" else 1.0
        live = _pad_rows(jnp.ones(n_pairs, chosen_hidden.dtype), n_pad)  # padding pairs get no gradient

        def chunks(x, fill=0):
            x = _pad_rows(x, n_pad, fill)
            return x.reshape(-1, k, *x.shape[1:])

        acc = _accum_dtype(weight.dtype)

        def step(carry, xs):
            grad_w, grad_b = carry
            h_c, h_s, l_c, l_s, c_k, d_k, lc_k, ls_k, live_k = xs
            # one product over both sides' rows (as the Torch backend: wider GEMMs run faster per row)
            rows = jnp.concatenate([h_c.reshape(-1, size), h_s.reshape(-1, size)])
            lab = jnp.concatenate([l_c.reshape(-1), l_s.reshape(-1)])
            logits = _project(rows, weight, bias)
            logp, lse = _chunk_logps(logits, lab, ig)
            a_k, b_k = logp[: k * t_c].reshape(k, t_c).sum(1), logp[k * t_c:].reshape(k, t_s).sum(1)

            def pair_losses(a_, b_):
                return plan.loss(a_, b_, c_k, d_k, chosen_lengths=lc_k, rejected_lengths=ls_k,
                                 reduction="none").loss.sum()

            da, db = jax.grad(pair_losses, argnums=(0, 1))(a_k, b_k)
            g = jnp.concatenate([jnp.repeat(scale * da * live_k, t_c), jnp.repeat(scale * db * live_k, t_s)])
            g = jnp.where(lab != ig, g, 0.0).astype(rows.dtype)
            probs = jnp.exp(logits - lse[:, None])
            grad_rows, dw, db_ = _logp_backprop(probs, rows, weight, jnp.where(lab != ig, lab, 0), g,
                                                with_bias=bias is not None)
            grad_w = grad_w + dw.astype(acc)
            if bias is not None:
                grad_b = grad_b + db_.astype(acc)
            return (grad_w, grad_b), (grad_rows[: k * t_c].reshape(k, t_c, size),
                                      grad_rows[k * t_c:].reshape(k, t_s, size), a_k, b_k)

        def optional_chunks(x, fill):  # None (no teacher, no lengths) stays None inside the scan
            return None if x is None else chunks(x, fill)

        # padding pairs: every label ignored, lengths 1 (no 0/0), and `live` = 0 so they get no gradient
        xs = (chunks(chosen_hidden), chunks(rejected_hidden), chunks(lab_c, ig), chunks(lab_s, ig),
              optional_chunks(c, 0), optional_chunks(d, 0), optional_chunks(len_c, 1), optional_chunks(len_s, 1),
              live.reshape(-1, k))
        init = (jnp.zeros(weight.shape, acc), jnp.zeros(weight.shape[:1], acc))
        (grad_w, grad_b), (g_c, g_s, a, b_) = jax.lax.scan(step, init, xs)
        a, b_ = a.reshape(-1)[:n_pairs], b_.reshape(-1)[:n_pairs]
        result = plan.loss(a, b_, c, d, chosen_lengths=len_c, rejected_lengths=len_s, reduction=plan.reduction)
        grads = (g_c.reshape(-1, t_c, size)[:n_pairs], g_s.reshape(-1, t_s, size)[:n_pairs],
                 grad_w.astype(weight.dtype), None if bias is None else grad_b.astype(bias.dtype))
        return tuple(result), grads

    @jax.custom_vjp
    def loss_fn(chosen_hidden, rejected_hidden, weight, bias, aux):
        return run(chosen_hidden, rejected_hidden, weight, bias, aux)[0]

    def fwd(chosen_hidden, rejected_hidden, weight, bias, aux):
        out, grads = run(chosen_hidden, rejected_hidden, weight, bias, aux)
        return out, (grads, aux)

    def bwd(res, cotangents):
        (g_c, g_s, g_w, g_b), aux = res
        g = cotangents[0]  # rewards are detached outputs: their cotangents are dropped
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
        b_ = _sequence_sums(rejected_hidden, weight, bias, lab_s, plan)
        out = plan.loss(a, b_, c, d, chosen_lengths=len_c, rejected_lengths=len_s, reduction=plan.reduction)
        return tuple(out)
    return _single_pass_cached(plan)(chosen_hidden, rejected_hidden, weight, bias,
                                     (lab_c, lab_s, c, d, len_c, len_s))


def fused_sequence_loss(
    loss: Callable[..., PreferenceLoss],
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
) -> PreferenceLoss:
    """Any sequence-level loss on the student's lm_head; see ``dpkd.backends.torch.fused.fused_sequence_loss``.

    a, b = the summed student log-probs of the chosen (teacher-output) and rejected (student-output) rows,
    c, d the teacher's; returns ``loss(a, b, c, d, chosen_lengths=, rejected_lengths=, reduction=)``
    (lengths = token counts when ``use_lengths``). ``loss`` must be hashable (a ``NamedSequenceLoss`` or a
    module-level function) because it is a static argument of the jitted computation, and elementwise over
    pairs under reduction="none". mode "auto" takes the single pass (3 GEMMs) when the loss is reduced and
    one pair (T_c + T_s rows) fits ``chunk_size``, else two passes over ``linear_token_logps``.
    Shapes: chosen_hidden [B, T_c, H], rejected_hidden [B, T_s, H], weight [V, H], labels [B, T_c] /
    [B, T_s]; teacher ``TeacherLMHead`` (H_t may differ) or ``TeacherLogps``; the teacher gets no gradient.
    """
    v.check_reduction(func, reduction)
    v.check_choice(func, "mode", mode, ("auto", "single_pass", "two_pass"))
    if mode == "single_pass" and reduction == "none":
        v.fail(func, "mode", "'single_pass' needs a reduced loss (reduction 'mean' or 'sum'); use 'two_pass'")
    size = v.check_chunk_options(func, chunk_size, ignore_index)
    for name, t in (("chosen_hidden", chosen_hidden), ("rejected_hidden", rejected_hidden)):
        if t.ndim != 3:
            v.fail(func, name, f"must have shape [B, T, H], got {tuple(t.shape)}")
    _check_lm_head(func, chosen_hidden, weight, bias, names=("chosen_hidden", "weight", "bias"))
    _check_lm_head(func, rejected_hidden, weight, bias, names=("rejected_hidden", "weight", "bias"))
    if rejected_hidden.shape[0] != chosen_hidden.shape[0]:
        v.fail(func, "rejected_hidden", f"has {rejected_hidden.shape[0]} pairs but `chosen_hidden` has "
                                        f"{chosen_hidden.shape[0]}")
    _check_labels(func, "chosen_labels", chosen_labels, tuple(chosen_hidden.shape[:2]))
    _check_labels(func, "rejected_labels", rejected_labels, tuple(rejected_hidden.shape[:2]))
    vocab = weight.shape[0]
    floats: dict[str, Any] = {"chosen_hidden": chosen_hidden, "rejected_hidden": rejected_hidden, "weight": weight,
                              "bias": bias}
    dtype = b.compute_dtype(chosen_hidden, weight, bias)
    if teacher is None:
        if teacher_required:
            v.fail(func, "teacher", "is required: pass TeacherLMHead(chosen_hidden, rejected_hidden, weight) or "
                                    "TeacherLogps(chosen, rejected) (or reference_free=True)")
        kind, teacher_arrays = "none", None
    elif isinstance(teacher, TeacherLogps):
        for name, t in (("teacher.chosen", teacher.chosen), ("teacher.rejected", teacher.rejected)):
            v.check_floating_dtype(func, name, bool(jnp.issubdtype(t.dtype, jnp.floating)), t.dtype)
            if tuple(t.shape) != tuple(chosen_hidden.shape[:1]):
                v.fail(func, name, f"has shape {tuple(t.shape)}, expected {tuple(chosen_hidden.shape[:1])} "
                                   "(one per pair)")
            floats[name] = t
        kind, teacher_arrays = "logps", (teacher.chosen, teacher.rejected)
    elif isinstance(teacher, TeacherLMHead):
        if teacher.weight.ndim == 2:
            v.check_same_vocab(func, "teacher.weight", teacher.weight.shape[0], "weight", vocab)
        _check_lm_head(func, teacher.chosen_hidden, teacher.weight, teacher.bias,
                       lead=tuple(chosen_hidden.shape[:2]),
                       names=("teacher.chosen_hidden", "teacher.weight", "teacher.bias"))
        _check_lm_head(func, teacher.rejected_hidden, teacher.weight, teacher.bias,
                       lead=tuple(rejected_hidden.shape[:2]),
                       names=("teacher.rejected_hidden", "teacher.weight", "teacher.bias"))
        for name in ("chosen_hidden", "rejected_hidden", "weight", "bias"):
            floats[f"teacher.{name}"] = getattr(teacher, name)
        tb = None if teacher.bias is None else teacher.bias.astype(dtype)
        kind = "lm_head"
        teacher_arrays = (teacher.chosen_hidden.astype(dtype), teacher.rejected_hidden.astype(dtype),
                          teacher.weight.astype(dtype), tb)
    else:
        v.fail(func, "teacher", f"must be a TeacherLMHead or TeacherLogps, got {type(teacher).__name__}")
    _check_values(func, floats, {"chosen_labels": chosen_labels, "rejected_labels": rejected_labels}, vocab,
                  ignore_index)

    rows_per_pair = chosen_hidden.shape[1] + rejected_hidden.shape[1]
    size = size or auto_chunk_size(vocab, n_rows=chosen_hidden.shape[0] * rows_per_pair,
                                   itemsize=np.dtype(dtype).itemsize)
    if mode == "auto":
        mode = "single_pass" if reduction != "none" and rows_per_pair <= size else "two_pass"
    plan = _Plan(loss=loss, reduction=reduction, mode=mode, chunk_size=size,
                 pairs_per_chunk=max(1, min(size // rows_per_pair, chosen_hidden.shape[0])),
                 ignore_index=int(ignore_index), teacher=kind, use_lengths=use_lengths)
    out = _fused_sequence_jit(chosen_hidden.astype(dtype), rejected_hidden.astype(dtype), weight.astype(dtype),
                              None if bias is None else bias.astype(dtype), chosen_labels, rejected_labels,
                              teacher_arrays, plan=plan)
    return PreferenceLoss(out[0], jax.lax.stop_gradient(out[1]), jax.lax.stop_gradient(out[2]))


def _options(**kw: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(kw.items()))


def fused_dpkd_loss(
    chosen_hidden: jax.Array, rejected_hidden: jax.Array, weight: jax.Array,
    chosen_labels: jax.Array, rejected_labels: jax.Array, *,
    teacher: TeacherLMHead | TeacherLogps | None = None, bias: jax.Array | None = None,
    length_normalize: bool = False, beta: float = 0.1, label_smoothing: float = 0.0,
    reference_free: bool = False, reduction: str = "mean", chunk_size: int | None = None, mode: str = "auto",
    ignore_index: int = -100,
) -> PreferenceLoss:
    """Sequence-level DPKD (SPEC-MATH Eq. 8; Eq. 9 with ``length_normalize``) on the student's lm_head.

    ℓ = (1−ε)·softplus(−βh) + ε·softplus(βh), h = (a − c)[/L_t] − (b − d)[/L_s] (policy = student,
    reference = teacher, chosen = teacher output y_t, rejected = student output y_s; L = token counts).
    Same value and gradients as ``dpkd_loss`` on materialised logits; arguments as ``fused_sequence_loss``.

    Example:
        >>> B, T, H, V = 2, 5, 8, 11
        >>> lab = jnp.zeros((B, T), jnp.int32)
        >>> out = fused_dpkd_loss(jnp.ones((B, T, H)), jnp.ones((B, T, H)), jnp.ones((V, H)), lab, lab,
        ...                       teacher=TeacherLogps(jnp.full(B, -9.0), jnp.full(B, -12.0)))
        >>> out.loss.shape
        ()
    """
    loss = NamedSequenceLoss("dpkd_loss", _options(beta=beta, label_smoothing=label_smoothing,
                                                   reference_free=reference_free))
    return fused_sequence_loss(loss, chosen_hidden, rejected_hidden, weight, chosen_labels, rejected_labels,
                               bias=bias, teacher=teacher, teacher_required=not reference_free,
                               use_lengths=length_normalize, reduction=reduction, chunk_size=chunk_size, mode=mode,
                               ignore_index=ignore_index, func="fused_dpkd_loss")


def fused_ipo_loss(
    chosen_hidden: jax.Array, rejected_hidden: jax.Array, weight: jax.Array,
    chosen_labels: jax.Array, rejected_labels: jax.Array, *,
    teacher: TeacherLMHead | TeacherLogps | None = None, bias: jax.Array | None = None,
    tau: float = 0.1, length_normalize: bool = True, reduction: str = "mean", chunk_size: int | None = None,
    mode: str = "auto", ignore_index: int = -100,
) -> PreferenceLoss:
    """IPO, ℓ = (h − 1/(2τ))², length-normalised h by default (as ``ipo_loss``)."""
    loss = NamedSequenceLoss("ipo_loss", _options(tau=tau, length_normalize=length_normalize),
                             lengths=("chosen_lengths", "rejected_lengths") if length_normalize else ())
    return fused_sequence_loss(loss, chosen_hidden, rejected_hidden, weight, chosen_labels, rejected_labels,
                               bias=bias, teacher=teacher, use_lengths=length_normalize, reduction=reduction,
                               chunk_size=chunk_size, mode=mode, ignore_index=ignore_index, func="fused_ipo_loss")


def fused_cpo_loss(
    chosen_hidden: jax.Array, rejected_hidden: jax.Array, weight: jax.Array,
    chosen_labels: jax.Array, rejected_labels: jax.Array, *, bias: jax.Array | None = None,
    beta: float = 0.1, nll_weight: float = 1.0, length_normalize: bool = False, label_smoothing: float = 0.0,
    reduction: str = "mean", chunk_size: int | None = None, mode: str = "auto", ignore_index: int = -100,
) -> PreferenceLoss:
    """CPO (reference-free): z = β(a − b), plus the chosen NLL (÷ L_t with ``length_normalize``)."""
    loss = NamedSequenceLoss("cpo_loss", _options(beta=beta, nll_weight=nll_weight, label_smoothing=label_smoothing),
                             reference=False, lengths=("chosen_lengths",) if length_normalize else ())
    return fused_sequence_loss(loss, chosen_hidden, rejected_hidden, weight, chosen_labels, rejected_labels,
                               bias=bias, teacher=None, teacher_required=False, use_lengths=length_normalize,
                               reduction=reduction, chunk_size=chunk_size, mode=mode, ignore_index=ignore_index,
                               func="fused_cpo_loss")


def fused_simpo_loss(
    chosen_hidden: jax.Array, rejected_hidden: jax.Array, weight: jax.Array,
    chosen_labels: jax.Array, rejected_labels: jax.Array, *, bias: jax.Array | None = None,
    beta: float = 2.0, gamma: float = 1.0, label_smoothing: float = 0.0, reduction: str = "mean",
    chunk_size: int | None = None, mode: str = "auto", ignore_index: int = -100,
) -> PreferenceLoss:
    """SimPO (reference-free): z = βa/L_t − βb/L_s − γ with token-count lengths."""
    loss = NamedSequenceLoss("simpo_loss", _options(beta=beta, gamma=gamma, label_smoothing=label_smoothing),
                             reference=False)
    return fused_sequence_loss(loss, chosen_hidden, rejected_hidden, weight, chosen_labels, rejected_labels,
                               bias=bias, teacher=None, teacher_required=False, use_lengths=True,
                               reduction=reduction, chunk_size=chunk_size, mode=mode, ignore_index=ignore_index,
                               func="fused_simpo_loss")


def fused_dpop_loss(
    chosen_hidden: jax.Array, rejected_hidden: jax.Array, weight: jax.Array,
    chosen_labels: jax.Array, rejected_labels: jax.Array, *,
    teacher: TeacherLMHead | TeacherLogps | None = None, bias: jax.Array | None = None,
    beta: float = 0.1, lambda_: float = 50.0, form: str = "smaug", reduction: str = "mean",
    chunk_size: int | None = None, mode: str = "auto", ignore_index: int = -100,
) -> PreferenceLoss:
    """DPOP (Smaug): penalty λ·max(0, c − a) on the summed h (as ``dpop_loss``)."""
    loss = NamedSequenceLoss("dpop_loss", _options(beta=beta, lambda_=lambda_, form=form), lengths=())
    return fused_sequence_loss(loss, chosen_hidden, rejected_hidden, weight, chosen_labels, rejected_labels,
                               bias=bias, teacher=teacher, reduction=reduction, chunk_size=chunk_size, mode=mode,
                               ignore_index=ignore_index, func="fused_dpop_loss")
