"""Aggregation over seeds, the results table and the training-curve plots of the main job."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from .eval import BUCKETS

__all__ = ["aggregate", "summary_markdown", "plot_curves"]


def _mean_sd(values: list[float]) -> list[float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return [float("nan"), float("nan")]
    return [statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0]


def aggregate(runs: dict[str, list[dict[str, Any]]], teacher: dict[str, Any]) -> dict[str, Any]:
    """Mean and sample standard deviation over seeds of every metric, per method; the teacher as is."""
    out: dict[str, Any] = {"teacher": {"rougeL": [teacher["overall"]["rougeL"], 0.0],
                                       "exact_match": [teacher["overall"]["exact_match"], 0.0],
                                       **{f"rougeL {b}": [teacher["buckets"][b]["rougeL"], 0.0] for b in BUCKETS},
                                       **{f"EM {b}": [teacher["buckets"][b]["exact_match"], 0.0] for b in BUCKETS},
                                       "n_seeds": 1}}
    for method, evs in runs.items():
        row: dict[str, Any] = {
            "rougeL": _mean_sd([e["overall"]["rougeL"] for e in evs]),
            "exact_match": _mean_sd([e["overall"]["exact_match"] for e in evs]),
            "kld": _mean_sd([e["first_token"]["kld"] for e in evs]),
            "rkld": _mean_sd([e["first_token"]["rkld"] for e in evs]),
        }
        for b in BUCKETS:
            row[f"rougeL {b}"] = _mean_sd([e["buckets"][b]["rougeL"] for e in evs])
            row[f"EM {b}"] = _mean_sd([e["buckets"][b]["exact_match"] for e in evs])
        row["n_seeds"] = len(evs)
        out[method] = row
    return out


def _cell(v: list[float], digits: int = 2) -> str:
    if math.isnan(v[0]):
        return "–"
    return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def summary_markdown(summary: dict[str, Any], cfg: Any, train_report: Any, test_report: Any) -> str:
    """The results table (mean ± sd over seeds) plus the comparison of DPKD with each baseline."""
    cols = ["rougeL", "exact_match"] + [f"rougeL {b}" for b in BUCKETS] + [f"EM {b}" for b in BUCKETS]
    head = "| method | Rouge-L | EM | " + " | ".join(f"R-L {b}" for b in BUCKETS) + " | " + \
        " | ".join(f"EM {b}" for b in BUCKETS) + " | rKLD₁ | KLD₁ |"
    lines = [f"Embedded task — test n = {test_report.kept}, seeds {list(cfg.seeds)} (mean ± sd); "
             f"objective `{cfg.objective}`, β = {cfg.beta}, {cfg.method_steps} steps × batch {cfg.batch_size} "
             "per method from one SFT-initialised student per seed.", "", head, "|" + "---|" * (len(cols) + 3)]
    for name, row in summary.items():
        cells = [_cell(row[c]) for c in cols]
        cells += [_cell(row["rkld"], 4), _cell(row["kld"], 4)] if "rkld" in row else ["–", "–"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "dpkd" in summary:
        d = summary["dpkd"]["rougeL"]
        verdicts = []
        for name, row in summary.items():
            if name in ("teacher", "dpkd"):
                continue
            diff = d[0] - row["rougeL"][0]
            spread = math.hypot(d[1], row["rougeL"][1])
            if summary["dpkd"]["n_seeds"] < 2:
                word = "vs (one seed, no spread: not a comparison)"
            else:
                word = "beats" if diff > spread else "loses to" if diff < -spread else "ties (within 1 sd) with"
            verdicts.append(f"DPKD {word} {name}: Rouge-L {diff:+.2f}")
        lines += ["", "; ".join(verdicts) + "."]
    return "\n".join(lines) + "\n"


def plot_curves(histories: dict[str, list[list[dict[str, float]]]], folder: str | Path) -> list[Path]:
    """reward.png (probe reward margin and accuracy), rkld.png (first-token rKLD / KLD), loss.png — each
    the mean over seeds per method against the training step (the shape of the paper's Figures 2–3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    written = []
    panels = {"reward.png": [("eval/rewards/margins", "probe reward margin"),
                             ("eval/rewards/accuracies", "probe reward accuracy")],
              "rkld.png": [("eval/rkld", "first-token rKLD"), ("eval/kld", "first-token KLD")],
              "loss.png": [("loss", "training loss")]}
    for fname, keys in panels.items():
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
        for ax, (key, title) in zip(axes[0], keys, strict=True):
            for method, runs in histories.items():
                steps: dict[int, list[float]] = {}
                for hist in runs:
                    for rec in hist:
                        if key in rec:
                            steps.setdefault(int(rec["step"]), []).append(rec[key])
                if steps:
                    xs = sorted(steps)
                    ax.plot(xs, [statistics.fmean(steps[x]) for x in xs], marker="o", ms=3, label=method)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / fname, dpi=110)
        plt.close(fig)
        written.append(folder / fname)
    return written
