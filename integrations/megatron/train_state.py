"""Training state (student weights, AdamW moments, LR schedule, step) as one Megatron-Core distributed checkpoint.

Layout of ``save_dir/step_XXXXXXX/`` (``dist_checkpoint``'s format): the student's tensors under their
GPTModel sharded keys, each AdamW moment as a tensor sharded exactly like its parameter
(``optimizer.state.exp_avg.<key>``, ``optimizer.state.exp_avg_sq.<key>``: Megatron-Core's
``optim_state_to_sharding_state``), and in ``common.pt`` the parameter groups' hyper-parameters, the
scheduler's state, the step and AdamW's step count. ``dpkd_model.json`` sits beside it, so a step folder is
also a model checkpoint (``--student`` / ``--teacher`` / ``convert --to-hf`` read it).

Because every tensor is stored globally, a run saved at one TP × DP layout resumes at another (tested: TP=2
→ TP=1 × DP=2), as long as the vocabulary padding and the query groups divide the new TP size.

Nothing lost, nothing mixed up:

* a step is written into a uniquely named ``.step_XXXXXXX.partial-*`` folder and renamed into place only
  when complete, so a kill mid-save leaves the previous checkpoint as it was;
* ``dpkd_checkpoint.json`` (written last) records the step, every file's size and CRC-32, and the run
  config that produced the checkpoint (``run_config``: the driver refuses to resume under another one);
* ``save_dir/latest`` is written atomically (temporary file, fsync, rename);
* :func:`intact_checkpoints` lists the checkpoints that verify, newest first (the marker's step first),
  with a note for everything it skipped — an empty or garbled marker, a missing, truncated or altered file
  — and :func:`resume_training_state` falls back to the next one when a load fails, saying so.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    optim_state_to_sharding_state,
)

from ..durable_files import (
    CheckpointError,
    atomic_write_text,
    fsync_path,
    unique_suffix,
    verify_manifest,
    write_manifest,
)
from . import dist_checkpoint
from .models import write_model_info

__all__ = ["save_training_state", "load_training_state", "resume_training_state", "intact_checkpoints",
           "verify_checkpoint", "remove_leftovers", "latest_step", "step_dir", "write_latest", "CheckpointError",
           "MANIFEST", "MARKER"]

MANIFEST = "dpkd_checkpoint.json"
MARKER = "latest"
_STEP_DIR = re.compile(r"step_(\d{7,})")


def step_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f"step_{step:07d}"


def write_latest(save_dir: str | Path, step: int) -> None:
    """Point ``save_dir/latest`` at ``step`` atomically (a reader sees the old or the new step, never a part)."""
    atomic_write_text(Path(save_dir) / MARKER, str(step))


def latest_step(save_dir: str | Path) -> int | None:
    """The step recorded in ``save_dir/latest`` (written after a checkpoint is complete), or None when there
    is no marker. Raises :class:`CheckpointError` naming the file when it does not hold a step number."""
    latest = Path(save_dir) / MARKER
    if not latest.is_file():
        return None
    text = latest.read_bytes()
    try:
        return int(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{latest} does not hold a step number (it holds {text[:40]!r})") from None


def _write_manifest(folder: Path, step: int, run_config: dict[str, Any] | None) -> None:
    write_manifest(folder, MANIFEST, step=step, run_config=run_config)


def verify_checkpoint(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) when ``folder`` is intact, else (None, what is wrong: the file named). A folder
    written before manifests existed passes with the manifest ``{}`` when its format files are present."""
    if not (folder / MANIFEST).is_file():
        missing = [n for n in (".metadata", dist_checkpoint.COMMON_FILE, "metadata.json") if not (folder / n).is_file()]
        return (None, f"{folder / missing[0]} is missing") if missing else ({}, None)
    return verify_manifest(folder, MANIFEST)


def _on_rank0(fn: Callable[[], Any]) -> Any:
    """``fn()`` on global rank 0, its result (or its exception's message, re-raised) on every rank."""
    box: list[Any] = [None]
    if torch.distributed.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            box[0] = ("error", f"{type(e).__name__}: {e}")
    torch.distributed.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise CheckpointError(value)
    return value


