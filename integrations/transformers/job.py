"""The main job behind ``dpkd distill``: teacher → students with SFT, KD, SeqKD, DPKD (+ variants), evaluated.

Protocol (the paper's, SPEC-MATH §4, at laptop scale), identical for every method:

1. data: the embedded task (:mod:`.toy_task`) or the user's Dolly JSONL/Parquet, filtered (Sec. 4.1);
2. tokenizer: a word-level tokenizer built from the training texts (or the teacher's own);
3. teacher: a GPT-2-family model trained from scratch by SFT (cached under ``--cache-dir``), or a local
   checkpoint; its sampled responses to the training prompts (T = 1, top_k = 0) are pre-generated once —
   these are y_t for SeqKD and for the preference methods (the MiniLLM "pseudo" data);
4. per seed: one student initialised by SFT (Algorithm 1 starts from an SFT student), then every method
   continues from that same initial student for the same number of steps, batch size and learning rate
   under one objective (default ``half``: L = 0.5·CE_D + 0.5·L_method, the MiniLLM KD mix, for all);
5. evaluation on the held-out test split: Rouge-L / exact match overall and per length bucket, first-token
   KLD/rKLD to the teacher; mean ± sample standard deviation over the seeds; curves of the probe reward,
   rKLD and loss during training.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = ["JobConfig", "PRESETS", "run_job", "generate_teacher_outputs"]

BASE_METHODS = ("sft", "kd", "seqkd", "dpkd")
VARIANT_METHODS = ("ipo", "cpo", "simpo")


@dataclass
class JobConfig:
    """Sizes and budgets of the main job (``PRESETS`` holds the named ones)."""

    n_train: int = 2000
    n_valid: int = 64
    n_test: int = 100
    teacher_d_model: int = 64
    teacher_layers: int = 2
    teacher_steps: int = 400
    teacher_lr: float = 1e-3
    student_family: str = "gpt2"
    student_d_model: int = 32
    student_layers: int = 2
    init_steps: int = 150
    method_steps: int = 40
    batch_size: int = 16
    student_lr: float = 5e-4
    max_new_tokens: int = 80
    objective: str = "half"
    beta: float = 0.1
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = BASE_METHODS
    eval_every: int = 5
    n_probe: int = 16
    threads: int = 2
    use_fused: bool = False  # the fused lm_head path for every training run (DistillConfig.use_fused)
    extra: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, JobConfig] = {
    "default": JobConfig(),
    # CI: the whole pipeline at toy size, one seed (a smoke test of the job, not a result)
    "ci": JobConfig(n_train=300, n_valid=8, n_test=40, teacher_d_model=48, teacher_layers=2,
                    teacher_steps=120, student_d_model=32, student_layers=1, init_steps=30, method_steps=10,
                    batch_size=8, max_new_tokens=48, seeds=(0,), eval_every=5, n_probe=8),
}


def _log(msg: str) -> None:
    print(msg, flush=True)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_dir(final: Path, build: Any) -> Path:
    """Build a folder under a temporary name and rename it into place (a crash never leaves half a cache)."""
    from .checkpoint import fsync_tree

    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    build(tmp)
    fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def generate_teacher_outputs(teacher: Any, tokenizer: Any, examples: list, *, max_new_tokens: int, seed: int,
                             batch_size: int = 32) -> list[str]:
    """Teacher responses (sampled, T = 1, top_k = 0, top_p = 1) to each example's prompt, as text."""
    import torch

    from .batching import generate

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        outs = generate(teacher, [ex.prompt_ids for ex in examples], pad_id=tokenizer.pad_token_id,
                        eos_id=tokenizer.eos_token_id, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]


def _train(model: Any, teacher: Any, examples: list, out_dir: Path, *, method: str, steps: int, cfg: JobConfig,
           lr: float, seed: int, probe: list, tok: Any, teacher_outputs: str = "pregenerated",
           objective: str | None = None, quiet: bool = False) -> Any:
    from .trainer import DistillConfig, DistillTrainer

    dc = DistillConfig(
        output_dir=str(out_dir), method=method, max_steps=steps, per_device_train_batch_size=cfg.batch_size,
        learning_rate=lr, logging_steps=min(cfg.eval_every, steps), eval_steps=cfg.eval_every if probe else 0,
        save_steps=0, save_total_limit=1, seed=seed, objective=objective or cfg.objective, beta=cfg.beta,
        teacher_outputs=teacher_outputs, max_new_tokens=cfg.max_new_tokens, disable_tqdm=quiet,
        report_to="tensorboard", use_fused=cfg.use_fused,
    )
    trainer = DistillTrainer(model, teacher, examples, dc, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, probe_examples=probe)
    return trainer.train()


