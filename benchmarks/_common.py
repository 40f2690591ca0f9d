"""Shared plumbing of the benchmark scripts: one subprocess per variant, peak-RSS sampling, RESULTS.md.

Memory, honestly: each variant's memory is measured in its own process with ``MALLOC_MMAP_THRESHOLD_=65536``
so every large buffer is an mmap that goes back to the OS when freed, i.e. the resident set follows the live
heap (its times come from another process with the allocator's defaults, see ``run_child``).
A thread samples ``/proc/self/statm`` every ~0.2 ms during one forward+backward step; the number reported
is (peak RSS during the step) − (RSS just before it), with the inputs resident and every ``.grad`` cleared,
so it counts the activations, the scratch buffers AND the gradients the step produces (grad_weight is the
same 65 MB for every variant). Compilation (torch.compile, jax.jit) happens in the warm-up, outside the
measured step. Time: process CPU time of forward+backward on one pinned core (the sampler's own CPU time
subtracted), median over the repeats after one warm-up; the minimum wall clock is recorded beside it; each
repeat is paired with a run of the variant's GEMM floor in the same process (see ``measure``).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakSampler:
    """Samples the resident set in a background thread (the GEMMs release the GIL) while active."""

    def __init__(self, interval: float = 1e-3):
        self.interval = interval
        self.peak = 0
        self.cpu_s = 0.0  # the sampler's own CPU time, subtracted from the step's process CPU time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.thread_time()
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)
        self.cpu_s = time.thread_time() - start

    def __enter__(self) -> PeakSampler:
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def pin_to_one_core() -> int:
    """Run this process (and every thread it starts, XLA's included) on one core, the last one.

    Torch is set to one thread anyway; XLA's CPU client starts its own pool whatever the flags say, so
    without this its CPU time would count two cores' work against Torch's one."""
    core = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return core


def gemm_floor(rows, weight, chunk: int, *, teacher_rows=None, teacher_weight=None, recompute: bool = False
               ) -> Callable[[], None]:
    """The GEMMs a fused lm_head loss must do, alone, over chunks of ``chunk`` rows: the teacher's forward
    (when given), the student forward (twice with ``recompute``: linear_token_logps), grad_rows and
    grad_weight. Buffers are allocated per call, as a loss allocates them."""
    import torch

    n, v = rows.shape[0], weight.shape[0]

    def step() -> None:
        buf = torch.empty(min(chunk, n), v)
        grad_rows = torch.empty_like(rows)
        grad_w = torch.empty_like(weight)
        for i0 in range(0, n, chunk):
            sl = slice(i0, min(i0 + chunk, n))
            part = buf[: sl.stop - sl.start]
            if teacher_rows is not None:
                torch.mm(teacher_rows[sl], teacher_weight.t(), out=part)
            if recompute:
                torch.mm(rows[sl], weight.t(), out=part)
            torch.mm(rows[sl], weight.t(), out=part)
            torch.mm(part, weight, out=grad_rows[sl])
            if i0 == 0:
                torch.mm(part.t(), rows[sl], out=grad_w)
            else:
                grad_w.addmm_(part.t(), rows[sl])

    return step


def _timed(step: Callable[[], None], reset: Callable[[], None], sample: bool) -> tuple[float, float, int]:
    """(CPU s, wall s, peak extra bytes or 0) of one call of ``step`` after ``reset``."""
    reset()
    before = rss_bytes()
    if not sample:
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        return time.process_time() - c0, time.perf_counter() - t0, 0
    with PeakSampler() as sampler:
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        wall = time.perf_counter() - t0
        c1 = time.process_time()
    return c1 - c0 - sampler.cpu_s, wall, sampler.peak - before


def measure(step: Callable[[], None], reset: Callable[[], None], repeats: int,
            floor: Callable[[], None] | None = None) -> dict:
    """Warm up once (compiles), then ``repeats`` timed steps, each next to one run of ``floor`` (the
    GEMMs the step must do) in alternating order; peak memory of the step (never of the floor).

    The machine is a VM shared with other tenants: the same work takes ±20% from one second to the next,
    so a ratio of two medians taken minutes apart in different processes is mostly noise. Here every step
    has its own floor measured seconds away in the same process; the report gives the median of those
    per-repeat ratios and the ratio of the two minima (the least-disturbed runs)."""
    reset()
    step()
    if floor is not None:
        floor()
    else:
        repeats = 1  # a memory-only run: one sampled step
    cpu, walls, peaks, floor_cpu, floor_walls = [], [], [], [], []

    def run_floor() -> None:
        c, w, _ = _timed(floor, lambda: None, False)
        floor_cpu.append(c)
        floor_walls.append(w)

    for i in range(repeats):
        if floor is not None and i % 2 == 0:
            run_floor()
        c, w, peak = _timed(step, reset, True)
        cpu.append(c)
        walls.append(w)
        peaks.append(peak)
        if floor is not None and i % 2 == 1:
            run_floor()
    # CPU time of the process (one core) is what the ratios use: on a shared machine the wall clock
    # mostly measures the others; CPU time still carries their cache/bandwidth contention.
    out = {"time_s": statistics.median(cpu), "times_s": cpu, "wall_s": min(walls), "peak_bytes": max(peaks),
           "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if floor is not None:
        # with more than one thread the wall clock is what a caller waits for: a parallel region too small
        # to split shows there (the CPU time of an idle thread is not counted)
        out.update({"floor_s": statistics.median(floor_cpu), "floor_times_s": floor_cpu,
                    "ratio": statistics.median(c / f for c, f in zip(cpu, floor_cpu)),
                    "ratio_min": min(cpu) / min(floor_cpu),
                    "ratio_wall": statistics.median(w / f for w, f in zip(walls, floor_walls))})
    return out


def measure_jax(grad, inputs: tuple, repeats: int, floor: Callable[[], None] | None) -> dict:
    """``measure`` for a jitted JAX function of ``inputs``; memory from XLA's own accounting.

    XLA's CPU client keeps its buffers in its own pool, so the resident set misses most of them; the
    compiled executable's temporary + output bytes (``memory_analysis``) are exact, and are what
    "peak extra" means for the Torch rows (activations, scratch and the gradients produced)."""
    import jax

    def step() -> None:
        jax.block_until_ready(grad(*inputs))

    out = measure(step, lambda: None, repeats, floor=floor)
    stats = grad.lower(*inputs).compile().memory_analysis()
    out["rss_peak_bytes"] = out["peak_bytes"]
    out["peak_bytes"] = stats.temp_size_in_bytes + stats.output_size_in_bytes
    return out


def run_child(script: str, args: list[str], threads: int, *, memory: bool = False, timeout: float = 1800) -> dict:
    """Run ``script --child ...`` in a fresh process; its last stdout line is a JSON dict.

    ``memory``: with ``MALLOC_MMAP_THRESHOLD_=65536``, so the resident set follows the live heap (every
    buffer over 64 KiB is its own mapping, returned when freed). That setting also makes every such
    allocation fault in fresh pages, which slows code that allocates many mid-sized buffers (XLA's
    executables: ~40% at N = 4096), so times come from a run with the allocator's defaults."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "XLA_FLAGS": f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} "
                             f"intra_op_parallelism_threads={threads}"})
    if memory:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run([sys.executable, script, "--child", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_variant(script: str, args: list[str], threads: int) -> dict:
    """Times (with their floors) from one child, the peak memory from another (see ``run_child``)."""
    timed = run_child(script, args, threads)
    if "error" in timed:
        return timed
    mem = run_child(script, [*args, "--memory-only"], threads, memory=True)
    if "error" in mem:
        return mem
    timed["peak_bytes"] = mem["peak_bytes"]
    return timed


def machine() -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for mod in ("torch", "jax", "numpy", "liger_kernel"):
        try:
            from importlib.metadata import version

            versions[mod] = version(mod.replace("_", "-"))
        except Exception:  # noqa: BLE001  (absent is fine: say so)
            versions[mod] = "absent"
    return {"nproc": os.cpu_count(), "cpu": cpu, "versions": versions,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load": os.getloadavg()}


def write_section(name: str, text: str) -> None:
    """Replace (or append) the section of RESULTS.md between this script's markers."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nWritten by the scripts in this folder.\n"
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(new)


def mib(x: float) -> str:
    return f"{x / 2**20:.0f}"
