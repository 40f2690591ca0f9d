"""AKL's per-row work after the two softmaxes as one compiled loop per row (numba, when it is installed):
the head search, both KLs and the gradient, each row read twice while it is in cache.

Why compiled: eager Torch needs ~20 passes over a ``[rows, V]`` block for this (two ``scatter_add_``
histograms of the float bits of p, their int64 index, the crossing-bucket flag and ``nonzero``, the two
dot products, |p − q| and a gradient in three passes), ~110 ms per 262 × 32000 chunk on one core against
~20 ms for the whole forward-KL kernel (benchmarks/RESULTS.md). Here each row is one loop that histograms
the bits of p with its mass and |p − q| and sums both KLs, one loop that picks out the bucket where the
mass crosses μ (sorted exactly, ~150 values), and one loop that writes the gradient.

The head rule is ``dpkd.spec``'s (spec/README.md "Tie rule"), as in ``_token_kernels.akl_head_weight``, the
eager fallback: the bit pattern of a float ≥ 0 orders like its value, so its top bits (exponent and a few
mantissa bits) bucket p monotonically; equal values share a bucket, so a run of ties is never split; the
run at the cut is head whole iff its last member's running mass is ≤ μ, and every tied maximum is head.
Sums are in float64. Set ``DPKD_NO_NUMBA=1`` to use the eager path.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["available", "akl_rows_"]


try:  # imported only when AKL runs (``_token_kernels`` imports this module lazily)
    import numba
    import numpy as np
except ImportError:  # pragma: no cover - numba is in the project's "all" extra
    numba = None

if numba is not None:

    @numba.njit(nogil=True, cache=True)
    def _row(s, t, p, q, bits, dc, mu, shift, n_buckets, mass, gaps, values, cand_gaps):
        """(ℓ, w_head) of one row; its gradient left in ``s``."""
        mass[:] = 0.0
        gaps[:] = 0.0
        total, fkl, rkl = 0.0, 0.0, 0.0
        for i in range(s.shape[0]):  # log p − log q = (T − S) − (c_t − c_s)
            ratio = (t[i] - s[i]) - dc
            fkl += p[i] * ratio
            rkl -= q[i] * ratio
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
        for i in range(s.shape[0] if k >= 0 else 0):  # the bucket where the mass crosses μ
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
        w = g_head / total if total > 0.0 else 0.5
        # d/d(S/τ) = q ⊙ ((w − 1)(log p − log q) + w − (1 − w) KL(q‖p)) − w p
        coef = np.empty(3, s.dtype)  # in the logits' dtype, as the eager kernel
        coef[0], coef[1], coef[2] = w - 1.0, w - (1.0 - w) * rkl, w
        a, c, wt = coef[0], coef[1], coef[2]
        for i in range(s.shape[0]):
            s[i] = q[i] * (a * ((t[i] - s[i]) - dc) + c) - wt * p[i]
        return w * fkl + (1.0 - w) * rkl, w

    @numba.njit(nogil=True, cache=True)
    def _rows(s, t, p, q, bits, dc, mu, shift, n_buckets, loss, weight):
        b, v = s.shape
        for r in range(b):
            loss[r], weight[r] = _row(s[r], t[r], p[r], q[r], bits[r], dc[r], mu, shift, n_buckets,
                                      np.empty(n_buckets), np.empty(n_buckets), np.empty(v, p.dtype), np.empty(v))


_POOL: list[ThreadPoolExecutor] = []


def _pool(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads, kept between calls (a new one when the count changes)."""
    if not _POOL or _POOL[0]._max_workers != workers:
        if _POOL:
            _POOL.pop().shutdown(wait=False)
        _POOL.append(ThreadPoolExecutor(workers, thread_name_prefix="dpkd-akl"))
    return _POOL[0]


os.register_at_fork(after_in_child=_POOL.clear)  # a forked child has none of the parent's threads


def available() -> bool:
    """Whether the compiled row kernel can be used (numba installed and ``DPKD_NO_NUMBA`` unset)."""
    return numba is not None and os.environ.get("DPKD_NO_NUMBA", "") in ("", "0")


def akl_rows_(s: torch.Tensor, t: torch.Tensor, p: torch.Tensor, q: torch.Tensor, shift_t: torch.Tensor,
              shift_s: torch.Tensor, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AKL per row from the softmaxes p, q and the raw (÷ τ) logits t, s with log p = t − shift_t,
    log q = s − shift_s: returns (ℓ, w_head) [b] and leaves d ℓ/d(S/τ) in ``s``. All [b, V] contiguous,
    on the CPU, of one float dtype."""
    single = p.dtype == torch.float32
    int_dtype, shift = (torch.int32, 18) if single else (torch.int64, 49)  # 5 (float32) / 3 mantissa bits
    one = int(torch.ones((), dtype=p.dtype).view(int_dtype))
    loss = s.new_empty(s.shape[0], dtype=torch.float64)
    weight = torch.empty_like(loss)
    args = (s.numpy(), t.numpy(), p.numpy(), q.numpy(), p.view(int_dtype).numpy(), (shift_t - shift_s).numpy())
    out = (loss.numpy(), weight.numpy())
    n_threads = min(torch.get_num_threads(), s.shape[0])
    if n_threads <= 1:
        _rows(*args, float(mu), shift, (one >> shift) + 1, *out)
    else:  # rows split between threads (the kernel releases the GIL); numba's own threading layers would
        # share or reset torch's OpenMP thread count
        bounds = [s.shape[0] * k // n_threads for k in range(n_threads + 1)]
        parts = [tuple(x[lo:hi] for x in args) + (float(mu), shift, (one >> shift) + 1) + tuple(x[lo:hi] for x in out)
                 for lo, hi in zip(bounds[:-1], bounds[1:])]
        pending = [_pool(n_threads - 1).submit(_rows, *part) for part in parts[1:]]
        _rows(*parts[0])
        for future in pending:
            future.result()
    return loss.to(s.dtype), weight.to(s.dtype)
