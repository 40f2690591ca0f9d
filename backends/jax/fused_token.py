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
from ._lm_head import accum_dtype, describe, pad_rows, project

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

# Live [chunk, V] arrays per chunk in the backward (student and teacher logits, the softmaxes and the VJP's
# temporaries), as the Torch backend counts them.
TOKEN_LOSS_BUFFERS = 8


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
        grad_w = grad_w + (dlogits.T @ rows_k).astype(acc)
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
    if n == 0:  # nothing to chunk: the (empty) sum, or [...] of zeros
        per_row, extras = jnp.zeros((0,), dtype), {}
    else:
        size = size or auto_chunk_size(weight.shape[0], n_rows=n, itemsize=np.dtype(dtype).itemsize,
                                       buffers=TOKEN_LOSS_BUFFERS)
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
