"""The teacher log-prob cache on the embedded task: DPKD step time and teacher FLOPs with and without it, and
the error of token-level losses read from a top-k cache, as a function of k.

    python benchmarks/bench_teacher_cache.py [--preset ci|smollm2] [--cache-dir DIR] [--steps 8]

The teacher, the data and y_t are the main job's (``dpkd distill``'s stages: a cached teacher is reused);
``--preset smollm2`` is the real teacher (SmolLM2-135M-Instruct) with the preset's Llama student, where the
teacher dominates the step. The top-k error table needs the teacher's dense [B, T, V] distributions in
float64 and is measured at small vocabularies only (the embedded task's).
Times: process CPU seconds of one whole DPKD step (y_s generation, forward/backward, AdamW) on one thread,
the two variants interleaved step by step in this process, each continuing the same SFT-free student copy;
the generation share is measured inside the same steps. Teacher FLOPs: torch's FlopCounterMode around every
teacher forward of the step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_section  # noqa: E402


def _experiment(preset: str, cache_dir: Path, results: Path):
    from dpkd.integrations.transformers.experiment import Experiment
    from dpkd.integrations.transformers.job import PRESETS

    exp = Experiment(PRESETS[preset], results, cache_dir, quiet=True, show_progress=False)
    exp.load_data(None, None)
    exp.load_teacher(None)
    exp.teacher_outputs()
    return exp


class _TeacherFlops:
    """FLOPs of every teacher forward (FlopCounterMode inside a wrapped forward)."""

    def __init__(self, teacher) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        self.total = 0
        original = teacher.forward

        def counted(*args, **kwargs):
            with FlopCounterMode(display=False) as fc:
                out = original(*args, **kwargs)
            self.total += fc.get_total_flops()
            return out

        teacher.forward = counted


def _student(exp):
    """The preset's student before its SFT start (the embedded GPT-2 / OPT, or the Llama cut from SmolLM2)."""
    cfg = exp.cfg
    if cfg.teacher_model == "smollm2":
        from dpkd.integrations.transformers.llama_student import llama_student

        return llama_student(exp.teacher, every=cfg.student_every, hidden_size=cfg.student_hidden,
                             num_attention_heads=cfg.student_heads, num_key_value_heads=cfg.student_kv_heads,
                             intermediate_size=cfg.student_intermediate)
    from dpkd.integrations.transformers.models import tiny_causal_lm

    return tiny_causal_lm(cfg.student_family, len(exp.tok), d_model=cfg.student_d_model, n_layers=cfg.student_layers,
                          pad_token_id=exp.tok.pad_token_id, eos_token_id=exp.tok.eos_token_id, seed=0)


def _describe(exp) -> str:
    cfg = exp.cfg
    if cfg.teacher_model == "smollm2":
        t, s = exp.teacher.config, exp.student_config
        return (f"SmolLM2-135M-Instruct teacher ({t.num_hidden_layers} layers, d={t.hidden_size}), Llama student "
                f"({s.num_hidden_layers} layers, d={s.hidden_size}); the materialised lm_head path (the teacher's "
                f"forward is what the FLOP counter sees)")
    return (f"the embedded task (teacher d={cfg.teacher_d_model} × {cfg.teacher_layers} layers, student "
            f"d={cfg.student_d_model} × {cfg.student_layers})")


def _trainer(exp, student, teacher, examples, out, cache):
    from dpkd.integrations.transformers.trainer import DistillConfig, DistillTrainer

    cfg = exp.cfg
    dc = DistillConfig(output_dir=str(out), method="dpkd", max_steps=1000, per_device_train_batch_size=cfg.batch_size,
                       learning_rate=cfg.student_lr, teacher_outputs="pregenerated", max_new_tokens=cfg.max_new_tokens,
                       disable_tqdm=True, report_to="none", objective="paper", lr_scheduler_type="constant")
    return DistillTrainer(student, teacher, examples, dc, pad_token_id=exp.tok.pad_token_id,
                          eos_token_id=exp.tok.eos_token_id, pt_sequences=exp.pt_seqs, teacher_cache=cache)


