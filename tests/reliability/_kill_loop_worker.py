"""Kill-at-random-moments loops (test_kill_loops.py runs this script once): every scenario's work runs in
forked children, each SIGKILLed at a moment drawn uniformly over an uninterrupted run's duration, until
``kills`` kills have landed or ``budget_s`` seconds have passed; then one child runs to the end. After
every kill a fresh child checks what a reader would see on disk. One JSON line per scenario on stdout.

Usage: _kill_loop_worker.py WORKDIR SEED KILLS BUDGET_S SCENARIO...
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)  # before any op: forked children inherit no thread pool
torch.set_num_interop_threads(1)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "transformers"))

from dpkd.integrations.transformers.data import format_prompt, tokenize_records  # noqa: E402
from dpkd.integrations.transformers.models import build_word_tokenizer, tiny_causal_lm  # noqa: E402
from dpkd.integrations.transformers.toy_task import make_task  # noqa: E402


def in_child(fn) -> tuple[int, float]:
    """Run ``fn()`` in a forked child; (exit status, seconds). A child's exception exits with status 1."""
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported, then the child ends
            print(f"child failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - t0


def killed_at_random(fn, window: float, rng: random.Random) -> bool:
    """Fork ``fn()``, SIGKILL it after a uniform random delay in [0, window]; whether the kill landed
    (the child was still running)."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(0)
    time.sleep(rng.uniform(0.0, window))
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == -signal.SIGKILL


def loop(name: str, run, *, kills: int, budget_s: float, rng: random.Random) -> dict:
    """Rounds from an empty folder: ``run.attempt`` (the work, resuming what is on disk) is started and
    killed at random moments until an attempt finishes, ``run.check`` (a fresh reader) runs after every
    kill, then the finished result must equal the uninterrupted reference (``run.compare``). Rounds repeat
    until ``kills`` kills have landed or ``budget_s`` has passed (at least one kill lands, in ≤ 10 tries)."""
    status, window = in_child(run.reference)
    assert status == 0, f"{name}: the uninterrupted run failed"
    landed = tries = rounds = 0
    bad: list[str] = []
    t0 = time.perf_counter()

    def more() -> bool:
        return (landed < kills and time.perf_counter() - t0 < budget_s) or (landed == 0 and tries < 10)

    while more():
        rounds += 1
        shutil.rmtree(run.out, ignore_errors=True)
        while more():
            tries += 1
            if not killed_at_random(run.attempt, window, rng):
                break  # this attempt finished before its kill
            landed += 1
            if in_child(run.check)[0] != 0:
                bad.append(f"round {rounds}, after kill {landed}: what a reader found was wrong")
        if in_child(run.attempt)[0] != 0:
            bad.append(f"round {rounds}: the uninterrupted attempt after the kills failed")
        elif in_child(run.compare)[0] != 0:
            bad.append(f"round {rounds}: the result differs from the uninterrupted run")
    return {"scenario": name, "rounds": rounds, "tries": tries, "kills": landed, "window_s": round(window, 3),
            "seconds": round(time.perf_counter() - t0, 1), "problems": bad}


# ------------------------------------------------------------------------------------------ scenarios
def toy():
    task = make_task(64, 8, 8, seed=0)
    tok = build_word_tokenizer([format_prompt(r) + " " + r.response for s in task.values() for r in s])
    return tok, tokenize_records(task["train"], tok), tokenize_records(task["valid"], tok)


def model(tok, seed):
    return tiny_causal_lm("gpt2", len(tok), d_model=16, n_layers=1, n_heads=2, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id, seed=seed)


def same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f"{a} != {b}"


class Trainer:
    """DistillTrainer, on-policy DPKD (sampled y_s, online y_t), 8 steps, a checkpoint every 2: resumed
    after every kill; the final weights and every logged metric equal the uninterrupted run's."""

    def __init__(self, work: Path) -> None:
        self.ref, self.out = work / "trainer-ref", work / "trainer"
        self.tok, self.train, self.probe = toy()

    def _train(self, out: Path, resume: bool) -> None:
        from dpkd.integrations.transformers.trainer import DistillConfig, DistillTrainer

        cfg = DistillConfig(output_dir=str(out), method="dpkd", max_steps=8, per_device_train_batch_size=4,
                            logging_steps=2, save_steps=2, eval_steps=4, save_total_limit=2, max_new_tokens=8,
                            disable_tqdm=True, report_to="none", teacher_outputs="online",
                            lr_scheduler_type="cosine", warmup_steps=2, objective="half")
        DistillTrainer(model(self.tok, 0), model(self.tok, 1), self.train, cfg, pad_token_id=self.tok.pad_token_id,
                       eos_token_id=self.tok.eos_token_id, probe_examples=self.probe[:4]
                       ).train(resume_from_checkpoint=resume)

    def reference(self) -> None:
        self._train(self.ref, False)

    def attempt(self) -> None:
        self._train(self.out, True)

    def check(self) -> None:
        from dpkd.integrations.transformers.checkpoint import intact_checkpoints

        _, notes = intact_checkpoints(self.out)
        assert not notes, notes  # a kill never leaves a checkpoint that does not verify

    def compare(self) -> None:
        same_weights(self.ref / "checkpoint-8" / "model.safetensors", self.out / "checkpoint-8" / "model.safetensors")
        a = json.loads((self.ref / "trainer_state.json").read_text())["log_history"]
        b = json.loads((self.out / "trainer_state.json").read_text())["log_history"]
        assert a == b, "log histories differ"


class LogpCache:
    """The teacher log-prob cache (exact distributions, top_k = V): scored and written; after a kill the
    file is absent or reads back whole, never part of it."""

    def __init__(self, work: Path) -> None:
        self.ref, self.out = work / "logps-ref", work / "logps"
        self.tok, self.train, _ = toy()
        self.teacher = model(self.tok, 1).eval()
        from dpkd.integrations.transformers.teacher_cache import example_id

        for n, ex in enumerate(self.train):
            ex.teacher_ids = ex.response_ids[: 4 + n % 7]
        self.count = len({example_id(ex.prompt_ids, ex.teacher_ids) for ex in self.train})

    def _entries(self, folder: Path):
        from dpkd.integrations.transformers.teacher_cache import TeacherLogpCache

        cache = TeacherLogpCache(folder, self.teacher, self.tok, top_k=len(self.tok), batch_size=8)
        assert not cache.damaged, "a damaged cache file was read"
        return cache.entries(self.train)

    def reference(self) -> None:
        self._entries(self.ref)

    def attempt(self) -> None:
        self._entries(self.out)

    def check(self) -> None:
        from dpkd.integrations.transformers.teacher_cache import TeacherLogpCache

        cache = TeacherLogpCache(self.out, self.teacher, self.tok, top_k=len(self.tok))
        assert not cache.damaged, "a damaged cache file was read"
        assert len(cache._entries) in (0, self.count), "part of the examples"

    def compare(self) -> None:
        from safetensors.torch import load_file

        (a,), (b,) = self.ref.glob("*.safetensors"), self.out.glob("*.safetensors")
        ta, tb = load_file(str(a)), load_file(str(b))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


class TeacherOutputs:
    """The job's pre-generated y_t (``Experiment._teacher_responses``: sampled, JSONL written atomically):
    after a kill the file is absent or holds every row; the final ids equal the uninterrupted run's."""

    def __init__(self, work: Path) -> None:
        from types import SimpleNamespace

        from dpkd.integrations.transformers.job import JobConfig

        self.tok, self.train, _ = toy()
        self.work, self.out = work, work / "outputs"
        teacher = model(self.tok, 1).eval()
        self.job = {name: SimpleNamespace(cfg=JobConfig(max_new_tokens=16), cache_dir=work / name, teacher_key="k",
                                          teacher=teacher, tok=self.tok) for name in ("outputs-ref", "outputs")}

    def _responses(self, name: str):
        from dpkd.integrations.transformers.experiment import Experiment

        (self.work / name).mkdir(parents=True, exist_ok=True)
        return Experiment._teacher_responses(self.job[name], self.train, tag="y_t", do_sample=True)

    def reference(self) -> None:
        self._responses("outputs-ref")

    def attempt(self) -> None:
        self._responses("outputs")

    def check(self) -> None:
        from dpkd.integrations.transformers.job import _read_lines

        for path in (self.work / "outputs").glob("*.jsonl"):
            rows, problem = _read_lines(path, len(self.train))
            assert rows is not None, problem

    def compare(self) -> None:
        (a,), (b,) = (self.work / "outputs-ref").glob("*.jsonl"), (self.work / "outputs").glob("*.jsonl")
        assert a.name == b.name and a.read_text() == b.read_text()


class ConvertedModel:
    """The GGUF → safetensors cache (``pretrained_folder``) of a tiny Llama GGUF file: after a kill no
    folder that counts is half-written (it is complete or absent); the final folder equals the reference."""

    def __init__(self, work: Path) -> None:
        from _tiny_gguf import vocabulary, write_tiny_llama_gguf

        self.work, self.out = work, work / "convert"
        llama = tiny_causal_lm("llama", len(vocabulary()), d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                               pad_token_id=2, eos_token_id=2, seed=0)
        self.gguf = write_tiny_llama_gguf(llama, work / "Tiny-Llama.Q8_0.gguf")

    def _folder(self, cache: str) -> Path:
        from dpkd.integrations.transformers.pretrained import pretrained_folder

        return pretrained_folder(self.gguf, self.work / cache)

    def reference(self) -> None:
        self._folder("convert-ref")

    def attempt(self) -> None:
        self._folder("convert")

    def check(self) -> None:
        from dpkd.integrations.transformers.pretrained import MANIFEST, folder_is_complete

        for folder in (self.work / "convert" / "pretrained").glob("*"):
            if not folder.name.startswith("."):  # a visible folder is a finished conversion
                assert folder_is_complete(folder) and (folder / MANIFEST).is_file(), f"{folder} is half-written"

    def compare(self) -> None:
        (a,), (b,) = ((self.work / c / "pretrained").glob("[!.]*") for c in ("convert-ref", "convert"))
        same_weights(a / "model.safetensors", b / "model.safetensors")
        left = [p.name for p in (self.work / "convert" / "pretrained").iterdir() if p.name.startswith(".")]
        assert not left, f"leftovers {left}"


SCENARIOS = {"trainer": Trainer, "logp_cache": LogpCache, "teacher_outputs": TeacherOutputs,
             "converted_model": ConvertedModel}


def main() -> None:
    work, seed, kills, budget = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    rng = random.Random(seed)
    for name in sys.argv[5:]:
        scenario = SCENARIOS[name](work)
        print(json.dumps({"seed": seed, **loop(name, scenario, kills=kills, budget_s=budget, rng=rng)}), flush=True)


if __name__ == "__main__":
    main()
