"""The HF trainer and `dpkd distill` hold dpkd.integrations.folder_lock's lock on their output folders: while
another process holds it they are refused at once, naming the argument, the folder and the holder, before
anything is written; a holder killed with SIGKILL leaves a stale lock the next run takes over. (The lock
itself — races, reused PIDs, garbled files — is tested in tests/reliability/test_folder_lock.py.)"""

import os
import signal
import subprocess
import sys

import dpkd.integrations.folder_lock as folder_lock_module
import pytest
from dpkd.integrations.folder_lock import FolderLockedError
from dpkd.integrations.transformers.trainer import DistillConfig, DistillTrainer

# the holder loads the module from its file (no package import: it starts in a fraction of a second)
_HOLDER = f"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("folder_lock", {folder_lock_module.__file__!r})
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
mod.FolderLock(sys.argv[1], purpose="holder").acquire()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """hold(folder) -> the Popen of another process holding the folder's lock (SIGKILLed at the end)."""
    procs = []

    def hold(folder):
        p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "locked"
        return p

    yield hold
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=60)


def _trainer(tok, train, model, out):
    cfg = DistillConfig(output_dir=str(out), method="sft", max_steps=2, per_device_train_batch_size=4,
                        logging_steps=1, disable_tqdm=True, report_to="none", objective="distil-only")
    return DistillTrainer(model, None, train, cfg, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)


def test_a_trainer_on_an_output_dir_in_use_is_refused_then_takes_a_stale_lock(tmp_path, toy, tiny, holder):
    tok, train, _ = toy
    other = holder(tmp_path)
    tr = _trainer(tok, train, tiny("gpt2", tok, 0), tmp_path)
    with pytest.raises(FolderLockedError, match=rf"DistillConfig.output_dir {tmp_path} is in use by PID {other.pid}"):
        tr.train()
    assert not any("checkpoint" in p.name for p in tmp_path.iterdir())  # nothing written
    os.kill(other.pid, signal.SIGKILL)
    other.wait(timeout=60)
    res = tr.train()  # the dead holder's lock is stale: taken over
    assert [r["step"] for r in res.log_history] == [1, 2]
    assert not (tmp_path / folder_lock_module.LOCK_NAME).exists()  # given back at the end


def test_a_job_on_a_results_dir_in_use_is_refused_before_anything_runs(tmp_path, holder):
    from dpkd.integrations.cli import main

    other = holder(tmp_path / "res")
    with pytest.raises(SystemExit) as e:
        main(["distill", "--preset", "ci", "--results-dir", str(tmp_path / "res"), "--cache-dir",
              str(tmp_path / "c")])
    assert f"dpkd distill: --results-dir {tmp_path / 'res'} is in use by PID {other.pid}" in str(e.value)
    assert not (tmp_path / "c").exists()
