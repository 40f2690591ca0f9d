"""Per-block kernels of the Torch fused token-level losses: loss and d loss/d logits of a block of rows in
few passes over its ``[rows, V]`` logits, in place (``fused_token.py`` drives them over the chunks).

Each kernel takes the student block ``s`` (logits already divided by τ), the teacher block ``t`` and
scratch buffers of the block's shape, and returns a :class:`BlockResult`: ℓ per row, the extras, and the
gradient as ``diag(dense)·s`` (``s`` is left holding that part) plus sparse terms Σ coef·e_index — the
driver applies the row factors to ``[rows, H]`` matrices, never to ``[rows, V]``.

Why these formulas and not the backend's own (``token.py``, ``distill.py``, which the results equal
within the dtype table): on a CPU every pass over a ``[rows, V]`` block costs about 1–2% of the chunk's
GEMMs and an ``exp`` pass 5–10%, while autograd of the backend formula makes ~20 passes and a dense zero
gradient. Measured per 256 rows × 32000 on one core (benchmarks/RESULTS.md has the totals): a fused
``softmax`` (max, exp, sum, scale) costs about as much as ``log_softmax`` and less than a bare ``exp``;
``argmax`` costs 17× ``amax``; a stable sort of the vocabulary costs more than the three GEMMs. So:

* both log-softmaxes come from ONE softmax each (:func:`softmax_and_log_`: log p = (x − max) − log Z with
  log Z = −log max p, the softmax's largest entry being 1/Z);
* the argmax is the first maximum of the first maximal block of 128 columns (:func:`argmax_rows`);
* token DPKD's sigmoid and IPO forms have a gradient on two entries per row (y^t and y^s: the margin is a
  raw-logit gap), so no backward GEMM at all; DPOP's hinge adds λ·k·softmax;
* AKL's head (the top tokens of p up to mass μ) is found by a histogram over the float bits of p, which
  order like its values, and an exact sort of the one bucket where the mass crosses μ — not a sort of V;
  with numba installed, that search, both KLs and the gradient run as one compiled loop per row
  (``backends/_akl_numba.py``: ~20 eager passes over the block become two reads of each row while it is in cache).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ._base import positive_part, smoothed_sigmoid_loss, softplus

__all__ = ["BlockResult", "TokenKernel", "token_kernel", "argmax_rows", "softmax_and_log_", "akl_head_weight"]


@dataclass
class BlockResult:
    """One block's ℓ per row [b], its extras ([b] each), and d ℓ/d logits = diag(dense)·s + Σ coef·e_index
    (``dense`` None: no dense part; ``s`` is then free)."""

    loss: torch.Tensor
    dense: torch.Tensor | None = None
    sparse: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


#: ``block(s, t, labels, scratch)`` → BlockResult; ``s``/``t`` [b, V] are overwritten.
BlockFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None, list[torch.Tensor]], BlockResult]


@dataclass(frozen=True)
class TokenKernel:
    """A named token loss as a block kernel: what it needs (teacher logits, scratch buffers), whether its
    gradient has a dense part (the two backward GEMMs), the temperature the logits are divided by and the
    names of its extras (so that a call with no counted rows still returns them, empty or zero)."""

    block: BlockFn
    teacher: bool = True
    scratch: int = 0
    dense: bool = True
    temperature: float = 1.0
    extras: tuple[str, ...] = ()
    #: rows per block and thread (0: the driver's default): AKL's head search runs ~40 small operations
    #: per block, whose fixed cost more rows share
    rows_per_thread: int = 0


# --------------------------------------------------------------------------------------------------
# Shared pieces


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index[:, None]).squeeze(1)


def argmax_rows(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The first index of each row's maximum (torch.argmax's tie rule), from block maxima.

    The first maximum lies in the first block whose maximum is the row's; ``amax`` over blocks is a
    vectorised reduction, ``argmax`` then runs on [b, V/block] and on one block per row."""
    b, v = x.shape
    n_blocks, rest = divmod(v, block)
    if n_blocks < 2:
        return x.argmax(1)
    maxima = x[:, : n_blocks * block].view(b, n_blocks, block).amax(2)
    if rest:
        maxima = torch.cat([maxima, x[:, n_blocks * block:].amax(1, keepdim=True)], 1)
    first = maxima.argmax(1)
    # the last block may be short: clamped columns repeat the row's last entry, after its first copy
    cols = (first[:, None] * block + torch.arange(block, device=x.device)).clamp_max_(v - 1)
    return first * block + x.gather(1, cols).argmax(1)


