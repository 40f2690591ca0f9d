"""The distillation methods the trainer runs, expressed with the ``dpkd.backends.torch`` losses.

Naming (CONVENTIONS.md): policy = student q_θ, reference = teacher p, chosen = teacher output y_t,
rejected = student output y_s; a = log q(y_t), b = log q(y_s), c = log p(y_t), d = log p(y_s).

| method       | distillation term (SPEC-MATH)                                                  | needs        |
|--------------|--------------------------------------------------------------------------------|--------------|
| `sft`        | CE on the dataset response (§6)                                                | —            |
| `kd`         | word-level KD: forward KL(p‖q) per response token, teacher-forced on data (§6) | teacher      |
| `seqkd`      | CE on the teacher output y_t (Kim & Rush; §6)                                  | y_t          |
| `dpkd`       | sequence-level DPKD, Eq. 9 (Eq. 8 with ``length_normalize=False``) (§3A)      | y_t, y_s, p  |
| `ipo`        | (h − 1/(2τ))², length-averaged unless ``length_normalize=False`` (§5)         | y_t, y_s, p  |
| `cpo`        | −log σ(β(a − b)) + w·NLL(y_t) (§5)                                            | y_t, y_s     |
| `simpo`      | −log σ(βa/L_t − βb/L_s − γ) (§5)                                              | y_t, y_s     |
| `dpkd_token` | released-code token-level DPKD on y_t under teacher forcing (§3B)              | y_t, p       |

Every method's term enters the objective L = (1−α)·CE_D + α·L_method + λ·[(1−κ)·PT_lm + κ·PT_kd]
(SPEC-MATH §3C, ``dpkd.spec.objective``). Reductions use *global* normalisers (examples, or loss tokens,
over all micro-batches of an optimizer step), so gradient accumulation is exact (ANCHORS #18).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from . import heads
from .batching import SequenceBatch

__all__ = ["METHODS", "SEQUENCE_METHODS", "MethodSpec", "PreparedBatch", "Normalizers", "compute_loss", "backend"]

SEQUENCE_METHODS = ("dpkd", "ipo", "cpo", "simpo")


@dataclass(frozen=True)
class MethodSpec:
    needs_teacher_outputs: bool  # y_t
    needs_student_samples: bool  # y_s
    needs_teacher_model: bool  # teacher forward during the step


METHODS: dict[str, MethodSpec] = {
    "sft": MethodSpec(False, False, False),
    "kd": MethodSpec(False, False, True),
    "seqkd": MethodSpec(True, False, False),
    "dpkd": MethodSpec(True, True, True),
    "ipo": MethodSpec(True, True, True),
    "cpo": MethodSpec(True, True, False),
    "simpo": MethodSpec(True, True, False),
    "dpkd_token": MethodSpec(True, False, True),
}


def backend() -> Any:
    """The Torch backend (imported lazily so that importing this package stays cheap)."""
    import dpkd.backends.torch as tb

    return tb


@dataclass
class PreparedBatch:
    """One micro-batch with everything sampled: (x, y_data), (x, y_t), (x, y_s), and a PT batch."""

    data: SequenceBatch
    chosen: SequenceBatch | None = None  # (x, y_t)
    pair: SequenceBatch | None = None  # [(x, y_t); (x, y_s)] concatenated on the batch axis
    pt: SequenceBatch | None = None
    n_examples: int = 0


@dataclass
class Normalizers:
    """Global counts over all micro-batches of one optimizer step."""

    examples: int
    data_tokens: int
    chosen_tokens: int = 0
    pt_tokens: int = 0


@dataclass
class StepStats:
    """Detached per-example values of one micro-batch, for the step's metrics."""

    chosen_rewards: list[torch.Tensor] = field(default_factory=list)
    rejected_rewards: list[torch.Tensor] = field(default_factory=list)
    logps_chosen: list[torch.Tensor] = field(default_factory=list)
    logps_rejected: list[torch.Tensor] = field(default_factory=list)
    agreement: list[tuple[float, int]] = field(default_factory=list)
    terms: dict[str, float] = field(default_factory=dict)


