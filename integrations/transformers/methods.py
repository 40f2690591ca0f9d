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

from .batching import IGNORE_INDEX, SequenceBatch, forward_logits

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


def _shift(logits: torch.Tensor, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    return backend().shift_for_causal_lm(logits, batch.labels)


def _mask(labels: torch.Tensor) -> torch.Tensor:
    return labels != IGNORE_INDEX


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
    objective exactly). ``hp`` is a :class:`~dpkd.integrations.transformers.trainer.DistillConfig`."""
    tb = backend()
    spec = METHODS[method]
    alpha = hp.objective.alpha

    def add_term(name: str, value: torch.Tensor) -> None:
        stats.terms[name] = stats.terms.get(name, 0.0) + float(value.detach())

    data_logits = None
    sft = None
    if alpha < 1.0 or method in ("sft", "kd") or (method == "seqkd" and batch.chosen is None):
        data_logits, data_labels = _shift(forward_logits(student, batch.data), batch.data)
        sft = tb.cross_entropy(data_logits, data_labels, normalizer=norms.data_tokens)
        add_term("sft_loss", sft)

    if method == "sft":
        distil = sft
    elif method == "kd":
        with torch.no_grad():
            t_logits, _ = _shift(forward_logits(teacher, batch.data), batch.data)
        distil = tb.forward_kl(
            data_logits, t_logits, _mask(data_labels), temperature=hp.temperature, normalizer=norms.data_tokens
        )
    elif method == "seqkd":
        s_logits, labels = _shift(forward_logits(student, batch.chosen), batch.chosen)
        distil = tb.cross_entropy(s_logits, labels, normalizer=norms.chosen_tokens)
    elif method == "dpkd_token":
        s_logits, labels = _shift(forward_logits(student, batch.chosen), batch.chosen)
        with torch.no_grad():
            t_logits, _ = _shift(forward_logits(teacher, batch.chosen), batch.chosen)
        res = tb.dpkd_token_loss(
            s_logits, t_logits, _mask(labels), beta=hp.beta, form=hp.token_form,
            label_smoothing=hp.label_smoothing, normalizer=norms.chosen_tokens,
        )
        n = int(_mask(labels).sum())
        stats.agreement.append((float(res.agreement_rate), n))
        distil = res.loss
    elif method in SEQUENCE_METHODS:
        distil = _sequence_term(method, student, teacher, batch, norms, hp, stats, spec.needs_teacher_model)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    add_term("distil_loss", distil)

    pt_lm = pt_kd = None
    if hp.objective.lm_coef > 0:
        if batch.pt is None:
            raise ValueError("the objective has lm_coef > 0 but no pre-training batch was prepared")
        pt_logits, pt_labels = _shift(forward_logits(student, batch.pt), batch.pt)
        pt_lm = tb.cross_entropy(pt_logits, pt_labels, normalizer=norms.pt_tokens)
        add_term("pt_lm_loss", pt_lm)
        if hp.objective.pt_kd_ratio > 0:
            with torch.no_grad():
                t_pt, _ = _shift(forward_logits(teacher, batch.pt), batch.pt)
            pt_kd = tb.forward_kl(pt_logits, t_pt, _mask(pt_labels), normalizer=norms.pt_tokens)
            add_term("pt_kd_loss", pt_kd)
    # L = (1−α)·sft + α·distil + λ·[(1−κ)·pt_lm + κ·pt_kd] with the config's own coefficients
    # (ObjectiveConfig.coefficients(), SPEC-MATH §3C); a zero-weight term is skipped, not multiplied.
    coef = hp.objective.coefficients()
    terms = {"sft_loss": sft, "distil_loss": distil, "pt_lm_loss": pt_lm, "pt_kd_loss": pt_kd}
    return sum(coef[k] * t for k, t in terms.items() if coef[k] != 0.0)


def _sequence_term(
    method: str,
    student: Any,
    teacher: Any,
    batch: PreparedBatch,
    norms: Normalizers,
    hp: Any,
    stats: StepStats,
    use_teacher: bool,
) -> torch.Tensor:
    tb = backend()
    pair = batch.pair
    n = batch.n_examples
    s_logits, labels = _shift(forward_logits(student, pair), pair)
    logps, n_tok = tb.sequence_logps(s_logits, labels)
    a, b = logps[:n], logps[n:]
    lengths = n_tok.to(logps.dtype)
    lt, ls = lengths[:n], lengths[n:]
    if use_teacher:
        with torch.no_grad():
            t_logits, _ = _shift(forward_logits(teacher, pair), pair)
            ref, _ = tb.sequence_logps(t_logits, labels)
        c, d = ref[:n], ref[n:]
    ln = hp.length_normalize
    if method == "dpkd":
        res = tb.dpkd_loss(
            a, b, c, d, chosen_lengths=lt if ln else None, rejected_lengths=ls if ln else None,
            beta=hp.beta, label_smoothing=hp.label_smoothing, reduction="sum",
        )
    elif method == "ipo":
        res = tb.ipo_loss(
            a, b, c, d, tau=hp.beta, chosen_lengths=lt if ln else None, rejected_lengths=ls if ln else None,
            length_normalize=ln, reduction="sum",
        )
    elif method == "cpo":
        res = tb.cpo_loss(
            a, b, beta=hp.beta, nll_weight=hp.cpo_nll_weight, chosen_lengths=lt if ln else None,
            label_smoothing=hp.label_smoothing, reduction="sum",
        )
    else:  # simpo: always length-normalised (Meng et al.)
        res = tb.simpo_loss(
            a, b, chosen_lengths=lt, rejected_lengths=ls, beta=hp.simpo_beta, gamma=hp.simpo_gamma,
            label_smoothing=hp.label_smoothing, reduction="sum",
        )
    stats.chosen_rewards.append(res.chosen_rewards.detach())
    stats.rejected_rewards.append(res.rejected_rewards.detach())
    stats.logps_chosen.append(a.detach())
    stats.logps_rejected.append(b.detach())
    return res.loss / norms.examples
