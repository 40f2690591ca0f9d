"""How the Hugging Face trainer executes a method of the one method table (:mod:`dpkd.integrations.methods`).

Naming (CONVENTIONS.md): policy = student q_θ, reference = teacher p, chosen = teacher output y_t,
rejected = student output y_s; a = log q(y_t), b = log q(y_s), c = log p(y_t), d = log p(y_s).

Each loss kind of the table maps onto :mod:`.heads` (materialised logits or the fused lm_head path):
``CrossEntropy`` → ``heads.cross_entropy``; ``TokenDivergence`` → ``heads.token_divergence`` on the batch
it names (or on the step's student samples, GKD); ``PairLoss`` → ``heads.sequence_loss`` on [(x, y_t);
(x, y_s)], with c taken from the cache when the examples carry it (and a token loss on y_t reads the
teacher's cached top-k distributions, :mod:`.teacher_cache`); ``PolicyGradient`` →
:func:`.policy_gradient.minillm_loss` on the teacher-mixed samples.

Every method's term enters the objective L = (1−α)·CE_D + α·L_method + λ·[(1−κ)·PT_lm + κ·PT_kd]
(``dpkd.spec.objective``; the ``paper`` preset is Algorithm 1's L_method + λ·L_PT). Reductions use *global*
normalisers (examples, or loss tokens, over all micro-batches of an optimizer step), so gradient
accumulation is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..methods import METHODS, CrossEntropy, PairLoss, PolicyGradient, TokenDivergence
from . import heads
from .batching import SequenceBatch
from .policy_gradient import minillm_loss

__all__ = ["METHODS", "PreparedBatch", "Normalizers", "StepStats", "compute_loss", "backend"]


def backend() -> Any:
    """The Torch backend (imported lazily so that importing this package stays cheap)."""
    import dpkd.backends.torch as tb

    return tb


@dataclass
class PreparedBatch:
    """One micro-batch with everything sampled: (x, y_data), (x, y_t), (x, y_s) pairs, student or
    teacher-mixed samples, a PT batch, and the cached c = log p(y_t) when there is one."""

    data: SequenceBatch
    chosen: SequenceBatch | None = None  # (x, y_t)
    pair: SequenceBatch | None = None  # [(x, y_t); (x, y_s)] concatenated on the batch axis
    samples: SequenceBatch | None = None  # (x, y) with y from the student (GKD) or the mixture (MiniLLM)
    pt: SequenceBatch | None = None
    chosen_teacher_logps: torch.Tensor | None = None  # cached c [n]
    chosen_teacher_dist: torch.Tensor | None = None  # cached teacher log-distributions on y_t [n, T-1, V]
    n_examples: int = 0


@dataclass
class Normalizers:
    """Global counts over all micro-batches of one optimizer step."""

    examples: int
    data_tokens: int
    chosen_tokens: int = 0
    pt_tokens: int = 0
    sample_tokens: int = 0


@dataclass
class StepStats:
    """Detached per-example values of one micro-batch, for the step's metrics."""

    chosen_rewards: list[torch.Tensor] = field(default_factory=list)
    rejected_rewards: list[torch.Tensor] = field(default_factory=list)
    logps_chosen: list[torch.Tensor] = field(default_factory=list)
    logps_rejected: list[torch.Tensor] = field(default_factory=list)
    agreement: list[tuple[float, int]] = field(default_factory=list)
    terms: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor | float) -> None:
        self.terms[name] = self.terms.get(name, 0.0) + float(value)


class _Models:
    """The student and teacher heads of one call, on the configured path (materialised or fused)."""

    def __init__(self, student: Any, teacher: Any, hp: Any) -> None:
        self.student, self.teacher = student, teacher
        self.fused = bool(getattr(hp, "use_fused", False))
        self.chunk = getattr(hp, "fused_chunk_size", None)

    def run(self, b: SequenceBatch) -> heads.HeadOutput:
        return heads.model_head(self.student, b, fused=self.fused, chunk_size=self.chunk)

    def run_teacher(self, b: SequenceBatch) -> heads.HeadOutput:
        with torch.no_grad():  # the teacher is frozen
            return heads.model_head(self.teacher, b, fused=self.fused, chunk_size=self.chunk)


