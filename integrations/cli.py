"""The ``dpkd`` command line (console script ``dpkd``).

* ``dpkd distill`` — the main job (no arguments needed): an embedded instruction task, a teacher trained
  from scratch (cached), one SFT start per seed, every method of the paper's Table 1 continuing it under one
  budget (``--variants`` adds IPO, CPO, SimPO; ``--ablations`` Table 3's), all evaluated; prints the tables
  and writes ``results.md``, ``metrics.json`` and the curve plots. ``--preset ci`` is a reduced run
  (< 2 minutes); ``--preset full`` first tunes every method on the validation split. Real run:
  ``--teacher DIR --student DIR --train-data dolly_train.jsonl --test-data dolly_test.jsonl`` with local
  Hugging Face checkpoints (safetensors).
* ``dpkd generate`` — pre-generate teacher outputs for a Dolly JSONL (adds ``teacher_response``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]


def _default_cache() -> str:
    return os.environ.get("DPKD_CACHE", str(Path.home() / ".cache" / "dpkd"))


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _method_arg(text: str) -> tuple[str, str, str]:
    method, _, rest = text.partition(".")
    name, eq, value = rest.partition("=")
    if not (method and name and eq):
        raise argparse.ArgumentTypeError(f"expected METHOD.NAME=VALUE, got {text!r}")
    return method, name, value


def _distill_parser(sub: Any) -> None:
    from dpkd.integrations.methods import ABLATIONS, METHODS, OBJECTIVE_PRESETS, TABLE1, VARIANTS, methods_help
    from dpkd.integrations.transformers.job import PRESETS

    dflt = PRESETS["default"]
    d = sub.add_parser("distill", help="run the distillation job (embedded default, or your models/data)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="methods (name: what, needs, hyper-parameters with defaults and ranges):\n"
                              + methods_help())
    a = d.add_argument
    a("--preset", choices=sorted(PRESETS), default="default",
      help="sizes and budget: default (the embedded experiment), full (default + the validation grid), "
           "smollm2 (the real teacher SmolLM2-135M-Instruct, needs the `real` extra), ci and smollm2-smoke "
           "(reduced smoke runs); default: default")
    a("--results-dir", default="dpkd-results", help="output folder (default: dpkd-results)")
    a("--cache-dir", default=_default_cache(), help="teacher cache (default: $DPKD_CACHE or ~/.cache/dpkd)")
    a("--seeds", type=int, nargs="+", help=f"student seeds, any integers (default: {' '.join(map(str, dflt.seeds))})")
    a("--methods", nargs="+", choices=list(METHODS), metavar="METHOD",
      help=f"explicit method list, any of {', '.join(METHODS)} (default: Table 1 = {' '.join(TABLE1)})")
    a("--variants", action="store_true", help=f"also run Table 2's {', '.join(VARIANTS)} (default: off)")
    a("--ablations", action="store_true",
      help=f"also run Table 3's ablations ({', '.join(a.title for a in ABLATIONS.values())}; default: off)")
    a("--grid", action="store_true",
      help="tune each method's hyper-parameters on the validation split first (default: off; on in --preset full)")
    a("--method-arg", type=_method_arg, action="append", default=[], metavar="METHOD.NAME=VALUE",
      help="set one hyper-parameter of one method, e.g. dpkd.beta=0.5 (repeatable; ranges in the list below; "
           "default: the values the validation grid chose, else the table's defaults)")
    a("--objective", choices=OBJECTIVE_PRESETS,
      help=f"objective for every method: paper = L_method + 0.5·L_PT (Algorithm 1), released = LMOps runner "
           f"mix, half = 0.5·CE + 0.5·L_method, distil-only (default: {dflt.objective})")
    a("--method-steps", type=_positive(int), help=f"optimizer steps per method, ≥ 1 (default: {dflt.method_steps})")
    a("--init-steps", type=_positive(int), help=f"SFT-start steps per seed, ≥ 1 (default: {dflt.init_steps})")
    a("--lr", type=_positive(float), help=f"peak learning rate of the students, > 0 (default: {dflt.student_lr:g})")
    a("--teacher-temperature", type=_positive(float),
      help=f"sampling temperature of the pre-generated y_t, > 0 (default: {dflt.teacher_temperature:g})")
    a("--sample-temperature", type=_positive(float),
      help=f"sampling temperature of y_s and every student sample in training, > 0 "
           f"(default: {dflt.sample_temperature:g})")
    a("--eval-temperature", type=_positive(float),
      help=f"temperature of the sampled evaluation (greedy is also reported), > 0 (default: {dflt.eval_temperature:g})")
    a("--teacher", help="local teacher checkpoint folder (skips teacher training; default: train the embedded one)")
    a("--student", help="local student checkpoint folder to start from (default: a new small GPT-2 per seed)")
    a("--train-data", help="Dolly-style JSONL/Parquet for training (default: the embedded task)")
    a("--test-data", help="Dolly-style JSONL/Parquet for evaluation (required with --train-data; default: the "
                          "embedded task's test split)")
    a("--max-new-tokens", type=_positive(int), help=f"generation length, ≥ 1 (default: {dflt.max_new_tokens})")
    a("--batch-size", type=_positive(int), help=f"examples per optimizer step, ≥ 1 (default: {dflt.batch_size})")
    a("--threads", type=_positive(int), help=f"torch CPU threads per process, ≥ 1 (default: {dflt.threads})")
    a("--workers", type=_positive(int),
      help=f"seeds trained at once in forked processes, ≥ 1 (results do not depend on it; default: {dflt.workers})")
    a("--fused", action="store_true",
      help="fused token-chunked lm_head path: log-probs from hidden states, no [B, T, V] logits (default: off)")
    a("--verbose", action="store_true", help="per-run progress bars and per-step logs (default: one overall display)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpkd", description="Direct Preference Knowledge Distillation")
    sub = p.add_subparsers(dest="command", required=True)
    _distill_parser(sub)
    g = sub.add_parser("generate", help="pre-generate teacher outputs (adds `teacher_response` to each record)")
    g.add_argument("--teacher", required=True, help="local teacher checkpoint folder")
    g.add_argument("--data", required=True, help="Dolly-style JSONL/Parquet")
    g.add_argument("--out", required=True, help="output JSONL")
    g.add_argument("--max-new-tokens", type=_positive(int), default=256, help="≥ 1 (default: 256)")
    g.add_argument("--temperature", type=_positive(float), default=1.0, help="sampling temperature > 0 (default: 1)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    return p


_OVERRIDES = {"objective": "objective", "method_steps": "method_steps", "init_steps": "init_steps",
              "lr": "student_lr", "teacher_temperature": "teacher_temperature",
              "sample_temperature": "sample_temperature", "eval_temperature": "eval_temperature",
              "max_new_tokens": "max_new_tokens", "batch_size": "batch_size", "threads": "threads",
              "workers": "workers"}


def job_config(args: argparse.Namespace) -> Any:
    """The ``JobConfig`` a parsed ``dpkd distill`` command line asks for (values range-checked)."""
    from dpkd.integrations.methods import ABLATIONS, METHODS, VARIANTS
    from dpkd.integrations.transformers.job import PRESETS

    cfg = PRESETS[args.preset]
    overrides: dict[str, Any] = {cfg_name: getattr(args, arg) for arg, cfg_name in _OVERRIDES.items()
                                 if getattr(args, arg) is not None}
    if args.seeds:
        overrides["seeds"] = tuple(args.seeds)
    methods = tuple(args.methods) if args.methods else cfg.methods + (VARIANTS if args.variants else ())
    overrides["methods"] = methods
    if args.ablations:
        overrides["ablations"] = tuple(ABLATIONS)
    if args.grid:
        overrides["grid"] = True
    if args.fused:
        overrides["use_fused"] = True
    method_args = {m: dict(v) for m, v in cfg.method_args.items()}
    for method, name, raw in args.method_arg:
        if method not in METHODS:
            raise SystemExit(f"dpkd distill: --method-arg: unknown method {method!r}")
        hp = {h.name: h for h in METHODS[method].hparams}
        if name not in hp:
            raise SystemExit(f"dpkd distill: --method-arg: method {method!r} has no hyper-parameter {name!r} "
                             f"(it has {sorted(hp) or 'none'})")
        value: Any = raw.lower() == "true" if isinstance(hp[name].default, bool) else (
            raw if isinstance(hp[name].default, str) else float(raw))
        method_args.setdefault(method, {})[name] = value
    try:
        for method, values in method_args.items():
            METHODS[method].resolve(values)
    except ValueError as e:
        raise SystemExit(f"dpkd distill: --method-arg: {e}") from None
    overrides["method_args"] = method_args
    return replace(cfg, **overrides)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _check_model_dir(flag: str, path: str | None, *, tokenizer: bool) -> None:
    if path is None:
        return
    folder = Path(path)
    if not folder.is_dir():
        raise SystemExit(f"dpkd: {flag} {path}: no such folder (a local Hugging Face checkpoint folder)")
    if not (folder / "config.json").is_file():
        raise SystemExit(f"dpkd: {flag} {path}: no config.json (not a Hugging Face checkpoint folder)")
    if tokenizer and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise SystemExit(f"dpkd: {flag} {path}: no tokenizer files (one of {', '.join(_TOKENIZER_FILES)}); save "
                         f"the tokenizer with the model (tokenizer.save_pretrained)")


def _check_data_file(flag: str, path: str | None) -> None:
    if path is not None and Path(path).suffix in (".jsonl", ".json", ".parquet") and not Path(path).is_file():
        raise SystemExit(f"dpkd: {flag} {path}: no such file")


def _check_writable(flag: str, path: str | Path, *, folder: bool) -> None:
    """``path`` (a folder, or a file's path) can be created or written by this process."""
    target = Path(path).expanduser().absolute()
    if target.exists() and target.is_dir() != folder:
        raise SystemExit(f"dpkd: {flag} {path}: is {'a file' if folder else 'a folder'}")
    existing = target if target.exists() else next(p for p in target.parents if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"dpkd: {flag} {path}: cannot write there ({existing} is not a writable folder)")


def _check_student_matches_teacher(teacher: str, student: str) -> None:
    """One vocabulary for both (the losses compare their distributions token by token): the same size, and the
    same tokenizer where the student folder has one (read from the folders; no weights are loaded)."""
    from dpkd.integrations.transformers.models import load_tokenizer

    sizes = [json.loads((Path(p) / "config.json").read_text()).get("vocab_size") for p in (student, teacher)]
    if None not in sizes and sizes[0] != sizes[1]:
        raise SystemExit(f"dpkd distill: --student {student}: vocabulary of {sizes[0]} tokens, --teacher {teacher}: "
                         f"{sizes[1]}; the student must use the teacher's vocabulary")
    if any((Path(student) / f).is_file() for f in _TOKENIZER_FILES):
        t_vocab, s_vocab = load_tokenizer(teacher).get_vocab(), load_tokenizer(student).get_vocab()
        if t_vocab != s_vocab:
            differ = len(set(t_vocab.items()) ^ set(s_vocab.items())) // 2
            raise SystemExit(f"dpkd distill: --student {student} has another tokenizer than --teacher {teacher} "
                             f"(about {differ} of {len(t_vocab)} token ids differ); the student must use the "
                             f"teacher's tokenizer")


def _check_distill_paths(args: argparse.Namespace) -> None:
    """The paths of a ``dpkd distill`` command line, checked before anything is loaded, trained or written."""
    _check_model_dir("--teacher", args.teacher, tokenizer=True)
    _check_model_dir("--student", args.student, tokenizer=False)
    if args.teacher is not None and args.student is not None:
        _check_student_matches_teacher(args.teacher, args.student)
    if (args.train_data is None) != (args.test_data is None):
        raise SystemExit("dpkd distill: --train-data and --test-data go together (give both, or neither for the "
                         "embedded task)")
    _check_data_file("--train-data", args.train_data)
    _check_data_file("--test-data", args.test_data)
    _check_writable("--results-dir", args.results_dir, folder=True)
    _check_writable("--cache-dir", args.cache_dir, folder=True)


def _check_launch(cfg: Any) -> None:
    """What the launcher asks for, refused before anything runs: an engine this machine cannot run, a global
    batch the processes cannot share."""
    from dpkd.integrations.transformers.distributed import check_launch, launch_world_size

    try:
        check_launch(None, who="dpkd distill")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    world = launch_world_size()
    if cfg.batch_size % world:
        raise SystemExit(f"dpkd distill: --batch-size {cfg.batch_size} (examples per step, the global batch) must be "
                         f"divisible by the {world} processes of the launch")


def _distill(args: argparse.Namespace) -> int:
    from dpkd.integrations.folder_lock import FolderLockedError
    from dpkd.integrations.transformers.job import run_job

    cfg = job_config(args)
    _check_distill_paths(args)
    _check_launch(cfg)
    try:
        run_job(cfg, results_dir=args.results_dir, cache_dir=args.cache_dir, train_data=args.train_data,
                test_data=args.test_data, teacher_path=args.teacher, student_path=args.student,
                quiet=not args.verbose, show_progress=not args.verbose)
    except FolderLockedError as e:
        raise SystemExit(f"dpkd distill: {e}") from None
    return 0


def _generate(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from dpkd.integrations.transformers.data import load_records, tokenize_records
    from dpkd.integrations.transformers.job import generate_teacher_outputs
    from dpkd.integrations.transformers.models import load_causal_lm, load_tokenizer

    _check_model_dir("--teacher", args.teacher, tokenizer=True)
    _check_data_file("--data", args.data)
    _check_writable("--out", args.out, folder=False)
    tok = load_tokenizer(args.teacher)
    teacher = load_causal_lm(args.teacher)
    records = load_records(args.data)
    examples = tokenize_records(records, tok)
    texts = generate_teacher_outputs(teacher, tok, examples, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                     temperature=args.temperature)
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
