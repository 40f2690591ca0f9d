"""What every backend's fused lm_head path shares, framework-free.

The fused functions (``dpkd.backends.torch.fused_dpkd_loss``, ``dpkd.backends.jax.fused_forward_kl``, …)
take hidden states and an lm_head instead of logits and compute a loss of this package chunk by chunk;
there is no NumPy fused implementation — the reference for a fused function is the spec function on the
materialised logits ``hidden @ Wᵀ + b`` (spec/CONVENTIONS.md "The fused lm_head path"). What is the same
in every backend lives here:

* the ``loss`` argument of ``fused_sequence_loss`` / ``fused_token_loss``: a :class:`NamedSequenceLoss` or
  :class:`NamedTokenLoss` — a dpkd function by name with its options, hashable (JAX makes it a static
  argument of the compiled computation) — which each backend binds to its own function of that name;
* the chunk budget (:func:`auto_chunk_size`);
* how the inner loss's argument names map to the fused function's (:data:`SEQUENCE_ARGUMENTS`,
  :data:`TOKEN_ARGUMENTS`), so that an error raised inside names the argument the caller passed;
* the TRL/Liger calling layout of a sequence loss (:func:`check_concatenated`): one hidden tensor
  [2B, T, H] with the chosen rows first, one target tensor, the teacher in the same layout — the
  backends' ``fused_concatenated`` splits it into the two halves the fused losses take.

The shape checks are in :mod:`dpkd.spec.validation` (``check_fused_sequence_inputs``, …), the teacher
types and the result type in :mod:`dpkd.spec.results`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

from . import distill as _spec_distill
from . import sequence as _spec_sequence
from . import token as _spec_token
from . import validation as v
from .results import TeacherLMHead, TeacherLogps

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "auto_chunk_size",
    "NamedSequenceLoss",
    "NamedTokenLoss",
    "SEQUENCE_ARGUMENTS",
    "TOKEN_ARGUMENTS",
    "sequence_loss_function",
    "token_loss_function",
    "sequence_call",
    "token_call",
    "length_labels",
    "ValueChecker",
    "check_logps_call",
    "check_sequence_call",
    "check_token_call",
    "check_concatenated",
    "concatenated_teacher",
]

#: Bytes one chunk's logits buffer may take when ``chunk_size`` is not given (64 MiB: 524 rows of float32
#: at V = 32000). Peak memory beyond the inputs and gradients is about this, whatever N is.
DEFAULT_CHUNK_BYTES = 64 * 2**20

#: The arguments of a sequence loss, as the caller of a fused sequence loss passed them.
SEQUENCE_ARGUMENTS: Mapping[str, str] = {
    "policy_chosen_logps": "chosen_hidden",
    "policy_rejected_logps": "rejected_hidden",
    "reference_chosen_logps": "teacher",
    "reference_rejected_logps": "teacher",
    "chosen_lengths": "chosen_labels",
    "rejected_lengths": "rejected_labels",
}

#: The arguments of a token loss, as the caller of a fused token loss passed them.
TOKEN_ARGUMENTS: Mapping[str, str] = {
    "student_logits": "student_hidden",
    "teacher_logits": "teacher_hidden",
    "logits": "hidden",
}


def auto_chunk_size(vocab_size: int, *, n_rows: int, itemsize: int = 4, buffers: int = 1,
                    budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that ``buffers`` live ``[rows, vocab_size]`` arrays fit ``budget_bytes``.

    Clamped to [1, n_rows].

    Example:
        >>> auto_chunk_size(32000, n_rows=4096)
        524
    """
    rows = budget_bytes // max(1, vocab_size * itemsize * buffers)
    return int(max(1, min(rows, max(1, n_rows))))


# keyword-only parameters that the fused function supplies itself
_ARGUMENT_OPTIONS = ("reduction", "normalizer", "chosen_lengths", "rejected_lengths")


