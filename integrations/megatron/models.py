"""The model families the driver and the converter know, where a model comes from, and how it is built.

A model is described by a Hugging Face style config dict (``model_type`` selects the family) and comes from
one of three places:

* a preset name (``tiny-teacher``, ``tiny-student``: OPT; ``tiny-llama-teacher``, ``tiny-llama-student``):
  random initialisation, vocabulary from the tokenizer;
* a Hugging Face folder (``config.json`` + safetensors/bin weights): converted on the fly, each rank
  reading the checkpoint one tensor at a time (``hf_weights``) and keeping its shard;
* a Megatron-Core distributed checkpoint written by ``dpkd.integrations.megatron.convert`` or by the driver
  (``dpkd_model.json`` beside the shards): each rank reads its shards only (``dist_checkpoint``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import dist_checkpoint, llama_convert, opt_convert
from .gpt_common import padded_vocab_size
from .hf_weights import HFWeights, read_hf_config
from .llama_model import LLAMA_MODEL_TYPES, LlamaShape, build_llama_gpt_model, llama_shape
from .opt_model import OPTShape, build_opt_gpt_model, opt_shape

__all__ = ["Family", "FAMILIES", "PRESETS", "MODEL_INFO", "ModelSource", "family_of", "resolve", "build",
           "save_model", "write_model_info", "load_model_weights"]

MODEL_INFO = "dpkd_model.json"  # beside a distributed checkpoint: the architecture and how it was sharded


@dataclass(frozen=True)
class Family:
    """One architecture family: its config reader, GPTModel builder and HF ↔ Megatron converters."""

    name: str
    shape: Callable[[Any], OPTShape | LlamaShape]
    build: Callable[..., torch.nn.Module]
    hf_to_megatron: Callable[..., dict[str, torch.Tensor]]
    megatron_to_hf: Callable[..., dict[str, torch.Tensor]]
    load_hf: Callable[..., None]


FAMILIES = {
    "opt": Family("opt", opt_shape, build_opt_gpt_model, opt_convert.hf_to_megatron, opt_convert.megatron_to_hf,
                  opt_convert.load_hf_state_dict),
    "llama": Family("llama", llama_shape, build_llama_gpt_model, llama_convert.hf_to_megatron,
                    llama_convert.megatron_to_hf, llama_convert.load_hf_state_dict),
}

# Random-init shapes for CPU runs; vocab_size and max_position_embeddings come from the run.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-teacher": dict(model_type="opt", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256),
    "tiny-student": dict(model_type="opt", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128),
    "tiny-llama-teacher": dict(model_type="llama", hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
                               num_key_value_heads=2, intermediate_size=256, tie_word_embeddings=False,
                               rope_theta=10000.0, rms_norm_eps=1e-5),
    "tiny-llama-student": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True,
                               rope_theta=10000.0, rms_norm_eps=1e-5),
}


def family_of(config: Mapping[str, Any] | Any) -> Family:
    model_type = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    if model_type == "opt":
        return FAMILIES["opt"]
    if model_type in LLAMA_MODEL_TYPES:
        return FAMILIES["llama"]
    raise ValueError(f"model_type {model_type!r} is not supported (opt, {', '.join(LLAMA_MODEL_TYPES)})")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from (kind: preset | hf | megatron), its config and, for checkpoints, its layout."""

    kind: str
    config: dict[str, Any]
    path: Path | None = None
    query_groups: int | None = None  # Llama: the (padded) group count a distributed checkpoint was written with
    vocab_multiple: int | None = None  # the vocabulary padding a distributed checkpoint was written with

    @property
    def family(self) -> Family:
        return family_of(self.config)

    @property
    def shape(self) -> OPTShape | LlamaShape:
        return self.family.shape(self.config)


def resolve(name: str, *, vocab_size: int | None = None, max_positions: int | None = None) -> ModelSource:
    """A preset name, a Hugging Face folder or a distributed checkpoint folder → its ``ModelSource``."""
    if name in PRESETS:
        if vocab_size is None or max_positions is None:
            raise ValueError(f"preset {name!r} needs vocab_size and max_positions")
        return ModelSource("preset", dict(PRESETS[name], vocab_size=vocab_size, max_position_embeddings=max_positions))
    path = Path(name)
    if (path / MODEL_INFO).is_file():
        info = json.loads((path / MODEL_INFO).read_text())
        return ModelSource("megatron", info["config"], path, info.get("query_groups"), info["vocab_multiple"])
    if (path / "config.json").is_file():
        return ModelSource("hf", read_hf_config(path), path)
    raise FileNotFoundError(f"{name!r} is neither a preset ({', '.join(PRESETS)}), a Hugging Face folder "
                            f"(config.json) nor a distributed checkpoint ({MODEL_INFO})")


