"""Forward+backward of sequence-level DPKD (Eq. 8) side by side: dpkd fused (torch, jax), a TRL-style
materialised loss (eager and torch.compile), Liger-Kernel's LigerFusedLinearDPOLoss with the teacher as the
reference model, and the floor: the GEMMs alone, measured in the same run.

    python benchmarks/bench_sequence_dpkd.py                       # the issue's size: N=4096, H=512, V=32000
    python benchmarks/bench_sequence_dpkd.py --n 1024 --vocab 8000 --repeats 3 --scale 4

N = 2·B·T tokens (B pairs of a chosen and a rejected sequence of T tokens, the first ``--prompt`` of each
ignored); the teacher has hidden size ``--teacher-hidden`` and its own lm_head (no gradient). Time ratios
are against the chunked GEMMs the loss must do (floor "gemm4": student forward, grad_hidden, grad_weight
and the teacher forward; "gemm3": without the teacher, for the precomputed-teacher-logps row; "gemm4s":
the four student GEMMs of ``linear_token_logps`` alone). Memory ratios are against the materialised eager
baseline. See _common.py for what the memory number measures. Run it in the benchmark environment
(/work/bench-venv: torch, jax, liger-kernel 0.8.5); it writes its section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

VARIANTS = {
    "dpkd_fused_torch": ("(a) dpkd fused, torch", "gemm4"),
    "dpkd_fused_torch_logps": ("(a') dpkd fused, torch, precomputed teacher logps", "gemm3"),
    "dpkd_fused_torch_small_chunks": ("(a*) dpkd fused, torch, chunks of one sequence (two-pass mode)", "gemm4"),
    "linear_token_logps_torch": ("(a'') torch linear_token_logps alone (Σ g·logp over all N rows)", "gemm4s"),
    "dpkd_fused_jax": ("(b) dpkd fused, jax (jit); memory: XLA's temp + output bytes", "gemm4"),
    "trl_eager": ("(c) materialised, TRL-style, eager", "gemm4"),
    "trl_compile": ("(d) torch.compile of (c)", "gemm4"),
    "liger": ("(e) Liger LigerFusedLinearDPOLoss (ref = teacher)", "gemm4"),
    "gemm4": ("(f) the 4 GEMMs alone (3 student + teacher fwd)", "gemm4"),
}
FLOORS = {
    "gemm4": "student forward, grad_hidden, grad_weight + the teacher's forward",
    "gemm3": "student forward, grad_hidden, grad_weight",
    "gemm4s": "forward, its recompute, grad_hidden, grad_weight",
}
LARGE = ("dpkd_fused_torch", "dpkd_fused_torch_small_chunks", "dpkd_fused_jax", "trl_eager", "liger", "gemm4")


def _floor_step(kind: str, x: dict, n_rows: int, h: int, ht: int, chunk: int):
    """The GEMMs of ``kind`` (see FLOORS) alone, over chunks of ``chunk`` rows."""
    import torch

    xs = torch.cat([x["ch"], x["rj"]]).detach().reshape(n_rows, h)
    teacher = {}
    if kind == "gemm4":
        teacher = {"teacher_rows": torch.cat([x["tch"], x["trj"]]).reshape(n_rows, ht), "teacher_weight": x["tw"]}
    return common.gemm_floor(xs, x["w"].detach(), chunk, recompute=kind == "gemm4s", **teacher)


def child(args: argparse.Namespace) -> dict:
    if args.threads == 1:
        common.pin_to_one_core()
    import numpy as np

    name = args.child
    rng = np.random.default_rng(0)
    pairs = args.n // (2 * args.seq_len)
    t_len, h, v, ht = args.seq_len, args.hidden, args.vocab, args.teacher_hidden
    labels = rng.integers(0, v, (2, pairs, t_len))
    labels[:, :, : args.prompt] = -100
    arrays = {
        "ch": rng.standard_normal((pairs, t_len, h), dtype=np.float32),
        "rj": rng.standard_normal((pairs, t_len, h), dtype=np.float32),
        "w": (rng.standard_normal((v, h), dtype=np.float32) / np.sqrt(h)).astype(np.float32),
        "tch": rng.standard_normal((pairs, t_len, ht), dtype=np.float32),
        "trj": rng.standard_normal((pairs, t_len, ht), dtype=np.float32),
        "tw": (rng.standard_normal((v, ht), dtype=np.float32) / np.sqrt(ht)).astype(np.float32),
    }
    beta = 0.1
    import torch

    torch.set_num_threads(args.threads)
    x = {k: torch.from_numpy(a) for k, a in arrays.items()}
    chunk = 2 * t_len  # the rows of one pair: the single pass's chunk, and the floors'
    floor = _floor_step(VARIANTS[name][1], x, 2 * pairs * t_len, h, ht, chunk)
    if name == "dpkd_fused_jax":
        return _child_jax(arrays, labels, beta, args, floor)
    lc, ls = torch.from_numpy(labels[0]), torch.from_numpy(labels[1])
    params = [x["ch"], x["rj"], x["w"]]
    for p in params:
        p.requires_grad_(True)

    def reset() -> None:
        for p in params:
            p.grad = None

    if name.startswith("dpkd_fused_torch") or name == "linear_token_logps_torch":
        from dpkd.backends.torch import fused

        if name == "linear_token_logps_torch":
            rows = torch.cat([x["ch"], x["rj"]]).reshape(-1, h).detach().requires_grad_(True)
            flat_labels = torch.cat([lc, ls]).reshape(-1)
            g = torch.randn(rows.shape[0])
            params[:] = [rows, x["w"]]

            def step() -> None:
                logps = fused.linear_token_logps(rows, x["w"], flat_labels, chunk_size=args.chunk_size or None)
                (logps * g).sum().backward()
        else:
            if name == "dpkd_fused_torch_logps":
                with torch.no_grad():
                    c, d = (fused.linear_token_logps(th.reshape(-1, ht), x["tw"], lab.reshape(-1))
                            .view(pairs, -1).sum(1) for th, lab in ((x["tch"], lc), (x["trj"], ls)))
                teacher = fused.TeacherLogps(c, d)
            else:
                teacher = fused.TeacherLMHead(x["tch"], x["trj"], x["tw"])

            # (a*): chunks of one sequence's rows, too few for a whole pair, so the automatic mode is the
            # two-pass one (4 student GEMMs) with half the logits buffer
            size = t_len if name.endswith("small_chunks") else (args.chunk_size or None)

            def step() -> None:
                out = fused.fused_dpkd_loss(x["ch"], x["rj"], x["w"], lc, ls, teacher=teacher, beta=beta,
                                            chunk_size=size)
                out.loss.backward()
    elif name in ("trl_eager", "trl_compile"):
        fn = _trl_loss
        if name == "trl_compile":
            fn = torch.compile(_trl_loss)

        def step() -> None:
            fn(x["ch"], x["rj"], x["w"], x["tch"], x["trj"], x["tw"], lc, ls, beta).backward()
    elif name == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        module = LigerFusedLinearDPOLoss(beta=beta, use_ref_model=True)
        inp, target = torch.cat([x["ch"], x["rj"]]), torch.cat([lc, ls])
        ref_inp = torch.cat([x["tch"], x["trj"]])
        params[:] = [x["w"]]
        inp.requires_grad_(True)
        params.append(inp)

        def step() -> None:
            out = module(x["w"], inp, target, None, ref_input=ref_inp, ref_weight=x["tw"])
            out[0].backward()
    elif name == "gemm4":
        step = floor
    else:
        raise SystemExit(f"unknown variant {name}")
    return common.measure(step, reset, args.repeats, floor=None if args.memory_only else floor)


def _trl_loss(ch, rj, w, tch, trj, tw, lc, ls, beta):
    """What TRL's DPOTrainer (≤ v0.28 ``concatenated_forward`` / ``get_batch_logps`` / ``dpo_loss``) does."""
    import torch
    import torch.nn.functional as F

    def batch_logps(logits, labels):
        mask = labels != -100
        safe = torch.where(mask, labels, 0)
        per_token = torch.gather(logits.log_softmax(-1), dim=2, index=safe.unsqueeze(2)).squeeze(2)
        return (per_token * mask).sum(-1)

    labels = torch.cat([lc, ls])
    logps = batch_logps(torch.cat([ch, rj]) @ w.t(), labels)
    with torch.no_grad():
        ref = batch_logps(torch.cat([tch, trj]) @ tw.t(), labels)
    n = ch.shape[0]
    logits = (logps[:n] - logps[n:]) - (ref[:n] - ref[n:])
    return -F.logsigmoid(beta * logits).mean()


