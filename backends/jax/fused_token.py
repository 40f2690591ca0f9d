"""Fused, token-chunked token-level losses of the JAX backend (DESIGN.md §5).

The JAX counterpart of the token-level half of ``dpkd.backends.torch.fused`` (``fused_token_loss``,
``fused_dpkd_token_loss``, ``fused_forward_kl``, ``fused_reverse_kl``, ``fused_generalized_jsd``,
``fused_akl``, ``fused_cross_entropy``): same names, arguments and error messages.

These losses need the whole student and teacher distributions at the same positions, so for every chunk of
token rows the student logits S = hidden @ Wᵀ (+b) and the teacher logits T = teacher_hidden @ W_tᵀ (+b_t)
are formed together and the backend's own per-token formula (``dpkd.backends.jax.token`` / ``.distill``
under reduction="none") runs on that chunk; the formulas are never re-written here.

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
from dpkd.spec import validation as v
from dpkd.spec.results import TokenPreferenceLoss

from . import _base as b
from . import distill, token
from .fused import _accum_dtype, _check_labels, _check_lm_head, _pad_rows, _project, auto_chunk_size

__all__ = [
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
#: It is a static argument of the jitted computation: pass a hashable callable (``NamedTokenLoss`` or a
#: module-level function) so that the compiled code is reused across calls.
RowLoss = Callable[[jax.Array, jax.Array | None, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]

# Live [chunk, V] arrays per chunk in the backward (student and teacher logits, the softmaxes and the VJP's
# temporaries), as the Torch backend counts them.
TOKEN_LOSS_BUFFERS = 8

_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "dpkd_token_loss": token.dpkd_token_loss,
    "forward_kl": distill.forward_kl,
    "reverse_kl": distill.reverse_kl,
    "generalized_jsd": distill.generalized_jsd,
    "akl": distill.akl,
    "cross_entropy": distill.cross_entropy,
}


@dataclass(frozen=True)
class NamedTokenLoss:
    """A backend token loss by name with its options, as a hashable ``RowLoss`` (jit caches survive calls).

    ``NamedTokenLoss("forward_kl", (("temperature", 2.0),))(S, T, m)`` → (``forward_kl(S, T, m,
    temperature=2.0, reduction="none")``, {}). For "dpkd_token_loss" the extras are the per-token
    agreement 1[argmax S = argmax T]·m and the chosen/rejected rewards; "cross_entropy" takes the labels
    as its target and ignores the teacher.
    """

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def __call__(self, s: jax.Array, t: jax.Array | None, target: jax.Array
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        fn = _FUNCTIONS[self.name]
        options = dict(self.options)
        if self.name == "cross_entropy":
            return fn(s, target, reduction="none", **options), {}
        out = fn(s, t, target, reduction="none", **options)
        if self.name != "dpkd_token_loss":
            return out, {}
        agree = (jnp.argmax(jax.lax.stop_gradient(s), -1) == jnp.argmax(t, -1)) & (target != 0)
        return out.loss, {"agree": agree.astype(s.dtype), "chosen": out.chosen_rewards,
                          "rejected": out.rejected_rewards}


# --------------------------------------------------------------------------------------------------
# The chunked per-token values: a custom_vjp whose backward recomputes each chunk's logits


def _chunked(x: jax.Array | None, k: int) -> jax.Array | None:
    return None if x is None else x.reshape(k, -1, *x.shape[1:])


def _teacher_logits(teacher_rows: jax.Array | None, teacher_weight: jax.Array | None,
                    teacher_bias: jax.Array | None) -> jax.Array | None:
    if teacher_rows is None:
        return None
    return jax.lax.stop_gradient(_project(teacher_rows, teacher_weight, teacher_bias))


def _rows_forward(row_loss: RowLoss, chunk_size: int, rows, weight, bias, aux):
    """(m·ℓ [N], extras [N]) over chunks of ``chunk_size`` rows (N a multiple of it)."""
    t_rows, t_weight, t_bias, target = aux
    n = rows.shape[0]
    k = n // chunk_size

    def body(xs):
        rows_k, t_rows_k, target_k = xs
        return row_loss(_project(rows_k, weight, bias), _teacher_logits(t_rows_k, t_weight, t_bias), target_k)

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
    acc = _accum_dtype(weight.dtype)

    def step(carry, xs):
        grad_w, grad_b = carry
        rows_k, t_rows_k, target_k, g_k = xs
        teacher = _teacher_logits(t_rows_k, t_weight, t_bias)
        _, vjp = jax.vjp(lambda s: row_loss(s, teacher, target_k)[0], _project(rows_k, weight, bias))
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
    aux = (None if teacher_rows is None else jax.lax.stop_gradient(_pad_rows(teacher_rows, n_pad)),
           None if teacher_weight is None else jax.lax.stop_gradient(teacher_weight),
           None if teacher_bias is None else jax.lax.stop_gradient(teacher_bias),
           _pad_rows(target, n_pad, pad_target))
    per_row, extras = _token_rows(row_loss, chunk_size, _pad_rows(rows, n_pad), weight, bias, aux)
    return per_row[:n], {key: x[:n] for key, x in extras.items()}


# --------------------------------------------------------------------------------------------------
# The driver


def _check_same_vocab(func: str, student_weight: jax.Array, teacher_weight: jax.Array) -> None:
    if teacher_weight.ndim == 2:
        v.check_same_vocab(func, "teacher_weight", teacher_weight.shape[0], "weight", student_weight.shape[0])


def fused_token_loss(
    row_loss: RowLoss,
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
    """A token-level loss Σ_t m_t ℓ_t / (normalizer or Σ m) computed over token chunks of the lm_heads.

    For every chunk the student logits S = hidden @ Wᵀ (+b) and the teacher logits T = teacher_hidden @ W_tᵀ
    (+b_t, no gradient) are formed together and ``row_loss(S, T, target_chunk)`` (the backend's per-token
    formula under reduction="none") gives m·ℓ per row; the backward recomputes each chunk (see the module
    docstring). mean = Σ m·ℓ / (normalizer or Σ m) (an empty mean is an error), sum = Σ m·ℓ, none = m·ℓ.

    Args:
        row_loss: see ``RowLoss`` (hashable; e.g. ``NamedTokenLoss``).
        student_hidden: [..., H]; weight: [V, H]; target: [...] mask (or labels if ``target_is_labels``).
        teacher_hidden: [..., H_t]; teacher_weight: [V, H_t] (same vocabulary); both optional for losses
            that need no teacher (cross entropy).  bias / teacher_bias: optional [V].
        normalizer, reduction: as ``dpkd_token_loss``.  chunk_size: token rows per chunk (default from a
            64 MiB budget).  ignore_index: the labels' ignored value (``target_is_labels``).
    Returns:
        (loss — scalar, or [...] under "none"; extras — per-token outputs of ``row_loss``, [...], no gradient).

    Example:
        >>> h, w, m = jnp.ones((6, 4)), jnp.ones((10, 4)), jnp.ones(6)
        >>> loss, _ = fused_token_loss(NamedTokenLoss("forward_kl"), h, w, m, teacher_hidden=h, teacher_weight=w)
        >>> float(loss)
        0.0

    See also: ``dpkd.backends.torch.fused.fused_token_loss`` (the Torch twin), ``fused_forward_kl``.
    """
    v.check_reduction(func, reduction)
    normalizer = v.check_normalizer_option(func, normalizer, reduction)
    size = v.check_chunk_options(func, chunk_size, ignore_index)
    _check_lm_head(func, student_hidden, weight, bias, names=("student_hidden", "weight", "bias"))
    lead = tuple(student_hidden.shape[:-1])
    if teacher_hidden is not None or teacher_weight is not None:
        if teacher_hidden is None or teacher_weight is None:
            v.fail(func, "teacher_hidden" if teacher_hidden is None else "teacher_weight",
                   "is required with the other teacher argument")
        _check_same_vocab(func, weight, teacher_weight)
        _check_lm_head(func, teacher_hidden, teacher_weight, teacher_bias, lead=lead,
                       names=("teacher_hidden", "teacher_weight", "teacher_bias"))
    target_name = "labels" if target_is_labels else "mask"
    if target_is_labels:
        _check_labels(func, target_name, target, lead)
    elif tuple(target.shape) != lead:
        v.fail(func, target_name, f"has shape {tuple(target.shape)}, expected {lead} "
                                  "(the shape of `student_hidden` without its hidden axis)")
    for name, x in (("student_hidden", student_hidden), ("weight", weight), ("bias", bias),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                    ("teacher_bias", teacher_bias)):
        b.check_finite(func, name, x)
    if target_is_labels:
        b.check_labels(func, target_name, target, weight.shape[0], ignore_index)
    else:
        b.check_binary(func, target_name, target)

    dtype = b.compute_dtype(student_hidden, weight, bias)
    flat_target = target.reshape(-1)
    count = jnp.sum(flat_target != ignore_index) if target_is_labels else jnp.sum(flat_target != 0)
    if reduction == "mean" and normalizer is None:
        b.value_check(count > 0, lambda: v.check_nonempty(func, target_name, 0.0))
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
        per_row, extras = _token_rows_jit(rows, weight.astype(dtype), None if bias is None else bias.astype(dtype),
                                          *teacher, flat_target, row_loss=row_loss, chunk_size=min(size, n),
                                          pad_target=int(ignore_index) if target_is_labels else 0)
    extras = {key: x.reshape(lead) for key, x in extras.items()}
    if reduction == "none":
        return per_row.reshape(lead), extras
    total = jnp.sum(per_row)
    if reduction == "sum":
        return total, extras
    return total / (float(normalizer) if normalizer is not None else count.astype(dtype)), extras


def _options(**kw: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(kw.items()))


def fused_dpkd_token_loss(
    student_hidden: jax.Array, weight: jax.Array, teacher_hidden: jax.Array,
    teacher_weight: jax.Array, mask: jax.Array, *, bias: jax.Array | None = None,
    teacher_bias: jax.Array | None = None, beta: float = 0.1, form: str = "sigmoid",
    label_smoothing: float = 0.0, reference_free: bool = False, lambda_: float = 50.0,
    normalizer: float | None = None, reduction: str = "mean", chunk_size: int | None = None,
) -> TokenPreferenceLoss:
    """Token-level DPKD (the released code's argmax preference, SPEC-MATH §3B) on the two lm_heads.

    Per position: y^t = argmax P, y^s = argmax Q, h = (Q[y^t] − Q[y^s]) − (P[y^t] − P[y^s]), ℓ by ``form``;
    the same value, rewards, agreement and student gradients as ``dpkd_token_loss`` on materialised logits
    (the teacher is frozen here). student_hidden [..., H], teacher_hidden [..., H_t], mask [...].

    Example:
        >>> h, w, m = jnp.ones((6, 4)), jnp.eye(10, 4), jnp.ones(6)
        >>> fused_dpkd_token_loss(h, w, h, w, m, chunk_size=4).agreement_rate.shape
        ()
    """
    loss = NamedTokenLoss("dpkd_token_loss", _options(beta=beta, form=form, label_smoothing=label_smoothing,
                                                      reference_free=reference_free, lambda_=lambda_))
    out, extras = fused_token_loss(loss, student_hidden, weight, mask, teacher_hidden=teacher_hidden,
                                   teacher_weight=teacher_weight, bias=bias, teacher_bias=teacher_bias,
                                   normalizer=normalizer, reduction=reduction, chunk_size=chunk_size,
                                   func="fused_dpkd_token_loss")
    agreement = jnp.sum(extras["agree"]) / jnp.maximum(jnp.sum(mask != 0), 1)
    return TokenPreferenceLoss(out, agreement, extras["chosen"], extras["rejected"])


def _distill(name: str, func: str, student_hidden: jax.Array, weight: jax.Array, teacher_hidden: jax.Array,
             teacher_weight: jax.Array, mask: jax.Array, bias: jax.Array | None, teacher_bias: jax.Array | None,
             normalizer: float | None, reduction: str, chunk_size: int | None, **options: Any) -> jax.Array:
    return fused_token_loss(NamedTokenLoss(name, _options(**options)), student_hidden, weight, mask,
                            teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, bias=bias,
                            teacher_bias=teacher_bias, normalizer=normalizer, reduction=reduction,
                            chunk_size=chunk_size, func=func)[0]


def fused_forward_kl(student_hidden: jax.Array, weight: jax.Array, teacher_hidden: jax.Array,
                     teacher_weight: jax.Array, mask: jax.Array, *, bias: jax.Array | None = None,
                     teacher_bias: jax.Array | None = None, temperature: float = 1.0,
                     normalizer: float | None = None, reduction: str = "mean",
                     chunk_size: int | None = None) -> jax.Array:
    """Forward KL(p‖q) per token (``forward_kl``, SPEC-MATH §6) over token chunks of the two lm_heads;
    teacher frozen."""
    return _distill("forward_kl", "fused_forward_kl", student_hidden, weight, teacher_hidden, teacher_weight,
                    mask, bias, teacher_bias, normalizer, reduction, chunk_size, temperature=temperature)


def fused_reverse_kl(student_hidden: jax.Array, weight: jax.Array, teacher_hidden: jax.Array,
                     teacher_weight: jax.Array, mask: jax.Array, *, bias: jax.Array | None = None,
                     teacher_bias: jax.Array | None = None, temperature: float = 1.0,
                     normalizer: float | None = None, reduction: str = "mean",
                     chunk_size: int | None = None) -> jax.Array:
    """Reverse KL(q‖p) per token (``reverse_kl``, SPEC-MATH §6) over token chunks of the two lm_heads;
    teacher frozen."""
    return _distill("reverse_kl", "fused_reverse_kl", student_hidden, weight, teacher_hidden, teacher_weight,
                    mask, bias, teacher_bias, normalizer, reduction, chunk_size, temperature=temperature)


def fused_generalized_jsd(student_hidden: jax.Array, weight: jax.Array, teacher_hidden: jax.Array,
                          teacher_weight: jax.Array, mask: jax.Array, *, bias: jax.Array | None = None,
                          teacher_bias: jax.Array | None = None, beta: float = 0.5, temperature: float = 1.0,
                          normalizer: float | None = None, reduction: str = "mean",
                          chunk_size: int | None = None) -> jax.Array:
    """Generalized JSD (``generalized_jsd``, TRL's β convention, SPEC-MATH §11) over token chunks; teacher
    frozen."""
    return _distill("generalized_jsd", "fused_generalized_jsd", student_hidden, weight, teacher_hidden,
                    teacher_weight, mask, bias, teacher_bias, normalizer, reduction, chunk_size, beta=beta,
                    temperature=temperature)


def fused_akl(student_hidden: jax.Array, weight: jax.Array, teacher_hidden: jax.Array,
              teacher_weight: jax.Array, mask: jax.Array, *, bias: jax.Array | None = None,
              teacher_bias: jax.Array | None = None, mu: float = 0.5, temperature: float = 1.0,
              normalizer: float | None = None, reduction: str = "mean", chunk_size: int | None = None) -> jax.Array:
    """Adaptive KL (``akl``: head/tail weighted forward + reverse KL, SPEC-MATH §6) over token chunks;
    teacher frozen."""
    return _distill("akl", "fused_akl", student_hidden, weight, teacher_hidden, teacher_weight, mask, bias,
                    teacher_bias, normalizer, reduction, chunk_size, mu=mu, temperature=temperature)


def fused_cross_entropy(hidden: jax.Array, weight: jax.Array, labels: jax.Array, *,
                        bias: jax.Array | None = None, ignore_index: int = -100, normalizer: float | None = None,
                        reduction: str = "mean", chunk_size: int | None = None) -> jax.Array:
    """Cross entropy −log q[label] (``cross_entropy``, SFT/LM term, SPEC-MATH §6) over token chunks of the
    lm_head; hidden [..., H], labels [...] (``ignore_index`` rows contribute 0)."""
    loss = NamedTokenLoss("cross_entropy", _options(ignore_index=ignore_index))
    return fused_token_loss(loss, hidden, weight, labels, bias=bias, normalizer=normalizer, reduction=reduction,
                            chunk_size=chunk_size, target_is_labels=True, ignore_index=ignore_index,
                            func="fused_cross_entropy")[0]
