"""SIGKILL of a real torchrun launch of the Megatron driver at a random moment (mid-step or mid-save), then
``--resume`` (in the test's 2-rank gloo world: one launch is what the kill needs): every step folder left
is intact, the stale lock is taken over, the leftovers of the interrupted save are removed, and the resumed
steps equal an uninterrupted run's."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (the `megatron` extra)")

ARGS = ["--cpu", "--num-examples", "16", "--global-batch", "4", "--max-prompt", "120", "--max-length", "140",
        "--lr", "1e-2", "--seed", "3", "--tp", "2", "--steps", "5", "--save-interval", "1"]
LAUNCH_TIMEOUT_S = 240


def body_full(argv):
    from dpkd.integrations.megatron import distill

    return distill.run(distill.parse_args(argv))


def _launch(save):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "dpkd.integrations.megatron.distill", *ARGS, "--save-dir", str(save), "--resume"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DPKD_NUM_THREADS="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _descendants(pid):
    """Every process below ``pid`` (torchrun starts each rank in a session of its own: no group kill)."""
    children = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                with open(f"/proc/{stat}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(stat))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_all(proc):
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume_equals_the_uninterrupted_run(gloo_pool, tmp_path):
    from dpkd.integrations.megatron import train_state

    full = gloo_pool.run(body_full, ARGS, tp=2)[0]
    save = tmp_path / "run"
    proc = _launch(save)
    rng = random.Random(os.getpid())
    kill_after = rng.randint(1, 3)  # a random checkpoint, then a random moment of the next step or save
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        while proc.poll() is None and time.monotonic() < deadline and (
                not (save / "latest").is_file() or train_state.latest_step(save) < kill_after):
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.communicate()[1][-3000:]
        time.sleep(rng.uniform(0.0, 0.15))
        _kill_all(proc)  # every rank at once, mid-step or mid-save
    finally:
        _kill_all(proc)
        proc.communicate(timeout=60)
    killed_at = train_state.latest_step(save)
    for folder in save.glob("step_*"):
        assert train_state.verify_checkpoint(folder)[1] is None  # nothing half-written is visible as a step

    resumed = gloo_pool.run(body_full, [*ARGS, "--save-dir", str(save), "--resume"], tp=2)[0]
    assert [r["step"] for r in resumed] == list(range(killed_at + 1, 6)), f"killed at {killed_at}"
    for r in resumed:
        assert (r["loss"], r["grad_norm"]) == (full[r["step"] - 1]["loss"], full[r["step"] - 1]["grad_norm"])
    assert not list(save.glob(".step_*")) and not (save / ".dpkd.lock").exists()
    print(f"\nreliability: Megatron driver SIGKILLed after step {killed_at}; resumed steps "
          f"{killed_at + 1}-5 equal the uninterrupted run")