def _sorted_options(options: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
    items = options.items() if isinstance(options, Mapping) else options
    return tuple(sorted((str(k), val) for k, val in items))


@dataclass(frozen=True)
class _NamedLoss:
    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        # a mapping or any iterable of pairs; stored sorted, so equal specs hash equal
        object.__setattr__(self, "options", _sorted_options(self.options))

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)

    def _function(self, func: str, arg: str, modules: tuple[ModuleType, ...],
                  positional: tuple[tuple[str, ...], ...]) -> tuple[Callable[..., Any], inspect.Signature]:
        """The backend's function ``name`` (exported by one of ``modules``) and its signature, after checking
        that its leading parameters are one of ``positional``, that it has ``reduction`` and every option."""
        fn = next((getattr(m, self.name) for m in modules if self.name in getattr(m, "__all__", ())), None)
        fn = fn if callable(fn) else None
        params = inspect.signature(fn).parameters if fn is not None else {}
        lead = tuple(n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD)
        if fn is None or not any(lead[:len(want)] == want for want in positional) or "reduction" not in params:
            forms = " or ".join(f"{self.name}({', '.join(want)}, ..., reduction=...)" for want in positional)
            v.fail(func, arg, f"is {type(self).__name__}({self.name!r}), but this backend exports no {forms}")
        for option, _ in self.options:
            p = params.get(option)
            if p is None or p.kind is not p.KEYWORD_ONLY or option in _ARGUMENT_OPTIONS:
                v.fail(func, arg, f"has the option {option!r}, which is not an option of {self.name}")
        with v.reported_as(func, {}):  # the values, before any computation, named as the caller's
            v.check_options(self.name, **self.kwargs)
        return fn, inspect.signature(fn)


@dataclass(frozen=True)
class NamedSequenceLoss(_NamedLoss):
    """A sequence-level loss of the backend by name, with its options: ``fused_sequence_loss``'s ``loss``.

    ``NamedSequenceLoss("dpkd_loss", {"beta": 0.5})`` is, in every backend, that backend's
    ``dpkd_loss(a, b, c, d, chosen_lengths=L_t, rejected_lengths=L_s, reduction=…, beta=0.5)``; the
    arguments it is given follow its signature (no c, d for the reference-free CPO and SimPO; only the
    lengths it takes). Hashable (the options are stored as a sorted tuple).
    """


@dataclass(frozen=True)
class NamedTokenLoss(_NamedLoss):
    """A token-level loss of the backend by name, with its options: ``fused_token_loss``'s ``row_loss``.

    ``NamedTokenLoss("forward_kl", {"temperature": 2.0})`` is, per chunk of rows, the backend's
    ``forward_kl(S, T, mask, temperature=2.0, reduction="none")``; a loss on labels (``cross_entropy``)
    gets ``(S, labels)``. Hashable (the options are stored as a sorted tuple).
    """


