"""SIGKILL at random moments, bounded in count and time, of the HF trainer and of every cache the job writes
(the teacher log-prob cache, the pre-generated teacher outputs, the GGUF → safetensors model cache): after
every kill a reader finds a complete file or none — never part of one — and resuming gives exactly the
uninterrupted run's result. The moments are drawn from a seed printed with any failure (DPKD_KILL_SEED
replays it)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_kill_loop_worker.py")
KILLS, BUDGET_S = 2, 6  # per scenario: kills that land, seconds of kill loop (at least one kill lands)
SCENARIOS = ["trainer", "logp_cache", "teacher_outputs", "converted_model"]


@pytest.fixture(scope="module")
def loops(tmp_path_factory):
    pytest.importorskip("gguf")
    seed = int(os.environ.get("DPKD_KILL_SEED", time.time_ns() % 2**31))
    proc = subprocess.run([sys.executable, str(WORKER), str(tmp_path_factory.mktemp("kills")), str(seed), str(KILLS),
                           str(BUDGET_S), *SCENARIOS], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"seed {seed}: {proc.stderr[-3000:]}"
    return seed, {r["scenario"]: r for r in map(json.loads, proc.stdout.splitlines())}, proc.stderr


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_random_kills_lose_nothing_and_mix_nothing(loops, scenario):
    seed, results, stderr = loops
    r = results[scenario]
    print(json.dumps(r))
    assert r["kills"] >= 1, f"seed {seed}: no kill landed mid-run ({r})"
    assert not r["problems"], f"seed {seed}: {r['problems']}\n{stderr[-3000:]}"
