"""``DistillTrainer`` — on-policy distillation of a Hugging Face causal LM student from a frozen teacher.

A conventional explicit training loop (the shape of TRL's trainers and ``accelerate`` examples) rather than
a ``transformers.Trainer`` subclass: DPKD needs per-step generation from the current student *before* the
micro-batches' normalisers are known (exact gradient accumulation needs the global token/example counts),
and exact SIGKILL-resume needs pickle-free checkpoints of the optimizer and every RNG — both of which fight
``Trainer``'s own loop and its ``torch.save`` checkpoints. What users of ``transformers`` expect is kept:
the names of ``TrainingArguments`` (``per_device_train_batch_size``, ``gradient_accumulation_steps``,
``learning_rate``, ``logging_steps``, ``save_steps``, ``save_total_limit``, ``report_to``...), a tqdm
progress bar, TRL's metric names (``loss``, ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``grad_norm``,
``learning_rate``), TensorBoard event files under ``<output_dir>/runs``, ``save_pretrained`` checkpoints and
``train(resume_from_checkpoint=...)``.

Per optimizer step (SPEC-MATH §4, Algorithm 1):
  1. draw ``gradient_accumulation_steps`` micro-batches of prompts x (a seeded per-epoch permutation);
  2. teacher outputs y_t: the dataset response (``teacher_outputs="dataset"``), pre-generated ones
     (``"pregenerated"``, see ``dpkd generate``), or sampled from the teacher now (``"online"``);
  3. student outputs y_s sampled from the *current* student (methods that need them);
  4. the four log-probs log q(y_t), log q(y_s), log p(y_t), log p(y_s) and the method's loss, combined by
     the objective L = (1−α)·CE_D + α·L_method + λ·L_PT (SPEC-MATH §3C);
  5. backward per micro-batch with global normalisers, clip, AdamW step.

``use_fused=True`` computes step 4 (and the probe's sequence log-probs) on the fused token-chunked lm_head
path (:mod:`.heads`): same losses and gradients, without the [B, T, V] logits in memory.

Example::

    >>> trainer = DistillTrainer(student, teacher, examples, DistillConfig(output_dir="out", method="dpkd",
    ...                          max_steps=100), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    >>> result = trainer.train()                                                    # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .batching import SequenceBatch, forward_logits, generate, pad_pairs
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .data import Example
from .heads import check_fusable, model_head, sequence_logps
from .methods import METHODS, Normalizers, PreparedBatch, StepStats, backend, compute_loss

__all__ = ["DistillConfig", "DistillTrainer", "objective_preset", "OBJECTIVE_PRESETS"]

OBJECTIVE_PRESETS = ("paper", "released", "distil-only", "half")


def objective_preset(name: str) -> Any:
    """``ObjectiveConfig`` for a preset name: ``paper`` (Algorithm 1: α=1, λ=0.5), ``released`` (LMOps
    runner: α=0.5, λ=0.5, κ=0.5), ``distil-only`` (α=1, λ=0), ``half`` (α=0.5, λ=0: the MiniLLM word-level
    KD mix, applied to every method alike in the embedded job)."""
    from dpkd.spec import DISTIL_ONLY, PAPER_OBJECTIVE, RELEASED_OBJECTIVE, ObjectiveConfig

    presets = {"paper": PAPER_OBJECTIVE, "released": RELEASED_OBJECTIVE, "distil-only": DISTIL_ONLY,
               "half": ObjectiveConfig(alpha=0.5, lm_coef=0.0, pt_kd_ratio=0.0)}
    if name not in presets:
        raise ValueError(f"unknown objective preset {name!r}; choose from {OBJECTIVE_PRESETS}")
    return presets[name]


@dataclass
class DistillConfig:
    """Hyper-parameters (names follow ``transformers.TrainingArguments`` and TRL where they exist)."""

    output_dir: str
    method: str = "dpkd"
    max_steps: int = 100
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "constant"  # constant | linear | cosine
    warmup_steps: int = 0
    logging_steps: int = 10
    eval_steps: int = 0  # 0: no probe evaluation during training
    save_steps: int = 0  # 0: only the final checkpoint
    save_total_limit: int | None = 2
    seed: int = 0
    report_to: str = "tensorboard"  # tensorboard | none
    disable_tqdm: bool = False
    # objective (SPEC-MATH §3C); a preset name or an ObjectiveConfig
    objective: Any = "half"
    # loss options
    beta: float = 0.1  # DPKD β; IPO τ; CPO β; token-level β
    label_smoothing: float = 0.0
    length_normalize: bool = True  # Eq. 9 (True) or Eq. 8 (False)
    cpo_nll_weight: float = 1.0
    simpo_beta: float = 2.0
    simpo_gamma: float = 1.0
    token_form: str = "sigmoid"
    temperature: float = 1.0  # word-level KD temperature
    # teacher / student outputs
    teacher_outputs: str = "dataset"  # dataset | pregenerated | online
    max_new_tokens: int = 64
    sample_temperature: float = 1.0
    sample_top_k: int = 0
    sample_top_p: float = 1.0
    # the fused token-chunked lm_head path (DESIGN.md §5): log-probs and token losses from the last hidden
    # state and the lm_head weight, never materialising the [B, T, V] logits; same values and gradients
    use_fused: bool = False
    fused_chunk_size: int | None = None  # token rows per chunk; None: the backend's 64 MiB budget

    def __post_init__(self) -> None:
        if isinstance(self.objective, str):
            self.objective = objective_preset(self.objective)
        if self.method not in METHODS:
            raise ValueError(f"DistillConfig: `method` must be one of {sorted(METHODS)}, got {self.method!r}")
        if self.teacher_outputs not in ("dataset", "pregenerated", "online"):
            raise ValueError("DistillConfig: `teacher_outputs` must be 'dataset', 'pregenerated' or 'online'")
        if self.lr_scheduler_type not in ("constant", "linear", "cosine"):
            raise ValueError("DistillConfig: `lr_scheduler_type` must be 'constant', 'linear' or 'cosine'")
        for name in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"DistillConfig: `{name}` must be ≥ 1")
        if self.fused_chunk_size is not None and self.fused_chunk_size < 1:
            raise ValueError("DistillConfig: `fused_chunk_size` must be ≥ 1 (or None)")
        if self.save_steps and self.save_steps % self.logging_steps:
            # a resumed run must restart on a logging boundary to reproduce the averaged logs exactly
            raise ValueError("DistillConfig: `save_steps` must be a multiple of `logging_steps`")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["objective"] = asdict(self.objective)
        return d


Callback = Callable[["DistillTrainer", int, dict[str, float]], None]


@dataclass
class TrainResult:
    global_step: int
    log_history: list[dict[str, float]] = field(default_factory=list)

    @property
    def final_metrics(self) -> dict[str, float]:
        return self.log_history[-1] if self.log_history else {}


class DistillTrainer:
    """Distil ``student`` from the frozen ``teacher`` on ``train_examples`` (see module docstring).

    Args:
        student, teacher: ``transformers`` causal LMs sharing one vocabulary (the teacher may be ``None``
            for ``sft`` and ``seqkd`` with dataset/pre-generated outputs).
        train_examples: tokenised :class:`~dpkd.integrations.transformers.data.Example` s.
        config: :class:`DistillConfig`.
        pad_token_id, eos_token_id: the tokenizer's ids.
        probe_examples: held-out examples for the periodic probe (first-token KLD/rKLD and rewards).
        pt_sequences: token-id sequences of the pre-training corpus D_p (needed when λ > 0).
        callbacks: functions ``f(trainer, step, logs)`` called after every optimizer step.
    """

    def __init__(
        self,
        student: Any,
        teacher: Any,
        train_examples: Sequence[Example],
        config: DistillConfig,
        *,
        pad_token_id: int,
        eos_token_id: int,
        probe_examples: Sequence[Example] = (),
        pt_sequences: Sequence[Sequence[int]] = (),
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.student = student
        self.teacher = teacher
        self.examples = list(train_examples)
        self.config = config
        self.pad_id = pad_token_id
        self.eos_id = eos_token_id
        self.probe = list(probe_examples)
        self.pt = [list(s) for s in pt_sequences]
        self.callbacks = list(callbacks)
        spec = METHODS[config.method]
        online = spec.needs_teacher_outputs and config.teacher_outputs == "online"
        needs_teacher = spec.needs_teacher_model or online or (
            config.objective.lm_coef > 0 and config.objective.pt_kd_ratio > 0)
        if teacher is None and needs_teacher:
            raise ValueError(f"DistillTrainer: method {config.method!r} with these options needs a `teacher`")
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
            if teacher.get_output_embeddings().weight.shape[0] != student.get_output_embeddings().weight.shape[0]:
                raise ValueError("DistillTrainer: `teacher` and `student` vocabulary sizes differ")
        if config.use_fused:
            check_fusable(student, "student")
            if teacher is not None:
                check_fusable(teacher, "teacher")
        if config.teacher_outputs == "pregenerated" and spec.needs_teacher_outputs:
            missing = sum(ex.teacher_ids is None for ex in self.examples)
            if missing:
                raise ValueError(f"DistillTrainer: {missing} examples have no pre-generated teacher output")
        if config.objective.lm_coef > 0 and not self.pt:
            raise ValueError("DistillTrainer: the objective has lm_coef > 0 but `pt_sequences` is empty")
        self.micro = config.per_device_train_batch_size
        self.batches_per_epoch = len(self.examples) // self.micro
        if self.batches_per_epoch < 1:
            raise ValueError("DistillTrainer: fewer training examples than one batch")
        self.optimizer = self._make_optimizer()
        self.log_history: list[dict[str, float]] = []

    # ------------------------------------------------------------------------------------------ setup
    def _make_optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for name, p in self.student.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "norm" in name.lower() or "ln" in name.lower() else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.config.learning_rate)

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then the schedule."""
        c = self.config
        if step < c.warmup_steps:
            return c.learning_rate * (step + 1) / c.warmup_steps
        if c.lr_scheduler_type == "constant":
            return c.learning_rate
        frac = (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps)
        if c.lr_scheduler_type == "linear":
            return c.learning_rate * (1.0 - frac)
        return c.learning_rate * 0.5 * (1.0 + math.cos(math.pi * frac))

    # ------------------------------------------------------------------------------------------ data
    def _batch_indices(self, global_batch: int) -> list[int]:
        epoch, pos = divmod(global_batch, self.batches_per_epoch)
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.examples), generator=g)
        return perm[pos * self.micro : (pos + 1) * self.micro].tolist()

    def _pt_batch(self, global_batch: int) -> SequenceBatch:
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + 7919 * (global_batch + 1))
        idx = torch.randint(len(self.pt), (self.micro,), generator=g).tolist()
        seqs = [self.pt[i] for i in idx]
        # LM loss on every token after the first: an empty "prompt" of one token
        return pad_pairs([s[:1] for s in seqs], [s[1:] for s in seqs], self.pad_id)

    def _teacher_outputs(self, exs: list[Example]) -> list[list[int]]:
        c = self.config
        if c.teacher_outputs == "dataset":
            return [ex.response_ids for ex in exs]
        if c.teacher_outputs == "pregenerated":
            return [ex.teacher_ids for ex in exs]  # type: ignore[misc]
        return generate(self.teacher, [ex.prompt_ids for ex in exs], pad_id=self.pad_id, eos_id=self.eos_id,
                        max_new_tokens=c.max_new_tokens, temperature=c.sample_temperature,
                        top_k=c.sample_top_k, top_p=c.sample_top_p)

    def _prepare(self, step: int) -> list[PreparedBatch]:
        c = self.config
        spec = METHODS[c.method]
        out = []
        for m in range(c.gradient_accumulation_steps):
            gb = step * c.gradient_accumulation_steps + m
            exs = [self.examples[i] for i in self._batch_indices(gb)]
            prompts = [ex.prompt_ids for ex in exs]
            pb = PreparedBatch(data=pad_pairs(prompts, [ex.response_ids for ex in exs], self.pad_id),
                               n_examples=len(exs))
            if spec.needs_teacher_outputs:
                y_t = self._teacher_outputs(exs)
                pb.chosen = pad_pairs(prompts, y_t, self.pad_id)
                if spec.needs_student_samples:
                    y_s = generate(self.student, prompts, pad_id=self.pad_id, eos_id=self.eos_id,
                                   max_new_tokens=c.max_new_tokens, temperature=c.sample_temperature,
                                   top_k=c.sample_top_k, top_p=c.sample_top_p)
                    pb.pair = pad_pairs(prompts + prompts, y_t + y_s, self.pad_id)
            if c.objective.lm_coef > 0:
                pb.pt = self._pt_batch(gb)
            out.append(pb)
        return out

    @staticmethod
    def normalizers(batches: Sequence[PreparedBatch]) -> Normalizers:
        """Global counts over the step's micro-batches (what makes accumulation exact)."""
        return Normalizers(
            examples=sum(b.n_examples for b in batches),
            data_tokens=sum(b.data.n_response_tokens for b in batches),
            chosen_tokens=sum(b.chosen.n_response_tokens for b in batches if b.chosen is not None),
            pt_tokens=sum(b.pt.n_response_tokens for b in batches if b.pt is not None),
        )

    # ------------------------------------------------------------------------------------------ step
    def training_step(self, batches: Sequence[PreparedBatch]) -> dict[str, float]:
        """Forward/backward over the micro-batches (no optimizer step); returns the step's metrics."""
        norms = self.normalizers(batches)
        stats = StepStats()
        total = 0.0
        for pb in batches:
            loss = compute_loss(self.config.method, self.student, self.teacher, pb, norms, self.config, stats)
            loss.backward()
            total += float(loss.detach())
        logs = {"loss": total, **stats.terms}
        if stats.chosen_rewards:
            cr, rr = torch.cat(stats.chosen_rewards), torch.cat(stats.rejected_rewards)
            logs.update({
                "rewards/chosen": float(cr.mean()), "rewards/rejected": float(rr.mean()),
                "rewards/accuracies": float((cr > rr).double().mean()), "rewards/margins": float((cr - rr).mean()),
                "logps/chosen": float(torch.cat(stats.logps_chosen).mean()),
                "logps/rejected": float(torch.cat(stats.logps_rejected).mean()),
            })
        if stats.agreement:
            n = sum(k for _, k in stats.agreement)
            logs["agreement_rate"] = sum(r * k for r, k in stats.agreement) / max(n, 1)
        return logs

    def _optimizer_step(self, step: int) -> dict[str, float]:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        lr = self.lr_at(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(grad_norm), "learning_rate": lr}

    # ------------------------------------------------------------------------------------------ probe
    @torch.no_grad()
    def probe_metrics(self, step: int) -> dict[str, float]:
        """First-token KLD/rKLD to the teacher (SPEC-MATH §2 Sec 4.5) and DPKD rewards of (y_t, y_s) on the
        probe prompts, y_s sampled from the student under a forked RNG (training randomness untouched)."""
        if not self.probe or self.teacher is None:
            return {}
        tb = backend()
        exs = self.probe
        prompts = [ex.prompt_ids for ex in exs]
        first = pad_pairs(prompts, [ex.response_ids[:1] for ex in exs], self.pad_id)
        pos = torch.tensor([len(p) - 1 for p in prompts])
        rows = torch.arange(len(prompts))
        self.student.eval()
        s_first = forward_logits(self.student, first)[rows, pos]
        t_first = forward_logits(self.teacher, first)[rows, pos]
        div = tb.first_token_divergence(s_first, t_first)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed * 1_000_003 + 104729 + step)
            y_s = generate(self.student, prompts, pad_id=self.pad_id, eos_id=self.eos_id,
                           max_new_tokens=self.config.max_new_tokens)
        y_t = [ex.teacher_ids if ex.teacher_ids is not None else ex.response_ids for ex in exs]
        pair = pad_pairs(prompts + prompts, y_t + y_s, self.pad_id)
        fused, chunk = self.config.use_fused, self.config.fused_chunk_size
        a_b, n_tok = sequence_logps(model_head(self.student, pair, fused=fused, chunk_size=chunk))
        c_d, _ = sequence_logps(model_head(self.teacher, pair, fused=fused, chunk_size=chunk))
        n = len(exs)
        lengths = n_tok.to(a_b.dtype)
        pm = tb.preference_metrics(a_b[:n], a_b[n:], c_d[:n], c_d[n:], beta=self.config.beta,
                                   chosen_lengths=lengths[:n], rejected_lengths=lengths[n:])
        self.student.train()
        out = {"eval/kld": float(div["kld"]), "eval/rkld": float(div["rkld"])}
        out.update({f"eval/{k}": float(v) for k, v in pm.items()})
        return out

    # ------------------------------------------------------------------------------------------ loop
    def train(self, resume_from_checkpoint: str | bool | None = None) -> TrainResult:
        """Run to ``max_steps``; ``resume_from_checkpoint`` = a checkpoint folder, or True for the latest in
        ``output_dir`` (a fresh start when there is none)."""
        c = self.config
        out_dir = Path(c.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        start = 0
        if resume_from_checkpoint:
            ckpt = latest_checkpoint(out_dir) if resume_from_checkpoint is True else Path(resume_from_checkpoint)
            if ckpt is not None:
                state = load_checkpoint(ckpt, self.student, self.optimizer)
                start = int(state["global_step"])
                self.log_history = list(state["log_history"])
        if start == 0:
            torch.manual_seed(c.seed)
        (out_dir / "distill_config.json").write_text(json.dumps(c.to_json(), indent=1))
        writer = None
        if c.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out_dir / "runs"), purge_step=start if start else None)
        from tqdm.auto import tqdm

        bar = tqdm(total=c.max_steps, initial=start, desc=f"{c.method}", disable=c.disable_tqdm, dynamic_ncols=True)
        self.student.train()
        window: list[dict[str, float]] = []
        t0 = time.perf_counter()
        for step in range(start, c.max_steps):
            logs = self.training_step(self._prepare(step))
            logs.update(self._optimizer_step(step))
            window.append(logs)
            done = step + 1
            is_last = done == c.max_steps
            record: dict[str, float] | None = None
            if done % c.logging_steps == 0 or is_last:
                keys = {k for w in window for k in w}
                record = {k: sum(w[k] for w in window if k in w) / sum(k in w for w in window) for k in sorted(keys)}
                record["epoch"] = done * c.gradient_accumulation_steps / self.batches_per_epoch
                window = []
            if c.eval_steps and (done % c.eval_steps == 0 or is_last):
                record = {**(record or {"epoch": done * c.gradient_accumulation_steps / self.batches_per_epoch}),
                          **self.probe_metrics(done)}
            if record is not None:
                record["step"] = done
                self.log_history.append(record)
                if writer is not None:
                    for k, v in record.items():
                        if k != "step":
                            writer.add_scalar(k if "/" in k else f"train/{k}", v, done)
                if not c.disable_tqdm:
                    bar.write(json.dumps({k: round(v, 4) for k, v in record.items()}))
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
            if (c.save_steps and done % c.save_steps == 0) or is_last:
                if writer is not None:
                    writer.flush()
                save_checkpoint(out_dir, done, self.student, self.optimizer,
                                {"log_history": self.log_history, "config": c.to_json()},
                                total_limit=c.save_total_limit)
            for cb in self.callbacks:
                cb(self, done, logs)
        bar.close()
        if writer is not None:
            writer.close()
        result = TrainResult(global_step=c.max_steps, log_history=self.log_history)
        (out_dir / "trainer_state.json").write_text(json.dumps(
            {"global_step": c.max_steps, "log_history": self.log_history,
             "train_runtime_s": time.perf_counter() - t0}, indent=1))
        return result