def run_job(
    cfg: JobConfig,
    *,
    results_dir: str | Path,
    cache_dir: str | Path,
    train_data: str | None = None,
    test_data: str | None = None,
    teacher_path: str | None = None,
    student_path: str | None = None,
    quiet: bool = True,
) -> dict[str, Any]:
    """Run the whole job; returns the aggregated metrics (also written to ``results_dir``)."""
    import torch

    from .data import filter_records, format_prompt, load_records, tokenize_records
    from .eval import evaluate_model
    from .models import build_word_tokenizer, load_causal_lm, load_tokenizer, tiny_causal_lm
    from .toy_task import make_task, write_jsonl

    torch.set_num_threads(max(1, cfg.threads))
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)

    # 1. data ------------------------------------------------------------------------------------------
    if train_data is None:
        task = make_task(cfg.n_train, cfg.n_valid, cfg.n_test, seed=0)
        data_dir = results_dir / "data"
        data_dir.mkdir(exist_ok=True)
        for split, recs in task.items():
            write_jsonl(recs, data_dir / f"{split}.jsonl")
        train_data, test_data = str(data_dir / "train.jsonl"), str(data_dir / "test.jsonl")
        valid_records = load_records(data_dir / "valid.jsonl")
    else:
        if test_data is None:
            raise ValueError("--train-data needs --test-data")
        valid_records = []
    train_records = load_records(train_data)
    test_records = load_records(test_data)

    # 2. tokenizer and 3. teacher ------------------------------------------------------------------------
    teacher_key = _hash({"v": 1, "train": _file_hash(train_data),
                         "d": cfg.teacher_d_model, "L": cfg.teacher_layers, "steps": cfg.teacher_steps,
                         "lr": cfg.teacher_lr, "bs": cfg.batch_size, "tokens": cfg.max_new_tokens})
    if teacher_path is not None:
        tok = load_tokenizer(teacher_path)
        teacher = load_causal_lm(teacher_path)
        teacher_dir = Path(teacher_path)
    else:
        teacher_dir = cache_dir / f"teacher-{teacher_key}"
        if (teacher_dir / "model.safetensors").is_file():
            _log(f"teacher: cached at {teacher_dir}")
            tok = load_tokenizer(teacher_dir)
            teacher = load_causal_lm(teacher_dir)
        else:
            t0 = time.perf_counter()
            tok = build_word_tokenizer([format_prompt(r) + " " + r.response for r in train_records])
            kept, _ = filter_records(train_records)
            examples = tokenize_records(kept, tok)
            teacher = tiny_causal_lm("gpt2", len(tok), d_model=cfg.teacher_d_model, n_layers=cfg.teacher_layers,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, seed=1234)
            _log(f"teacher: training {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M params "
                 f"for {cfg.teacher_steps} steps (cached afterwards in {cache_dir})")
            _train(teacher, None, examples, cache_dir / f"teacher-run-{teacher_key}", method="sft",
                   steps=cfg.teacher_steps, cfg=replace(cfg, eval_every=max(cfg.teacher_steps // 4, 1)),
                   lr=cfg.teacher_lr, seed=1234, probe=[], tok=tok, teacher_outputs="dataset",
                   objective="distil-only", quiet=quiet)
            shutil.rmtree(cache_dir / f"teacher-run-{teacher_key}", ignore_errors=True)

            def build(tmp: Path) -> None:
                teacher.save_pretrained(tmp, safe_serialization=True)
                tok.save_pretrained(tmp)

            _atomic_dir(teacher_dir, build)
            timings["teacher_training_s"] = time.perf_counter() - t0
    teacher.eval()
    count = (lambda t: len(tok(t, add_special_tokens=False)["input_ids"]))  # noqa: E731
    train_kept, train_report = filter_records(train_records, max_prompt_tokens=256, max_length=512,
                                              count_tokens=count)
    test_kept, test_report = filter_records(test_records, min_instruction_words=0, min_response_words=0,
                                            max_prompt_tokens=256, max_length=512, count_tokens=count)
    _log(f"data: train {train_report.summary()}; test {test_report.summary()}")
    train_ex = tokenize_records(train_kept, tok)
    test_ex = tokenize_records(test_kept, tok)
    probe_ex = tokenize_records(valid_records[: cfg.n_probe], tok) if valid_records else test_ex[: cfg.n_probe]

    # teacher outputs y_t (pre-generated once, cached with the teacher)
    t0 = time.perf_counter()
    gen_file = (cache_dir if teacher_path is None else results_dir) / f"teacher-outputs-{teacher_key}.jsonl"
    if all(ex.teacher_ids is not None for ex in train_ex):  # the data carries `dpkd generate` outputs
        texts = [ex.record.teacher_response for ex in train_ex]
    elif gen_file.is_file():
        texts = [json.loads(line)["teacher_response"] for line in gen_file.read_text().splitlines()]
    else:
        texts = generate_teacher_outputs(teacher, tok, train_ex, max_new_tokens=cfg.max_new_tokens, seed=4321)
        tmp = gen_file.with_suffix(f".tmp-{os.getpid()}")
        with tmp.open("w") as f:
            for ex, t in zip(train_ex, texts, strict=True):
                f.write(json.dumps({**asdict(ex.record), "references": [], "teacher_response": t}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, gen_file)
    eos = tok.eos_token_id
    for ex, t in zip(train_ex, texts, strict=True):
        ex.teacher_ids = [*tok(t, add_special_tokens=False)["input_ids"], eos]
    timings["teacher_outputs_s"] = time.perf_counter() - t0

    # 4. students -------------------------------------------------------------------------------------------
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in cfg.methods}
    histories: dict[str, list[list[dict[str, float]]]] = {m: [] for m in cfg.methods}
    t0 = time.perf_counter()
    teacher_eval = evaluate_model(teacher, tok, test_ex, max_new_tokens=cfg.max_new_tokens)
    timings["teacher_eval_s"] = time.perf_counter() - t0
    for seed in cfg.seeds:
        t0 = time.perf_counter()
        if student_path is not None:
            init = load_causal_lm(student_path)
        else:
            init = tiny_causal_lm(cfg.student_family, len(tok), d_model=cfg.student_d_model,
                                  n_layers=cfg.student_layers, pad_token_id=tok.pad_token_id,
                                  eos_token_id=eos, seed=seed)
            _train(init, teacher, train_ex, results_dir / "runs" / f"seed{seed}" / "init-sft", method="sft",
                   steps=cfg.init_steps, cfg=cfg, lr=cfg.student_lr, seed=seed, probe=[], tok=tok,
                   teacher_outputs="dataset", quiet=quiet)
        timings[f"seed{seed}_init_s"] = time.perf_counter() - t0
        for method in cfg.methods:
            t0 = time.perf_counter()
            student = copy.deepcopy(init)
            res = _train(student, teacher, train_ex, results_dir / "runs" / f"seed{seed}" / method,
                         method=method, steps=cfg.method_steps, cfg=cfg, lr=cfg.student_lr, seed=seed,
                         probe=probe_ex, tok=tok, quiet=quiet)
            ev = evaluate_model(student, tok, test_ex, max_new_tokens=cfg.max_new_tokens, teacher=teacher)
            runs[method].append(ev)
            histories[method].append(res.log_history)
            timings[f"seed{seed}_{method}_s"] = time.perf_counter() - t0
            _log(f"seed {seed} {method:>6}: Rouge-L {ev['overall']['rougeL']:.2f}  EM "
                 f"{ev['overall']['exact_match']:.2f}  rKLD1 {ev['first_token']['rkld']:.4f}  "
                 f"({timings[f'seed{seed}_{method}_s']:.0f}s)")

    # 5. aggregate, write, plot ----------------------------------------------------------------------------
    from .report import aggregate, plot_curves, summary_markdown

    summary = aggregate(runs, teacher_eval)
    table = summary_markdown(summary, cfg, train_report, test_report)
    timings["total_s"] = time.perf_counter() - t_start
    (results_dir / "results.md").write_text(table)
    (results_dir / "metrics.json").write_text(json.dumps(
        {"config": asdict(cfg), "summary": summary, "per_seed": runs, "teacher": teacher_eval,
         "histories": histories, "filters": {"train": train_report.as_dict(), "test": test_report.as_dict()},
         "timings_s": timings}, indent=1, default=str))
    plot_curves(histories, results_dir)
    print(table, flush=True)
    _log(f"results written to {results_dir} (total {timings['total_s']:.0f}s)")
    return {"summary": summary, "timings_s": timings}


def _file_hash(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