def _child_jax(arrays, labels, beta, args, floor) -> dict:
    import jax
    import jax.numpy as jnp
    from dpkd.backends.jax import fused

    x = {k: jnp.asarray(a) for k, a in arrays.items()}
    lc, ls = jnp.asarray(labels[0]), jnp.asarray(labels[1])

    # Every array is an argument of the jitted function: closed-over arrays become XLA constants, and
    # XLA then tries to constant-fold the teacher's GEMM at compile time (minutes).
    def loss(ch, rj, w, tch, trj, tw, lc, ls):
        return fused.fused_dpkd_loss(ch, rj, w, lc, ls, teacher=fused.TeacherLMHead(tch, trj, tw), beta=beta,
                                     chunk_size=args.chunk_size or None).loss

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    inputs = (x["ch"], x["rj"], x["w"], x["tch"], x["trj"], x["tw"], lc, ls)
    return common.measure_jax(grad, inputs, args.repeats, None if args.memory_only else floor)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help="tokens (2 · pairs · seq_len)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--teacher-hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--prompt", type=int, default=32, help="ignored prompt tokens at the start of each sequence")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--large-repeats", type=int, default=2)
    p.add_argument("--scale", type=int, default=4, help="the larger N = scale · n (memory flatness)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=0,
                   help="rows per chunk of the dpkd fused variants (0: automatic, the 64 MiB budget)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--child", default=None)
    p.add_argument("--memory-only", action="store_true", help="(child) one sampled step, no floor")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    script = str(Path(__file__).resolve())
    shape = ["--hidden", str(args.hidden), "--teacher-hidden", str(args.teacher_hidden), "--vocab",
             str(args.vocab), "--seq-len", str(args.seq_len), "--prompt", str(args.prompt), "--threads",
             str(args.threads), "--chunk-size", str(args.chunk_size)]
    names = args.variants.split(",")
    rows = {}
    for n, repeats, which in ((args.n, args.repeats, names),
                              (args.n * args.scale, args.large_repeats, [m for m in names if m in LARGE])):
        if repeats <= 0:
            continue
        for name in which:
            res = common.run_variant(script, [name, "--n", str(n), "--repeats", str(repeats), *shape], args.threads)
            rows[(n, name)] = res
            print(n, name, res, flush=True)
    report = _report(args, rows)
    print(report)
    if not args.no_write:
        common.write_section(f"bench_sequence_dpkd_t{args.threads}", report)


