"""How a causal LM's next-token predictions reach the losses: materialised logits, or the fused lm_head path.

The methods (:mod:`.methods`) are written once against :class:`HeadOutput`; only the functions here look
at how the log-probabilities are produced:

* materialised (``fused=False``): ``model(...).logits`` [B, T, V] and the ordinary backend losses
  (``cross_entropy``, ``forward_kl``, ``dpkd_token_loss``, ``sequence_logps`` + a sequence loss);
* fused (``fused=True``; spec/CONVENTIONS.md, "The fused lm_head path"): the last hidden state the lm_head
  consumes (the base model's ``last_hidden_state``: after GPT-2's ``ln_f``, after OPT's ``final_layer_norm`` /
  ``project_out``) and the lm_head weight (and bias), through ``fused_cross_entropy``, ``fused_forward_kl``,
  ``fused_dpkd_token_loss``, ``fused_sequence_loss`` and ``linear_token_logps`` — chunked over tokens, the
  [N, V] logits never exist.

Both give the same values and gradients (float64: equal to rounding; ``tests/transformers/test_hf_fused.py``).
Rows are already shifted (``shift_for_causal_lm``): row t predicts ``labels[:, t]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .batching import IGNORE_INDEX, SequenceBatch

__all__ = ["HeadOutput", "model_head", "check_fusable", "cross_entropy", "forward_kl", "dpkd_token_loss",
           "token_divergence", "token_logps", "sequence_logps", "sequence_loss", "SequenceLossFn"]

#: ``loss(a, b, c, d, *, chosen_lengths, rejected_lengths, reduction)`` → PreferenceLoss; c, d may be None
#: (reference-free methods); lengths are the int64 token counts of y_t and y_s; elementwise over pairs under
#: ``reduction="none"`` (what ``fused_sequence_loss`` needs).
SequenceLossFn = Callable[..., Any]


def _tb() -> Any:
    import dpkd.backends.torch as tb

    return tb


@dataclass(frozen=True)
class HeadOutput:
    """A model's shifted next-token predictions on one batch.

    labels [B, T-1]; either ``logits`` [B, T-1, V] (materialised) or ``hidden`` [B, T-1, H] with the lm_head
    ``weight`` [V, H] and ``bias`` [V] | None (fused).
    """

    labels: torch.Tensor
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    chunk_size: int | None = None

    @property
    def fused(self) -> bool:
        return self.logits is None

    @property
    def mask(self) -> torch.Tensor:
        return self.labels != IGNORE_INDEX


def check_fusable(model: Any, name: str = "model") -> None:
    """Refuse a model whose logits are not ``last_hidden_state @ Wᵀ + b`` (the fused path would be wrong)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"use_fused: `{name}` has no linear lm_head (get_output_embeddings() is "
                         f"{type(head).__name__}); train it with use_fused=False")
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(cfg, attr, None) not in (None, 1.0):
            raise ValueError(f"use_fused: `{name}` transforms its logits (config.{attr} = "
                             f"{getattr(cfg, attr)!r}); train it with use_fused=False")


def model_head(model: Any, batch: SequenceBatch, *, fused: bool, chunk_size: int | None = None) -> HeadOutput:
    """Run ``model`` on a right-padded batch and return its shifted predictions (see module docstring)."""
    tb = _tb()
    device = next(model.parameters()).device
    if batch.input_ids.device != device:  # batches are built on the CPU; the model may live on an accelerator
        batch = SequenceBatch(batch.input_ids.to(device), batch.attention_mask.to(device), batch.labels.to(device))
    if not fused:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logits, labels = tb.shift_for_causal_lm(logits, batch.labels)
        return HeadOutput(labels, logits=logits)
    # the base model's output is exactly what the lm_head consumes (GPT-2: after ln_f; OPT: after the
    # decoder's final_layer_norm and project_out); the causal-LM wrapper would materialise the logits
    hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    hidden, labels = tb.shift_for_causal_lm(hidden, batch.labels)
    head = model.get_output_embeddings()
    return HeadOutput(labels, hidden=hidden, weight=head.weight, bias=head.bias, chunk_size=chunk_size)


def cross_entropy(out: HeadOutput, *, normalizer: float) -> torch.Tensor:
    """Σ_t −log q(label_t) / normalizer over the labelled rows (spec/README.md §5, the SFT / LM term)."""
    tb = _tb()
    if not out.fused:
        return tb.cross_entropy(out.logits, out.labels, normalizer=normalizer)
    return tb.fused_cross_entropy(out.hidden, out.weight, out.labels, bias=out.bias, normalizer=normalizer,
                                  chunk_size=out.chunk_size)


