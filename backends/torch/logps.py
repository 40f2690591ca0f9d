"""Per-token and per-sequence log-probabilities of labels under logits, in PyTorch (SPEC-MATH §3A).

These produce the four inputs a, b, c, d of every sequence-level loss. The log-softmax normaliser is a
``logsumexp`` in float32 or wider (float64 for float64 logits), whatever the logits' dtype; only the
labels' entries are gathered, so no second [..., T, V] tensor is materialised besides the upcast copy.
"""

from __future__ import annotations

import torch
from dpkd.spec import validation as v

from ._base import (
    ValueChecks,
    as_tensor,
    check_same_placement,
    compute_dtype,
    float_arg,
    gather_last,
    integer_arg,
    require,
    shape_of,
    shifted_logits,
)

__all__ = ["token_logps", "sequence_logps", "shift_for_causal_lm"]


def _token_logps(func: str, logits: torch.Tensor, labels: torch.Tensor, ignore: int, *,
                 presence: bool = True, require_tokens: bool = False):
    """Validate the arrays (spec order: presence, shapes, dtypes, device, values) and compute; the caller
    has checked its options (``ignore`` is the validated ignore_index).

    ``presence``: the "is required" check of the log-prob functions (cross_entropy goes straight to shapes,
    like the spec). ``require_tokens``: a mean over the labels follows, so zero counted labels is an error.
    Returns (per-token log-probs in the compute dtype with 0 at ignored positions, keep mask)."""
    if presence:
        require(func, logits=logits, labels=labels)
    v.check_logits_labels_shapes(func, shape_of(logits), shape_of(labels))
    x = float_arg(func, "logits", logits)
    lab = integer_arg(func, "labels", labels)
    check_same_placement(func, [("logits", x), ("labels", lab)])
    checks = ValueChecks(func)
    checks.finite("logits", x)
    checks.labels_in_vocab("labels", lab, x.shape[-1], ignore)
    if require_tokens:
        checks.nonempty("labels", (lab != ignore).sum())
    checks.run()

    x = x.to(compute_dtype(x.dtype))
    keep = lab != ignore
    # ignored positions may hold any integer (usually -100): gather index 0 there, zero it afterwards
    safe = torch.where(keep, lab, torch.zeros((), dtype=lab.dtype, device=lab.device)).long()
    shifted, log_z = shifted_logits(x)
    picked = gather_last(shifted, safe) - log_z
    return torch.where(keep, picked, torch.zeros((), dtype=x.dtype, device=x.device)), keep


def token_logps(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
    """Log-probability of each label under the softmax of its logits; 0 at ignored positions.

    Symbols: ℓ_j ∈ R^V the logits at position j, y_j its label, m_j = 1[y_j ≠ ignore_index].

    Formula (SPEC-MATH §3A):  o_j = m_j · (ℓ_{j,y_j} − logsumexp(ℓ_j)).

    Labels must already be aligned with the logits (``shift_for_causal_lm`` for a causal LM).

    Args:
        logits: float tensor [..., T, V] (any float dtype; the math runs in float32, float64 for float64).
        labels: integer tensor [..., T], same device; entries in [0, V) or ``ignore_index``.
        ignore_index: label value that marks a position without loss (default -100).

    Returns:
        tensor [..., T] in float32 (float64 for float64 logits); differentiable w.r.t. ``logits``.

    Raises:
        DPKDInputError: shapes disagree, ``labels`` not integer, devices differ, NaN/Inf in ``logits``, a
        label outside the vocabulary that is not ``ignore_index`` (value checks eager only).

    Example:
        >>> import torch
        >>> logits = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.0]]])
        >>> token_logps(logits, torch.tensor([[0, 2, -100]])).round(decimals=4)
        tensor([[-0.4076, -1.0986,  0.0000]])

    References: paper Eq. 8 (log q_θ(y|x) = Σ_j log q_θ(y_j | x, y_<j)).
    See also: ``sequence_logps``, ``shift_for_causal_lm``, ``dpkd.spec.token_logps``.
    """
    func = "token_logps"
    return _token_logps(func, logits, labels, v.check_options(func, ignore_index=ignore_index)["ignore_index"])[0]


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's labels, and the number of labels counted.

    Formula (SPEC-MATH §3A, paper Eq. 8):  log q(y|x) = Σ_j m_j log_softmax(ℓ_j)[y_j],  |y| = Σ_j m_j.

    A row whose labels are all ``ignore_index`` gives (0.0, 0): the loss that receives the zero length
    refuses it.

    Args:
        logits: float tensor [..., T, V].
        labels: integer tensor [..., T]; in [0, V) or ``ignore_index``.
        ignore_index: label value excluded from both the sum and the count.

    Returns:
        ``(sum_logps, n_tokens)``: [...] in float32 (float64 for float64 logits), and int64 [...].

    Example:
        >>> import torch
        >>> logits = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.0]]])
        >>> s, n = sequence_logps(logits, torch.tensor([[0, 2, -100]]))
        >>> s.round(decimals=4), n
        (tensor([-1.5062]), tensor([2]))

    See also: ``token_logps``, ``dpkd_loss`` (takes these sums and counts as lengths).
    """
    func = "sequence_logps"
    ignore = v.check_options(func, ignore_index=ignore_index)["ignore_index"]
    per_token, keep = _token_logps(func, logits, labels, ignore)
    return per_token.sum(dim=-1), keep.sum(dim=-1, dtype=torch.int64)


def shift_for_causal_lm(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align a causal LM's next-token logits with its labels: drop the last logit and the first label.

    Formula: logits[..., :-1, :] predicts labels[..., 1:] (position j's logits score token j + 1).

    Args:
        logits: tensor [..., T, V] with T ≥ 2.
        labels: tensor [..., T] (input ids, ``ignore_index`` where there is no loss).

    Returns:
        ``(logits[..., :-1, :], labels[..., 1:])`` — views, dtypes unchanged.

    Raises:
        DPKDInputError: shapes disagree, or T < 2.

    Example:
        >>> import torch
        >>> lg, lb = shift_for_causal_lm(torch.zeros(2, 5, 7), torch.zeros(2, 5, dtype=torch.long))
        >>> tuple(lg.shape), tuple(lb.shape)
        ((2, 4, 7), (2, 4))

    See also: ``token_logps``, ``sequence_logps``.
    """
    func = "shift_for_causal_lm"
    require(func, logits=logits, labels=labels)
    logits, labels = as_tensor(logits), as_tensor(labels)
    v.check_logits_labels_shapes(func, tuple(logits.shape), tuple(labels.shape))
    v.check_shiftable(func, "logits", logits.shape[-2])
    return logits[..., :-1, :], labels[..., 1:]
