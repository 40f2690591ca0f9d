"""The fused, token-chunked lm_head path of the JAX backend: the token-level losses (the sequence-level ones
and ``linear_token_logps`` are in ``fused.py``; the per-chunk math in ``_lm_head.py``).

The same names, arguments and error messages as the Torch backend's ``fused_token.py``
(``fused_token_loss``, ``fused_dpkd_token_loss``, ``fused_forward_kl``, ``fused_reverse_kl``,
``fused_generalized_jsd``, ``fused_akl``, ``fused_cross_entropy``). These losses need the whole student and
teacher distributions at the same positions, so for every chunk of token rows the student logits
S = hidden @ Wᵀ (+b) and the teacher logits T = teacher_hidden @ W_tᵀ (+b_t) are formed together and the
backend's own per-token formula (``dpkd.backends.jax.token`` / ``.distill`` under reduction="none", named by
a ``NamedTokenLoss``) runs on that chunk; the formulas are never re-written here.

Memory: a ``jax.custom_vjp`` over the per-token values m·ℓ [N]. Its forward maps over the chunks
(``lax.map``) and keeps only its inputs; its backward scans over the chunks again (``lax.scan``),
recomputing both logit chunks and taking the VJP of the per-token formula on the chunk, then
grad_hidden = G @ W, grad_weight += Gᵀ @ hidden, grad_bias += Σ G (float32 or wider). Live logits are
about ``chunk × V`` whatever N is; [N, V] is never stored. The reduction (Σ m·ℓ / (normalizer or Σ m),
Σ m·ℓ, or m·ℓ) is taken on those per-token values, as the unfused functions do. The teacher is frozen
(no gradient), and its hidden size H_t may differ from the student's H.
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
from dpkd.spec.fused import NamedTokenLoss, auto_chunk_size
from dpkd.spec.results import TokenPreferenceLoss

from . import _base, distill, token
from ._lm_head import accum_dtype, add_weight_grad, describe, pad_rows, project
from ._token_kernels import ChunkResult, TokenKernel, token_kernel

__all__ = [
    "TOKEN_LOSS_BUFFERS",
    "RowLoss",
    "NamedTokenLoss",
    "fused_token_loss",
    "fused_dpkd_token_loss",
    "fused_forward_kl",
    "fused_reverse_kl",
    "fused_generalized_jsd",
    "fused_akl",
    "fused_cross_entropy",
]

#: ``row_loss(student_logits [C, V], teacher_logits [C, V] | None, target [C])`` → (m·ℓ [C], extras: a dict
#: of per-token [C] arrays, no gradient). ``target`` is the mask chunk (the labels chunk for cross entropy).
#: It is a static argument of the jitted computation: pass a hashable callable so that the compiled code
#: is reused across calls.
RowLoss = Callable[[jax.Array, jax.Array | None, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]

#: [chunk, V] arrays the default chunk of a named token loss budgets for: the student's logits (rewritten
#: into the gradient) and the teacher's, plus one for what XLA keeps beside them (a dense-gradient kernel's
#: [chunk, V] result). Without a teacher one more, not one fewer: the materialised loss then holds only the
#: logits and their gradient, so the same share of it leaves room for fewer rows. Measured with XLA's
#: memory analysis at N=4096, H=512, V=32000 (benchmarks/RESULTS.md): three buffers (160 rows) put the
#: teacher losses at ≤ 0.09 × the materialised loss's bytes, four (128 rows) cross entropy at 0.099 (at 160
#: rows it was 0.103, when the [N, H] rows sorted counted-first and their gradients added a fixed ~16 MiB;
#: since the rows are gathered chunk by chunk, four buffers give cross entropy 0.084 — three not re-measured).
TOKEN_LOSS_BUFFERS = 3

#: Rows per kernel block (at most; a divisor of the chunk), as in the Torch backend.
BLOCK_ROWS = 16

# ... of a caller's own RowLoss (its VJP's temporaries too), as the Torch backend counts them.
_ROW_LOSS_BUFFERS = 8


@dataclass(frozen=True)
class _NamedRowLoss:
    """A ``NamedTokenLoss`` bound to this backend's function, as a hashable ``RowLoss``. For the token-level
    DPKD (a TokenPreferenceLoss) the extras are the per-token agreement 1[argmax S = argmax T]·m and the
    chosen/rejected rewards."""

    loss: Callable[..., Any]

    def __call__(self, s: jax.Array, t: jax.Array | None, target: jax.Array
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        out = self.loss(s, t, target)
        if not isinstance(out, TokenPreferenceLoss):
            return out, {}
        agree = (jnp.argmax(jax.lax.stop_gradient(s), -1) == jnp.argmax(t, -1)) & (target != 0)
        return out.loss, {"agree": agree.astype(s.dtype), "chosen": out.chosen_rewards,
                          "rejected": out.rejected_rewards}


def _row_loss(func: str, row_loss: NamedTokenLoss | RowLoss) -> RowLoss:
    bound = contract.token_loss_function(func, row_loss, token, distill)
    return row_loss if bound is None else _NamedRowLoss(bound)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# The chunked per-token values: a custom_vjp whose backward recomputes each chunk's logits


def _chunked(x: jax.Array | None, k: int) -> jax.Array | None:
    return None if x is None else x.reshape(k, -1, *x.shape[1:])


def _teacher_logits(teacher_rows: jax.Array | None, teacher_weight: jax.Array | None,
                    teacher_bias: jax.Array | None) -> jax.Array | None:
    if teacher_rows is None:
        return None
    return jax.lax.stop_gradient(project(teacher_rows, teacher_weight, teacher_bias))


def _rows_forward(row_loss: RowLoss, chunk_size: int, rows, weight, bias, aux):
    """(m·ℓ [N], extras [N]) over chunks of ``chunk_size`` rows (N a multiple of it)."""
    t_rows, t_weight, t_bias, target = aux
    n = rows.shape[0]
    k = n // chunk_size

    def body(xs):
        rows_k, t_rows_k, target_k = xs
        return row_loss(project(rows_k, weight, bias), _teacher_logits(t_rows_k, t_weight, t_bias), target_k)

    per_row, extras = jax.lax.map(body, (_chunked(rows, k), _chunked(t_rows, k), _chunked(target, k)))
    return per_row.reshape(n), {key: jax.lax.stop_gradient(x.reshape(n)) for key, x in extras.items()}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _token_rows(row_loss: RowLoss, chunk_size: int, rows, weight, bias, aux):
    return _rows_forward(row_loss, chunk_size, rows, weight, bias, aux)


def _token_rows_fwd(row_loss, chunk_size, rows, weight, bias, aux):
    # only the inputs are kept: the backward recomputes the logits chunk by chunk
    return _rows_forward(row_loss, chunk_size, rows, weight, bias, aux), (rows, weight, bias, aux)


def _token_rows_bwd(row_loss, chunk_size, res, cotangents):
    rows, weight, bias, aux = res
    g = cotangents[0]  # the extras carry no gradient: their cotangents are dropped
    t_rows, t_weight, t_bias, target = aux
    n, size = rows.shape
    k = n // chunk_size
    acc = accum_dtype(weight.dtype)

    def step(carry, xs):
        grad_w, grad_b = carry
        rows_k, t_rows_k, target_k, g_k = xs
        teacher = _teacher_logits(t_rows_k, t_weight, t_bias)
        _, vjp = jax.vjp(lambda s: row_loss(s, teacher, target_k)[0], project(rows_k, weight, bias))
        (dlogits,) = vjp(g_k.astype(rows.dtype))
        grad_w = add_weight_grad(grad_w, dlogits, rows_k)
        grad_b = grad_b + dlogits.sum(0).astype(acc)
        return (grad_w, grad_b), dlogits @ weight

    init = (jnp.zeros(weight.shape, acc), jnp.zeros(weight.shape[:1], acc))
    xs = (_chunked(rows, k), _chunked(t_rows, k), _chunked(target, k), _chunked(g, k))
    (grad_w, grad_b), grad_h = jax.lax.scan(step, init, xs)
    grad_bias = None if bias is None else grad_b.astype(bias.dtype)
    return grad_h.reshape(n, size), grad_w.astype(weight.dtype), grad_bias, jax.tree_util.tree_map(lambda _: None, aux)


_token_rows.defvjp(_token_rows_fwd, _token_rows_bwd)


@functools.partial(jax.jit, static_argnames=("row_loss", "chunk_size", "pad_target"))
def _token_rows_jit(rows, weight, bias, teacher_rows, teacher_weight, teacher_bias, target, *,
                    row_loss: RowLoss, chunk_size: int, pad_target: int):
    """``_token_rows`` on rows padded to a multiple of ``chunk_size`` (padding rows: target ``pad_target``,
    i.e. mask 0 or ignore_index, so they contribute 0 and get no gradient); outputs cut back to N."""
    n = rows.shape[0]
    n_pad = -n % chunk_size
    aux = (None if teacher_rows is None else jax.lax.stop_gradient(pad_rows(teacher_rows, n_pad)),
           None if teacher_weight is None else jax.lax.stop_gradient(teacher_weight),
           None if teacher_bias is None else jax.lax.stop_gradient(teacher_bias),
           pad_rows(target, n_pad, pad_target))
    per_row, extras = _token_rows(row_loss, chunk_size, pad_rows(rows, n_pad), weight, bias, aux)
    return per_row[:n], {key: x[:n] for key, x in extras.items()}


# --------------------------------------------------------------------------------------------------
# Named losses: chunk kernels (_token_kernels.py), the loss and its gradient in one scan


def kernel_chunk_size(vocab_size: int, *, n_rows: int, itemsize: int, teacher: bool) -> int:
    """The default rows per chunk of a named token loss: ``TOKEN_LOSS_BUFFERS`` [chunk, V] arrays (one more
    without a teacher) in the byte budget, rounded down to whole kernel blocks."""
    size = auto_chunk_size(vocab_size, n_rows=n_rows, itemsize=itemsize,
                           buffers=TOKEN_LOSS_BUFFERS if teacher else TOKEN_LOSS_BUFFERS + 1)
    return size - size % BLOCK_ROWS if size > BLOCK_ROWS else size


def block_rows(chunk_size: int) -> int:
    """Rows per kernel block: the largest divisor of the chunk up to ``BLOCK_ROWS``."""
    return next(b for b in range(min(BLOCK_ROWS, chunk_size), 0, -1) if chunk_size % b == 0)


def _blocked(kernel: TokenKernel, s, t, labels, f) -> ChunkResult:
    """``kernel`` over blocks of a few rows of one chunk, in a loop that rewrites the logits ``s`` block by
    block into the chunk's gradient (dense part × ``f``; in place: XLA updates a loop-carried buffer
    without a copy). A block's passes stay in cache and its temporaries are [block, V], where one kernel
    call on the whole chunk keeps several [chunk, V] temporaries and streams each from memory."""
    c = s.shape[0]
    b = block_rows(c)

    def piece(x, i):
        return None if x is None else jax.lax.dynamic_slice_in_dim(x, i * b, b)

    shapes = jax.eval_shape(kernel, piece(s, 0), piece(t, 0), piece(labels, 0))
    rows_out = jax.tree_util.tree_map(lambda a: jnp.zeros((c, *a.shape[1:]), a.dtype),
                                      (shapes.loss, shapes.sparse, shapes.extras))

    def body(i, state):
        g, (loss, sparse, extras) = state
        res = kernel(piece(g, i), piece(t, i), piece(labels, i))
        if res.dense is not None and f is not None:
            g = jax.lax.dynamic_update_slice_in_dim(g, (res.dense * piece(f, i)[:, None]).astype(g.dtype), i * b, 0)
        out = jax.tree_util.tree_map(lambda whole, part: jax.lax.dynamic_update_slice_in_dim(whole, part, i * b, 0),
                                     (loss, sparse, extras), (res.loss, res.sparse, res.extras))
        return g, out

    g, (loss, sparse, extras) = jax.lax.fori_loop(0, c // b, body, (s, rows_out))
    return ChunkResult(loss, g if shapes.dense is not None else None, sparse, extras)


def _kernel_chunks(kernel: TokenKernel, chunk_size: int, rows, weight, bias, aux, factor):
    """(ℓ·live [P], extras [P], gradients of Σ factor·ℓ or None) over chunks of ``chunk_size`` rows.

    ``rows`` [N, H] and the teacher rows [N, H_t] are in the caller's order; ``aux`` = (order [P], teacher
    rows, weight, bias, labels, live [P] 0/1, n_live), all but the rows in ``order``: the counted rows first,
    then the others, then padding (index N), so a chunk past ``n_live`` holds none and is skipped. Each
    chunk gathers its rows and scatters its gradient into grad_hidden (carried, [N, H]): sorted copies of
    the rows and of their gradient would be [N, H]-sized arrays that grow with N. ``factor`` [P] or None."""
    order, t_rows, t_weight, t_bias, labels, live, n_live = aux
    k = order.shape[0] // chunk_size
    tau = kernel.temperature
    acc = accum_dtype(weight.dtype)

    def compute(carry, xs):
        grad_h, grad_w, grad_b = carry
        _, order_k, lab_k, live_k, f_k = xs
        rows_k = jnp.take(rows, order_k, axis=0, mode="fill", fill_value=0)
        t_k = None if t_rows is None else jnp.take(t_rows, order_k, axis=0, mode="fill", fill_value=0)
        s = project(rows_k, weight, bias) / tau  # as the unfused losses divide
        t = None if t_k is None else jax.lax.stop_gradient(project(t_k, t_weight, t_bias)) / tau
        f = None if f_k is None else (f_k * live_k / tau).astype(rows.dtype)  # d(S/τ)/dS = 1/τ
        res = _blocked(kernel, s, t, lab_k, f)
        out = (res.loss * live_k, {key: x * live_k for key, x in res.extras.items()})
        if f is None:
            return carry, out
        grad_rows = jnp.zeros_like(rows_k)
        if res.dense is not None:
            g = res.dense  # already f-scaled, in the logits' buffer
            grad_rows = g @ weight
            grad_w = add_weight_grad(grad_w, g, rows_k)
            if bias is not None:
                grad_b = grad_b + g.sum(0).astype(acc)
        for index, coef in res.sparse:
            c = coef * f
            grad_rows = grad_rows + c[:, None] * weight[index]
            grad_w = grad_w.at[index].add((c[:, None] * rows_k).astype(acc))
            if bias is not None:
                grad_b = grad_b.at[index].add(c.astype(acc))
        grad_h = grad_h.at[order_k].set(grad_rows.astype(grad_h.dtype), mode="drop")  # padding: index N, dropped
        return (grad_h, grad_w, grad_b), out

    def step(carry, xs):
        shapes = jax.eval_shape(compute, carry, xs)[1]

        def skip(carry, _):  # a chunk of padding and uncounted rows only
            return carry, jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

        return jax.lax.cond(xs[0] * chunk_size < n_live, compute, skip, carry, xs)

    init = (None if factor is None else jnp.zeros_like(rows), jnp.zeros(weight.shape, acc),
            jnp.zeros(weight.shape[:1], acc))
    xs = (jnp.arange(k), _chunked(order, k), _chunked(labels, k), _chunked(live, k), _chunked(factor, k))
    (grad_h, grad_w, grad_b), (loss, extras) = jax.lax.scan(step, init, xs)
    extras = {key: jax.lax.stop_gradient(x.reshape(-1)) for key, x in extras.items()}
    if factor is None:
        return loss.reshape(-1), extras, None
    grads = (grad_h, grad_w.astype(weight.dtype), None if bias is None else grad_b.astype(bias.dtype))
    return loss.reshape(-1), extras, grads


def _no_cotangent(aux):
    return jax.tree_util.tree_map(lambda _: None, aux)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _kernel_rows(kernel, chunk_size, rows, weight, bias, aux):
    """ℓ per row (0 off the counted rows) and extras; the backward scans again with the upstream values."""
    return _kernel_chunks(kernel, chunk_size, rows, weight, bias, aux, None)[:2]


def _kernel_rows_fwd(kernel, chunk_size, rows, weight, bias, aux):
    return _kernel_chunks(kernel, chunk_size, rows, weight, bias, aux, None)[:2], (rows, weight, bias, aux)


def _kernel_rows_bwd(kernel, chunk_size, res, cotangents):
    rows, weight, bias, aux = res
    grads = _kernel_chunks(kernel, chunk_size, rows, weight, bias, aux, cotangents[0])[2]
    return (*grads, _no_cotangent(aux))


_kernel_rows.defvjp(_kernel_rows_fwd, _kernel_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _kernel_total(kernel, chunk_size, rows, weight, bias, aux, factor):
    """Σ factor·ℓ (the reduced loss) and extras, its gradient formed in the same scan (3 GEMMs + the
    teacher's, none for the sigmoid/IPO token DPKD); the backward only scales it."""
    loss, extras, _ = _kernel_chunks(kernel, chunk_size, rows, weight, bias, aux, factor)
    return jnp.sum(loss * factor), extras


def _kernel_total_fwd(kernel, chunk_size, rows, weight, bias, aux, factor):
    loss, extras, grads = _kernel_chunks(kernel, chunk_size, rows, weight, bias, aux, factor)
    return (jnp.sum(loss * factor), extras), grads


def _kernel_total_bwd(kernel, chunk_size, grads, cotangents):
    g = cotangents[0]  # the extras carry no gradient
    scaled = tuple(None if x is None else (g * x).astype(x.dtype) for x in grads)
    return (*scaled, None, None)


_kernel_total.defvjp(_kernel_total_fwd, _kernel_total_bwd)


@functools.partial(jax.jit, static_argnames=("kernel", "chunk_size", "target_is_labels", "ignore_index",
                                             "reduced"))
def _kernel_jit(rows, weight, bias, teacher_rows, teacher_weight, teacher_bias, target, denominator, *,
                kernel: TokenKernel, chunk_size: int, target_is_labels: bool, ignore_index: int, reduced: bool):
    """The named loss over the counted rows (mask ≠ 0 / label ≠ ignore_index), moved first by a stable
    sort so that chunks past them are skipped; outputs back in the caller's order, cut to N.

    reduced: (Σ ℓ / denominator, extras); else (ℓ per row, extras)."""
    n = rows.shape[0]
    counted = (target != ignore_index) if target_is_labels else (target != 0)
    order = jnp.argsort(~counted, stable=True)
    n_pad = -n % chunk_size
    live = pad_rows(counted[order].astype(rows.dtype), n_pad)
    labels = pad_rows(jnp.where(counted, target, 0)[order], n_pad, 0) if target_is_labels else None
    t_rows = None
    if kernel.teacher:
        t_rows = jax.lax.stop_gradient(teacher_rows)
    else:
        teacher_weight = teacher_bias = None
    aux = (pad_rows(order, n_pad, n), t_rows, None if teacher_weight is None else jax.lax.stop_gradient(teacher_weight),
           None if teacher_bias is None else jax.lax.stop_gradient(teacher_bias), labels, live, jnp.sum(counted))

    def unsort(x):
        return jnp.zeros((n,), x.dtype).at[order].set(x[:n])

    if reduced:
        factor = jnp.broadcast_to(1.0 / denominator, live.shape).astype(rows.dtype)
        total, extras = _kernel_total(kernel, chunk_size, rows, weight, bias, aux, factor)
        return total, {key: unsort(x) for key, x in extras.items()}
    per_row, extras = _kernel_rows(kernel, chunk_size, rows, weight, bias, aux)
    return unsort(per_row), {key: unsort(x) for key, x in extras.items()}


def _check_kernel_options(func: str, row_loss: NamedTokenLoss, dtype: Any, target_is_labels: bool) -> None:
    """The named loss's own option checks (its messages, its order), run once on a one-row input: the
    kernels take the options as given."""
    bound = contract.token_loss_function(func, row_loss, token, distill)
    logits = jnp.zeros((1, 2), dtype)
    target = jnp.zeros((1,), jnp.int32) if target_is_labels else jnp.ones((1,))
    with v.reported_as(func, {**contract.TOKEN_ARGUMENTS, "logits": "hidden"}):
        bound(logits, logits, target)


# --------------------------------------------------------------------------------------------------
# The driver


def fused_token_loss(
    row_loss: NamedTokenLoss | RowLoss,
    student_hidden: jax.Array,
    weight: jax.Array,
    target: jax.Array,
    *,
    teacher_hidden: jax.Array | None = None,
    teacher_weight: jax.Array | None = None,
    bias: jax.Array | None = None,
    teacher_bias: jax.Array | None = None,
    normalizer: float | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    target_is_labels: bool = False,
    ignore_index: int = -100,
    func: str = "fused_token_loss",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """A token-level loss Σ_t m_t ℓ_t / (normalizer or Σ m) computed over token chunks of the lm_heads (the
    Torch backend's ``fused_token_loss``: the same arguments, result and errors).

    For every chunk the student logits S = hidden @ Wᵀ (+b) and the teacher logits T = teacher_hidden @ W_tᵀ
    (+b_t, no gradient) are formed together and ``row_loss(S, T, target_chunk)`` (the backend's per-token
    formula under reduction="none") gives m·ℓ per row; the backward recomputes each chunk (see the module
    docstring). mean = Σ m·ℓ / (normalizer or Σ m) (an empty mean is an error), sum = Σ m·ℓ, none = m·ℓ.

    Args:
        row_loss: ``NamedTokenLoss("forward_kl", {"temperature": 2.0})`` (this backend's token loss of that
            name with those options), or a hashable ``RowLoss`` callable.
        student_hidden: [..., H]; weight: [V, H]; target: [...] mask (or labels if ``target_is_labels``).
        teacher_hidden: [..., H_t]; teacher_weight: [V, H_t] (same vocabulary); both optional for losses
            that need no teacher (cross entropy).  bias / teacher_bias: optional [V].
        normalizer, reduction: as ``dpkd_token_loss``.  chunk_size: token rows per chunk (default from a
            64 MiB budget).  ignore_index: the labels' ignored value (``target_is_labels``).
        func: the name errors carry (the public wrapper's).
    Returns:
        (loss — scalar, or [...] under "none"; extras — per-token outputs of ``row_loss``, [...], no gradient).

    Example:
        >>> h, w, m = jnp.ones((6, 4)), jnp.ones((10, 4)), jnp.ones(6)
        >>> loss, _ = fused_token_loss(NamedTokenLoss("forward_kl"), h, w, m, teacher_hidden=h, teacher_weight=w)
        >>> float(loss)
        0.0
    """
    return _fused_token(row_loss, student_hidden, weight, target, teacher_hidden=teacher_hidden,
                        teacher_weight=teacher_weight, bias=bias, teacher_bias=teacher_bias, normalizer=normalizer,
                        reduction=reduction, chunk_size=chunk_size, target_is_labels=target_is_labels,
                        ignore_index=ignore_index, func=func, hidden_name="student_hidden")


def _fused_token(row_loss: NamedTokenLoss | RowLoss, student_hidden: jax.Array, weight: jax.Array,
                 target: jax.Array, *, teacher_hidden: jax.Array | None, teacher_weight: jax.Array | None,
                 bias: jax.Array | None, teacher_bias: jax.Array | None, normalizer: float | None, reduction: str,
                 chunk_size: int | None, target_is_labels: bool, ignore_index: int, func: str,
                 hidden_name: str) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``fused_token_loss``, its student hidden states named ``hidden_name`` in errors."""
    v.check_reduction(func, reduction)
    normalizer = v.check_normalizer_option(func, normalizer, reduction)
    size = v.check_chunk_options(func, chunk_size, ignore_index)
    row_fn = _row_loss(func, row_loss)
    target_name = contract.check_token_call(
        func, describe, _base.ValueChecks(func), hidden_name=hidden_name, student_hidden=student_hidden,
        weight=weight, bias=bias, target=target, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
        teacher_bias=teacher_bias, target_is_labels=target_is_labels, ignore_index=ignore_index)
    lead = tuple(student_hidden.shape[:-1])
    dtype = _base.compute_dtype(student_hidden, weight, bias)
    flat_target = target.reshape(-1)
    count = jnp.sum(flat_target != ignore_index) if target_is_labels else jnp.sum(flat_target != 0)
    if reduction == "mean" and normalizer is None:
        _base.value_check(count > 0, lambda: v.check_nonempty(func, target_name, 0.0))
    rows = student_hidden.reshape(-1, student_hidden.shape[-1]).astype(dtype)
    n = rows.shape[0]
    kernel = token_kernel(row_loss.name, row_loss.options) if isinstance(row_loss, NamedTokenLoss) else None
    if kernel is not None and n > 0:
        _check_kernel_options(func, row_loss, dtype, target_is_labels)
        if not size:  # the byte budget, rounded down to whole blocks
            size = kernel_chunk_size(weight.shape[0], n_rows=n, itemsize=np.dtype(dtype).itemsize,
                                     teacher=kernel.teacher)
        teacher = (None, None, None)
        if teacher_hidden is not None:
            teacher = (teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).astype(dtype),
                       teacher_weight.astype(dtype), None if teacher_bias is None else teacher_bias.astype(dtype))
        if reduction == "mean":
            denominator = jnp.asarray(float(normalizer) if normalizer is not None else count, dtype)
        else:
            denominator = jnp.ones((), dtype)
        out, extras = _kernel_jit(rows, weight.astype(dtype), None if bias is None else bias.astype(dtype),
                                  *teacher, flat_target, denominator, kernel=kernel, chunk_size=min(size, n),
                                  target_is_labels=target_is_labels, ignore_index=int(ignore_index),
                                  reduced=reduction != "none")
        extras = {key: x.reshape(lead) for key, x in extras.items()}
        return (out.reshape(lead) if reduction == "none" else out), extras
    if n == 0:  # nothing to chunk: the row loss of no rows (the empty sum, or [...] of zeros; empty extras)
        empty = jnp.zeros((0, weight.shape[0]), dtype)
        per_row, extras = row_fn(empty, None if teacher_hidden is None else empty, flat_target)
    else:
        size = size or auto_chunk_size(weight.shape[0], n_rows=n, itemsize=np.dtype(dtype).itemsize,
                                       buffers=_ROW_LOSS_BUFFERS)
        teacher = (None, None, None)
        if teacher_hidden is not None:
            teacher = (teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).astype(dtype),
                       teacher_weight.astype(dtype), None if teacher_bias is None else teacher_bias.astype(dtype))
        with v.reported_as(func, {**contract.TOKEN_ARGUMENTS, "logits": hidden_name}):
            per_row, extras = _token_rows_jit(rows, weight.astype(dtype), None if bias is None else bias.astype(dtype),
                                              *teacher, flat_target, row_loss=row_fn, chunk_size=min(size, n),
                                              pad_target=int(ignore_index) if target_is_labels else 0)
    extras = {key: x.reshape(lead) for key, x in extras.items()}
    if reduction == "none":
        return per_row.reshape(lead), extras
    total = jnp.sum(per_row)
    if reduction == "sum":
        return total, extras
    return total / (float(normalizer) if normalizer is not None else count.astype(dtype)), extras


def _named_wrapper(func: str, arguments: dict[str, Any]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The ``fused_token_loss`` call of the named wrapper ``func`` given its ``arguments`` (the same in every
    backend: ``dpkd.spec.fused.token_call``)."""
    loss, kwargs = contract.token_call(func, arguments)
    return _fused_token(loss, **kwargs)


def fused_dpkd_token_loss(
    student_hidden: jax.Array, weight: jax.Array, teacher_hidden: jax.Array,
    teacher_weight: jax.Array, mask: jax.Array, *, bias: jax.Array | None = None,
    teacher_bias: jax.Array | None = None, beta: float = 0.1, form: str = "sigmoid",
    label_smoothing: float = 0.0, reference_free: bool = False, lambda_: float = 50.0,
    normalizer: float | None = None, reduction: str = "mean", chunk_size: int | None = None,
) -> TokenPreferenceLoss:
    """``dpkd.spec.dpkd_token_loss`` (the released code's argmax preference) on the two lm_heads.

    The same value, rewards, agreement and student gradients as ``dpkd_token_loss`` on materialised logits
    (the teacher is frozen here). student_hidden [..., H], teacher_hidden [..., H_t], mask [...].

    Example:
        >>> h, w, m = jnp.ones((6, 4)), jnp.eye(10, 4), jnp.ones(6)
        >>> fused_dpkd_token_loss(h, w, h, w, m, chunk_size=4).agreement_rate.shape
        ()
    """
    out, extras = _named_wrapper("fused_dpkd_token_loss", locals())
    agreement = jnp.sum(extras["agree"]) / jnp.maximum(jnp.sum(mask != 0), 1)
    return TokenPreferenceLoss(out, agreement, extras["chosen"], extras["rejected"])


def fused_forward_kl(student_hidden: jax.Array, weight: jax.Array, teacher_hidden: jax.Array,
                     teacher_weight: jax.Array, mask: jax.Array, *, bias: jax.Array | None = None,
                     teacher_bias: jax.Array | None = None, temperature: float = 1.0,
                     normalizer: float | None = None, reduction: str = "mean",
                     chunk_size: int | None = None) -> jax.Array:
    """``dpkd.spec.forward_kl`` (KL(p‖q) per token) over token chunks of the two lm_heads; teacher frozen."""
    return _named_wrapper("fused_forward_kl", locals())[0]


def fused_reverse_kl(student_hidden: jax.Array, weight: jax.Array, teacher_hidden: jax.Array,
                     teacher_weight: jax.Array, mask: jax.Array, *, bias: jax.Array | None = None,
                     teacher_bias: jax.Array | None = None, temperature: float = 1.0,
                     normalizer: float | None = None, reduction: str = "mean",
                     chunk_size: int | None = None) -> jax.Array:
    """``dpkd.spec.reverse_kl`` (KL(q‖p) per token) over token chunks of the two lm_heads; teacher frozen."""
    return _named_wrapper("fused_reverse_kl", locals())[0]


def fused_generalized_jsd(student_hidden: jax.Array, weight: jax.Array, teacher_hidden: jax.Array,
                          teacher_weight: jax.Array, mask: jax.Array, *, bias: jax.Array | None = None,
                          teacher_bias: jax.Array | None = None, beta: float = 0.5, temperature: float = 1.0,
                          normalizer: float | None = None, reduction: str = "mean",
                          chunk_size: int | None = None) -> jax.Array:
    """``dpkd.spec.generalized_jsd`` (TRL's β convention) over token chunks; teacher frozen."""
    return _named_wrapper("fused_generalized_jsd", locals())[0]


def fused_akl(student_hidden: jax.Array, weight: jax.Array, teacher_hidden: jax.Array,
              teacher_weight: jax.Array, mask: jax.Array, *, bias: jax.Array | None = None,
              teacher_bias: jax.Array | None = None, mu: float = 0.5, temperature: float = 1.0,
              normalizer: float | None = None, reduction: str = "mean", chunk_size: int | None = None) -> jax.Array:
    """``dpkd.spec.akl`` (head/tail weighted forward + reverse KL) over token chunks; teacher frozen."""
    return _named_wrapper("fused_akl", locals())[0]


def fused_cross_entropy(hidden: jax.Array, weight: jax.Array, labels: jax.Array, *,
                        bias: jax.Array | None = None, ignore_index: int = -100, normalizer: float | None = None,
                        reduction: str = "mean", chunk_size: int | None = None) -> jax.Array:
    """``dpkd.spec.cross_entropy`` (−log q[label], the SFT/LM term) over token chunks of the lm_head;
    hidden [..., H], labels [...] (``ignore_index`` rows contribute 0)."""
    return _named_wrapper("fused_cross_entropy", locals())[0]
