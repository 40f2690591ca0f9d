"""DistillTrainer in real 2-process gloo worlds on CPU, started here by torchrun and accelerate launch.

* every method: 3 optimizer steps (2 micro-batches each: the all-reduce skipped on the first) at world size
  2 equal the single-process run with the same global batch — loss history and final weights, float64;
* SIGKILL of one rank while the checkpoint is being written, and of one rank mid-step (between the
  backward passes of a step's two micro-batches): the job fails within its time bound, no checkpoint is
  left half-written, and resuming (at world size 1 and 2) gives the uninterrupted run's metrics and weights;
* FSDP / DeepSpeed asked for on CPU are refused with a message (accelerate would silently run DDP);
* bf16 mixed precision runs under accelerate's autocast.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dpkd.integrations.methods import METHODS
from dpkd.integrations.transformers.checkpoint import latest_checkpoint
from safetensors.torch import load_file

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).with_name("_dist_worker.py")
sys.path.insert(0, str(WORKER.parent))
import _dist_worker as w  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE"))}
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _torchrun(mode, out, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_port()), str(WORKER), mode, str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def _accelerate_launch(mode, out, timeout=300):
    # accelerate 1.15: `--cpu --num_processes 2` starts ONE process (multi-CPU needs mpirun); its torchrun
    # launcher (`--multi_gpu`) starts two, which train on CPU over gloo on a machine without GPUs
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_port()),
           str(WORKER), mode, str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def _history(folder):
    return json.loads((Path(folder) / "trainer_state.json").read_text())["log_history"]


def _weights(folder):
    return load_file(str(latest_checkpoint(folder) / "model.safetensors"))


def _assert_same_run(got_dir, ref_history, ref_weights, rtol):
    got = _history(got_dir)
    assert [r["step"] for r in got] == [r["step"] for r in ref_history]
    for a, b in zip(got, ref_history, strict=True):
        assert a.keys() == b.keys()
        for k in b:
            assert a[k] == pytest.approx(b[k], rel=rtol, abs=1e-12), (k, a["step"])
    wg = _weights(got_dir)
    assert wg.keys() == ref_weights.keys()
    for k in ref_weights:
        torch.testing.assert_close(wg[k], ref_weights[k], rtol=rtol, atol=1e-12, msg=k)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One 2-process torchrun world running every method (and the refusals), and the reference runs."""
    root = tmp_path_factory.mktemp("dist")
    t0 = time.time()
    res = _torchrun("methods", root / "ws2")
    assert res.returncode == 0, res.stderr[-4000:]
    tok, train, pt = w.toy()
    for method in METHODS:
        w.trainer(tok, train, pt, w.config(root / "ws1" / method, method, world=1)).train()
    return root, time.time() - t0


@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_equal_one(world, method):
    root, _ = world
    ref = root / "ws1" / method
    _assert_same_run(root / "ws2" / method, _history(ref), _weights(ref), rtol=1e-9)
    assert (latest_checkpoint(ref) / "trainer_state.json").is_file()


def test_world_size_two_is_not_trivially_equal(world):
    """The comparison can fail: the runs moved, and a different global batch gives a different run."""
    root, _ = world
    tok, train, pt = w.toy()
    other = root / "other"
    w.trainer(tok, train, pt, w.config(other, "dpkd", world=1, per_device_train_batch_size=2)).train()
    ref = _weights(root / "ws1" / "dpkd")
    assert any(not torch.allclose(_weights(other)[k], ref[k]) for k in ref)
    state = json.loads((latest_checkpoint(root / "ws2" / "dpkd") / "trainer_state.json").read_text())
    assert (state["world_size"], state["train_batch_size"]) == (2, 8)


