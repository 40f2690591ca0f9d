"""Forward+backward of the token-level losses (token DPKD, FKL, RKL, JSD, AKL, CE) side by side: dpkd's fused
lm_head path against the same loss on materialised logits, in Torch and in JAX, each repeat paired with the
GEMMs alone (the floor) in the same process.

    python benchmarks/bench_token_losses.py --threads 1          # N=4096, H=512, V=32000, one core
    python benchmarks/bench_token_losses.py --threads 2          # torch's default here: both cores
    python benchmarks/bench_token_losses.py --n 1024 --vocab 8000 --losses dpkd,fkl --repeats 2

Variants per loss: "fused_torch" (``fused_<loss>``), "mat_torch" (the backend's loss on ``hidden @ Wᵀ``,
eager), "fused_jax" and "mat_jax" (jit), and for token DPKD "fused_torch_bf16" (bf16 hidden states and
lm_heads). The fused losses project only the counted rows (mask ≠ 0, 90% here; label ≠ ignore_index for
CE), so the floor of every variant is the GEMMs a fused loss must do over those rows — student forward,
teacher forward, grad_hidden, grad_weight (CE: no teacher) — chunked as that framework's fused loss
chunks; the materialised variants are paired with the same floor, so "÷ materialised" is the ratio of two
paired ratios. Memory as in _common.py (JAX: XLA's temp + output bytes), from the run at 1 thread.
Writes the section ``bench_token_losses_t<threads>`` of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

LOSSES = {  # name in the report: (backend function, fused function, options)
    "dpkd": ("dpkd_token_loss", "fused_dpkd_token_loss", {"beta": 0.1}),
    "fkl": ("forward_kl", "fused_forward_kl", {}),
    "rkl": ("reverse_kl", "fused_reverse_kl", {}),
    "jsd": ("generalized_jsd", "fused_generalized_jsd", {"beta": 0.5}),
    "akl": ("akl", "fused_akl", {"mu": 0.5}),
    "ce": ("cross_entropy", "fused_cross_entropy", {}),
}
VARIANTS = {
    "fused_torch": "dpkd fused, torch",
    "fused_torch_bf16": "dpkd fused, torch, bf16 inputs",
    "mat_torch": "materialised, torch eager",
    "mat_torch_bf16": "materialised, torch eager, bf16 inputs",
    "fused_jax": "dpkd fused, jax (jit)",
    "mat_jax": "materialised, jax (jit)",
}
TIME_TARGET = 1.2  # fused ≤ 1.2 × its GEMMs (issue 14)
MEMORY_TARGET = 0.10


def _arrays(args: argparse.Namespace) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    n, h, v, ht = args.n, args.hidden, args.vocab, args.teacher_hidden
    mask = rng.random(n) > 0.1
    labels = rng.integers(0, v, n)
    labels[~mask] = -100
    return {
        "hidden": rng.standard_normal((n, h), dtype=np.float32),
        "weight": (rng.standard_normal((v, h), dtype=np.float32) / np.sqrt(h)).astype(np.float32),
        "teacher_hidden": rng.standard_normal((n, ht), dtype=np.float32),
        "teacher_weight": (rng.standard_normal((v, ht), dtype=np.float32) / np.sqrt(ht)).astype(np.float32),
        "mask": mask,
        "labels": labels,
    }


def _chunk(args: argparse.Namespace, framework: str, teacher: bool, counted: int) -> int:
    """The fused loss's automatic chunk (what its floor is chunked by)."""
    if framework == "jax":
        from dpkd.backends.jax.fused_token import kernel_chunk_size
    else:
        from dpkd.backends.torch.fused_token import kernel_chunk_size
    return args.chunk_size or kernel_chunk_size(args.vocab, n_rows=counted, itemsize=4, teacher=teacher)


def child(args: argparse.Namespace) -> dict:
    if args.threads == 1:
        common.pin_to_one_core()
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    loss_name, variant = args.child.split(":")
    plain, fused_name, options = LOSSES[loss_name]
    a = _arrays(args)
    teacher = loss_name != "ce"
    counted = np.nonzero(a["mask"])[0]
    framework = "jax" if variant.endswith("_jax") else "torch"
    chunk = _chunk(args, framework, teacher, counted.size)
    t = {k: torch.from_numpy(x) for k, x in a.items()}
    floor = common.gemm_floor(t["hidden"][counted], t["weight"], chunk,
                              **({"teacher_rows": t["teacher_hidden"][counted], "teacher_weight": t["teacher_weight"]}
                                 if teacher else {}))
    floor = None if args.memory_only else floor
    if framework == "jax":
        out = _child_jax(args, a, loss_name, variant, floor)
    else:
        out = _child_torch(args, t, loss_name, variant, floor)
    out["chunk"] = chunk if variant.startswith("fused") else None
    return out


