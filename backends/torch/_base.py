"""The one base mechanism of the Torch backend: dtype policy, validation glue, stable primitives, reductions.

Every loss module builds on these; none re-implements them. The mathematics is written against torch
directly (never by calling ``dpkd.spec``), while every error is raised through ``dpkd.spec.validation`` so
that the message is the spec's, word for word.

Dtype policy (spec/CONVENTIONS.md, "General"): float64 in → float64 math; float32 in → float32 math;
bfloat16/float16 in → the math runs in float32 and the loss comes back in float32. The cast is an ordinary
differentiable ``Tensor.to``, so autograd hands gradients back in the caller's dtype.

Value checks (finite inputs, lengths > 0, labels in the vocabulary, binary masks, non-empty means) need the
data. They run eagerly, as one batched device→host transfer per call, and are skipped while the function is
being traced — under ``torch.compile`` / ``torch.export`` (``torch.compiler.is_compiling()``), under a
``torch.func`` transform (``grad``, ``vmap``, ``jacrev``…: a functorch interpreter is on the stack) and under
``torch.jit.trace`` — because a data-dependent Python branch cannot be traced. Option, shape, dtype and
device checks always run. Validate a batch eagerly once if you only ever call the loss under a transform.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from dpkd.spec import validation as v

__all__ = [
    "compute_dtype",
    "dtype_name",
    "tracing",
    "as_tensor",
    "require",
    "shape_of",
    "integer_arg",
    "check_same_placement",
    "ValueChecks",
    "float_arg",
    "softplus",
    "smoothed_sigmoid_loss",
    "positive_part",
    "kl_divergence",
    "shifted_logits",
    "gather_last",
    "reduce_elements",
    "options",
    "token_denominator",
    "reduce_tokens",
    "sequence_inputs",
    "TokenInputs",
    "token_inputs",
]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in for an input of ``dtype``: float64 stays, everything else is float32."""
    if dtype == torch.float64:
        return torch.float64
    return torch.float32


def tracing() -> bool:
    """True while torch.compile/export, a torch.func transform or torch.jit.trace is tracing the call.

    Data-dependent Python checks are skipped then (see the module docstring)."""
    if torch.compiler.is_compiling():
        return True
    if torch.jit.is_tracing():
        return True
    # A functorch transform (grad, vmap, jvp, functionalize) pushes an interpreter; vmap cannot turn a
    # batched tensor into a Python bool, so every transform is treated alike.
    return torch._C._functorch.peek_interpreter_stack() is not None


def as_tensor(x: Any) -> torch.Tensor:
    """Tensors pass through untouched (autograd history kept); NumPy arrays and Python numbers are wrapped."""
    if isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(x)


def shape_of(x: Any) -> tuple[int, ...]:
    """The shape of a tensor, NumPy array, nested list or scalar (``None`` has shape ())."""
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    return tuple(np.shape(x))


def require(func: str, **arrays: Any) -> None:
    """The spec's presence check, in argument order: ``None`` for a required array is an error."""
    for name, x in arrays.items():
        v.require(func, name, x)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float64`` → ``float64``: the words NumPy prints, so the message equals the spec's."""
    return str(dtype).removeprefix("torch.")


