"""`dpkd distill --preset ci` end to end in a subprocess (fresh cache: the teacher is trained too)."""

import json
import resource
import subprocess
import sys
import time

import pytest
from dpkd.integrations.methods import METHODS, TABLE1


@pytest.mark.slow
def test_distill_ci_preset_end_to_end(tmp_path):
    t0 = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [sys.executable, "-m", "dpkd.integrations.cli", "distill", "--preset", "ci", "--results-dir",
         str(tmp_path / "res"), "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=600,
    )
    elapsed = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = tmp_path / "res"
    for name in ("results.md", "metrics.json", "reward.png", "rkld.png", "rouge.png"):
        assert (res / name).is_file(), name
    table = (res / "results.md").read_text()
    assert table in proc.stdout  # the table is printed
    assert str(res.resolve()) in proc.stdout  # and the folder it wrote is named
    for name in TABLE1:
        assert f"| {METHODS[name].title} |" in table
    metrics = json.loads((res / "metrics.json").read_text())
    assert set(metrics["summary"]) == {"teacher", "sft_start", *TABLE1}
    hist = metrics["histories"]["dpkd"][0]
    assert {"eval/frozen/rewards/accuracies", "eval/fresh/rewards/margins", "eval/rkld", "eval/rougeL"} <= set(hist[-1])
    assert hist[0]["step"] == metrics["config"]["init_steps"]  # the curves start where the SFT start ended
    assert metrics["filters"]["train"]["kept"] + sum(metrics["filters"]["train"]["dropped"].values()) == \
        metrics["filters"]["train"]["total"]
    assert any(d.name.startswith("teacher-") for d in (tmp_path / "cache").iterdir())  # cached
    # "under 2 minutes on 2 cores" = under 240 CPU-seconds: CPU time, not wall time, so that a shared CI
    # machine's load does not decide the outcome
    assert cpu_s < 240, f"ci preset used {cpu_s:.0f} CPU-s ({elapsed:.0f}s wall)"


@pytest.mark.parametrize(("env", "words"), [
    ({"ACCELERATE_USE_FSDP": "true"}, "ACCELERATE_USE_FSDP) asks for FSDP, but this run is on CPU"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "ACCELERATE_USE_DEEPSPEED) asks for DeepSpeed"),
    ({"WORLD_SIZE": "3"}, "--batch-size 8 (examples per step, the global batch) must be divisible by the 3"),
])
def test_a_launch_this_machine_cannot_run_is_refused_before_anything_runs(tmp_path, monkeypatch, env, words):
    """What `accelerate launch --config_file fsdp.yaml` / a DeepSpeed config / torchrun with 3 processes set in
    the environment, refused by `dpkd distill` before it writes or trains anything."""
    from dpkd.integrations.cli import main

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        main(["distill", "--preset", "ci", "--results-dir", str(tmp_path / "res"), "--cache-dir", str(tmp_path / "c")])
    assert words in str(e.value)
    assert not (tmp_path / "res").exists() and not (tmp_path / "c").exists()
