"""Megatron-Core distributed checkpoints (``megatron.core.dist_checkpointing``) without arbitrary unpickling.

A checkpoint is Megatron-Core's ``torch_dist`` format: every tensor is stored as a *global* tensor (a
stacked ``[layers, …]`` tensor per layer parameter, the padded vocabulary, …) in PyTorch Distributed
Checkpoint (DCP) files, one ``__R_0.distcp`` file per saving rank holding that rank's chunks, plus DCP's
``.metadata`` (which chunk of which tensor lies where), Megatron's ``metadata.json`` (the format) and
``common.pt`` (the non-tensor state, written by rank 0). Because tensors are global, a checkpoint written
at one TP size loads at another (DCP cuts the requested slices out of the stored chunks); at the TP size it
was written with, each rank reads exactly its own chunks plus the replicated tensors (norms).

Everything else — sharded state dicts from ``GPTModel.sharded_state_dict()``, factories (SwiGLU's fused
``linear_fc1`` stored as two global tensors), replica de-duplication, the sharding-integrity validation,
``common.pt`` — is Megatron-Core's ``dist_checkpointing.save`` / ``load``; this module supplies the two
strategies those functions accept:

* ``TorchDistSaveStrategy`` writes the chunks synchronously through DCP. (Megatron-Core's own torch_dist
  save stages tensors with ``torch.cuda.synchronize()`` and so cannot run on a CPU-only build.)
* ``SafeTorchDistLoadStrategy`` reads them, and ``SafeCommonLoadStrategy`` reads ``common.pt``, with
  nothing unpickled beyond plain data: DCP's ``.metadata`` is a pickle that DCP itself loads with a plain
  ``pickle.load``; here it goes through an unpickler that resolves only DCP's metadata dataclasses, torch
  sizes/dtypes/layouts/memory formats and builtin containers, and refuses any other global. Tensor chunks
  are read by DCP with ``torch.load(weights_only=True)``, ``common.pt`` with ``torch.load(weights_only=True)``.
  ``ShardedObject``s (arbitrary pickled objects, loaded by DCP with ``weights_only=False``) are never written
  nor read: the model's ``_extra_state`` placeholders are dropped, anything else is refused.

Files written here load with Megatron-Core's own torch_dist strategy too (tested), and Megatron-written
checkpoints load here as long as they hold no ShardedObjects.
"""

from __future__ import annotations

import pathlib
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
    is_main_replica,
)
from megatron.core.dist_checkpointing.strategies.base import (
    LoadCommonStrategy,
    LoadShardedStrategy,
    SaveShardedStrategy,
)
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

__all__ = [
    "UnsafeCheckpointError",
    "TorchDistSaveStrategy",
    "SafeTorchDistLoadStrategy",
    "SafeCommonLoadStrategy",
    "read_dcp_metadata",
    "model_sharded_state_dict",
    "save",
    "load",
]

BACKEND, VERSION = "torch_dist", 1
COMMON_FILE = "common.pt"  # Megatron-Core's name for the rank-0 non-tensor state


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint's metadata names a Python global outside the allowlist (it could run code)."""


# --------------------------------------------------------------------------------------------------
# DCP metadata through a restricted unpickler


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {}
    for cls in (dcp_metadata.Metadata, dcp_metadata.TensorStorageMetadata, dcp_metadata.BytesStorageMetadata,
                dcp_metadata.ChunkStorageMetadata, dcp_metadata.TensorProperties, dcp_metadata.MetadataIndex,
                dcp_metadata.StorageMeta):
        allowed[(cls.__module__, cls.__qualname__)] = cls
    # DCP's per-chunk (file, offset, length) record and TensorProperties' memory-format enum
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    for cls in (_StorageInfo, _MEM_FORMAT_ENCODING):
        allowed[(cls.__module__, cls.__qualname__)] = cls
    # a layout is pickled as a call of this name lookup (torch's weights_only unpickler allows it too)
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for cls in (pathlib.PurePosixPath, pathlib.PosixPath, pathlib.PureWindowsPath, pathlib.WindowsPath):
        allowed[("pathlib", cls.__name__)] = cls  # StorageMeta.checkpoint_id: the directory it was saved to
    allowed[("torch", "Size")] = torch.Size
    for name in dir(torch):  # dtypes, layouts and memory formats are pickled as module attributes of torch
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = value
    for cls in (dict, list, tuple, set, frozenset, int, float, str, bytes, bool):
        allowed[("builtins", cls.__name__)] = cls
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    _allowed = None

    def find_class(self, module: str, name: str) -> Any:
        if _MetadataUnpickler._allowed is None:
            _MetadataUnpickler._allowed = _allowed_globals()
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load checkpoint metadata that references `{module}.{name}`: only DCP metadata "
                "classes, torch sizes/dtypes and builtin containers are allowed") from None