def forward_kl(student: HeadOutput, teacher: HeadOutput, *, normalizer: float, temperature: float = 1.0
               ) -> torch.Tensor:
    """Σ_t KL(p_t‖q_t) / normalizer over the student's labelled rows (word-level KD, spec/README.md §5)."""
    tb = _tb()
    if not student.fused:
        return tb.forward_kl(student.logits, teacher.logits, student.mask, temperature=temperature,
                             normalizer=normalizer)
    return tb.fused_forward_kl(student.hidden, student.weight, teacher.hidden, teacher.weight, student.mask,
                               bias=student.bias, teacher_bias=teacher.bias, temperature=temperature,
                               normalizer=normalizer, chunk_size=student.chunk_size)


def dpkd_token_loss(student: HeadOutput, teacher: HeadOutput, *, normalizer: float, **options: Any) -> Any:
    """Token-level DPKD (spec/README.md §4) → TokenPreferenceLoss; ``options`` as in ``dpkd_token_loss``."""
    tb = _tb()
    if not student.fused:
        return tb.dpkd_token_loss(student.logits, teacher.logits, student.mask, normalizer=normalizer, **options)
    return tb.fused_dpkd_token_loss(student.hidden, student.weight, teacher.hidden, teacher.weight, student.mask,
                                    bias=student.bias, teacher_bias=teacher.bias, normalizer=normalizer,
                                    chunk_size=student.chunk_size, **options)


def token_divergence(name: str, student: HeadOutput, teacher: HeadOutput, *, normalizer: float | None,
                     reduction: str = "mean", **options: Any) -> Any:
    """A per-token divergence of the backend by name (``forward_kl``, ``reverse_kl``, ``generalized_jsd``,
    ``akl``, ``dpkd_token``) on the student's labelled rows; ``dpkd_token`` returns a TokenPreferenceLoss."""
    tb = _tb()
    fn_name = "dpkd_token_loss" if name == "dpkd_token" else name
    if not student.fused:
        return getattr(tb, fn_name)(student.logits, teacher.logits, student.mask, normalizer=normalizer,
                                    reduction=reduction, **options)
    return getattr(tb, f"fused_{fn_name}")(student.hidden, student.weight, teacher.hidden, teacher.weight,
                                           student.mask, bias=student.bias, teacher_bias=teacher.bias,
                                           normalizer=normalizer, reduction=reduction,
                                           chunk_size=student.chunk_size, **options)


def token_logps(out: HeadOutput) -> torch.Tensor:
    """log q(label_t) per labelled row [B, T-1], 0 elsewhere (spec/README.md §1)."""
    tb = _tb()
    if not out.fused:
        return tb.token_logps(out.logits, out.labels)
    return tb.linear_token_logps(out.hidden, out.weight, out.labels, bias=out.bias, chunk_size=out.chunk_size)


def sequence_logps(out: HeadOutput) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_t log q(label_t) per row [B], labelled-token count per row [B] int64): paper Eq. 8, spec/README.md §1."""
    tb = _tb()
    if not out.fused:
        return tb.sequence_logps(out.logits, out.labels)
    per_token = tb.linear_token_logps(out.hidden, out.weight, out.labels, bias=out.bias, chunk_size=out.chunk_size)
    return per_token.sum(-1), out.mask.sum(-1, dtype=torch.int64)


def sequence_loss(loss: SequenceLossFn, student: HeadOutput,
                  teacher: HeadOutput | tuple[torch.Tensor, torch.Tensor] | None, n: int
                  ) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """A sequence-level loss on a pair batch (rows [:n] = (x, y_t), rows [n:] = (x, y_s)), ``reduction="sum"``.

    a, b = the student's summed log-probs of y_t, y_s; c, d = the teacher's (None without a teacher);
    returns ``(loss(a, b, c, d, chosen_lengths=L_t, rejected_lengths=L_s, reduction="sum"), a, b)`` with a, b
    detached. ``teacher`` may also be the precomputed (c, d) [n] each (the cached teacher log-probs).
    Fused: ``fused_sequence_loss`` (loss and gradient in one pass when whole pairs fit a chunk), which returns
    a, b beside the loss.
    """
    tb = _tb()
    if not student.fused:
        ab, n_tok = sequence_logps(student)
        c = d = None
        if isinstance(teacher, tuple):
            c, d = teacher
        elif teacher is not None:
            with torch.no_grad():
                cd, _ = sequence_logps(teacher)
            c, d = cd[:n], cd[n:]
        res = loss(ab[:n], ab[n:], c, d, chosen_lengths=n_tok[:n], rejected_lengths=n_tok[n:], reduction="sum")
        return res, ab[:n].detach(), ab[n:].detach()
    head = None
    if isinstance(teacher, tuple):
        head = tb.TeacherLogps(*teacher)
    elif teacher is not None:
        head = tb.TeacherLMHead(teacher.hidden[:n], teacher.hidden[n:], teacher.weight, teacher.bias)
    s = student
    res = tb.fused_sequence_loss(loss, s.hidden[:n], s.hidden[n:], s.weight, s.labels[:n], s.labels[n:],
                                 bias=s.bias, teacher=head, teacher_required=teacher is not None,
                                 use_lengths=True, reduction="sum", chunk_size=s.chunk_size)
    return res, res.policy_chosen_logps, res.policy_rejected_logps
