"""Atomic, pickle-free training checkpoints, written by one process or by every rank of a distributed run.

A checkpoint is a folder ``checkpoint-<step>/`` holding

* ``model.safetensors`` + ``config.json`` — the student (``save_pretrained`` format, loadable with
  ``from_pretrained``); written by the main process (under FSDP / ZeRO-3 from the gathered full state dict);
* ``optimizer.safetensors`` — every optimizer state tensor, named ``state.<param index>.<key>``;
  the param groups (hyper-parameters) as JSON in the file's metadata (main process; DDP replicates it).
  Under FSDP / DeepSpeed the optimizer is sharded: ``engine/`` holds accelerate's ``save_state`` folder
  instead (that format pickles the optimizer state; accelerate loads it itself);
* ``rng-rank<r>.safetensors`` — every rank's torch generator states, with its Python and NumPy RNG states
  as JSON metadata; ``trainer_state.json`` — step, log history, the global batch size and world size.

Written into ``.checkpoint-<step>.tmp`` first: every rank writes its files, then waits for all the others
(a barrier); only after every rank has finished does the main process fsync every file, rename the folder
into place (an atomic ``rename`` on POSIX) and fsync the parent. A crash (even SIGKILL of any one rank)
leaves either the complete checkpoint or none; leftover ``.tmp`` folders are ignored and cleaned. Written
last, ``dpkd_checkpoint.json`` records every file's size and CRC-32 (``dpkd.integrations.durable_files``, the
Megatron driver's manifest too): :func:`intact_checkpoints` lists the checkpoints that verify, naming the
damaged file of each one it skips, and a resumed ``DistillTrainer`` loads the newest of them. Loading
reads only safetensors and JSON. A checkpoint resumes at any world size: a rank without its own RNG file
takes rank 0's (the trainer's sampling does not depend on these states; see ``sampling.py``).
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
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file, save_model

from ..durable_files import CheckpointError, fsync_tree, publish_folder, unique_suffix, verify_manifest, write_manifest

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "intact_checkpoints",
           "verify_checkpoint", "load_model_weights", "save_model_folder", "fsync_tree", "MANIFEST"]

_CKPT = re.compile(r"^checkpoint-(\d+)$")
#: written last into every checkpoint: each file's size and CRC-32 (``durable_files.write_manifest``)
MANIFEST = "dpkd_checkpoint.json"


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


def _rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng-rank{rank}.safetensors"


def _write_rng(folder: Path, rank: int) -> None:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    py_version, py_state, py_gauss = random.getstate()
    meta = {"python": json.dumps({"version": py_version, "state": list(py_state), "gauss": py_gauss}),
            "numpy": json.dumps(_numpy_state())}
    save_file(tensors, _rng_file(folder, rank), metadata=meta)


class _Solo:
    """The engine of a single-process run (what ``engine=None`` means)."""

    rank, world, is_main, sharded = 0, 1, True, False

    def barrier(self) -> None:
        pass


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: Any,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    total_limit: int | None = None,
    engine: Any = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically (module docstring); keep the newest ``total_limit``. Every rank
    of a distributed run calls it with its :class:`~.distributed.Engine`."""
    eng = engine or _Solo()
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    eng.barrier()  # every rank has finished the step
    if eng.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    eng.barrier()
    full = eng.full_state_dict() if eng.sharded else None  # collective: every rank takes part
    if eng.sharded:
        eng.save_sharded_state(tmp / "engine")
    try:
        _write_rng(tmp, eng.rank)
        if eng.is_main:
            save_model_folder(model, tmp, state_dict=full)
            if not eng.sharded:
                opt_tensors, groups = _optimizer_tensors(optimizer)
                save_file(opt_tensors, tmp / "optimizer.safetensors", metadata={"param_groups": groups})
            (tmp / "trainer_state.json").write_text(json.dumps({**state, "global_step": step}, indent=1))
    except (OSError, SafetensorError) as e:  # a full disk, most likely: say which checkpoint, and what is safe
        raise CheckpointError(f"checkpoint {final} could not be written ({e}); it was not published and the "
                              f"earlier checkpoints in {output_dir} are intact") from e
    eng.barrier()  # every rank has written its part: only now may the checkpoint count
    if eng.is_main:
        missing = [r for r in range(eng.world) if not _rng_file(tmp, r).is_file()]
        if missing:
            raise RuntimeError(f"checkpoint {final}: ranks {missing} wrote no state; not published")
        write_manifest(tmp, MANIFEST, step=step)  # last: a folder with a manifest that verifies is whole
        publish_folder(tmp, final)  # re-saving the same step (resume) replaces the old copy
        if total_limit is not None and total_limit > 0:
            for old in _checkpoints(output_dir)[:-total_limit]:  # hidden first: a kill never leaves half of one
                hidden = old.with_name(f".{old.name}.old-{unique_suffix()}")
                os.replace(old, hidden)
                shutil.rmtree(hidden)
        for pattern in (".checkpoint-*.old-*", ".checkpoint-*.stale-*", ".checkpoint-*.tmp"):
            for leftover in output_dir.glob(pattern):  # of saves killed (the folder is locked: none is live)
                shutil.rmtree(leftover, ignore_errors=True)
    eng.barrier()  # nobody reads or prunes before the rename
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


