"""An advisory lock on an output folder: ``<folder>/.dpkd.lock`` names the run that writes there.

Two runs writing one folder overwrite each other's checkpoints and logs, and one of them may exit 0 with
the other's files. A run therefore takes the folder's lock before it writes anything and gives it back
when it ends. The lock file holds the owner's PID, host, boot id and process start time (JSON), so that

* a lock whose owner is running refuses the second run, naming the PID and host;
* a lock whose owner is gone — same host and boot, and the PID is not running, or it is running but
  started at another time (the PID was reused), or the machine rebooted since — is *stale*: it is taken
  over and the returned note says so (a killed run leaves its lock behind; SIGKILL cannot clean up).

A lock taken on another host cannot be checked from here; it refuses (remove the file if that run is
gone). The check-and-take runs under ``fcntl.flock`` on the folder itself, so of two runs
starting together exactly one gets the folder. The lock is advisory: a process that does not ask is not
stopped.

Example::

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with FolderLock(folder, purpose="example"):
    ...     FolderLock(folder, purpose="second").acquire()  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    dpkd.integrations.folder_lock.FolderLockedError: ... is in use by PID ...
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

__all__ = ["FolderLock", "FolderLockedError", "LOCK_NAME"]

LOCK_NAME = ".dpkd.lock"


class FolderLockedError(RuntimeError):
    """Another live run holds the folder's lock."""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` from field 3 (the state) on, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # the name (field 2) may hold spaces: split after it


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22), or None."""
    fields = _stat_fields(pid)
    return None if fields is None else fields[19]


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by someone else
    fields = _stat_fields(pid)
    # a killed process its parent has not reaped yet (a zombie) still has its PID but holds nothing
    return fields is None or fields[0] not in ("Z", "X")


def _owner() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": _boot_id(),
            "start_time": _start_time(os.getpid())}


def _stale_reason(holder: dict[str, Any]) -> str | None:
    """Why ``holder``'s lock is stale, or None when its owner may still be running."""
    if holder.get("host") != socket.gethostname():
        return None
    if holder.get("boot_id") and holder.get("boot_id") != _boot_id():
        return "the machine rebooted since"
    pid = int(holder.get("pid", -1))
    if pid <= 0 or not _running(pid):
        return f"PID {pid} is not running"
    if holder.get("start_time") is not None and _start_time(pid) not in (None, holder["start_time"]):
        return f"PID {pid} now belongs to another process"
    return None


class FolderLock:
    """The advisory lock on ``folder`` (created if missing) for one run; ``purpose`` goes into messages."""

    def __init__(self, folder: str | os.PathLike[str], *, purpose: str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.purpose = purpose
        self.note: str | None = None  # set when a stale lock was taken over
        self._held = False

    @contextlib.contextmanager
    def _guard(self):
        fd = os.open(self.folder, os.O_RDONLY)  # flock on the folder itself: no extra file left behind
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock was taken over. Raises FolderLockedError."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._guard():
            holder = self._read()
            if holder is not None and holder.get("pid") != os.getpid():
                reason = _stale_reason(holder) if holder else "the lock file is empty or garbled"
                if reason is None:
                    raise FolderLockedError(
                        f"{self.folder} is in use by PID {holder.get('pid')} on {holder.get('host')} "
                        f"({holder.get('purpose', 'another run')}); two runs in one folder overwrite each other. "
                        f"Use another folder, or remove {self.path} if that run is gone")
                self.note = f"took over the stale lock {self.path} ({reason})"
            tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**_owner(), "purpose": self.purpose}) + "\n")
            os.replace(tmp, self.path)
            self._held = True
        return self.note

    def _read(self) -> dict[str, Any] | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except ValueError:
            return {}
        return holder if isinstance(holder, dict) else {}

    def release(self) -> None:
        """Give the lock back (only if this process holds it)."""
        if not self._held:
            return
        with self._guard():
            holder = self._read()
            if holder and holder.get("pid") == os.getpid():
                self.path.unlink()
        self._held = False

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
