"""The distributed engine under :class:`~.trainer.DistillTrainer`: ``accelerate`` (DDP, FSDP, DeepSpeed ZeRO).

One :class:`Engine` per trainer wraps an ``accelerate.Accelerator`` and gives the explicit loop the few
operations it needs:

* placement and wrapping — :meth:`Engine.prepare` (the student and its optimizer: DDP, FSDP or a DeepSpeed
  engine, as the launch configuration says), :meth:`Engine.prepare_teacher` (the frozen teacher: replicated
  under DDP; sharded under FSDP / ZeRO-3 when the configuration says so);
* one micro-batch — :meth:`Engine.forward` runs the whole micro-batch loss *inside* the wrapper's forward
  (the student is called several times per micro-batch: data, pair and PT batches; DDP / FSDP / DeepSpeed
  must see one forward per backward), :meth:`Engine.sync` disables the gradient all-reduce on every
  micro-batch but the last of a step, :meth:`Engine.backward` scales by the world size (the wrappers
  *average* gradients over ranks; the losses are already divided by the global normalisers, so the
  gradient we need is their *sum*);
* collectives for the global normalisers and metrics — :meth:`Engine.sum`, :meth:`Engine.gather`;
* :meth:`Engine.for_generation` — the full student for ``generate`` (DDP: the replicated module, no copy;
  FSDP: the shards gathered per call, ``summon_full_params``, one all-gather of the parameters — peak memory
  = one full copy on every rank for the duration of the generation; ZeRO-3: ``GatheredParameters`` over the
  whole model, the same cost).

Launch: ``torchrun --nproc_per_node N script.py`` or ``accelerate launch [--config_file cfg.yaml] script.py``.
On a machine without GPUs, ``accelerate launch --multi_gpu --num_processes N`` starts N processes through
accelerate's torchrun launcher and the engine trains on CPU over gloo; accelerate 1.15's
``accelerate launch --cpu --num_processes N`` starts *one* process (its multi-CPU launch needs mpirun), and
nothing in that process can tell. Mixed precision (``bf16`` / ``fp16``) is accelerate's autocast around
every micro-batch's forward.

accelerate runs FSDP and DeepSpeed only on accelerator devices: on a CPU machine it would silently train
with plain DDP (or, launched without ``--cpu``, as N unrelated single processes). Both are refused here
with a message instead (:func:`check_launch`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["Engine", "check_launch", "launch_world_size", "requested_engine", "is_main_process", "barrier",
           "main_process_first"]


def launch_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _state() -> Any:
    from accelerate import PartialState

    return PartialState(cpu=not _on_accelerator())


def is_main_process() -> bool:
    """Rank 0 of the launch (True without a launcher); for code outside the trainer (files, printing)."""
    return launch_world_size() == 1 or _state().is_main_process


def barrier() -> None:
    """Wait for every process of the launch (nothing without a launcher)."""
    if launch_world_size() > 1:
        _state().wait_for_everyone()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Run the block on the main process first, then on the others (build a cache once, read it after)."""
    if launch_world_size() == 1:
        yield
        return
    with _state().main_process_first():
        yield


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def requested_engine(config: Any) -> str:
    """``"deepspeed"``, ``"fsdp"`` or ``"ddp"``: what the config (``deepspeed``, ``fsdp``) or the launcher's
    accelerate config (``ACCELERATE_USE_DEEPSPEED`` / ``ACCELERATE_USE_FSDP``) asks for."""
    if getattr(config, "deepspeed", None) or _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if getattr(config, "fsdp", "") or _env_flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "ddp"


def _on_accelerator() -> bool:
    return torch.cuda.is_available() and not _env_flag("ACCELERATE_USE_CPU")


def check_launch(config: Any, *, who: str = "DistillTrainer") -> str:
    """The engine to build, or a ValueError naming the argument when this machine cannot run it (``config``:
    a ``DistillConfig``, or None where only the launcher's accelerate config applies, e.g. ``dpkd distill``)."""
    engine = requested_engine(config)
    if engine == "ddp":
        return engine
    if getattr(config, engine, None):
        what = f"`{engine}`"
    else:
        what = f"the accelerate launch config (ACCELERATE_USE_{engine.upper()})"
    if engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ValueError(f"{who}: {what} asks for DeepSpeed, which is not installed: pip install deepspeed")
    if not _on_accelerator():
        raise ValueError(
            f"{who}: {what} asks for {engine.upper()}, but this run is on CPU: accelerate runs FSDP and DeepSpeed "
            f"only on accelerator devices and would silently fall back to DDP here. On CPU use DDP (torchrun "
            f"--nproc_per_node N, or accelerate launch --multi_gpu --num_processes N on a machine without GPUs); "
            f"run {engine.upper()} on GPUs.")
    return engine


def _load_json(value: Any, name: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return dict(value)
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"DistillTrainer: `{name}` must be a dict or a JSON file, got {value!r}")
    return json.loads(path.read_text())


