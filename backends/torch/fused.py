"""The fused, token-chunked lm_head path of the Torch backend (DESIGN.md §5).

Materialising the logits ``[N, V]`` (N = batch × tokens) is what limits distillation at scale. Every loss
here takes the hidden states and the lm_head weight instead, and walks over chunks of TOKENS, so the live
logits are ``chunk × V`` whatever N is; the results equal the materialised path within the dtype table.

Three building blocks:

* ``linear_token_logps`` — projection + log-softmax + gather per token. Forward keeps only the per-token
  log-prob and log-sum-exp; backward recomputes each chunk's logits and forms grad_hidden and grad_weight
  (4 GEMMs of N×H×V in all: its upstream gradient is unknown during the forward).
* ``fused_sequence_loss`` (``fused_dpkd_loss``, ``fused_ipo_loss``, ``fused_cpo_loss``, ``fused_simpo_loss``,
  ``fused_dpop_loss``) — a sequence-level loss on the summed log-probs. d loss / d token-logp is one scalar
  per sequence (SPEC-MATH Eq. 8/9 through the chain rule), known as soon as that sequence's pair is done.
  So when whole pairs fit the chunk budget the loss and its gradient come out of ONE pass (3 GEMMs:
  forward, grad_hidden, grad_weight) and backward only scales by the upstream scalar ("single_pass");
  otherwise, or under ``reduction="none"``, it falls back to ``linear_token_logps`` ("two_pass").
* ``fused_token_loss`` (``fused_dpkd_token_loss``, ``fused_forward_kl``, ``fused_reverse_kl``,
  ``fused_generalized_jsd``, ``fused_akl``, ``fused_cross_entropy``) — token-level losses that need the
  whole student and teacher distributions at the same positions: both logit chunks are computed together,
  the backend's own per-token formula runs on each chunk, and autograd of that chunk gives d loss/d logits.

What a chunk costs beyond its GEMMs (measured on a CPU, benchmarks/RESULTS.md): a max, an exp and a sum
over the ``[rows, V]`` buffer, nothing more. The gradient of Σ g·logp is taken from exp(logits − max) as it
is — G = diag(−g/Σ)·E + onehot·g, so the row factors are applied to ``[rows, H]`` matrices, not to the
buffer (``_backprop_logp_chunk``); the chosen and rejected rows of a pair go through ONE product (on a CPU a
256-row GEMM ran ~1.6× slower per row than a 512-row one); grad_weight is written by the first chunk, not
zero-filled; and gradients computed during the forward are handed to autograd without a copy (a second
backward through the same graph recomputes them), so the peak holds one grad_weight, not two.

The teacher side (its hidden size may differ from the student's) runs without gradient: it is frozen in
distillation. The loss formulas are the backend's (``dpkd.backends.torch.sequence``, ``.token``,
``.distill``), never re-written here; any callable with the same contract can be fused.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from dpkd.spec import validation as v
from dpkd.spec.results import PreferenceLoss, TokenPreferenceLoss

from ._base import ValueChecks, compute_dtype

__all__ = [
    "DEFAULT_CHUNK_BYTES",
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
    "fused_token_loss",
    "fused_dpkd_token_loss",
    "fused_forward_kl",
    "fused_reverse_kl",
    "fused_generalized_jsd",
    "fused_akl",
    "fused_cross_entropy",
]

#: Bytes one chunk's logits buffer may take when ``chunk_size`` is not given (64 MiB: 524 rows of float32
#: at V = 32000). Peak memory beyond the inputs and gradients is about this, whatever N is.
DEFAULT_CHUNK_BYTES = 64 * 2**20

# Live [chunk, V] buffers per chunk: the sequence/logp paths work in place in one buffer; the token-level
# losses keep student and teacher logits plus autograd's temporaries of the per-chunk loss.
TOKEN_LOSS_BUFFERS = 8


def auto_chunk_size(vocab_size: int, *, n_rows: int, itemsize: int = 4, buffers: int = 1,
                    budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that ``buffers`` live ``[rows, vocab_size]`` arrays fit ``budget_bytes``.

    Clamped to [1, n_rows]. Example: ``auto_chunk_size(32000, n_rows=4096)`` → 524.
    """
    rows = budget_bytes // max(1, vocab_size * itemsize * buffers)
    return int(max(1, min(rows, max(1, n_rows))))


@dataclass(frozen=True)
class TeacherLMHead:
    """The teacher as hidden states + lm_head (no gradient flows into it).

    chosen_hidden [B, T_c, H_t] at the teacher-output rows, rejected_hidden [B, T_s, H_t] at the
    student-output rows, weight [V, H_t], bias [V] or None. H_t may differ from the student's H.
    """

    chosen_hidden: torch.Tensor
    rejected_hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass(frozen=True)
class TeacherLogps:
    """Precomputed teacher sequence log-probs (c = log p(y_t|x), d = log p(y_s|x)), each [B]; constants."""

    chosen: torch.Tensor
    rejected: torch.Tensor


# --------------------------------------------------------------------------------------------------
# Validation (shapes and dtypes always; values eagerly through the backend's ValueChecks)


def _check_lm_head(func: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
                   names: tuple[str, str, str], lead: tuple[int, ...] | None = None) -> None:
    """hidden [..., H] floating, weight [V, H] of the same dtype, bias [V]; ``lead`` pins hidden's [...]."""
    h_name, w_name, b_name = names
    for name, t in ((h_name, hidden), (w_name, weight), (b_name, bias)):
        if t is not None:
            v.check_floating_dtype(func, name, t.is_floating_point(), t.dtype)
    v.check_lm_head_shapes(func, tuple(hidden.shape), tuple(weight.shape),
                           None if bias is None else tuple(bias.shape), names=names, lead=lead)
    for name, t in ((w_name, weight), (b_name, bias)):
        if t is not None:
            v.check_same_dtype(func, name, t.dtype, h_name, hidden.dtype)
        if t is not None and t.device != hidden.device:
            v.fail(func, name, f"is on device {t.device} but `{h_name}` is on {hidden.device}; move them to one device")


def _finite(checks: ValueChecks, name: str, t: torch.Tensor | None) -> None:
    """The finite check of a (large) hidden-state or lm_head array, as two read-only reductions.

    max and min propagate NaN and are ±inf exactly when an entry is, so the [2]-element check below is
    equivalent to ``isfinite(t).all()`` without its four full-size temporaries (which cost more than the
    softmax of a chunk at V = 32k)."""
    if t is not None and checks.enabled and t.numel() > 0:
        checks.finite(name, torch.stack([t.detach().amax(), t.detach().amin()]))


def _check_labels(func: str, name: str, labels: torch.Tensor, shape: tuple[int, ...]) -> None:
    integer = not labels.is_floating_point() and not labels.is_complex() and labels.dtype != torch.bool
    v.check_integer_dtype(func, name, integer, labels.dtype)
    if tuple(labels.shape) != tuple(shape):
        v.fail(func, name, f"has shape {tuple(labels.shape)}, expected {tuple(shape)} "
                           "(the shape of the hidden states without their hidden axis)")


