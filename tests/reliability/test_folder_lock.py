"""The output-folder lock with real processes: of several runs starting together exactly one gets the folder;
a SIGKILLed owner's lock, a reused PID and a garbled lock file are stale and taken over, saying so."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from dpkd.integrations.folder_lock import FolderLock, FolderLockedError

CHILD = textwrap.dedent("""
    import os, sys, time
    from dpkd.integrations.folder_lock import FolderLock, FolderLockedError
    folder, release = sys.argv[1], sys.argv[2]
    lock = FolderLock(folder, purpose="child")
    try:
        lock.acquire()
    except FolderLockedError as e:
        print("refused", e, flush=True)
        sys.exit(0)
    print("got", flush=True)
    deadline = time.time() + 60
    while not os.path.exists(release) and time.time() < deadline:
        time.sleep(0.05)
    lock.release()
""")


def _child(tmp_path):
    return subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "out"), str(tmp_path / "release")],
                            stdout=subprocess.PIPE, text=True)


def test_of_four_runs_starting_together_one_gets_the_folder(tmp_path):
    children = [_child(tmp_path) for _ in range(4)]
    try:
        first = [c.stdout.readline() for c in children]  # every child has tried before anyone lets go
    finally:
        (tmp_path / "release").touch()
        for c in children:
            c.wait(timeout=60)
    assert sorted(line.split()[0] for line in first) == ["got", "refused", "refused", "refused"], first
    assert all("is in use by PID" in line for line in first if line.startswith("refused"))
    assert not (tmp_path / "out" / ".dpkd.lock").exists()  # given back


def test_a_killed_owner_leaves_a_stale_lock_that_is_taken_over(tmp_path):
    child = _child(tmp_path)
    assert child.stdout.readline().strip() == "got"
    with pytest.raises(FolderLockedError, match=f"in use by PID {child.pid}"):
        FolderLock(tmp_path / "out", purpose="test").acquire()
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    lock = FolderLock(tmp_path / "out", purpose="test")
    assert lock.acquire() == f"took over the stale lock {lock.path} (PID {child.pid} is not running)"
    lock.release()


def test_a_killed_owner_not_yet_reaped_holds_nothing(tmp_path):
    """A SIGKILLed owner whose parent has not waited for it yet (a zombie: torchrun's ranks right after
    the launcher is killed) keeps its PID, but its lock is stale."""
    child = _child(tmp_path)
    assert child.stdout.readline().strip() == "got"
    os.kill(child.pid, signal.SIGKILL)
    for _ in range(500):  # the kernel marks it a zombie; nobody reaps it until child.wait below
        if open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.01)
    try:
        lock = FolderLock(tmp_path / "out", purpose="test")
        assert lock.acquire() == f"took over the stale lock {lock.path} (PID {child.pid} is not running)"
        lock.release()
    finally:
        child.wait(timeout=30)


def test_reused_pid_garbled_file_and_another_host(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = FolderLock(tmp_path, purpose="test")
        reused = {"pid": sleeper.pid, "host": os.uname().nodename, "start_time": "1"}  # not when it started
        lock.path.write_text(json.dumps(reused))
        assert lock.acquire() == f"took over the stale lock {lock.path} (PID {sleeper.pid} now belongs to " \
                                 "another process)"
        lock.release()
    finally:
        sleeper.kill()
        sleeper.wait(timeout=10)
    lock.path.write_text("{not json")
    assert "the lock file is empty or garbled" in lock.acquire()
    lock.release()
    lock.path.write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    with pytest.raises(FolderLockedError, match="in use by PID 1 on elsewhere.example"):
        lock.acquire()
