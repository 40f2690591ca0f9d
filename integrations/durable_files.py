"""fsync helpers behind every atomic write of the integrations (checkpoints, caches, markers).

A rename is atomic but not durable until the file's data and the folder entry reach the disk: every writer
fsyncs the file (or each file of a folder), renames it into place, then fsyncs the parent folder.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_path", "fsync_tree"]


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