def build(source: ModelSource, *, tp_size: int, tp_rank: int, bf16: bool = False, cpu: bool = True,
          vocab_multiple: int = 128, load_weights: bool = True) -> torch.nn.Module:
    """This rank's GPTModel for ``source``, with its weights loaded unless ``load_weights`` is False."""
    family, shape = source.family, source.shape
    if source.kind == "megatron" and source.vocab_multiple != vocab_multiple:
        raise ValueError(f"{source.path} was written with --vocab-multiple {source.vocab_multiple}, "
                         f"not {vocab_multiple}")
    kwargs: dict[str, Any] = dict(tp_size=tp_size, bf16=bf16, use_cpu_initialization=cpu,
                                  vocab_multiple=vocab_multiple)
    if family.name == "llama" and source.query_groups is not None:
        kwargs["query_groups"] = source.query_groups
    if load_weights and cpu and source.kind != "preset":
        model = _build_uninitialised(family, shape, kwargs)  # every parameter is about to be overwritten
    else:
        model = family.build(shape, **kwargs)
    if load_weights and source.kind == "hf":
        family.load_hf(model, HFWeights(source.path), shape, tp_rank=tp_rank, tp_size=tp_size,
                       vocab_multiple=vocab_multiple)
    elif load_weights and source.kind == "megatron":
        load_model_weights(model, source.path)
    return model


def _build_uninitialised(family: Family, shape: OPTShape | LlamaShape, kwargs: dict[str, Any]) -> torch.nn.Module:
    """The model built on the meta device and given uninitialised CPU storage (no random initialisation:
    seconds per model on a CPU). Only the non-persistent buffers (RoPE frequencies) are filled here."""
    with torch.device("meta"):
        model = family.build(shape, **kwargs)
    model.to_empty(device="cpu")
    if family.name == "llama":
        model.rotary_pos_emb.inv_freq = shape.rope.inv_freq(shape.head_dim)
    return model


def write_model_info(directory: str | Path, model: torch.nn.Module, config: Mapping[str, Any], *,
                     vocab_multiple: int) -> None:
    """Rank 0 writes ``dpkd_model.json`` (architecture config, vocabulary padding, query groups, dtype)."""
    from megatron.core import parallel_state

    want = padded_vocab_size(int(config["vocab_size"]), parallel_state.get_tensor_model_parallel_world_size(),
                             vocab_multiple)
    if model.vocab_size != want:
        raise ValueError(f"the model's padded vocabulary is {model.vocab_size}, not {want} "
                         f"(vocab_multiple={vocab_multiple}): it was built with another vocab_multiple")
    if torch.distributed.get_rank() == 0:
        groups = model.config.num_query_groups if family_of(config).name == "llama" else None
        info = {"config": dict(config), "vocab_multiple": vocab_multiple, "query_groups": groups,
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
        (Path(directory) / MODEL_INFO).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    torch.distributed.barrier()


def save_model(model: torch.nn.Module, directory: str | Path, config: Mapping[str, Any], *,
               vocab_multiple: int) -> None:
    """Write ``model`` (every TP rank calls this) as a distributed checkpoint with its ``dpkd_model.json``."""
    dist_checkpoint.save(dist_checkpoint.model_sharded_state_dict(model), directory)
    write_model_info(directory, model, config, vocab_multiple=vocab_multiple)


def load_model_weights(model: torch.nn.Module, directory: str | Path,
                       strategy: dist_checkpoint.SafeTorchDistLoadStrategy | None = None) -> None:
    """Fill this rank's ``model`` from a distributed checkpoint (reading only the chunks it needs)."""
    loaded = dist_checkpoint.load(dist_checkpoint.model_sharded_state_dict(model), directory, strategy)
    names = model.state_dict().keys()  # a training checkpoint's common state (step, scheduler) is not ours
    missing, _ = model.load_state_dict({k: v for k, v in loaded.items() if k in names}, strict=False)
    missing = [k for k in missing if not k.endswith("._extra_state")]
    if missing:
        raise KeyError(f"{directory}: the checkpoint lacks {missing}")
