"""A Hugging Face checkpoint folder as a lazy ``Mapping[str, Tensor]``: one tensor read at a time.

The converters take any mapping of Hugging Face names to tensors and touch each tensor once, so reading
through this view keeps a rank's host memory at its own shard plus the largest single tensor, instead of the
whole checkpoint (``from_pretrained(...).state_dict()`` on every rank). Safetensors files (single or sharded
with ``model.safetensors.index.json``) are read with ``safetensors.safe_open``; ``pytorch_model*.bin`` files
with ``torch.load(mmap=True, weights_only=True)`` (memory-mapped: pages are read when a tensor is used).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

__all__ = ["HFWeights", "read_hf_config"]


def read_hf_config(folder: str | Path) -> dict:
    """The folder's ``config.json`` as a dict (the converters read dicts and HF config objects alike)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    return json.loads(path.read_text())


class HFWeights(Mapping):
    """Tensor name → tensor, read from the file that holds it when indexed."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._files: dict[str, Path] = {}
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.folder / index_name
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                self._files = {k: self.folder / f for k, f in weight_map.items()}
                break
        else:
            for name in ("model.safetensors", "pytorch_model.bin"):
                if (self.folder / name).is_file():
                    self._files = {k: self.folder / name for k in self._names(self.folder / name)}
                    break
        if not self._files:
            raise FileNotFoundError(f"{folder} holds no model.safetensors / pytorch_model.bin (or their index)")
        self._bin_cache: dict[Path, dict] = {}

    @staticmethod
    def _names(path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        return list(torch.load(path, map_location="cpu", mmap=True, weights_only=True))

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self._files[name]
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name)
        if path not in self._bin_cache:  # memory-mapped: holding the dict costs no tensor memory
            self._bin_cache[path] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return self._bin_cache[path][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

