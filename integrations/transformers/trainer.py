"""``DistillTrainer`` — on-policy distillation of a Hugging Face causal LM student from a frozen teacher.

A conventional explicit training loop (the shape of TRL's trainers and ``accelerate`` examples) rather than
a ``transformers.Trainer`` subclass: DPKD needs per-step generation from the current student *before* the
micro-batches' normalisers are known (exact gradient accumulation needs the global token/example counts),
and exact SIGKILL-resume needs pickle-free checkpoints of the optimizer and every RNG — both of which fight
``Trainer``'s own loop and its ``torch.save`` checkpoints. What users of ``transformers`` expect is kept:
the names of ``TrainingArguments`` (``per_device_train_batch_size``, ``gradient_accumulation_steps``,
``learning_rate``, ``warmup_steps``, ``lr_scheduler_type``, ``logging_steps``, ``save_steps``,
``save_total_limit``, ``report_to``...), a tqdm progress bar, TRL's metric names (``loss``,
``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
``logps/rejected``, ``grad_norm``, ``learning_rate``), TensorBoard event files under ``<output_dir>/runs``,
``save_pretrained`` checkpoints and ``train(resume_from_checkpoint=...)``.

The loop, one optimizer step (paper Algorithm 1; spec/README.md §7) — each stage one method below:
  1. ``_prepare``: draw ``gradient_accumulation_steps`` micro-batches of prompts x from the data stream
     (a seeded permutation per epoch, indexed by the *global* step; this rank's share of each), and
     everything the method needs: y_t (dataset, pre-generated with its cached log p(y_t), or sampled from
     the teacher now), y_s sampled from the current student, GKD's on-policy draw, MiniLLM's teacher-mixed
     samples, a PT batch. Every sample has its own random stream keyed by (seed, purpose, step, example)
     (:mod:`.sampling`), so a response does not depend on the batch, the rank or the micro-batch it falls in;
  2. ``training_step``: the method's loss (the method table, :mod:`.methods`) inside the objective
     L = (1−α)·CE_D + α·L_method + λ·L_PT, backward per micro-batch with *global* normalisers (examples and
     loss tokens over all micro-batches of the step on all ranks, summed over ranks first);
  3. ``_optimizer_step``: clip, the learning rate of the schedule, AdamW step;
  4. logging, the held-out probe (:mod:`.probe`), checkpoints, callbacks.

Distributed (:mod:`.distributed`): the loop runs on ``accelerate`` — DDP over the student with the gradient
all-reduce only on the last micro-batch, ``bf16`` / ``fp16`` autocast, FSDP / DeepSpeed ZeRO from
``fsdp`` / ``deepspeed`` or the ``accelerate launch`` config (accelerator devices only), launched by
``torchrun`` or ``accelerate launch``. The global batch is ``per_device_train_batch_size ×
gradient_accumulation_steps × world size``; with the same global batch a step is the same computation at
any world size (same examples, same samples, same normalisers; the sums differ only in rounding order), and
a checkpoint resumes at any world size that keeps the global batch. Logs, TensorBoard and checkpoint files
come from the main process; callbacks run on every rank.

Schedules and weight decay are transformers': ``lr_scheduler_type`` is a ``TrainingArguments`` scheduler
name built by ``transformers.get_scheduler`` (``cosine`` with ``min_learning_rate`` > 0 is its
``cosine_with_min_lr``, the released code's cosine annealing to ``--lr-min``), and decay applies to the
parameters ``Trainer.get_decay_parameter_names`` names (no biases, no LayerNorm / RMSNorm weights).

Continuing a run (the experiment protocol): ``train(init_from=checkpoint)`` starts from another run's
checkpoint — its weights, AdamW state, RNG state and global step — so a method phase continues the SFT
start's optimizer and data stream (batch indices go on from the SFT start's last step; nothing is
replayed). The learning-rate schedule (linear warm-up, then the released code's cosine annealing to
``min_learning_rate``) runs over this run's own ``max_steps``.

Resuming (``train(resume_from_checkpoint=True)``) takes the newest checkpoint of ``output_dir`` whose files
match the manifest written with it (:mod:`.checkpoint`): a truncated or altered weights, optimizer, RNG or
trainer-state file is named on stderr (and in ``resume_notes``) and the previous checkpoint is used; a
named checkpoint (``resume_from_checkpoint=<folder>``, ``init_from``) that does not verify is refused
naming the file.

``use_fused=True`` computes the losses (and the probe's log-probs) on the fused token-chunked lm_head path
(:mod:`.heads`): same losses and gradients, without the [B, T, V] logits in memory.

Example::

    >>> trainer = DistillTrainer(student, teacher, examples, DistillConfig(output_dir="out", method="dpkd",
    ...                          max_steps=100), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    >>> result = trainer.train()                                                    # doctest: +SKIP
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, astuple, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..durable_files import atomic_write_text
from ..folder_lock import FolderLock, FolderLockedError
from ..methods import METHODS, OBJECTIVE_PRESETS, PairLoss, PolicyGradient, TokenDivergence
from .batching import SequenceBatch, generate, pad_pairs
from .checkpoint import CheckpointError, intact_checkpoints, load_checkpoint, save_checkpoint, verify_checkpoint
from .data import Example
from .distributed import Engine
from .heads import check_fusable
from .methods import Normalizers, PreparedBatch, StepStats, compute_loss
from .probe import Probe, ProbeOptions
from .sampling import sample_key

__all__ = ["DistillConfig", "DistillTrainer", "TrainResult", "objective_preset", "OBJECTIVE_PRESETS",
           "SCHEDULERS", "RESUMABLE_CHANGES"]

#: ``DistillConfig`` fields a resumed run may change: its length (the schedule runs over the new
#: ``max_steps``), logging, checkpoints, the engine and the per-process batch split (the global batch is
#: checked on its own), the fused path (the same losses).
RESUMABLE_CHANGES = frozenset({
    "output_dir", "max_steps", "logging_steps", "eval_steps", "save_steps", "save_total_limit", "report_to",
    "disable_tqdm", "per_device_train_batch_size", "gradient_accumulation_steps", "fsdp", "fsdp_config",
    "deepspeed", "use_fused", "fused_chunk_size"})

#: ``lr_scheduler_type`` values: transformers' ``SchedulerType`` names that need no evaluation metric.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")


def objective_preset(name: str) -> Any:
    """``ObjectiveConfig`` for a preset name (see :data:`OBJECTIVE_PRESETS`)."""
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
    method_args: dict[str, Any] = field(default_factory=dict)  # the method's hyper-parameters (method table)
    max_steps: int = 100  # optimizer steps of this run (after ``init_from``'s step, when given)
    per_device_train_batch_size: int = 8  # examples per micro-batch per process
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "cosine"  # a SCHEDULERS name, built by transformers.get_scheduler
    lr_scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    warmup_steps: int = 0
    min_learning_rate: float = 1e-7  # the released code's --lr-min ("cosine" becomes cosine_with_min_lr)
    logging_steps: int = 10
    eval_steps: int = 0  # 0: no probe during training
    save_steps: int = 0  # 0: only the final checkpoint
    save_total_limit: int | None = 2
    seed: int = 0
    report_to: str = "tensorboard"  # tensorboard | none
    disable_tqdm: bool = False
    # the distributed engine (accelerate): mixed precision, FSDP (a TrainingArguments-style `fsdp` string
    # plus `fsdp_config`: accelerate FullyShardedDataParallelPlugin fields) or a DeepSpeed config (dict or
    # JSON path); DDP when none is given. `accelerate launch --config_file` configures the same.
    bf16: bool = False
    fp16: bool = False
    fsdp: str = ""
    fsdp_config: dict[str, Any] | str | None = None
    deepspeed: dict[str, Any] | str | None = None
    # objective (spec/README.md §7): a preset name (OBJECTIVE_PRESETS) or an ObjectiveConfig
    objective: Any = "paper"
    # teacher / student outputs and sampling (the same for every method)
    teacher_outputs: str = "dataset"  # dataset | pregenerated | online
    max_new_tokens: int = 64
    sample_temperature: float = 1.0  # y_s and every student sample (GKD, MiniLLM)
    teacher_temperature: float = 1.0  # y_t when sampled online
    sample_top_k: int = 0
    sample_top_p: float = 1.0
    probe_beta: float = 0.1  # β of the probe's implicit rewards
    # the fused token-chunked lm_head path: log-probs and token losses from the last hidden state and the
    # lm_head weight, never materialising the [B, T, V] logits; same values and gradients
    use_fused: bool = False
    fused_chunk_size: int | None = None  # token rows per chunk; None: the backend's 64 MiB budget

    def __post_init__(self) -> None:
        if isinstance(self.objective, str):
            self.objective = objective_preset(self.objective)
        if self.method not in METHODS:
            raise ValueError(f"DistillConfig: `method` must be one of {sorted(METHODS)}, got {self.method!r}")
        self.method_args = METHODS[self.method].resolve(self.method_args)
        if self.teacher_outputs not in ("dataset", "pregenerated", "online"):
            raise ValueError("DistillConfig: `teacher_outputs` must be 'dataset', 'pregenerated' or 'online'")
        if self.lr_scheduler_type not in SCHEDULERS:
            raise ValueError(f"DistillConfig: `lr_scheduler_type` must be one of {SCHEDULERS}, "
                             f"got {self.lr_scheduler_type!r}")
        for name in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "max_new_tokens", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"DistillConfig: `{name}` must be ≥ 1")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError("DistillConfig: `warmup_steps` must lie in [0, max_steps]")
        for name in ("sample_temperature", "teacher_temperature", "learning_rate", "probe_beta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DistillConfig: `{name}` must be > 0")
        if not 0 <= self.min_learning_rate <= self.learning_rate:
            raise ValueError("DistillConfig: `min_learning_rate` must lie in [0, learning_rate]")
        if self.fused_chunk_size is not None and self.fused_chunk_size < 1:
            raise ValueError("DistillConfig: `fused_chunk_size` must be ≥ 1 (or None)")
        if self.bf16 and self.fp16:
            raise ValueError("DistillConfig: set at most one of `bf16` and `fp16`")
        self._check_ranges()
        if self.save_steps and self.save_steps % self.logging_steps:
            # a resumed run must restart on a logging boundary to reproduce the averaged logs exactly
            raise ValueError("DistillConfig: `save_steps` must be a multiple of `logging_steps`")

    def _check_ranges(self) -> None:
        """The remaining numeric fields and choices, each refused by name (before any model is touched)."""
        for name in ("eval_steps", "save_steps", "sample_top_k"):
            if getattr(self, name) < 0:
                raise ValueError(f"DistillConfig: `{name}` must be ≥ 0, got {getattr(self, name)}")
        for name in ("weight_decay", "adam_epsilon"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"DistillConfig: `{name}` must be ≥ 0, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"DistillConfig: `{name}` must lie in [0, 1), got {getattr(self, name)}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"DistillConfig: `max_grad_norm` must be > 0, got {self.max_grad_norm}")
        if not 0 < self.sample_top_p <= 1:
            raise ValueError(f"DistillConfig: `sample_top_p` must lie in (0, 1], got {self.sample_top_p}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"DistillConfig: `save_total_limit` must be ≥ 1 or None, got {self.save_total_limit}")
        if self.report_to not in ("tensorboard", "none"):
            raise ValueError(f"DistillConfig: `report_to` must be 'tensorboard' or 'none', got {self.report_to!r}")
        if self.fsdp_config is not None and not self.fsdp:
            raise ValueError("DistillConfig: `fsdp_config` is given but `fsdp` is empty (set fsdp='full_shard', ...)")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["objective"] = asdict(self.objective)
        return d

    def scheduler(self) -> tuple[str, dict[str, Any]]:
        """(transformers scheduler name, its ``scheduler_specific_kwargs``)."""
        if self.lr_scheduler_type == "cosine" and self.min_learning_rate > 0:
            return "cosine_with_min_lr", {"min_lr": self.min_learning_rate, **self.lr_scheduler_kwargs}
        return self.lr_scheduler_type, dict(self.lr_scheduler_kwargs)


Callback = Callable[["DistillTrainer", int, dict[str, float]], None]


@dataclass
class TrainResult:
    global_step: int
    log_history: list[dict[str, float]] = field(default_factory=list)

    @property
    def final_metrics(self) -> dict[str, float]:
        return self.log_history[-1] if self.log_history else {}


def _to_device(pb: PreparedBatch, device: torch.device) -> PreparedBatch:
    def move(v: Any) -> Any:
        if isinstance(v, SequenceBatch):
            return SequenceBatch(*(t.to(device) for t in astuple(v)))
        return v.to(device) if isinstance(v, torch.Tensor) else v

    return PreparedBatch(**{f.name: move(getattr(pb, f.name)) for f in fields(pb)})


class DistillTrainer:
    """Distil ``student`` from the frozen ``teacher`` on ``train_examples`` (see module docstring).

    Args:
        student, teacher: ``transformers`` causal LMs sharing one vocabulary (the teacher may be ``None``
            for methods that never read it, e.g. ``sft`` and ``seqkd`` with dataset/pre-generated outputs).
        train_examples: tokenised :class:`~dpkd.integrations.transformers.data.Example` s (every rank holds
            all of them; each takes its share of every step).
        config: :class:`DistillConfig`.
        pad_token_id, eos_token_id: the tokenizer's ids.
        probe_examples: held-out examples for the periodic probe (:mod:`.probe`).
        pt_sequences: token-id sequences of the pre-training corpus D_p (needed when λ > 0).
        callbacks: functions ``f(trainer, step, logs)`` called after every optimizer step.
        tokenizer: optional; enables the probe's greedy Rouge-L.
        teacher_cache: a :class:`~.teacher_cache.TeacherLogpCache` of the teacher on the pre-generated y_t
            (``teacher_outputs="pregenerated"``): c = log p(y_t) and, when it keeps top-k, the teacher's
            distributions for a token-level loss on y_t come from it instead of a teacher forward (scored
            once, by the main process first; then read by every rank).
    """

    def __init__(self, student: Any, teacher: Any, train_examples: Sequence[Example], config: DistillConfig, *,
                 pad_token_id: int, eos_token_id: int, probe_examples: Sequence[Example] = (),
                 pt_sequences: Sequence[Sequence[int]] = (), callbacks: Sequence[Callback] = (),
                 tokenizer: Any = None, teacher_cache: Any = None) -> None:
        self.examples = list(train_examples)
        self.config = config
        self.pad_id = pad_token_id
        self.eos_id = eos_token_id
        self.pt = [list(s) for s in pt_sequences]
        self.callbacks = list(callbacks)
        self.method = METHODS[config.method]
        self.loss_spec = self.method.loss(config.method_args)
        self.student, self.teacher = student, teacher
        self._check_inputs()
        self.engine = Engine(config)
        self.micro = config.per_device_train_batch_size
        self.world = self.engine.world
        self.batches_per_epoch = len(self.examples) // (self.micro * self.world)  # global micro-batches
        if self.batches_per_epoch < 1:
            raise ValueError("DistillTrainer: fewer training examples than one global micro-batch "
                             "(per_device_train_batch_size × world size)")
        optimizer = self._make_optimizer()
        self._lr_factor = self._make_schedule(optimizer)
        self.model, self.optimizer = self.engine.prepare(student, optimizer)
        self.student = self.engine.unwrap()
        self.teacher = self.engine.prepare_teacher(teacher)
        self.probe = Probe(probe_examples, self.teacher, pad_id=pad_token_id, eos_id=eos_token_id,
                           tokenizer=tokenizer,
                           options=ProbeOptions(beta=config.probe_beta, max_new_tokens=config.max_new_tokens,
                                                sample_temperature=config.sample_temperature,
                                                teacher_temperature=config.teacher_temperature, seed=config.seed,
                                                fused=config.use_fused, chunk_size=config.fused_chunk_size))
        self.log_history: list[dict[str, float]] = []
        self.start_step = 0  # global step this run started from (init_from's step)
        self.resume_notes: list[str] = []  # damaged checkpoints skipped when resuming, and what was used
        self.cached: list[Any] | None = None
        if teacher_cache is not None and config.teacher_outputs == "pregenerated":
            with self.engine.accelerator.main_process_first():
                self.cached = teacher_cache.entries(self.examples)
            self._cache_top_k = teacher_cache.top_k

    @property
    def global_batch_size(self) -> int:
        """Examples per optimizer step over all ranks and micro-batches."""
        return self.micro * self.config.gradient_accumulation_steps * self.world

    # ------------------------------------------------------------------------------------------ setup
    def _check_inputs(self) -> None:
        c, needs, teacher, student = self.config, self.method.needs, self.teacher, self.student
        online = needs.teacher_outputs and c.teacher_outputs == "online"
        needs_teacher = needs.teacher_forward or online or (c.objective.lm_coef > 0 and c.objective.pt_kd_ratio > 0)
        if teacher is None and needs_teacher:
            raise ValueError(f"DistillTrainer: method {c.method!r} with these options needs a `teacher`")
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
            if teacher.get_output_embeddings().weight.shape[0] != student.get_output_embeddings().weight.shape[0]:
                raise ValueError("DistillTrainer: `teacher` and `student` vocabulary sizes differ")
        if c.use_fused:
            check_fusable(student, "student")
            if teacher is not None:
                check_fusable(teacher, "teacher")
        if c.teacher_outputs == "pregenerated" and needs.teacher_outputs:
            missing = sum(ex.teacher_ids is None for ex in self.examples)
            if missing:
                raise ValueError(f"DistillTrainer: {missing} examples have no pre-generated teacher output")
        if c.objective.lm_coef > 0 and not self.pt:
            raise ValueError("DistillTrainer: the objective has lm_coef > 0 but `pt_sequences` is empty")

    def _make_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over two groups, split by transformers' ``Trainer`` decay rule."""
        from transformers import Trainer

        c = self.config
        # the rule reads only the model (no Trainer state): weight decay off for biases and norm weights
        decay_names = set(Trainer.get_decay_parameter_names(None, self.student))
        named = [(n, p) for n, p in self.student.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n in decay_names], "weight_decay": c.weight_decay},
                  {"params": [p for n, p in named if n not in decay_names], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_epsilon)

    def _make_schedule(self, optimizer: torch.optim.Optimizer) -> Callable[[int], float]:
        """transformers' schedule for this run; the factor at step k is read from it directly (no scheduler
        state to checkpoint, and a continued run restarts its own schedule)."""
        from transformers import get_scheduler

        c = self.config
        name, kwargs = c.scheduler()
        sched = get_scheduler(name, optimizer, num_warmup_steps=c.warmup_steps, num_training_steps=c.max_steps,
                              scheduler_specific_kwargs=kwargs)
        return sched.lr_lambdas[0]

    def lr_at(self, step: int) -> float:
        """Learning rate of this run's optimizer step ``step`` (0-based, counted from the run's start): the
        value transformers' ``get_scheduler(lr_scheduler_type, ...)`` gives that step."""
        return self.config.learning_rate * self._lr_factor(step)

    # ------------------------------------------------------------------------------------------ data
    def _rng(self, salt: int, global_batch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + salt * (global_batch + 1))

    def _batch_indices(self, global_batch: int) -> list[int]:
        """Example indices of global micro-batch ``global_batch`` (all ranks' share of it: micro × world)."""
        width = self.micro * self.world
        epoch, pos = divmod(global_batch, self.batches_per_epoch)
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.examples), generator=g)
        return perm[pos * width : (pos + 1) * width].tolist()

    def _shard(self, items: list) -> list:
        r = self.engine.rank
        return items[r * self.micro : (r + 1) * self.micro]

    def _pt_batch(self, global_batch: int) -> SequenceBatch:
        g = self._rng(7919, global_batch)
        idx = self._shard(torch.randint(len(self.pt), (self.micro * self.world,), generator=g).tolist())
        seqs = [self.pt[i] for i in idx]
        # LM loss on every token after the first: an empty "prompt" of one token
        return pad_pairs([s[:1] for s in seqs], [s[1:] for s in seqs], self.pad_id)

    def _sample(self, model: Any, prompts: list[list[int]], temperature: float, keys: tuple[str, int, list[int]],
                **kw: Any) -> list[list[int]]:
        """Responses to ``prompts``, each from its own stream ``keys`` = (purpose, step, example indices)."""
        c = self.config
        purpose, step, ids = keys
        seeds = [sample_key(c.seed, purpose, step=step, example=i) for i in ids]
        return generate(model, prompts, pad_id=self.pad_id, eos_id=self.eos_id, max_new_tokens=c.max_new_tokens,
                        temperature=temperature, top_k=c.sample_top_k, top_p=c.sample_top_p, row_seeds=seeds, **kw)

    def _sample_student(self, prompts: list[list[int]], keys: tuple[str, int, list[int]], **kw: Any
                        ) -> list[list[int]]:
        with self.engine.for_generation() as student:  # FSDP / ZeRO-3: the parameters gathered
            return self._sample(student, prompts, self.config.sample_temperature, keys, **kw)

    def _teacher_outputs(self, exs: list[Example], keys: tuple[str, int, list[int]]) -> list[list[int]]:
        c = self.config
        if c.teacher_outputs == "dataset":
            return [ex.response_ids for ex in exs]
        if c.teacher_outputs == "pregenerated":
            return [ex.teacher_ids for ex in exs]  # type: ignore[misc]
        return self._sample(self.teacher, [ex.prompt_ids for ex in exs], c.teacher_temperature, keys)

    def _on_policy_step(self, step: int) -> bool:
        """GKD: does this step train on the student's own samples (probability λ, seeded by the step)?"""
        p = self.loss_spec.on_policy_prob if isinstance(self.loss_spec, TokenDivergence) else 0.0
        return p > 0 and float(torch.rand((), generator=self._rng(31337, step))) < p

    def _prepare(self, step: int) -> list[PreparedBatch]:
        """This rank's micro-batches of the step with every sample the method needs (stage 1 of the loop)."""
        c, needs, spec = self.config, self.method.needs, self.loss_spec
        on_policy = self._on_policy_step(step)
        out = []
        for m in range(c.gradient_accumulation_steps):
            gb = step * c.gradient_accumulation_steps + m
            ids = self._shard(self._batch_indices(gb))
            exs = [self.examples[i] for i in ids]
            prompts = [ex.prompt_ids for ex in exs]
            pb = PreparedBatch(data=pad_pairs(prompts, [ex.response_ids for ex in exs], self.pad_id),
                               n_examples=len(exs))
            if needs.teacher_outputs:
                y_t = self._teacher_outputs(exs, ("y_t", step, ids))
                pb.chosen = pad_pairs(prompts, y_t, self.pad_id)
                if isinstance(spec, PairLoss):
                    y_s = self._sample_student(prompts, ("y_s", step, ids))
                    pb.pair = pad_pairs(prompts + prompts, y_t + y_s, self.pad_id)
                    if self.cached is not None:
                        pb.chosen_teacher_logps = torch.stack([self.cached[i].token_logps.sum(dtype=torch.float64)
                                                               for i in ids])
                    elif c.teacher_outputs == "pregenerated" and all(ex.teacher_logp is not None for ex in exs):
                        pb.chosen_teacher_logps = torch.tensor([ex.teacher_logp for ex in exs], dtype=torch.float64)
                elif self.cached is not None and self._cache_top_k and getattr(spec, "on", "") == "y_t":
                    from .teacher_cache import dense_teacher_logps

                    vocab = self.student.get_output_embeddings().weight.shape[0]
                    pb.chosen_teacher_dist = dense_teacher_logps([self.cached[i] for i in ids],
                                                                 pb.chosen.labels[:, 1:], vocab)
            if on_policy:
                pb.samples = pad_pairs(prompts, self._sample_student(prompts, ("gkd", step, ids)), self.pad_id)
            if isinstance(spec, PolicyGradient):
                y = self._sample_student(prompts, ("minillm", step, ids), mix_teacher=self.teacher,
                                         mix_alpha=spec.mix_alpha)
                pb.samples = pad_pairs(prompts, y, self.pad_id)
            if c.objective.lm_coef > 0:
                pb.pt = self._pt_batch(gb)
            out.append(pb if self.engine.device.type == "cpu" else _to_device(pb, self.engine.device))
        return out

    @staticmethod
    def normalizers(batches: Sequence[PreparedBatch]) -> Normalizers:
        """Counts over these micro-batches (this rank's; :meth:`training_step` sums them over ranks)."""
        return Normalizers(
            examples=sum(b.n_examples for b in batches),
            data_tokens=sum(b.data.n_response_tokens for b in batches),
            chosen_tokens=sum(b.chosen.n_response_tokens for b in batches if b.chosen is not None),
            pt_tokens=sum(b.pt.n_response_tokens for b in batches if b.pt is not None),
            sample_tokens=sum(b.samples.n_response_tokens for b in batches if b.samples is not None),
        )

    # ------------------------------------------------------------------------------------------ step
    def training_step(self, batches: Sequence[PreparedBatch]) -> dict[str, float]:
        """Forward/backward over this rank's micro-batches (no optimizer step); returns the step's metrics,
        reduced over ranks."""
        norms = Normalizers(*(int(v) for v in self.engine.sum(astuple(self.normalizers(batches)))))
        stats = StepStats()
        total = 0.0
        for i, pb in enumerate(batches):
            micro_loss = functools.partial(compute_loss, self.config.method, self.student, self.teacher, pb, norms,
                                           self.config, stats)
            with self.engine.sync(last=i == len(batches) - 1):
                loss = self.engine.forward(micro_loss)
                self.engine.backward(loss)
            total += float(loss.detach())
        return self._step_metrics(total, stats, any(b.samples is not None for b in batches))

    def _step_metrics(self, total: float, stats: StepStats, sampled: bool) -> dict[str, float]:
        """The step's metrics over all ranks: sums of the loss terms, means over every example's rewards."""
        eng = self.engine
        names = sorted(stats.terms)
        agree = [sum(r * k for r, k in stats.agreement), sum(k for _, k in stats.agreement)]
        sums = eng.sum([total, *(stats.terms[k] for k in names), *agree])
        logs = {"loss": sums[0], **dict(zip(names, sums[1 : 1 + len(names)], strict=True))}
        if stats.chosen_rewards:
            cr, rr = eng.gather(torch.cat(stats.chosen_rewards)), eng.gather(torch.cat(stats.rejected_rewards))
            logs.update({
                "rewards/chosen": float(cr.mean()), "rewards/rejected": float(rr.mean()),
                "rewards/accuracies": float((cr > rr).double().mean()), "rewards/margins": float((cr - rr).mean()),
                "logps/chosen": float(eng.gather(torch.cat(stats.logps_chosen)).mean()),
                "logps/rejected": float(eng.gather(torch.cat(stats.logps_rejected)).mean()),
            })
        if stats.agreement:
            logs["agreement_rate"] = sums[-2] / max(sums[-1], 1)
        if sampled and isinstance(self.loss_spec, TokenDivergence):
            logs["on_policy"] = 1.0
        return logs

    def _set_lr(self, step: int) -> float:
        lr = self.lr_at(step - self.start_step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def _optimizer_step(self, step: int) -> dict[str, float]:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = self.engine.clip_grad_norm(params, self.config.max_grad_norm)
        lr = self._set_lr(step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(grad_norm), "learning_rate": lr}

    @torch.no_grad()
    def probe_metrics(self, step: int) -> dict[str, float]:
        """The held-out probe now (:class:`~.probe.Probe`; empty without probe examples or teacher). Main
        process only, except under FSDP / ZeRO-3, where every rank gathers the parameters and runs it."""
        if self.engine.sharded:
            with self.engine.for_generation() as student:
                return self.probe.metrics(student, step)
        return self.probe.metrics(self.student, step) if self.engine.is_main else {}

    # ------------------------------------------------------------------------------------------ loop
    def _restore(self, resume_from_checkpoint: str | bool | None, init_from: str | Path | None,
                 allow_changes: set[str] = frozenset()) -> int:
        """Global step to start at: this run's own checkpoint (resume) if any, else ``init_from``'s (continue
        another run: weights, optimizer, RNG, step; its log history is not carried over), else 0."""
        out_dir = Path(self.config.output_dir)
        own = None
        if resume_from_checkpoint:
            own, state = self._load_intact(out_dir if resume_from_checkpoint is True else None,
                                           None if resume_from_checkpoint is True else Path(resume_from_checkpoint))
        if own is not None:
            self._check_batch(own, state)
            self._check_same_config(own, state.get("config"), allow_changes)
            self.log_history = list(state["log_history"])
            self.start_step = int(state.get("run_start_step", 0))
            self.probe.load_state(state.get("probe"))  # the pairs frozen when the run started
            return int(state["global_step"])
        if init_from is not None:
            state = self._load(Path(init_from))
            self.start_step = int(state["global_step"])
            return self.start_step
        torch.manual_seed(self.config.seed)
        return 0

    def _load(self, folder: Path) -> dict[str, Any]:
        """Load a checkpoint (refused, naming the damaged file, unless it verifies)."""
        problem = verify_checkpoint(folder)
        if problem is not None:
            raise CheckpointError(f"DistillTrainer: checkpoint {folder} cannot be loaded: {problem}")
        return load_checkpoint(folder, self.student, self.optimizer, engine=self.engine)

    def _load_intact(self, out_dir: Path | None, folder: Path | None) -> tuple[Path | None, dict[str, Any]]:
        """Resume from ``folder``, or from the newest checkpoint of ``out_dir`` that verifies and loads,
        saying (on stderr, in ``resume_notes``) which were skipped and why; (None, {}) when there is none."""
        if folder is not None:
            return folder, self._load(folder)
        candidates, skipped = intact_checkpoints(out_dir)
        for note in skipped:
            self._note(note)
        for candidate in candidates:
            try:
                state = load_checkpoint(candidate, self.student, self.optimizer, engine=self.engine)
            except Exception as e:  # noqa: BLE001 - any failure to read this folder: fall back to the previous one
                first = (str(e).strip().splitlines() or [""])[0][:300]
                self._note(f"{candidate} could not be loaded ({type(e).__name__}: {first}); falling back to the "
                           f"previous checkpoint")
                continue
            if self.resume_notes:
                self._note(f"resuming from {candidate}, the newest intact checkpoint")
            return candidate, state
        if candidates:  # the model may hold part of a failed load: never train on from that
            raise CheckpointError(f"DistillTrainer: no checkpoint in {out_dir} could be loaded: "
                                  + "; ".join(self.resume_notes))
        if self.resume_notes:
            self._note(f"no intact checkpoint in {out_dir}; starting at step 0")
        return None, {}

    def _note(self, message: str) -> None:
        self.resume_notes.append(message)
        if self.engine.is_main:
            print(f"DistillTrainer: {message}", file=sys.stderr, flush=True)

    def _check_batch(self, folder: Path, state: dict[str, Any]) -> None:
        """Resuming this run needs the same global batch (any world size that keeps it)."""
        saved = state.get("train_batch_size")
        if saved is not None and int(saved) != self.global_batch_size:
            raise ValueError(
                f"DistillTrainer: {folder} was written with a global batch of {saved} examples per step, this run "
                f"has {self.global_batch_size} (per_device_train_batch_size {self.micro} × "
                f"gradient_accumulation_steps {self.config.gradient_accumulation_steps} × world size "
                f"{self.world}); resume with per_device_train_batch_size × gradient_accumulation_steps = "
                f"{int(saved) // self.world} at this world size")

    def _check_same_config(self, folder: Path, saved: dict[str, Any] | None, allow_changes: set[str]) -> None:
        """Resuming with another configuration would silently mix two runs: refused, naming the fields."""
        if saved is None:
            return
        now = json.loads(json.dumps(self.config.to_json(), default=str))
        changed = [k for k in now if k not in RESUMABLE_CHANGES | allow_changes and saved.get(k) != now[k]]
        if changed:
            diff = "; ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
            raise ValueError(
                f"DistillTrainer: resuming {folder}, which another configuration wrote ({diff}); resume with the "
                f"checkpoint's values, start a new output_dir, or pass train(..., allow_changes={tuple(changed)!r}) "
                f"to change them on purpose")

    def _log(self, record: dict[str, float], writer: Any, bar: Any) -> None:
        self.log_history.append(record)
        if writer is not None:
            for k, v in record.items():
                if k != "step":
                    writer.add_scalar(k if "/" in k else f"train/{k}", v, int(record["step"]))
        if not self.config.disable_tqdm and self.engine.is_main:
            bar.write(json.dumps({k: round(v, 4) for k, v in record.items()}))

    def _epoch(self, done: int) -> float:
        return done * self.config.gradient_accumulation_steps / self.batches_per_epoch

    def _save(self, out_dir: Path, done: int) -> None:
        c = self.config
        save_checkpoint(out_dir, done, self.student, self.optimizer,
                        {"log_history": self.log_history, "config": c.to_json(), "run_start_step": self.start_step,
                         "probe": self.probe.state(), "train_batch_size": self.global_batch_size,
                         "world_size": self.world},
                        total_limit=c.save_total_limit, engine=self.engine)

    def train(self, resume_from_checkpoint: str | bool | None = None, *, init_from: str | Path | None = None,
              allow_changes: Sequence[str] = ()) -> TrainResult:
        """Run ``max_steps`` optimizer steps. ``resume_from_checkpoint``: a checkpoint folder of this run, or
        True for the latest in ``output_dir`` (a fresh start when there is none); ``init_from``: another
        run's checkpoint to continue from (module docstring). A resumed run must have the checkpoint's
        configuration but for :data:`RESUMABLE_CHANGES` (run length, logging, checkpoints, engine, the fused
        path) and the ``DistillConfig`` fields named in ``allow_changes`` (changed on purpose; the schedule is
        the new configuration's). ``output_dir`` is locked while the run lasts
        (:mod:`dpkd.integrations.folder_lock`): a trainer of another process on it is refused."""
        unknown = sorted(set(allow_changes) - {f.name for f in fields(DistillConfig)})
        if unknown:
            raise ValueError(f"DistillTrainer.train: `allow_changes` names no DistillConfig field: {unknown}")
        lock = FolderLock(self.config.output_dir, purpose="DistillTrainer") if self.engine.is_main else None
        if lock is not None:
            try:
                note = lock.acquire()
            except FolderLockedError as e:
                raise FolderLockedError(f"DistillConfig.output_dir {e}") from None
            if note and not self.config.disable_tqdm:
                print(note, flush=True)
        try:
            return self._train(resume_from_checkpoint, init_from, set(allow_changes))
        finally:
            if lock is not None:
                lock.release()

    def _train(self, resume_from_checkpoint: str | bool | None, init_from: str | Path | None,
               allow_changes: set[str]) -> TrainResult:
        c = self.config
        main = self.engine.is_main
        out_dir = Path(c.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        start = self._restore(resume_from_checkpoint, init_from, allow_changes)
        end = self.start_step + c.max_steps
        if start == self.start_step and (main or self.engine.sharded):
            self.probe.start(self.student)
        if main:
            atomic_write_text(out_dir / "distill_config.json", json.dumps(c.to_json(), indent=1))
        writer = None
        if c.report_to == "tensorboard" and main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out_dir / "runs"), purge_step=start if start > self.start_step else None)
        from tqdm.auto import tqdm

        bar = tqdm(total=c.max_steps, initial=start - self.start_step, desc=c.method,
                   disable=c.disable_tqdm or not main, dynamic_ncols=True)
        if c.eval_steps and start == self.start_step and self.probe.frozen is not None:
            self._log({"step": start, "epoch": self._epoch(start), **self.probe_metrics(start)}, writer, bar)
        self.model.train()
        window: list[dict[str, float]] = []
        t0 = time.perf_counter()
        for step in range(start, end):
            self._set_lr(step)  # before the backward passes: DeepSpeed's engine steps inside the last one
            logs = self.training_step(self._prepare(step))  # stages 1–2
            logs.update(self._optimizer_step(step))  # stage 3
            window.append(logs)
            done = step + 1
            is_last = done == end
            record: dict[str, float] | None = None
            if (done - self.start_step) % c.logging_steps == 0 or is_last:
                keys = {k for w in window for k in w}
                record = {k: sum(w[k] for w in window if k in w) / sum(k in w for w in window) for k in sorted(keys)}
                window = []
            if c.eval_steps and ((done - self.start_step) % c.eval_steps == 0 or is_last):
                record = {**(record or {}), **self.probe_metrics(done)}
            if record is not None:
                self._log({**record, "epoch": self._epoch(done), "step": done}, writer, bar)
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
            if (c.save_steps and (done - self.start_step) % c.save_steps == 0) or is_last:
                if writer is not None:
                    writer.flush()
                self._save(out_dir, done)
            for cb in self.callbacks:
                cb(self, done, logs)
        bar.close()
        if writer is not None:
            writer.close()
        if main:
            atomic_write_text(out_dir / "trainer_state.json", json.dumps(
                {"global_step": end, "run_start_step": self.start_step, "log_history": self.log_history,
                 "train_runtime_s": time.perf_counter() - t0, "world_size": self.world}, indent=1))
        self.engine.barrier()
        return TrainResult(global_step=end, log_history=self.log_history)