def _child_torch(args, t: dict, loss_name: str, variant: str, floor) -> dict:
    import torch
    from dpkd.backends import torch as backend

    plain, fused_name, options = LOSSES[loss_name]
    dtype = torch.bfloat16 if variant.endswith("bf16") else torch.float32
    # copies: the floor keeps the originals, which must not require grad (its GEMMs write with out=)
    hidden = t["hidden"].to(dtype, copy=True).requires_grad_(True)
    weight = t["weight"].to(dtype, copy=True).requires_grad_(True)
    th, tw, mask, labels = t["teacher_hidden"].to(dtype), t["teacher_weight"].to(dtype), t["mask"], t["labels"]

    def reset() -> None:
        hidden.grad = weight.grad = None

    def scalar(out):
        return getattr(out, "loss", out)

    if variant.startswith("fused"):
        fn = getattr(backend, fused_name)
        chunk = args.chunk_size or None

        def step() -> None:
            if loss_name == "ce":
                scalar(fn(hidden, weight, labels, chunk_size=chunk, **options)).backward()
            else:
                scalar(fn(hidden, weight, th, tw, mask, chunk_size=chunk, **options)).backward()
    else:
        fn = getattr(backend, plain)

        def step() -> None:
            logits = hidden @ weight.t()
            if loss_name == "ce":
                scalar(fn(logits, labels, **options)).backward()
                return
            with torch.no_grad():
                teacher_logits = th @ tw.t()
            scalar(fn(logits, teacher_logits, mask, **options)).backward()

    return common.measure(step, reset, args.repeats, floor=floor)


