"""The job's pieces: paired per-seed statistics, aggregation and tables, the progress display, the CLI's
flags (every one states its default and range) and choices (read from the method table)."""

import argparse
import io
import math

import pytest
from dpkd.integrations.cli import build_parser, job_config
from dpkd.integrations.methods import ABLATIONS, METHODS, TABLE1, VARIANTS
from dpkd.integrations.transformers.job import PRESETS, planned_runs
from dpkd.integrations.transformers.progress import Progress
from dpkd.integrations.transformers.report import (
    T_CRIT_975,
    aggregate,
    paired_difference,
    resolved_pairs,
    summary_markdown,
)


def test_t_critical_values_match_scipy():
    st = pytest.importorskip("scipy.stats")
    for df, t in enumerate(T_CRIT_975, start=1):
        assert t == pytest.approx(float(st.t.ppf(0.975, df)), abs=6e-4)


def test_paired_difference_is_a_paired_t_test():
    st = pytest.importorskip("scipy.stats")
    a, b = [80.0, 82.5, 79.0, 81.0], [78.0, 81.0, 77.5, 80.2]
    pd = paired_difference(a, b)
    assert pd["per_seed"] == pytest.approx([2.0, 1.5, 1.5, 0.8])
    assert pd["mean"] == pytest.approx(1.45) and pd["sd"] == pytest.approx(0.4933, abs=1e-4)
    p = st.ttest_rel(a, b).pvalue
    assert (pd["verdict"] == "resolved") == (p < 0.05)
    noisy = paired_difference([80.0, 70.0, 90.0], [79.0, 75.0, 84.0])
    assert noisy["verdict"] == "within noise" and st.ttest_rel([80.0, 70.0, 90.0], [79.0, 75.0, 84.0]).pvalue > 0.05
    assert paired_difference([1.0], [0.0])["verdict"] == "one seed: no test"


def test_resolved_pairs_lists_every_resolved_pair_once():
    # methods whose scores fall with their position: every pair resolves, and every one must be flipped to
    # A − B > 0, which is what once rebound the outer loop's name and repeated some pairs while losing others
    names = ["m0", "m1", "m2", "m3", "m4"]
    summary = {n: {"per_seed": {"k": [10.0 * i + s for s in (0.0, 0.4, 0.9)]}} for i, n in enumerate(names)}
    summary["m2"]["per_seed"]["k"] = [20.0, 35.0, 5.0]  # noisy: within noise against everything
    got = resolved_pairs(summary, names, "k")
    expected = set()
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            pd = paired_difference(summary[x]["per_seed"]["k"], summary[y]["per_seed"]["k"])
            if pd["verdict"] == "resolved":
                expected.add((x, y) if pd["mean"] > 0 else (y, x))
    assert len(expected) == 6  # the 10 pairs less the 4 with m2
    assert sorted((a, b) for a, b, _ in got) == sorted(expected)
    for a, b, pd in got:
        assert pd["mean"] > 0
        assert pd["per_seed"] == pytest.approx([x - y for x, y in zip(summary[a]["per_seed"]["k"],
                                                                        summary[b]["per_seed"]["k"])])


def _ev(rl, em):
    scores = {"overall": {"rougeL": rl, "exact_match": em},
              "buckets": {b: {"rougeL": rl, "exact_match": em, "n": 1} for b in ("0-30", "30-70", ">70")}}
    return {"greedy": {**scores, "first_token": {"kld": 0.1, "rkld": 0.2}}, "sampled": scores, "vs_teacher": scores}