def test_fsdp_and_deepspeed_are_refused_on_cpu(world):
    root, _ = world
    msgs = json.loads((root / "ws2" / "refusals.json").read_text())
    assert "`fsdp`" in msgs["fsdp"] and "silently fall back to DDP" in msgs["fsdp"]
    assert "`deepspeed`" in msgs["deepspeed"]  # not installed here, or CPU: either way a named refusal
    assert "FSDP" in msgs["env_fsdp"] and "torchrun --nproc_per_node N" in msgs["env_fsdp"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted 6-step DPKD run (checkpoints every 2 steps) the killed runs must end at."""
    ref = tmp_path_factory.mktemp("uninterrupted")
    tok, train, pt = w.toy()
    w.trainer(tok, train, pt, w.config(ref, "dpkd", world=1, max_steps=6, save_steps=2)).train()
    return _history(ref), _weights(ref)


def _resume_alone(folder):
    tok, train, pt = w.toy()
    w.trainer(tok, train, pt, w.config(folder, "dpkd", world=1, max_steps=6, save_steps=2)).train(
        resume_from_checkpoint=True)


def test_sigkill_of_one_rank_while_checkpointing_then_resume(tmp_path, uninterrupted):
    """accelerate launch, 2 ranks: rank 1 dies (SIGKILL) after writing its part of checkpoint-4, before the
    all-ranks barrier. The job fails within the time bound; checkpoint-4 never appears; resuming from
    checkpoint-2 at world size 1 (same global batch) ends exactly where the uninterrupted run ends."""
    killed = tmp_path / "killed"
    t0 = time.time()
    res = _accelerate_launch("killed", killed, timeout=240)
    assert res.returncode != 0
    assert time.time() - t0 < 240
    assert sorted(p.name for p in killed.iterdir() if "checkpoint" in p.name) == [".checkpoint-4.tmp",
                                                                                  "checkpoint-2"]
    assert latest_checkpoint(killed) == killed / "checkpoint-2"
    _resume_alone(killed)
    _assert_same_run(killed, *uninterrupted, rtol=1e-9)
    assert latest_checkpoint(killed).name == "checkpoint-6"


def test_sigkill_of_one_rank_mid_step_then_resume(tmp_path, uninterrupted):
    """torchrun, 2 ranks: rank 1 dies (SIGKILL) in step 3 between its two micro-batches' backward passes,
    while rank 0 goes on into the step's gradient all-reduce. torchrun's agent sees the dead rank and ends
    the job (non-zero exit) within the time bound; checkpoint-2 is the last one, nothing of step 3 or 4 is on
    disk; resuming at world size 2 ends exactly where the uninterrupted run ends."""
    killed = tmp_path / "midstep"
    t0 = time.time()
    res = _torchrun("midstep", killed, timeout=240)
    assert res.returncode != 0, res.stderr[-2000:]
    assert time.time() - t0 < 240
    assert "exitcode  : -9" in res.stderr and "Signal 9 (SIGKILL)" in res.stderr, res.stderr[-2000:]
    assert sorted(p.name for p in killed.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert not (killed / "trainer_state.json").exists()
    res = _torchrun("resume", killed, timeout=240)
    assert res.returncode == 0, res.stderr[-4000:]
    _assert_same_run(killed, *uninterrupted, rtol=1e-9)


def test_resume_refuses_another_global_batch(tmp_path):
    tok, train, pt = w.toy()
    w.trainer(tok, train, pt, w.config(tmp_path, "sft", world=1, max_steps=2)).train()
    with pytest.raises(ValueError, match="global batch of 8"):
        w.trainer(tok, train, pt, w.config(tmp_path, "sft", world=1, max_steps=4,
                                           per_device_train_batch_size=2)).train(resume_from_checkpoint=True)


def test_bf16_autocast(tmp_path):
    res = subprocess.run([sys.executable, str(WORKER), "bf16", str(tmp_path)], capture_output=True, text=True,
                         timeout=180, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "bf16.json").read_text())
    assert "torch.bfloat16" in out["dtypes"]
    assert all(torch.isfinite(torch.tensor(v)) for v in out["loss"])