def _check_same_vocab(func: str, student_weight: torch.Tensor, teacher_weight: torch.Tensor,
                      names: tuple[str, str] = ("weight", "teacher_weight")) -> None:
    if teacher_weight.ndim == 2:
        v.check_same_vocab(func, names[1], teacher_weight.shape[0], names[0], student_weight.shape[0])


# --------------------------------------------------------------------------------------------------
# Per-chunk kernels. ``buf`` is a [rows, V] scratch buffer reused by every chunk; all updates are in place
# so that one chunk costs one buffer.


def _project(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """out ← rows @ weightᵀ (+ bias): the chunk's logits."""
    if bias is None:
        torch.mm(rows, weight.t(), out=out)
    else:
        torch.addmm(bias, rows, weight.t(), out=out)


def _softmax_stats_(buf: torch.Tensor, safe_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From logits in ``buf``: (logit of the label, logsumexp, Σ exp) per row; ``buf`` is left holding
    exp(logits − row max), the unnormalised softmax (its 1/Σ is folded into the gradient's scale)."""
    picked = buf.gather(1, safe_labels[:, None]).squeeze(1)
    row_max = buf.amax(1)
    buf.sub_(row_max[:, None]).exp_()
    total = buf.sum(1)
    return picked, row_max + total.log(), total


class _LMHeadGrads:
    """grad_weight and grad_bias summed over chunks in the compute dtype (float32 or wider).

    The first chunk writes them (``mm(out=)``), later ones accumulate: no zero fill of a V×H buffer."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, need_w: bool, need_b: bool):
        self.weight = torch.empty_like(weight) if need_w else None
        self.bias = torch.empty_like(bias) if (need_b and bias is not None) else None
        self.started = False

    def add(self, dlogits: torch.Tensor, rows: torch.Tensor, bias_rows: torch.Tensor | None = None) -> None:
        """grad_weight += dlogitsᵀ @ rows; grad_bias += dlogitsᵀ @ bias_rows (Σ over rows when None)."""
        if self.weight is not None:
            if self.started:
                self.weight.addmm_(dlogits.t(), rows)
            else:
                torch.mm(dlogits.t(), rows, out=self.weight)
        if self.bias is not None:
            col = dlogits.sum(0) if bias_rows is None else torch.mv(dlogits.t(), bias_rows)
            if self.started:
                self.bias.add_(col)
            else:
                self.bias.copy_(col)
        self.started = True

    def add_at_labels(self, labels: torch.Tensor, rows: torch.Tensor, scale: torch.Tensor) -> None:
        """grad_weight[labels] += scale · rows, grad_bias[labels] += scale (after a first ``add``)."""
        if self.weight is not None:
            self.weight.index_add_(0, labels, rows * scale[:, None])
        if self.bias is not None:
            self.bias.index_add_(0, labels, scale)

    def result(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.started:  # no chunk at all (no rows): the gradient is zero
            for g in (self.weight, self.bias):
                if g is not None:
                    g.zero_()
        return self.weight, self.bias


def _backprop_chunk(dlogits: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor,
                    grad_rows: torch.Tensor | None, head: _LMHeadGrads) -> None:
    """grad_rows ← dlogits @ W; grad_weight += dlogitsᵀ @ rows; grad_bias += Σ_rows dlogits."""
    if grad_rows is not None:
        torch.mm(dlogits, weight, out=grad_rows)
    head.add(dlogits, rows)


def _backprop_logp_chunk(exp_logits: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor,
                         safe_labels: torch.Tensor, g: torch.Tensor, total: torch.Tensor | None,
                         grad_rows: torch.Tensor | None, head: _LMHeadGrads) -> None:
    """Backprop of Σ_n g_n·logp_n through one chunk's logits, with ``exp_logits`` = exp(logits − s_n) and
    ``total`` = Σ_v exp_logits (None: exp_logits is the softmax itself).

    G = g·(onehot − softmax) = diag(r)·E + onehot·g with r = −g/total, so both products take E as it is
    and the row factors act on [rows, H] matrices: grad_rows = r ⊙ (E @ W) + g ⊙ W[label], grad_weight
    += Eᵀ(r ⊙ rows) + scatter of g ⊙ rows at the labels. No pass over the [rows, V] buffer is spent on
    forming G (on a CPU each such pass costs about as much as 1–2% of the three GEMMs)."""
    r = -g if total is None else -g / total
    if grad_rows is not None:
        torch.mm(exp_logits, weight, out=grad_rows)
        grad_rows.mul_(r[:, None]).add_(weight.index_select(0, safe_labels) * g[:, None])
    head.add(exp_logits, rows * r[:, None], bias_rows=r)
    head.add_at_labels(safe_labels, rows, g)


def _chunk_logps(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                 ignore_index: int, buf: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-probs of one chunk (0 where ignored), its logsumexp, Σ exp and the safe labels;
    ``buf`` ends as exp(logits − row max)."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    _project(rows, weight, bias, buf)
    picked, lse, total = _softmax_stats_(buf, safe)
    return torch.where(valid, picked - lse, 0.0), lse, total, safe


class _HandedGradients:
    """Gradients computed in the forward, handed to autograd once and scaled in place.

    Returning saved tensors would make autograd copy them into ``.grad`` (they are still referenced): one
    more grad_weight (V×H) and grad_hidden at the peak. Handing them over and dropping our reference lets
    autograd take them as they are. A second backward through the same graph (``retain_graph=True``)
    finds them gone and recomputes them with ``recompute`` (the forward's pass again)."""

    def __init__(self, grads: tuple[torch.Tensor | None, ...],
                 recompute: Callable[[], tuple[torch.Tensor | None, ...]]):
        self.grads: tuple[torch.Tensor | None, ...] | None = grads
        self.recompute = recompute

    def hand_out(self, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads, self.grads = self.grads, None
        if grads is None:
            grads = self.recompute()
        return tuple(None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads)


# --------------------------------------------------------------------------------------------------
# linear_token_logps


@dataclass(frozen=True)
class _ChunkOptions:
    chunk_size: int
    ignore_index: int


class _LinearTokenLogps(torch.autograd.Function):
    """logp[n] = log_softmax(hidden[n] @ Wᵀ + b)[labels[n]], chunked over tokens (see linear_token_logps)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor, opts: _ChunkOptions) -> torch.Tensor:
        n, size = hidden.shape[0], opts.chunk_size
        logps = hidden.new_empty(n)
        lse = hidden.new_empty(n)
        buf = hidden.new_empty(min(size, n), weight.shape[0])
        for i0 in range(0, n, size):
            i1 = min(i0 + size, n)
            logps[i0:i1], lse[i0:i1], _, _ = _chunk_logps(hidden[i0:i1], weight, bias, labels[i0:i1],
                                                          opts.ignore_index, buf[: i1 - i0])
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.opts = opts
        return logps

    @staticmethod
    def backward(ctx: Any, grad_logps: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        opts: _ChunkOptions = ctx.opts
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        head = _LMHeadGrads(weight, bias, need_w, need_b)
        if not (need_h or need_w or need_b):
            return None, None, None, None, None
        valid = labels != opts.ignore_index
        safe = torch.where(valid, labels, 0)
        g = torch.where(valid, grad_logps, 0.0).to(hidden.dtype)
        n, size = hidden.shape[0], opts.chunk_size
        buf = hidden.new_empty(min(size, n), weight.shape[0])
        for i0 in range(0, n, size):
            i1 = min(i0 + size, n)
            chunk = buf[: i1 - i0]
            _project(hidden[i0:i1], weight, bias, chunk)
            chunk.sub_(lse[i0:i1, None]).exp_()  # the softmax, from the saved logsumexp
            _backprop_logp_chunk(chunk, hidden[i0:i1], weight, safe[i0:i1], g[i0:i1], None,
                                 None if grad_h is None else grad_h[i0:i1], head)
        return grad_h, *head.result(), None, None


def linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-token log-probabilities of an lm_head, without materialising the logits.

    logp[n] = log_softmax(hidden[n] @ weightᵀ + bias)[labels[n]]  (SPEC-MATH §1, the token log-prob that
    Eq. 8/9 sum), exactly 0 where ``labels == ignore_index``. Computed over chunks of ``chunk_size`` token
    rows: the forward keeps only logp and the logsumexp per token; the backward recomputes each chunk's
    logits, forms grad_hidden = G @ W and accumulates grad_weight += Gᵀ @ hidden (G = g·(onehot − softmax))
    in float32 or wider. Peak extra memory ≈ chunk_size × V × 4 bytes, whatever N is.

    Args:
        hidden: [..., H] (usually [N, H]) float.
        weight: [V, H], same dtype as ``hidden``.
        labels: [...] integer, values in [0, V) or ``ignore_index``.
        bias: optional [V].
        chunk_size: token rows per chunk; default ``auto_chunk_size(V, n_rows=N)`` (a 64 MiB buffer).
        ignore_index: label value that contributes 0.
    Returns:
        [...] log-probs, in float32 for bfloat16/float16 inputs, else in the input dtype.

    Example:
        >>> h, w = torch.randn(6, 4), torch.randn(10, 4)
        >>> linear_token_logps(h, w, torch.tensor([1, 2, 3, -100, 0, 9]), chunk_size=4).shape
        torch.Size([6])

    See also: ``token_logps`` (the materialised form), ``fused_sequence_loss``. Reference: Liger-Kernel's
    fused linear cross entropy and pytorch#124480 (chunked over tokens likewise).
    """
    func = "linear_token_logps"
    size = v.check_chunk_options(func, chunk_size, ignore_index)
    _check_lm_head(func, hidden, weight, bias, names=("hidden", "weight", "bias"))
    _check_labels(func, "labels", labels, tuple(hidden.shape[:-1]))
    checks = ValueChecks(func)
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        _finite(checks, name, t)
    checks.labels_in_vocab("labels", labels, weight.shape[0], ignore_index)
    checks.run()

    lead = tuple(labels.shape)
    dtype = compute_dtype(hidden.dtype)
    rows = hidden.reshape(-1, hidden.shape[-1]).to(dtype).contiguous()
    n = rows.shape[0]
    if n == 0:
        return rows.new_zeros(lead)
    size = size or auto_chunk_size(weight.shape[0], n_rows=n, itemsize=rows.element_size())
    opts = _ChunkOptions(chunk_size=size, ignore_index=int(ignore_index))
    out = _LinearTokenLogps.apply(rows, weight.to(dtype).contiguous(), None if bias is None else bias.to(dtype),
                                  labels.reshape(-1), opts)
    return out.reshape(lead)


# --------------------------------------------------------------------------------------------------
# Sequence-level losses

#: A sequence loss to fuse: ``loss(a, b, c, d, chosen_lengths=..., rejected_lengths=..., reduction=...)`` →
#: PreferenceLoss, elementwise over pairs under ``reduction="none"`` (true of every loss in SPEC-MATH §3A).
SequenceLoss = Callable[..., PreferenceLoss]


@dataclass(frozen=True)
class _SequencePlan:
    """Everything the single pass needs besides the differentiable inputs."""

    loss: SequenceLoss
    reduction: str
    chosen_labels: torch.Tensor
    rejected_labels: torch.Tensor
    chosen_lengths: torch.Tensor | None
    rejected_lengths: torch.Tensor | None
    teacher: TeacherLMHead | TeacherLogps | None
    pairs_per_chunk: int
    ignore_index: int


def _pair_grads(plan: _SequencePlan, sl: slice, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None,
                d: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂ℓ_i/∂a_i, ∂ℓ_i/∂b_i) for the pairs of one chunk, by autograd of the backend's own loss."""
    with torch.enable_grad():
        a_leaf = a.detach().requires_grad_(True)
        b_leaf = b.detach().requires_grad_(True)
        per_pair = plan.loss(a_leaf, b_leaf, c, d, chosen_lengths=_slice(plan.chosen_lengths, sl),
                             rejected_lengths=_slice(plan.rejected_lengths, sl), reduction="none").loss
        da, db = torch.autograd.grad(per_pair.sum(), (a_leaf, b_leaf), allow_unused=True)
    return (torch.zeros_like(a) if da is None else da), (torch.zeros_like(b) if db is None else db)


def _slice(t: torch.Tensor | None, sl: slice) -> torch.Tensor | None:
    return None if t is None else t[sl]


def _chunk_rows(chosen: torch.Tensor, rejected: torch.Tensor, sl: slice) -> torch.Tensor:
    """The chosen rows then the rejected rows of the pairs ``sl``, as one [n·(T_c + T_s), ...] matrix.

    One GEMM over all of a chunk's rows: on a CPU, products with 256 rows ran ~1.6× slower per row than
    with 512 (oneDNN/MKL, H = 512, V = 32000), so the two sides are not projected separately."""
    return torch.cat([chosen[sl].reshape(-1, *chosen.shape[2:]), rejected[sl].reshape(-1, *rejected.shape[2:])])


def _side_sums(per_row: torch.Tensor, n: int, t_c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair sums of a [n·(T_c + T_s)] chunk vector over its chosen and its rejected part."""
    split = n * t_c
    return per_row[:split].view(n, t_c).sum(1), per_row[split:].view(n, -1).sum(1)


def _teacher_chunk(teacher: TeacherLMHead | TeacherLogps | None, sl: slice, labels: torch.Tensor, n: int, t_c: int,
                   dtype: torch.dtype, ignore_index: int, buf: torch.Tensor
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(c, d) of the pairs ``sl``: precomputed, or from the teacher's lm_head in the shared buffer."""
    if teacher is None:
        return None, None
    if isinstance(teacher, TeacherLogps):
        return teacher.chosen[sl].to(dtype), teacher.rejected[sl].to(dtype)
    rows = _chunk_rows(teacher.chosen_hidden, teacher.rejected_hidden, sl).to(dtype)
    tb = None if teacher.bias is None else teacher.bias.to(dtype)
    logp, _, _, _ = _chunk_logps(rows, teacher.weight.to(dtype), tb, labels, ignore_index, buf)
    return _side_sums(logp, n, t_c)


def _single_pass(chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None, plan: _SequencePlan, needs: tuple[bool, ...]
                 ) -> tuple[PreferenceLoss, tuple[torch.Tensor | None, ...]]:
    """The loss over whole-pair chunks and, in the same pass, its gradient in every input ``needs`` marks."""
    need_c, need_r, need_w, need_b = needs
    n_pairs, t_c, size = chosen_hidden.shape
    t_s = rejected_hidden.shape[1]
    dtype = chosen_hidden.dtype
    grad_c = torch.empty_like(chosen_hidden) if need_c else None
    grad_r = torch.empty_like(rejected_hidden) if need_r else None
    head = _LMHeadGrads(weight, bias, need_w, need_b)
    # d(reduced loss)/d ℓ_i: the mean is over all pairs, so it is known before any pair is seen.
    scale = 1.0 / n_pairs if plan.reduction == "mean" else 1.0
    a, b = chosen_hidden.new_empty(n_pairs), chosen_hidden.new_empty(n_pairs)
    c = d = None
    if plan.teacher is not None:
        c, d = chosen_hidden.new_empty(n_pairs), chosen_hidden.new_empty(n_pairs)
    k = plan.pairs_per_chunk
    buf = chosen_hidden.new_empty(min(k, n_pairs) * (t_c + t_s), weight.shape[0])
    for i0 in range(0, n_pairs, k):
        sl = slice(i0, min(i0 + k, n_pairs))
        n = sl.stop - sl.start
        chunk = buf[: n * (t_c + t_s)]
        labels = _chunk_rows(plan.chosen_labels, plan.rejected_labels, sl)
        c_k, d_k = _teacher_chunk(plan.teacher, sl, labels, n, t_c, dtype, plan.ignore_index, chunk)
        if c is not None:
            c[sl], d[sl] = c_k, d_k
        rows = _chunk_rows(chosen_hidden, rejected_hidden, sl)
        logp, _, total, safe = _chunk_logps(rows, weight, bias, labels, plan.ignore_index, chunk)
        a[sl], b[sl] = _side_sums(logp, n, t_c)
        da, db = _pair_grads(plan, sl, a[sl], b[sl], c_k, d_k)
        # every token of sequence i gets d loss/d logp = scale · ∂ℓ_i/∂(its summed logp)
        g = torch.cat([(scale * da).repeat_interleave(t_c), (scale * db).repeat_interleave(t_s)]).to(dtype)
        g = g * (labels != plan.ignore_index)
        grad_rows = rows.new_empty(rows.shape) if (need_c or need_r) else None
        _backprop_logp_chunk(chunk, rows, weight, safe, g, total, grad_rows, head)
        if grad_c is not None:
            grad_c[sl] = grad_rows[: n * t_c].view(n, t_c, size)
        if grad_r is not None:
            grad_r[sl] = grad_rows[n * t_c:].view(n, t_s, size)
    result = plan.loss(a, b, c, d, chosen_lengths=plan.chosen_lengths, rejected_lengths=plan.rejected_lengths,
                       reduction=plan.reduction)
    return result, (grad_c, grad_r, *head.result())


class _SinglePassSequenceLoss(torch.autograd.Function):
    """Loss and its gradient in one pass over whole pairs; backward scales by the upstream scalar."""

    @staticmethod
    def forward(ctx: Any, chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, plan: _SequencePlan) -> tuple[torch.Tensor, ...]:
        inputs, needs = (chosen_hidden, rejected_hidden, weight, bias, plan), tuple(ctx.needs_input_grad[:4])
        result, grads = _single_pass(*inputs, needs)
        ctx.grads = _HandedGradients(grads, lambda: _single_pass(*inputs, needs)[1])
        rewards = (result.chosen_rewards.detach(), result.rejected_rewards.detach())
        ctx.mark_non_differentiable(*rewards)
        return (result.loss.detach(), *rewards)

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        return (*ctx.grads.hand_out(grad_loss), None)


def _two_pass_sequence(loss: SequenceLoss, chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor,
                       weight: torch.Tensor, bias: torch.Tensor | None, plan: _SequencePlan,
                       chunk_size: int) -> PreferenceLoss:
    """Summed ``linear_token_logps`` per sequence, then the loss with ordinary autograd (4 GEMMs).

    Chosen and rejected rows go through ONE ``linear_token_logps`` call: two calls would each build a
    V×H grad_weight and autograd would add them (two at the peak)."""
    n_pairs = chosen_hidden.shape[0]
    t_c = chosen_hidden.shape[1]
    every = slice(0, n_pairs)
    labels = _chunk_rows(plan.chosen_labels, plan.rejected_labels, every)
    opts = _ChunkOptions(chunk_size=chunk_size, ignore_index=plan.ignore_index)

    def pair_sums(chosen: torch.Tensor, rejected: torch.Tensor, w: torch.Tensor, bb: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = _chunk_rows(chosen, rejected, every).to(weight.dtype).contiguous()
        bb = None if bb is None else bb.to(weight.dtype)
        logps = _LinearTokenLogps.apply(rows, w.to(weight.dtype).contiguous(), bb, labels, opts)
        return _side_sums(logps, n_pairs, t_c)

    a, b = pair_sums(chosen_hidden, rejected_hidden, weight, bias)
    c = d = None
    teacher = plan.teacher
    if isinstance(teacher, TeacherLogps):
        c, d = teacher.chosen.to(weight.dtype), teacher.rejected.to(weight.dtype)
    elif isinstance(teacher, TeacherLMHead):
        with torch.no_grad():
            c, d = pair_sums(teacher.chosen_hidden, teacher.rejected_hidden, teacher.weight, teacher.bias)
    out = loss(a, b, c, d, chosen_lengths=plan.chosen_lengths, rejected_lengths=plan.rejected_lengths,
               reduction=plan.reduction)
    return PreferenceLoss(out.loss, out.chosen_rewards.detach(), out.rejected_rewards.detach())


def _check_teacher(func: str, teacher: object, weight: torch.Tensor, lead_c: tuple[int, ...],
                   lead_s: tuple[int, ...], required: bool) -> TeacherLMHead | TeacherLogps | None:
    if teacher is None:
        if required:
            v.fail(func, "teacher", "is required: pass TeacherLMHead(chosen_hidden, rejected_hidden, weight) or "
                                    "TeacherLogps(chosen, rejected) (or reference_free=True)")
        return None
    checks = ValueChecks(func)
    if isinstance(teacher, TeacherLogps):
        for name, t in (("teacher.chosen", teacher.chosen), ("teacher.rejected", teacher.rejected)):
            v.check_floating_dtype(func, name, t.is_floating_point(), t.dtype)
            if tuple(t.shape) != lead_c[:1]:
                v.fail(func, name, f"has shape {tuple(t.shape)}, expected {lead_c[:1]} (one per pair)")
            _finite(checks, name, t)
        checks.run()
        return TeacherLogps(teacher.chosen.detach(), teacher.rejected.detach())
    if not isinstance(teacher, TeacherLMHead):
        v.fail(func, "teacher", f"must be a TeacherLMHead or TeacherLogps, got {type(teacher).__name__}")
    _check_same_vocab(func, weight, teacher.weight, ("weight", "teacher.weight"))
    _check_lm_head(func, teacher.chosen_hidden, teacher.weight, teacher.bias, lead=lead_c,
                   names=("teacher.chosen_hidden", "teacher.weight", "teacher.bias"))
    _check_lm_head(func, teacher.rejected_hidden, teacher.weight, teacher.bias, lead=lead_s,
                   names=("teacher.rejected_hidden", "teacher.weight", "teacher.bias"))
    for name in ("chosen_hidden", "rejected_hidden", "weight", "bias"):
        _finite(checks, f"teacher.{name}", getattr(teacher, name))
    checks.run()
    detach = (lambda t: None if t is None else t.detach())  # noqa: E731  (the teacher is frozen)
    return TeacherLMHead(detach(teacher.chosen_hidden), detach(teacher.rejected_hidden), detach(teacher.weight),
                         detach(teacher.bias))


def fused_sequence_loss(
    loss: SequenceLoss,
    chosen_hidden: torch.Tensor,
    rejected_hidden: torch.Tensor,
    weight: torch.Tensor,
    chosen_labels: torch.Tensor,
    rejected_labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    teacher: TeacherLMHead | TeacherLogps | None = None,
    teacher_required: bool = True,
    use_lengths: bool = False,
    reduction: str = "mean",
    chunk_size: int | None = None,
    mode: str = "auto",
    ignore_index: int = -100,
    func: str = "fused_sequence_loss",
) -> PreferenceLoss:
    """Any sequence-level preference loss on the student's lm_head, chunked over whole pairs or tokens.

    a_i = Σ_t log q(y_t | ·) over the chosen rows (teacher output y_t) of pair i, b_i likewise over the
    rejected rows (student output y_s), c_i, d_i the teacher's (SPEC-MATH Eq. 8/9); returns
    ``loss(a, b, c, d, chosen_lengths=L_t, rejected_lengths=L_s, reduction=reduction)`` with lengths the
    token counts when ``use_lengths`` (else None).

    Modes: "single_pass" computes the loss and its gradient in one pass (3 GEMMs) over chunks holding
    whole pairs — d loss/d logp_t = (1/B)·∂ℓ_i/∂a_i for every token t of sequence i, known once pair i is
    done — and needs a reduced loss; "two_pass" sums ``linear_token_logps`` (4 GEMMs) and works for any
    reduction and any length; "auto" picks single_pass when ``reduction != "none"`` and one pair
    (T_c + T_s rows) fits ``chunk_size`` (default: the 64 MiB budget).

    Args:
        loss: the backend sequence loss, e.g. ``lambda a, b, c, d, **kw: dpkd_loss(a, b, c, d, beta=.1, **kw)``;
            elementwise over pairs under reduction="none".
        chosen_hidden: [B, T_c, H] student hidden states at the teacher-output rows (already shifted so
            that row t predicts ``chosen_labels[:, t]``). rejected_hidden: [B, T_s, H].
        weight: [V, H] student lm_head; bias: [V] or None.
        chosen_labels: [B, T_c], rejected_labels: [B, T_s]; ``ignore_index`` on prompt and padding.
        teacher: TeacherLMHead (hidden size may differ) or TeacherLogps; no gradient flows into it.
    Returns:
        PreferenceLoss(loss, chosen_rewards, rejected_rewards), rewards detached.

    See also: ``fused_dpkd_loss`` and siblings, ``linear_token_logps``.
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
    teacher = _check_teacher(func, teacher, weight, tuple(chosen_hidden.shape[:2]),
                             tuple(rejected_hidden.shape[:2]), teacher_required)
    checks = ValueChecks(func)
    for name, t in (("chosen_hidden", chosen_hidden), ("rejected_hidden", rejected_hidden), ("weight", weight),
                    ("bias", bias)):
        _finite(checks, name, t)
    checks.labels_in_vocab("chosen_labels", chosen_labels, weight.shape[0], ignore_index)
    checks.labels_in_vocab("rejected_labels", rejected_labels, weight.shape[0], ignore_index)
    checks.run()

    dtype = compute_dtype(chosen_hidden.dtype)
    lengths = ((chosen_labels != ignore_index).sum(1), (rejected_labels != ignore_index).sum(1)) if use_lengths \
        else (None, None)
    rows_per_pair = chosen_hidden.shape[1] + rejected_hidden.shape[1]
    n_rows = chosen_hidden.shape[0] * rows_per_pair
    itemsize = torch.empty((), dtype=dtype).element_size()
    size = size or auto_chunk_size(weight.shape[0], n_rows=n_rows, itemsize=itemsize)
    if mode == "auto":
        mode = "single_pass" if reduction != "none" and rows_per_pair <= size else "two_pass"
    plan = _SequencePlan(loss=loss, reduction=reduction, chosen_labels=chosen_labels,
                         rejected_labels=rejected_labels, chosen_lengths=lengths[0], rejected_lengths=lengths[1],
                         teacher=teacher, pairs_per_chunk=max(1, size // rows_per_pair),
                         ignore_index=int(ignore_index))
    w = weight.to(dtype).contiguous()
    bb = None if bias is None else bias.to(dtype)
    if mode == "two_pass":
        return _two_pass_sequence(loss, chosen_hidden, rejected_hidden, w, bb, plan, size)
    out = _SinglePassSequenceLoss.apply(chosen_hidden.to(dtype).contiguous(), rejected_hidden.to(dtype).contiguous(),
                                        w, bb, plan)
    return PreferenceLoss(*out)


def _backend_function(name: str) -> Callable[..., Any]:
    """The backend's own loss ``name`` (looked up at call time: the backend package imports this module)."""
    package = importlib.import_module("dpkd.backends.torch")
    fn = getattr(package, name, None)
    for module in ("sequence", "token", "distill"):
        if fn is not None:
            break
        fn = getattr(importlib.import_module(f"dpkd.backends.torch.{module}"), name, None)
    if fn is None:  # pragma: no cover - a backend without the loss
        raise AttributeError(f"dpkd.backends.torch has no {name!r}")
    return fn


def fused_dpkd_loss(
    chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor, weight: torch.Tensor,
    chosen_labels: torch.Tensor, rejected_labels: torch.Tensor, *,
    teacher: TeacherLMHead | TeacherLogps | None = None, bias: torch.Tensor | None = None,
    length_normalize: bool = False, beta: float = 0.1, label_smoothing: float = 0.0,
    reference_free: bool = False, reduction: str = "mean", chunk_size: int | None = None, mode: str = "auto",
    ignore_index: int = -100,
) -> PreferenceLoss:
    """Sequence-level DPKD (SPEC-MATH Eq. 8; Eq. 9 with ``length_normalize``) on the student's lm_head.

    ℓ = (1−ε)·softplus(−βh) + ε·softplus(βh), h = (a − c)[/L_t] − (b − d)[/L_s] with policy = student,
    reference = teacher, chosen = teacher output y_t, rejected = student output y_s; L = token counts.
    Same value and gradients as ``dpkd_loss`` on materialised logits. Arguments as in
    ``fused_sequence_loss``; options as in ``dpkd_loss``.

    Example:
        >>> B, T, H, V = 2, 5, 8, 11
        >>> w = torch.randn(V, H, requires_grad=True)
        >>> lab = torch.randint(0, V, (B, T))
        >>> out = fused_dpkd_loss(torch.randn(B, T, H), torch.randn(B, T, H), w, lab, lab,
        ...                       teacher=TeacherLogps(torch.zeros(B) - 9.0, torch.zeros(B) - 12.0))
        >>> out.loss.backward()
    """
    def loss(a: Any, b: Any, c: Any, d: Any, **kw: Any) -> PreferenceLoss:
        return _backend_function("dpkd_loss")(a, b, c, d, beta=beta, label_smoothing=label_smoothing,
                             reference_free=reference_free, **kw)

    return fused_sequence_loss(loss, chosen_hidden, rejected_hidden, weight, chosen_labels, rejected_labels,
                               bias=bias, teacher=teacher, teacher_required=not reference_free,
                               use_lengths=length_normalize, reduction=reduction, chunk_size=chunk_size, mode=mode,
                               ignore_index=ignore_index, func="fused_dpkd_loss")


def fused_ipo_loss(
    chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor, weight: torch.Tensor,
    chosen_labels: torch.Tensor, rejected_labels: torch.Tensor, *,
    teacher: TeacherLMHead | TeacherLogps | None = None, bias: torch.Tensor | None = None,
    tau: float = 0.1, length_normalize: bool = True, reduction: str = "mean", chunk_size: int | None = None,
    mode: str = "auto", ignore_index: int = -100,
) -> PreferenceLoss:
    """IPO, ℓ = (h − 1/(2τ))², with length-normalised h by default (as ``ipo_loss``); see fused_dpkd_loss."""
    def loss(a: Any, b: Any, c: Any, d: Any, **kw: Any) -> PreferenceLoss:
        return _backend_function("ipo_loss")(a, b, c, d, tau=tau, length_normalize=length_normalize, **kw)

    return fused_sequence_loss(loss, chosen_hidden, rejected_hidden, weight, chosen_labels, rejected_labels,
                               bias=bias, teacher=teacher, use_lengths=length_normalize, reduction=reduction,
                               chunk_size=chunk_size, mode=mode, ignore_index=ignore_index, func="fused_ipo_loss")


def fused_cpo_loss(
    chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor, weight: torch.Tensor,
    chosen_labels: torch.Tensor, rejected_labels: torch.Tensor, *, bias: torch.Tensor | None = None,
    beta: float = 0.1, nll_weight: float = 1.0, length_normalize: bool = False, label_smoothing: float = 0.0,
    reduction: str = "mean", chunk_size: int | None = None, mode: str = "auto", ignore_index: int = -100,
) -> PreferenceLoss:
    """CPO (reference-free): z = β(a − b), plus the chosen NLL (÷ L_t with ``length_normalize``)."""
    def loss(a: Any, b: Any, c: Any, d: Any, *, chosen_lengths: Any, rejected_lengths: Any,
             reduction: str) -> PreferenceLoss:
        return _backend_function("cpo_loss")(a, b, beta=beta, nll_weight=nll_weight, chosen_lengths=chosen_lengths,
                            label_smoothing=label_smoothing, reduction=reduction)

    return fused_sequence_loss(loss, chosen_hidden, rejected_hidden, weight, chosen_labels, rejected_labels,
                               bias=bias, teacher=None, teacher_required=False, use_lengths=length_normalize,
                               reduction=reduction, chunk_size=chunk_size, mode=mode, ignore_index=ignore_index,
                               func="fused_cpo_loss")


def fused_simpo_loss(
    chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor, weight: torch.Tensor,
    chosen_labels: torch.Tensor, rejected_labels: torch.Tensor, *, bias: torch.Tensor | None = None,
    beta: float = 2.0, gamma: float = 1.0, label_smoothing: float = 0.0, reduction: str = "mean",
    chunk_size: int | None = None, mode: str = "auto", ignore_index: int = -100,
) -> PreferenceLoss:
    """SimPO (reference-free): z = βa/L_t − βb/L_s − γ, lengths = token counts."""
    def loss(a: Any, b: Any, c: Any, d: Any, **kw: Any) -> PreferenceLoss:
        return _backend_function("simpo_loss")(a, b, beta=beta, gamma=gamma, label_smoothing=label_smoothing, **kw)

    return fused_sequence_loss(loss, chosen_hidden, rejected_hidden, weight, chosen_labels, rejected_labels,
                               bias=bias, teacher=None, teacher_required=False, use_lengths=True,
                               reduction=reduction, chunk_size=chunk_size, mode=mode, ignore_index=ignore_index,
                               func="fused_simpo_loss")


def fused_dpop_loss(
    chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor, weight: torch.Tensor,
    chosen_labels: torch.Tensor, rejected_labels: torch.Tensor, *,
    teacher: TeacherLMHead | TeacherLogps | None = None, bias: torch.Tensor | None = None,
    beta: float = 0.1, lambda_: float = 50.0, form: str = "smaug", reduction: str = "mean",
    chunk_size: int | None = None, mode: str = "auto", ignore_index: int = -100,
) -> PreferenceLoss:
    """DPOP (Smaug): penalty λ·max(0, c − a) on the summed h; see ``dpop_loss``."""
    def loss(a: Any, b: Any, c: Any, d: Any, *, chosen_lengths: Any, rejected_lengths: Any,
             reduction: str) -> PreferenceLoss:
        return _backend_function("dpop_loss")(a, b, c, d, beta=beta, lambda_=lambda_, form=form, reduction=reduction)

    return fused_sequence_loss(loss, chosen_hidden, rejected_hidden, weight, chosen_labels, rejected_labels,
                               bias=bias, teacher=teacher, reduction=reduction, chunk_size=chunk_size, mode=mode,
                               ignore_index=ignore_index, func="fused_dpop_loss")


# --------------------------------------------------------------------------------------------------
# Token-level losses: student and teacher logit chunks together

#: ``row_loss(student_logits [C, V], teacher_logits [C, V] | None, target [C])`` → (m·ℓ [C], extras dict of
#: detached [C] tensors). ``target`` is the mask chunk (or the labels chunk for cross entropy).
RowLoss = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class _TokenPlan:
    row_loss: RowLoss
    target: torch.Tensor  # [N] mask or labels
    teacher_hidden: torch.Tensor | None  # [N, H_t]
    teacher_weight: torch.Tensor | None
    teacher_bias: torch.Tensor | None
    chunk_size: int
    scale: float | None  # None: "none" (two pass); else d(reduced)/d(Σ m·ℓ)
    extras: dict[str, torch.Tensor]  # filled by the forward (per-token detached outputs)


def _token_chunks(plan: _TokenPlan, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """Yields (slice, student logits, teacher logits or None) for every token chunk."""
    n = hidden.shape[0]
    for i0 in range(0, n, plan.chunk_size):
        sl = slice(i0, min(i0 + plan.chunk_size, n))
        logits = torch.addmm(bias, hidden[sl], weight.t()) if bias is not None else hidden[sl] @ weight.t()
        teacher = None
        if plan.teacher_hidden is not None:
            th = plan.teacher_hidden[sl]
            tw = plan.teacher_weight
            teacher = (torch.addmm(plan.teacher_bias, th, tw.t()) if plan.teacher_bias is not None else th @ tw.t())
        yield sl, logits, teacher


def _record_extras(plan: _TokenPlan, sl: slice, extras: dict[str, torch.Tensor], n: int) -> None:
    for key, value in extras.items():
        if key not in plan.extras:
            plan.extras[key] = value.new_zeros(n)
        plan.extras[key][sl] = value.detach()


def _token_single_pass(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: _TokenPlan,
                       needs: tuple[bool, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """Σ_t m_t ℓ_t over the token chunks and, in the same pass, its gradient (scaled by ``plan.scale``)."""
    need_h, need_w, need_b = needs
    n = hidden.shape[0]
    grad_h = torch.empty_like(hidden) if need_h else None
    head = _LMHeadGrads(weight, bias, need_w, need_b)
    total = hidden.new_zeros(())
    for sl, logits, teacher in _token_chunks(plan, hidden, weight, bias):
        with torch.enable_grad():
            leaf = logits.requires_grad_(True)
            per_row, extras = plan.row_loss(leaf, teacher, plan.target[sl])
            chunk_total = per_row.sum()
            (dlogits,) = torch.autograd.grad(chunk_total, leaf)
        total += chunk_total.detach()
        _record_extras(plan, sl, extras, n)
        dlogits.mul_(plan.scale)
        _backprop_chunk(dlogits, hidden[sl], weight, None if grad_h is None else grad_h[sl], head)
    return total, (grad_h, *head.result())


class _TokenChunkLoss(torch.autograd.Function):
    """Σ_t m_t ℓ_t over token chunks (reduced: single pass) or the per-token values (two pass)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                plan: _TokenPlan) -> torch.Tensor:
        ctx.plan = plan
        n = hidden.shape[0]
        if plan.scale is None:  # per-token outputs: the upstream gradient is only known in backward
            out = hidden.new_empty(n)
            for sl, logits, teacher in _token_chunks(plan, hidden, weight, bias):
                per_row, extras = plan.row_loss(logits, teacher, plan.target[sl])
                out[sl] = per_row
                _record_extras(plan, sl, extras, n)
            ctx.save_for_backward(hidden, weight, bias)
            return out
        needs = tuple(ctx.needs_input_grad[:3])
        total, grads = _token_single_pass(hidden, weight, bias, plan, needs)
        ctx.grads = _HandedGradients(grads, lambda: _token_single_pass(hidden, weight, bias, plan, needs)[1])
        return total * plan.scale

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        plan: _TokenPlan = ctx.plan
        if plan.scale is not None:
            return (*ctx.grads.hand_out(grad_out), None)
        hidden, weight, bias = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        head = _LMHeadGrads(weight, bias, need_w, need_b)
        for sl, logits, teacher in _token_chunks(plan, hidden, weight, bias):
            with torch.enable_grad():
                leaf = logits.requires_grad_(True)
                per_row, _ = plan.row_loss(leaf, teacher, plan.target[sl])
                (dlogits,) = torch.autograd.grad(per_row, leaf, grad_outputs=grad_out[sl])
            _backprop_chunk(dlogits, hidden[sl], weight, None if grad_h is None else grad_h[sl], head)
        return grad_h, *head.result(), None


def fused_token_loss(
    row_loss: RowLoss,
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    normalizer: float | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    target_is_labels: bool = False,
    ignore_index: int = -100,
    func: str = "fused_token_loss",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A token-level loss Σ_t m_t ℓ_t / (normalizer or Σ m) computed over token chunks of the lm_heads.

    For every chunk the student logits S = hidden @ Wᵀ (+b) and the teacher logits T = teacher_hidden @ W_tᵀ
    (+b_t, no gradient) are formed together and ``row_loss(S, T, target_chunk)`` (the backend's per-token
    formula under reduction="none") gives m·ℓ per row. Reduced losses take one pass (the gradient is
    formed during the forward, 3 GEMMs + the teacher's); ``reduction="none"`` recomputes in backward.

    Args:
        student_hidden: [..., H]; weight: [V, H]; target: [...] mask (or labels if ``target_is_labels``).
        teacher_hidden: [..., H_t]; teacher_weight: [V, H_t] (same vocabulary); both optional for losses
            that need no teacher (cross entropy).
    Returns:
        (loss — scalar, or [...] under "none"; extras — per-token detached outputs of ``row_loss``, [...]).
    """
    v.check_reduction(func, reduction)
    normalizer = v.check_normalizer_option(func, normalizer, reduction)
    size = v.check_chunk_options(func, chunk_size, ignore_index)
    _check_lm_head(func, student_hidden, weight, bias, names=("student_hidden", "weight", "bias"))
    lead = tuple(student_hidden.shape[:-1])
    checks = ValueChecks(func)
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
    for name, t in (("student_hidden", student_hidden), ("weight", weight), ("bias", bias),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                    ("teacher_bias", teacher_bias)):
        _finite(checks, name, t)
    if target_is_labels:
        checks.labels_in_vocab(target_name, target, weight.shape[0], ignore_index)
    else:
        checks.binary(target_name, target)
    checks.run()

    dtype = compute_dtype(student_hidden.dtype)
    flat_target = target.reshape(-1)
    count = (flat_target != ignore_index).sum() if target_is_labels else (flat_target != 0).sum()
    scale = None
    if reduction == "sum":
        scale = 1.0
    elif reduction == "mean":
        if normalizer is None:
            v.check_nonempty(func, target_name, float(count))
        scale = 1.0 / (normalizer if normalizer is not None else float(count))
    rows = student_hidden.reshape(-1, student_hidden.shape[-1]).to(dtype).contiguous()
    n = rows.shape[0]
    itemsize = rows.element_size()
    size = size or auto_chunk_size(weight.shape[0], n_rows=n, itemsize=itemsize, buffers=TOKEN_LOSS_BUFFERS)
    plan = _TokenPlan(
        row_loss=row_loss, target=flat_target,
        teacher_hidden=None if teacher_hidden is None else
        teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).to(dtype).contiguous(),
        teacher_weight=None if teacher_weight is None else teacher_weight.detach().to(dtype).contiguous(),
        teacher_bias=None if teacher_bias is None else teacher_bias.detach().to(dtype),
        chunk_size=size, scale=scale, extras={},
    )
    out = _TokenChunkLoss.apply(rows, weight.to(dtype).contiguous(), None if bias is None else bias.to(dtype), plan)
    extras = {k: t.reshape(lead) for k, t in plan.extras.items()}
    return (out.reshape(lead) if reduction == "none" else out), extras


def fused_dpkd_token_loss(
    student_hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor, mask: torch.Tensor, *, bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None, beta: float = 0.1, form: str = "sigmoid",
    label_smoothing: float = 0.0, reference_free: bool = False, lambda_: float = 50.0,
    normalizer: float | None = None, reduction: str = "mean", chunk_size: int | None = None,
) -> TokenPreferenceLoss:
    """Token-level DPKD (the released code's argmax preference, SPEC-MATH §3B) on the two lm_heads.

    Per position: y^t = argmax P, y^s = argmax Q, h = (Q[y^t] − Q[y^s]) − (P[y^t] − P[y^s]), ℓ by ``form``;
    the same value and student gradients as ``dpkd_token_loss`` on materialised logits (the teacher is frozen
    here). student_hidden [..., H], teacher_hidden [..., H_t], mask [...].
    """
    def row_loss(s: torch.Tensor, t: torch.Tensor | None, m: torch.Tensor):
        out = _backend_function("dpkd_token_loss")(s, t, m, beta=beta, form=form, label_smoothing=label_smoothing,
                                    reference_free=reference_free, lambda_=lambda_, reduction="none")
        agree = ((s.detach().argmax(-1) == t.argmax(-1)) & (m != 0)).to(s.dtype)
        return out.loss, {"agree": agree, "chosen": out.chosen_rewards, "rejected": out.rejected_rewards}

    loss, extras = fused_token_loss(row_loss, student_hidden, weight, mask, teacher_hidden=teacher_hidden,
                                    teacher_weight=teacher_weight, bias=bias, teacher_bias=teacher_bias,
                                    normalizer=normalizer, reduction=reduction, chunk_size=chunk_size,
                                    func="fused_dpkd_token_loss")
    agreement = extras["agree"].sum() / max(int((mask != 0).sum()), 1)
    return TokenPreferenceLoss(loss, agreement, extras["chosen"], extras["rejected"])


def _distill_fused(name: str, func: str, **options: Any) -> Callable[..., torch.Tensor]:
    def fused(student_hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
              teacher_weight: torch.Tensor, mask: torch.Tensor, *, bias: torch.Tensor | None = None,
              teacher_bias: torch.Tensor | None = None, normalizer: float | None = None, reduction: str = "mean",
              chunk_size: int | None = None, **kw: Any) -> torch.Tensor:
        loss_fn = _backend_function(name)

        def row_loss(s: torch.Tensor, t: torch.Tensor | None, m: torch.Tensor):
            return loss_fn(s, t, m, reduction="none", **kw), {}

        return fused_token_loss(row_loss, student_hidden, weight, mask, teacher_hidden=teacher_hidden,
                                teacher_weight=teacher_weight, bias=bias, teacher_bias=teacher_bias,
                                normalizer=normalizer, reduction=reduction, chunk_size=chunk_size, func=func)[0]

    return fused


def fused_forward_kl(student_hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                     teacher_weight: torch.Tensor, mask: torch.Tensor, *, bias: torch.Tensor | None = None,
                     teacher_bias: torch.Tensor | None = None, temperature: float = 1.0,
                     normalizer: float | None = None, reduction: str = "mean",
                     chunk_size: int | None = None) -> torch.Tensor:
    """Forward KL(p‖q) per token (``forward_kl``) over token chunks of the two lm_heads; teacher frozen."""
    return _distill_fused("forward_kl", "fused_forward_kl")(
        student_hidden, weight, teacher_hidden, teacher_weight, mask, bias=bias, teacher_bias=teacher_bias,
        normalizer=normalizer, reduction=reduction, chunk_size=chunk_size, temperature=temperature)


def fused_reverse_kl(student_hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                     teacher_weight: torch.Tensor, mask: torch.Tensor, *, bias: torch.Tensor | None = None,
                     teacher_bias: torch.Tensor | None = None, temperature: float = 1.0,
                     normalizer: float | None = None, reduction: str = "mean",
                     chunk_size: int | None = None) -> torch.Tensor:
    """Reverse KL(q‖p) per token (``reverse_kl``) over token chunks of the two lm_heads; teacher frozen."""
    return _distill_fused("reverse_kl", "fused_reverse_kl")(
        student_hidden, weight, teacher_hidden, teacher_weight, mask, bias=bias, teacher_bias=teacher_bias,
        normalizer=normalizer, reduction=reduction, chunk_size=chunk_size, temperature=temperature)


def fused_generalized_jsd(student_hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                          teacher_weight: torch.Tensor, mask: torch.Tensor, *, bias: torch.Tensor | None = None,
                          teacher_bias: torch.Tensor | None = None, beta: float = 0.5, temperature: float = 1.0,
                          normalizer: float | None = None, reduction: str = "mean",
                          chunk_size: int | None = None) -> torch.Tensor:
    """Generalized JSD (``generalized_jsd``, TRL's β convention) over token chunks; teacher frozen."""
    return _distill_fused("generalized_jsd", "fused_generalized_jsd")(
        student_hidden, weight, teacher_hidden, teacher_weight, mask, bias=bias, teacher_bias=teacher_bias,
        normalizer=normalizer, reduction=reduction, chunk_size=chunk_size, beta=beta, temperature=temperature)


def fused_akl(student_hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
              teacher_weight: torch.Tensor, mask: torch.Tensor, *, bias: torch.Tensor | None = None,
              teacher_bias: torch.Tensor | None = None, mu: float = 0.5, temperature: float = 1.0,
              normalizer: float | None = None, reduction: str = "mean", chunk_size: int | None = None) -> torch.Tensor:
    """Adaptive KL (``akl``: head/tail weighted forward + reverse KL) over token chunks; teacher frozen."""
    return _distill_fused("akl", "fused_akl")(
        student_hidden, weight, teacher_hidden, teacher_weight, mask, bias=bias, teacher_bias=teacher_bias,
        normalizer=normalizer, reduction=reduction, chunk_size=chunk_size, mu=mu, temperature=temperature)


def fused_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                        bias: torch.Tensor | None = None, ignore_index: int = -100, normalizer: float | None = None,
                        reduction: str = "mean", chunk_size: int | None = None) -> torch.Tensor:
    """Cross entropy −log q[label] (``cross_entropy``, SFT/LM term) over token chunks of the lm_head."""
    def row_loss(s: torch.Tensor, t: torch.Tensor | None, lab: torch.Tensor):
        return _backend_function("cross_entropy")(s, lab, ignore_index=ignore_index, reduction="none"), {}

    return fused_token_loss(row_loss, hidden, weight, labels, bias=bias, normalizer=normalizer,
                            reduction=reduction, chunk_size=chunk_size, target_is_labels=True,
                            ignore_index=ignore_index, func="fused_cross_entropy")[0]
