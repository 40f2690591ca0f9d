"""AKL's head search (and, for Torch, its whole per-row work after the two softmaxes) as compiled loops
over one row at a time, with numba when it is installed: shared by the Torch and JAX fused AKL on the CPU.

Why compiled: eager Torch needs ~20 passes over a ``[rows, V]`` block for AKL (two ``scatter_add_``
histograms of the float bits of p, their int64 index, the crossing-bucket flag and ``nonzero``, two dot
products, |p − q|, a gradient in three passes), ~110 ms per 262 × 32000 chunk on one core against ~20 ms
for the whole forward-KL kernel; XLA's bisection over the bits of p reads the chunk ~30 times. Here a row
is one loop that histograms the bits of p with its mass and |p − q|, one loop that picks out the bucket
where the mass crosses μ (sorted exactly, ~150 values at V = 32000), and, for Torch, one loop for both KLs
and one that writes the gradient — each row read while it is in cache.

The head rule is ``dpkd.spec``'s (spec/README.md "Tie rule"), as in the eager fallbacks
(``torch/_token_kernels.akl_head_weight``, ``jax/_token_kernels.akl_head_weight``): the bit pattern of a float
≥ 0 orders like its value, so its top bits (exponent and a few mantissa bits) bucket p monotonically; equal
values share a bucket, so a run of ties is never split; the run at the cut is head whole iff its last
member's running mass is ≤ μ, and every tied maximum is head. Sums are in float64. ``DPKD_NO_NUMBA=1``
selects the fallbacks.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

__all__ = ["available", "bit_layout", "run_rows", "akl_rows", "head_weights"]

try:  # imported only when AKL runs (the backends import this module lazily)
    import numba
except ImportError:  # pragma: no cover - numba is in the project's "all" extra
    numba = None


def available() -> bool:
    """Whether the compiled loops can be used (numba installed and ``DPKD_NO_NUMBA`` unset)."""
    return numba is not None and os.environ.get("DPKD_NO_NUMBA", "") in ("", "0")


def bit_layout(dtype: Any) -> tuple[Any, int, int]:
    """(the integer dtype of p's bits, the shift to its bucket, the number of buckets) for float32 / float64:
    exponent + 5 (float32) / 3 (float64) mantissa bits; p ≤ 1 puts every bucket at or below 1.0's."""
    int_dtype, shift = (np.int32, 18) if np.dtype(dtype) == np.float32 else (np.int64, 49)
    one = int(np.ones((), dtype).view(int_dtype))
    return int_dtype, shift, (one >> shift) + 1


if numba is not None:

    @numba.njit(nogil=True, cache=True)
    def _head_gap(p, q, bits, mu, shift, mass, gaps, values, cand_gaps):
        """(Σ|p − q| over the head, Σ|p − q|) of one row; the last four are scratch (mass and gaps
        [buckets], values and cand_gaps [V])."""
        n_buckets = mass.shape[0]
        mass[:] = 0.0
        gaps[:] = 0.0
        total = 0.0
        for i in range(p.shape[0]):
            g = abs(np.float64(p[i]) - np.float64(q[i]))
            k = bits[i] >> shift
            mass[k] += p[i]
            gaps[k] += g
            total += g
        above, g_head, k = 0.0, 0.0, n_buckets - 1
        while k >= 0 and above + mass[k] <= mu:  # buckets from the top wholly inside the head
            above += mass[k]
            g_head += gaps[k]
            k -= 1
        n = 0
        for i in range(p.shape[0] if k >= 0 else 0):  # the bucket where the mass crosses μ
            if bits[i] >> shift == k:
                values[n] = p[i]
                cand_gaps[n] = abs(np.float64(p[i]) - np.float64(q[i]))
                n += 1
        order = np.argsort(-values[:n])
        within, j, first = 0.0, 0, above == 0.0  # first: this run holds the row's maximum
        while j < n:
            value, run_gap, e = values[order[j]], 0.0, j
            while e < n and values[order[e]] == value:  # a run of ties counts whole, at its last member
                within += value
                run_gap += cand_gaps[order[e]]
                e += 1
            if not (first or above + within <= mu):
                break
            g_head += run_gap
            first, j = False, e
        return g_head, total

    @numba.njit(nogil=True, cache=True)
    def _head_weights(p, q, bits, weight, mu, shift, n_buckets):
        mass, gaps = np.empty(n_buckets), np.empty(n_buckets)
        values, cand_gaps = np.empty_like(p[0]), np.empty(p.shape[1])
        for r in range(p.shape[0]):
            g_head, total = _head_gap(p[r], q[r], bits[r], mu, shift, mass, gaps, values, cand_gaps)
            weight[r] = g_head / total if total > 0.0 else 0.5

    @numba.njit(nogil=True, cache=True)
    def _akl_rows(s, t, p, q, bits, dc, loss, weight, mu, shift, n_buckets):
        mass, gaps = np.empty(n_buckets), np.empty(n_buckets)
        values, cand_gaps = np.empty_like(p[0]), np.empty(p.shape[1])
        coef = np.empty(3, s.dtype)  # the gradient's row factors in the logits' dtype, as the eager kernel
        for r in range(s.shape[0]):
            fkl, rkl = 0.0, 0.0
            for i in range(s.shape[1]):  # log p − log q = (T − S) − (c_t − c_s)
                ratio = (t[r, i] - s[r, i]) - dc[r]
                fkl += p[r, i] * ratio
                rkl -= q[r, i] * ratio
            g_head, total = _head_gap(p[r], q[r], bits[r], mu, shift, mass, gaps, values, cand_gaps)
            w = g_head / total if total > 0.0 else 0.5
            loss[r], weight[r] = w * fkl + (1.0 - w) * rkl, w
            # d/d(S/τ) = q ⊙ ((w − 1)(log p − log q) + w − (1 − w) KL(q‖p)) − w p
            coef[0], coef[1], coef[2] = w - 1.0, w - (1.0 - w) * rkl, w
            for i in range(s.shape[1]):
                s[r, i] = q[r, i] * (coef[0] * ((t[r, i] - s[r, i]) - dc[r]) + coef[1]) - coef[2] * p[r, i]


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads, kept between calls, one per count: replacing a shared pool when the count
    changed would shut it down under another Python thread still submitting to it."""
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix=f"dpkd-akl-{workers}")
        return pool


def _after_fork_in_child() -> None:
    global _POOLS_LOCK
    _POOLS.clear()  # a forked child has none of the parent's threads
    _POOLS_LOCK = threading.Lock()  # nor a lock another parent thread held at the fork


os.register_at_fork(after_in_child=_after_fork_in_child)


def run_rows(kernel: Callable[..., None], rows: Sequence[np.ndarray], scalars: Sequence[Any], threads: int) -> None:
    """``kernel(*rows, *scalars)`` with the arrays in ``rows`` (first axis = rows; outputs among them) split
    between ``threads`` threads: the loops release the GIL, and numba's own threading layers would share or
    reset the caller's OpenMP thread count."""
    n = rows[0].shape[0]
    threads = max(1, min(threads, n))
    bounds = [n * k // threads for k in range(threads + 1)]
    parts = [[*(x[lo:hi] for x in rows), *scalars] for lo, hi in zip(bounds[:-1], bounds[1:])]
    pool = _pool(threads - 1) if threads > 1 else None
    pending = [pool.submit(kernel, *part) for part in parts[1:]]
    kernel(*parts[0])
    for future in pending:
        future.result()


def akl_rows(s: np.ndarray, t: np.ndarray, p: np.ndarray, q: np.ndarray, dc: np.ndarray, mu: float,
             threads: int) -> tuple[np.ndarray, np.ndarray]:
    """AKL per row from the softmaxes p, q and the (÷ τ) logits t, s, with log p − log q = (t − s) − dc:
    returns (ℓ, w_head) in float64 [b] and leaves d ℓ/d(S/τ) in ``s``. All [b, V] C-contiguous, one dtype."""
    int_dtype, shift, n_buckets = bit_layout(p.dtype)
    loss, weight = np.empty(s.shape[0]), np.empty(s.shape[0])
    run_rows(_akl_rows, (s, t, p, q, p.view(int_dtype), dc, loss, weight), (float(mu), shift, n_buckets), threads)
    return loss, weight


def head_weights(p: np.ndarray, q: np.ndarray, mu: float, threads: int) -> np.ndarray:
    """AKL's head weight g_head / (g_head + g_tail) per row of p, q [b, V] (0.5 where p = q), float64."""
    int_dtype, shift, n_buckets = bit_layout(p.dtype)
    p, q = np.ascontiguousarray(p), np.ascontiguousarray(q, dtype=p.dtype)
    weight = np.empty(p.shape[0])
    run_rows(_head_weights, (p, q, p.view(int_dtype), weight), (float(mu), shift, n_buckets), threads)
    return weight