def _verdict(value: float, limit: float) -> str:
    return "met" if value <= limit else f"missed by {100 * (value / limit - 1):.0f}%"


def _targets(args: argparse.Namespace, rows: dict) -> list[str]:
    """Issue 5's targets against this run's rows (time ratios are each variant's in-process floor ratio:
    gemm4, gemm3 and gemm4s are all N·H·V GEMM work of the same size class, see FLOORS)."""
    n, big = args.n, args.n * args.scale

    def get(name: str, key: str, at: int = n) -> float | None:
        return rows.get((at, name), {}).get(key)

    def mib(x: float) -> str:
        return f"{x / 2**20:.0f} MiB"

    out = ["", "Targets (issues 5 and 14), from the rows above:", "", "| target | measured | verdict |",
           "|---|---|---|"]

    def add(target: str, value: float | None, limit: float, text: str = "") -> None:
        if value is not None:
            out.append(f"| {target} | {text or f'{value:.3f}'} | {_verdict(value, limit)} |")

    def add_time(target: str, name: str) -> None:
        r = get(name, "ratio")
        if r is not None:
            add(target, r, 1.15, f"{r:.3f} × (min/min {get(name, 'ratio_min'):.3f})")

    add_time("linear_token_logps ≤ 1.15 × its 4 GEMMs", "linear_token_logps_torch")
    ltl, c = get("linear_token_logps_torch", "ratio"), get("trl_eager", "ratio")
    if ltl and c:
        add("linear_token_logps faster than (c)", ltl / c, 1.0, f"{ltl / c:.2f} × (c)'s time")
    add_time("fused DPKD, teacher lm_head: ≤ 1.15 × its GEMMs", "dpkd_fused_torch")
    add_time("fused DPKD, precomputed teacher logps: ≤ 1.15 × its 3 GEMMs", "dpkd_fused_torch_logps")
    pa, pc, pe = get("dpkd_fused_torch", "peak_bytes"), get("trl_eager", "peak_bytes"), get("liger", "peak_bytes")
    pa4 = get("dpkd_fused_torch", "peak_bytes", big)
    if pa and pc:
        add(f"peak memory ≤ 10% of (c) at N = {n}", pa / pc, 0.10, f"{pa / pc:.3f} ({mib(pa)} vs {mib(pc)})")
    if pa and pa4:
        add(f"memory growth < 1.2× from N = {n} to {big}", pa4 / pa, 1.2, f"{pa4 / pa:.2f}× ({mib(pa)} → {mib(pa4)})")
    if pa and pe:
        add("≤ 0.5 × Liger's peak memory", pa / pe, 0.5, f"{pa / pe:.3f} ({mib(pa)} vs {mib(pe)})")
    fa, e, jb = get("dpkd_fused_torch", "ratio"), get("liger", "ratio"), get("dpkd_fused_jax", "ratio")
    if fa and e:
        add("≤ 0.8 × Liger's time (both chunked by one pair)", fa / e, 0.8)
    ps, fs = get("dpkd_fused_torch_small_chunks", "peak_bytes"), get("dpkd_fused_torch_small_chunks", "ratio")
    if ps and pe:
        add("(a*) ≤ 0.5 × Liger's peak memory", ps / pe, 0.5, f"{ps / pe:.3f} ({mib(ps)} vs {mib(pe)})")
    if fs and e:
        add("(a*) ≤ 0.8 × Liger's time", fs / e, 0.8)
    if fa and jb:
        add("JAX fused ≤ 1.3 × torch fused", jb / fa, 1.3)
    return out


