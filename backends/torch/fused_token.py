"""The fused, token-chunked lm_head path of the Torch backend: the token-level losses (the sequence-level
ones and ``linear_token_logps`` are in ``fused.py``; the per-chunk kernels in ``_lm_head.py`` and
``_token_kernels.py``).

``fused_token_loss`` (``fused_dpkd_token_loss``, ``fused_forward_kl``, ``fused_reverse_kl``,
``fused_generalized_jsd``, ``fused_akl``, ``fused_cross_entropy``) — token-level losses that need the whole
student and teacher distributions at the same positions. Only the rows that count (mask ≠ 0, or a label
≠ ignore_index) are computed. For every chunk of them the student logits S = hidden @ Wᵀ and the teacher
logits T are formed by one GEMM each (÷ τ inside it), then a kernel of the named loss walks the chunk in
blocks of a few rows, leaving ℓ per row and d ℓ/d S in S's buffer in a few in-place passes
(``_token_kernels.py``: one softmax per side, no sort, a two-entry gradient for the sigmoid/IPO token
DPKD); grad_hidden = G @ W and grad_weight += Gᵀ @ hidden follow, with the row factors on [rows, H].
Reduced losses take one pass (the gradient is formed during the forward and handed to autograd without a
copy); ``reduction="none"`` recomputes each chunk in backward with the upstream gradient. Live memory: two
[chunk, V] buffers and a few [block, V] scratch buffers, whatever N is.

A caller's own ``RowLoss`` callable runs instead through autograd of the callable on each chunk (its
gradient taken per chunk, the same single/two-pass structure). The teacher is frozen (no gradient), and
its hidden size H_t may differ from the student's H.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from dpkd.spec import fused as contract
from dpkd.spec import validation as v
from dpkd.spec.fused import NamedTokenLoss, auto_chunk_size
from dpkd.spec.results import TokenPreferenceLoss

from . import distill, token
from ._base import ValueChecks, compute_dtype
from ._lm_head import HandedGradients, LMHeadGrads, backprop_chunk, describe, project
from ._token_kernels import BlockResult, TokenKernel, token_kernel

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

#: Live [chunk, V] buffers of a named token loss with a teacher: the student's and the teacher's logits
#: (the kernels' scratch is [block, V]); the default chunk fits them in ``DEFAULT_CHUNK_BYTES``.
TOKEN_LOSS_BUFFERS = 2

#: Rows per kernel block and thread: a block's in-place passes stay in cache (on one core 2 to 256 rows
#: per block cost the same), and with more threads every pass still gives each thread 16 rows, so the
#: parallel regions do not shrink to the point where waking the threads costs more than the work.
BLOCK_ROWS = 16

# Live [chunk, V] buffers of a caller's own RowLoss: both logits plus autograd's temporaries.
_ROW_LOSS_BUFFERS = 8

#: ``row_loss(student_logits [C, V], teacher_logits [C, V] | None, target [C])`` → (m·ℓ [C], extras dict of
#: detached [C] tensors). ``target`` is the mask chunk (or the labels chunk for cross entropy).
RowLoss = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class _NamedRowLoss:
    """A ``NamedTokenLoss`` bound to this backend's function, as a ``RowLoss``. For the token-level DPKD
    (a TokenPreferenceLoss) the extras are the per-token agreement 1[argmax S = argmax T]·m and the
    chosen/rejected rewards."""

    loss: Callable[..., Any]

    def __call__(self, s: torch.Tensor, t: torch.Tensor | None, target: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.loss(s, t, target)
        if not isinstance(out, TokenPreferenceLoss):
            return out, {}
        agree = ((s.detach().argmax(-1) == t.argmax(-1)) & (target != 0)).to(s.dtype)
        return out.loss, {"agree": agree, "chosen": out.chosen_rewards, "rejected": out.rejected_rewards}


def _row_loss(func: str, row_loss: NamedTokenLoss | RowLoss) -> RowLoss:
    bound = contract.token_loss_function(func, row_loss, token, distill)
    return row_loss if bound is None else _NamedRowLoss(bound)  # type: ignore[return-value]


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
    for i0 in range(0, max(n, 1), plan.chunk_size):  # no rows: one empty chunk (the extras exist, empty)
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
    head = LMHeadGrads(weight, bias, need_w, need_b)
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
        backprop_chunk(dlogits, hidden[sl], weight, None if grad_h is None else grad_h[sl], head)
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
        ctx.grads = HandedGradients(grads, lambda: _token_single_pass(hidden, weight, bias, plan, needs)[1])
        return total * plan.scale

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        plan: _TokenPlan = ctx.plan
        if plan.scale is not None:
            return (*ctx.grads.hand_out(grad_out), None)
        hidden, weight, bias = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        head = LMHeadGrads(weight, bias, need_w, need_b)
        for sl, logits, teacher in _token_chunks(plan, hidden, weight, bias):
            with torch.enable_grad():
                leaf = logits.requires_grad_(True)
                per_row, _ = plan.row_loss(leaf, teacher, plan.target[sl])
                (dlogits,) = torch.autograd.grad(per_row, leaf, grad_outputs=grad_out[sl])
            backprop_chunk(dlogits, hidden[sl], weight, None if grad_h is None else grad_h[sl], head)
        return grad_h, *head.result(), None


# --------------------------------------------------------------------------------------------------
# Named losses: block kernels (_token_kernels.py) over the rows that count


@dataclass(frozen=True)
class _KernelPlan:
    kernel: TokenKernel
    index: torch.Tensor | None  # [Na], the counted rows' positions among the N rows; None: every row counts
    teacher_rows: torch.Tensor | None  # [N, H_t], all rows (the counted ones are gathered chunk by chunk)
    teacher_weight: torch.Tensor | None
    teacher_bias: torch.Tensor | None
    labels: torch.Tensor | None  # [Na] (cross entropy)
    chunk_size: int
    extras: dict[str, torch.Tensor]  # [Na] each, filled by the forward


def _backprop_blocks(results: list[BlockResult], s: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor,
                     factor: torch.Tensor | float, grad_rows: torch.Tensor | None, head: LMHeadGrads) -> None:
    """d(Σ factor·ℓ)/d(rows, W, b) of one chunk from its blocks' gradients: the dense part diag(r)·s through
    the two GEMMs (r on [rows, H]), each sparse part as a gather/scatter of W and rows."""
    if results[0].dense is not None:
        r = torch.cat([res.dense for res in results]) * factor
        if grad_rows is not None:
            torch.mm(s, weight, out=grad_rows).mul_(r[:, None])
        head.add(s, rows * r[:, None], bias_rows=r)
    elif grad_rows is not None:
        grad_rows.zero_()
    for slot in range(len(results[0].sparse)):
        index = torch.cat([res.sparse[slot][0] for res in results])
        coef = torch.cat([res.sparse[slot][1] for res in results]) * factor
        if grad_rows is not None:
            grad_rows.addcmul_(weight.index_select(0, index), coef[:, None])
        head.add_at_labels(index, rows, coef)


def _kernel_pass(plan: _KernelPlan, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 factor: torch.Tensor | float | None, needs: tuple[bool, ...]
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """ℓ per counted row [Na] and, unless ``factor`` is None, the gradients of Σ factor·ℓ (``factor`` a
    number, or [Na] upstream values) in the inputs ``needs`` marks (for ``rows`` [N, H]: zero on the rows that
    do not count). Fills ``plan.extras``.

    The counted rows are gathered one chunk at a time, and their gradient written back the same way: a
    gathered copy of all of them (and of the teacher's), with its gradient, would be three more [N, H]-sized
    arrays, the only part of the memory that grows with N."""
    kernel, index = plan.kernel, plan.index
    n, vocab = rows.shape[0] if index is None else index.shape[0], weight.shape[0]
    need_h, need_w, need_b = needs if factor is not None else (False, False, False)
    tau = kernel.temperature
    loss = rows.new_empty(n)
    grad_all = None
    if need_h:
        grad_all = torch.empty_like(rows) if index is None else torch.zeros_like(rows)
    head = LMHeadGrads(weight, bias, need_w, need_b)
    size = min(plan.chunk_size, n)
    buf_s = rows.new_empty(size, vocab)
    buf_t = rows.new_empty(size, vocab) if kernel.teacher else None
    buf_rows = buf_teacher = buf_grad = None  # the gathered chunk, and its gradient before it is written back
    if index is not None:
        buf_rows = rows.new_empty(size, rows.shape[1])
        buf_teacher = None if buf_t is None else plan.teacher_rows.new_empty(size, plan.teacher_rows.shape[1])
        buf_grad = rows.new_empty(size, rows.shape[1]) if need_h else None

    def chunk_of(x: torch.Tensor, buf: torch.Tensor | None, sl: slice) -> torch.Tensor:
        if index is None:
            return x[sl]
        return torch.index_select(x, 0, index[sl], out=buf[: sl.stop - sl.start])

    block = min((kernel.rows_per_thread or BLOCK_ROWS) * max(1, torch.get_num_threads()), size)
    scratch = [rows.new_empty(block, vocab) for _ in range(kernel.scratch)]
    for i0 in range(0, n, size):
        sl = slice(i0, min(i0 + size, n))
        s = buf_s[: sl.stop - i0]
        rows_c = chunk_of(rows, buf_rows, sl)
        project(rows_c, weight, bias, s, tau)
        t = None
        if buf_t is not None:
            t = buf_t[: sl.stop - i0]
            project(chunk_of(plan.teacher_rows, buf_teacher, sl), plan.teacher_weight, plan.teacher_bias, t, tau)
        results = []
        for b0 in range(0, s.shape[0], block):
            bl = slice(b0, min(b0 + block, s.shape[0]))
            rows_here = slice(i0 + bl.start, i0 + bl.stop)
            labels = None if plan.labels is None else plan.labels[rows_here]
            res = kernel.block(s[bl], None if t is None else t[bl], labels, [x[: bl.stop - b0] for x in scratch])
            loss[rows_here] = res.loss
            for key, value in res.extras.items():
                plan.extras.setdefault(key, rows.new_zeros(n))[rows_here] = value
            results.append(res)
        if need_h or need_w or need_b:
            f = (factor[sl] if isinstance(factor, torch.Tensor) else factor) / tau  # d(S/τ)/dS = 1/τ
            grad_c = None
            if grad_all is not None:
                grad_c = grad_all[sl] if index is None else buf_grad[: sl.stop - i0]
            _backprop_blocks(results, s, rows_c, weight, f, grad_c, head)
            if grad_c is not None and index is not None:
                grad_all.index_copy_(0, index[sl], grad_c)
    return loss, (grad_all, *head.result())


class _KernelTokenLoss(torch.autograd.Function):
    """Σ ℓ over the counted rows, scaled (reduced: single pass), or ℓ per counted row (two pass)."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: _KernelPlan,
                scale: float | None) -> torch.Tensor:
        ctx.plan, ctx.scale = plan, scale
        needs = tuple(ctx.needs_input_grad[:3])
        if scale is None:  # per-row outputs: the upstream gradient is only known in backward
            ctx.save_for_backward(rows, weight, bias)
            return _kernel_pass(plan, rows, weight, bias, None, needs)[0]
        loss, grads = _kernel_pass(plan, rows, weight, bias, scale, needs)
        ctx.grads = HandedGradients(grads, lambda: _kernel_pass(plan, rows, weight, bias, scale, needs)[1])
        return loss.sum() * scale

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.scale is not None:
            return (*ctx.grads.hand_out(grad_out), None, None)
        rows, weight, bias = ctx.saved_tensors
        _, grads = _kernel_pass(ctx.plan, rows, weight, bias, grad_out.to(rows.dtype),
                                tuple(ctx.needs_input_grad[:3]))
        return (*grads, None, None)


