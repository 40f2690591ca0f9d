"""The real-teacher preset end to end at smoke size: SmolLM2-135M-Instruct (cached folder), a layer-dropped
narrower Llama student, SFT start on the teacher's greedy responses, SFT / MiniLLM / DPKD two steps each."""

import json

import pytest
from dpkd.integrations.transformers.job import PRESETS, run_job


@pytest.mark.slow
def test_smollm2_preset_smoke(tmp_path, smollm2_dir):
    cache = smollm2_dir.parent.parent  # <cache>/pretrained/<model>: the job finds the converted folder there
    out = tmp_path / "res"
    run_job(PRESETS["smollm2-smoke"], results_dir=out, cache_dir=cache, show_progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["summary"]) == {"teacher", "sft_start", "sft", "minillm", "dpkd"}
    for name in ("sft", "minillm", "dpkd"):
        ev = metrics["per_seed"][name][0]
        assert {"greedy", "sampled", "vs_teacher"} <= set(ev)
        assert 0 <= ev["vs_teacher"]["overall"]["rougeL"] <= 100
    hist = metrics["histories"]["dpkd"][0]
    assert [r["step"] for r in hist if "eval/frozen/rewards/accuracies" in r] == [2, 4]  # start, end
    assert {"rewards/margins", "distil_loss", "pt_lm_loss"} <= set(hist[-1])
    cfg = metrics["config"]
    assert cfg["teacher_model"] == "smollm2" and cfg["dataset_responses"] == "teacher"
    assert "| DPKD (Eq. 9) |" in (out / "results.md").read_text()
