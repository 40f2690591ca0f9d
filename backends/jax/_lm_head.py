"""The per-chunk lm_head math the JAX fused path is built from (``fused.py``: sequence losses and
``linear_token_logps``; ``fused_token.py``: token losses), and its validation glue.

A chunk is a block of token rows whose logits ``rows @ Wᵀ (+ b)`` are the only ``[rows, V]`` array alive;
the loops over chunks are ``lax.map`` / ``lax.scan``, so XLA never holds ``[N, V]``. Gradients of Σ g·logp
are formed from the chunk's softmax with the row factors on ``[rows, H]`` arrays (``logp_backprop``), and
accumulated in float32 or wider (``accum_dtype``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from dpkd.spec import validation as v

from . import _base

__all__ = [
    "describe",
    "project",
    "chunk_logps",
    "logp_backprop",
    "accum_dtype",
    "add_weight_grad",
    "pad_rows",
]


# --------------------------------------------------------------------------------------------------
# Validation glue: the checks themselves are dpkd.spec.validation's, on ArrayInfo descriptions


def describe(x: Any) -> v.ArrayInfo | None:
    """An array as the framework-free checks see it (None stays None)."""
    if x is None:
        return None
    x = _base.as_array(x)
    kind = ("floating" if jnp.issubdtype(x.dtype, jnp.floating) else
            "integer" if jnp.issubdtype(x.dtype, jnp.integer) else "other")
    return v.ArrayInfo(tuple(x.shape), x.dtype, kind)




# --------------------------------------------------------------------------------------------------
# Per-chunk math


def project(rows: jax.Array, weight: jax.Array, bias: jax.Array | None) -> jax.Array:
    logits = rows @ weight.T
    return logits if bias is None else logits + bias


def chunk_logps(logits: jax.Array, labels: jax.Array, ignore_index: int) -> tuple[jax.Array, jax.Array]:
    """(per-token logp, 0 where ignored; logsumexp) of one chunk of logits."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    valid = labels != ignore_index
    picked = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[:, None], axis=-1)[:, 0]
    return jnp.where(valid, picked - lse, 0.0), lse


def logp_backprop(probs: jax.Array, rows: jax.Array, weight: jax.Array, safe_labels: jax.Array, g: jax.Array,
                  grad_w: jax.Array, grad_b: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Back-propagate Σ g·logp through one chunk, from its softmax ``probs``: (grad_rows, grad_w, grad_b), the
    last two being the carried accumulators (accumulation dtype; ``grad_b`` None without a bias) with this
    chunk added.

    G = g·(onehot − probs) = diag(−g)·probs + onehot·g: both products take ``probs`` as it is and the row
    factors act on [rows, H] arrays, so no [rows, V] gradient array is formed (the Torch backend's
    ``backprop_logp_chunk`` does the same). The weight gradient goes through ``add_weight_grad`` and a
    scatter into the accumulator, so no second [V, H] array is formed either."""
    grad_rows = -g[:, None] * (probs @ weight) + g[:, None] * weight[safe_labels]
    grad_w = add_weight_grad(grad_w, probs, -g[:, None] * rows)
    grad_w = grad_w.at[safe_labels].add((g[:, None] * rows).astype(grad_w.dtype))
    if grad_b is not None:
        grad_b = grad_b + ((probs.T @ -g).at[safe_labels].add(g)).astype(grad_b.dtype)
    return grad_rows, grad_w, grad_b


def accum_dtype(dtype: Any) -> Any:
    return jnp.promote_types(dtype, jnp.float32)


#: The most blocks ``add_weight_grad`` splits the vocabulary into: a wide hidden size and a short chunk would
#: otherwise make many small products.
_WEIGHT_GRAD_BLOCKS = 64


def add_weight_grad(grad_w: jax.Array, g: jax.Array, rows: jax.Array) -> jax.Array:
    """``grad_w + gᵀ @ rows`` (grad_w [V, H] in the accumulation dtype, g [C, V], rows [C, H]); on the CPU in
    blocks of vocabulary rows, one after the other.

    XLA's CPU dot cannot add into its output, so the one-product form holds a second [V, H] array (62.5 MiB
    at V = 32000, H = 512: more than the chunk's logits) beside the carried one, and unrolled blocks are
    scheduled side by side; in a loop the temporary is one [block, H] product (about 1/16 of the chunk's
    logits, in at most ``_WEIGHT_GRAD_BLOCKS`` blocks) and each block is added in place. Other backends'
    compilers fold the addition into the GEMM, where blocks would only be more, smaller kernels."""
    v, h = grad_w.shape
    if jax.default_backend() != "cpu":
        return grad_w + (g.T @ rows).astype(grad_w.dtype)
    n_blocks = min(_WEIGHT_GRAD_BLOCKS, -(-16 * h // max(1, g.shape[0])), v)
    block = -(-v // n_blocks)
    n_full = v // block

    def add(v0: Any, size: int, grad_w: jax.Array) -> jax.Array:
        part = jax.lax.dynamic_slice_in_dim(g, v0, size, 1).T @ rows
        return jax.lax.dynamic_update_slice_in_dim(
            grad_w, jax.lax.dynamic_slice_in_dim(grad_w, v0, size, 0) + part.astype(grad_w.dtype), v0, 0)

    grad_w = jax.lax.fori_loop(0, n_full, lambda i, acc: add(i * block, block, acc), grad_w)
    if v % block:
        grad_w = add(n_full * block, v % block, grad_w)
    return grad_w


def pad_rows(x: jax.Array, n_pad: int, value: Any = 0) -> jax.Array:
    if n_pad == 0:
        return x
    return jnp.concatenate([x, jnp.full((n_pad, *x.shape[1:]), value, x.dtype)])