def verify_checkpoint(folder: str | Path) -> str | None:
    """None when ``folder`` is an intact checkpoint, else what is wrong, naming the file: every file its
    manifest lists must have the recorded size and CRC-32 (a folder written before manifests existed
    needs its state files present)."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if not (folder / MANIFEST).is_file():
        needed = ["trainer_state.json"] + ([] if (folder / "engine").is_dir() else
                                           ["model.safetensors", "optimizer.safetensors"])
        missing = [name for name in needed if not (folder / name).is_file()]
        return f"{folder / missing[0]} is missing" if missing else None
    return verify_manifest(folder, MANIFEST)[1]


def intact_checkpoints(output_dir: str | Path) -> tuple[list[Path], list[str]]:
    """The checkpoints of ``output_dir`` that verify (:func:`verify_checkpoint`), newest first, and a note
    naming the damaged file of each one skipped."""
    output_dir = Path(output_dir)
    intact, notes = [], []
    for folder in reversed(_checkpoints(output_dir) if output_dir.is_dir() else []):
        problem = verify_checkpoint(folder)
        if problem is None:
            intact.append(folder)
        else:
            notes.append(f"skipping {folder}: {problem}")
    return intact, notes


def save_model_folder(model: Any, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """``config.json`` + ``model.safetensors`` (the ``save_pretrained`` layout; tied weights stored once).
    ``state_dict``: the gathered full weights of a sharded model (else ``model``'s own)."""
    folder = Path(folder)
    model.config.save_pretrained(folder)
    if state_dict is None:
        save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)


def load_model_weights(model: Any, folder: str | Path) -> None:
    """Load ``model.safetensors`` into ``model`` in place (strict; tied weights handled by safetensors)."""
    load_model(model, str(Path(folder) / "model.safetensors"), strict=True)


def _restore_rng(folder: Path, rank: int) -> None:
    from safetensors import safe_open

    path = _rng_file(folder, rank) if _rng_file(folder, rank).is_file() else _rng_file(folder, 0)
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no rng-rank<r>.safetensors (a checkpoint of an older dpkd?)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        torch.set_rng_state(f.get_tensor("torch_cpu"))
        cuda = sorted(k for k in f.keys() if k.startswith("cuda"))  # noqa: SIM118 (safe_open has no __iter__)
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([f.get_tensor(k) for k in cuda])
    py = json.loads(meta["python"])
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = json.loads(meta["numpy"])
    np_state = (npst["name"], np.array(npst["keys"], dtype=np.uint32), npst["pos"], npst["has_gauss"], npst["cached"])
    np.random.set_state(np_state)  # noqa: NPY002


def _load_optimizer(folder: Path, optimizer: torch.optim.Optimizer) -> None:
    from safetensors import safe_open

    with safe_open(str(folder / "optimizer.safetensors"), framework="pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            _, idx, key = name.split(".", 2)
            opt_state.setdefault(int(idx), {})[key] = f.get_tensor(name)
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})


def load_checkpoint(folder: str | Path, model: Any, optimizer: torch.optim.Optimizer, *, engine: Any = None
                    ) -> dict[str, Any]:
    """Restore model weights, optimizer state and this rank's RNGs from ``folder``; return the trainer state."""
    eng = engine or _Solo()
    folder = Path(folder)
    if (folder / "engine").is_dir():
        if not eng.sharded:
            raise ValueError(f"{folder} holds a sharded (FSDP / DeepSpeed) optimizer state; resume it under the "
                             f"same engine")
        eng.load_sharded_state(folder / "engine")
    else:
        load_model_weights(model, folder)
        _load_optimizer(folder, optimizer)
    _restore_rng(folder, eng.rank)
    return json.loads((folder / "trainer_state.json").read_text())
