"""The Megatron driver's arguments checked up front, and the run config a checkpoint records.

``argument_errors`` is the one place that checks every flag of ``dpkd.integrations.megatron.distill``
before anything is loaded: ranges, the TP × DP layout against ``WORLD_SIZE`` (set by ``torchrun``), files
and folders (present, readable, writable), the models' architecture files (read without their weights:
vocabulary agreement, positions against the sequence lengths, OPT's heads divisible by TP). Every message starts
with the flag it is about.

A checkpoint records ``run_config(args)``: the fields that define the run (models and their fingerprints,
data, method, objective, seeds, batch, lengths) and the optimiser schedule. ``config_changes`` compares a
resumed run with it: a changed defining field is refused; a changed schedule field (``OVERRIDABLE``) is
accepted only when named in ``--override``; the layout and logging flags (``FREE``) may always change (a
checkpoint resumes at another TP × DP).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from ..identity import source_fingerprint
from . import models

__all__ = ["argument_errors", "layout_errors", "run_config", "config_changes", "OVERRIDABLE", "FREE",
           "max_positions_needed"]

# may change on resume when named in --override (the schedule is recomputed from them)
OVERRIDABLE = ("steps", "lr", "lr_min", "lr_tmax", "weight_decay", "clip_grad")
# never part of the run's identity: layout, device, logging, where things are written
FREE = ("tp", "dp", "cpu", "log_interval", "metrics_file", "save_dir", "save_interval", "resume", "override")

_AT_LEAST_1 = ("tp", "steps", "global_batch", "log_interval", "max_prompt", "num_examples", "vocab_multiple")
_AT_LEAST_0 = ("save_interval", "max_new_tokens")
_NON_NEGATIVE_FLOATS = ("weight_decay", "clip_grad", "lr_min")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def max_positions_needed(args: argparse.Namespace) -> int:
    """The longest sequence the driver feeds a model: a prompt + response (≤ --max-length) or a prompt +
    sampled continuation (sequence mode)."""
    return max(args.max_length, args.max_prompt + args.max_new_tokens)


def _writable_dir(path: Path) -> str | None:
    """None when files can be created in ``path`` (created if missing), else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".dpkd-write-probe-"):
            pass
    except OSError as e:
        return f"cannot write there ({e.strerror or e})"
    return None