def read_dcp_metadata(checkpoint_dir: str | Path) -> dcp_metadata.Metadata:
    """DCP's ``.metadata`` of ``checkpoint_dir`` through the restricted unpickler."""
    with open(Path(checkpoint_dir) / ".metadata", "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise UnsafeCheckpointError(f"{checkpoint_dir}/.metadata does not hold DCP metadata")
    return metadata


class _SafeReader(FileSystemReader):
    """DCP's file reader with the restricted metadata unpickler; counts the stored bytes it reads."""

    def __init__(self, path: str | Path, metadata: dcp_metadata.Metadata) -> None:
        super().__init__(path)
        self._metadata = metadata  # read (and vetted) before DCP starts, so a refusal is a plain exception
        self.bytes_read = 0

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        metadata = self._metadata
        if metadata.storage_meta is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner):
        chunks = {item.storage_index for item in plan.items}
        self.bytes_read += sum(self.storage_data[index].length for index in chunks)  # each chunk is read whole
        return super().read_data(plan, planner)


# --------------------------------------------------------------------------------------------------
# Megatron ShardedTensor <-> DCP chunks


def _chunk(sh: ShardedTensor) -> tuple[torch.Size, torch.Size, torch.Tensor]:
    """(global offsets, chunk sizes, local data viewed with the prepended axes) of a ShardedTensor."""
    if sh.flattened_range is not None:
        raise NotImplementedError(f"`{sh.key}`: flattened (distributed-optimizer) shards are not supported")
    sizes = torch.Size((1,) * sh.prepend_axis_num + tuple(sh.local_shape))
    return torch.Size(sh.global_offset), sizes, sh.data.reshape(sizes)


def _sharded_tensors(sharded_state_dict: Any) -> list[ShardedTensor]:
    tensors = []
    for value in nested_values(sharded_state_dict):
        if isinstance(value, ShardedObject):
            raise TypeError(f"`{value.key}` is a ShardedObject (an arbitrary pickled object): not supported")
        if not isinstance(value, ShardedTensor):
            raise TypeError(f"unexpected sharded entry {type(value).__name__}")
        tensors.append(value)
    return tensors


class _SavePlanner(SavePlanner):
    def __init__(self, tensors: Iterable[ShardedTensor]) -> None:
        self._items: list[WriteItem] = []
        self._data: dict[tuple[str, torch.Size], torch.Tensor] = {}
        for sh in tensors:
            offsets, sizes, data = _chunk(sh)
            index = dcp_metadata.MetadataIndex(sh.key, offsets)
            properties = dcp_metadata.TensorProperties.create_from_tensor(data)
            self._items.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
                chunk=dcp_metadata.ChunkStorageMetadata(offsets=offsets, sizes=sizes), properties=properties,
                size=torch.Size(sh.global_shape))))
            self._data[(sh.key, offsets)] = data.detach().cpu()

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        return SavePlan(self._items)

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], dcp_metadata.Metadata]:
        return create_default_global_save_plan(all_plans)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        return self._data[(write_item.index.fqn, write_item.index.offset)]


class _LoadPlanner(LoadPlanner):
    def __init__(self, tensors: Iterable[ShardedTensor]) -> None:
        self._targets = {}
        self._tensors = list(tensors)
        for sh in self._tensors:
            offsets, _, data = _chunk(sh)
            self._targets[(sh.key, offsets)] = data

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        requests: list[ReadItem] = []
        stored = self.metadata.state_dict_metadata
        for sh in self._tensors:
            md = stored.get(sh.key)
            if not isinstance(md, dcp_metadata.TensorStorageMetadata):
                raise KeyError(f"the checkpoint has no tensor `{sh.key}`")
            if tuple(md.size) != tuple(sh.global_shape):
                raise ValueError(f"`{sh.key}`: the checkpoint holds global shape {tuple(md.size)}, the model "
                                 f"expects {tuple(sh.global_shape)}")
            offsets, sizes, _ = _chunk(sh)
            requests += create_read_items_for_chunk_list(
                sh.key, md, [dcp_metadata.ChunkStorageMetadata(offsets=offsets, sizes=sizes)])
        return LoadPlan(requests)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        raise UnsafeCheckpointError(f"`{read_item.dest_index.fqn}` is a pickled object; refusing to load it")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        target = self._targets[(read_item.dest_index.fqn, read_item.dest_index.offset)]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            target = target.narrow(dim, start, length)
        return target

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # DCP copied the chunk into the view returned by resolve_tensor


# --------------------------------------------------------------------------------------------------
# the strategies Megatron-Core's dist_checkpointing.save / load accept


