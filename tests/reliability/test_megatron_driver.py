"""The Megatron driver under bad flags, damaged checkpoints, changed configs and a second run on one folder.

Flags are checked in this process (``parse_args`` runs ``run_config.argument_errors``: nothing is loaded);
everything that needs the world runs on the real 2-process gloo world (tests/megatron/gloo_pool.py).
"""

import contextlib
import io
import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (the `megatron` extra)")

COMMON = ["--cpu", "--num-examples", "16", "--global-batch", "4", "--max-prompt", "120", "--max-length", "140",
          "--lr", "1e-2", "--seed", "3", "--tp", "2"]


def _write_config(folder, **over):
    folder.mkdir()
    config = dict(model_type="opt", vocab_size=80, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                  ffn_dim=64, max_position_embeddings=512, word_embed_proj_dim=32, do_layer_norm_before=True)
    (folder / "config.json").write_text(json.dumps({**config, **over}))
    return str(folder)


def _bad_flags(tmp_path):
    """(argv, the text the error must contain) — every flag problem knowable before a model loads."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "no_tok").mkdir()
    short = _write_config(tmp_path / "short", max_position_embeddings=64)
    three_heads = _write_config(tmp_path / "three_heads", num_attention_heads=3, hidden_size=33,
                                word_embed_proj_dim=33)
    other_vocab = _write_config(tmp_path / "other_vocab", vocab_size=96)
    same_vocab = _write_config(tmp_path / "same_vocab")
    return [
        (["--tp", "0"], "--tp 0: must be at least 1"),
        (["--global-batch", "0"], "--global-batch 0: must be at least 1"),
        (["--log-interval", "0"], "--log-interval 0: must be at least 1"),
        (["--steps", "0"], "--steps 0: must be at least 1"),
        (["--dp", "0"], "--dp 0: must be at least 1"),
        (["--lr-tmax", "0"], "--lr-tmax 0"),
        (["--save-interval", "-1"], "--save-interval -1"),
        (["--lr", "0"], "--lr 0.0: must be a finite number > 0"),
        (["--lr", "nan"], "--lr nan"),
        (["--lr-min", "1"], "--lr-min 1.0: must not exceed --lr"),
        (["--weight-decay", "-0.1"], "--weight-decay -0.1"),
        (["--clip-grad", "inf"], "--clip-grad inf"),
        (["--temperature", "0"], "--temperature 0.0"),
        (["--max-prompt", "200", "--max-length", "150"], "--max-length 150: must exceed --max-prompt 200"),
        (["--mode", "sequence", "--max-new-tokens", "0"], "--max-new-tokens 0"),
        (["--teacher-generate"], "--teacher-generate: only in --mode sequence"),
        (["--beta", "-1"], "`beta` must lie in (0, ∞), got -1.0"),
        (["--method-arg", "tau"], "--method-arg 'tau': expected NAME=VALUE"),
        (["--method-arg", "beta=big"], "--method-arg beta=big: 'big' is not a number"),
        (["--method", "simpo"], "--method simpo does not run in --mode token"),
        (["--resume"], "--resume: needs --save-dir"),
        (["--save-dir", str(tmp_path / "sd"), "--override", "seed"], "--override seed: not a field that may change"),
        (["--save-dir", str(a_file / "sub")], f"--save-dir {a_file / 'sub'}: cannot write there"),
        (["--metrics-file", str(a_file / "m.jsonl")], "--metrics-file"),
        (["--metrics-file", str(tmp_path)], "is a folder"),
        (["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),
        (["--teacher", "/missing"], "--teacher /missing: '/missing' is neither a preset"),
        (["--student", str(a_file)], "--student"),
        (["--tokenizer", "/missing"], "--tokenizer /missing: no such folder"),
        (["--tokenizer", str(tmp_path / "no_tok")], "holds none of tokenizer.json"),
        (["--teacher", short, "--student", same_vocab], f"--teacher {short}: has 64 positions, the run needs 512"),
        (["--teacher", three_heads, "--student", same_vocab], "--tp 2: does not divide --teacher's 3 attention heads"),
        (["--teacher", other_vocab, "--student", same_vocab], "vocabulary 80 differs from --teacher's 96"),
    ]


def test_every_bad_flag_is_refused_up_front_naming_it(tmp_path, capsys, monkeypatch):
    from dpkd.integrations.megatron import distill

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cases = _bad_flags(tmp_path)
    for argv, want in cases:
        with pytest.raises(SystemExit) as exc:
            distill.parse_args(["--cpu", "--tp", "2"] + argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and want in err, f"{argv}: {err[-600:]}"
    # the layout against torchrun's WORLD_SIZE, before the process group starts
    monkeypatch.setenv("WORLD_SIZE", "2")
    for argv, want in [(["--tp", "3"], "--tp 3: does not divide the world size 2"),
                       (["--tp", "1", "--global-batch", "3"],
                        "--global-batch 3: not divisible by the data-parallel size 2"),
                       (["--tp", "1", "--dp", "3"], "--dp 3: --tp 1 × --dp 3 is not the world size 2")]:
        with pytest.raises(SystemExit):
            distill.parse_args(["--cpu"] + argv)
        assert want in capsys.readouterr().err, argv
    assert not (tmp_path / "sd").exists()  # refused before any folder was made
    print(f"\nreliability: {len(cases) + 3} bad Megatron flags, {len(cases) + 3} clear errors")


# --------------------------------------------------------------------------------------------------
# on the 2-process world


def body_run(argv, *, forbid_models=False):
    """Run the driver; returns (history or the SystemExit message, what it said on stderr)."""
    from dpkd.integrations.megatron import distill

    if forbid_models:  # the refusal must come before any model is built
        original = distill._build
        distill._build = lambda *a, **k: (_ for _ in ()).throw(AssertionError("a model was built"))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            result = distill.run(distill.parse_args(argv))
    except SystemExit as e:
        result = f"SystemExit: {e}"
    finally:
        if forbid_models:
            distill._build = original
    return result, err.getvalue()


def _rank0(pool, argv, **kw):
    return pool.run(body_run, argv, tp=2, **kw)[0]


def _cosine(lr, lr_min, t, t_max):
    return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * t / t_max)) / 2


def test_world_layout_refused_naming_the_flag(gloo_pool, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out, _ = _rank0(gloo_pool, ["--cpu", "--tp", "3", "--steps", "1"], forbid_models=True)
    assert out == "SystemExit: --tp 3: does not divide the world size 2"
    out, _ = _rank0(gloo_pool, ["--cpu", "--tp", "1", "--global-batch", "3"], forbid_models=True)
    assert out.startswith("SystemExit: --global-batch 3: not divisible by the data-parallel size 2")


def test_damaged_checkpoints_and_marker_fall_back_to_the_newest_intact(gloo_pool, tmp_path):
    save = tmp_path / "run"
    argv = COMMON + ["--steps", "4", "--save-dir", str(save), "--save-interval", "2"]
    full, _ = _rank0(gloo_pool, argv)
    assert sorted(p.name for p in save.iterdir()) == ["latest", "step_0000002", "step_0000004"]  # no lock left

    # an empty marker and a truncated chunk file in step 4: resume from step 2, replaying steps 3-4 exactly
    (save / "latest").write_text("")
    chunk = save / "step_0000004" / "__0_0.distcp"
    chunk.write_bytes(chunk.read_bytes()[:-100])
    resumed, said = _rank0(gloo_pool, argv + ["--resume"])
    assert f"{save / 'latest'} does not hold a step number" in said
    assert f"skipping step 4: {chunk} is truncated" in said
    assert [h["step"] for h in resumed] == [3, 4]
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full[2:]]
    assert (save / "latest").read_text() == "4"  # rewritten (atomically) by the resumed run

    # same size, altered bytes: the CRC-32 differs; resumed from step 2 again (and step 4 rewritten)
    common = save / "step_0000004" / "common.pt"
    data = bytearray(common.read_bytes())
    data[len(data) // 2] ^= 0xFF
    common.write_bytes(bytes(data))
    resumed, said = _rank0(gloo_pool, argv + ["--resume"])
    assert f"skipping step 4: {common} is damaged" in said and [h["step"] for h in resumed] == [3, 4]
    # a folder without a manifest (as written before manifests) whose common.pt is garbage: the load itself
    # fails, the driver names the folder and falls back to step 2
    (save / "step_0000004" / "dpkd_checkpoint.json").unlink()
    common.write_bytes(b"not a checkpoint")
    resumed, said = _rank0(gloo_pool, argv + ["--resume"])
    assert f"{save / 'step_0000004'} could not be loaded" in said and "falling back" in said
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full[2:]]


def test_resume_refuses_a_changed_config_and_recomputes_the_schedule(gloo_pool, tmp_path):
    save = tmp_path / "run"
    base = COMMON + ["--save-dir", str(save), "--lr-min", "1e-4"]
    _rank0(gloo_pool, base + ["--steps", "4"])
    for change, want in [(["--lr", "2e-2"], "--lr: checkpoint 0.01, now 0.02"),
                         (["--seed", "4"], "--seed: checkpoint 3, now 4"),
                         (["--objective", "paper"], "--objective: checkpoint 'released', now 'paper'"),
                         (["--method", "kd"], "--method: checkpoint 'dpkd_token', now 'kd'"),
                         (["--steps", "8"], "--steps: checkpoint 4, now 8")]:
        out, _ = _rank0(gloo_pool, base + ["--steps", "4", "--resume"] + change, forbid_models=True)
        assert out.startswith("SystemExit: --resume:") and want in out, (change, out)
    # --steps 8 with --override steps: the cosine over 8 steps from step 4 on (it used to climb back up)
    longer, said = _rank0(gloo_pool, base + ["--steps", "8", "--resume", "--override", "steps"])
    assert "--override: --steps: checkpoint 4, now 8" in said
    assert [h["step"] for h in longer] == [5, 6, 7, 8]
    for h in longer:
        assert h["lr"] == pytest.approx(_cosine(1e-2, 1e-4, h["step"], 8), rel=1e-12), h["step"]
    # and a new --lr is used, not silently ignored
    (save / "latest").write_text("4")
    newer, _ = _rank0(gloo_pool, base + ["--steps", "8", "--lr", "2e-2", "--resume", "--override", "steps,lr"])
    assert newer[0]["lr"] == pytest.approx(_cosine(2e-2, 1e-4, 5, 8), rel=1e-12)
    out, _ = _rank0(gloo_pool, base + ["--steps", "3", "--lr", "2e-2", "--resume", "--override", "steps,lr"],
                    forbid_models=True)
    assert out.startswith("SystemExit: --steps 3:") and "at step 8 already" in out


def test_a_second_run_on_one_save_dir_is_refused(gloo_pool, tmp_path):
    save = tmp_path / "run"
    save.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": holder.pid, "host": os.uname().nodename, "purpose": "another run"}
        (save / ".dpkd.lock").write_text(json.dumps(lock))
        out, _ = _rank0(gloo_pool, COMMON + ["--steps", "1", "--save-dir", str(save)], forbid_models=True)
        assert f"is in use by PID {holder.pid}" in out and out.startswith(f"SystemExit: --save-dir {save}")
    finally:
        holder.kill()
        holder.wait(timeout=10)
    # its owner is gone (killed): the stale lock is taken over, saying so, and the run trains
    out, said = _rank0(gloo_pool, COMMON + ["--steps", "1", "--save-dir", str(save)])
    assert f"took over the stale lock {save / '.dpkd.lock'} (PID {holder.pid} is not running)" in said
    assert [h["step"] for h in out] == [1] and not (save / ".dpkd.lock").exists()