def _child_jax(args, a: dict, loss_name: str, variant: str, floor) -> dict:
    import jax
    import jax.numpy as jnp
    from dpkd.backends import jax as backend

    plain, fused_name, options = LOSSES[loss_name]
    x = {k: jnp.asarray(v) for k, v in a.items()}
    chunk = args.chunk_size or None

    def scalar(out):
        return getattr(out, "loss", out)

    if variant == "fused_jax":
        fn = getattr(backend, fused_name)

        def loss(hidden, weight, th, tw, mask, labels):
            if loss_name == "ce":
                return scalar(fn(hidden, weight, labels, chunk_size=chunk, **options))
            return scalar(fn(hidden, weight, th, tw, mask, chunk_size=chunk, **options))
    else:
        fn = getattr(backend, plain)

        def loss(hidden, weight, th, tw, mask, labels):
            if loss_name == "ce":
                return scalar(fn(hidden @ weight.T, labels, **options))
            return scalar(fn(hidden @ weight.T, jax.lax.stop_gradient(th @ tw.T), mask, **options))

    # every array an argument: closed-over arrays become constants that XLA tries to fold at compile time
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    inputs = (x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"], x["mask"], x["labels"])
    return common.measure_jax(grad, inputs, args.repeats, floor)


def _materialised(variant: str) -> str:
    """The materialised variant a fused one is compared with: the same framework and input dtype."""
    return variant.replace("fused_", "mat_", 1)


def _row(loss: str, variant: str, res: dict, rows: dict) -> str:
    label = f"{loss} | {VARIANTS[variant]}"
    if "error" in res:
        return f"| {label} | | failed: {res['error']} | | | | | | | |"
    mat = rows.get((loss, _materialised(variant)), {})
    vs_mat = f"{res['ratio'] / mat['ratio']:.3f}" if "ratio" in mat and variant.startswith("fused") else "–"
    mem = res.get("peak_bytes")
    mem_ratio = f"{mem / mat['peak_bytes']:.3f}" if mem and mat.get("peak_bytes") else "–"
    spread = f"({min(res['times_s']):.2f}–{max(res['times_s']):.2f})" if len(res["times_s"]) > 1 else ""
    chunk = res.get("chunk") or "–"
    return (f"| {label} | {chunk} | {res['time_s']:.2f} {spread} [{res['wall_s']:.2f}] | {res['floor_s']:.2f} | "
            f"{res['ratio']:.3f} [{res['ratio_min']:.3f}] | {res['ratio_wall']:.3f} | {vs_mat} | "
            f"{common.mib(mem) if mem else '–'} | {mem_ratio} |")


def _verdicts(rows: dict) -> list[str]:
    out = ["", f"Targets (issue 14): fused ≤ {TIME_TARGET} × its GEMMs, faster than the materialised loss of the "
           f"same framework, peak memory ≤ {MEMORY_TARGET:.0%} of it:", "",
           "| loss | framework | time / GEMMs | ÷ materialised | memory / materialised | verdict |",
           "|---|---|---|---|---|---|"]
    for (loss, variant), res in rows.items():
        if not variant.startswith("fused") or "ratio" not in res:
            continue
        framework = variant.split("_")[1] + (" bf16" if variant.endswith("bf16") else "")
        mat = rows.get((loss, _materialised(variant)), {})
        vs_mat = res["ratio"] / mat["ratio"] if "ratio" in mat else None
        mem = res["peak_bytes"] / mat["peak_bytes"] if res.get("peak_bytes") and mat.get("peak_bytes") else None
        missed = []
        if res["ratio"] > TIME_TARGET:
            missed.append(f"time {100 * (res['ratio'] / TIME_TARGET - 1):.0f}% over")
        if vs_mat is not None and vs_mat >= 1.0:
            missed.append(f"{100 * (vs_mat - 1):.0f}% slower than materialised")
        if mem is not None and mem > MEMORY_TARGET:
            missed.append(f"memory {100 * (mem / MEMORY_TARGET - 1):.0f}% over")
        verdict = "met" if not missed else "missed: " + ", ".join(missed)
        if vs_mat is None:
            verdict += " (the materialised loss not measured in this run)"
        out.append(f"| {loss} | {framework} | {res['ratio']:.3f} | {'–' if vs_mat is None else f'{vs_mat:.3f}'} | "
                   f"{'–' if mem is None else f'{mem:.3f}'} | {verdict} |")
    return out


def _resumed(logs: list[str]) -> tuple[dict[str, dict], list[str]]:
    """The ``loss:variant {json}`` lines of earlier runs' output and the commands that printed them (a long
    run on a shared machine can be split or stopped and continued; the shape and thread count must match)."""
    done, commands = {}, []
    for log in logs:
        for line in Path(log).read_text().splitlines():
            name, _, payload = line.partition(" ")
            if name == "command:":
                commands.append(payload.strip())
            elif ":" in name and name.split(":")[0] in LOSSES and payload.startswith("{"):
                res = json.loads(payload)
                if "error" not in res:
                    done[name] = res
    return done, commands


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--teacher-hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=0, help="token rows per chunk (0: automatic)")
    p.add_argument("--losses", default=",".join(LOSSES))
    p.add_argument("--variants", default="fused_torch,mat_torch,fused_jax,mat_jax,fused_torch_bf16,mat_torch_bf16")
    p.add_argument("--no-memory", action="store_true", help="times only (memory does not depend on threads)")
    p.add_argument("--child", default=None)
    p.add_argument("--memory-only", action="store_true", help="(child) one sampled step, no floor")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--resume", action="append", default=[], metavar="LOG",
                   help="reuse the variants an earlier run with the same shape printed to LOG (its stdout)")
    p.add_argument("--no-run", action="store_true", help="with --resume: report the resumed variants only")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    script = str(Path(__file__).resolve())
    shape = ["--n", str(args.n), "--hidden", str(args.hidden), "--teacher-hidden", str(args.teacher_hidden),
             "--vocab", str(args.vocab), "--repeats", str(args.repeats), "--threads", str(args.threads),
             "--chunk-size", str(args.chunk_size)]
    cmd = "python benchmarks/bench_token_losses.py " + " ".join(sys.argv[1:])
    print("command:", cmd, flush=True)
    rows = {}
    done, commands = _resumed(args.resume)
    for loss in args.losses.split(","):
        for variant in args.variants.split(","):
            if variant.endswith("bf16") and loss != "dpkd":
                continue
            name = f"{loss}:{variant}"
            if name in done:
                res = done[name]
            elif args.no_run:
                continue
            elif args.no_memory:
                res = common.run_child(script, [name, *shape], args.threads)
            else:
                res = common.run_variant(script, [name, *shape], args.threads)
            rows[(loss, variant)] = res
            print(name, json.dumps(res), flush=True)
    m = common.machine()
    runs = "; ".join(f"`{c}`" for c in (commands if args.no_run else [*commands, cmd]))
    lines = [
        f"## Token-level losses, forward + backward, {args.threads} thread(s) (bench_token_losses.py)", "",
        (f"Commands (rows merged with --resume): {runs}  " if commands else f"Command: `{cmd}`  "),
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {args.threads} thread(s)"
        f"{', each variant pinned to one core' if args.threads == 1 else ', both cores'}, load average at the "
        f"end {m['load'][0]:.1f} (1-min; a VM shared with other helpers' jobs)  ",
        f"Versions: {', '.join(f'{k} {val}' for k, val in m['versions'].items())}  ",
        f"Date: {m['date']}  ",
        f"Shape: N={args.n}, H={args.hidden}, H_teacher={args.teacher_hidden}, V={args.vocab}, float32 (bf16 where "
        "named), 90% of the positions counted; token DPKD sigmoid β=0.1, JSD β=0.5, AKL μ=0.5, τ=1.  ",
        "Time / GEMMs: the median over repeats of (CPU s) / (CPU s of the floor measured next to it in the same "
        "process: the GEMMs over the counted rows, chunked as the framework's fused loss); in brackets min / min. "
        "Wall / GEMMs: the same with wall-clock seconds (what a caller waits for when the threads share the work). "
        "÷ materialised: (fused time / GEMMs) ÷ (materialised time / GEMMs)."
        + ("" if not args.no_memory else " Memory: see the 1-thread table."), "",
        "| loss | variant | chunk rows | CPU s (median, spread) [min wall s] | GEMMs CPU s | time / GEMMs [min/min] "
        "| wall / GEMMs | ÷ materialised | peak extra MiB | memory / materialised |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(loss, variant, res, rows) for (loss, variant), res in rows.items()]
    lines += _verdicts(rows)
    report = "\n".join(lines)
    print(report)
    if not args.no_write:
        common.write_section(f"bench_token_losses_t{args.threads}", report)


if __name__ == "__main__":
    main()
