"""Convert a Hugging Face checkpoint into a Megatron-Core distributed checkpoint once, or back.

    torchrun --nproc_per_node=T -m dpkd.integrations.megatron.convert --hf HF_DIR --out CKPT_DIR [--cpu] [--bf16]
    python -m dpkd.integrations.megatron.convert --to-hf --megatron CKPT_DIR --out HF_DIR

To Megatron: T processes form a TP = T group; each reads the Hugging Face files one tensor at a time, keeps
its shard and writes it (``models.save_model``), so no process ever holds more than its shard plus one
full tensor. Convert at the TP size you will train with: each rank then later reads exactly its own chunks.
The checkpoint also loads at other TP sizes that divide its (padded) query groups — DCP cuts the slices
out of the stored chunks, reading every chunk it touches whole.

To Hugging Face: one process (or every rank of a TP = 1 world) loads the checkpoint at TP = 1 and writes
``config.json`` and ``model.safetensors`` (vocabulary padding and padded query groups dropped; tied
embeddings stored once).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from . import models

__all__ = ["to_megatron", "to_hf", "main"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json")


def _init(cpu: bool) -> None:
    from megatron.core import parallel_state

    if not dist.is_initialized():
        if "RANK" in os.environ:  # launched by torchrun
            dist.init_process_group("gloo" if cpu else "nccl")
        else:  # a plain `python -m`: a world of one
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())


def to_megatron(hf_dir: str | Path, out_dir: str | Path, *, bf16: bool = False, vocab_multiple: int = 128,
                cpu: bool = True) -> None:
    """Every rank of the current TP group writes its shard of ``hf_dir`` into ``out_dir``."""
    from megatron.core import parallel_state

    source = models.resolve(str(hf_dir))
    if source.kind != "hf":
        raise ValueError(f"{hf_dir} is not a Hugging Face model folder")
    model = models.build(source, tp_size=parallel_state.get_tensor_model_parallel_world_size(),
                         tp_rank=parallel_state.get_tensor_model_parallel_rank(), bf16=bf16, cpu=cpu,
                         vocab_multiple=vocab_multiple)
    models.save_model(model, out_dir, source.config, vocab_multiple=vocab_multiple)
    if dist.get_rank() == 0:  # the tokenizer travels with the weights (the driver's default tokenizer)
        for f in Path(hf_dir).iterdir():
            if f.is_file() and f.name in _TOKENIZER_FILES:
                shutil.copyfile(f, Path(out_dir) / f.name)
    dist.barrier()


def to_hf(ckpt_dir: str | Path, out_dir: str | Path) -> None:
    """A Hugging Face folder (config.json + model.safetensors) from a distributed checkpoint (every rank of a
    TP = 1 world calls this; rank 0 writes)."""
    from safetensors.torch import save_file

    source = models.resolve(str(ckpt_dir))
    if source.kind != "megatron":
        raise ValueError(f"{ckpt_dir} is not a distributed checkpoint ({models.MODEL_INFO})")
    model = models.build(source, tp_size=1, tp_rank=0, vocab_multiple=source.vocab_multiple)
    state = {k: t for k, t in model.state_dict().items() if not k.endswith("._extra_state")}
    hf_state = source.family.megatron_to_hf([state], source.shape)
    if source.config.get("tie_word_embeddings", source.family.name == "opt"):
        hf_state.pop("lm_head.weight", None)  # tied: stored once, as HF's save_pretrained does
    if dist.get_rank() == 0:  # every rank of the (TP = 1) world holds the same model; one writes it
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: t.contiguous() for k, t in hf_state.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(source.config, indent=1, sort_keys=True) + "\n")
    dist.barrier()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dpkd.integrations.megatron.convert", description=__doc__.split("\n")[0])
    p.add_argument("--hf", help="Hugging Face model folder to convert (to Megatron)")
    p.add_argument("--megatron", help="distributed checkpoint to convert (with --to-hf)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--to-hf", action="store_true", help="distributed checkpoint -> Hugging Face")
    p.add_argument("--bf16", action="store_true", help="store bf16 weights")
    p.add_argument("--vocab-multiple", type=int, default=128, help="pad the vocabulary to a multiple of this")
    p.add_argument("--cpu", action="store_true", help="gloo and CPU tensors (no GPU needed)")
    args = p.parse_args(argv)
    if args.to_hf == bool(args.hf) or args.to_hf != bool(args.megatron):
        p.error("give --hf DIR (to Megatron) or --to-hf --megatron DIR")
    torch.set_num_threads(int(os.environ.get("DPKD_NUM_THREADS", "1")) if args.cpu else torch.get_num_threads())
    _init(args.cpu or args.to_hf)
    if args.to_hf:
        to_hf(args.megatron, args.out)
    else:
        to_megatron(args.hf, args.out, bf16=args.bf16, vocab_multiple=args.vocab_multiple, cpu=args.cpu)
    if dist.get_rank() == 0:
        print(f"[dpkd.megatron.convert] wrote {args.out}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
