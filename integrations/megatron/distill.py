"""Tensor-parallel DPKD distillation driver: ``torchrun ... -m dpkd.integrations.megatron.distill [options]``.

Teacher and student are Megatron-Core GPTModels of the OPT or the Llama family (``models``): a preset
(random initialisation), a Hugging Face folder (converted on the fly, each rank reading one tensor at a
time and keeping its shard) or a Megatron-Core distributed checkpoint written by
``dpkd.integrations.megatron.convert`` (each rank reads only its shards). The teacher is frozen and runs
forward only; the student is trained with AdamW. World = TP × DP (``--tp``; DP is the rest).

Modes (``spec/README.md``: the token-level loss, the objective, Algorithm 1):
* ``--mode token`` (the released code): teacher-forced on dataset sequences, the token-level DPKD
  ``vocab_parallel_dpkd_token_loss`` with the CE / PT mix of ``--objective released`` (default for it).
* ``--mode sequence`` (the paper, Algorithm 1): y_t = the dataset response (teacher outputs, as in the
  released "pseudo" data) or ``--teacher-generate``; y_s sampled from the current student under TP
  (``vocab_parallel_sample``, per-row generators so the draw is independent of TP and DP); the four summed
  log-probs from ``vocab_parallel_sequence_logps``; Eq. 9 ``dpkd_loss`` (length-normalised) with
  ``--objective paper`` (default for it).

Exactness across layouts: every loss is normalised by GLOBAL counts (loss tokens, or examples) and the
student's gradients are SUMMED over the data-parallel group, so a step is the same computation at any TP/DP
split (tested: TP=2 equals TP=1 × DP=2). Metrics are summed over DP ranks and logged by global rank 0
(stdout and ``--metrics-file`` JSONL). Checkpoints (``train_state``): Megatron-Core distributed checkpoints
of the student, AdamW and the schedule, loaded without arbitrary unpickling; a run resumes at another TP.

CPU mode (``--cpu``): gloo backend, parameters initialised and kept on the CPU. Megatron-Core's own core
attention allocates on ``torch.cuda.current_device()``; the project's ``SDPACoreAttention`` does not, so the
same model code runs on both. This is what ``examples/megatron_opt.sh`` and CI run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from dpkd.backends.torch import objective
from dpkd.spec.objective import DISTIL_ONLY, PAPER_OBJECTIVE, RELEASED_OBJECTIVE, ObjectiveConfig
from megatron.core import parallel_state

from ..folder_lock import FolderLock, FolderLockedError
from ..methods import METHODS, PairLoss, TokenDivergence
from . import data as D
from . import models, run_config, train_state
from .vocab_parallel import vocab_parallel_sample, vocab_parallel_sequence_logps
from .vocab_parallel_losses import (
    vocab_parallel_cross_entropy,
    vocab_parallel_dpkd_token_loss,
    vocab_parallel_forward_kl,
    vocab_parallel_generalized_jsd,
    vocab_parallel_reverse_kl,
)

__all__ = ["parse_args", "run", "main", "OBJECTIVES", "MODE_METHODS", "method_loss"]

OBJECTIVES: dict[str, ObjectiveConfig] = {
    "released": RELEASED_OBJECTIVE, "paper": PAPER_OBJECTIVE, "distil-only": DISTIL_ONLY,
}
# The methods of the one method table (dpkd.integrations.methods) this driver runs, per mode: token mode
# teacher-forces on the dataset sequences (divergences with a vocab-parallel kernel), sequence mode
# samples y_s and scores (y_t, y_s) with a pair loss.
_VOCAB_PARALLEL = {"dpkd_token": vocab_parallel_dpkd_token_loss, "forward_kl": vocab_parallel_forward_kl,
                   "reverse_kl": vocab_parallel_reverse_kl, "generalized_jsd": vocab_parallel_generalized_jsd}
MODE_METHODS = {
    "token": tuple(n for n, m in METHODS.items() if isinstance(m.loss(), TokenDivergence)
                   and m.loss().divergence in _VOCAB_PARALLEL and m.loss().on_policy_prob == 0),
    "sequence": tuple(n for n, m in METHODS.items() if isinstance(m.loss(), PairLoss)),
}
_DEFAULT_METHOD = {"token": "dpkd_token", "sequence": "dpkd"}


def method_loss(args: argparse.Namespace) -> Any:
    """The chosen method's loss from the method table, with ``--beta`` (when the method has a β) and
    ``--method-arg NAME=VALUE`` applied."""
    m = METHODS[args.method]
    values: dict[str, Any] = {}
    if args.beta is not None and any(h.name == "beta" for h in m.hparams):
        values["beta"] = args.beta
    for item in args.method_arg:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--method-arg {item!r}: expected NAME=VALUE (e.g. tau=0.5)")
        default = next((h.default for h in m.hparams if h.name == name), None)
        try:
            values[name] = raw.lower() == "true" if isinstance(default, bool) else (
                raw if isinstance(default, str) else float(raw))
        except ValueError:
            raise ValueError(f"--method-arg {item}: {raw!r} is not a number") from None
    return m.loss(values)


def _model_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument_group("layout and models").add_argument
    a("--tp", type=int, default=1, help="tensor-parallel size (DP = world size / TP)")
    a("--dp", type=int, default=None, help="data-parallel size; if given it must equal world / TP")
    a("--teacher", default="tiny-teacher", help="HF model folder, distributed checkpoint (convert's output or a "
      "training step folder), or a preset: " + ", ".join(models.PRESETS))
    a("--student", default="tiny-student", help="as --teacher")
    a("--random-init", action="store_true", help="take only the architecture from folders, initialise randomly")
    a("--tokenizer", default=None, help="HF tokenizer folder (default: the teacher's folder when it holds a "
      "tokenizer, else the built-in character tokenizer)")
    a("--data", default=None, help="Dolly-style JSONL (instruction, context, response); default: generated")
    a("--num-examples", type=int, default=256, help="size of the generated task when --data is absent")


def _method_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument_group("method and sampling").add_argument
    a("--mode", choices=("token", "sequence"), default="token")
    a("--method", choices=sorted(set(MODE_METHODS["token"] + MODE_METHODS["sequence"])), default=None,
      help=f"method of the method table; token mode: {', '.join(MODE_METHODS['token'])} (default dpkd_token); "
           f"sequence mode: {', '.join(MODE_METHODS['sequence'])} (default dpkd)")
    a("--method-arg", action="append", default=[], metavar="NAME=VALUE",
      help="a hyper-parameter of the method (repeatable), e.g. tau=0.5 for ipo")
    a("--objective", choices=tuple(OBJECTIVES), default=None, help="default: released (token), paper (sequence)")
    a("--beta", type=float, default=None, help="β of the method when it has one (default: the method table's)")


def _training_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument_group("optimisation").add_argument
    a("--steps", type=int, default=10)
    a("--global-batch", type=int, default=8, help="examples per step over all DP ranks")
    a("--max-prompt", type=int, default=256)
    a("--max-length", type=int, default=512)
    a("--max-new-tokens", type=int, default=32, help="student (and teacher) sampling length, sequence mode")
    a("--temperature", type=float, default=1.0, help="sampling temperature (released eval: 1.0, top-k 0)")
    a("--teacher-generate", action="store_true", help="sequence mode: sample y_t from the teacher too")
    a("--lr", type=float, default=5e-4)
    a("--weight-decay", type=float, default=0.01)
    a("--clip-grad", type=float, default=1.0)
    a("--lr-tmax", type=int, default=None, help="CosineAnnealingLR T_max in steps (default: --steps)")
    a("--lr-min", type=float, default=1e-7)


def _run_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument_group("precision, logging and checkpoints").add_argument
    a("--vocab-multiple", type=int, default=128, help="pad the vocabulary to a multiple of this (and of TP)")
    a("--bf16", action="store_true", help="bf16 weights for both models (losses still in float32)")
    a("--cpu", action="store_true", help="CPU mode: gloo, parameters on the CPU (tests, CI, the tiny example)")
    a("--seed", type=int, default=40)
    a("--log-interval", type=int, default=1)
    a("--metrics-file", default=None)
    a("--save-dir", default=None)
    a("--save-interval", type=int, default=0, help="save every N steps (0: only at the end)")
    a("--resume", action="store_true", help="resume from the latest intact checkpoint in --save-dir (it must "
      "have been written by the same run config; see --override)")
    a("--override", type=lambda s: [f.strip().replace("-", "_") for f in s.split(",") if f.strip()], default=[],
      metavar="FIELD,...", help="with --resume: fields that may differ from the checkpoint's run config "
      f"({', '.join(run_config.OVERRIDABLE)}); the LR schedule is recomputed from the new values")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dpkd.integrations.megatron.distill", description=__doc__.split("\n")[0])
    for add in (_model_arguments, _method_arguments, _training_arguments, _run_arguments):
        add(p)
    args = p.parse_args(argv)
    if args.objective is None:
        args.objective = "released" if args.mode == "token" else "paper"
    if args.method is None:
        args.method = _DEFAULT_METHOD[args.mode]
    if args.method not in MODE_METHODS[args.mode]:
        p.error(f"--method {args.method} does not run in --mode {args.mode} (choose from "
                f"{', '.join(MODE_METHODS[args.mode])})")
    try:
        method_loss(args)
    except ValueError as e:
        p.error(str(e))
    errors = run_config.argument_errors(args)
    if errors:
        p.error("\n  ".join(errors))
    return args


# --------------------------------------------------------------------------------------------------
# set-up


def _init(args) -> torch.device:
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("--cpu: not given, and this machine has no CUDA device (pass --cpu to run on the CPU)")
    if not dist.is_initialized():
        dist.init_process_group("gloo" if args.cpu else "nccl")
    errors = run_config.layout_errors(args, dist.get_world_size())
    if errors:
        raise SystemExit("\n".join(errors))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if args.cpu:
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp)
    if not args.cpu:
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    return device


def _tokenizer(args):
    if args.tokenizer:
        return D.HFTokenizer(args.tokenizer)
    teacher = Path(args.teacher)
    if teacher.is_dir() and any((teacher / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return D.HFTokenizer(str(teacher))
    return D.CharTokenizer()


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "layernorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------------------
# model calls


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """This rank's vocabulary shard of the logits [B, S, V_local] (causal attention, positions 0..S-1)."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return model(tokens, positions, None).float()


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, max_new: int, eos_id: int, pad_id: int, vocab: int,
             generators: list[torch.Generator], temperature: float, device) -> list[list[int]]:
    """Sample a continuation of each prompt under TP (right-padded batch, full recomputation per step:
    with causal attention a row's padding never influences its own positions)."""
    was_training = model.training
    model.eval()
    b = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.full((b, int(lengths.max()) + max_new), pad_id, dtype=torch.int64, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, device=device)
    cur = lengths.clone()
    done = torch.zeros(b, dtype=torch.bool, device=device)
    rows = torch.arange(b, device=device)
    for _ in range(max_new):
        shard = _logits(model, tokens[:, : int(cur.max())])
        nxt = vocab_parallel_sample(shard[rows, cur - 1], generator=generators, vocab_size=vocab,
                                    temperature=temperature)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens[rows[~done], cur[~done]] = nxt[~done]
        cur = cur + (~done).long()
        done = done | (nxt == eos_id)
        if bool(done.all()):
            break
    model.train(was_training)
    return [tokens[i, len(p): int(cur[i])].tolist() for i, p in enumerate(prompts)]


