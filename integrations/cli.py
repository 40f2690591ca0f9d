"""The ``dpkd`` command line (console script ``dpkd``).

* ``dpkd distill`` — the main job (no arguments needed): an embedded instruction task, a teacher trained
  from scratch (cached), students distilled with SFT, KD, SeqKD and DPKD (``--variants`` adds IPO, CPO,
  SimPO), all evaluated; prints the table and writes ``results.md``, ``metrics.json`` and plots.
  ``--preset ci`` is a reduced run (< 2 minutes). Real run: ``--teacher DIR --student DIR --train-data
  dolly_train.jsonl --test-data dolly_test.jsonl`` with local GPT-2/OPT checkpoints (safetensors).
* ``dpkd generate`` — pre-generate teacher outputs for a Dolly JSONL (adds ``teacher_response``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

__all__ = ["main", "build_parser"]


def _default_cache() -> str:
    return os.environ.get("DPKD_CACHE", str(Path.home() / ".cache" / "dpkd"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpkd", description="Direct Preference Knowledge Distillation")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("distill", help="run the distillation job (embedded default, or your models/data)")
    d.add_argument("--preset", choices=["default", "ci"], default="default")
    d.add_argument("--results-dir", default="dpkd-results")
    d.add_argument("--cache-dir", default=_default_cache(), help="teacher cache (default ~/.cache/dpkd)")
    d.add_argument("--seeds", type=int, nargs="+", help="student seeds (default 0 1 2)")
    d.add_argument("--variants", action="store_true", help="also run IPO, CPO and SimPO")
    d.add_argument("--methods", nargs="+", help="explicit method list (sft kd seqkd dpkd ipo cpo simpo dpkd_token)")
    d.add_argument("--objective", choices=["half", "paper", "released", "distil-only"],
                   help="objective preset for every method (default: half = 0.5 CE + 0.5 method)")
    d.add_argument("--beta", type=float)
    d.add_argument("--method-steps", type=int)
    d.add_argument("--teacher", help="local teacher checkpoint folder (skips teacher training)")
    d.add_argument("--student", help="local SFT'd student checkpoint folder (skips the SFT initialisation)")
    d.add_argument("--train-data", help="Dolly-style JSONL/Parquet for training")
    d.add_argument("--test-data", help="Dolly-style JSONL/Parquet for evaluation")
    d.add_argument("--max-new-tokens", type=int)
    d.add_argument("--batch-size", type=int)
    d.add_argument("--threads", type=int)
    d.add_argument("--fused", action="store_true",
                   help="fused token-chunked lm_head path: log-probs from hidden states, no [B, T, V] logits")
    d.add_argument("--verbose", action="store_true", help="progress bars and per-step logs")

    g = sub.add_parser("generate", help="pre-generate teacher outputs (adds `teacher_response` to each record)")
    g.add_argument("--teacher", required=True)
    g.add_argument("--data", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--seed", type=int, default=0)
    return p


def _distill(args: argparse.Namespace) -> int:
    from dpkd.integrations.transformers.job import BASE_METHODS, PRESETS, VARIANT_METHODS, run_job

    cfg = PRESETS[args.preset]
    overrides = {}
    if args.seeds:
        overrides["seeds"] = tuple(args.seeds)
    if args.methods:
        overrides["methods"] = tuple(args.methods)
    elif args.variants:
        overrides["methods"] = BASE_METHODS + VARIANT_METHODS
    for name in ("objective", "beta", "method_steps", "max_new_tokens", "batch_size", "threads"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.fused:
        overrides["use_fused"] = True
    cfg = replace(cfg, **overrides)
    run_job(cfg, results_dir=args.results_dir, cache_dir=args.cache_dir, train_data=args.train_data,
            test_data=args.test_data, teacher_path=args.teacher, student_path=args.student, quiet=not args.verbose)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from dpkd.integrations.transformers.data import load_records, tokenize_records
    from dpkd.integrations.transformers.job import generate_teacher_outputs
    from dpkd.integrations.transformers.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(args.teacher)
    teacher = load_causal_lm(args.teacher)
    records = load_records(args.data)
    examples = tokenize_records(records, tok)
    texts = generate_teacher_outputs(teacher, tok, examples, max_new_tokens=args.max_new_tokens, seed=args.seed)
    with Path(args.out).open("w", encoding="utf-8") as f:
        for rec, text in zip(records, texts, strict=True):
            row = {k: v for k, v in asdict(rec).items() if k != "references"}
            f.write(json.dumps({**row, "teacher_response": text}) + "\n")
    print(f"wrote {len(texts)} teacher outputs to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dpkd`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "distill":
        return _distill(args)
    return _generate(args)


if __name__ == "__main__":
    sys.exit(main())
