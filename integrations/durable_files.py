"""Durable, verifiable files: the one mechanism behind every atomic write and every damaged-file check of the
integrations (checkpoints, caches, markers).

A rename is atomic but not durable until the file's data and the folder entry reach the disk: every writer
fsyncs the file (or each file of a folder), renames it into place, then fsyncs the parent folder
(:func:`atomic_write_text`, :func:`publish_folder`). A folder that must be trusted later carries a manifest
written last (:func:`write_manifest`: every file's size and CRC-32 plus the caller's fields), so a reader can
tell an intact folder from a truncated, altered or half-copied one and name the file (:func:`verify_manifest`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["CheckpointError", "fsync_path", "fsync_tree", "atomic_write_text", "publish_folder", "write_manifest",
           "verify_manifest", "unique_suffix"]


class CheckpointError(RuntimeError):
    """A checkpoint (or its marker) is damaged or cannot be loaded; the message names the file."""


def fsync_path(path: str | Path) -> None:
    """fsync one file or folder by path (a folder's fsync makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file in ``folder`` (recursively) and the folder itself."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fsync_path(os.path.join(root, name))
    fsync_path(folder)


def unique_suffix() -> str:
    """``<pid>-<8 hex digits>``: a temporary name no other process (or earlier call of this one) uses."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a uniquely named temporary file beside ``path``, fsync it, rename it over ``path``
    and fsync the folder: a reader sees the old content or the new, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{unique_suffix()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def publish_folder(tmp: str | Path, final: str | Path, *, keep: Callable[[Path], bool] | None = None) -> bool:
    """fsync the finished folder ``tmp`` and rename it to ``final``; returns whether it was published.

    An existing ``final`` is moved aside under a unique name and removed (a kill in between leaves that
    name, never half of ``final``) — unless ``keep(final)`` says it is a complete copy already (another
    process finished first), which then wins and ``tmp`` is left to the caller."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    if final.exists():
        if keep is not None and keep(final):
            return False
        stale = final.with_name(f".{final.name}.stale-{unique_suffix()}")
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:  # another process renamed its own copy into place first
        if keep is None or not keep(final):
            raise
        return False
    fsync_path(final.parent)
    return True


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
    return crc


def write_manifest(folder: str | Path, name: str, **fields: Any) -> None:
    """Write ``folder/name`` (last, atomically): ``fields`` and ``files`` = {relative path: [size, CRC-32]}
    of every file under ``folder`` but the manifest."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): [p.stat().st_size, _crc32(p)]
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != name}
    atomic_write_text(folder / name, json.dumps({**fields, "files": files}, indent=1, sort_keys=True) + "\n")


def verify_manifest(folder: str | Path, name: str) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) when every file ``folder/name`` lists has its recorded size and CRC-32, else
    (None, what is wrong, naming the file). The caller decides what a folder without a manifest means."""
    folder = Path(folder)
    manifest_path = folder / name
    if not manifest_path.is_file():
        return None, f"{manifest_path} is missing"
    try:
        manifest = json.loads(manifest_path.read_text())
        # [size, CRC-32] per file; a manifest of an older dpkd lists sizes only, and only those are checked
        listed = sorted((str(k), int(v), None) if isinstance(v, int) else (str(k), int(v[0]), int(v[1]))
                        for k, v in manifest["files"].items())
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, UnicodeDecodeError):
        return None, f"{manifest_path} is garbled"
    for relative, size, crc in listed:
        path = folder / relative
        if not path.is_file():
            return None, f"{path} is missing"
        if path.stat().st_size != size:
            return None, f"{path} is truncated or extended ({path.stat().st_size} bytes, {size} written)"
        if crc is not None and _crc32(path) != crc:
            return None, f"{path} is damaged (its CRC-32 differs from the one written)"
    return manifest, None