def _range_errors(args: argparse.Namespace) -> list[str]:
    errors = [f"{_flag(n)} {getattr(args, n)}: must be at least 1" for n in _AT_LEAST_1 if getattr(args, n) < 1]
    errors += [f"{_flag(n)} {getattr(args, n)}: must be at least 0" for n in _AT_LEAST_0 if getattr(args, n) < 0]
    errors += [f"{_flag(n)} {getattr(args, n)}: must be a finite number ≥ 0" for n in _NON_NEGATIVE_FLOATS
               if not (math.isfinite(getattr(args, n)) and getattr(args, n) >= 0)]
    for name in ("dp", "lr_tmax"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            errors.append(f"{_flag(name)} {getattr(args, name)}: must be at least 1")
    if not (math.isfinite(args.lr) and args.lr > 0):
        errors.append(f"--lr {args.lr}: must be a finite number > 0")
    elif math.isfinite(args.lr_min) and args.lr_min > args.lr:
        errors.append(f"--lr-min {args.lr_min}: must not exceed --lr {args.lr} (the cosine would climb)")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        errors.append(f"--temperature {args.temperature}: must be a finite number > 0")
    if args.max_length <= args.max_prompt:
        errors.append(f"--max-length {args.max_length}: must exceed --max-prompt {args.max_prompt} "
                      "(a response needs at least one token)")
    if args.mode == "sequence" and args.max_new_tokens < 1:
        errors.append(f"--max-new-tokens {args.max_new_tokens}: sequence mode samples y_s, at least 1 token")
    if args.teacher_generate and args.mode != "sequence":
        errors.append("--teacher-generate: only in --mode sequence (token mode teacher-forces the dataset)")
    return errors


def layout_errors(args: argparse.Namespace, world: int | None) -> list[str]:
    """TP × DP against the world size and the global batch against DP (only --dp when ``world`` is None)."""
    errors = []
    if args.dp is not None and args.dp >= 1 and args.tp >= 1 and args.global_batch % args.dp:
        errors.append(f"--global-batch {args.global_batch}: not divisible by --dp {args.dp}")
    if world is None or args.tp < 1:
        return errors
    if world % args.tp:
        errors.append(f"--tp {args.tp}: does not divide the world size {world}")
    elif args.dp is not None and args.dp * args.tp != world:
        errors.append(f"--dp {args.dp}: --tp {args.tp} × --dp {args.dp} is not the world size {world}")
    elif args.global_batch >= 1 and args.global_batch % (world // args.tp):
        errors.append(f"--global-batch {args.global_batch}: not divisible by the data-parallel size "
                      f"{world // args.tp} (world {world} / --tp {args.tp})")
    return errors


def _model_errors(args: argparse.Namespace) -> list[str]:
    """Architecture checks from the models' config files (no weights read)."""
    errors, shapes = [], {}
    for name in ("teacher", "student"):
        value = getattr(args, name)
        if value in models.PRESETS:
            continue
        try:
            source = models.resolve(value)
            shapes[name] = source.shape
        except (OSError, ValueError, KeyError) as e:
            errors.append(f"--{name} {value}: {e}")
            continue
        need = max_positions_needed(args)
        if shapes[name].max_positions < need:
            errors.append(f"--{name} {value}: has {shapes[name].max_positions} positions, the run needs {need} "
                          f"(--max-length {args.max_length}, --max-prompt + --max-new-tokens "
                          f"{args.max_prompt + args.max_new_tokens}): lower them")
        # (Llama-family models pad their query groups to a multiple of TP; OPT's heads must divide)
        if source.family.name == "opt" and args.tp >= 1 and shapes[name].num_heads % args.tp:
            errors.append(f"--tp {args.tp}: does not divide --{name}'s {shapes[name].num_heads} attention heads")
    if len(shapes) == 2 and shapes["teacher"].vocab_size != shapes["student"].vocab_size:
        errors.append(f"--student {args.student}: vocabulary {shapes['student'].vocab_size} differs from "
                      f"--teacher's {shapes['teacher'].vocab_size}")
    return errors


def _path_errors(args: argparse.Namespace) -> list[str]:
    errors = []
    if args.data is not None and Path(args.data).suffix in (".jsonl", ".json", ".parquet") \
            and not Path(args.data).is_file():
        errors.append(f"--data {args.data}: no such file")
    if args.tokenizer is not None:
        folder = Path(args.tokenizer)
        if not folder.is_dir():
            errors.append(f"--tokenizer {args.tokenizer}: no such folder")
        elif not any((folder / f).is_file() for f in _TOKENIZER_FILES):
            errors.append(f"--tokenizer {args.tokenizer}: holds none of {', '.join(_TOKENIZER_FILES)}")
    if args.resume and args.save_dir is None:
        errors.append("--resume: needs --save-dir (where the checkpoints are)")
    if args.save_dir is not None and (problem := _writable_dir(Path(args.save_dir))):
        errors.append(f"--save-dir {args.save_dir}: {problem}")
    if args.metrics_file is not None:
        target = Path(args.metrics_file)
        if target.is_dir():
            errors.append(f"--metrics-file {args.metrics_file}: is a folder")
        elif problem := _writable_dir(target.parent):
            errors.append(f"--metrics-file {args.metrics_file}: {problem}")
    return errors


def _override_errors(args: argparse.Namespace) -> list[str]:
    return [f"--override {name}: not a field that may change on resume (those are {', '.join(OVERRIDABLE)}; "
            "a run with another one is a new run: use a new --save-dir)" for name in args.override
            if name not in OVERRIDABLE]


def argument_errors(args: argparse.Namespace, *, world: int | None = None) -> list[str]:
    """Every problem with the driver's arguments, each message starting with its flag (empty: all good).
    ``world`` defaults to ``$WORLD_SIZE`` (torchrun sets it); without it the layout is checked at start-up."""
    if world is None and os.environ.get("WORLD_SIZE", "").isdigit():
        world = int(os.environ["WORLD_SIZE"])
    errors = _range_errors(args) + layout_errors(args, world) + _override_errors(args)
    if errors:  # the checks below create folders and read files: only when the numbers are right
        return errors
    return _path_errors(args) + _model_errors(args)


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """What defines this run (recorded in every checkpoint): every flag but the ``FREE`` ones, with the
    teacher, student, tokenizer and data also as fingerprints of their files."""
    config = {k: v for k, v in sorted(vars(args).items()) if k not in FREE}
    for name in ("teacher", "student", "tokenizer", "data"):
        if getattr(args, name) is not None:
            config[f"{name}_fingerprint"] = source_fingerprint(getattr(args, name))
    return config


def config_changes(saved: dict[str, Any], current: dict[str, Any], overrides: list[str]
                   ) -> tuple[list[str], list[str]]:
    """(refused, accepted) differences between a checkpoint's run config and this run's, as messages."""
    refused, accepted = [], []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) == current.get(key) or key in FREE:
            continue
        flag = "--" + key.removesuffix("_fingerprint").replace("_", "-")
        what = (f"{flag}: its files changed since the checkpoint" if key.endswith("_fingerprint")
                else f"{flag}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}")
        (accepted if key in OVERRIDABLE and key in overrides else refused).append(what)
    return refused, accepted
