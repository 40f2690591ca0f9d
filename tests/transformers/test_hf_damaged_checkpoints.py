"""A damaged newest checkpoint (truncated or altered weights, optimizer state or trainer state, a missing RNG
file, a garbled manifest) is named, and DistillTrainer resumes from the newest intact one, saying so: the
result equals the uninterrupted run. A named damaged checkpoint (resume or init_from) is refused naming
the file; nothing loadable left means a fresh start, said. A disk that fills mid-save loses nothing."""

import shutil

import pytest
import torch
from dpkd.integrations.transformers import checkpoint as ck
from dpkd.integrations.transformers.trainer import DistillConfig, DistillTrainer
from safetensors.torch import load_file


def _trainer(out, toy, tiny, steps=3):
    tok, train, _ = toy
    cfg = DistillConfig(output_dir=str(out), method="sft", max_steps=steps, per_device_train_batch_size=4,
                        save_steps=1, logging_steps=1, save_total_limit=None, disable_tqdm=True, report_to="none",
                        objective="distil-only", lr_scheduler_type="cosine", warmup_steps=1)
    return DistillTrainer(tiny("gpt2", tok, 0), None, train, cfg, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id)


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "model.safetensors truncated": ("model.safetensors", _truncate),
    "optimizer.safetensors altered": ("optimizer.safetensors", _flip_a_byte),
    "trainer_state.json truncated": ("trainer_state.json", _truncate),
    "rng-rank0.safetensors missing": ("rng-rank0.safetensors", lambda p: p.unlink()),
    "manifest garbled": (ck.MANIFEST, lambda p: p.write_text("{not json")),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, toy, tiny):
    """An uninterrupted 3-step run saving every step."""
    out = tmp_path_factory.mktemp("reference")
    _trainer(out, toy, tiny).train()
    return out


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_used(reference, tmp_path, toy, tiny, kind):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    name, damage = DAMAGE[kind]
    damage(out / "checkpoint-3" / name)
    intact, notes = ck.intact_checkpoints(out)
    assert intact == [out / "checkpoint-2", out / "checkpoint-1"]
    assert len(notes) == 1 and str(out / "checkpoint-3" / name) in notes[0]
    trainer = _trainer(out, toy, tiny)
    trainer.train(resume_from_checkpoint=True)
    assert str(out / "checkpoint-3" / name) in trainer.resume_notes[0]
    assert trainer.resume_notes[-1] == f"resuming from {out / 'checkpoint-2'}, the newest intact checkpoint"
    want, got = _weights(reference / "checkpoint-3"), _weights(out / "checkpoint-3")  # step 3 retrained
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert ck.verify_checkpoint(out / "checkpoint-3") is None


def test_named_damaged_checkpoints_are_refused_naming_the_file(reference, tmp_path, toy, tiny):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    _truncate(out / "checkpoint-2" / "model.safetensors")
    with pytest.raises(ck.CheckpointError, match=str(out / "checkpoint-2" / "model.safetensors")):
        _trainer(out, toy, tiny).train(resume_from_checkpoint=str(out / "checkpoint-2"))
    with pytest.raises(ck.CheckpointError, match=str(out / "checkpoint-2" / "model.safetensors")):
        _trainer(tmp_path / "next", toy, tiny).train(init_from=out / "checkpoint-2")


def test_every_checkpoint_damaged_starts_afresh_saying_so(reference, tmp_path, toy, tiny):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for step in (1, 2, 3):
        _flip_a_byte(out / f"checkpoint-{step}" / "model.safetensors")
    trainer = _trainer(out, toy, tiny)
    trainer.train(resume_from_checkpoint=True)
    assert len(trainer.resume_notes) == 4
    assert trainer.resume_notes[-1] == f"no intact checkpoint in {out}; starting at step 0"
    want, got = _weights(reference / "checkpoint-3"), _weights(out / "checkpoint-3")
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_an_intact_checkpoint_that_fails_to_load_falls_back(reference, tmp_path, toy, tiny):
    """A checkpoint without a manifest (an older dpkd's) whose weights are truncated verifies, fails to load,
    and the previous one is used, saying so."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "checkpoint-3" / ck.MANIFEST).unlink()
    _truncate(out / "checkpoint-3" / "model.safetensors")
    trainer = _trainer(out, toy, tiny)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.resume_notes[0].startswith(f"{out / 'checkpoint-3'} could not be loaded (")
    assert "falling back to the previous checkpoint" in trainer.resume_notes[0]
    want, got = _weights(reference / "checkpoint-3"), _weights(out / "checkpoint-3")
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_full_disk_mid_save_leaves_every_checkpoint_intact(reference, tmp_path, toy, tiny, full_disk):
    """The disk fills while checkpoint-4's weights are written: the error is raised, nothing half-written is
    visible, and resuming then gives what the run gives without the full disk."""
    want_dir = tmp_path / "no-failure"
    shutil.copytree(reference, want_dir)
    _trainer(want_dir, toy, tiny, steps=4).train(resume_from_checkpoint=True)  # one more step
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    with full_disk(20_000), pytest.raises(ck.CheckpointError, match="File too large") as failed:  # weights ~40 kB
        _trainer(out, toy, tiny, steps=4).train(resume_from_checkpoint=True)
    assert str(failed.value).startswith(f"checkpoint {out / 'checkpoint-4'} could not be written (")
    assert str(failed.value).endswith(f"it was not published and the earlier checkpoints in {out} are intact")
    assert ck.intact_checkpoints(out) == ([out / f"checkpoint-{s}" for s in (3, 2, 1)], [])
    assert not (out / "checkpoint-4").exists()
    trainer = _trainer(out, toy, tiny, steps=4)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.resume_notes == [] and not [p for p in out.iterdir() if p.name.startswith(".checkpoint")]
    want, got = _weights(want_dir / "checkpoint-4"), _weights(out / "checkpoint-4")
    assert all(torch.equal(want[k], got[k]) for k in want)
