"""Does the frozen-pair reward accuracy rise during DPKD training? The probe's curves at the default job's
scale, for DPKD (Eq. 9) at every β of its validation grid and for SFT (the control), from one SFT start.

Same data, teacher (cached), SFT start, budget and objective as ``dpkd distill`` (the default preset), one seed;
the probe (``integrations/transformers/probe.py``) is evaluated every ``--eval-every`` steps on ``--n-probe``
held-out prompts. Frozen pairs = (teacher sample y_t, the SFT start's sample y_s), fixed when the method phase
begins; fresh pairs = y_s sampled again from the current student at every probe.

Usage: ``python benchmarks/bench_probe_curve.py [--seed 0] [--betas 0.1 0.5 2.0] [--cache-dir DIR]
[--results-dir DIR] [--start DIR] [--method-steps N]``; prints the curves and writes ``probe_curves.json`` and
``probe_curves.png`` into the results folder. The numbers quoted in ``benchmarks/RESULTS.md`` came from this script.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

KEYS = ("eval/frozen/rewards/accuracies", "eval/frozen/rewards/margins", "eval/frozen/gain/accuracies",
        "eval/frozen/gain/margins", "eval/fresh/rewards/accuracies", "eval/fresh/rewards/margins",
        "eval/frozen/rewards/accuracies_ln", "eval/fresh/kl_seq", "eval/fresh/rkl_seq", "eval/rougeL")


def main(argv: list[str] | None = None) -> int:
    import torch
    from dpkd.integrations.transformers.experiment import Experiment
    from dpkd.integrations.transformers.job import PRESETS
    from dpkd.integrations.transformers.models import load_causal_lm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.5, 2.0])
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--n-probe", type=int, default=64)
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "dpkd"))
    p.add_argument("--results-dir", default="probe-curves")
    p.add_argument("--method-steps", type=int, help="steps per run (default: the default preset's)")
    p.add_argument("--no-sft", action="store_true", help="skip the SFT control run")
    p.add_argument("--start", help="the seed's SFT-start checkpoint of an earlier `dpkd distill` run with the "
                                   "same preset (default: train it here)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = replace(PRESETS["default"], seeds=(args.seed,), eval_every=args.eval_every, n_probe=args.n_probe)
    if args.method_steps:
        cfg = replace(cfg, method_steps=args.method_steps)
    out = Path(args.results_dir)
    exp = Experiment(cfg, out, Path(args.cache_dir), quiet=True, show_progress=False)
    exp.load_data(None, None)
    exp.load_teacher(None)
    exp.teacher_outputs()
    ckpt = Path(args.start) if args.start else exp.init_student(args.seed, None)
    runs = ([] if args.no_sft else [("sft", {})]) + [("dpkd", {"beta": b}) for b in args.betas]
    curves: dict[str, list[dict[str, float]]] = {}
    for method, hp in runs:
        name = method + "".join(f"-beta{v:g}" for v in hp.values())
        t0 = time.process_time()
        res = exp._train(load_causal_lm(ckpt), exp.train_ex, out / "runs" / name, method=method,
                         method_args=hp, steps=cfg.method_steps, lr=cfg.student_lr, seed=args.seed,
                         init_from=ckpt, probe=exp.probe_ex)
        curves[name] = [{k: r[k] for k in ("step", *KEYS) if k in r} for r in res.log_history
                        if "eval/frozen/rewards/accuracies" in r]
        print(f"{name}: {time.process_time() - t0:.0f} CPU-s", flush=True)
        for k in KEYS:
            print(f"  {k:36s} " + " ".join(f"{r[k]:7.3f}" for r in curves[name] if k in r), flush=True)
    (out / "probe_curves.json").write_text(json.dumps({"config": {"seed": args.seed, "n_probe": args.n_probe,
                                                                  "method_steps": cfg.method_steps},
                                                       "curves": curves}, indent=1))
    _plot(curves, out / "probe_curves.png")
    return 0


def _plot(curves: dict[str, list[dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = KEYS[:6]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.4 * len(keys), 3.4))
    for ax, key in zip(axes, keys, strict=True):
        for name, rows in curves.items():
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o", ms=2.5, label=name)
        ax.set_title(key.removeprefix("eval/"), fontsize=9)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