def _step(tr, step, flops):
    from dpkd.integrations.transformers import trainer as trainer_mod

    gen = [0.0]
    original = trainer_mod.generate

    def timed_generate(*a, **k):
        t = time.process_time()
        out = original(*a, **k)
        gen[0] += time.process_time() - t
        return out

    trainer_mod.generate = timed_generate
    f0, t0 = flops.total, time.process_time()
    tr.training_step(tr._prepare(step))
    tr._optimizer_step(step)
    dt = time.process_time() - t0
    trainer_mod.generate = original
    return dt, gen[0], flops.total - f0


def step_times(exp, steps: int, out: Path) -> dict:
    from dpkd.integrations.transformers.teacher_cache import TeacherLogpCache

    student = _student(exp)
    exp.student_config = student.config
    plain = copy.deepcopy(exp.train_ex)
    for ex in plain:
        ex.teacher_logp = None  # no c with the examples: the teacher scores y_t every step
    t_build = time.process_time()
    cache = TeacherLogpCache(out / "cache", exp.teacher, exp.tok)
    cache.entries(exp.train_ex)
    build_s = time.process_time() - t_build
    teachers = {"uncached": copy.deepcopy(exp.teacher), "cached": copy.deepcopy(exp.teacher)}
    flops = {k: _TeacherFlops(t) for k, t in teachers.items()}
    trainers = {"uncached": _trainer(exp, copy.deepcopy(student), teachers["uncached"], plain, out / "u", None),
                "cached": _trainer(exp, copy.deepcopy(student), teachers["cached"], exp.train_ex, out / "c", cache)}
    rows: dict[str, list] = {k: [] for k in trainers}
    for step in range(steps + 1):  # step 0: warm-up
        for name, tr in trainers.items():
            r = _step(tr, step, flops[name])
            if step:
                rows[name].append(r)
    out_rows = {}
    for name, rs in rows.items():
        out_rows[name] = {"step_s": statistics.median(r[0] for r in rs), "gen_s": statistics.median(r[1] for r in rs),
                          "rest_s": statistics.median(r[0] - r[1] for r in rs),
                          "teacher_gflops": statistics.median(r[2] for r in rs) / 1e9,
                          "spread": (min(r[0] for r in rs), max(r[0] for r in rs))}
    size = cache.path.stat().st_size
    return {"rows": out_rows, "build_s": build_s, "n_examples": len(exp.train_ex), "cache_bytes": size}


