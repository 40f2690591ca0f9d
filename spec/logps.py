"""Per-token and per-sequence log-probabilities of labels under logits (spec/README.md §1), in float64.

These produce the four inputs a, b, c, d of every sequence-level loss: run a model teacher-forced on a
response, take ``sequence_logps`` of its logits at the response positions.

Validation order (CONVENTIONS.md): options (``ignore_index``), then presence, shapes, dtypes, then values
(``logits`` finite, ``labels`` inside the vocabulary or equal to ``ignore_index``).
"""

from __future__ import annotations

import numpy as np

from . import validation as v
from ._common import float64_array, log_softmax, softmax

__all__ = [
    "token_logps",
    "token_logps_grad",
    "sequence_logps",
    "sequence_logps_grad",
    "shift_for_causal_lm",
]


def _require(func: str, logits: object, labels: object) -> None:
    # the same "is required" error as every float array argument of the spec (_common.float64_array)
    for name, arr in (("logits", logits), ("labels", labels)):
        v.require(func, name, arr)


def _inputs(func: str, logits: object, labels: object, ignore_index: object):
    """Validate once for a function and its gradient; returns (float64 logits, keep mask, labels made safe
    to gather)."""
    ignore = v.check_options(func, ignore_index=ignore_index)["ignore_index"]
    _require(func, logits, labels)
    lab = np.asarray(labels)
    v.check_logits_labels_shapes(func, np.shape(logits), lab.shape)
    x = float64_array(func, "logits", logits)
    v.check_integer_dtype(func, "labels", np.issubdtype(lab.dtype, np.integer), lab.dtype)
    lab = lab.astype(np.int64)
    v.check_finite(func, "logits", bool(np.all(np.isfinite(x))))
    vocab = x.shape[-1]
    keep = lab != ignore
    in_vocab = (lab >= 0) & (lab < vocab)
    v.check_labels_in_vocab(func, "labels", bool(np.all(in_vocab | ~keep)), vocab, ignore)
    # Ignored positions may hold any integer (usually -100): gather index 0 there and zero it afterwards.
    safe = np.where(keep, lab, 0)
    return x, keep, safe


@v.options(v.IGNORE_INDEX)
def token_logps(logits: np.ndarray, labels: np.ndarray, *, ignore_index: int = -100) -> np.ndarray:
    """Log-probability of each label under the softmax of its logits; 0 at ignored positions.

    Symbols: ℓ_j ∈ R^V the logits at position j, y_j its label, m_j = 1[y_j ≠ ignore_index].

    Formula (spec/README.md §1):  o_j = m_j · log_softmax(ℓ_j)[y_j] = m_j · (ℓ_{j,y_j} − logsumexp(ℓ_j)).

    Labels must already be aligned with the logits (use ``shift_for_causal_lm`` for a causal LM's
    next-token logits).

    Args:
        logits: float array [..., T, V] (computed in float64 here; finite, any magnitude).
        labels: integer array [..., T]; each entry in [0, V) or equal to ``ignore_index``.
        ignore_index: label value that marks a position without loss (default -100, the HF convention).

    Returns:
        float64 array [..., T].

    Raises:
        DPKDInputError: shapes disagree, ``labels`` not integer, NaN/Inf in ``logits``, a label outside the
        vocabulary that is not ``ignore_index``.

    Example:
        >>> import numpy as np
        >>> logits = np.array([[[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.0]]])
        >>> print(np.round(token_logps(logits, np.array([[0, 2, -100]])), 4))
        [[-0.4076 -1.0986  0.    ]]

    References: paper Eq. 8 (log q_θ(y|x) = Σ_j log q_θ(y_j | x, y_<j)).
    See also: ``sequence_logps``, ``token_logps_grad``, ``shift_for_causal_lm``.
    """
    x, keep, safe = _inputs("token_logps", logits, labels, ignore_index)
    picked = np.take_along_axis(log_softmax(x), safe[..., None], axis=-1)[..., 0]
    return np.where(keep, picked, 0.0)


def token_logps_grad(logits: np.ndarray, labels: np.ndarray, *, ignore_index: int = -100) -> dict:
    """Gradient of S = Σ_j token_logps(...)_j with respect to ``logits``.

    Formula: ∂S/∂ℓ_j = m_j · (e_{y_j} − softmax(ℓ_j)), e_v the one-hot vector of index v.

    Args/Raises: as ``token_logps``.

    Returns:
        ``{"logits": float64 array [..., T, V]}``.

    Example:
        >>> import numpy as np
        >>> g = token_logps_grad(np.zeros((1, 2, 2)), np.array([[1, -100]]))["logits"]
        >>> print(np.round(g, 4))
        [[[-0.5  0.5]
          [ 0.   0. ]]]

    See also: ``token_logps``, ``sequence_logps_grad``.
    """
    x, keep, safe = _inputs("token_logps_grad", logits, labels, ignore_index)
    return {"logits": _logits_grad(x, keep, safe)}


