"""Training state (student weights, AdamW moments, LR schedule, step) as one Megatron-Core distributed checkpoint.

Layout of ``save_dir/step_XXXXXXX/`` (``dist_checkpoint``'s format): the student's tensors under their
GPTModel sharded keys, each AdamW moment as a tensor sharded exactly like its parameter
(``optimizer.state.exp_avg.<key>``, ``optimizer.state.exp_avg_sq.<key>``: Megatron-Core's
``optim_state_to_sharding_state``), and in ``common.pt`` the parameter groups' hyper-parameters, the
scheduler's state, the step and AdamW's step count. ``dpkd_model.json`` sits beside it, so a step folder is
also a model checkpoint (``--student`` / ``--teacher`` / ``convert --to-hf`` read it).

Because every tensor is stored globally, a run saved at one TP × DP layout resumes at another (tested: TP=2
→ TP=1 × DP=2), as long as the vocabulary padding and the query groups divide the new TP size.
"""

from __future__ import annotations

import shutil
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    optim_state_to_sharding_state,
)

from . import dist_checkpoint
from .models import write_model_info

__all__ = ["save_training_state", "load_training_state", "latest_step", "step_dir"]


def step_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f"step_{step:07d}"


def latest_step(save_dir: str | Path) -> int | None:
    """The step recorded in ``save_dir/latest`` (written after a checkpoint is complete), or None."""
    latest = Path(save_dir) / "latest"
    return int(latest.read_text()) if latest.is_file() else None


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
                        config: dict[str, Any], vocab_multiple: int) -> Path:
    """Write ``save_dir/step_XXXXXXX`` (every rank calls this) and then ``save_dir/latest``."""
    path = step_dir(save_dir, step)
    if torch.distributed.get_rank() == 0 and path.exists():
        shutil.rmtree(path)  # a step written before (another layout may have left other ranks' files)
    torch.distributed.barrier()
    dist_checkpoint.save(_sharded_training_state(student, optimizer, scheduler, step), path)
    write_model_info(path, student, config, vocab_multiple=vocab_multiple)
    if torch.distributed.get_rank() == 0:
        (Path(save_dir) / "latest").write_text(str(step))
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
