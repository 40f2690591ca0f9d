"""The per-chunk lm_head kernels the Torch fused path is built from (``fused.py``: sequence losses and
``linear_token_logps``; ``fused_token.py``: token losses), and its validation glue.

A chunk is a block of token rows: its logits ``rows @ Wᵀ (+ b)`` live in one ``[rows, V]`` buffer that every
chunk reuses, and every update is in place, so one chunk costs one buffer. What a chunk costs beyond its
GEMMs (measured on a CPU, benchmarks/RESULTS.md): a max, an exp and a sum over that buffer, nothing more.
The gradient of Σ g·logp is taken from exp(logits − max) as it is — G = diag(−g/Σ)·E + onehot·g — so the
row factors are applied to ``[rows, H]`` matrices, not to the buffer (``backprop_logp_chunk``);
grad_weight is written by the first chunk, not zero-filled (``LMHeadGrads``); and gradients computed during
a forward are handed to autograd without a copy (``HandedGradients``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from dpkd.spec import validation as v

from ._base import dtype_name

__all__ = [
    "describe",
    "project",
    "softmax_stats_",
    "chunk_logps",
    "LMHeadGrads",
    "backprop_chunk",
    "backprop_logp_chunk",
    "HandedGradients",
]


# --------------------------------------------------------------------------------------------------
# Validation glue: the checks themselves are dpkd.spec.validation's, on ArrayInfo descriptions


def describe(t: Any) -> v.ArrayInfo | None:
    """A tensor as the framework-free checks see it (None stays None)."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    integer = not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool
    kind = "floating" if t.is_floating_point() else "integer" if integer else "other"
    return v.ArrayInfo(tuple(t.shape), dtype_name(t.dtype), kind, t.device)



# --------------------------------------------------------------------------------------------------
# Per-chunk kernels


def project(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
            temperature: float = 1.0) -> None:
    """out ← (rows @ weightᵀ (+ bias)) / temperature: the chunk's logits.

    The division is a pass of its own, as in the unfused losses (``logits / τ``): folding 1/τ into the
    GEMM's alpha lets the BLAS round products differently per column, which breaks exact ties."""
    if bias is None:
        torch.mm(rows, weight.t(), out=out)
    else:
        torch.addmm(bias, rows, weight.t(), out=out)
    if temperature != 1.0:
        out.div_(temperature)


def softmax_stats_(buf: torch.Tensor, safe_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From logits in ``buf``: (logit of the label, logsumexp, Σ exp) per row; ``buf`` is left holding
    exp(logits − row max), the unnormalised softmax (its 1/Σ is folded into the gradient's scale)."""
    picked = buf.gather(1, safe_labels[:, None]).squeeze(1)
    row_max = buf.amax(1)
    buf.sub_(row_max[:, None]).exp_()
    total = buf.sum(1)
    return picked, row_max + total.log(), total


def chunk_logps(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                ignore_index: int, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-probs of one chunk (0 where ignored), its logsumexp, Σ exp and the safe labels;
    ``buf`` ends as exp(logits − row max)."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    project(rows, weight, bias, buf)
    picked, lse, total = softmax_stats_(buf, safe)
    return torch.where(valid, picked - lse, 0.0), lse, total, safe


class LMHeadGrads:
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
        """grad_weight[labels] += scale · rows, grad_bias[labels] += scale (a sparse gradient with no ``add``
        before it starts from zero)."""
        if not self.started:
            for g in (self.weight, self.bias):
                if g is not None:
                    g.zero_()
            self.started = True
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


def backprop_chunk(dlogits: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor,
                   grad_rows: torch.Tensor | None, head: LMHeadGrads) -> None:
    """grad_rows ← dlogits @ W; grad_weight += dlogitsᵀ @ rows; grad_bias += Σ_rows dlogits."""
    if grad_rows is not None:
        torch.mm(dlogits, weight, out=grad_rows)
    head.add(dlogits, rows)


def backprop_logp_chunk(exp_logits: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor,
                        safe_labels: torch.Tensor, g: torch.Tensor, total: torch.Tensor | None,
                        grad_rows: torch.Tensor | None, head: LMHeadGrads) -> None:
    """Backprop of Σ_n g_n·logp_n through one chunk's logits, with ``exp_logits`` = exp(logits − s_n) and
    ``total`` = Σ_v exp_logits (None: exp_logits is the softmax itself).

    G = g·(onehot − softmax) = diag(r)·E + onehot·g with r = −g/total, so both products take E as it is
    and the row factors act on [rows, H] matrices: grad_rows = r ⊙ (E @ W) + g ⊙ W[label], grad_weight
    += Eᵀ(r ⊙ rows) + scatter of g ⊙ rows at the labels. No pass over the [rows, V] buffer is spent on
    forming G (each such pass over the buffer is time beyond the GEMMs; benchmarks/RESULTS.md)."""
    r = -g if total is None else -g / total
    if grad_rows is not None:
        torch.mm(exp_logits, weight, out=grad_rows)
        grad_rows.mul_(r[:, None]).add_(weight.index_select(0, safe_labels) * g[:, None])
    head.add(exp_logits, rows * r[:, None], bias_rows=r)
    head.add_at_labels(safe_labels, rows, g)


class HandedGradients:
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