# --------------------------------------------------------------------------------------------------
# one step


def _dp_sum(x: torch.Tensor) -> torch.Tensor:
    out = x.detach().clone()
    dist.all_reduce(out, group=parallel_state.get_data_parallel_group())
    return out


def _rows(args, step: int, n_records: int) -> list[int]:
    """Global example indices of this step (an epoch-wise deterministic shuffle), then this DP rank's share."""
    per_epoch = n_records // args.global_batch
    epoch, k = divmod(step, per_epoch)
    order = list(range(n_records))
    random.Random(args.seed * 7919 + epoch).shuffle(order)
    return order[k * args.global_batch:(k + 1) * args.global_batch]


# loss selection: the one place that decides which distillation loss a mode uses


def token_distillation_loss(args, student_logits, teacher_logits, mask, *, normalizer: float, vocab: int
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token mode's distillation term (the method table's divergence) on vocab-parallel logits shards, and
    its per-rank metrics (means over this rank's loss tokens)."""
    spec = method_loss(args)
    out = _VOCAB_PARALLEL[spec.divergence](student_logits, teacher_logits, mask, normalizer=normalizer,
                                           vocab_size=vocab, **dict(spec.options))
    if spec.divergence == "dpkd_token":
        return out.loss, {"agreement": out.agreement_rate}
    return out, {}


def sequence_distillation_loss(args, policy_chosen, policy_rejected, reference_chosen, reference_rejected, *,
                               chosen_lengths, rejected_lengths):
    """Sequence mode's pair loss (the method table's) on the four summed log-probs, summed over this rank's
    examples."""
    return method_loss(args).fn(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                                chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, reduction="sum")


# --------------------------------------------------------------------------------------------------


def _token_terms(args, batch, labels, n_tokens, student, teacher, vocab, device, coef
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Token mode: both models teacher-forced on the dataset batch; (loss terms, metrics)."""
    terms: dict[str, torch.Tensor] = {}
    s_logits = _logits(student, batch.tokens.to(device))
    with torch.no_grad():
        t_logits = _logits(teacher, batch.tokens.to(device))
    if coef["sft_loss"]:
        terms["sft_loss"] = vocab_parallel_cross_entropy(s_logits, labels, normalizer=float(n_tokens),
                                                         vocab_size=vocab)
    terms["distil_loss"], extra = token_distillation_loss(args, s_logits, t_logits, labels != -100,
                                                          normalizer=float(n_tokens), vocab=vocab)
    return terms, {k: v * batch.mask.sum() / n_tokens for k, v in extra.items()}


def _responses(args, step, mine, pairs, student, teacher, tok, vocab, device) -> tuple[list, list]:
    """(y_t, y_s) of this rank's prompts: y_s sampled from the current student, y_t the dataset response or,
    with ``--teacher-generate``, sampled from the teacher; seeded per (step, example)."""
    prompts = [pairs[i][0] for i in mine]
    gens = [torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + step * 65_537 + i) for i in mine]
    y_s = generate(student, prompts, max_new=args.max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id,
                   vocab=vocab, generators=gens, temperature=args.temperature, device=device)
    if args.teacher_generate:
        tgens = [torch.Generator(device=device).manual_seed(args.seed * 7 + step * 65_537 + i) for i in mine]
        y_t = generate(teacher, prompts, max_new=args.max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id,
                       vocab=vocab, generators=tgens, temperature=args.temperature, device=device)
    else:
        y_t = [pairs[i][1] for i in mine]
    # an empty sample (cut at max_new=0) cannot be length-normalised: it scores its EOS instead
    return y_t, [y if y else [tok.eos_id] for y in y_s]


def _sequence_terms(args, step, mine, pairs, batch, labels, n_tokens, student, teacher, tok, vocab, device, coef
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Sequence mode (Algorithm 1): the four summed log-probs of (y_t, y_s) and the sequence loss."""
    prompts = [pairs[i][0] for i in mine]
    y_t, y_s = _responses(args, step, mine, pairs, student, teacher, tok, vocab, device)
    chosen = D.collate(list(zip(prompts, y_t, strict=True)), pad_id=tok.pad_id)
    rejected = D.collate(list(zip(prompts, y_s, strict=True)), pad_id=tok.pad_id)
    ct, rt = chosen.tokens.to(device), rejected.tokens.to(device)
    cl, rl = chosen.labels.to(device), rejected.labels.to(device)
    a, n_t = vocab_parallel_sequence_logps(_logits(student, ct), cl, vocab_size=vocab)
    b, n_s = vocab_parallel_sequence_logps(_logits(student, rt), rl, vocab_size=vocab)
    with torch.no_grad():
        c, _ = vocab_parallel_sequence_logps(_logits(teacher, ct), cl, vocab_size=vocab)
        d, _ = vocab_parallel_sequence_logps(_logits(teacher, rt), rl, vocab_size=vocab)
    out = sequence_distillation_loss(args, a, b, c, d, chosen_lengths=n_t, rejected_lengths=n_s)
    terms = {"distil_loss": out.loss / args.global_batch}
    if coef["sft_loss"]:
        terms["sft_loss"] = vocab_parallel_cross_entropy(_logits(student, batch.tokens.to(device)), labels,
                                                         normalizer=float(n_tokens), vocab_size=vocab)
    margins = (out.chosen_rewards - out.rejected_rewards)
    metrics = {"rewards/margins": margins.sum() / args.global_batch,
               "rewards/accuracies": (margins > 0).float().sum() / args.global_batch,
               "student_len": n_s.float().sum() / args.global_batch}
    return terms, metrics


def _pt_terms(mine, pt_pairs, student, teacher, tok, vocab, device, coef) -> dict[str, torch.Tensor]:
    """The pre-training terms on D_p: LM cross-entropy and (with its coefficient) forward KD."""
    pt = D.collate([pt_pairs[i] for i in mine], pad_id=tok.pad_id)
    pt_tokens, pt_labels = pt.tokens.to(device), pt.labels.to(device)
    n_pt = float(_dp_sum(pt.mask.sum().to(device).float()))
    ps_logits = _logits(student, pt_tokens)
    terms = {"pt_lm_loss": vocab_parallel_cross_entropy(ps_logits, pt_labels, normalizer=n_pt, vocab_size=vocab)}
    if coef["pt_kd_loss"]:
        with torch.no_grad():
            pt_t_logits = _logits(teacher, pt_tokens)
        # forward KL: the released code's teacher–student cross-entropy minus the constant teacher entropy
        terms["pt_kd_loss"] = vocab_parallel_forward_kl(ps_logits, pt_t_logits, pt.mask.to(device),
                                                        normalizer=n_pt, vocab_size=vocab)
    return terms


def train_step(args, step, batch_rows, pairs, pt_pairs, student, teacher, tok, vocab, device
               ) -> dict[str, torch.Tensor]:
    dp_rank = parallel_state.get_data_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    local = args.global_batch // dp
    mine = batch_rows[dp_rank * local:(dp_rank + 1) * local]
    cfg = OBJECTIVES[args.objective]
    coef = cfg.coefficients()
    terms: dict[str, torch.Tensor | None] = {"sft_loss": None, "distil_loss": None, "pt_lm_loss": None,
                                               "pt_kd_loss": None}
    batch = D.collate([pairs[i] for i in mine], pad_id=tok.pad_id)
    labels = batch.labels.to(device)
    n_tokens = _dp_sum(batch.mask.sum().to(device).float())

    if args.mode == "token":
        mode_terms, metrics = _token_terms(args, batch, labels, n_tokens, student, teacher, vocab, device, coef)
    else:
        mode_terms, metrics = _sequence_terms(args, step, mine, pairs, batch, labels, n_tokens, student, teacher,
                                              tok, vocab, device, coef)
    terms.update(mode_terms)
    if coef["pt_lm_loss"] or coef["pt_kd_loss"]:
        terms.update(_pt_terms(mine, pt_pairs, student, teacher, tok, vocab, device, coef))
    loss = objective(terms["sft_loss"], terms["distil_loss"], terms["pt_lm_loss"], terms["pt_kd_loss"], config=cfg)
    loss.backward()
    metrics.update({k: t for k, t in terms.items() if t is not None})
    metrics["loss"] = loss
    return {k: _dp_sum(t.float().reshape(())) for k, t in metrics.items()}


def _sum_grads_over_dp(model) -> None:
    group = parallel_state.get_data_parallel_group()
    if parallel_state.get_data_parallel_world_size() == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)


def clip_grad_norm(model, max_norm: float) -> torch.Tensor:
    """Clip by the global gradient norm: sharded parameters counted on every TP rank, replicated ones once."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    grads = [p for p in model.parameters() if p.grad is not None]
    total = torch.zeros((), dtype=torch.float32, device=grads[0].grad.device)
    for p in grads:
        if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
            total += p.grad.float().pow(2).sum()
    dist.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
    norm = total.sqrt()
    if max_norm > 0:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in grads:
            p.grad.mul_(scale.to(p.grad.dtype))
    return norm


# --------------------------------------------------------------------------------------------------
# checkpoints, the save-dir lock, resuming


def _say(text: str) -> None:
    if dist.get_rank() == 0:
        print(f"[dpkd.megatron] {text}", file=sys.stderr, flush=True)


def _save(args, step, student, optimizer, scheduler, source: models.ModelSource, config: dict[str, Any]) -> None:
    train_state.save_training_state(args.save_dir, step, student, optimizer, scheduler, config=source.config,
                                    vocab_multiple=args.vocab_multiple, run_config=config)


def _lock_save_dir(args) -> FolderLock | None:
    """Rank 0 takes ``--save-dir``'s lock (two runs there would overwrite each other's checkpoints); every
    rank learns whether it got it."""
    if not args.save_dir:
        return None
    lock = FolderLock(args.save_dir, purpose="dpkd.integrations.megatron.distill")
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", lock.acquire())
        except (OSError, FolderLockedError) as e:  # told to every rank, or they would wait for rank 0
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    status, message = box[0]
    if status == "error":
        raise SystemExit(f"--save-dir {args.save_dir}: {message}")
    if message:
        _say(message)
    if dist.get_rank() == 0:
        for path in train_state.remove_leftovers(args.save_dir):
            _say(f"removed {path} (a save that did not finish)")
    return lock if dist.get_rank() == 0 else None


class _ResumeCheck:
    """Accepts a checkpoint for this run or refuses it (SystemExit naming each changed flag)."""

    def __init__(self, args, config: dict[str, Any]) -> None:
        self.args, self.config, self.accepted, self._seen = args, config, [], set()

    def __call__(self, step: int, manifest: dict[str, Any]) -> None:
        if step in self._seen:
            return
        self._seen.add(step)
        folder = train_state.step_dir(self.args.save_dir, step)
        saved = manifest.get("run_config")
        if saved is None:
            _say(f"{folder} was written before checkpoints recorded their run config: not compared")
            return
        refused, self.accepted = run_config.config_changes(saved, self.config, self.args.override)
        if refused:
            raise SystemExit(f"--resume: {folder} was written by another run config; refusing to mix them:\n  "
                             + "\n  ".join(refused) + "\n(use a new --save-dir, or --override FIELD,... for "
                             f"{', '.join(run_config.OVERRIDABLE)})")
        if step > self.args.steps:
            raise SystemExit(f"--steps {self.args.steps}: {folder} is at step {step} already")
        for change in self.accepted:
            _say(f"--override: {change}")


def _apply_schedule(args, optimizer, scheduler) -> None:
    """After a resume with overridden schedule fields: the cosine of this run's --lr, --lr-min and T_max at
    the resumed step (the value a run started with them would have there), continued by the scheduler."""
    t_max, t = args.lr_tmax or args.steps, scheduler.last_epoch
    lr = args.lr_min + (args.lr - args.lr_min) * (1 + math.cos(math.pi * t / t_max)) / 2
    scheduler.T_max, scheduler.eta_min = t_max, args.lr_min
    scheduler.base_lrs = [args.lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["initial_lr"], group["lr"] = args.lr, lr
    optimizer.param_groups[0]["weight_decay"] = args.weight_decay  # the decay group (_param_groups)
    scheduler._last_lr = [lr] * len(optimizer.param_groups)


def _resume(args, candidates, check: _ResumeCheck, student, optimizer, scheduler) -> int:
    if not candidates:
        return 0
    loaded = train_state.resume_training_state(args.save_dir, candidates, student, optimizer, scheduler,
                                               check=check, log=_say)
    if loaded is None:
        raise SystemExit(f"--resume: no checkpoint in --save-dir {args.save_dir} could be loaded (see above)")
    if check.accepted:
        _apply_schedule(args, optimizer, scheduler)
    return loaded[0]


# --------------------------------------------------------------------------------------------------
# driver


def _sources(args, tok, max_pos: int) -> tuple[models.ModelSource, models.ModelSource]:
    """Teacher and student sources (config files only), checked against the tokenizer before any weight loads."""
    out = []
    for name in ("teacher", "student"):
        source = models.resolve(getattr(args, name), vocab_size=tok.vocab_size, max_positions=max_pos)
        if source.shape.vocab_size < tok.vocab_size:
            raise SystemExit(f"--{name} {getattr(args, name)}: {source.shape.vocab_size} embeddings, but the "
                             f"tokenizer has {tok.vocab_size} tokens (--tokenizer)")
        out.append(source)
    return out[0], out[1]


def _build(source: models.ModelSource, args, device):
    model = models.build(source, tp_size=args.tp, tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                         bf16=args.bf16, cpu=args.cpu, vocab_multiple=args.vocab_multiple,
                         load_weights=not args.random_init)
    return model.to(device)


def _teacher_and_student(args, tok, device) -> tuple[Any, models.ModelSource, Any, models.ModelSource]:
    """The frozen teacher and the student in training mode, with their sources; one vocabulary."""
    t_source, s_source = _sources(args, tok, run_config.max_positions_needed(args))
    teacher, student = _build(t_source, args, device), _build(s_source, args, device)
    if t_source.shape.vocab_size != s_source.shape.vocab_size:
        raise SystemExit(f"teacher vocabulary {t_source.shape.vocab_size} != student vocabulary "
                         f"{s_source.shape.vocab_size}")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.train()
    return teacher, t_source, student, s_source


def run(args: argparse.Namespace) -> list[dict[str, float]]:
    """Train; returns the logged metrics (global, identical on every rank)."""
    device = _init(args)
    lock = _lock_save_dir(args)
    try:
        return _run(args, device)
    finally:
        if lock is not None:
            lock.release()


def _run(args: argparse.Namespace, device) -> list[dict[str, float]]:
    torch.manual_seed(args.seed)
    config = run_config.run_config(args)
    check = _ResumeCheck(args, config)
    candidates, notes = train_state.intact_checkpoints(args.save_dir) if args.resume else ([], [])
    for note in notes:
        _say(note)
    if candidates:
        check(*candidates[0])  # refuse a changed run config before any model loads
    elif args.resume:
        _say(f"--resume: no intact checkpoint in --save-dir {args.save_dir}; starting at step 0")
    tok = _tokenizer(args)
    records = D.load_records(args.data) if args.data else D.generate_records(args.num_examples, seed=args.seed)
    if len(records) < args.global_batch:
        raise SystemExit(f"--global-batch {args.global_batch}: {len(records)} records cannot fill it")
    pairs = D.encode(records, tok, max_prompt=args.max_prompt, max_length=args.max_length)
    # the pre-training batch D_p: the same records as plain LM text (every next token is a target)
    pt_pairs = [(p[:1], p[1:] + r) for p, r in pairs]
    teacher, t_source, student, s_source = _teacher_and_student(args, tok, device)
    t_shape, s_shape = t_source.shape, s_source.shape
    vocab = s_shape.vocab_size
    optimizer = torch.optim.AdamW(_param_groups(student, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.lr_tmax or args.steps,
                                                           eta_min=args.lr_min)
    start = _resume(args, candidates, check, student, optimizer, scheduler)
    is_main = dist.get_rank() == 0
    if is_main:
        print(f"[dpkd.megatron] world={dist.get_world_size()} tp={args.tp} "
              f"dp={parallel_state.get_data_parallel_world_size()} mode={args.mode} objective={args.objective} "
              f"teacher={t_source.family.name}:{t_shape.parameters / 1e6:.2f}M "
              f"student={s_source.family.name}:{s_shape.parameters / 1e6:.2f}M params "
              f"vocab={vocab} start_step={start}", flush=True)
    if start == args.steps:
        _say(f"--steps {args.steps}: the checkpoint is there already; nothing to train")
        return []
    history = []
    for step in range(start, args.steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        rows = _rows(args, step, len(pairs))
        metrics = train_step(args, step, rows, pairs, pt_pairs, student, teacher, tok, vocab, device)
        _sum_grads_over_dp(student)
        metrics["grad_norm"] = clip_grad_norm(student, args.clip_grad)
        optimizer.step()
        scheduler.step()
        record = {"step": step + 1, **{k: float(v) for k, v in metrics.items()},
                  "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - t0}
        history.append(record)
        if is_main and ((step + 1) % args.log_interval == 0 or step + 1 == args.steps):
            print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}),
                  flush=True)
            if args.metrics_file:
                with open(args.metrics_file, "a") as f:
                    f.write(json.dumps(record) + "\n")
        if args.save_dir and args.save_interval and (step + 1) % args.save_interval == 0:
            _save(args, step + 1, student, optimizer, scheduler, s_source, config)
    if args.save_dir and (not args.save_interval or args.steps % args.save_interval):
        _save(args, args.steps, student, optimizer, scheduler, s_source, config)
    if not all(math.isfinite(r["loss"]) for r in history):
        raise SystemExit("non-finite loss")
    return history


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("DPKD_NUM_THREADS", "1")) if args.cpu else torch.get_num_threads())
    run(args)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