def _plugins(config: Any, engine: str) -> dict[str, Any]:
    if engine == "deepspeed" and getattr(config, "deepspeed", None):
        from accelerate.utils import DeepSpeedPlugin

        return {"deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=_load_json(config.deepspeed, "deepspeed"))}
    if engine == "fsdp" and getattr(config, "fsdp", ""):
        from accelerate.utils import FullyShardedDataParallelPlugin

        options = _load_json(config.fsdp_config, "fsdp_config") if config.fsdp_config else {}
        options.setdefault("fsdp_version", 2)
        return {"fsdp_plugin": FullyShardedDataParallelPlugin(**options)}
    return {}  # DDP, or the engine configured by `accelerate launch --config_file` (read from the environment)


class Engine:
    """The accelerate side of one trainer (module docstring). ``config``: a ``DistillConfig``."""

    def __init__(self, config: Any) -> None:
        from accelerate import Accelerator

        self.kind = check_launch(config)
        precision = "bf16" if config.bf16 else "fp16" if config.fp16 else "no"
        # DeepSpeed's engine steps the optimizer inside every backward and applies it only at its own
        # gradient-accumulation boundary, dividing each loss by that count: it must know the loop's count
        # (and the loss is multiplied back, see backward); DDP / FSDP accumulate under no_sync instead
        self.accumulation = config.gradient_accumulation_steps if self.kind == "deepspeed" else 1
        self.accelerator = Accelerator(cpu=not _on_accelerator(), mixed_precision=precision,
                                       gradient_accumulation_steps=self.accumulation, **_plugins(config, self.kind))
        if self.kind == "deepspeed":  # no dataloader goes through prepare: the micro-batch size is ours
            ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
            if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
                ds["train_micro_batch_size_per_gpu"] = config.per_device_train_batch_size
            ds.pop("train_batch_size", None)
        if self.accelerator.num_processes != launch_world_size():
            raise RuntimeError(
                f"DistillTrainer: the launcher started {launch_world_size()} processes but accelerate sees "
                f"{self.accelerator.num_processes}; every process would train alone. On CPU launch with "
                f"torchrun or `accelerate launch --multi_gpu` (gloo on a machine without GPUs).")
        self.model: Any = None  # the wrapped student, after prepare

    # ------------------------------------------------------------------------------------------ world
    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def sharded(self) -> bool:
        """FSDP or DeepSpeed: parameters (and optimizer state) are split over ranks."""
        return self.kind in ("fsdp", "deepspeed")

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------------------------------ models
    def prepare(self, student: Any, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        """The wrapped student and its optimizer (placed, wrapped and sharded as the launch config says)."""
        self.model, optimizer = self.accelerator.prepare(student, optimizer)
        return self.model, optimizer

    def prepare_teacher(self, teacher: Any) -> Any:
        """The frozen teacher on this rank: moved to the device (DDP: one replica per rank); under FSDP / ZeRO-3
        wrapped for evaluation so that it is sharded like the student. Returns the module to call."""
        if teacher is None:
            return None
        if self.kind == "deepspeed" and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            import deepspeed

            cfg = dict(self.accelerator.state.deepspeed_plugin.deepspeed_config)
            cfg.pop("optimizer", None)
            cfg.pop("scheduler", None)
            engine, *_ = deepspeed.initialize(model=teacher, config=cfg)
            engine.eval()
            return engine.module
        # evaluation mode: placed (FSDP: sharded), never DDP-wrapped; under bf16 / fp16 its forward runs in
        # autocast with float32 outputs, as the prepared student's does (the losses need one dtype)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def unwrap(self, model: Any = None) -> Any:
        return self.accelerator.unwrap_model(model if model is not None else self.model)

    def forward(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``fn()`` (a micro-batch's loss, calling the student any number of times) run inside the wrapper's
        forward, so DDP / FSDP / DeepSpeed see one forward for the coming backward; under autocast."""
        wrapper, inner = self.model, self.unwrap()
        with self.accelerator.autocast():
            if wrapper is inner:
                return fn()
            original = inner.forward

            def redirected(*_args: Any, **_kwargs: Any) -> torch.Tensor:
                inner.forward = original  # fn calls the real forward
                return fn()

            inner.forward = redirected
            try:
                return wrapper()
            finally:
                inner.forward = original

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradient all-reduce only on the last micro-batch of a step."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)

    def backward(self, loss: torch.Tensor) -> None:
        # the wrappers average over ranks (and DeepSpeed divides by its accumulation count); each rank's loss
        # is already its share of the global sum
        scale = self.world * self.accumulation
        self.accelerator.backward(loss * scale if scale > 1 else loss)

    def clip_grad_norm(self, parameters: Sequence[torch.Tensor], max_norm: float) -> float:
        """The global gradient norm before clipping (DeepSpeed clips inside its step, with ``gradient_clipping``
        from its config, and reports the norm it saw; NaN before its first step)."""
        norm = self.accelerator.clip_grad_norm_(parameters, max_norm)
        return float("nan") if norm is None else float(norm)

    @contextlib.contextmanager
    def for_generation(self) -> Iterator[Any]:
        """The full student for ``generate`` (module docstring for the cost under FSDP / ZeRO-3)."""
        inner = self.unwrap()
        if self.kind == "fsdp" and self.world > 1:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            if isinstance(self.model, FSDP):
                with FSDP.summon_full_params(self.model, writeback=False, recurse=False):
                    yield inner
                return
            self.model.unshard()  # FSDP2: all-gather every parameter once for the whole generation
            try:
                yield inner
            finally:
                self.model.reshard()
            return
        if self.kind == "deepspeed" and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(inner.parameters()), modifier_rank=None):
                yield inner
            return
        yield inner

    # ------------------------------------------------------------------------------------------ checkpoints
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The student's full weights, gathered from the shards (a collective; complete on the main process)."""
        return self.accelerator.get_state_dict(self.model)

    def save_sharded_state(self, folder: Path) -> None:
        """FSDP / DeepSpeed: accelerate's own sharded checkpoint of model and optimizer (every rank writes)."""
        self.accelerator.save_state(str(folder), safe_serialization=True)

    def load_sharded_state(self, folder: Path) -> None:
        self.accelerator.load_state(str(folder))

    # ------------------------------------------------------------------------------------------ collectives
    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks (float64, so counts up to 2^53 stay exact)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        return self.accelerator.reduce(t, reduction="sum").tolist()

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenation over ranks along dim 0 (every rank holds the same number of rows)."""
        if self.world == 1:
            return t
        return self.accelerator.gather(t.to(self.device)).cpu()