def topk_errors(exp, ks: list[int]) -> list[dict]:
    """Token-level losses on y_t (dpkd_token, forward KL) from the top-k cache vs the exact teacher."""
    import dpkd.backends.torch as tb
    from dpkd.integrations.transformers.batching import pad_pairs
    from dpkd.integrations.transformers.teacher_cache import TeacherLogpCache, dense_teacher_logps

    exs = exp.train_ex[:64]
    vocab = len(exp.tok)
    batch = pad_pairs([e.prompt_ids for e in exs], [e.teacher_ids for e in exs], exp.tok.pad_token_id)
    torch.manual_seed(0)
    from dpkd.integrations.transformers.models import tiny_causal_lm

    student = tiny_causal_lm(exp.cfg.student_family, vocab, d_model=exp.cfg.student_d_model,
                             n_layers=exp.cfg.student_layers, seed=0).double()
    teacher64 = copy.deepcopy(exp.teacher).double()
    with torch.no_grad():
        s_logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        exact = torch.log_softmax(teacher64(input_ids=batch.input_ids,
                                            attention_mask=batch.attention_mask).logits[:, :-1], -1)
    labels = batch.labels[:, 1:]
    mask = labels != -100

    def losses(teacher_logps):
        out = {}
        for name, fn in (("dpkd_token", lambda s, t: tb.dpkd_token_loss(s, t, mask).loss),
                         ("forward_kl", lambda s, t: tb.forward_kl(s, t, mask))):
            s = s_logits.clone().requires_grad_(True)
            val = fn(s, teacher_logps)
            (g,) = torch.autograd.grad(val, s)
            out[name] = (float(val), g)
        return out

    ref = losses(exact)
    rows = []
    for k in ks:
        cache = TeacherLogpCache(Path("/tmp") / "dpkd-bench-topk", teacher64, exp.tok, dtype=torch.float64, top_k=k)
        dense = dense_teacher_logps(cache.entries(exs), labels, vocab)
        got = losses(dense)
        row = {"k": k, "mass": float(dense[mask].exp().sum(-1).mean())}
        for name in ref:
            rv, rg = ref[name]
            v, g = got[name]
            row[name] = (abs(v - rv) / abs(rv), float((g - rg).norm() / rg.norm()))
        kept = torch.topk(exact[mask], k, dim=-1).values.exp().sum(-1)
        row["topk_mass"] = float(kept.mean())
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="ci")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "dpkd"))
    p.add_argument("--steps", type=int, default=8)
    a = p.parse_args()
    torch.set_num_threads(1)
    work = Path("/tmp/dpkd-bench-teacher-cache")
    exp = _experiment(a.preset, Path(a.cache_dir), work / "results")
    st = step_times(exp, a.steps, work)
    vocab = len(exp.tok)
    errs = topk_errors(exp, [k for k in (1, 2, 4, 8, 16, 64, 256) if k < vocab] + [vocab]) if vocab <= 4096 else []
    m = machine()
    u, c = st["rows"]["uncached"], st["rows"]["cached"]
    lines = [
        f"## Teacher log-prob cache (bench_teacher_cache.py, preset {a.preset})", "",
        f"Command: `python benchmarks/bench_teacher_cache.py --preset {a.preset} --steps {a.steps}`  ",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), 1 thread, load average at the end {m['load'][0]:.1f} "
        f"(a VM shared with other tenants; the two variants alternate step by step, so they share the load)  ",
        f"Versions: python {m['versions']['python']}, torch {m['versions']['torch']}  ",
        f"Date: {m['date']}  ",
        f"Task: preset `{a.preset}`: {_describe(exp)}, vocabulary {vocab}, batch {exp.cfg.batch_size}, y_s up to "
        f"{exp.cfg.max_new_tokens} tokens; DPKD "
        f"(Eq. 9) with the `paper` objective (+ 0.5·PT LM), median of {a.steps} steps after one warm-up.  ",
        f"Building the cache: {st['build_s']:.2f} CPU s for {st['n_examples']} examples "
        f"({st['cache_bytes'] / 2**20:.2f} MiB with k = 0); later runs read it.", "",
        "| variant | CPU s per step (spread) | of which y_s generation | rest of the step | teacher GFLOP per step |",
        "|---|---|---|---|---|",
    ]
    for name, r in (("uncached (teacher on y_t and y_s)", u), ("cached (teacher on y_s only)", c)):
        lines.append(f"| {name} | {r['step_s']:.3f} ({r['spread'][0]:.3f}–{r['spread'][1]:.3f}) | {r['gen_s']:.3f} | "
                     f"{r['rest_s']:.3f} | {r['teacher_gflops']:.3f} |")
    ratio, rest = c["step_s"] / u["step_s"], c["rest_s"] / u["rest_s"]
    verdict = "met" if ratio <= 0.7 else "missed"
    lines += ["", f"Cached / uncached: whole step {ratio:.3f} (target ≤ 0.7: {verdict}); without the y_s generation "
                  f"{rest:.3f}; teacher FLOPs {c['teacher_gflops'] / max(u['teacher_gflops'], 1e-12):.3f}."]
    if errs:
        lines += ["", "Token-level losses on y_t from the top-k cache (label kept exactly, the rest of the mass "
                  "spread evenly) against the exact teacher, 64 training examples, float64; relative error of the "
                  "loss / relative L2 error of its gradient w.r.t. the student logits:", "",
                  "| k | teacher mass in top-k | dpkd_token loss | dpkd_token grad | forward KL loss "
                  "| forward KL grad |",
                  "|---|---|---|---|---|---|"]
    for r in errs:
        lines.append(f"| {r['k']} | {r['topk_mass']:.4f} | {r['dpkd_token'][0]:.2e} | {r['dpkd_token'][1]:.2e} | "
                     f"{r['forward_kl'][0]:.2e} | {r['forward_kl'][1]:.2e} |")
    text = "\n".join(lines)
    print(text)
    write_section("bench_teacher_cache" + ("" if a.preset == "ci" else f"_{a.preset}"), text)


if __name__ == "__main__":
    main()
