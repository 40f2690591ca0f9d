"""Per-token and per-sequence log-probabilities of labels under logits (spec/README.md §1), in JAX.

These produce the four inputs a, b, c, d of every sequence-level loss: run a model teacher-forced on a
response, take ``sequence_logps`` of its logits at the response positions. log-softmax runs in float32 or
wider whatever the logits' dtype (``_base.compute_dtype``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from dpkd.spec import validation as v

from . import _base

__all__ = ["token_logps", "sequence_logps", "shift_for_causal_lm"]


class LabelInputs(NamedTuple):
    """Validated logits/labels of one call."""

    logits: jax.Array  # [..., T, V], caller's dtype
    keep: jax.Array  # [..., T] bool, label != ignore_index
    safe: jax.Array  # [..., T] int, the label where kept, 0 elsewhere (safe to gather)


def label_inputs(func: str, logits: Any, labels: Any, ignore_index: int, *, presence: bool = True) -> LabelInputs:
    """Presence, shapes, dtypes, then values (logits finite, labels in the vocabulary) — the spec's order.
    ``ignore_index`` has already been checked by the caller (options come first). ``presence=False``
    leaves a None to the shape check (the spec's ``cross_entropy`` has no separate presence check)."""
    if presence:
        _base.require(func, logits=logits, labels=labels)
    v.check_logits_labels_shapes(func, _base.shape_of(logits), _base.shape_of(labels))
    x = _base.float_arg(func, "logits", logits)
    lab = _base.integer_arg(func, "labels", labels)
    _base.check_finite(func, "logits", x)
    vocab = x.shape[-1]
    _base.check_labels(func, "labels", lab, vocab, ignore_index)
    keep = lab != ignore_index
    # Ignored positions may hold any integer (usually -100): gather index 0 there and zero it afterwards.
    # Out-of-vocabulary labels only get this far under an unchecked jit; they are gathered at 0 too.
    safe = jnp.where(keep & (lab >= 0) & (lab < vocab), lab, 0)
    return LabelInputs(x, keep, safe)


def picked_logps(inputs: LabelInputs) -> jax.Array:
    """log_softmax(ℓ_j)[y_j] = ℓ_{j,y_j} − logsumexp(ℓ_j), 0 at ignored positions, in the compute dtype.

    Gathered from the shifted logits (``_base.picked_log_softmax``): the full log-softmax is never
    materialised, and its gradient is e_{y_j} − softmax(ℓ_j)."""
    x = inputs.logits.astype(_base.compute_dtype(inputs.logits))
    picked = _base.picked_log_softmax(x, inputs.safe)
    return jnp.where(inputs.keep, picked, jnp.zeros((), x.dtype))


def token_logps(logits: jax.Array, labels: jax.Array, *, ignore_index: int = -100) -> jax.Array:
    """``dpkd.spec.token_logps`` in JAX: log-probability of each label under the softmax of its logits; 0 at ignored
    positions. Formula, arguments, errors and references: the spec function. Dtypes and checks (options static under
    ``jit``): ``dpkd.backends.jax``.

    Example:
        >>> import jax.numpy as jnp
        >>> logits = jnp.array([[[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.0]]])
        >>> [round(x, 4) for x in token_logps(logits, jnp.array([[0, 2, -100]]))[0].tolist()]
        [-0.4076, -1.0986, 0.0]
    """
    func = "token_logps"
    ignore = _base.options(func, ignore_index=ignore_index)["ignore_index"]
    return picked_logps(label_inputs(func, logits, labels, ignore))


def sequence_logps(
    logits: jax.Array, labels: jax.Array, *, ignore_index: int = -100
) -> tuple[jax.Array, jax.Array]:
    """``dpkd.spec.sequence_logps`` in JAX: summed log-probability of each row's labels, and the number of labels
    counted. Formula, arguments, errors and references: the spec function. Dtypes and checks (options static under
    ``jit``): ``dpkd.backends.jax``.

    Example:
        >>> import jax.numpy as jnp
        >>> logits = jnp.array([[[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.0]]])
        >>> s, n = sequence_logps(logits, jnp.array([[0, 2, -100]]))
        >>> round(float(s[0]), 4), n.tolist()
        (-1.5062, [2])
    """
    func = "sequence_logps"
    ignore = _base.options(func, ignore_index=ignore_index)["ignore_index"]
    inputs = label_inputs(func, logits, labels, ignore)
    return jnp.sum(picked_logps(inputs), axis=-1), jnp.sum(inputs.keep, axis=-1, dtype=_base.index_dtype())


def shift_for_causal_lm(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``dpkd.spec.shift_for_causal_lm`` in JAX: align a causal LM's next-token logits with its labels: drop the last
    logit and the first label. Formula, arguments, errors and references: the spec function. Dtypes and checks (options
    static under ``jit``): ``dpkd.backends.jax``.

    Example:
        >>> import jax.numpy as jnp
        >>> lg, lb = shift_for_causal_lm(jnp.zeros((2, 5, 7)), jnp.zeros((2, 5), dtype=jnp.int32))
        >>> lg.shape, lb.shape
        ((2, 4, 7), (2, 4))
    """
    func = "shift_for_causal_lm"
    _base.require(func, logits=logits, labels=labels)
    v.check_logits_labels_shapes(func, _base.shape_of(logits), _base.shape_of(labels))
    lg, lb = _base.as_array(logits), _base.as_array(labels)
    v.check_shiftable(func, "logits", lg.shape[-2])
    return lg[..., :-1, :], lb[..., 1:]