def _check_kernel_options(func: str, row_loss: NamedTokenLoss, dtype: torch.dtype, target_is_labels: bool) -> None:
    """The named loss's own option checks (its messages, its order), run once on a one-row input: the
    kernels take the options as given."""
    bound = contract.token_loss_function(func, row_loss, token, distill)
    logits = torch.zeros(1, 2, dtype=dtype)
    target = torch.zeros(1, dtype=torch.long) if target_is_labels else torch.ones(1)
    with v.reported_as(func, {**contract.TOKEN_ARGUMENTS, "logits": "hidden"}):
        bound(logits, logits, target)


def kernel_chunk_size(vocab_size: int, *, n_rows: int, itemsize: int, teacher: bool) -> int:
    """The default rows per chunk of a named token loss: its live [chunk, V] buffers (the student's logits,
    and the teacher's if it has one) in the byte budget."""
    return auto_chunk_size(vocab_size, n_rows=n_rows, itemsize=itemsize, buffers=TOKEN_LOSS_BUFFERS if teacher else 1)


def _kernel_token(kernel: TokenKernel, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  teacher: tuple[torch.Tensor | None, ...], target: torch.Tensor, *, target_is_labels: bool,
                  ignore_index: int, scale: float | None, chunk_size: int | None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The named loss on the rows that count (mask ≠ 0 / label ≠ ignore_index): the rest contribute 0 to
    the loss, its gradient and every per-token output, so they are never projected."""
    n = rows.shape[0]
    counted = (target != ignore_index) if target_is_labels else (target != 0)
    index = None if bool(counted.all()) else counted.nonzero().squeeze(1)
    n_counted = n if index is None else index.shape[0]

    teacher_rows, teacher_weight, teacher_bias = teacher
    if not kernel.teacher:
        teacher_rows = teacher_weight = teacher_bias = None
    size = chunk_size or kernel_chunk_size(weight.shape[0], n_rows=n_counted, itemsize=rows.element_size(),
                                           teacher=kernel.teacher)
    labels = None
    if target_is_labels:
        labels = target if index is None else target.index_select(0, index)
    plan = _KernelPlan(kernel, index, teacher_rows, teacher_weight, teacher_bias, labels, size, {})
    if n_counted == 0:
        out = rows.new_zeros(()) if scale is not None else rows.new_zeros(n)
        # a zero with the graph the caller expects, and the kernel's extras (zeros: no row counts)
        return out + 0.0 * (rows.sum() + weight.sum()), {key: rows.new_zeros(n) for key in kernel.extras}
    out = _KernelTokenLoss.apply(rows, weight, bias, plan, scale)

    def spread(x: torch.Tensor) -> torch.Tensor:
        return x if index is None else x.new_zeros(n).index_copy(0, index, x)

    return (out if scale is not None else spread(out)), {k: spread(x) for k, x in plan.extras.items()}


def fused_token_loss(
    row_loss: NamedTokenLoss | RowLoss,
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
        row_loss: ``NamedTokenLoss("forward_kl", {"temperature": 2.0})`` (this backend's token loss of that
            name with those options), or a hashable ``RowLoss`` callable.
        student_hidden: [..., H]; weight: [V, H]; target: [...] mask (or labels if ``target_is_labels``).
        teacher_hidden: [..., H_t]; teacher_weight: [V, H_t] (same vocabulary); both optional for losses
            that need no teacher (cross entropy).
        func: the name errors carry (the public wrapper's).
    Returns:
        (loss — scalar, or [...] under "none"; extras — per-token detached outputs of ``row_loss``, [...]).

    Example:
        >>> h, w, m = torch.ones(6, 4), torch.ones(10, 4), torch.ones(6)
        >>> loss, _ = fused_token_loss(NamedTokenLoss("forward_kl"), h, w, m, teacher_hidden=h, teacher_weight=w)
        >>> float(loss)
        0.0
    """
    return _fused_token(row_loss, student_hidden, weight, target, teacher_hidden=teacher_hidden,
                        teacher_weight=teacher_weight, bias=bias, teacher_bias=teacher_bias, normalizer=normalizer,
                        reduction=reduction, chunk_size=chunk_size, target_is_labels=target_is_labels,
                        ignore_index=ignore_index, func=func, hidden_name="student_hidden")


def _fused_token(row_loss: NamedTokenLoss | RowLoss, student_hidden: torch.Tensor, weight: torch.Tensor,
                 target: torch.Tensor, *, teacher_hidden: torch.Tensor | None, teacher_weight: torch.Tensor | None,
                 bias: torch.Tensor | None, teacher_bias: torch.Tensor | None, normalizer: float | None,
                 reduction: str, chunk_size: int | None, target_is_labels: bool, ignore_index: int, func: str,
                 hidden_name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``fused_token_loss``, its student hidden states named ``hidden_name`` in errors."""
    v.check_reduction(func, reduction)
    normalizer = v.check_normalizer_option(func, normalizer, reduction)
    size = v.check_chunk_options(func, chunk_size, ignore_index)
    row_fn = _row_loss(func, row_loss)
    target_name = contract.check_token_call(
        func, describe, ValueChecks(func), hidden_name=hidden_name, student_hidden=student_hidden, weight=weight,
        bias=bias, target=target, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
        teacher_bias=teacher_bias, target_is_labels=target_is_labels, ignore_index=ignore_index)
    lead = tuple(student_hidden.shape[:-1])
    dtype = compute_dtype(student_hidden.dtype)
    flat_target = target.reshape(-1).long() if target_is_labels else target.reshape(-1)
    count = (flat_target != ignore_index).sum() if target_is_labels else (flat_target != 0).sum()
    scale = None
    if reduction == "sum":
        scale = 1.0
    elif reduction == "mean":
        if normalizer is None:
            v.check_nonempty(func, target_name, float(count))
        scale = 1.0 / (normalizer if normalizer is not None else float(count))
    rows = student_hidden.reshape(-1, student_hidden.shape[-1]).to(dtype).contiguous()
    teacher = (None if teacher_hidden is None else
               teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).to(dtype).contiguous(),
               None if teacher_weight is None else teacher_weight.detach().to(dtype).contiguous(),
               None if teacher_bias is None else teacher_bias.detach().to(dtype))
    w = weight.to(dtype).contiguous()
    bb = None if bias is None else bias.to(dtype)
    kernel = token_kernel(row_loss.name, row_loss.kwargs) if isinstance(row_loss, NamedTokenLoss) else None
    if kernel is not None:
        _check_kernel_options(func, row_loss, dtype, target_is_labels)
        out, extras = _kernel_token(kernel, rows, w, bb, teacher, flat_target, target_is_labels=target_is_labels,
                                    ignore_index=ignore_index, scale=scale, chunk_size=size)
    else:
        size = size or auto_chunk_size(weight.shape[0], n_rows=rows.shape[0], itemsize=rows.element_size(),
                                       buffers=_ROW_LOSS_BUFFERS)
        plan = _TokenPlan(row_loss=row_fn, target=flat_target, teacher_hidden=teacher[0], teacher_weight=teacher[1],
                          teacher_bias=teacher[2], chunk_size=size, scale=scale, extras={})
        with v.reported_as(func, {**contract.TOKEN_ARGUMENTS, "logits": hidden_name}):
            out = _TokenChunkLoss.apply(rows, w, bb, plan)
        extras = plan.extras
    extras = {k: t.reshape(lead) for k, t in extras.items()}
    return (out.reshape(lead) if reduction == "none" else out), extras


def _named_wrapper(func: str, arguments: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The ``fused_token_loss`` call of the named wrapper ``func`` given its ``arguments`` (the same in every
    backend: ``dpkd.spec.fused.token_call``)."""
    loss, kwargs = contract.token_call(func, arguments)
    return _fused_token(loss, **kwargs)


def fused_dpkd_token_loss(
    student_hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor, mask: torch.Tensor, *, bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None, beta: float = 0.1, form: str = "sigmoid",
    label_smoothing: float = 0.0, reference_free: bool = False, lambda_: float = 50.0,
    normalizer: float | None = None, reduction: str = "mean", chunk_size: int | None = None,
) -> TokenPreferenceLoss:
    """``dpkd.spec.dpkd_token_loss`` (the released code's argmax preference) on the two lm_heads.

    The same value, rewards, agreement and student gradients as ``dpkd_token_loss`` on materialised logits
    (the teacher is frozen here). student_hidden [..., H], teacher_hidden [..., H_t], mask [...].
    """
    out, extras = _named_wrapper("fused_dpkd_token_loss", locals())
    agreement = extras["agree"].sum() / max(int((mask != 0).sum()), 1)
    return TokenPreferenceLoss(out, agreement, extras["chosen"], extras["rejected"])


def fused_forward_kl(student_hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                     teacher_weight: torch.Tensor, mask: torch.Tensor, *, bias: torch.Tensor | None = None,
                     teacher_bias: torch.Tensor | None = None, temperature: float = 1.0,
                     normalizer: float | None = None, reduction: str = "mean",
                     chunk_size: int | None = None) -> torch.Tensor:
    """``dpkd.spec.forward_kl`` (KL(p‖q) per token) over token chunks of the two lm_heads; teacher frozen."""
    return _named_wrapper("fused_forward_kl", locals())[0]


def fused_reverse_kl(student_hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                     teacher_weight: torch.Tensor, mask: torch.Tensor, *, bias: torch.Tensor | None = None,
                     teacher_bias: torch.Tensor | None = None, temperature: float = 1.0,
                     normalizer: float | None = None, reduction: str = "mean",
                     chunk_size: int | None = None) -> torch.Tensor:
    """``dpkd.spec.reverse_kl`` (KL(q‖p) per token) over token chunks of the two lm_heads; teacher frozen."""
    return _named_wrapper("fused_reverse_kl", locals())[0]


def fused_generalized_jsd(student_hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                          teacher_weight: torch.Tensor, mask: torch.Tensor, *, bias: torch.Tensor | None = None,
                          teacher_bias: torch.Tensor | None = None, beta: float = 0.5, temperature: float = 1.0,
                          normalizer: float | None = None, reduction: str = "mean",
                          chunk_size: int | None = None) -> torch.Tensor:
    """``dpkd.spec.generalized_jsd`` (TRL's β convention) over token chunks; teacher frozen."""
    return _named_wrapper("fused_generalized_jsd", locals())[0]


def fused_akl(student_hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
              teacher_weight: torch.Tensor, mask: torch.Tensor, *, bias: torch.Tensor | None = None,
              teacher_bias: torch.Tensor | None = None, mu: float = 0.5, temperature: float = 1.0,
              normalizer: float | None = None, reduction: str = "mean", chunk_size: int | None = None) -> torch.Tensor:
    """``dpkd.spec.akl`` (head/tail weighted forward + reverse KL) over token chunks; teacher frozen."""
    return _named_wrapper("fused_akl", locals())[0]


def fused_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                        bias: torch.Tensor | None = None, ignore_index: int = -100, normalizer: float | None = None,
                        reduction: str = "mean", chunk_size: int | None = None) -> torch.Tensor:
    """``dpkd.spec.cross_entropy`` (−log q[label], the SFT/LM term) over token chunks of the lm_head;
    hidden [..., H], labels [...] (``ignore_index`` rows contribute 0)."""
    return _named_wrapper("fused_cross_entropy", locals())[0]