def _report(args: argparse.Namespace, rows: dict) -> str:
    m = common.machine()
    cmd = "python benchmarks/bench_sequence_dpkd.py " + " ".join(sys.argv[1:])
    lines = [
        f"## Sequence-level DPKD, forward + backward, {args.threads} thread(s) (bench_sequence_dpkd.py)", "",
        f"Command: `{cmd}`  ",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {args.threads} thread(s)"
        f"{', every variant pinned to one core' if args.threads == 1 else ', both cores'}, load average at the "
        f"end {m['load'][0]:.1f} (1-min; a VM shared with other helpers' jobs)  ",
        f"Versions: {', '.join(f'{k} {val}' for k, val in m['versions'].items())}  ",
        f"Date: {m['date']}  ",
        f"Shape: H={args.hidden}, H_teacher={args.teacher_hidden}, V={args.vocab}, T={args.seq_len} per sequence "
        f"({args.prompt} prompt tokens ignored), float32, β=0.1, dpkd chunk "
        f"{args.chunk_size or 'automatic (64 MiB)'} rows; floors chunked by one pair ({2 * args.seq_len} rows).  ",
        "Time / floor: the median over repeats of (this repeat's CPU s) / (its floor's CPU s, measured next to it "
        "in the same process), and in brackets min(CPU s) / min(floor CPU s); wall / floor: the same median of "
        "wall-clock ratios (what a caller waits for when the threads share the work). Floors: "
        + "; ".join(f"{k} = {val}" for k, val in FLOORS.items()) + ".", "",
        "| N | variant | CPU s (median, spread) [min wall s] | floor | floor CPU s | time / floor [min/min] "
        "| wall / floor | peak extra MiB | memory / (c) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (n, name), res in rows.items():
        label, floor = VARIANTS[name]
        if "error" in res:
            lines.append(f"| {n} | {label} | failed: {res['error']} | | | | | | |")
            continue
        base = rows.get((n, "trl_eager"), {})
        m_ratio = f"{res['peak_bytes'] / base['peak_bytes']:.3f}" if "peak_bytes" in base else "–"
        spread = f"{min(res['times_s']):.2f}–{max(res['times_s']):.2f}" if len(res["times_s"]) > 1 else ""
        lines.append(f"| {n} | {label} | {res['time_s']:.2f} {('(' + spread + ')') if spread else ''} "
                     f"[{res['wall_s']:.2f}] | {floor} | {res['floor_s']:.2f} | {res['ratio']:.3f} "
                     f"[{res['ratio_min']:.3f}] | {res.get('ratio_wall', float('nan')):.3f} | "
                     f"{common.mib(res['peak_bytes'])} | {m_ratio} |")
    lines += _targets(args, rows)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
