"""The fused, token-chunked lm_head path of the Torch backend: the token-level losses (the sequence-level
ones and ``linear_token_logps`` are in ``fused.py``; the per-chunk kernels in ``_lm_head.py``).

``fused_token_loss`` (``fused_dpkd_token_loss``, ``fused_forward_kl``, ``fused_reverse_kl``,
``fused_generalized_jsd``, ``fused_akl``, ``fused_cross_entropy``) — token-level losses that need the whole
student and teacher distributions at the same positions: both logit chunks are computed together, the
backend's own per-token formula (``dpkd.backends.torch.token`` / ``.distill`` under reduction="none",
named by a ``NamedTokenLoss``) runs on each chunk, and autograd of that chunk gives d loss/d logits.
Reduced losses take one pass (the gradient is formed during the forward and handed to autograd without a
copy); ``reduction="none"`` recomputes each chunk in backward. The teacher is frozen (no gradient), and its
hidden size H_t may differ from the student's H.
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
from ._lm_head import HandedGradients, LMHeadGrads, backprop_chunk, describe

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

# Live [chunk, V] buffers per chunk: student and teacher logits plus autograd's temporaries of the
# per-chunk loss (the sequence/logp paths work in place in one buffer).
TOKEN_LOSS_BUFFERS = 8

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
        row_loss=row_fn, target=flat_target,
        teacher_hidden=None if teacher_hidden is None else
        teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).to(dtype).contiguous(),
        teacher_weight=None if teacher_weight is None else teacher_weight.detach().to(dtype).contiguous(),
        teacher_bias=None if teacher_bias is None else teacher_bias.detach().to(dtype),
        chunk_size=size, scale=scale, extras={},
    )
    with v.reported_as(func, {**contract.TOKEN_ARGUMENTS, "logits": hidden_name}):
        out = _TokenChunkLoss.apply(rows, weight.to(dtype).contiguous(), None if bias is None else bias.to(dtype),
                                    plan)
    extras = {k: t.reshape(lead) for k, t in plan.extras.items()}
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
