"""Fingerprints of what produced a result: a data file, a model folder, a preset name.

A checkpoint or cache records the fingerprints of its inputs so that a later run can tell whether it is
being given the same ones (and refuse, or rebuild, when not). Small files (≤ 1 MiB: configs, tokenizers,
JSONL data of the usual sizes up to ``full_limit``) are hashed whole; a large weight file by its size and
its first and last MiB, which differ between any two trained models of one architecture while costing
two reads instead of gigabytes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["file_fingerprint", "source_fingerprint"]

_EDGE = 1 << 20


def file_fingerprint(path: str | os.PathLike[str], *, full_limit: int = 64 * _EDGE) -> str:
    """sha256 of the file (or, above ``full_limit`` bytes, of its size, first and last MiB), hex."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        if size <= full_limit:
            for block in iter(lambda: f.read(_EDGE), b""):
                h.update(block)
        else:
            h.update(f.read(_EDGE))
            f.seek(size - _EDGE)
            h.update(f.read(_EDGE))
    return h.hexdigest()


def source_fingerprint(name: str | os.PathLike[str]) -> str:
    """A model or data source: a folder → the fingerprints of its files and subfolders (recursively, without
    dpkd's own lock and temporary files), a file → its fingerprint, anything else (a preset or hub name) →
    the name itself."""
    path = Path(name)
    if path.is_dir():
        h = hashlib.sha256()
        for child in sorted(path.iterdir()):
            if child.name.startswith(".dpkd") or child.name.endswith(".tmp"):
                continue
            if child.is_file():
                h.update(f"{child.name}:{file_fingerprint(child, full_limit=_EDGE)};".encode())
            elif child.is_dir():
                h.update(f"{child.name}/:{source_fingerprint(child)};".encode())
        return h.hexdigest()
    if path.is_file():
        return file_fingerprint(path)
    return f"name:{name}"
