"""Per-chunk kernels of the JAX fused token-level losses: loss and d loss/d logits of a chunk of rows from
its ``[rows, V]`` logits (``fused_token.py`` scans them over the chunks); the same formulas as the Torch
backend's ``_token_kernels.py``, written for XLA.

A kernel is a hashable :class:`TokenKernel` (a static argument of the jitted computation) whose call
returns a :class:`ChunkResult`: ℓ per row, the extras, and d ℓ/d(S/τ) as a dense ``[rows, V]`` array
(XLA fuses it with the softmax that forms it) and/or sparse terms Σ coef·e_index. Why not autodiff of
the backend formula (``token.py``, ``distill.py``, which the results equal within the dtype table): its
VJP keeps the forward's temporaries and builds a dense gradient for token DPKD, whose sigmoid and IPO
forms move only two entries per row; AKL's sort of V is replaced, on the CPU with numba installed, by the
compiled bit-histogram loops of ``backends/_akl_numba.py`` (a host callback), elsewhere by a bisection over
the float bits of p (they order like its values), a handful of fused reductions over the chunk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._base import smoothed_sigmoid_loss, softplus

__all__ = ["ChunkResult", "TokenKernel", "token_kernel", "argmax_rows", "akl_head_weight"]


class ChunkResult(NamedTuple):
    """ℓ per row [C], d ℓ/d(S/τ) = dense + Σ coef·e_index (dense None: no dense part), extras [C] each."""

    loss: jax.Array
    dense: jax.Array | None
    sparse: tuple[tuple[jax.Array, jax.Array], ...]
    extras: dict[str, jax.Array]


def _softmax_log(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(softmax, log_softmax) of each row: one exp, log p = (x − max) − log Z (exact near the maximum)."""
    shifted = x - jnp.max(x, axis=1, keepdims=True)
    e = jnp.exp(shifted)
    z = jnp.sum(e, axis=1, keepdims=True)
    return e / z, shifted - jnp.log(z)


