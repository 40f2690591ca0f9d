"""Aggregation over seeds, the results tables (the paper's Tables 1–5) and the curve plots of the main job.

Every table reports mean ± sample standard deviation over the seeds. Comparisons between methods are
*paired*: all methods of one seed continue the same SFT start, so the per-seed difference d_s = metric(A, s)
− metric(B, s) removes the start's variance; a difference counts as resolved when a two-sided paired t-test
rejects 0 at the 5% level (|mean(d)| / (sd(d)/√n) > t_{0.975, n−1}), otherwise it is within noise.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from ..methods import ABLATIONS, METHODS, VARIANTS
from .eval import BUCKETS

__all__ = ["aggregate", "paired_difference", "resolved_pairs", "summary_markdown", "plot_curves", "T_CRIT_975"]

#: t_{0.975, df} for df = 1..30 (two-sided 95%).
T_CRIT_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
              2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
              2.045, 2.042)


def _mean_sd(values: list[float]) -> list[float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return [float("nan"), float("nan")]
    return [statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0]


def _metric(ev: dict[str, Any], key: str) -> float:
    """A scalar of one evaluation by path: ``greedy.rougeL``, ``sampled.exact_match``, ``greedy.rougeL 0-30``,
    ``first_token.rkld``."""
    mode, _, name = key.partition(".")
    if mode == "first_token":
        return float(ev["greedy"]["first_token"][name])
    part = ev[mode]
    if " " in name:
        metric, bucket = name.split(" ", 1)
        return float(part["buckets"][bucket][metric])
    return float(part["overall"][name])


def _history_extreme(hist: list[dict[str, float]], key: str, best: Any) -> float:
    vals = [r[key] for r in hist if key in r]
    return float(best(vals)) if vals else float("nan")


SCALARS = (["greedy.rougeL", "greedy.exact_match", "sampled.rougeL", "sampled.exact_match", "vs_teacher.rougeL",
            "vs_teacher.exact_match", "first_token.kld", "first_token.rkld"]
           + [f"greedy.{m} {b}" for m in ("rougeL", "exact_match") for b in BUCKETS])


def aggregate(runs: dict[str, list[dict[str, Any]]], teacher: dict[str, Any],
              histories: dict[str, list[list[dict[str, float]]]] | None = None) -> dict[str, Any]:
    """Per run name: mean ± sd over seeds of every scalar (and the curves' rKLD min / reward max); per seed
    values under ``per_seed``; the teacher's scores as they are."""
    out: dict[str, Any] = {"teacher": {f"{mode}.{k}": [teacher[mode]["overall"][k], 0.0]
                                       for mode in ("greedy", "sampled", "y_t_train")
                                       for k in ("rougeL", "exact_match")}}
    for mode in ("greedy",):
        for m in ("rougeL", "exact_match"):
            for b in BUCKETS:
                out["teacher"][f"{mode}.{m} {b}"] = [teacher[mode]["buckets"][b][m], 0.0]
    for name, evs in runs.items():
        per_seed = {k: [_metric(e, k) for e in evs] for k in SCALARS}
        hists = (histories or {}).get(name, [])
        per_seed["rkld_min"] = [_history_extreme(h, "eval/rkld", min) for h in hists]
        per_seed["reward_max"] = [_history_extreme(h, "eval/frozen/rewards/accuracies", max) for h in hists]
        per_seed["gain_max"] = [_history_extreme(h, "eval/frozen/gain/accuracies", max) for h in hists]
        row = {k: _mean_sd(v) for k, v in per_seed.items()}
        row["per_seed"] = per_seed
        row["n_seeds"] = len(evs)
        out[name] = row
    return out


def paired_difference(a: list[float], b: list[float]) -> dict[str, Any]:
    """d = a − b per seed: mean, sd, the per-seed values and whether the paired t-test resolves it."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = statistics.fmean(d)
    sd = statistics.stdev(d) if n > 1 else float("nan")
    if n < 2:
        verdict = "one seed: no test"
    elif sd == 0:
        verdict = "resolved" if mean != 0 else "identical"
    else:
        verdict = "resolved" if abs(mean) / (sd / math.sqrt(n)) > T_CRIT_975[min(n - 1, 30) - 1] else "within noise"
    return {"mean": mean, "sd": sd, "per_seed": d, "verdict": verdict}


def _cell(v: list[float], digits: int = 2) -> str:
    if math.isnan(v[0]):
        return "–"
    return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def _title(name: str) -> str:
    if name == "sft_start":
        return "SFT start (before any method)"
    if name in METHODS:
        return METHODS[name].title
    return ABLATIONS[name].title if name in ABLATIONS else name


def _table(summary: dict[str, Any], names: list[str], cols: list[tuple[str, str, int]]) -> list[str]:
    lines = ["| method | " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for name in names:
        row = summary[name]
        lines.append(f"| {_title(name)} | " + " | ".join(_cell(row[k], d) if k in row else "–" for _, k, d in cols)
                     + " |")
    return lines


TABLE1_COLS = [("Rouge-L (greedy)", "greedy.rougeL", 2), ("EM (greedy)", "greedy.exact_match", 2),
               ("Rouge-L (sampled)", "sampled.rougeL", 2), ("EM (sampled)", "sampled.exact_match", 2),
               ("Rouge-L vs teacher", "vs_teacher.rougeL", 2), ("rKLD₁", "first_token.rkld", 4)]


PAIRED_KEYS = (("greedy.rougeL", "greedy Rouge-L"), ("greedy.exact_match", "greedy EM"),
               ("sampled.rougeL", "sampled Rouge-L"))


def resolved_pairs(summary: dict[str, Any], names: list[str], key: str) -> list[tuple[str, str, dict[str, Any]]]:
    """Every pair (A, B) of ``names`` whose paired difference in ``key`` the t-test resolves, oriented so that
    A − B > 0 (uncorrected for the number of pairs: read them with that in mind)."""
    out = []
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            pd = paired_difference(summary[first]["per_seed"][key], summary[second]["per_seed"][key])
            if pd["verdict"] != "resolved":
                continue
            # orient A − B > 0 without rebinding the loop's names (that once skipped and repeated pairs)
            a, b = (first, second) if pd["mean"] > 0 else (second, first)
            if a != first:
                pd = paired_difference(summary[a]["per_seed"][key], summary[b]["per_seed"][key])
            out.append((a, b, pd))
    return out


def _resolved_lines(summary: dict[str, Any], names: list[str]) -> list[str]:
    n_pairs = len(names) * (len(names) - 1) // 2
    lines = ["", f"Resolved between-method differences (paired t-test, 5%, each of the {n_pairs} pairs tested "
             "on its own, no multiple-comparison correction; every pair not listed is within noise):", "",
             "| metric | A − B | mean ± sd over seeds | per seed |", "|---|---|---|---|"]
    found = False
    for key, label in PAIRED_KEYS:
        for a, b, pd in resolved_pairs(summary, names, key):
            found = True
            seeds = ", ".join(f"{x:+.2f}" for x in pd["per_seed"])
            lines.append(f"| {label} | {_title(a)} − {_title(b)} | {pd['mean']:+.2f} ± {pd['sd']:.2f} | {seeds} |")
    if not found:
        lines.append("| – | none | – | – |")
    return lines


def _paired_lines(summary: dict[str, Any], names: list[str], ref: str, key: str, label: str) -> list[str]:
    lines = [f"| {label}: method − {_title(ref)} | mean ± sd over seeds | per seed | verdict |", "|---|---|---|---|"]
    for name in names:
        if name in (ref, "teacher") or name not in summary:
            continue
        pd = paired_difference(summary[name]["per_seed"][key], summary[ref]["per_seed"][key])
        seeds = ", ".join(f"{x:+.2f}" for x in pd["per_seed"])
        lines.append(f"| {_title(name)} | {pd['mean']:+.2f} ± {pd['sd']:.2f} | {seeds} | {pd['verdict']} |")
    return lines


def summary_markdown(summary: dict[str, Any], cfg: Any, train_report: Any, test_report: Any, *,
                     runs_args: Any = None, chosen: Any = None, grid: Any = None) -> str:
    """The results document: protocol, teacher, Table 1, paired differences with DPKD, Tables 2–5."""
    names = [n for n in summary if n != "teacher"]
    t = summary["teacher"]
    lines = [
        f"Test n = {test_report.kept}, seeds {list(cfg.seeds)} (mean ± sd); every method continues the seed's "
        f"SFT start ({cfg.init_steps} steps) for {cfg.method_steps} steps × batch {cfg.batch_size}, peak lr "
        f"{cfg.student_lr:g}, {cfg.warmup_steps} warm-up steps then cosine; objective `{cfg.objective}`; "
        f"sampling T: y_t {cfg.teacher_temperature:g}, y_s {cfg.sample_temperature:g}, evaluation "
        f"{cfg.eval_temperature:g} (and greedy).", "",
        f"Teacher: greedy Rouge-L {t['greedy.rougeL'][0]:.2f} / EM {t['greedy.exact_match'][0]:.2f}; sampled "
        f"Rouge-L {t['sampled.rougeL'][0]:.2f} / EM {t['sampled.exact_match'][0]:.2f}; its training outputs y_t "
        f"score Rouge-L {t['y_t_train.rougeL'][0]:.2f} / EM {t['y_t_train.exact_match'][0]:.2f} against the golden "
        "responses.", "", "**Table 1**", ""]
    table1 = [n for n in names if n not in VARIANTS and n not in ABLATIONS]
    lines += _table(summary, table1, TABLE1_COLS)
    if "dpkd" in summary:
        for key, label in PAIRED_KEYS:
            lines += ["", f"Paired differences with DPKD (Eq. 9), {label}:", ""]
            lines += _paired_lines(summary, names, "dpkd", key, label)
    lines += _resolved_lines(summary, [n for n in table1 if n not in ("teacher", "sft_start")])
    variants = [n for n in names if n in VARIANTS]
    if variants:
        lines += ["", "**Table 2** (preference forms)", ""]
        lines += _table(summary, variants + ["dpkd"], TABLE1_COLS[:2] + TABLE1_COLS[2:3])
    ablations = [n for n in ("dpkd", *ABLATIONS, "dpkd_eq8") if n in summary]
    if len(ablations) > 1:
        lines += ["", "**Table 3** (ablations; rKLD₁ = minimum during training, reward = maximum frozen-pair "
                  "reward accuracy during training, reference = teacher; gain max = the same with the SFT start "
                  "as reference)", ""]
        lines += _table(summary, ablations, [("Rouge-L (greedy)", "greedy.rougeL", 2), ("rKLD₁ min", "rkld_min", 4),
                                             ("reward max", "reward_max", 3), ("gain max", "gain_max", 3)])
    for metric, label, num in (("exact_match", "EM", 4), ("rougeL", "Rouge-L", 5)):
        lines += ["", f"**Table {num}** ({label} by golden-response length, greedy)", ""]
        lines += _table(summary, ["teacher"] + names, [(b, f"greedy.{metric} {b}", 2) for b in BUCKETS])
    lines += _hparam_lines(runs_args or {}, chosen or {}, grid or [])
    return "\n".join(lines) + "\n"


def _hparam_lines(runs_args: dict[str, Any], chosen: dict[str, Any], grid: list[dict[str, Any]]) -> list[str]:
    """The hyper-parameters every run used and, when the grid ran, its validation scores."""
    lines = ["", "Hyper-parameters used: " + "; ".join(f"{_title(n)} {v}" for n, v in runs_args.items() if v)]
    if grid:
        lines += ["", "Validation grid (greedy Rouge-L on the validation split, one SFT start, same budget):", "",
                  "| method | point | validation Rouge-L | chosen |", "|---|---|---|---|"]
        for g in grid:
            mark = "✓" if chosen.get(g["method"]) == g["point"] else ""
            lines.append(f"| {_title(g['method'])} | {g['point']} | {g['valid_rougeL']:.2f} | {mark} |")
    return lines


def plot_curves(histories: dict[str, list[list[dict[str, float]]]], folder: str | Path) -> list[Path]:
    """The curves (mean over seeds per method against the global step, the shape of the paper's Figures 2–3):
    reward.png (frozen-pair and fresh-pair reward margin and accuracy), rkld.png (first-token rKLD / KLD),
    rouge.png (greedy Rouge-L on the probe prompts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    written = []
    panels = {"reward.png": [("eval/frozen/rewards/accuracies", "frozen pairs: reward accuracy"),
                             ("eval/frozen/rewards/margins", "frozen pairs: reward margin"),
                             ("eval/frozen/gain/accuracies", "frozen pairs, start as reference: accuracy"),
                             ("eval/fresh/rewards/accuracies", "fresh pairs: reward accuracy"),
                             ("eval/fresh/rewards/margins", "fresh pairs: reward margin")],
              "rkld.png": [("eval/rkld", "first-token rKLD"), ("eval/kld", "first-token KLD")],
              "rouge.png": [("eval/rougeL", "probe Rouge-L (greedy)")]}
    for fname, keys in panels.items():
        fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.6), squeeze=False)
        for ax, (key, title) in zip(axes[0], keys, strict=True):
            for method, runs in histories.items():
                steps: dict[int, list[float]] = {}
                for hist in runs:
                    for rec in hist:
                        if key in rec:
                            steps.setdefault(int(rec["step"]), []).append(rec[key])
                if steps:
                    xs = sorted(steps)
                    ax.plot(xs, [statistics.fmean(steps[x]) for x in xs], marker="o", ms=2.5, label=_title(method))
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / fname, dpi=110)
        plt.close(fig)
        written.append(folder / fname)
    return written