def compute_loss(method: str, student: Any, teacher: Any, batch: PreparedBatch, norms: Normalizers, hp: Any,
                 stats: StepStats) -> torch.Tensor:
    """This micro-batch's share of the step objective (summing over micro-batches gives the full-batch
    objective exactly). ``hp`` is a :class:`~dpkd.integrations.transformers.trainer.DistillConfig` (its
    ``objective``, ``method_args`` and fused options)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    spec = METHODS[method].loss(hp.method_args)
    models = _Models(student, teacher, hp)
    coef = hp.objective.coefficients()
    sft = None
    if coef["sft_loss"] != 0.0 or spec == CrossEntropy("data"):
        sft = heads.cross_entropy(models.run(batch.data), normalizer=norms.data_tokens)
        stats.add("sft_loss", sft.detach())
    if spec == CrossEntropy("data"):
        distil = sft
    elif isinstance(spec, CrossEntropy):
        distil = heads.cross_entropy(models.run(batch.chosen), normalizer=norms.chosen_tokens)
    elif isinstance(spec, TokenDivergence):
        distil = _token_divergence(spec, models, batch, norms, stats)
    elif isinstance(spec, PairLoss):
        distil = _pair(spec, models, batch, norms, stats)
    elif isinstance(spec, PolicyGradient):
        out = minillm_loss(models.run(batch.samples), models.run_teacher(batch.samples), mix_alpha=spec.mix_alpha,
                           length_norm=spec.length_norm, single_step=spec.single_step,
                           normalizer=norms.sample_tokens)
        stats.add("mean_importance_weight", out.mean_weight * batch.n_examples / norms.examples)
        stats.add("sample_reverse_kl", out.reverse_kl.sum() / norms.examples)
        distil = out.loss
    else:  # pragma: no cover - the table only builds the four kinds
        raise TypeError(f"method {method!r}: unknown loss kind {type(spec).__name__}")
    stats.add("distil_loss", distil.detach())
    terms = {"sft_loss": sft, "distil_loss": distil, **_pt_terms(models, batch, norms, hp, stats)}
    # L = (1−α)·sft + α·distil + λ·[(1−κ)·pt_lm + κ·pt_kd]; a zero-weight term is skipped, not multiplied
    return sum(coef[k] * t for k, t in terms.items() if coef[k] != 0.0)


def _token_divergence(spec: TokenDivergence, models: _Models, batch: PreparedBatch, norms: Normalizers,
                      stats: StepStats) -> torch.Tensor:
    if batch.samples is not None:  # this step drew the student's own samples (GKD's λ)
        target, n = batch.samples, norms.sample_tokens
    elif spec.on == "y_t":
        target, n = batch.chosen, norms.chosen_tokens
    else:
        target, n = batch.data, norms.data_tokens
    s_out = models.run(target)
    if target is batch.chosen and batch.chosen_teacher_dist is not None and not s_out.fused:
        # the teacher's distributions on y_t from the cache (teacher_cache.py): no teacher forward
        t_out = heads.HeadOutput(s_out.labels, logits=batch.chosen_teacher_dist.to(s_out.logits))
    else:
        t_out = models.run_teacher(target)
    res = heads.token_divergence(spec.divergence, s_out, t_out, normalizer=n, **dict(spec.options))
    if spec.divergence == "dpkd_token":
        stats.agreement.append((float(res.agreement_rate), int(s_out.mask.sum())))
        return res.loss
    return res


def _pair(spec: PairLoss, models: _Models, batch: PreparedBatch, norms: Normalizers, stats: StepStats
          ) -> torch.Tensor:
    n = batch.n_examples
    s_out = models.run(batch.pair)
    teacher: Any = None
    if not spec.reference_free:
        if batch.chosen_teacher_logps is not None:  # c cached with y_t: the teacher runs on y_s rows only
            rejected = SequenceBatch(batch.pair.input_ids[n:], batch.pair.attention_mask[n:], batch.pair.labels[n:])
            with torch.no_grad():
                d, _ = heads.sequence_logps(models.run_teacher(rejected))
            teacher = (batch.chosen_teacher_logps.to(d.dtype), d)
        else:
            teacher = models.run_teacher(batch.pair)
    res, a, b = heads.sequence_loss(spec.fn, s_out, teacher, n)
    stats.chosen_rewards.append(res.chosen_rewards.detach())
    stats.rejected_rewards.append(res.rejected_rewards.detach())
    stats.logps_chosen.append(a)
    stats.logps_rejected.append(b)
    return res.loss / norms.examples


def _pt_terms(models: _Models, batch: PreparedBatch, norms: Normalizers, hp: Any, stats: StepStats
              ) -> dict[str, torch.Tensor | None]:
    """λ·L_PT's two pieces on the pre-training batch: LM cross-entropy and (κ > 0) forward KD."""
    pt_lm = pt_kd = None
    if hp.objective.lm_coef > 0:
        if batch.pt is None:
            raise ValueError("the objective has lm_coef > 0 but no pre-training batch was prepared")
        pt = models.run(batch.pt)
        pt_lm = heads.cross_entropy(pt, normalizer=norms.pt_tokens)
        stats.add("pt_lm_loss", pt_lm.detach())
        if hp.objective.pt_kd_ratio > 0:
            pt_kd = heads.forward_kl(pt, models.run_teacher(batch.pt), normalizer=norms.pt_tokens)
            stats.add("pt_kd_loss", pt_kd.detach())
    return {"pt_lm_loss": pt_lm, "pt_kd_loss": pt_kd}