@dataclass(frozen=True)
class _BoundSequenceLoss:
    """``loss(a, b, c, d, *, chosen_lengths, rejected_lengths, reduction)`` → the backend's result."""

    function: Callable[..., Any]
    options: tuple[tuple[str, Any], ...]
    reference: bool
    lengths: tuple[str, ...]

    def __call__(self, a: Any, b: Any, c: Any, d: Any, *, chosen_lengths: Any = None, rejected_lengths: Any = None,
                 reduction: str = "mean") -> Any:
        given = {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
        lengths = {k: given[k] for k in self.lengths if given[k] is not None}
        refs = (c, d) if self.reference else ()
        return self.function(a, b, *refs, reduction=reduction, **lengths, **dict(self.options))


@dataclass(frozen=True)
class _BoundTokenLoss:
    """``loss(student_logits, teacher_logits, target)`` → the backend's result under reduction="none"."""

    function: Callable[..., Any]
    options: tuple[tuple[str, Any], ...]
    labels: bool  # target is labels (cross entropy): the call is function(student_logits, labels)

    def __call__(self, student: Any, teacher: Any, target: Any) -> Any:
        args = (student, target) if self.labels else (student, teacher, target)
        return self.function(*args, reduction="none", **dict(self.options))


def _hashable(x: object) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def sequence_loss_function(func: str, loss: object, *modules: ModuleType) -> Callable[..., Any]:
    """``loss`` as ``fn(a, b, c, d, *, chosen_lengths, rejected_lengths, reduction)``: a NamedSequenceLoss
    bound to the function of that name in ``modules`` (the backend's sequence losses), or the caller's own
    hashable callable with that contract, as it is."""
    if isinstance(loss, NamedSequenceLoss):
        fn, sig = loss._function(func, "loss", modules, (("policy_chosen_logps", "policy_rejected_logps"),))
        lengths = tuple(n for n in ("chosen_lengths", "rejected_lengths") if n in sig.parameters)
        return _BoundSequenceLoss(fn, loss.options, "reference_chosen_logps" in sig.parameters, lengths)
    if not callable(loss) or not _hashable(loss):
        v.fail(func, "loss", "must be a NamedSequenceLoss or a hashable callable loss(a, b, c, d, *, "
                             f"chosen_lengths, rejected_lengths, reduction), got {type(loss).__name__}")
    return loss  # type: ignore[return-value]


def length_labels(loss_fn: Callable[..., Any], use_lengths: bool) -> tuple[str, ...]:
    """The label arguments whose rows must each hold a labelled token: those whose token counts a bound
    named loss divides by (a caller's own callable validates its lengths itself; its error is renamed)."""
    if not use_lengths or not isinstance(loss_fn, _BoundSequenceLoss):
        return ()
    return tuple(SEQUENCE_ARGUMENTS[name] for name in loss_fn.lengths)


def token_loss_function(func: str, loss: object, *modules: ModuleType) -> Callable[..., Any] | None:
    """A NamedTokenLoss bound to the function of that name in ``modules`` as
    ``fn(student_logits, teacher_logits, target)`` → its reduction="none" result; None when ``loss`` is the
    caller's own row loss (a hashable callable, which the backend uses as it is)."""
    if isinstance(loss, NamedTokenLoss):
        fn, sig = loss._function(func, "row_loss", modules,
                                 (("student_logits", "teacher_logits", "mask"), ("logits", "labels")))
        return _BoundTokenLoss(fn, loss.options, "labels" in sig.parameters)
    if not callable(loss) or not _hashable(loss):
        v.fail(func, "row_loss", "must be a NamedTokenLoss or a hashable callable "
                             f"row_loss(student_logits, teacher_logits, target), got {type(loss).__name__}")
    return None


# --------------------------------------------------------------------------------------------------
# The named wrappers (fused_dpkd_loss, fused_forward_kl, ...) as calls of the generic fused losses


def _options_of(name: str, module: ModuleType, arguments: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """The arguments that are options of the spec function ``name`` (its keyword-only parameters other than
    the ones the fused function supplies), and its signature's parameters."""
    params = inspect.signature(getattr(module, name)).parameters
    options = {k: x for k, x in arguments.items()
               if k in params and params[k].kind is inspect.Parameter.KEYWORD_ONLY and k not in _ARGUMENT_OPTIONS}
    return options, params


_SEQUENCE_CALL = ("chosen_hidden", "rejected_hidden", "weight", "chosen_labels", "rejected_labels", "bias",
                  "reduction", "chunk_size", "mode", "ignore_index")


def sequence_call(func: str, arguments: Mapping[str, Any]) -> tuple[NamedSequenceLoss, dict[str, Any]]:
    """The ``fused_sequence_loss(loss, **kwargs)`` call that the wrapper ``func`` = "fused_<loss>" makes with
    the ``arguments`` it was given: the same in every backend, derived from the spec function's signature.

    Its options go into the ``NamedSequenceLoss``; the lengths are the token counts when the loss requires
    them (SimPO) or ``length_normalize`` asks for them; the teacher is passed to losses with a reference
    (required unless ``reference_free``)."""
    name = func.removeprefix("fused_")
    options, params = _options_of(name, _spec_sequence, arguments)
    v.check_options(func, **options, reduction=arguments["reduction"])
    required_lengths = "chosen_lengths" in params and params["chosen_lengths"].default is inspect.Parameter.empty
    reference = "reference_chosen_logps" in params
    kwargs = {k: arguments[k] for k in _SEQUENCE_CALL}
    kwargs.update(teacher=arguments.get("teacher") if reference else None,
                  teacher_required=reference and not arguments.get("reference_free", False),
                  use_lengths=required_lengths or bool(arguments.get("length_normalize", False)), func=func)
    return NamedSequenceLoss(name, options), kwargs


# what fused_token_loss takes besides the loss, the student rows and the target, with its defaults
_TOKEN_CALL = {"weight": None, "bias": None, "teacher_hidden": None, "teacher_weight": None, "teacher_bias": None,
               "normalizer": None, "reduction": "mean", "chunk_size": None, "ignore_index": -100}


def token_call(func: str, arguments: Mapping[str, Any]) -> tuple[NamedTokenLoss, dict[str, Any]]:
    """The ``fused_token_loss(row_loss, **kwargs)`` call that the wrapper ``func`` = "fused_<loss>" makes with
    its ``arguments`` (plus ``hidden_name``, what the wrapper calls the student's hidden states)."""
    name = func.removeprefix("fused_")
    module = _spec_token if name in _spec_token.__all__ else _spec_distill
    options, params = _options_of(name, module, arguments)
    v.check_options(func, **options, normalizer=arguments["normalizer"], reduction=arguments["reduction"])
    labels = "labels" in params
    kwargs = {k: arguments.get(k, default) for k, default in _TOKEN_CALL.items()}
    hidden_name = "hidden" if labels else "student_hidden"
    kwargs.update(student_hidden=arguments[hidden_name], target=arguments["labels" if labels else "mask"],
                  target_is_labels=labels, func=func, hidden_name=hidden_name)
    return NamedTokenLoss(name, options), kwargs


# --------------------------------------------------------------------------------------------------
# The checks of one fused call, in the contract's order (options, then shapes and dtypes, then values), the
# same in every backend: a backend passes ``describe`` (an array → its ``validation.ArrayInfo``) and a
# ``ValueChecker`` over its own arrays.


class ValueChecker(Protocol):
    """A backend's data-dependent checks of one call; each raises the ``validation`` error it names (now, or
    at ``run``, after the others have been collected: one device→host transfer in Torch)."""

    def finite_array(self, name: str, x: Any) -> None: ...
    def labels_in_vocab(self, name: str, labels: Any, vocab_size: int, ignore_index: int) -> None: ...
    def binary(self, name: str, mask: Any) -> None: ...
    def labelled_rows(self, name: str, labels: Any, ignore_index: int) -> None: ...
    def run(self) -> None: ...


def check_logps_call(func: str, describe: Callable[[Any], Any], checks: ValueChecker, *, hidden: Any, weight: Any,
                     bias: Any, labels: Any, ignore_index: int) -> None:
    """``linear_token_logps``: one lm_head and integer labels with one label per hidden row."""
    v.check_lm_head(func, describe(hidden), describe(weight), describe(bias), names=("hidden", "weight", "bias"))
    v.check_label_array(func, "labels", describe(labels), tuple(describe(hidden).shape[:-1]), describe(hidden))
    for name, x in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        checks.finite_array(name, x)
    checks.labels_in_vocab("labels", labels, describe(weight).shape[0], ignore_index)
    checks.run()


def check_sequence_call(func: str, describe: Callable[[Any], Any], checks: ValueChecker, *, chosen_hidden: Any,
                        rejected_hidden: Any, weight: Any, bias: Any, chosen_labels: Any, rejected_labels: Any,
                        teacher: Any, teacher_required: bool, length_labels: tuple[str, ...], ignore_index: int
                        ) -> str:
    """``fused_sequence_loss``'s arrays (the teacher's, then the student's) and, for ``length_labels``, that
    every row has a labelled token; returns the teacher's kind ("none", "logps" or "lm_head")."""
    infos = [describe(x) for x in (chosen_hidden, rejected_hidden, weight, bias, chosen_labels, rejected_labels)]
    v.check_fused_sequence_inputs(func, *infos)
    kind = v.check_fused_teacher(func, teacher, describe, vocab=infos[2].shape[0], lead_c=tuple(infos[0].shape[:2]),
                                 lead_s=tuple(infos[1].shape[:2]), required=teacher_required)
    if isinstance(teacher, (TeacherLMHead, TeacherLogps)):
        for name, x in zip(teacher._fields, teacher):
            checks.finite_array(f"teacher.{name}", x)
    for name, x in (("chosen_hidden", chosen_hidden), ("rejected_hidden", rejected_hidden), ("weight", weight),
                    ("bias", bias)):
        checks.finite_array(name, x)
    labels = {"chosen_labels": chosen_labels, "rejected_labels": rejected_labels}
    for name, x in labels.items():
        checks.labels_in_vocab(name, x, infos[2].shape[0], ignore_index)
    for name in length_labels:
        checks.labelled_rows(name, labels[name], ignore_index)
    checks.run()
    return kind


def check_token_call(func: str, describe: Callable[[Any], Any], checks: ValueChecker, *, hidden_name: str,
                     student_hidden: Any, weight: Any, bias: Any, target: Any, teacher_hidden: Any,
                     teacher_weight: Any, teacher_bias: Any, target_is_labels: bool, ignore_index: int) -> str:
    """``fused_token_loss``'s arrays; returns the target's argument name ("labels" or "mask")."""
    target_name = v.check_fused_token_inputs(
        func, describe(student_hidden), describe(weight), describe(bias), describe(target),
        teacher_hidden=describe(teacher_hidden), teacher_weight=describe(teacher_weight),
        teacher_bias=describe(teacher_bias), target_is_labels=target_is_labels, hidden_name=hidden_name)
    arrays = {hidden_name: student_hidden, "weight": weight, "bias": bias, "teacher_hidden": teacher_hidden,
              "teacher_weight": teacher_weight, "teacher_bias": teacher_bias}
    for name, x in arrays.items():
        checks.finite_array(name, x)
    if target_is_labels:
        checks.labels_in_vocab(target_name, target, describe(weight).shape[0], ignore_index)
    else:
        checks.binary(target_name, target)
    checks.run()
    return target_name


# --------------------------------------------------------------------------------------------------
# The concatenated (TRL / Liger) layout of a sequence loss


def check_concatenated(func: str, hidden: v.ArrayInfo, target: v.ArrayInfo, *,
                       teacher_hidden: v.ArrayInfo | None, teacher_weight: v.ArrayInfo | None,
                       teacher_logps: v.ArrayInfo | None) -> int:
    """The shapes of one call in the concatenated layout; returns B, the number of pairs.

    hidden [2B, T, H] (rows 0..B−1 the chosen sequences, B..2B−1 the rejected ones, as TRL's
    ``concatenated_forward`` and Liger's fused preference losses stack them), target [2B, T] (labels
    already shifted, ``ignore_index`` on prompt and padding); the teacher as hidden states [2B, T, H_t]
    with its lm_head, or as summed log-probs [2B] in the same order — not both. The split halves are then
    checked as the fused loss checks its own arguments."""
    if len(hidden.shape) != 3:
        v.fail(func, "hidden", f"must have shape [2B, T, H] (chosen rows first), got {tuple(hidden.shape)}")
    rows = hidden.shape[0]
    if rows % 2:
        v.fail(func, "hidden", f"must stack B chosen then B rejected sequences, got an odd {rows} rows")
    if tuple(target.shape) != tuple(hidden.shape[:2]):
        v.fail(func, "target", f"must have shape {tuple(hidden.shape[:2])} (the rows of `hidden`), got "
                               f"{tuple(target.shape)}")
    if teacher_hidden is not None and teacher_logps is not None:
        v.fail(func, "teacher_logps", "cannot be given with `teacher_hidden`: pass the teacher once")
    if teacher_hidden is not None:
        if teacher_weight is None:
            v.fail(func, "teacher_weight", "is required with `teacher_hidden` (the teacher's lm_head)")
        if len(teacher_hidden.shape) != 3 or tuple(teacher_hidden.shape[:2]) != tuple(hidden.shape[:2]):
            v.fail(func, "teacher_hidden", f"must have shape [{rows}, {hidden.shape[1]}, H_t] (the rows of "
                                           f"`hidden`), got {tuple(teacher_hidden.shape)}")
    elif teacher_weight is not None:
        v.fail(func, "teacher_weight", "is given without `teacher_hidden`")
    if teacher_logps is not None and tuple(teacher_logps.shape) != (rows,):
        v.fail(func, "teacher_logps", f"must have shape ({rows},) (one per row of `hidden`), got "
                                      f"{tuple(teacher_logps.shape)}")
    return rows // 2


def concatenated_teacher(n: int, *, teacher_hidden: Any = None, teacher_weight: Any = None, teacher_bias: Any = None,
                         teacher_logps: Any = None) -> TeacherLMHead | TeacherLogps | None:
    """The teacher of a concatenated-layout call (rows 0..n−1 chosen, n..2n−1 rejected) split into the split
    layout's argument, for any backend's arrays (only slicing is used); None when no teacher was given."""
    if teacher_hidden is not None:
        return TeacherLMHead(teacher_hidden[:n], teacher_hidden[n:], teacher_weight, teacher_bias)
    if teacher_logps is not None:
        return TeacherLogps(teacher_logps[:n], teacher_logps[n:])
    return None