class TorchDistSaveStrategy(SaveShardedStrategy):
    """Megatron-Core's torch_dist format, written synchronously through DCP (one file per rank)."""

    def __init__(self) -> None:
        super().__init__(BACKEND, VERSION)

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True  # so that Megatron hands them here, where they are refused (never pickled)

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        main = [sh for sh in _sharded_tensors(sharded_state_dict) if is_main_replica(sh.replica_id)]
        writer = FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True, thread_count=1)
        dcp.save({}, storage_writer=writer, planner=_SavePlanner(main))


class SafeTorchDistLoadStrategy(LoadShardedStrategy):
    """Reads torch_dist checkpoints with the restricted metadata unpickler and no pickled objects."""

    def __init__(self) -> None:
        self.bytes_read = 0

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True  # so that Megatron hands them here, where they are refused (never unpickled)

    def load(self, sharded_state_dict, checkpoint_dir):
        tensors = _sharded_tensors(sharded_state_dict)
        for sh in tensors:
            if sh.data is None:
                sh.init_data(torch.device("cpu"))
            sh.data = sh.data.detach()
        reader = _SafeReader(checkpoint_dir, read_dcp_metadata(checkpoint_dir))
        dcp.load({}, storage_reader=reader, planner=_LoadPlanner(tensors))
        self.bytes_read += reader.bytes_read
        return _replace_values(sharded_state_dict)

    def load_tensors_metadata(self, checkpoint_dir):
        metadata = read_dcp_metadata(checkpoint_dir)
        return {k: ShardedTensor.from_rank_offsets(k, torch.empty(md.size, dtype=md.properties.dtype,
                                                                  device="meta")).without_data()
                for k, md in metadata.state_dict_metadata.items()
                if isinstance(md, dcp_metadata.TensorStorageMetadata)}

    def check_backend_compatibility(self, loaded_backend) -> None:
        if loaded_backend != BACKEND:
            raise ValueError(f"checkpoint backend {loaded_backend!r} is not {BACKEND!r}")

    def check_version_compatibility(self, loaded_version) -> None:
        if int(loaded_version) != VERSION:
            raise ValueError(f"checkpoint format version {loaded_version} is not {VERSION}")


class SafeCommonLoadStrategy(LoadCommonStrategy):
    """Reads ``common.pt`` with ``torch.load(weights_only=True)``; refuses ShardedObjects."""

    def load_common(self, checkpoint_dir):
        return torch.load(Path(checkpoint_dir) / COMMON_FILE, map_location="cpu", weights_only=True)

    def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
        raise UnsafeCheckpointError("ShardedObjects (arbitrary pickled objects) are not loaded")  # never reached

    def check_backend_compatibility(self, loaded_backend) -> None:
        if loaded_backend != "torch":
            raise ValueError(f"common-state backend {loaded_backend!r} is not 'torch'")

    def check_version_compatibility(self, loaded_version) -> None:
        pass


def _replace_values(tree: Any) -> Any:
    """The sharded state dict with every ShardedTensor replaced by its (now loaded) data."""
    if isinstance(tree, dict):
        return {k: _replace_values(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_replace_values(v) for v in tree]
    return tree.data if isinstance(tree, ShardedTensor) else tree


# --------------------------------------------------------------------------------------------------
# entry points


def model_sharded_state_dict(model: torch.nn.Module, prefix: str = "") -> dict[str, Any]:
    """``model.sharded_state_dict()`` without the ``_extra_state`` placeholders (None for non-TE layers)."""
    out = {}
    for key, value in model.sharded_state_dict(prefix=prefix).items():
        if isinstance(value, ShardedObject):
            if not key.endswith("._extra_state"):
                raise TypeError(f"`{key}` is a ShardedObject: not supported by dpkd's safe checkpoints")
            continue
        if not isinstance(value, (ShardedTensor, ShardedTensorFactory)):
            raise TypeError(f"`{key}`: unexpected entry {type(value).__name__} in the model's sharded state dict")
        out[key] = value
    return out


def save(sharded_state_dict: Mapping[str, Any], checkpoint_dir: str | Path) -> None:
    """``dist_checkpointing.save`` with ``TorchDistSaveStrategy`` (every rank; the directory is created)."""
    path = Path(checkpoint_dir)
    if torch.distributed.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(dict(sharded_state_dict), str(path), sharded_strategy=TorchDistSaveStrategy())


def load(sharded_state_dict: Mapping[str, Any], checkpoint_dir: str | Path,
         strategy: SafeTorchDistLoadStrategy | None = None) -> dict[str, Any]:
    """``dist_checkpointing.load`` with the safe strategies; returns the loaded (plain) state dict."""
    return dist_checkpointing.load(dict(sharded_state_dict), str(checkpoint_dir),
                                   sharded_strategy=strategy or SafeTorchDistLoadStrategy(),
                                   common_strategy=SafeCommonLoadStrategy())