def test_aggregate_and_tables():
    teacher = {m: _ev(90.0, 50.0)["sampled"] for m in ("greedy", "sampled", "y_t_train")}
    runs = {"sft": [_ev(70.0, 10.0), _ev(72.0, 12.0), _ev(71.0, 11.0)],
            "dpkd": [_ev(75.0, 10.0), _ev(77.5, 12.0), _ev(76.0, 11.0)],
            "dpkd_no_lm": [_ev(74.0, 9.0), _ev(76.0, 9.0), _ev(75.0, 9.0)]}
    hist = {"dpkd": [[{"step": 0, "eval/rkld": 0.5, "eval/frozen/rewards/accuracies": 0.2},
                      {"step": 5, "eval/rkld": 0.3, "eval/frozen/rewards/accuracies": 0.6}]] * 3}
    s = aggregate(runs, teacher, hist)
    assert s["sft"]["greedy.rougeL"] == pytest.approx([71.0, 1.0])
    assert s["dpkd"]["rkld_min"][0] == 0.3 and s["dpkd"]["reward_max"][0] == 0.6
    assert math.isnan(s["sft"]["rkld_min"][0])
    cfg = PRESETS["default"]
    report = type("R", (), {"kept": 100})()
    md = summary_markdown(s, cfg, report, report)
    assert "| SFT | 71.00 ± 1.00 |" in md and "| DPKD (Eq. 9) |" in md and "**Table 3**" in md
    assert "| SFT | -5.17 ± 0.29 | -5.00, -5.50, -5.00 | resolved |" in md  # the paired line, Rouge-L
    resolved = md.split("Resolved between-method differences")[1].split("**Table")[0]
    assert "| greedy Rouge-L | DPKD (Eq. 9) − SFT | +5.17 ± 0.29 | +5.00, +5.50, +5.00 |" in resolved  # oriented A > B
    assert "greedy EM" not in resolved  # identical EM per seed: nothing to resolve
    assert "w/o LM loss" not in resolved  # ablations are not between-method pairs of Table 1


def test_progress_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    p = Progress(10, stream=out, interval_s=1e9)
    p.stage("distil", method="dpkd", seed=1)
    p.advance(5)  # no line: not a stage change and within the interval
    p.stage("report")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "seed 1 · dpkd" in lines[0] and lines[1].startswith("[ 50.0%] report")
    assert "remaining" in lines[1] and "\r" not in out.getvalue()


def test_every_distill_flag_states_its_default():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    distill = sub.choices["distill"]
    for action in distill._actions:
        if action.dest in ("help",):
            continue
        assert action.help and "default" in action.help, action.dest
    methods = next(a for a in distill._actions if a.dest == "methods")
    assert methods.choices == list(METHODS)
    assert all(m in distill.epilog for m in METHODS)  # the method table with hyper-parameters and ranges


def test_job_config_from_flags():
    args = build_parser().parse_args(["distill", "--variants", "--ablations", "--seeds", "3", "4",
                                      "--method-arg", "dpkd.beta=0.5", "--method-arg", "minillm.length_norm=false",
                                      "--sample-temperature", "0.7", "--lr", "3e-3"])
    cfg = job_config(args)
    assert cfg.methods == TABLE1 + VARIANTS and cfg.ablations == tuple(ABLATIONS) and cfg.seeds == (3, 4)
    assert cfg.sample_temperature == 0.7 and cfg.student_lr == 3e-3
    runs = {r.name: r for r in planned_runs(cfg)}
    assert runs["dpkd"].method_args["beta"] == 0.5 and runs["minillm"].method_args["length_norm"] is False
    assert runs["dpkd_no_lm"].method == "dpkd" and runs["dpkd_no_lm"].objective == {"lm_coef": 0.0}
    for bad, match in ((["--method-arg", "dpkd.beta=-1"], "beta"), (["--method-arg", "dpkd.tau=1"], "tau"),
                       (["--method-arg", "nope.x=1"], "unknown method")):
        with pytest.raises(SystemExit, match=match):
            job_config(build_parser().parse_args(["distill", *bad]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["distill", "--sample-temperature", "0"])


def test_results_do_not_depend_on_the_workers(tmp_path):
    """One process vs two forked workers sharing the SFT starts and the runs (a seed's runs start as soon as
    its start is saved, in another order): the same numbers for every seed and run."""
    import json
    from dataclasses import replace

    from dpkd.integrations.transformers.job import run_job

    cfg = replace(PRESETS["ci"], n_train=24, n_valid=2, n_test=3, n_pretrain=8, teacher_steps=4, init_steps=3,
                  method_steps=2, batch_size=4, max_new_tokens=6, seeds=(0, 1), eval_every=2, n_probe=2,
                  methods=("sft", "dpkd"))
    per_seed = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        run_job(replace(cfg, workers=workers), results_dir=out, cache_dir=tmp_path / "cache", show_progress=False)
        metrics = json.loads((out / "metrics.json").read_text())
        per_seed.append((metrics["per_seed"], metrics["histories"]))
    assert per_seed[0] == per_seed[1]
    assert len(per_seed[0][0]["dpkd"]) == 2 and len(per_seed[0][0]["sft_start"]) == 2