def _logits_grad(x: np.ndarray, keep: np.ndarray, safe: np.ndarray) -> np.ndarray:
    onehot = np.zeros_like(x)
    np.put_along_axis(onehot, safe[..., None], 1.0, axis=-1)
    return np.where(keep[..., None], onehot - softmax(x), 0.0)


@v.options(v.IGNORE_INDEX)
def sequence_logps(
    logits: np.ndarray, labels: np.ndarray, *, ignore_index: int = -100
) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probability of each row's labels, and the number of labels counted.

    Formula (spec/README.md §1, paper Eq. 8):  log q(y|x) = Σ_j m_j log_softmax(ℓ_j)[y_j],  |y| = Σ_j m_j.

    A row whose labels are all ``ignore_index`` gives (0.0, 0): no error here — the loss that receives a
    zero length refuses it.

    Args:
        logits: float array [..., T, V].
        labels: integer array [..., T]; in [0, V) or ``ignore_index``.
        ignore_index: label value excluded from both the sum and the count.

    Returns:
        ``(sum_logps, n_tokens)``: float64 [...] and int64 [...].

    Example:
        >>> import numpy as np
        >>> logits = np.array([[[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.0]]])
        >>> s, n = sequence_logps(logits, np.array([[0, 2, -100]]))
        >>> print(np.round(s, 4), n)
        [-1.5062] [2]

    See also: ``token_logps``, ``sequence_logps_grad``, ``dpkd_loss`` (takes these sums and counts).
    """
    x, keep, safe = _inputs("sequence_logps", logits, labels, ignore_index)
    picked = np.take_along_axis(log_softmax(x), safe[..., None], axis=-1)[..., 0]
    return np.sum(np.where(keep, picked, 0.0), axis=-1), np.sum(keep, axis=-1).astype(np.int64)


def sequence_logps_grad(logits: np.ndarray, labels: np.ndarray, *, ignore_index: int = -100) -> dict:
    """Gradient of S = Σ_rows sum_logps (the token count has no gradient) with respect to ``logits``.

    Formula: ∂S/∂ℓ_j = m_j · (e_{y_j} − softmax(ℓ_j)) — the same as ``token_logps_grad``, since the
    row sum of token log-probs is summed again.

    Args/Raises: as ``sequence_logps``.

    Returns:
        ``{"logits": float64 array [..., T, V]}``.

    Example:
        >>> import numpy as np
        >>> g = sequence_logps_grad(np.zeros((1, 1, 4)), np.array([[3]]))["logits"]
        >>> print(np.round(g, 4))
        [[[-0.25 -0.25 -0.25  0.75]]]

    See also: ``sequence_logps``, ``token_logps_grad``.
    """
    x, keep, safe = _inputs("sequence_logps_grad", logits, labels, ignore_index)
    return {"logits": _logits_grad(x, keep, safe)}


@v.options()
def shift_for_causal_lm(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Align a causal LM's next-token logits with its labels: drop the last logit and the first label.

    Formula: logits[..., :-1, :] predicts labels[..., 1:] (position j's logits score token j + 1).

    Args:
        logits: array [..., T, V] with T ≥ 2.
        labels: array [..., T] (the input ids, with ``ignore_index`` on positions without loss).

    Returns:
        ``(logits[..., :-1, :], labels[..., 1:])`` — views, dtypes unchanged.

    Raises:
        DPKDInputError: shapes disagree, or T < 2 (nothing would be left to score).

    Example:
        >>> import numpy as np
        >>> lg, lb = shift_for_causal_lm(np.zeros((2, 5, 7)), np.zeros((2, 5), dtype=np.int64))
        >>> print(lg.shape, lb.shape)
        (2, 4, 7) (2, 4)

    See also: ``token_logps``, ``sequence_logps``.
    """
    func = "shift_for_causal_lm"
    _require(func, logits, labels)
    lg, lb = np.asarray(logits), np.asarray(labels)
    v.check_logits_labels_shapes(func, lg.shape, lb.shape)
    v.check_shiftable(func, "logits", lg.shape[-2])
    return lg[..., :-1, :], lb[..., 1:]
