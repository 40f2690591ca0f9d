"""The fused, token-chunked lm_head path of the Torch backend: ``linear_token_logps`` and the sequence-level
losses (the token-level ones are in ``fused_token.py``; the per-chunk kernels in ``_lm_head.py``).

Materialising the logits ``[N, V]`` (N = batch × tokens) is what limits distillation at scale. These
functions take the hidden states and the lm_head weight instead and walk over chunks of TOKENS, so the live
logits are ``chunk × V`` whatever N is; the results equal the materialised path within the dtype table.

* ``linear_token_logps`` — projection + log-softmax + gather per token. Forward keeps only the per-token
  log-prob and log-sum-exp; backward recomputes each chunk's logits and forms grad_hidden and grad_weight
  (4 GEMMs of N×H×V in all: its upstream gradient is unknown during the forward).
* ``fused_sequence_loss`` (``fused_dpkd_loss``, ``fused_ipo_loss``, ``fused_cpo_loss``, ``fused_simpo_loss``,
  ``fused_dpop_loss``) — a sequence-level loss on the summed log-probs. d loss / d token-logp is one scalar
  per sequence (spec/README.md "Sequence-level DPKD", through the chain rule), known as soon as that
  sequence's pair is done. So when whole pairs fit the chunk budget the loss and its gradient come out of
  ONE pass (3 GEMMs: forward, grad_hidden, grad_weight) and backward only scales by the upstream scalar
  ("single_pass"); otherwise, or under ``reduction="none"``, it falls back to ``linear_token_logps``
  ("two_pass"). The chosen and rejected rows of a pair go through ONE product (narrower GEMMs run slower per
  row on a CPU; benchmarks/RESULTS.md).

The teacher side (its hidden size may differ from the student's) runs without gradient: it is frozen in
distillation. The loss is the backend's own (``dpkd.backends.torch.sequence``), named by a
``NamedSequenceLoss``; any hashable callable with the same contract can be fused instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from dpkd.spec import fused as contract
from dpkd.spec import validation as v
from dpkd.spec.fused import DEFAULT_CHUNK_BYTES, NamedSequenceLoss, auto_chunk_size
from dpkd.spec.results import FusedPreferenceLoss, TeacherLMHead, TeacherLogps
from torch import nn

from . import sequence
from ._base import ValueChecks, compute_dtype
from ._lm_head import HandedGradients, LMHeadGrads, backprop_logp_chunk, chunk_logps, describe, project

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
    "fused_concatenated",
    "FusedLinearPreferenceLoss",
]


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
            logps[i0:i1], lse[i0:i1], _, _ = chunk_logps(hidden[i0:i1], weight, bias, labels[i0:i1],
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
        head = LMHeadGrads(weight, bias, need_w, need_b)
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
            project(hidden[i0:i1], weight, bias, chunk)
            chunk.sub_(lse[i0:i1, None]).exp_()  # the softmax, from the saved logsumexp
            backprop_logp_chunk(chunk, hidden[i0:i1], weight, safe[i0:i1], g[i0:i1], None,
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

    logp[n] = log_softmax(hidden[n] @ weightᵀ + bias)[labels[n]] (``dpkd.spec.token_logps`` on the logits,
    the token log-prob that Eq. 8/9 sum), exactly 0 where ``labels == ignore_index``. Computed over chunks
    of ``chunk_size`` token rows: the forward keeps only logp and the logsumexp per token; the backward
    recomputes each chunk's logits, forms grad_hidden = G @ W and accumulates grad_weight += Gᵀ @ hidden
    (G = g·(onehot − softmax)) in float32 or wider. Peak extra memory ≈ chunk_size × V × 4 bytes.

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
    contract.check_logps_call(func, describe, ValueChecks(func), hidden=hidden, weight=weight, bias=bias, labels=labels,
                              ignore_index=ignore_index)

    lead = tuple(labels.shape)
    dtype = compute_dtype(hidden.dtype)
    rows = hidden.reshape(-1, hidden.shape[-1]).to(dtype).contiguous()
    n = rows.shape[0]
    if n == 0:  # no rows: zeros still attached to the inputs, so backward gives zero gradients
        return _attached_zeros(lead, rows, weight, bias)
    size = size or auto_chunk_size(weight.shape[0], n_rows=n, itemsize=rows.element_size())
    opts = _ChunkOptions(chunk_size=size, ignore_index=int(ignore_index))
    out = _LinearTokenLogps.apply(rows, weight.to(dtype).contiguous(), None if bias is None else bias.to(dtype),
                                  labels.reshape(-1).long(), opts)  # gather indexes with int64 (int8 labels)
    return out.reshape(lead)


def _attached_zeros(shape: tuple[int, ...], *inputs: torch.Tensor | None) -> torch.Tensor:
    """Zeros of ``shape`` (an empty batch's result) in the graph of ``inputs``: their gradients are zeros."""
    dtype = compute_dtype(inputs[0].dtype)
    anchor = sum(t.to(dtype).sum() for t in inputs if t is not None) * 0
    return anchor * torch.zeros(shape, dtype=dtype, device=inputs[0].device)


# --------------------------------------------------------------------------------------------------
# Sequence-level losses


@dataclass(frozen=True)
class _SequencePlan:
    """Everything the single pass needs besides the differentiable inputs."""

    loss: Any  # loss(a, b, c, d, *, chosen_lengths, rejected_lengths, reduction) -> PreferenceLoss
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

    One GEMM over all of a chunk's rows: on a CPU a product with fewer rows runs slower per row
    (benchmarks/RESULTS.md), so the two sides are not projected separately."""
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
    logp, _, _, _ = chunk_logps(rows, teacher.weight.to(dtype), tb, labels, ignore_index, buf)
    return _side_sums(logp, n, t_c)


def _single_pass(chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None, plan: _SequencePlan, needs: tuple[bool, ...]
                 ) -> tuple[FusedPreferenceLoss, tuple[torch.Tensor | None, ...]]:
    """The loss over whole-pair chunks and, in the same pass, its gradient in every input ``needs`` marks."""
    need_c, need_r, need_w, need_b = needs
    n_pairs, t_c, size = chosen_hidden.shape
    t_s = rejected_hidden.shape[1]
    dtype = chosen_hidden.dtype
    grad_c = torch.empty_like(chosen_hidden) if need_c else None
    grad_r = torch.empty_like(rejected_hidden) if need_r else None
    head = LMHeadGrads(weight, bias, need_w, need_b)
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
        logp, _, total, safe = chunk_logps(rows, weight, bias, labels, plan.ignore_index, chunk)
        a[sl], b[sl] = _side_sums(logp, n, t_c)
        da, db = _pair_grads(plan, sl, a[sl], b[sl], c_k, d_k)
        # every token of sequence i gets d loss/d logp = scale · ∂ℓ_i/∂(its summed logp)
        g = torch.cat([(scale * da).repeat_interleave(t_c), (scale * db).repeat_interleave(t_s)]).to(dtype)
        g = g * (labels != plan.ignore_index)
        grad_rows = rows.new_empty(rows.shape) if (need_c or need_r) else None
        backprop_logp_chunk(chunk, rows, weight, safe, g, total, grad_rows, head)
        if grad_c is not None:
            grad_c[sl] = grad_rows[: n * t_c].view(n, t_c, size)
        if grad_r is not None:
            grad_r[sl] = grad_rows[n * t_c:].view(n, t_s, size)
    result = plan.loss(a, b, c, d, chosen_lengths=plan.chosen_lengths, rejected_lengths=plan.rejected_lengths,
                       reduction=plan.reduction)
    return FusedPreferenceLoss(*result, a, b), (grad_c, grad_r, *head.result())


class _SinglePassSequenceLoss(torch.autograd.Function):
    """Loss and its gradient in one pass over whole pairs; backward scales by the upstream scalar."""

    @staticmethod
    def forward(ctx: Any, chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, plan: _SequencePlan) -> tuple[torch.Tensor, ...]:
        inputs, needs = (chosen_hidden, rejected_hidden, weight, bias, plan), tuple(ctx.needs_input_grad[:4])
        result, grads = _single_pass(*inputs, needs)
        ctx.grads = HandedGradients(grads, lambda: _single_pass(*inputs, needs)[1])
        detached = tuple(x.detach() for x in result[1:])  # rewards, a, b
        ctx.mark_non_differentiable(*detached)
        return (result.loss.detach(), *detached)

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        return (*ctx.grads.hand_out(grad_loss), None)


def _two_pass_sequence(chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None, plan: _SequencePlan, chunk_size: int) -> FusedPreferenceLoss:
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
    out = plan.loss(a, b, c, d, chosen_lengths=plan.chosen_lengths, rejected_lengths=plan.rejected_lengths,
                    reduction=plan.reduction)
    return FusedPreferenceLoss(out.loss, *(x.detach() for x in (out.chosen_rewards, out.rejected_rewards, a, b)))


def fused_sequence_loss(
    loss: NamedSequenceLoss | Any,
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
) -> FusedPreferenceLoss:
    """Any sequence-level preference loss on the student's lm_head, chunked over whole pairs or tokens.

    a_i = Σ_t log q(y_t | ·) over the chosen rows (teacher output y_t) of pair i, b_i likewise over the
    rejected rows (student output y_s), c_i, d_i the teacher's (spec/README.md "Sequence-level DPKD");
    returns ``loss(a, b, c, d, chosen_lengths=L_t, rejected_lengths=L_s, reduction=reduction)`` with lengths
    the token counts when ``use_lengths`` (else None), and a, b.

    Modes: "single_pass" computes the loss and its gradient in one pass (3 GEMMs) over chunks holding
    whole pairs — d loss/d logp_t = (1/B)·∂ℓ_i/∂a_i for every token t of sequence i, known once pair i is
    done — and needs a reduced loss; "two_pass" sums ``linear_token_logps`` (4 GEMMs) and works for any
    reduction and any length; "auto" picks single_pass when ``reduction != "none"`` and one pair
    (T_c + T_s rows) fits ``chunk_size`` (default: the 64 MiB budget).

    Args:
        loss: ``NamedSequenceLoss("dpkd_loss", {"beta": 0.1})`` (this backend's loss of that name with
            those options), or a hashable callable ``loss(a, b, c, d, *, chosen_lengths, rejected_lengths,
            reduction)`` → PreferenceLoss, elementwise over pairs under reduction="none".
        chosen_hidden: [B, T_c, H] student hidden states at the teacher-output rows (already shifted so
            that row t predicts ``chosen_labels[:, t]``). rejected_hidden: [B, T_s, H].
        weight: [V, H] student lm_head; bias: [V] or None.
        chosen_labels: [B, T_c], rejected_labels: [B, T_s]; ``ignore_index`` on prompt and padding.
        teacher: TeacherLMHead (hidden size may differ) or TeacherLogps; no gradient flows into it.
        func: the name errors carry (the public wrapper's).
    Returns:
        FusedPreferenceLoss(loss, chosen_rewards, rejected_rewards, policy_chosen_logps a [B],
        policy_rejected_logps b [B]); all but the loss detached.

    See also: ``fused_dpkd_loss`` and siblings, ``linear_token_logps``.
    """
    v.check_reduction(func, reduction)
    v.check_fused_mode(func, mode, reduction)
    size = v.check_chunk_options(func, chunk_size, ignore_index)
    loss_fn = contract.sequence_loss_function(func, loss, sequence)
    kind = contract.check_sequence_call(
        func, describe, ValueChecks(func), chosen_hidden=chosen_hidden, rejected_hidden=rejected_hidden,
        weight=weight, bias=bias, chosen_labels=chosen_labels, rejected_labels=rejected_labels, teacher=teacher,
        teacher_required=teacher_required, length_labels=contract.length_labels(loss_fn, use_lengths),
        ignore_index=ignore_index)
    # the teacher is frozen: no gradient flows into it
    teacher = None if kind == "none" else type(teacher)(*(None if t is None else t.detach() for t in teacher))
    chosen_labels, rejected_labels = chosen_labels.long(), rejected_labels.long()  # int8 labels gather too
    if chosen_hidden.shape[0] == 0:
        return _no_pairs(func, loss_fn, chosen_hidden, rejected_hidden, weight, bias, teacher, reduction,
                         use_lengths)

    dtype = compute_dtype(chosen_hidden.dtype)
    lengths = ((chosen_labels != ignore_index).sum(1), (rejected_labels != ignore_index).sum(1)) if use_lengths \
        else (None, None)
    rows_per_pair = chosen_hidden.shape[1] + rejected_hidden.shape[1]
    n_rows = chosen_hidden.shape[0] * rows_per_pair
    itemsize = torch.empty((), dtype=dtype).element_size()
    size = size or auto_chunk_size(weight.shape[0], n_rows=n_rows, itemsize=itemsize)
    if mode == "auto":
        mode = "single_pass" if reduction != "none" and rows_per_pair <= size else "two_pass"
    plan = _SequencePlan(loss=loss_fn, reduction=reduction, chosen_labels=chosen_labels,
                         rejected_labels=rejected_labels, chosen_lengths=lengths[0], rejected_lengths=lengths[1],
                         teacher=teacher, pairs_per_chunk=max(1, size // rows_per_pair),
                         ignore_index=int(ignore_index))
    w = weight.to(dtype).contiguous()
    bb = None if bias is None else bias.to(dtype)
    with v.reported_as(func, contract.SEQUENCE_ARGUMENTS):
        if mode == "two_pass":
            return _two_pass_sequence(chosen_hidden, rejected_hidden, w, bb, plan, size)
        out = _SinglePassSequenceLoss.apply(chosen_hidden.to(dtype).contiguous(),
                                            rejected_hidden.to(dtype).contiguous(), w, bb, plan)
    return FusedPreferenceLoss(*out)


def _no_pairs(func: str, loss_fn: Any, chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor,
              weight: torch.Tensor, bias: torch.Tensor | None, teacher: TeacherLMHead | TeacherLogps | None,
              reduction: str, use_lengths: bool) -> FusedPreferenceLoss:
    """An empty batch (B = 0), with the materialised losses' contract: 'mean' is undefined, 'sum' is 0 and
    'none' is [0], with zero gradients."""
    if reduction == "mean":
        v.fail(func, "chosen_hidden", "holds no pairs (B = 0), so reduction='mean' is undefined; use 'sum' or "
                                      "'none'")
    a = _attached_zeros((0,), chosen_hidden, weight, bias)
    b = _attached_zeros((0,), rejected_hidden, weight, bias)
    c = d = None
    if teacher is not None:
        c, d = a.detach().clone(), b.detach().clone()
        if isinstance(teacher, TeacherLogps):
            c, d = teacher.chosen.to(a.dtype), teacher.rejected.to(a.dtype)
    lengths = (a.detach().clone(), b.detach().clone()) if use_lengths else (None, None)
    out = loss_fn(a, b, c, d, chosen_lengths=lengths[0], rejected_lengths=lengths[1], reduction=reduction)
    return FusedPreferenceLoss(out.loss, *(x.detach() for x in (out.chosen_rewards, out.rejected_rewards, a, b)))


def _named_wrapper(func: str, arguments: dict[str, Any]) -> FusedPreferenceLoss:
    """The ``fused_sequence_loss`` call of the named wrapper ``func`` given its ``arguments`` (the same in
    every backend: ``dpkd.spec.fused.sequence_call``)."""
    loss, kwargs = contract.sequence_call(func, arguments)
    return fused_sequence_loss(loss, **kwargs)


def fused_dpkd_loss(
    chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor, weight: torch.Tensor,
    chosen_labels: torch.Tensor, rejected_labels: torch.Tensor, *,
    teacher: TeacherLMHead | TeacherLogps | None = None, bias: torch.Tensor | None = None,
    length_normalize: bool = False, beta: float = 0.1, label_smoothing: float = 0.0,
    reference_free: bool = False, reduction: str = "mean", chunk_size: int | None = None, mode: str = "auto",
    ignore_index: int = -100,
) -> FusedPreferenceLoss:
    """``dpkd.spec.dpkd_loss`` (Eq. 8; Eq. 9 with ``length_normalize``: L = token counts) on the student's
    lm_head, with the same value and gradients as on materialised logits. Arguments as in
    ``fused_sequence_loss``; options as in ``dpkd_loss``.

    Example:
        >>> B, T, H, V = 2, 5, 8, 11
        >>> w = torch.randn(V, H, requires_grad=True)
        >>> lab = torch.randint(0, V, (B, T))
        >>> out = fused_dpkd_loss(torch.randn(B, T, H), torch.randn(B, T, H), w, lab, lab,
        ...                       teacher=TeacherLogps(torch.zeros(B) - 9.0, torch.zeros(B) - 12.0))
        >>> out.loss.backward()
    """
    return _named_wrapper("fused_dpkd_loss", locals())


def fused_ipo_loss(
    chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor, weight: torch.Tensor,
    chosen_labels: torch.Tensor, rejected_labels: torch.Tensor, *,
    teacher: TeacherLMHead | TeacherLogps | None = None, bias: torch.Tensor | None = None,
    tau: float = 0.1, length_normalize: bool = True, reduction: str = "mean", chunk_size: int | None = None,
    mode: str = "auto", ignore_index: int = -100,
) -> FusedPreferenceLoss:
    """``dpkd.spec.ipo_loss`` (length-normalised h by default) on the student's lm_head; see fused_dpkd_loss."""
    return _named_wrapper("fused_ipo_loss", locals())


def fused_cpo_loss(
    chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor, weight: torch.Tensor,
    chosen_labels: torch.Tensor, rejected_labels: torch.Tensor, *, bias: torch.Tensor | None = None,
    beta: float = 0.1, nll_weight: float = 1.0, length_normalize: bool = False, label_smoothing: float = 0.0,
    reduction: str = "mean", chunk_size: int | None = None, mode: str = "auto", ignore_index: int = -100,
) -> FusedPreferenceLoss:
    """``dpkd.spec.cpo_loss`` (reference-free; the chosen NLL ÷ L_t with ``length_normalize``) on the
    student's lm_head; see fused_dpkd_loss."""
    return _named_wrapper("fused_cpo_loss", locals())


def fused_simpo_loss(
    chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor, weight: torch.Tensor,
    chosen_labels: torch.Tensor, rejected_labels: torch.Tensor, *, bias: torch.Tensor | None = None,
    beta: float = 2.0, gamma: float = 1.0, label_smoothing: float = 0.0, reduction: str = "mean",
    chunk_size: int | None = None, mode: str = "auto", ignore_index: int = -100,
) -> FusedPreferenceLoss:
    """``dpkd.spec.simpo_loss`` (reference-free, lengths = token counts) on the student's lm_head."""
    return _named_wrapper("fused_simpo_loss", locals())


def fused_dpop_loss(
    chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor, weight: torch.Tensor,
    chosen_labels: torch.Tensor, rejected_labels: torch.Tensor, *,
    teacher: TeacherLMHead | TeacherLogps | None = None, bias: torch.Tensor | None = None,
    beta: float = 0.1, lambda_: float = 50.0, form: str = "smaug", reduction: str = "mean",
    chunk_size: int | None = None, mode: str = "auto", ignore_index: int = -100,
) -> FusedPreferenceLoss:
    """``dpkd.spec.dpop_loss`` (penalty λ·max(0, c − a) on the summed h) on the student's lm_head."""
    return _named_wrapper("fused_dpop_loss", locals())


# --------------------------------------------------------------------------------------------------
# The concatenated (TRL / Liger) calling layout


def fused_concatenated(
    fused_loss: Callable[..., FusedPreferenceLoss],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    teacher_logps: torch.Tensor | None = None,
    **options: Any,
) -> FusedPreferenceLoss:
    """A fused sequence loss (``fused_dpkd_loss`` and siblings) in the layout TRL and Liger call with.

    ``hidden`` [2B, T, H] stacks the B chosen sequences (the teacher's outputs y_t) then the B rejected ones
    (the student's y_s); ``target`` [2B, T] their shifted labels with ``options["ignore_index"]`` (default
    −100) on prompt and padding; the teacher (the reference model) as ``teacher_hidden`` [2B, T, H_t] with
    ``teacher_weight`` [V, H_t] (+ ``teacher_bias``), or as its summed log-probs ``teacher_logps`` [2B].
    The halves go to ``fused_loss`` as its chosen and rejected arguments, so the result — the loss, its
    gradients in ``hidden``/``weight``/``bias``, the rewards and the policy log-probs a, b that a TRL-style
    trainer logs as ``logps/chosen``/``logps/rejected`` — is the split layout's.

    Example:
        >>> B, T, H, V = 2, 5, 8, 11
        >>> w = torch.randn(V, H, requires_grad=True)
        >>> out = fused_concatenated(fused_dpkd_loss, torch.randn(2 * B, T, H), w, torch.randint(0, V, (2 * B, T)),
        ...                          teacher_logps=torch.tensor([-9.0, -8.0, -12.0, -11.0]), beta=0.1)
        >>> out.policy_chosen_logps.shape
        torch.Size([2])
    """
    func = getattr(fused_loss, "__name__", "fused_concatenated")
    n = contract.check_concatenated(func, describe(hidden), describe(target), teacher_hidden=describe(teacher_hidden),
                                    teacher_weight=describe(teacher_weight), teacher_logps=describe(teacher_logps))
    teacher = contract.concatenated_teacher(n, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                                            teacher_bias=teacher_bias, teacher_logps=teacher_logps)
    if teacher is not None:
        options["teacher"] = teacher
    return fused_loss(hidden[:n], hidden[n:], weight, target[:n], target[n:], bias=bias, **options)


class FusedLinearPreferenceLoss(nn.Module):
    """A fused sequence loss as a module with Liger-Kernel's call signature, for code written against
    ``LigerFusedLinearDPOLoss``: ``loss_fn(lin_weight, _input, target, bias, ref_input=, ref_weight=,
    ref_bias=)`` with the concatenated layout (``fused_concatenated``), the reference model being the
    teacher. Returns the ``FusedPreferenceLoss`` (``out[0]`` is the loss, as in Liger's result).

    Example:
        >>> loss_fn = FusedLinearPreferenceLoss(fused_dpkd_loss, beta=0.1)
        >>> h, w = torch.randn(4, 5, 8), torch.randn(11, 8)
        >>> out = loss_fn(w, h, torch.randint(0, 11, (4, 5)), None, ref_input=h, ref_weight=w)
        >>> float(out.chosen_rewards.abs().max())   # the teacher is the student: every log-ratio is 0
        0.0
    """

    def __init__(self, fused_loss: Callable[..., FusedPreferenceLoss] = fused_dpkd_loss, **options: Any):
        super().__init__()
        self.fused_loss = fused_loss
        self.options = options

    def forward(self, lin_weight: torch.Tensor, _input: torch.Tensor, target: torch.Tensor,
                bias: torch.Tensor | None = None, ref_input: torch.Tensor | None = None,
                ref_weight: torch.Tensor | None = None, ref_bias: torch.Tensor | None = None
                ) -> FusedPreferenceLoss:
        return fused_concatenated(self.fused_loss, _input, lin_weight, target, bias=bias, teacher_hidden=ref_input,
                                  teacher_weight=ref_weight, teacher_bias=ref_bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join([self.fused_loss.__name__, *(f"{k}={val!r}" for k, val in self.options.items())])