def _intact_checkpoints(save_dir: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    notes: list[str] = []
    steps = sorted((int(m.group(1)) for p in save_dir.glob("step_*") if (m := _STEP_DIR.fullmatch(p.name))),
                   reverse=True)
    try:
        marked = latest_step(save_dir)
    except CheckpointError as e:
        marked = None
        notes.append(f"{e}; using the newest intact checkpoint instead")
    if marked is not None and marked not in steps:
        notes.append(f"{save_dir / MARKER} names step {marked}, but {step_dir(save_dir, marked)} does not exist")
    elif marked is not None:
        steps.remove(marked)
        steps.insert(0, marked)
    elif steps and not notes:
        notes.append(f"{save_dir / MARKER} is missing; using the newest intact checkpoint")
    intact = []
    for step in steps:
        manifest, problem = verify_checkpoint(step_dir(save_dir, step))
        if problem is None:
            intact.append((step, manifest))
        else:
            notes.append(f"skipping step {step}: {problem}")
    return intact, notes


def remove_leftovers(save_dir: str | Path) -> list[Path]:
    """Remove the partial and replaced step folders a killed save left behind (call it holding the save
    dir's lock: no other run is writing there); returns what was removed."""
    leftovers = sorted(p for p in Path(save_dir).glob(".step_*") if ".partial-" in p.name or ".old-" in p.name)
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def intact_checkpoints(save_dir: str | Path) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """The checkpoints of ``save_dir`` that verify, as (step, manifest), the ``latest`` marker's first and
    then newest first, and a note for each thing skipped. Every rank calls this; rank 0 reads the files."""
    return _on_rank0(lambda: _intact_checkpoints(Path(save_dir)))


def _ensure_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Zero AdamW moments for parameters that have none yet (a fresh optimizer, before loading into it)."""
    if not isinstance(optimizer, torch.optim.AdamW) or any(g.get("amsgrad") for g in optimizer.param_groups):
        raise TypeError("training-state checkpoints support torch.optim.AdamW without amsgrad")
    for p in chain.from_iterable(g["params"] for g in optimizer.param_groups):
        if p not in optimizer.state:
            optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                  "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                  "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def _sharded_training_state(student, optimizer, scheduler, step: int) -> dict[str, Any]:
    _ensure_adam_state(optimizer)
    model_state = dist_checkpoint.model_sharded_state_dict(student)
    optim_state = optimizer.state_dict()
    adam_steps = {float(s["step"]) for s in optim_state["state"].values()}
    if len(adam_steps) != 1:
        raise ValueError(f"AdamW step counts differ between parameters: {sorted(adam_steps)}")
    params = chain.from_iterable(g["params"] for g in optimizer.param_groups)
    optim_state_to_sharding_state(optim_state, get_param_id_to_sharded_param_map(model_state, params),
                                  exclude_keys=("step",))
    return {"model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(), "step": step,
            "adam_step": adam_steps.pop()}


def save_training_state(save_dir: str | Path, step: int, student, optimizer, scheduler, *,
                        config: dict[str, Any], vocab_multiple: int,
                        run_config: dict[str, Any] | None = None) -> Path:
    """Write ``save_dir/step_XXXXXXX`` (every rank calls this), its manifest, and then ``save_dir/latest``.

    The step is written into a fresh temporary folder and renamed into place once complete: a step folder
    written before (perhaps at another layout, with other ranks' files) is replaced whole, and a kill at any
    moment leaves either the old checkpoint or the new one."""
    path = step_dir(save_dir, step)
    rank0 = torch.distributed.get_rank() == 0
    token = [unique_suffix() if rank0 else None]
    torch.distributed.broadcast_object_list(token, src=0)
    partial = Path(save_dir) / f".{path.name}.partial-{token[0]}"
    dist_checkpoint.save(_sharded_training_state(student, optimizer, scheduler, step), partial)
    write_model_info(partial, student, config, vocab_multiple=vocab_multiple)
    if rank0:
        _write_manifest(partial, step, run_config)
        old = Path(save_dir) / f".{path.name}.old-{token[0]}"
        if path.exists():
            path.rename(old)
        partial.rename(path)
        fsync_path(Path(save_dir))
        shutil.rmtree(old, ignore_errors=True)
        write_latest(save_dir, step)
    torch.distributed.barrier()
    return path


def load_training_state(save_dir: str | Path, step: int, student, optimizer, scheduler) -> int:
    """Restore student, optimizer and scheduler from ``save_dir/step_XXXXXXX``; returns the step."""
    loaded = dist_checkpoint.load(_sharded_training_state(student, optimizer, scheduler, 0), step_dir(save_dir, step))
    missing, unexpected = student.load_state_dict(loaded["model"], strict=False)
    if [k for k in missing if not k.endswith("._extra_state")] or unexpected:
        raise KeyError(f"student checkpoint mismatch: missing {missing}, unexpected {unexpected}")
    optim_state = loaded["optimizer"]
    for state in optim_state["state"].values():
        state["step"] = torch.tensor(float(loaded["adam_step"]), dtype=torch.float32)
    optimizer.load_state_dict(optim_state)
    scheduler.load_state_dict(loaded["scheduler"])
    return int(loaded["step"])


def resume_training_state(save_dir: str | Path, candidates: list[tuple[int, dict[str, Any]]], student, optimizer,
                          scheduler, *, check: Callable[[int, dict[str, Any]], None] | None = None,
                          log: Callable[[str], None] = print) -> tuple[int, dict[str, Any]] | None:
    """Load the first of ``candidates`` (from :func:`intact_checkpoints`) that loads, after ``check(step,
    manifest)`` accepts it; a failed load is reported through ``log`` naming the folder, and the next older
    candidate is tried. Returns (step, manifest), or None when none loads."""
    for step, manifest in candidates:
        if check is not None:
            check(step, manifest)
        try:
            return load_training_state(save_dir, step, student, optimizer, scheduler), manifest
        except Exception as e:  # noqa: BLE001 - any failure to read this folder: fall back to the previous one
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            log(f"{step_dir(save_dir, step)} could not be loaded ({type(e).__name__}: {first[:300]}); "
                "falling back to the previous checkpoint")
    return None