def _log_normalizer(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(max, log Σ exp(x − max)) per row, one fused reduction (no [C, V] array kept)."""
    m = jnp.max(x, axis=1)
    return m, jnp.log(jnp.sum(jnp.exp(x - m[:, None]), axis=1))


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x, index[:, None], axis=1)[:, 0]


def argmax_rows(x: jax.Array) -> jax.Array:
    """The first index of each row's maximum, as a min over a select (a plain reduction, which XLA
    vectorises, where ``argmax``'s (value, index) reduction runs element by element)."""
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
    return jnp.min(jnp.where(x == jnp.max(x, axis=1, keepdims=True), iota, x.shape[1]), axis=1)


def _dpkd(s: jax.Array, t: jax.Array, beta: float, form: str, label_smoothing: float, reference_free: bool,
          lambda_: float) -> ChunkResult:
    y_t, y_s = argmax_rows(t), argmax_rows(s)
    h = _gather(s, y_t) - _gather(s, y_s)  # a − b as the raw-logit gap (the normalisers cancel)
    if not reference_free:
        h = h - (_gather(t, y_t) - _gather(t, y_s))
    (m_s, z_s), (m_t, z_t) = _log_normalizer(s), _log_normalizer(t)
    a, b = (_gather(s, y_t) - m_s) - z_s, -z_s  # log q at y^t, y^s (y^s is the student's maximum)
    c, d = -z_t, (_gather(t, y_s) - m_t) - z_t
    z = beta * h
    if form == "sigmoid":
        loss = smoothed_sigmoid_loss(z, label_smoothing)
        dh = beta * (label_smoothing * jax.nn.sigmoid(z) - (1.0 - label_smoothing) * jax.nn.sigmoid(-z))
    elif form == "ipo":
        loss = (h - 1.0 / (2.0 * beta)) ** 2
        dh = 2.0 * (h - 1.0 / (2.0 * beta))
    else:  # dpop
        loss = softplus(-z) + lambda_ * jnp.where(c > a, c - a, 0.0)
        dh = -beta * jax.nn.sigmoid(-z)
    agree = y_t == y_s
    dh = jnp.where(agree, 0.0, dh)  # e_{y^t} − e_{y^s} = 0
    sparse: tuple[tuple[jax.Array, jax.Array], ...] = ((y_t, dh), (y_s, -dh))
    dense = None
    if form == "dpop":  # λ·max(0, c − a): gradient λ·k·(q − e_{y^t}), k = 1[c > a]
        k = lambda_ * (c > a).astype(s.dtype)
        dense = k[:, None] * jnp.exp((s - m_s[:, None]) - z_s[:, None])
        sparse = (*sparse, (y_t, -k))
    extras = {"agree": agree.astype(s.dtype), "chosen": beta * (a - c), "rejected": beta * (b - d)}
    return ChunkResult(loss, dense, sparse, extras)


def _forward_kl(s: jax.Array, t: jax.Array) -> ChunkResult:
    p, log_p = _softmax_log(t)
    q, log_q = _softmax_log(s)
    return ChunkResult(jnp.sum(p * (log_p - log_q), axis=1), q - p, (), {})


def _reverse_kl(s: jax.Array, t: jax.Array) -> ChunkResult:
    q, log_q = _softmax_log(s)
    m_t, z_t = _log_normalizer(t)
    ratio = log_q - ((t - m_t[:, None]) - z_t[:, None])
    loss = jnp.sum(q * ratio, axis=1)
    return ChunkResult(loss, q * (ratio - loss[:, None]), (), {})


def _jsd(s: jax.Array, t: jax.Array, beta: float) -> ChunkResult:
    p, log_p = _softmax_log(t)
    q, log_q = _softmax_log(s)
    # where p and q both underflow, M = 0: any finite log M gives the same 0·(finite) terms
    log_m = jnp.log(jnp.maximum((1.0 - beta) * q + beta * p, jnp.finfo(s.dtype).tiny))
    kl_p = jnp.sum(p * (log_p - log_m), axis=1)
    kl_q = jnp.sum(q * (log_q - log_m), axis=1)
    dense = (1.0 - beta) * q * ((log_q - log_m) - kl_q[:, None])
    return ChunkResult(beta * kl_p + (1.0 - beta) * kl_q, dense, (), {})


def _int_view(x: jax.Array) -> jax.Array:
    """The bit pattern of x ≥ 0 as signed integers: they order like the values."""
    return jax.lax.bitcast_convert_type(x, jnp.int32 if x.dtype == jnp.float32 else jnp.int64)


def _bisect(lo: jax.Array, hi: jax.Array, below: Any) -> jax.Array:
    """The least x in (lo, hi] with ``below(x)`` true, per row (``below`` monotone, false at lo, true at hi);
    as many halvings as the widest row needs."""

    def step(bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = below(mid)
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    return jax.lax.while_loop(lambda b: jnp.any(b[1] - b[0] > 1), step, (lo, hi))[1]


def akl_head_weight(p: jax.Array, gap: jax.Array, mu: float) -> jax.Array:
    """AKL's head weight g_head / (g_head + g_tail) per row (0.5 where p = q), without sorting V.

    The head is the tokens of p in descending order while the running mass C_k ≤ μ, and always the first,
    with ``dpkd.spec``'s tie rule (spec/README.md "Tie rule": a run of equal values is never split — it counts
    at its last member's C — and every tied maximum is head). With F(θ) = Σ p·[p > θ], the first token
    outside the head has the value θ* = min{θ : F(θ) ≤ μ}: a bisection over the bit patterns of the floats
    between min p and max p (they order like the values; each step one fused reduction). Tokens above θ*
    are in the head; the c tokens equal to θ* are one run, in the head whole iff F(θ*) + c·θ* ≤ μ or θ* is
    the maximum (F(θ*) = 0)."""
    bits = _int_view(p)

    def mass_above(theta: jax.Array) -> jax.Array:  # θ as bits ≥ 0; compared as floats (the same order)
        return jnp.sum(jnp.where(p > jax.lax.bitcast_convert_type(theta, p.dtype)[:, None], p, 0.0), axis=1)

    # F(min p − 1 ulp) = Σ p > μ and F(max p) = 0 ≤ μ (the bisection never evaluates the lower end)
    lo = jnp.min(bits, axis=1) - 1
    theta = _bisect(lo, jnp.max(bits, axis=1), lambda th: mass_above(th) <= mu)
    above = bits > theta[:, None]
    mass = jnp.sum(jnp.where(above, p, 0.0), axis=1)
    g_above = jnp.sum(jnp.where(above, gap, 0.0), axis=1)
    tied = bits == theta[:, None]
    count = jnp.sum(tied, axis=1)
    value = jax.lax.bitcast_convert_type(theta, p.dtype)
    # the tie rule: the run at θ* is head whole when its last member's C fits, or when it holds the maximum
    whole = (mass + count * value <= mu) | (mass == 0)
    g_tied = jnp.where(whole, jnp.sum(jnp.where(tied, gap, 0.0), axis=1), 0.0)
    g_head = g_above + g_tied
    total = jnp.sum(gap, axis=1)
    return jnp.where(total > 0, g_head / jnp.where(total > 0, total, 1.0), 0.5)


def _compiled_head_weight(p: jax.Array, q: jax.Array, mu: float) -> jax.Array | None:
    """AKL's head weight from the compiled row loops of ``backends/_akl_numba.py`` (numba) as a host
    callback, on the CPU only (elsewhere a callback would move every chunk to the host); None when
    unavailable. The bisection below reads the chunk ~30 times; the loops read each row twice."""
    if jax.default_backend() != "cpu":
        return None
    from .. import _akl_numba  # imports numba, if it is installed: only when AKL is used

    if not _akl_numba.available():
        return None
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    def host(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        v = p.shape[-1]
        w = _akl_numba.head_weights(p.reshape(-1, v), q.reshape(-1, v), mu, threads)
        return w.astype(p.dtype).reshape(p.shape[:-1])

    out = jax.ShapeDtypeStruct(p.shape[:-1], p.dtype)
    return jax.pure_callback(host, out, jax.lax.stop_gradient(p), jax.lax.stop_gradient(q),
                             vmap_method="broadcast_all")


def _akl(s: jax.Array, t: jax.Array, mu: float) -> ChunkResult:
    p, log_p = _softmax_log(t)
    q, log_q = _softmax_log(s)
    ratio = log_p - log_q
    fkl, rkl = jnp.sum(p * ratio, axis=1), -jnp.sum(q * ratio, axis=1)
    w = _compiled_head_weight(p, q, mu)
    if w is None:
        w = akl_head_weight(p, jnp.abs(p - q), mu)
    w = jax.lax.stop_gradient(w)[:, None]
    dense = w * (q - p) + (1.0 - w) * q * (-ratio - rkl[:, None])
    return ChunkResult(w[:, 0] * fkl + (1.0 - w[:, 0]) * rkl, dense, (), {})


def _cross_entropy(s: jax.Array, labels: jax.Array) -> ChunkResult:
    q, log_q = _softmax_log(s)
    onehot = jax.lax.broadcasted_iota(jnp.int32, s.shape, 1) == labels[:, None]
    return ChunkResult(-_gather(log_q, labels), q - onehot.astype(s.dtype), (), {})


@dataclass(frozen=True)
class TokenKernel:
    """A named token loss with its options as a chunk kernel (hashable: a static jit argument)."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def option(self, key: str, default: Any) -> Any:
        return dict(self.options).get(key, default)

    @property
    def teacher(self) -> bool:
        return self.name != "cross_entropy"

    @property
    def dense(self) -> bool:
        return self.name != "dpkd_token_loss" or self.option("form", "sigmoid") == "dpop"

    @property
    def temperature(self) -> float:
        return float(self.option("temperature", 1.0))

    def __call__(self, s: jax.Array, t: jax.Array | None, labels: jax.Array | None) -> ChunkResult:
        o = dict(self.options)
        if self.name == "dpkd_token_loss":
            return _dpkd(s, t, float(o.get("beta", 0.1)), o.get("form", "sigmoid"),
                         float(o.get("label_smoothing", 0.0)), bool(o.get("reference_free", False)),
                         float(o.get("lambda_", 50.0)))
        if self.name == "forward_kl":
            return _forward_kl(s, t)
        if self.name == "reverse_kl":
            return _reverse_kl(s, t)
        if self.name == "generalized_jsd":
            beta = float(o.get("beta", 0.5))
            if beta == 0.0:  # the end points are the two KLs (distill.generalized_jsd's convention)
                return _forward_kl(s, t)
            return _reverse_kl(s, t) if beta == 1.0 else _jsd(s, t, beta)
        if self.name == "akl":
            return _akl(s, t, float(o.get("mu", 0.5)))
        return _cross_entropy(s, labels)


_NAMES = ("dpkd_token_loss", "forward_kl", "reverse_kl", "generalized_jsd", "akl", "cross_entropy")


def token_kernel(name: str, options: tuple[tuple[str, Any], ...]) -> TokenKernel | None:
    """The kernel of the backend's token loss ``name`` with ``options`` (None: no kernel for it)."""
    return TokenKernel(name, tuple(options)) if name in _NAMES else None