def compute_loss(
    method: str,
    student: Any,
    teacher: Any,
    batch: PreparedBatch,
    norms: Normalizers,
    hp: Any,
    stats: StepStats,
) -> torch.Tensor:
    """This micro-batch's share of the step objective (summing over micro-batches gives the full-batch
    objective exactly). ``hp`` is a :class:`~dpkd.integrations.transformers.trainer.DistillConfig`; with
    ``hp.use_fused`` the log-probs come from the fused lm_head path (:mod:`.heads`), the method logic below
    is the same either way."""
    spec = METHODS[method]
    alpha = hp.objective.alpha
    fused = bool(getattr(hp, "use_fused", False))
    chunk = getattr(hp, "fused_chunk_size", None)

    def run(model: Any, b: Any) -> heads.HeadOutput:
        return heads.model_head(model, b, fused=fused, chunk_size=chunk)

    def run_teacher(b: Any) -> heads.HeadOutput:
        with torch.no_grad():  # the teacher is frozen
            return run(teacher, b)

    def add_term(name: str, value: torch.Tensor) -> None:
        stats.terms[name] = stats.terms.get(name, 0.0) + float(value.detach())

    data = None
    sft = None
    if alpha < 1.0 or method in ("sft", "kd") or (method == "seqkd" and batch.chosen is None):
        data = run(student, batch.data)
        sft = heads.cross_entropy(data, normalizer=norms.data_tokens)
        add_term("sft_loss", sft)

    if method == "sft":
        distil = sft
    elif method == "kd":
        distil = heads.forward_kl(data, run_teacher(batch.data), temperature=hp.temperature,
                                  normalizer=norms.data_tokens)
    elif method == "seqkd":
        distil = heads.cross_entropy(run(student, batch.chosen), normalizer=norms.chosen_tokens)
    elif method == "dpkd_token":
        s_out = run(student, batch.chosen)
        res = heads.dpkd_token_loss(s_out, run_teacher(batch.chosen), beta=hp.beta, form=hp.token_form,
                                    label_smoothing=hp.label_smoothing, normalizer=norms.chosen_tokens)
        stats.agreement.append((float(res.agreement_rate), int(s_out.mask.sum())))
        distil = res.loss
    elif method in SEQUENCE_METHODS:
        s_out = run(student, batch.pair)
        t_out = run_teacher(batch.pair) if spec.needs_teacher_model else None
        res, a, b = heads.sequence_loss(_pair_loss(method, hp), s_out, t_out, batch.n_examples)
        stats.chosen_rewards.append(res.chosen_rewards.detach())
        stats.rejected_rewards.append(res.rejected_rewards.detach())
        stats.logps_chosen.append(a)
        stats.logps_rejected.append(b)
        distil = res.loss / norms.examples
    else:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    add_term("distil_loss", distil)

    pt_lm = pt_kd = None
    if hp.objective.lm_coef > 0:
        if batch.pt is None:
            raise ValueError("the objective has lm_coef > 0 but no pre-training batch was prepared")
        pt = run(student, batch.pt)
        pt_lm = heads.cross_entropy(pt, normalizer=norms.pt_tokens)
        add_term("pt_lm_loss", pt_lm)
        if hp.objective.pt_kd_ratio > 0:
            pt_kd = heads.forward_kl(pt, run_teacher(batch.pt), normalizer=norms.pt_tokens)
            add_term("pt_kd_loss", pt_kd)
    # L = (1−α)·sft + α·distil + λ·[(1−κ)·pt_lm + κ·pt_kd] with the config's own coefficients
    # (ObjectiveConfig.coefficients(), SPEC-MATH §3C); a zero-weight term is skipped, not multiplied.
    coef = hp.objective.coefficients()
    terms = {"sft_loss": sft, "distil_loss": distil, "pt_lm_loss": pt_lm, "pt_kd_loss": pt_kd}
    return sum(coef[k] * t for k, t in terms.items() if coef[k] != 0.0)


def _pair_loss(method: str, hp: Any) -> heads.SequenceLossFn:
    """The sequence-level method as ``loss(a, b, c, d, *, chosen_lengths, rejected_lengths, reduction)``.

    The one definition both paths use: the materialised path calls it on the summed log-probs, the fused
    path hands it to ``fused_sequence_loss`` (which also calls it per chunk of pairs, ``reduction="none"``).
    Lengths arrive as int64 token counts and enter the loss as floats of a's dtype.
    """
    tb = backend()
    ln = hp.length_normalize

    def loss(a: torch.Tensor, b: torch.Tensor, c: Any, d: Any, *, chosen_lengths: torch.Tensor,
             rejected_lengths: torch.Tensor, reduction: str) -> Any:
        lt, ls = chosen_lengths.to(a.dtype), rejected_lengths.to(a.dtype)
        if method == "dpkd":
            return tb.dpkd_loss(a, b, c, d, chosen_lengths=lt if ln else None, rejected_lengths=ls if ln else None,
                                beta=hp.beta, label_smoothing=hp.label_smoothing, reduction=reduction)
        if method == "ipo":
            return tb.ipo_loss(a, b, c, d, tau=hp.beta, chosen_lengths=lt if ln else None,
                               rejected_lengths=ls if ln else None, length_normalize=ln, reduction=reduction)
        if method == "cpo":
            return tb.cpo_loss(a, b, beta=hp.beta, nll_weight=hp.cpo_nll_weight, chosen_lengths=lt if ln else None,
                               label_smoothing=hp.label_smoothing, reduction=reduction)
        # simpo: always length-normalised (Meng et al.)
        return tb.simpo_loss(a, b, chosen_lengths=lt, rejected_lengths=ls, beta=hp.simpo_beta, gamma=hp.simpo_gamma,
                             label_smoothing=hp.label_smoothing, reduction=reduction)

    return loss
