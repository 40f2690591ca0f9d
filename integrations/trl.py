"""DPKD inside TRL: the loss of a ``trl.DistillationTrainer`` subclass, and of a ``trl.DPOTrainer`` subclass
with the teacher as the reference model (the ``trl`` extra: ``pip install "dpkd[trl]"``).

* :class:`DPKDDistillationTrainer` — TRL's on-policy loop generates y_s from the student (its generation,
  vLLM and FSDP teacher preparation, its logging); the dataset adds the teacher's pre-generated output y_t
  (column ``teacher_completion``, text). The loss is any pair method of dpkd's method table (``dpkd`` =
  Eq. 9, ``dpkd_eq8``, ``ipo``, ``cpo``, ``simpo``) on (y_t = chosen, y_s = rejected) or the released
  code's token-level ``dpkd_token`` on y_t, computed by the same code as dpkd's own trainer
  (:mod:`dpkd.integrations.transformers.heads`) and normalised by the *global* number of pairs (or y_t
  tokens) of the optimizer step, as TRL's own losses are (``num_items_in_batch``).
* :class:`DPKDDPOTrainer` — TRL's offline preference loop on a dataset whose ``chosen`` is y_t and whose
  ``rejected`` is the student's own output y_s (:func:`dpkd_preference_rows` samples them; text rows, as
  TRL tokenises them itself), with
  ``ref_model`` = the teacher; the loss is dpkd's. (TRL's own ``loss_type="sigmoid"`` with that reference is
  DPKD Eq. 8 and ``"sigmoid_norm"`` is Eq. 9; the tests hold both equal to dpkd's.) Offline means y_s is as
  old as the dataset: regenerate it per epoch, or use the distillation trainer for fresh y_s every step.

Both log TRL's metric names: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (and the trainers' own: ``loss``, ``entropy``,
``completions/*``, ``grad_norm``, ``learning_rate``). Naming: policy = student, reference = teacher,
chosen = y_t, rejected = y_s.

Example::

    >>> from dpkd.integrations.trl import DPKDDistillationConfig, DPKDDistillationTrainer  # doctest: +SKIP
    >>> args = DPKDDistillationConfig("out", dpkd_method="dpkd", dpkd_args={"beta": 0.1})  # doctest: +SKIP
    >>> DPKDDistillationTrainer(student, teacher_model=teacher, args=args, train_dataset=ds,
    ...                         processing_class=tok).train()                               # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from trl import DistillationConfig, DistillationTrainer, DPOConfig, DPOTrainer

from .methods import METHODS, PairLoss, TokenDivergence
from .transformers import heads
from .transformers.batching import IGNORE_INDEX, SequenceBatch, generate, pad_pairs

__all__ = ["DPKDDistillationConfig", "DPKDDistillationTrainer", "DPKDDPOConfig", "DPKDDPOTrainer",
           "dpkd_preference_rows", "TRL_METRICS"]

#: The preference metrics both trainers log, under TRL's (DPOTrainer's) names.
TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")


def _loss_spec(method: str, args: dict[str, Any]) -> Any:
    if method not in METHODS:
        raise ValueError(f"`dpkd_method` must be one of {sorted(METHODS)}, got {method!r}")
    spec = METHODS[method].loss(args)
    token_on_y_t = isinstance(spec, TokenDivergence) and spec.divergence == "dpkd_token"
    if not (isinstance(spec, PairLoss) or token_on_y_t):
        raise ValueError(f"`dpkd_method` {method!r} is not a preference loss on (y_t, y_s); use one of "
                         f"dpkd, dpkd_eq8, dpkd_token, ipo, cpo, simpo")
    return spec


def _rows(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [r[m.bool()].tolist() for r, m in zip(ids.cpu(), mask.cpu(), strict=True)]


class _PreferenceMetrics:
    """Per-example rewards and log-probs of a micro-batch, gathered over ranks and recorded under TRL's names
    after the wrapped forward (a collective inside it could hang)."""

    def __init__(self) -> None:
        self.pending: list[torch.Tensor] | None = None

    def keep(self, res: Any, a: torch.Tensor, b: torch.Tensor) -> None:
        self.pending = [res.chosen_rewards.detach(), res.rejected_rewards.detach(), a.detach(), b.detach()]

    def record(self, trainer: Any, mode: str) -> None:
        if self.pending is None:
            return
        cr, rr, a, b = (trainer.accelerator.gather_for_metrics(t) for t in self.pending)
        m = trainer._metrics[mode]
        m["rewards/chosen"].append(cr.mean().item())
        m["rewards/rejected"].append(rr.mean().item())
        m["rewards/accuracies"].append((cr > rr).float().mean().item())
        m["rewards/margins"].append((cr - rr).mean().item())
        m["logps/chosen"].append(a.mean().item())
        m["logps/rejected"].append(b.mean().item())
        self.pending = None


def _pair_loss(spec: PairLoss, student: Any, teacher: Any, pair: SequenceBatch, n: int, metrics: _PreferenceMetrics
               ) -> tuple[torch.Tensor, heads.HeadOutput]:
    """Σ over the n pairs of the method's loss (rows [:n] = (x, y_t), [n:] = (x, y_s)), and the student's head."""
    s_out = heads.model_head(student, pair, fused=False)
    t_out = None
    if not spec.reference_free:
        with torch.no_grad():
            t_out = heads.model_head(teacher, pair, fused=False)
    res, a, b = heads.sequence_loss(spec.fn, s_out, t_out, n)
    metrics.keep(res, a, b)
    return res.loss, s_out


# ----------------------------------------------------------------------------------------------- distillation
@dataclass
class DPKDDistillationConfig(DistillationConfig):
    """``trl.DistillationConfig`` plus the dpkd loss: ``dpkd_method`` (a method-table name) and its
    hyper-parameters ``dpkd_args``; ``teacher_completion_column`` holds y_t as text."""

    dpkd_method: str = field(default="dpkd", metadata={"help": "dpkd method: dpkd, dpkd_eq8, dpkd_token, ipo, "
                                                               "cpo, simpo"})
    dpkd_args: dict[str, Any] = field(default_factory=dict, metadata={"help": "the method's hyper-parameters"})
    teacher_completion_column: str = field(default="teacher_completion",
                                           metadata={"help": "dataset column with the teacher output y_t"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.dpkd_args = METHODS[self.dpkd_method].resolve(self.dpkd_args) if self.dpkd_method in METHODS else {}
        _loss_spec(self.dpkd_method, self.dpkd_args)


class DPKDDistillationTrainer(DistillationTrainer):
    """``trl.DistillationTrainer`` whose loss is DPKD (module docstring). Arguments as TRL's; ``args`` a
    :class:`DPKDDistillationConfig`; the dataset has ``prompt`` and the y_t column."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, DPKDDistillationConfig):
            raise TypeError("DPKDDistillationTrainer: `args` must be a DPKDDistillationConfig")
        self.loss_spec = _loss_spec(self.args.dpkd_method, self.args.dpkd_args)
        self._preference = _PreferenceMetrics()

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, self.args.teacher_completion_column]

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's generation batch (the student's y_s) plus y_t and the step's global pair / y_t-token counts."""
        out = super()._generate_and_score_completions(inputs)
        col = self.args.teacher_completion_column
        if any(col not in x for x in inputs):
            raise ValueError(f"DPKDDistillationTrainer: every example needs the teacher output column {col!r}")
        eos = self._tokenizer.eos_token_id
        y_t = [[*self._tokenizer(x[col], add_special_tokens=False)["input_ids"], eos] for x in inputs]
        device = self.accelerator.device
        out["teacher_ids"] = y_t
        counts = torch.tensor([len(y_t), sum(len(y) for y in y_t)], device=device, dtype=torch.float64)
        total = self.accelerator.gather(counts[None]).sum(0)
        out["num_pairs_in_batch"], out["num_teacher_tokens_in_batch"] = total[0], total[1]
        return out

    def _compute_loss(self, unwrapped_student: Any, inputs: dict[str, Any], num_items_in_batch: Any
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        prompts = _rows(inputs["prompt_ids"], inputs["prompt_mask"])
        y_s = _rows(inputs["completion_ids"], inputs["completion_mask"])
        y_t = [list(y) for y in inputs["teacher_ids"]]
        n, world = len(prompts), self.accelerator.num_processes
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        teacher.eval()
        pad = self._tokenizer.pad_token_id
        if isinstance(self.loss_spec, PairLoss):
            pair = pad_pairs(prompts + prompts, y_t + y_s, pad)
            total, s_out = _pair_loss(self.loss_spec, unwrapped_student, teacher, pair, n, self._preference)
            # DDP averages over ranks: each rank divides by its share of the global pair count
            loss = total / (inputs["num_pairs_in_batch"].to(total) / world)
            entropy_rows = slice(n, None)  # entropy of the student on its own y_s, as TRL logs it
        else:
            chosen = pad_pairs(prompts, y_t, pad)
            s_out = heads.model_head(unwrapped_student, chosen, fused=False)
            with torch.no_grad():
                t_out = heads.model_head(teacher, chosen, fused=False)
            norm = float(inputs["num_teacher_tokens_in_batch"]) / world
            loss = heads.token_divergence("dpkd_token", s_out, t_out, normalizer=norm,
                                          **dict(self.loss_spec.options)).loss
            entropy_rows = slice(None)
        with torch.no_grad():
            logits, mask = s_out.logits[entropy_rows], s_out.labels[entropy_rows] != IGNORE_INDEX
            logp = torch.log_softmax(logits.float(), -1)
            entropy = -(logp.exp() * logp).sum(-1)
            entropy_sum, n_valid = (entropy * mask).sum(), mask.sum()
        return loss, entropy_sum, n_valid

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._preference.record(self, "train" if self.model.training else "eval")
        return out


# ----------------------------------------------------------------------------------------------- DPO
@dataclass
class DPKDDPOConfig(DPOConfig):
    """``trl.DPOConfig`` plus the dpkd loss (``dpkd_method``, ``dpkd_args``); TRL's ``beta`` is unused — β is
    in ``dpkd_args``."""

    dpkd_method: str = field(default="dpkd", metadata={"help": "dpkd pair method: dpkd, dpkd_eq8, ipo, cpo, simpo"})
    dpkd_args: dict[str, Any] = field(default_factory=dict, metadata={"help": "the method's hyper-parameters"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.dpkd_args = METHODS[self.dpkd_method].resolve(self.dpkd_args) if self.dpkd_method in METHODS else {}
        if not isinstance(_loss_spec(self.dpkd_method, self.dpkd_args), PairLoss):
            raise ValueError("DPKDDPOConfig: `dpkd_method` must be a sequence-level pair method "
                             "(dpkd, dpkd_eq8, ipo, cpo, simpo); token-level DPKD needs the distillation trainer")


class DPKDDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` with dpkd's loss on (chosen = y_t, rejected = y_s), ``ref_model`` = the teacher."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, DPKDDPOConfig):
            raise TypeError("DPKDDPOTrainer: `args` must be a DPKDDPOConfig")
        if self.ref_model is None and not self.precompute_ref_logps:
            raise ValueError("DPKDDPOTrainer: pass the teacher as `ref_model` (DPKD's reference is the teacher)")
        self.loss_spec = _loss_spec(self.args.dpkd_method, self.args.dpkd_args)
        self._preference = _PreferenceMetrics()

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        # TRL's collated batch is already dpkd's pair layout: right-padded [chosen; rejected] rows, the
        # completion tokens marked by completion_mask
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
        pair = SequenceBatch(inputs["input_ids"], inputs["attention_mask"], labels)
        n = pair.input_ids.shape[0] // 2
        total, _ = _pair_loss(self.loss_spec, model, self.ref_model, pair, n, self._preference)
        return total / n  # the per-device mean, as DPOTrainer's losses (DDP averages over ranks)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        loss = self._compute_loss(model, inputs, return_outputs=False)
        self._preference.record(self, "train" if self.model.training else "eval")
        return (loss, None) if return_outputs else loss


def dpkd_preference_rows(student: Any, tokenizer: Any, prompts: list[list[int]], teacher_outputs: list[list[int]],
                         *, max_new_tokens: int, seed: int = 0, temperature: float = 1.0) -> list[dict[str, str]]:
    """DPO rows for :class:`DPKDDPOTrainer`: ``prompt``, ``chosen`` = y_t and ``rejected`` = y_s sampled now
    from ``student`` (keyed per example: reproducible), as text the way TRL tokenises them (the completion
    after a space, without its EOS, which TRL appends; a y_s cut at ``max_new_tokens`` gets one too)."""
    keys = [seed * 1_000_003 + i for i in range(len(prompts))]
    y_s = generate(student, prompts, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                   max_new_tokens=max_new_tokens, temperature=temperature, row_seeds=keys)
    eos = tokenizer.eos_token_id

    def text(ids: list[int]) -> str:
        return " " + tokenizer.decode([t for t in ids if t != eos])

    return [{"prompt": tokenizer.decode(list(p)), "chosen": text(t), "rejected": text(s)}
            for p, t, s in zip(prompts, teacher_outputs, y_s, strict=True)]
