"""Forward+backward of token-level DPKD (the released code's argmax preference, spec/README.md §4): dpkd's fused
token-chunked path against the same loss on materialised logits, and the GEMMs alone (the floor).

    python benchmarks/bench_token_dpkd.py                          # N=4096, H=512, V=32000
    python benchmarks/bench_token_dpkd.py --n 1024 --vocab 8000

Both variants call the Torch backend's ``dpkd_token_loss`` formula (the fused one per token chunk, with
student and teacher logits of the chunk formed together); the teacher runs without gradient. The floor
"gemm4" is student forward, teacher forward, grad_hidden and grad_weight, chunked like the fused path.
Memory is measured as in _common.py; it writes its section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

VARIANTS = {
    "fused_torch": "dpkd fused_dpkd_token_loss, torch",
    "materialised_torch": "dpkd_token_loss on materialised logits, torch eager",
    "fused_jax": "dpkd fused_dpkd_token_loss, jax (jit); memory: XLA's temp + output bytes",
    "materialised_jax": "dpkd_token_loss on materialised logits, jax (jit); memory: XLA's temp + output bytes",
    "gemm4": "the 4 GEMMs alone (student fwd, teacher fwd, grad_hidden, grad_weight)",
}


def child(args: argparse.Namespace) -> dict:
    common.pin_to_one_core()
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from dpkd.backends.torch import dpkd_token_loss
    from dpkd.backends.torch.fused_token import TOKEN_LOSS_BUFFERS, fused_dpkd_token_loss
    from dpkd.spec.fused import auto_chunk_size

    rng = np.random.default_rng(0)
    n, h, v, ht = args.n, args.hidden, args.vocab, args.teacher_hidden
    arrays = {
        "hidden": rng.standard_normal((n, h), dtype=np.float32),
        "weight": (rng.standard_normal((v, h), dtype=np.float32) / np.sqrt(h)).astype(np.float32),
        "teacher_hidden": rng.standard_normal((n, ht), dtype=np.float32),
        "teacher_weight": (rng.standard_normal((v, ht), dtype=np.float32) / np.sqrt(ht)).astype(np.float32),
        "mask": rng.random(n) > 0.1,
    }
    x = {k: torch.from_numpy(a) for k, a in arrays.items()}
    hidden, weight = x["hidden"].requires_grad_(True), x["weight"].requires_grad_(True)
    teacher_hidden, teacher_weight, mask = x["teacher_hidden"], x["teacher_weight"], x["mask"]
    chunk = args.chunk_size or auto_chunk_size(v, n_rows=n, buffers=TOKEN_LOSS_BUFFERS)

    def reset() -> None:
        hidden.grad = weight.grad = None

    floor = common.gemm_floor(hidden.detach(), weight.detach(), chunk, teacher_rows=teacher_hidden,
                              teacher_weight=teacher_weight)  # chunked like the fused path

    if args.child.endswith("_jax"):
        out = _child_jax(args, arrays, floor)
    else:
        if args.child == "fused_torch":
            def step() -> None:
                fused_dpkd_token_loss(hidden, weight, teacher_hidden, teacher_weight, mask,
                                      chunk_size=args.chunk_size or None).loss.backward()
        elif args.child == "materialised_torch":
            def step() -> None:
                with torch.no_grad():
                    teacher_logits = teacher_hidden @ teacher_weight.t()
                dpkd_token_loss(hidden @ weight.t(), teacher_logits, mask).loss.backward()
        elif args.child == "gemm4":
            step = floor
        else:
            raise SystemExit(f"unknown variant {args.child}")
        out = common.measure(step, reset, args.repeats, floor=None if args.memory_only else floor)
    out["chunk"] = chunk
    return out


def _child_jax(args: argparse.Namespace, arrays: dict, floor) -> dict:
    import jax
    import jax.numpy as jnp
    from dpkd.backends.jax import dpkd_token_loss
    from dpkd.backends.jax.fused_token import fused_dpkd_token_loss

    x = {k: jnp.asarray(a) for k, a in arrays.items()}
    if args.child == "fused_jax":
        def loss(hidden, weight, teacher_hidden, teacher_weight, mask):
            return fused_dpkd_token_loss(hidden, weight, teacher_hidden, teacher_weight, mask,
                                         chunk_size=args.chunk_size or None).loss
    else:
        def loss(hidden, weight, teacher_hidden, teacher_weight, mask):
            teacher_logits = jax.lax.stop_gradient(teacher_hidden @ teacher_weight.T)
            return dpkd_token_loss(hidden @ weight.T, teacher_logits, mask).loss

    # every array an argument: closed-over arrays become constants that XLA tries to fold at compile time
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    inputs = (x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"], x["mask"])
    return common.measure_jax(grad, inputs, args.repeats, None if args.memory_only else floor)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--teacher-hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=0, help="token rows per chunk (0: automatic)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--child", default=None)
    p.add_argument("--memory-only", action="store_true", help="(child) one sampled step, no floor")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    script = str(Path(__file__).resolve())
    shape = ["--n", str(args.n), "--hidden", str(args.hidden), "--teacher-hidden", str(args.teacher_hidden),
             "--vocab", str(args.vocab), "--repeats", str(args.repeats), "--threads", str(args.threads),
             "--chunk-size", str(args.chunk_size)]
    rows = {}
    for name in args.variants.split(","):
        rows[name] = common.run_variant(script, [name, *shape], args.threads)
        print(name, rows[name], flush=True)
    m = common.machine()
    lines = [
        "## Token-level DPKD, forward + backward (bench_token_dpkd.py)", "",
        f"Command: `python benchmarks/bench_token_dpkd.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {args.threads} thread(s), load average at the end "
        f"{m['load'][0]:.1f} (a VM shared with other tenants)  ",
        f"Versions: {', '.join(f'{k} {val}' for k, val in m['versions'].items())}  ",
        f"Date: {m['date']}  ",
        f"Shape: N={args.n}, H={args.hidden}, H_teacher={args.teacher_hidden}, V={args.vocab}, float32, "
        "form sigmoid, β=0.1, 90% of positions in the mask.  ",
        "Time / gemm4: the median over repeats of (CPU s) / (CPU s of the GEMMs alone, chunked the same way, "
        "measured next to it in the same process); in brackets min / min. Each variant pinned to one core.", "",
        "| variant | chunk rows | CPU s (median, spread) [min wall s] | gemm4 CPU s | time / gemm4 [min/min] "
        "| peak extra MiB | memory / materialised (same framework) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, res in rows.items():
        if "error" in res:
            lines.append(f"| {VARIANTS[name]} | | failed: {res['error']} | | | | |")
            continue
        base = rows.get("materialised_jax" if name.endswith("_jax") else "materialised_torch", {})
        m_ratio = f"{res['peak_bytes'] / base['peak_bytes']:.3f}" if "peak_bytes" in base else "–"
        chunk = res["chunk"] if name.startswith(("fused", "gemm")) else "–"
        spread = f"({min(res['times_s']):.2f}–{max(res['times_s']):.2f})" if len(res["times_s"]) > 1 else ""
        lines.append(f"| {VARIANTS[name]} | {chunk} | {res['time_s']:.2f} {spread} [{res['wall_s']:.2f}] | "
                     f"{res['floor_s']:.2f} | {res['ratio']:.3f} [{res['ratio_min']:.3f}] | "
                     f"{common.mib(res['peak_bytes'])} | {m_ratio} |")
    report = "\n".join(lines)
    print(report)
    if not args.no_write:
        common.write_section("bench_token_dpkd", report)


if __name__ == "__main__":
    main()
