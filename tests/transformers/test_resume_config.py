"""Resuming refuses a changed configuration (naming each changed field) unless the change is one a resumed run
may make (run length, logging, checkpoints) or is asked for explicitly; a longer run's schedule is the new one."""

import json
import math

import pytest
from dpkd.integrations.transformers.checkpoint import latest_checkpoint
from dpkd.integrations.transformers.trainer import DistillConfig, DistillTrainer


def _cfg(out, **kw):
    base = dict(output_dir=str(out), method="sft", max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                disable_tqdm=True, report_to="none", objective="distil-only", learning_rate=1e-3,
                min_learning_rate=1e-5, lr_scheduler_type="cosine")
    return DistillConfig(**{**base, **kw})


def _trainer(toy, tiny, cfg):
    tok, train, _ = toy
    return DistillTrainer(tiny("gpt2", tok, 0), None, train, cfg, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id)


@pytest.mark.parametrize(("change", "words"), [
    ({"learning_rate": 2e-3}, "learning_rate: 0.001 -> 0.002"),
    ({"seed": 1}, "seed: 0 -> 1"),
    ({"method": "seqkd", "teacher_outputs": "dataset"}, "method: 'sft' -> 'seqkd'"),
    ({"objective": "half"}, "objective: {"),
])
def test_a_changed_config_is_refused(tmp_path, toy, tiny, change, words):
    _trainer(toy, tiny, _cfg(tmp_path)).train()
    before = (latest_checkpoint(tmp_path) / "trainer_state.json").read_text()
    with pytest.raises(ValueError, match="another configuration wrote") as e:
        _trainer(toy, tiny, _cfg(tmp_path, max_steps=3, **change)).train(resume_from_checkpoint=True)
    assert words in str(e.value) and "allow_changes=" in str(e.value)
    assert latest_checkpoint(tmp_path).name == "checkpoint-2"
    assert (latest_checkpoint(tmp_path) / "trainer_state.json").read_text() == before  # nothing written


def test_a_longer_run_resumes_on_the_new_schedule(tmp_path, toy, tiny):
    _trainer(toy, tiny, _cfg(tmp_path)).train()
    res = _trainer(toy, tiny, _cfg(tmp_path, max_steps=4, save_total_limit=None)).train(resume_from_checkpoint=True)
    assert [r["step"] for r in res.log_history] == [1, 2, 3, 4]
    # steps 3, 4 follow cosine annealing from 1e-3 to 1e-5 over the new 4 steps (closed form)
    want = [1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in (2, 3)]
    assert [r["learning_rate"] for r in res.log_history[2:]] == pytest.approx(want, rel=1e-9)


def test_an_explicit_change_is_accepted(tmp_path, toy, tiny):
    _trainer(toy, tiny, _cfg(tmp_path)).train()
    res = _trainer(toy, tiny, _cfg(tmp_path, max_steps=3, learning_rate=2e-3)).train(
        resume_from_checkpoint=True, allow_changes=("learning_rate",))
    assert res.log_history[-1]["learning_rate"] == pytest.approx(1e-5 + (2e-3 - 1e-5) * 0.5 * (1 + math.cos(
        math.pi * 2 / 3)), rel=1e-9)
    saved = json.loads((latest_checkpoint(tmp_path) / "trainer_state.json").read_text())["config"]
    assert saved["learning_rate"] == 2e-3  # the checkpoint records the configuration that wrote it
    with pytest.raises(ValueError, match=r"`allow_changes` names no DistillConfig field: \['lr'\]"):
        _trainer(toy, tiny, _cfg(tmp_path)).train(resume_from_checkpoint=True, allow_changes=("lr",))
