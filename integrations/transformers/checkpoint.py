"""Atomic, pickle-free training checkpoints.

A checkpoint is a folder ``checkpoint-<step>/`` holding

* ``model.safetensors`` + ``config.json`` — the student (``save_pretrained`` format, loadable with
  ``from_pretrained``);
* ``optimizer.safetensors`` — every optimizer state tensor, named ``state.<param index>.<key>``;
  the param groups (hyper-parameters) as JSON in the file's metadata;
* ``rng.safetensors`` — torch's CPU generator state; ``trainer_state.json`` — step, Python/NumPy RNG
  states, log history.

Written into ``.checkpoint-<step>.tmp`` first, every file fsynced, then renamed into place (an atomic
``rename`` on POSIX) and the parent folder fsynced: a crash (even SIGKILL) leaves either the complete
checkpoint or none; leftover ``.tmp`` folders are ignored and cleaned. Loading reads only safetensors and
JSON — nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "load_model_weights", "save_model_folder",
           "fsync_tree"]

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def fsync_tree(folder: Path) -> None:
    """fsync every file in ``folder`` (recursively) and the folder itself."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{idx}.{key}"] = t.detach().clone().contiguous()
    return tensors, json.dumps(sd["param_groups"])


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (the legacy global state is what user code seeds)
    return {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached": float(cached)}


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: Any,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    total_limit: int | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically (see module docstring); keep the newest ``total_limit``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model_folder(model, tmp)
    opt_tensors, groups = _optimizer_tensors(optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors", metadata={"param_groups": groups})
    save_file({"torch_cpu": torch.get_rng_state()}, tmp / "rng.safetensors")
    py_version, py_state, py_gauss = random.getstate()
    full_state = {
        **state,
        "global_step": step,
        "python_rng": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy_rng": _numpy_state(),
    }
    (tmp / "trainer_state.json").write_text(json.dumps(full_state, indent=1))
    fsync_tree(tmp)
    if final.exists():  # re-saving the same step (resume): replace the old copy
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(output_dir)
    if total_limit is not None and total_limit > 0:
        for old in _checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old)
    return final


def _checkpoints(output_dir: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CKPT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``output_dir`` (``.tmp`` leftovers of a crash are ignored)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = _checkpoints(output_dir)
    return found[-1] if found else None


def save_model_folder(model: Any, folder: str | Path) -> None:
    """``config.json`` + ``model.safetensors`` (the ``save_pretrained`` layout; tied weights stored once)."""
    folder = Path(folder)
    model.config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})


def load_model_weights(model: Any, folder: str | Path) -> None:
    """Load ``model.safetensors`` into ``model`` in place (strict; tied weights handled by safetensors)."""
    load_model(model, str(Path(folder) / "model.safetensors"), strict=True)


def load_checkpoint(folder: str | Path, model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model weights, optimizer state and every RNG from ``folder``; return the trainer state."""
    folder = Path(folder)
    load_model_weights(model, folder)
    from safetensors import safe_open

    with safe_open(str(folder / "optimizer.safetensors"), framework="pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            _, idx, key = name.split(".", 2)
            opt_state.setdefault(int(idx), {})[key] = f.get_tensor(name)
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["torch_cpu"])
    state = json.loads((folder / "trainer_state.json").read_text())
    py = state["python_rng"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy_rng"]
    np_state = (npst["name"], np.array(npst["keys"], dtype=np.uint32), npst["pos"], npst["has_gauss"], npst["cached"])
    np.random.set_state(np_state)  # noqa: NPY002
    return state
