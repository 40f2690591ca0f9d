"""The stages of the main job (:mod:`.job`), one method each: data, teacher, teacher outputs, teacher
evaluation, the validation grid, the SFT start of a seed, one method run, and the report."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..methods import METHODS
from .job import (
    JobConfig,
    Run,
    _atomic_dir,
    _cache_problem,
    _file_hash,
    _hash,
    _log,
    _read_lines,
    _write_lines,
    config_dict,
    planned_runs,
)
from .progress import Progress

__all__ = ["Experiment"]

_EVAL_UNITS = 10  # one evaluation of a student counts as this many training steps in the progress estimate
START = "sft_start"  # the results row of the SFT start itself (the methods' common starting point)


class Experiment:
    """State shared by the stages of one job (see :func:`.job.run_job` for their order)."""

    def __init__(self, cfg: JobConfig, results_dir: Path, cache_dir: Path, *, quiet: bool,
                 show_progress: bool) -> None:
        self.cfg = cfg
        self.results_dir = results_dir
        self.cache_dir = cache_dir
        self.quiet = quiet
        if quiet:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # save_pretrained's shard bar; the job has its own display
        results_dir.mkdir(parents=True, exist_ok=True)
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.t_start = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.chosen: dict[str, dict[str, Any]] = {}
        self.grid_scores: list[dict[str, Any]] = []
        self.runs: dict[str, list[dict[str, Any]]] = {}
        self.histories: dict[str, list[list[dict[str, float]]]] = {}
        self.init_ckpt: dict[int, Path] = {}
        self.start_eval: dict[int, dict[str, Any]] = {}
        n_runs = len(planned_runs(cfg))
        per_seed = cfg.init_steps + n_runs * (cfg.method_steps + _EVAL_UNITS)
        grid_runs = sum(len(METHODS[r.method].grid()) for r in planned_runs(cfg)) if cfg.grid else 0
        total = cfg.teacher_steps + _EVAL_UNITS + len(cfg.seeds) * per_seed + \
            (cfg.init_steps + grid_runs * (cfg.method_steps + _EVAL_UNITS) if cfg.grid else 0)
        from .distributed import is_main_process, launch_world_size

        self.is_main = is_main_process()
        if cfg.batch_size % launch_world_size():
            raise ValueError(f"--batch-size {cfg.batch_size} (examples per step) must be divisible by the "
                             f"{launch_world_size()} processes of the launch")
        self.per_device = cfg.batch_size // launch_world_size()  # the same global batch at any world size
        if launch_world_size() > 1 and cfg.workers > 1:
            _log(f"--workers {cfg.workers} not used: under a {launch_world_size()}-process launch each run "
                 f"trains on all processes, one run at a time")
        self.progress = Progress(total, enabled=show_progress and self.is_main)

    # ------------------------------------------------------------------------------------------ helpers
    def _train(self, model: Any, examples: list, out_dir: Path, *, method: str, steps: int, lr: float, seed: int,
               method_args: dict[str, Any] | None = None, objective: Any = None, init_from: Path | None = None,
               probe: list | None = None, teacher_outputs: str = "pregenerated", warmup: int | None = None,
               save_total_limit: int = 1) -> Any:
        from .trainer import DistillConfig, DistillTrainer

        cfg = self.cfg
        dc = DistillConfig(
            output_dir=str(out_dir), method=method, method_args=method_args or {}, max_steps=steps,
            per_device_train_batch_size=self.per_device, learning_rate=lr,
            warmup_steps=cfg.warmup_steps if warmup is None else warmup, lr_scheduler_type="cosine",
            logging_steps=min(cfg.eval_every, steps), eval_steps=cfg.eval_every if probe else 0, save_steps=0,
            save_total_limit=save_total_limit, seed=seed, objective=objective or cfg.objective,
            teacher_outputs=teacher_outputs, max_new_tokens=cfg.max_new_tokens,
            sample_temperature=cfg.sample_temperature, teacher_temperature=cfg.teacher_temperature,
            disable_tqdm=self.quiet, report_to="tensorboard", use_fused=cfg.use_fused)
        teacher = self.teacher if teacher_outputs != "dataset" or method != "sft" else None
        trainer = DistillTrainer(model, teacher, examples, dc, pad_token_id=self.tok.pad_token_id,
                                 eos_token_id=self.tok.eos_token_id, probe_examples=probe or [],
                                 pt_sequences=self.pt_seqs if dc.objective.lm_coef > 0 else (),
                                 callbacks=[lambda *_: self.progress.advance()], tokenizer=self.tok)
        return trainer.train(init_from=init_from)

    def _objective(self, overrides: dict[str, float]) -> Any:
        from .trainer import objective_preset

        base = objective_preset(self.cfg.objective)
        return replace_objective(base, overrides)

    # ------------------------------------------------------------------------------------------ stages
    def load_data(self, train_data: str | None, test_data: str | None) -> None:
        """Records of every split (the embedded task, or the user's files) and the D_p texts."""
        from .data import format_prompt, load_records
        from .toy_task import make_pretraining_corpus, make_task, write_jsonl

        cfg = self.cfg
        if train_data is None:
            task = make_task(cfg.n_train, cfg.n_valid, cfg.n_test, seed=0)
            data_dir = self.results_dir / "data"
            from .distributed import main_process_first

            with main_process_first():  # one process writes the files, the others read them afterwards
                data_dir.mkdir(exist_ok=True)
                if self.is_main:
                    for split, recs in task.items():
                        write_jsonl(recs, data_dir / f"{split}.jsonl")
            train_data, test_data = str(data_dir / "train.jsonl"), str(data_dir / "test.jsonl")
            self.valid_records = load_records(data_dir / "valid.jsonl")
            self.pt_texts = make_pretraining_corpus(cfg.n_pretrain, seed=0)
        else:
            if test_data is None:
                raise ValueError("--train-data needs --test-data")
            self.valid_records = []
            self.pt_texts = None  # D_p = the training texts (set once tokenised)
        self.train_data = train_data
        self.train_records = load_records(train_data)
        self.test_records = load_records(test_data)
        self.format_prompt = format_prompt

    def _length_limits(self, positions: list[int | None]) -> tuple[int, int]:
        """(prompt, prompt + response) token limits: the paper's 256 / 512, cut to the fewest positions of the
        models (a longer sequence indexes past a learned position table), leaving ``max_new_tokens`` of room
        after a prompt for generation."""
        limit = min([p for p in positions if p] or [512])
        max_prompt = min(256, limit - self.cfg.max_new_tokens)
        if max_prompt < 1:
            raise ValueError(f"--max-new-tokens {self.cfg.max_new_tokens}: leaves no room for a prompt in the "
                             f"models' {limit} positions")
        return max_prompt, min(512, limit)

    def _student_positions(self, student_path: str | None) -> int | None:
        from .models import TINY_MAX_POSITIONS, max_positions

        if student_path is not None:
            from transformers import AutoConfig

            return max_positions(AutoConfig.from_pretrained(student_path))
        return None if self.cfg.teacher_model == "smollm2" else TINY_MAX_POSITIONS  # smollm2: cut from the teacher

    def load_teacher(self, teacher_path: str | None, student_path: str | None = None) -> None:
        """The teacher (trained once and cached, or the user's checkpoint) and the tokenised splits, filtered
        to what fits the teacher's and the student's positions (the counts are in the filter reports)."""
        from .data import filter_records, tokenize_records
        from .models import load_causal_lm, load_tokenizer

        cfg = self.cfg
        self.teacher_key = _hash({"v": 2, "train": _file_hash(self.train_data), "d": cfg.teacher_d_model,
                                  "L": cfg.teacher_layers, "steps": cfg.teacher_steps, "lr": cfg.teacher_lr,
                                  "bs": cfg.batch_size})
        self.progress.stage("teacher")
        self.teacher_identified = cfg.teacher_model == "smollm2" or teacher_path is not None
        if cfg.teacher_model == "smollm2":
            from .pretrained import gguf_fingerprint, load_smollm2, smollm2_gguf_path

            self.teacher_key = _hash({"smollm2": gguf_fingerprint(smollm2_gguf_path())})
            self.teacher, self.tok = load_smollm2(self.cache_dir)
            self.progress.advance(cfg.teacher_steps)
        elif teacher_path is not None:
            # the cached y_t and log-probs belong to this checkpoint's files, whatever its path or config
            from ..identity import source_fingerprint

            self.teacher_key = _hash({"checkpoint": source_fingerprint(teacher_path)})
            self.tok, self.teacher = load_tokenizer(teacher_path), load_causal_lm(teacher_path)
            self.progress.advance(cfg.teacher_steps)
        else:
            folder = self.cache_dir / f"teacher-{self.teacher_key}"
            problem = _cache_problem(folder)
            if problem is None:
                _log(f"teacher: cached at {folder}")
                self.tok, self.teacher = load_tokenizer(folder), load_causal_lm(folder)
                self.progress.advance(cfg.teacher_steps)
            else:
                if folder.exists():
                    _log(f"teacher: the cached folder is damaged ({problem}); training it again")
                self._train_teacher(folder)
        self.teacher.eval()
        from .models import max_positions

        count = (lambda t: len(self.tok(t, add_special_tokens=False)["input_ids"]))  # noqa: E731
        max_prompt, max_len = self._length_limits([max_positions(self.teacher), self._student_positions(student_path)])
        train_kept, self.train_report = filter_records(self.train_records, max_prompt_tokens=max_prompt,
                                                       max_length=max_len, count_tokens=count)
        test_kept, self.test_report = filter_records(self.test_records, min_instruction_words=0,
                                                     min_response_words=0, max_prompt_tokens=max_prompt,
                                                     max_length=max_len, count_tokens=count)
        _log(f"data: train {self.train_report.summary()}; test {self.test_report.summary()}")
        chat = cfg.teacher_model == "smollm2"
        self.train_ex = tokenize_records(train_kept, self.tok, chat=chat)
        self.test_ex = tokenize_records(test_kept, self.tok, chat=chat)
        self.valid_ex = tokenize_records(self.valid_records, self.tok, chat=chat)
        self.probe_ex = self.valid_ex[: cfg.n_probe] if self.valid_ex else self.test_ex[: cfg.n_probe]
        texts = self.pt_texts or [self.format_prompt(ex.record) + ex.record.response for ex in self.train_ex]
        self.pt_seqs = [[*self.tok(t, add_special_tokens=False)["input_ids"], self.tok.eos_token_id] for t in texts]

    def _train_teacher(self, folder: Path) -> None:
        from .data import filter_records, tokenize_records
        from .models import TINY_MAX_POSITIONS, build_word_tokenizer, tiny_causal_lm

        cfg = self.cfg
        t0, c0 = time.perf_counter(), time.process_time()
        self.tok = build_word_tokenizer([self.format_prompt(r) + " " + r.response for r in self.train_records]
                                        + (self.pt_texts or []))
        max_prompt, max_len = self._length_limits([TINY_MAX_POSITIONS])
        kept, _ = filter_records(self.train_records, max_prompt_tokens=max_prompt, max_length=max_len,
                                 count_tokens=lambda t: len(self.tok(t, add_special_tokens=False)["input_ids"]))
        examples = tokenize_records(kept, self.tok)
        self.teacher = tiny_causal_lm("gpt2", len(self.tok), d_model=cfg.teacher_d_model,
                                      n_layers=cfg.teacher_layers, pad_token_id=self.tok.pad_token_id,
                                      eos_token_id=self.tok.eos_token_id, seed=1234)
        n_params = sum(p.numel() for p in self.teacher.parameters()) / 1e6
        _log(f"teacher: training {n_params:.2f}M params for {cfg.teacher_steps} steps (cached afterwards in "
             f"{self.cache_dir})")
        run_dir = self.cache_dir / f"teacher-run-{self.teacher_key}"
        self._train(self.teacher, examples, run_dir, method="sft", steps=cfg.teacher_steps, lr=cfg.teacher_lr,
                    seed=1234, objective="distil-only", teacher_outputs="dataset",
                    warmup=min(cfg.teacher_steps, 20))
        shutil.rmtree(run_dir, ignore_errors=True)

        def build(tmp: Path) -> None:
            self.teacher.save_pretrained(tmp, safe_serialization=True)
            self.tok.save_pretrained(tmp)

        _atomic_dir(folder, build)
        self.timings["teacher_training_s"] = time.perf_counter() - t0
        self.timings["teacher_training_cpu_s"] = time.process_time() - c0

    def _teacher_responses(self, examples: list, *, tag: str, do_sample: bool) -> list[list[int]]:
        """The teacher's response token ids (EOS included) to ``examples``' prompts, generated once and cached
        with the teacher (ids, not text: a decode/encode round trip could re-tokenise them)."""
        from .batching import generate

        cfg = self.cfg
        key = _hash({"teacher": self.teacher_key, "tag": tag, "T": cfg.teacher_temperature if do_sample else 0,
                     "tokens": cfg.max_new_tokens, "prompts": _hash([ex.prompt_ids for ex in examples])})
        path = self.cache_dir / f"teacher-{tag}-{key}.jsonl"
        if path.is_file():
            rows, problem = _read_lines(path, len(examples))
            if rows is not None and all(isinstance(row.get("ids"), list) for row in rows):
                return [row["ids"] for row in rows]
            _log(f"teacher outputs: {problem or f'{path} is damaged (a row without ids)'}; generating them again")
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(4321)
            ids = generate(self.teacher, [ex.prompt_ids for ex in examples], pad_id=self.tok.pad_token_id,
                           eos_id=self.tok.eos_token_id, max_new_tokens=cfg.max_new_tokens, do_sample=do_sample,
                           temperature=cfg.teacher_temperature, batch_size=16)
        _write_lines(path, [{"ids": r, "text": self.tok.decode(r, skip_special_tokens=True)} for r in ids])
        return ids

    def teacher_outputs(self) -> None:
        """y_t for every training (and validation) prompt, sampled at ``teacher_temperature``, with its
        log-probability c (pre-generated once, cached; c from the teacher log-prob cache,
        :mod:`.teacher_cache`); with ``dataset_responses="teacher"`` the dataset responses become the
        teacher's greedy outputs."""
        import torch

        from .distributed import main_process_first
        from .teacher_cache import TeacherLogpCache

        t0, c0 = time.perf_counter(), time.process_time()
        self.progress.stage("teacher outputs")
        labelled = self.train_ex + self.valid_ex
        with main_process_first():  # the main process generates and writes; the others read its files
            if self.cfg.dataset_responses == "teacher":
                for ex, ids in zip(labelled, self._teacher_responses(labelled, tag="greedy", do_sample=False),
                                   strict=True):
                    ex.response_ids = ids
            if not all(ex.teacher_ids is not None for ex in self.train_ex):  # else: `dpkd generate` outputs
                for ex, ids in zip(labelled, self._teacher_responses(labelled, tag="y_t", do_sample=True),
                                   strict=True):
                    ex.teacher_ids = ids
        # SmolLM2: the GGUF file's fingerprint; --teacher: its files'; the embedded teacher: its weights' hash
        known = self.teacher_key if self.teacher_identified else None
        with main_process_first():
            cache = TeacherLogpCache(self.cache_dir / "teacher-logps", self.teacher, self.tok, batch_size=16,
                                     teacher_fingerprint=known, fused=self.cfg.use_fused)
            for ex, entry in zip(self.train_ex, cache.entries(self.train_ex), strict=True):
                ex.teacher_logp = float(entry.token_logps.sum(dtype=torch.float64))
        self.timings["teacher_outputs_s"] = time.perf_counter() - t0
        self.timings["teacher_outputs_cpu_s"] = time.process_time() - c0

    def evaluate_teacher(self) -> None:
        """The teacher's greedy and sampled scores on the test split, and the quality of y_t itself."""
        from .eval import predict, score_predictions

        cfg = self.cfg
        t0, c0 = time.perf_counter(), time.process_time()
        self.progress.stage("teacher evaluation")
        golden = [ex.record.response for ex in self.test_ex]
        greedy = predict(self.teacher, self.tok, self.test_ex, max_new_tokens=cfg.max_new_tokens)
        sampled = predict(self.teacher, self.tok, self.test_ex, max_new_tokens=cfg.max_new_tokens, do_sample=True,
                          temperature=cfg.eval_temperature, seed=777)
        self.teacher_refs = [[g] for g in greedy]
        n = min(len(self.train_ex), 500)
        y_t = [self.tok.decode(ex.teacher_ids, skip_special_tokens=True).strip() for ex in self.train_ex[:n]]
        self.teacher_eval = {
            "greedy": score_predictions(greedy, [ex.record.all_references for ex in self.test_ex], golden),
            "sampled": score_predictions(sampled, [ex.record.all_references for ex in self.test_ex], golden),
            "y_t_train": score_predictions(y_t, [ex.record.all_references for ex in self.train_ex[:n]],
                                           [ex.record.response for ex in self.train_ex[:n]]),
        }
        self.progress.advance(_EVAL_UNITS)
        self.timings["teacher_eval_s"] = time.perf_counter() - t0
        self.timings["teacher_eval_cpu_s"] = time.process_time() - c0
        te = self.teacher_eval
        _log(f"teacher: greedy Rouge-L {te['greedy']['overall']['rougeL']:.2f} EM "
             f"{te['greedy']['overall']['exact_match']:.2f}; sampled (T = {cfg.eval_temperature}) Rouge-L "
             f"{te['sampled']['overall']['rougeL']:.2f}; y_t (T = {cfg.teacher_temperature}) on train prompts "
             f"Rouge-L {te['y_t_train']['overall']['rougeL']:.2f} EM {te['y_t_train']['overall']['exact_match']:.2f}")

    def init_student(self, seed: int, student_path: str | None, *, evaluate: bool = False) -> Path:
        """The seed's SFT start: trained for ``init_steps`` (or the user's checkpoint), saved with its AdamW
        state so that every method continues from it; returns that checkpoint's folder."""
        from .models import load_causal_lm, tiny_causal_lm

        cfg = self.cfg
        t0, c0 = time.perf_counter(), time.process_time()
        self.progress.stage("SFT start", seed=seed)
        out = self.results_dir / "runs" / f"seed{seed}" / "init-sft"
        if student_path is not None:
            init = load_causal_lm(student_path)
            steps = 1  # one SFT step creates the optimizer state the methods continue
        elif cfg.teacher_model == "smollm2":
            from .llama_student import llama_student

            init = llama_student(self.teacher, every=cfg.student_every, hidden_size=cfg.student_hidden,
                                 num_attention_heads=cfg.student_heads, num_key_value_heads=cfg.student_kv_heads,
                                 intermediate_size=cfg.student_intermediate)
            steps = cfg.init_steps
        else:
            init = tiny_causal_lm(cfg.student_family, len(self.tok), d_model=cfg.student_d_model,
                                  n_layers=cfg.student_layers, pad_token_id=self.tok.pad_token_id,
                                  eos_token_id=self.tok.eos_token_id, seed=seed)
            steps = cfg.init_steps
        # CE_D + λ·CE(D_p): the start is "pre-trained" on D_p like the paper's GPT-2 students, so the methods'
        # λ·L_PT term does not begin with a shock
        start_objective = replace_objective(self._objective({}), {"alpha": 1.0, "pt_kd_ratio": 0.0})
        self._train(init, self.train_ex, out, method="sft", steps=steps, lr=cfg.student_lr, seed=seed,
                    objective=start_objective, teacher_outputs="dataset", warmup=min(steps, 20))
        from .checkpoint import latest_checkpoint

        if evaluate:  # the row every method starts from
            self.start_eval[seed] = self._evaluate(init, self.test_ex, full=True)
            self.progress.advance(_EVAL_UNITS)
        self.timings[f"seed{seed}_init_s"] = time.perf_counter() - t0
        self.timings[f"seed{seed}_init_cpu_s"] = time.process_time() - c0
        return latest_checkpoint(out)

    def _evaluate(self, student: Any, examples: list, *, full: bool) -> dict[str, Any]:
        """Greedy decoding scored against the golden answers (and, ``full``, against the teacher's greedy
        outputs), plus sampled decoding against the golden answers; first-token KLD/rKLD."""
        from .eval import first_token_kl, predict, score_predictions

        cfg, tok = self.cfg, self.tok
        golden = [ex.record.response for ex in examples]
        refs = [ex.record.all_references for ex in examples]
        preds = predict(student, tok, examples, max_new_tokens=cfg.max_new_tokens)
        greedy = score_predictions(preds, refs, golden)
        greedy["first_token"] = first_token_kl(student, self.teacher, examples, pad_id=tok.pad_token_id)
        greedy["samples"] = [{"prompt": ex.record.instruction, "context": ex.record.context,
                              "reference": ex.record.response, "prediction": p}
                             for ex, p in zip(examples[:5], preds[:5], strict=False)]
        if not full:
            return {"greedy": greedy}
        sampled = predict(student, tok, examples, max_new_tokens=cfg.max_new_tokens, do_sample=True,
                          temperature=cfg.eval_temperature, seed=777)
        return {"greedy": greedy, "sampled": score_predictions(sampled, refs, golden),
                "vs_teacher": score_predictions(preds, self.teacher_refs, golden)}

    def run_method(self, seed: int, run: Run, init_ckpt: Path) -> dict[str, Any]:
        """One method continuing the seed's SFT start (``init_ckpt``); evaluated on the test split."""
        from .models import load_causal_lm

        t0, c0 = time.perf_counter(), time.process_time()
        self.progress.stage("distil", method=run.name, seed=seed)
        student = load_causal_lm(init_ckpt)
        res = self._train(student, self.train_ex, self.results_dir / "runs" / f"seed{seed}" / run.name,
                          method=run.method, method_args=run.method_args, steps=self.cfg.method_steps,
                          lr=self.cfg.student_lr, seed=seed, objective=self._objective(run.objective),
                          init_from=init_ckpt, probe=self.probe_ex)
        c_eval = time.process_time()
        ev = self._evaluate(student, self.test_ex, full=True)
        c_eval = time.process_time() - c_eval
        self.progress.advance(_EVAL_UNITS)
        dt = time.perf_counter() - t0
        g, s = ev["greedy"], ev["sampled"]
        _log(f"seed {seed} {run.name:>10}: greedy Rouge-L {g['overall']['rougeL']:.2f} EM "
             f"{g['overall']['exact_match']:.2f} | sampled Rouge-L {s['overall']['rougeL']:.2f} | rKLD1 "
             f"{g['first_token']['rkld']:.4f} ({dt:.0f}s)")
        return {"ev": ev, "history": res.log_history,
                "timings": {f"seed{seed}_{run.name}_s": dt, f"seed{seed}_{run.name}_cpu_s": time.process_time() - c0,
                            f"seed{seed}_{run.name}_eval_cpu_s": c_eval}}

    def run_seeds(self, seeds: tuple[int, ...], student_path: str | None, runs: list[Run], workers: int) -> None:
        """Every seed's SFT start, then every (seed, run) pair continuing it, spread over ``workers`` forked
        processes (one torch thread each): a seed's runs start as soon as its SFT start is saved, costliest
        first (on-policy sampling), so no worker idles while another start trains. The tasks are independent
        and seeded, so the results do not depend on ``workers`` or on the order."""
        inits = [("init", seed, student_path) for seed in seeds]
        ordered = sorted(runs, key=_sampling_cost, reverse=True)
        results = self._parallel(inits, workers, then=lambda init, out: [("run", init[1], r, out["ckpt"])
                                                                         for r in ordered])
        for seed, init in zip(seeds, results[: len(seeds)], strict=True):
            self.timings.update(init["timings"])
            self.init_ckpt[seed] = init["ckpt"]
            self.runs.setdefault(START, []).append(init["ev"])
        done = {(task[1], task[2].name): out for task, out in results[len(seeds):]}
        for seed in seeds:  # seed-major, in the planned order of the runs
            for run in runs:
                out = done[(seed, run.name)]
                self.runs.setdefault(run.name, []).append(out["ev"])
                self.histories.setdefault(run.name, []).append(out["history"])
                self.timings.update(out["timings"])

    def do_task(self, task: tuple) -> dict[str, Any]:
        if task[0] == "init":
            _, seed, student_path = task
            ckpt = self.init_student(seed, student_path, evaluate=True)
            keys = (f"seed{seed}_init_s", f"seed{seed}_init_cpu_s")
            return {"ckpt": ckpt, "ev": self.start_eval[seed], "timings": {k: self.timings[k] for k in keys}}
        if task[0] == "grid":
            return self.grid_point(*task[1:])
        _, seed, run, ckpt = task
        return self.run_method(seed, run, ckpt)

    def _parallel(self, tasks: list[tuple], workers: int, then: Callable[[tuple, dict], list[tuple]] | None = None
                  ) -> list[Any]:
        """``do_task`` of every task, in ``workers`` forked processes; with ``then``, each finished task's
        follow-up tasks (``then(task, result)``) join the same pool. Returns the tasks' results in order,
        followed by (follow-up task, result) pairs in the order they were submitted."""
        from .distributed import launch_world_size

        # under accelerate launch / torchrun every task's trainer spans all the processes (DDP over the
        # launch's process group, which a forked worker cannot share): the tasks run one after another
        if workers <= 1 or launch_world_size() > 1 or (len(tasks) <= 1 and then is None):
            results: list[Any] = [self.do_task(t) for t in tasks]
            follow = [f for t, r in zip(tasks, results, strict=True) for f in (then(t, r) if then else [])]
            return results + [(f, self.do_task(f)) for f in follow]
        import multiprocessing as mp

        global _WORKER_STATE
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        _WORKER_STATE = (self, queue)
        try:
            with ctx.Pool(min(workers, len(tasks) + (workers if then else 0))) as pool:
                first = [pool.apply_async(_task_worker, (t,)) for t in tasks]
                follow: list[tuple[tuple, Any]] = []
                expanded = [then is None] * len(tasks)
                while True:
                    for i, (task, res) in enumerate(zip(tasks, first, strict=True)):
                        if not expanded[i] and res.ready():
                            expanded[i] = True
                            follow += [(f, pool.apply_async(_task_worker, (f,))) for f in then(task, res.get())]
                    if all(expanded) and all(r.ready() for r in first) and all(r.ready() for _, r in follow) \
                            and queue.empty():
                        break
                    self._drain(queue, timeout=0.5)
                return [r.get() for r in first] + [(f, r.get()) for f, r in follow]
        finally:
            _WORKER_STATE = None

    def _drain(self, queue: Any, timeout: float) -> None:
        import queue as queue_mod

        try:
            kind, args, kwargs = queue.get(timeout=timeout)
        except queue_mod.Empty:
            return
        getattr(self.progress, kind)(*args, **kwargs)

    def tune(self) -> None:
        """The validation grid: every method's grid points continue one SFT start (``grid_seed``), scored by
        greedy Rouge-L on the validation split; each method's best point is then used for every seed."""
        cfg = self.cfg
        if not self.valid_ex:
            raise ValueError("the validation grid needs a validation split (the embedded task has one)")
        ckpt = self.init_student(cfg.grid_seed, None)
        tasks = [("grid", run.method, point, ckpt) for run in planned_runs(cfg) if run.name == run.method
                 for point in METHODS[run.method].grid()]  # ablations reuse their method's choice
        for (_, method, point, _), score in zip(tasks, self._parallel(tasks, cfg.workers), strict=True):
            self.grid_scores.append({"method": method, "point": point, "valid_rougeL": score["valid_rougeL"]})
        for method in dict.fromkeys(t[1] for t in tasks):
            rows = [g for g in self.grid_scores if g["method"] == method]
            best = max(rows, key=lambda g: g["valid_rougeL"])  # the first (the defaults) on ties
            self.chosen[method] = best["point"]
            _log(f"grid {method}: chose {best['point']} (validation Rouge-L {best['valid_rougeL']:.2f} of "
                 + ", ".join(f"{g['valid_rougeL']:.2f}" for g in rows) + ")")

    def grid_point(self, method: str, point: dict[str, Any], ckpt: Path) -> dict[str, Any]:
        from .models import load_causal_lm

        cfg = self.cfg
        self.progress.stage("grid", method=f"{method} {point}", seed=cfg.grid_seed)
        student = load_causal_lm(ckpt)
        name = method + "-" + "-".join(f"{k}{v}" for k, v in sorted(point.items()))
        self._train(student, self.train_ex, self.results_dir / "grid" / name, method=method, method_args=point,
                    steps=cfg.method_steps, lr=cfg.student_lr, seed=cfg.grid_seed, init_from=ckpt)
        score = self._evaluate(student, self.valid_ex, full=False)["greedy"]["overall"]["rougeL"]
        self.progress.advance(_EVAL_UNITS)
        return {"valid_rougeL": score}

    def finish(self) -> dict[str, Any]:
        """Aggregate over seeds, write results.md, metrics.json and the plots; print the table."""
        from .report import aggregate, plot_curves, summary_markdown

        self.progress.stage("report")
        summary = aggregate(self.runs, self.teacher_eval, self.histories)
        runs = planned_runs(replace_cfg(self.cfg, self.chosen))
        runs_args = {r.name: r.method_args for r in runs}
        table = summary_markdown(summary, self.cfg, self.train_report, self.test_report, runs_args=runs_args,
                                 chosen=self.chosen, grid=self.grid_scores)
        self.timings["total_s"] = time.perf_counter() - self.t_start
        if not self.is_main:  # every rank ran the same job; the main process writes and prints it
            self.progress.close()
            return {"summary": summary, "timings_s": self.timings}
        (self.results_dir / "results.md").write_text(table)
        metrics = {"config": config_dict(self.cfg), "summary": summary, "per_seed": self.runs,
                   "teacher": self.teacher_eval, "histories": self.histories, "chosen_hparams": self.chosen,
                   "grid": self.grid_scores, "runs": [asdict_run(r) for r in runs],
                   "filters": {"train": self.train_report.as_dict(), "test": self.test_report.as_dict()},
                   "timings_s": self.timings}
        (self.results_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
        plot_curves(self.histories, self.results_dir)
        self.progress.close()
        print(table, flush=True)
        _log(f"results written to {self.results_dir.resolve()} (total {self.timings['total_s']:.0f}s)")
        return {"summary": summary, "timings_s": self.timings}


_WORKER_STATE: Any = None  # (experiment, progress queue), inherited by forked workers


class _QueueProgress:
    """A worker's progress: forwarded to the parent's one display."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def stage(self, *args: Any, **kwargs: Any) -> None:
        self.queue.put(("stage", args, kwargs))

    def advance(self, *args: Any, **kwargs: Any) -> None:
        self.queue.put(("advance", args, kwargs))


def _task_worker(task: tuple) -> dict[str, Any]:
    import torch

    exp, queue = _WORKER_STATE
    torch.set_num_threads(max(1, exp.cfg.threads))
    exp.progress = _QueueProgress(queue)
    return exp.do_task(task)


def _sampling_cost(run: Run) -> int:
    """How much a run samples per step (its cost on CPU is mostly generation): policy gradient with teacher
    mixing > a y_s every step > sometimes (GKD) > never. Only the order of the tasks depends on it."""
    from ..methods import PolicyGradient, TokenDivergence

    method = METHODS[run.method]
    spec = method.loss(run.method_args)
    if isinstance(spec, PolicyGradient):
        return 3
    if method.needs.student_samples and not isinstance(spec, TokenDivergence):
        return 2
    return 1 if method.needs.student_samples else 0


def replace_cfg(cfg: JobConfig, chosen: dict[str, Any]) -> JobConfig:
    from dataclasses import replace as dc_replace

    return dc_replace(cfg, method_args={**cfg.method_args, **chosen})


def replace_objective(base: Any, overrides: dict[str, float]) -> Any:
    from dataclasses import replace as dc_replace

    return dc_replace(base, **overrides) if overrides else base


def asdict_run(run: Run) -> dict[str, Any]:
    return {"name": run.name, "method": run.method, "method_args": run.method_args, "objective": run.objective}
