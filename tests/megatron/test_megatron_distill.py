"""The distillation driver: a few steps at TP=2 give the same losses as at TP=1 (token and sequence level),
a resumed run replays the same steps, and examples/megatron_opt.sh completes (what CI runs)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (the `megatron` extra)")

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--cpu", "--num-examples", "16", "--global-batch", "4", "--max-prompt", "120", "--max-length", "140",
          "--lr", "1e-2", "--seed", "3"]  # a large lr so that a wrong gradient shows in the later losses


def body_run(argv):
    from dpkd.integrations.megatron import distill

    return distill.run(distill.parse_args(argv))


def _losses(history, keys):
    return [[h[k] for k in keys] for h in history]


@pytest.mark.parametrize("mode,keys", [
    ("token", ["loss", "sft_loss", "distil_loss", "pt_lm_loss", "pt_kd_loss", "agreement", "grad_norm"]),
    ("sequence", ["loss", "distil_loss", "pt_lm_loss", "rewards/margins", "student_len", "grad_norm"]),
])
def test_tp2_equals_tp1(gloo_pool, mode, keys):
    argv = COMMON + ["--mode", mode, "--steps", "3", "--max-new-tokens", "5"]
    tp2 = gloo_pool.run(body_run, argv + ["--tp", "2"], tp=2)
    tp1 = gloo_pool.run(body_run, argv + ["--tp", "1"], tp=1)  # TP=1 x DP=2: the batch is split instead
    assert _losses(tp2[0], keys) == _losses(tp2[1], keys)  # replicated metrics
    assert len(tp2[0]) == 3
    for step, (a, b) in enumerate(zip(_losses(tp2[0], keys), _losses(tp1[0], keys), strict=True)):
        assert a == pytest.approx(b, rel=2e-5, abs=2e-6), f"step {step + 1}: {keys} {a} vs {b}"
    assert tp2[0][-1]["loss"] != tp2[0][0]["loss"]  # it trains


def test_resume_replays_the_same_steps(gloo_pool, tmp_path):
    argv = COMMON + ["--mode", "token", "--tp", "2", "--steps", "4", "--save-dir", str(tmp_path),
                     "--save-interval", "2"]
    full = gloo_pool.run(body_run, argv)[0]
    (tmp_path / "latest").write_text("2")
    resumed = gloo_pool.run(body_run, argv + ["--resume"])[0]
    assert [h["step"] for h in resumed] == [3, 4]
    assert _losses(resumed, ["loss", "grad_norm"]) == _losses(full[2:], ["loss", "grad_norm"])


@pytest.mark.slow
def test_example_script_completes(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    result = subprocess.run(["bash", str(ROOT / "examples" / "megatron_opt.sh")], env=env, capture_output=True,
                            text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "done:" in result.stdout
    for name in ("token.jsonl", "sequence.jsonl"):
        lines = (tmp_path / name).read_text().splitlines()
        assert len(lines) == (6 if name == "token.jsonl" else 3)
    assert (tmp_path / "token" / "latest").read_text() == "6"