def _is_integer(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def float_arg(func: str, name: str, x: Any) -> torch.Tensor:
    """A float array argument: required, floating or integer (integers are accepted like the spec's and
    computed in float32 by ``compute_dtype``); bool/complex are refused.

    Not yet checked for finiteness: value checks come after every shape/dtype check (``ValueChecks``)."""
    require(func, **{name: x})
    t = as_tensor(x)
    if not t.is_floating_point():
        v.check_floating_dtype(func, name, _is_integer(t), dtype_name(t.dtype))
    return t


def integer_arg(func: str, name: str, x: Any) -> torch.Tensor:
    """An integer array argument (labels)."""
    t = as_tensor(x)
    v.check_integer_dtype(func, name, _is_integer(t), dtype_name(t.dtype))
    return t


def check_same_placement(
    func: str, tensors: Sequence[tuple[str, torch.Tensor | None]], *, same_dtype: Sequence[str] = ()
) -> None:
    """All tensors on one device; the names in ``same_dtype`` also share one dtype (student vs teacher).

    Torch would otherwise fail deep inside with a device error, or silently promote a bfloat16 student
    against a float32 teacher; here the caller gets the argument's name."""
    given = [(n, t) for n, t in tensors if t is not None]
    first_name, first = given[0]
    for name, t in given[1:]:
        if t.device != first.device:
            v.fail(func, name, f"is on device {t.device} but `{first_name}` is on {first.device}; "
                               "move them to one device")
    typed = [(n, t) for n, t in given if n in same_dtype]
    for name, t in typed[1:]:
        if t.dtype != typed[0][1].dtype:
            v.fail(func, name, f"has dtype {t.dtype} but `{typed[0][0]}` has {typed[0][1].dtype}; "
                               "cast them to one dtype (the math runs in float32 or wider anyway)")


class ValueChecks:
    """Collects the data-dependent checks of one call and runs them in order with one host transfer.

    The facts are 0-dim tensors; ``run()`` moves them to the host together (one sync on an accelerator)
    and calls the ``dpkd.spec.validation`` helper of each in the order they were added, so the first
    failing check raises exactly the spec's error. Nothing happens while tracing.
    """

    def __init__(self, func: str):
        self.func = func
        self.enabled = not tracing()
        self._facts: list[torch.Tensor] = []
        self._raise: list[Callable[[float], None]] = []

    def _add(self, fact: torch.Tensor, raise_fn: Callable[[float], None]) -> None:
        if self.enabled:
            self._facts.append(fact.detach().reshape(()).to(torch.float32))
            self._raise.append(raise_fn)

    def finite(self, name: str, t: torch.Tensor | None) -> None:
        if t is not None and t.is_floating_point():
            self._add(torch.isfinite(t).all(), lambda ok: v.check_finite(self.func, name, bool(ok)))

    def finite_array(self, name: str, t: torch.Tensor | None) -> None:
        """The finite check of a (large) hidden-state or lm_head array, as two read-only reductions.

        max and min propagate NaN and are ±inf exactly when an entry is, so the [2]-element check is
        equivalent to ``isfinite(t).all()`` without its four full-size temporaries."""
        if t is not None and self.enabled and t.numel() > 0:
            self.finite(name, torch.stack([t.detach().amax(), t.detach().amin()]))

    def positive(self, name: str, t: torch.Tensor | None) -> None:
        if t is not None:
            self._add((t > 0).all(), lambda ok: v.check_positive_lengths(self.func, name, bool(ok)))

    def labels_in_vocab(self, name: str, labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
        valid = ((labels >= 0) & (labels < vocab_size)) | (labels == ignore_index)
        self._add(valid.all(), lambda ok: v.check_labels_in_vocab(self.func, name, bool(ok), vocab_size,
                                                                  ignore_index))

    def binary(self, name: str, mask: torch.Tensor) -> None:
        if mask.dtype != torch.bool:
            self._add(((mask == 0) | (mask == 1)).all(), lambda ok: v.check_binary_mask(self.func, name, bool(ok)))

    def labelled_rows(self, name: str, labels: torch.Tensor, ignore_index: int) -> None:
        """Every row of ``labels`` [B, T] has a label that is not ``ignore_index`` (its length is > 0)."""
        self._add((labels != ignore_index).any(-1).all(),
                  lambda ok: v.check_labelled_rows(self.func, name, bool(ok), ignore_index))

    def nonempty(self, name: str, count: torch.Tensor) -> None:
        # counts are integers >= 0, so "> 0" survives the float32 transfer exactly
        self._add(count, lambda c: v.check_nonempty(self.func, name, c))

    def run(self) -> None:
        if not self._facts:
            return
        values = torch.stack(self._facts).tolist()
        for value, raise_fn in zip(values, self._raise):
            raise_fn(value)


# --------------------------------------------------------------------------------------------------
# Stable primitives


def softplus(z: torch.Tensor) -> torch.Tensor:
    """log(1 + e^z) = −log σ(−z), exact for every finite z (no threshold switch, unlike F.softplus).

    ``logaddexp`` differentiates to σ(z) without overflow and gives 1/2 at z = 0."""
    return torch.logaddexp(torch.zeros((), dtype=z.dtype, device=z.device), z)


def smoothed_sigmoid_loss(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """cDPO: (1−ε)·softplus(−z) + ε·softplus(z) = −(1−ε) log σ(z) − ε log σ(−z) (spec/README.md §2, §3)."""
    loss = softplus(-z)
    if label_smoothing == 0.0:
        return loss
    return (1.0 - label_smoothing) * loss + label_smoothing * softplus(z)


def positive_part(x: torch.Tensor) -> torch.Tensor:
    """max(0, x) with gradient 1[x > 0] (strict), the spec's k = 1[c > a]; ``clamp`` would pass 1 at x = 0."""
    return torch.where(x > 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = Σ_v p (log p − log q) over the last axis, from log-probabilities: where p underflows to
    0 the term is 0·(finite) = 0, so it is finite for any finite logits."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def shifted_logits(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x − max x, logsumexp(x − max x)) over the last axis: log_softmax(x)[v] = shifted[v] − log_z.

    Gathering from the shifted logits before subtracting the normaliser keeps float32 accurate when
    the logits are huge (±1e4: x[v] − logsumexp(x) would lose ~1e-5 to cancellation). The max is
    detached: log_softmax does not depend on it, so the gradient is the exact e_v − softmax(x)."""
    shifted = x - x.detach().amax(dim=-1, keepdim=True)
    return shifted, torch.logsumexp(shifted, dim=-1)


def gather_last(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[..., index[...]] along the last axis: [..., V] × [...] → [...]."""
    return torch.gather(x, -1, index.unsqueeze(-1)).squeeze(-1)


# --------------------------------------------------------------------------------------------------
# Reductions. Sequence-level losses reduce over every element; token-level losses over masked positions.


def reduce_elements(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.mean()



def options(func: str, **values: Any) -> dict[str, Any]:
    """The call's options checked against the spec's declaration (``dpkd.spec.validation.check_options``,
    signature order); returns the checked values. A 0-dim tensor ``normalizer``, as Hugging Face's
    ``num_items_in_batch`` often is, is read eagerly first (under tracing pass a Python number)."""
    normalizer = values.get("normalizer")
    if isinstance(normalizer, torch.Tensor) and normalizer.ndim == 0 and not tracing():
        values["normalizer"] = normalizer.item()
    return v.check_options(func, **values)


def token_denominator(
    mask: torch.Tensor, normalizer: float | None, reduction: str, dtype: torch.dtype, checks: ValueChecks,
    mask_name: str = "mask",
) -> torch.Tensor | float:
    """The mean's denominator: the caller's global token count (exact gradient accumulation), else the
    mask's own count (counted in int64, so it is exact however many tokens there are)."""
    if reduction != "mean":
        return 1.0
    if normalizer is not None:
        return float(normalizer)
    count = (mask != 0).sum()
    checks.nonempty(mask_name, count)
    return count.to(dtype)


def reduce_tokens(per_token: torch.Tensor, mask: torch.Tensor, reduction: str,
                  denominator: torch.Tensor | float) -> torch.Tensor:
    """none: m·ℓ [..., T]; sum: Σ m·ℓ; mean: Σ m·ℓ / denominator."""
    masked = per_token * mask
    if reduction == "none":
        return masked
    total = masked.sum()
    return total if reduction == "sum" else total / denominator


class TokenInputs(NamedTuple):
    """The validated inputs of a student/teacher token loss (the same bundle in every backend), cast to the
    compute dtype."""

    student: torch.Tensor  # S / τ  [..., T, V]
    teacher: torch.Tensor  # T / τ  [..., T, V]
    mask: torch.Tensor  # [..., T], 0/1 numbers in the compute dtype
    denominator: torch.Tensor | float  # the mean's denominator (1.0 unless reduction == "mean")


def token_inputs(
    func: str, student_logits: Any, teacher_logits: Any, mask: Any, *, normalizer: float | None,
    reduction: str, temperature: float = 1.0,
) -> TokenInputs:
    """Shapes (a vocabulary mismatch included), dtypes, devices, then values (finite logits, binary mask,
    non-empty mean) — the spec's order; the caller has checked its options already.

    Student and teacher must share one dtype and one device (a clear error instead of a silent
    promotion or a device error from deep inside); the mask only shares the device."""
    v.check_student_teacher_shapes(func, shape_of(student_logits), shape_of(teacher_logits), shape_of(mask))
    s = float_arg(func, "student_logits", student_logits)
    t = float_arg(func, "teacher_logits", teacher_logits)
    m = as_tensor(mask)
    if m.is_complex():
        v.check_binary_mask(func, "mask", False)
    check_same_placement(func, [("student_logits", s), ("teacher_logits", t), ("mask", m)],
                         same_dtype=("student_logits", "teacher_logits"))
    checks = ValueChecks(func)
    checks.finite("student_logits", s)
    checks.finite("teacher_logits", t)
    checks.binary("mask", m)
    dtype = compute_dtype(s.dtype)
    denominator = token_denominator(m, normalizer, reduction, dtype, checks)
    checks.run()
    s, t = s.to(dtype), t.to(dtype)
    if temperature != 1.0:
        s, t = s / temperature, t / temperature
    return TokenInputs(s, t, m.to(dtype), denominator)


def sequence_inputs(
    func: str, arrays: dict[str, Any], *, optional: tuple[str, ...] = (), lengths: tuple[str, ...] = (),
    reduction: str | None = None,
) -> dict[str, torch.Tensor | None]:
    """Validate the per-example array arguments of one call and cast them to the compute dtype.

    ``arrays`` maps argument names (in signature order) to values; names in ``optional`` may be None;
    names in ``lengths`` are lengths (int or float, > 0). The spec's order: presence, one shape (no
    broadcasting), dtypes, one device (and one dtype for the log-prob arguments), finite values, positive
    lengths, and under ``reduction="mean"`` a non-empty input (a mean over nothing is 0/0)."""
    for name, x in arrays.items():
        if name not in optional:
            v.require(func, name, x)
    given = {n: x for n, x in arrays.items() if x is not None}
    v.check_same_shape(func, {n: shape_of(x) for n, x in given.items()})
    tensors = {n: float_arg(func, n, x) for n, x in given.items()}
    logps = tuple(n for n in tensors if n not in lengths)
    check_same_placement(func, list(tensors.items()), same_dtype=logps)
    checks = ValueChecks(func)
    for name, t in tensors.items():
        checks.finite(name, t)
    for name in lengths:
        checks.positive(name, tensors.get(name))
    checks.run()
    first = next(iter(tensors))
    if reduction == "mean":
        v.check_nonempty_elements(func, first, tensors[first].numel())  # static: the size is known
    dtype = compute_dtype(tensors[logps[0]].dtype)
    return {n: (tensors[n].to(dtype) if n in tensors else None) for n in arrays}
