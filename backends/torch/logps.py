"""Per-token and per-sequence log-probabilities of labels under logits, in PyTorch (spec/README.md §1).

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
    """``dpkd.spec.token_logps`` in PyTorch: log-probability of each label under the softmax of its logits; 0 at ignored
    positions. Formula, arguments, errors and references: the spec function. Dtypes and checks: ``dpkd.backends.torch``.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.0]]])
        >>> token_logps(logits, torch.tensor([[0, 2, -100]])).round(decimals=4)
        tensor([[-0.4076, -1.0986,  0.0000]])
    """
    func = "token_logps"
    return _token_logps(func, logits, labels, v.check_options(func, ignore_index=ignore_index)["ignore_index"])[0]


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """``dpkd.spec.sequence_logps`` in PyTorch: summed log-probability of each row's labels, and the number of labels
    counted. Formula, arguments, errors and references: the spec function. Dtypes and checks: ``dpkd.backends.torch``.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.0]]])
        >>> s, n = sequence_logps(logits, torch.tensor([[0, 2, -100]]))
        >>> s.round(decimals=4), n
        (tensor([-1.5062]), tensor([2]))
    """
    func = "sequence_logps"
    ignore = v.check_options(func, ignore_index=ignore_index)["ignore_index"]
    per_token, keep = _token_logps(func, logits, labels, ignore)
    return per_token.sum(dim=-1), keep.sum(dim=-1, dtype=torch.int64)


def shift_for_causal_lm(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``dpkd.spec.shift_for_causal_lm`` in PyTorch: align a causal LM's next-token logits with its labels: drop the
    last logit and the first label. Formula, arguments, errors and references: the spec function. Dtypes and checks:
    ``dpkd.backends.torch``.

    Example:
        >>> import torch
        >>> lg, lb = shift_for_causal_lm(torch.zeros(2, 5, 7), torch.zeros(2, 5, dtype=torch.long))
        >>> tuple(lg.shape), tuple(lb.shape)
        ((2, 4, 7), (2, 4))
    """
    func = "shift_for_causal_lm"
    require(func, logits=logits, labels=labels)
    logits, labels = as_tensor(logits), as_tensor(labels)
    v.check_logits_labels_shapes(func, tuple(logits.shape), tuple(labels.shape))
    v.check_shiftable(func, "logits", logits.shape[-2])
    return logits[..., :-1, :], labels[..., 1:]