def softmax_and_log_(x: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
    """``probs`` ← softmax(x) and x ← log_softmax(x) in place, from one exp pass; returns log Z (of x − max).

    log Z = −log max(softmax) (the maximal entry is exp(0)/Z), and log_softmax = (x − max) − log Z is
    formed in that order, as ``log_softmax`` does, so it stays exact near the maximum for logits of any
    size. ``probs`` None: only x ← log_softmax(x) (``log_softmax``'s own in-place kernel)."""
    if probs is None:
        torch.log_softmax(x, 1, out=x)
        return -x.amax(1)
    row_max = x.amax(1, keepdim=True)
    torch.softmax(x, 1, out=probs)
    log_z = -probs.amax(1).log()
    x.sub_(row_max).sub_(log_z[:, None])
    return log_z


def _softmax_and_shift(x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``probs`` ← softmax(x), x left as it is; returns c = max + log Z, so that log_softmax(x) = x − c."""
    row_max = x.amax(1)
    torch.softmax(x, 1, out=probs)
    return row_max - probs.amax(1).log()


def _vecdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vecdot(a, b)


# --------------------------------------------------------------------------------------------------
# Token-level DPKD (the argmax preference; token.py has the formula and its derivation)


def _dpkd_block(beta: float, form: str, label_smoothing: float, reference_free: bool, lambda_: float) -> BlockFn:
    def block(s: torch.Tensor, t: torch.Tensor | None, _: Any, scratch: list[torch.Tensor]) -> BlockResult:
        y_t, y_s = argmax_rows(t), argmax_rows(s)
        h = _gather(s, y_t) - _gather(s, y_s)  # a − b as the raw-logit gap (the normalisers cancel)
        if not reference_free:
            h = h - (_gather(t, y_t) - _gather(t, y_s))
        softmax_and_log_(s, None)
        softmax_and_log_(t, None)
        a, b, c, d = _gather(s, y_t), _gather(s, y_s), _gather(t, y_t), _gather(t, y_s)
        z = beta * h
        if form == "sigmoid":
            loss = smoothed_sigmoid_loss(z, label_smoothing)
            dh = beta * (label_smoothing * torch.sigmoid(z) - (1.0 - label_smoothing) * torch.sigmoid(-z))
        elif form == "ipo":
            loss = (h - 1.0 / (2.0 * beta)) ** 2
            dh = 2.0 * (h - 1.0 / (2.0 * beta))
        else:  # dpop
            loss = softplus(-z) + lambda_ * positive_part(c - a)
            dh = -beta * torch.sigmoid(-z)
        agree = y_t == y_s
        dh = torch.where(agree, 0.0, dh)  # e_{y^t} − e_{y^s} = 0: no gradient (and no ±dh rounding)
        sparse: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ((y_t, dh), (y_s, -dh))
        dense = None
        if form == "dpop":  # λ·max(0, c − a), a = log q[y^t]: gradient λ·k·(q − e_{y^t}), k = 1[c > a]
            k = lambda_ * (c > a).to(s.dtype)
            s.exp_()
            dense = k
            sparse = (*sparse, (y_t, -k))
        extras = {"agree": agree.to(s.dtype), "chosen": beta * (a - c), "rejected": beta * (b - d)}
        return BlockResult(loss, dense, sparse, extras)

    return block


# --------------------------------------------------------------------------------------------------
# Divergences (distill.py): p = softmax(T/τ), q = softmax(S/τ); gradients w.r.t. S/τ


def _forward_kl_block(s: torch.Tensor, t: torch.Tensor | None, _: Any, scratch: list[torch.Tensor]) -> BlockResult:
    """KL(p‖q) = Σ p (log p − log q); d/d(S/τ) = q − p."""
    p, q = scratch
    softmax_and_log_(t, p)
    softmax_and_log_(s, q)
    loss = _vecdot(p, t.sub_(s))
    torch.sub(q, p, out=s)
    return BlockResult(loss, s.new_ones(s.shape[0]))


def _reverse_kl_block(s: torch.Tensor, t: torch.Tensor | None, _: Any, scratch: list[torch.Tensor]) -> BlockResult:
    """KL(q‖p) = Σ q (log q − log p); d/d(S/τ) = q ⊙ (log q − log p − KL)."""
    (q,) = scratch
    softmax_and_log_(t, None)
    softmax_and_log_(s, q)
    ratio = torch.sub(s, t, out=t)
    loss = _vecdot(q, ratio)
    torch.mul(ratio.sub_(loss[:, None]), q, out=s)
    return BlockResult(loss, s.new_ones(s.shape[0]))


def _jsd_block(beta: float) -> BlockFn:
    """β KL(p‖M) + (1−β) KL(q‖M), M = (1−β)q + βp (0 < β < 1); d/d(S/τ) = (1−β)·q ⊙ (log q − log M −
    KL(q‖M)) (the p-terms do not depend on q, and Σ_v M log M differentiates to log M + 1)."""

    def block(s: torch.Tensor, t: torch.Tensor | None, _: Any, scratch: list[torch.Tensor]) -> BlockResult:
        p, q, log_m = scratch
        softmax_and_log_(t, p)
        softmax_and_log_(s, q)
        torch.lerp(q, p, beta, out=log_m)
        # where p and q both underflow, M = 0: any finite log M gives the same 0·(finite) terms
        log_m.clamp_min_(torch.finfo(log_m.dtype).tiny).log_()
        kl_p = _vecdot(p, t.sub_(log_m))
        kl_q = _vecdot(q, s.sub_(log_m))
        s.sub_(kl_q[:, None]).mul_(q)
        return BlockResult(beta * kl_p + (1.0 - beta) * kl_q, s.new_full((s.shape[0],), 1.0 - beta))

    return block


def akl_head_weight(p: torch.Tensor, gap: torch.Tensor, mu: float) -> torch.Tensor:
    """AKL's head weight g_head / (g_head + g_tail) per row (0.5 where p = q), without sorting V.

    The head is the tokens of p in descending order while the running mass C_k ≤ μ, and always the first,
    with ``dpkd.spec``'s tie rule (spec/README.md "Tie rule": a run of equal values is never split — it counts
    at its last member's C — and every tied maximum is head). The bit pattern of a float ≥ 0 orders like its
    value, so its top bits (the exponent and a few mantissa bits) bucket p monotonically: histograms of the
    mass and of |p − q| per bucket give, from the top, the bucket where the mass crosses μ and all that lies
    above it; only that bucket's entries (well under 1% of V) are sorted, by value descending, to place the
    cut exactly (equal values have equal bits: one bucket holds a whole run of ties). ``p`` and ``gap``
    [b, V], contiguous."""
    b, v = p.shape
    single = p.dtype == torch.float32
    int_dtype, shift = (torch.int32, 18) if single else (torch.int64, 49)  # 5 (float32) / 3 mantissa bits
    bits = p.view(int_dtype)
    one = int(torch.ones((), dtype=p.dtype).view(int_dtype))
    n_buckets = (one >> shift) + 1
    coarse = bits >> shift
    index = coarse.long()
    mass = p.new_zeros(b, n_buckets).scatter_add_(1, index, p).flip(1).cumsum(1)  # from the top bucket down
    gaps = p.new_zeros(b, n_buckets).scatter_add_(1, index, gap).flip(1).cumsum(1)
    j = (mass <= mu).sum(1)  # buckets (from the top) wholly inside the head; the next holds the crossing
    above = (j - 1).clamp_min(0)[:, None]
    mass_above = torch.where(j > 0, mass.gather(1, above).squeeze(1), 0.0)
    gap_above = torch.where(j > 0, gaps.gather(1, above).squeeze(1), 0.0)
    edge = (n_buckets - 1 - j).to(int_dtype)
    # 1 in the crossing bucket, else 0, in place by integer arithmetic: on this CPU a comparison's bool
    # output (and a select on it) costs several plain passes
    flag = coarse.sub_(edge[:, None]).abs_().clamp_(max=1).neg_().add_(1)
    flat = flag.view(-1).nonzero().squeeze(1)  # ascending: row, then index
    row = flat // v
    rank = one - bits.view(-1).index_select(0, flat).long()  # ≥ 0, ascending = value descending
    if single:  # one sort on (row, value descending); the order of equal values does not matter
        order = torch.sort(row * 2**31 + rank).indices
    else:
        order = torch.sort(rank, stable=True).indices
        order = order[torch.sort(row[order], stable=True).indices]
    flat, row = flat[order], row[order]
    values = p.view(-1).index_select(0, flat)
    cum = values.double().cumsum(0)
    counts = torch.bincount(row, minlength=b)
    start = torch.cumsum(counts, 0) - counts  # each row's first position among the sorted candidates
    within = cum - torch.where(start > 0, cum[(start - 1).clamp_min(0)], 0.0)[row]  # running mass in the bucket
    # the tie rule: a run of equal values (adjacent now; one bucket holds them all) counts at its last member
    within = within[_run_ends(row, values)]
    first = (mass_above == 0)[row] & (values == values[start[row]])  # every tied maximum of the row
    head = (mass_above.double()[row] + within <= mu) | first
    in_head = torch.where(head, gap.view(-1).index_select(0, flat), 0.0)
    g_head = gap_above + p.new_zeros(b).index_add_(0, row, in_head)
    total = gaps[:, -1]
    return torch.where(total > 0, g_head / torch.where(total > 0, total, 1.0), 0.5)


def _run_ends(row: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """For entries sorted by (row, value descending), the position of the last entry of each one's run of
    equal values in its row."""
    n = row.shape[0]
    last = torch.ones(n, dtype=torch.bool, device=row.device)
    last[:-1] = (row[1:] != row[:-1]) | (values[1:] != values[:-1])
    position = torch.arange(n, device=row.device)
    return torch.where(last, position, n).flip(0).cummin(0).values.flip(0)


def _akl_block(mu: float) -> BlockFn:
    """w_h KL(p‖q) + (1 − w_h) KL(q‖p), w_h from the head/tail gaps (a constant for the gradient):
    d/d(S/τ) = w_h (q − p) + (1 − w_h) q ⊙ (log q − log p − KL(q‖p))
             = q ⊙ ((w_h − 1)(log p − log q) + w_h − (1 − w_h) KL(q‖p)) − w_h p   (three passes)."""

    from .. import _akl_numba  # imports numba, if it is installed: only when AKL is used

    compiled = _akl_numba.available()

    def block(s: torch.Tensor, t: torch.Tensor | None, _: Any, scratch: list[torch.Tensor]) -> BlockResult:
        p, q = scratch
        c_t, c_s = _softmax_and_shift(t, p), _softmax_and_shift(s, q)
        if compiled and s.device.type == "cpu":  # the rest in compiled loops over each row (backends/_akl_numba.py)
            loss, _ = _akl_numba.akl_rows(s.numpy(), t.numpy(), p.numpy(), q.numpy(), (c_t - c_s).numpy(), mu,
                                          torch.get_num_threads())
            return BlockResult(torch.from_numpy(loss).to(s.dtype), s.new_ones(s.shape[0]))
        # log p − log q = (T − S) − (c_t − c_s): no log-softmax pass on either side
        ratio = t.sub_(s).sub_((c_t - c_s)[:, None])
        fkl, rkl = _vecdot(p, ratio), -_vecdot(q, ratio)
        w = akl_head_weight(p, torch.sub(p, q, out=s).abs_(), mu)
        torch.addcmul((w - (1.0 - w) * rkl)[:, None], ratio, (w - 1.0)[:, None], out=ratio)
        torch.mul(ratio, q, out=s).addcmul_(p, -w[:, None])
        return BlockResult(w * fkl + (1.0 - w) * rkl, s.new_ones(s.shape[0]))

    return block


def _cross_entropy_block(s: torch.Tensor, _: Any, labels: torch.Tensor | None, scratch: list[torch.Tensor]
                         ) -> BlockResult:
    """−log q[y] = (max − S[y]) + log Z; d/dS = q − e_y."""
    picked = _gather(s, labels)
    row_max = s.amax(1)
    torch.softmax(s, 1, out=s)
    loss = (row_max - picked) - s.amax(1).log()
    return BlockResult(loss, s.new_ones(s.shape[0]), ((labels, -s.new_ones(s.shape[0])),))


# --------------------------------------------------------------------------------------------------
# The registry: a named loss and its options → its kernel


def token_kernel(name: str, options: Mapping[str, Any]) -> TokenKernel | None:
    """The kernel of the backend's token loss ``name`` with ``options`` (None: no kernel for it).

    The options are the caller's, checked by the backend function before any kernel runs."""
    o = dict(options)
    temperature = float(o.get("temperature", 1.0))
    if name == "dpkd_token_loss":
        block = _dpkd_block(float(o.get("beta", 0.1)), o.get("form", "sigmoid"), float(o.get("label_smoothing", 0.0)),
                            bool(o.get("reference_free", False)), float(o.get("lambda_", 50.0)))
        return TokenKernel(block, dense=o.get("form", "sigmoid") == "dpop", extras=("agree", "chosen", "rejected"))
    if name == "forward_kl":
        return TokenKernel(_forward_kl_block, scratch=2, temperature=temperature)
    if name == "reverse_kl":
        return TokenKernel(_reverse_kl_block, scratch=1, temperature=temperature)
    if name == "generalized_jsd":
        beta = float(o.get("beta", 0.5))
        if beta == 0.0:  # the end points are the two KLs (distill.generalized_jsd's convention)
            return TokenKernel(_forward_kl_block, scratch=2, temperature=temperature)
        if beta == 1.0:
            return TokenKernel(_reverse_kl_block, scratch=1, temperature=temperature)
        return TokenKernel(_jsd_block(beta), scratch=3, temperature=temperature)
    if name == "akl":
        return TokenKernel(_akl_block(float(o.get("mu", 0.5))), scratch=2, temperature=temperature,
                           rows_per_thread=32)
    if name == "cross_entropy":
        return TokenKernel(_cross_entropy_block, teacher=False)
    return None

