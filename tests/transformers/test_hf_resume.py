"""SIGKILL mid-run, resume from the last checkpoint: exactly the metrics and weights of an uninterrupted run.
Checkpoints are atomic and pickle-free."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dpkd.integrations.transformers import checkpoint as ck
from dpkd.integrations.transformers.trainer import DistillConfig, DistillTrainer
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("_resume_worker.py")


def _run(mode, out):
    return subprocess.run([sys.executable, str(WORKER), mode, str(out)], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sigkill_and_resume_is_exact(tmp_path):
    ref = _run("plain", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(WORKER), "slow", str(killed)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (killed / "checkpoint-6").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "checkpoint-12").exists()  # really killed mid-way
    resumed = _run("resume", killed)
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "ref" / "trainer_state.json").read_text())["log_history"]
    b = json.loads((killed / "trainer_state.json").read_text())["log_history"]
    assert [r["step"] for r in a] == [0, 2, 4, 6, 8, 10, 12]  # 0: the probe at the start
    assert b == a  # every logged metric, bit for bit (JSON floats round-trip exactly)
    wa = load_file(str(tmp_path / "ref" / "checkpoint-12" / "model.safetensors"))
    wb = load_file(str(killed / "checkpoint-12" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # only the newest `save_total_limit` checkpoints are kept, no temporary folder is left
    assert sorted(p.name for p in killed.iterdir() if "checkpoint" in p.name) == ["checkpoint-10", "checkpoint-12"]


def _trainer(tmp_path, toy, tiny):
    tok, train, _ = toy
    cfg = DistillConfig(output_dir=str(tmp_path), method="sft", max_steps=1, per_device_train_batch_size=4,
                        disable_tqdm=True, report_to="none", objective="distil-only")
    return DistillTrainer(tiny("gpt2", tok, 0), None, train, cfg, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id)


def test_checkpoint_is_atomic(tmp_path, toy, tiny, monkeypatch):
    tr = _trainer(tmp_path, toy, tiny)
    ck.save_checkpoint(tmp_path, 1, tr.student, tr.optimizer, {"log_history": []})

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(ck.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        ck.save_checkpoint(tmp_path, 2, tr.student, tr.optimizer, {"log_history": []})
    monkeypatch.undo()
    assert (tmp_path / ".checkpoint-2.tmp").is_dir()  # the half-written one stays hidden
    assert not (tmp_path / "checkpoint-2").exists()
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    ck.save_checkpoint(tmp_path, 2, tr.student, tr.optimizer, {"log_history": []})
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert not (tmp_path / ".checkpoint-2.tmp").exists()


def test_checkpoint_is_pickle_free_and_roundtrips(tmp_path, toy, tiny):
    tr = _trainer(tmp_path, toy, tiny)
    tr.train()
    folder = ck.latest_checkpoint(tmp_path)
    assert {p.suffix for p in folder.iterdir()} == {".safetensors", ".json"}
    fresh = _trainer(tmp_path / "b", toy, tiny)
    torch.manual_seed(123)
    state = ck.load_checkpoint(folder, fresh.student, fresh.optimizer)
    assert state["global_step"] == 1
    for (n, p), (_, q) in zip(tr.student.named_parameters(), fresh.student.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    s1, s2 = tr.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert all(torch.equal(s1[i][k], s2[i][k]) for i in s1 for k in s1[i])


def test_loading_refuses_pickled_weights(tmp_path, toy, tiny):
    from dpkd.integrations.transformers.models import load_causal_lm

    tok, _, _ = toy
    model = tiny("gpt2", tok, 0)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle: must not be loaded
    with pytest.raises(OSError):
        load_causal_lm(tmp_path)
