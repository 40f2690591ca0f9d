"""Worker of test_hf_distributed.py, started by torchrun / accelerate launch (or plainly, for world size 1).

    python _dist_worker.py methods OUT      every method, 3 steps, float64; engines refused on CPU
    python _dist_worker.py killed OUT       DPKD, checkpoints every 2 steps; rank 1 SIGKILLs itself while
                                            writing checkpoint-4 (after its own files, before the barrier)
    python _dist_worker.py midstep OUT      DPKD, checkpoints every 2 steps; rank 1 SIGKILLs itself in step 3,
                                            between its two micro-batches' backward passes (the other rank is
                                            then waiting in the gradient all-reduce)
    python _dist_worker.py resume OUT       DPKD as in midstep, resumed from OUT's latest checkpoint
    python _dist_worker.py bf16 OUT         two DPKD steps under accelerate's bf16 autocast
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch
from dpkd.integrations.methods import METHODS
from dpkd.integrations.transformers import checkpoint as ck
from dpkd.integrations.transformers.data import format_prompt, tokenize_records
from dpkd.integrations.transformers.models import build_word_tokenizer, tiny_causal_lm
from dpkd.integrations.transformers.toy_task import make_pretraining_corpus, make_task
from dpkd.integrations.transformers.trainer import DistillConfig, DistillTrainer

torch.set_num_threads(1)
WORLD = int(os.environ.get("WORLD_SIZE", "1"))
RANK = int(os.environ.get("RANK", "0"))
GLOBAL_MICRO = 4  # examples per global micro-batch: per_device_train_batch_size × world size


def toy():
    task = make_task(64, 8, 8, seed=0)
    pt_texts = make_pretraining_corpus(16, seed=0)
    tok = build_word_tokenizer([format_prompt(r) + " " + r.response for s in task.values() for r in s] + pt_texts)
    pt = [[*tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id] for t in pt_texts]
    return tok, tokenize_records(task["train"], tok), pt


def model(tok, seed, dtype=torch.float64):
    return tiny_causal_lm("gpt2", len(tok), d_model=16, n_layers=1, n_heads=2, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id, seed=seed).to(dtype)


def config(out, method, world=WORLD, **kw):
    base = dict(output_dir=str(out), method=method, max_steps=3, per_device_train_batch_size=GLOBAL_MICRO // world,
                gradient_accumulation_steps=2, logging_steps=1, max_new_tokens=8, disable_tqdm=True,
                report_to="none", teacher_outputs="online", objective="released", warmup_steps=1,
                learning_rate=1e-2)
    base.update(kw)
    return DistillConfig(**base)


def trainer(tok, train, pt, cfg, dtype=torch.float64):
    return DistillTrainer(model(tok, 0, dtype), model(tok, 1, dtype), train, cfg, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id, pt_sequences=pt)


def refusals(tok, train, pt, out):
    """What this machine cannot run must be refused with a message, never silently replaced by DDP."""
    msgs = {}
    for name, kw in (("fsdp", {"fsdp": "full_shard"}), ("deepspeed", {"deepspeed": {"zero_optimization":
                                                                                   {"stage": 3}}})):
        try:
            trainer(tok, train, pt, config(out / name, "dpkd", **kw))
            msgs[name] = None
        except ValueError as e:
            msgs[name] = str(e)
    os.environ["ACCELERATE_USE_FSDP"] = "true"  # what `accelerate launch --config_file fsdp.yaml` sets
    try:
        trainer(tok, train, pt, config(out / "env", "dpkd"))
        msgs["env_fsdp"] = None
    except ValueError as e:
        msgs["env_fsdp"] = str(e)
    del os.environ["ACCELERATE_USE_FSDP"]
    return msgs


def main(mode, out):
    out = Path(out)
    tok, train, pt = toy()
    if mode == "methods":
        for method in METHODS:
            trainer(tok, train, pt, config(out / method, method)).train()
        msgs = refusals(tok, train, pt, out / "refused")
        if RANK == 0:
            (out / "refusals.json").write_text(json.dumps(msgs))
    elif mode == "killed":
        original = ck._write_rng

        def write_then_die(folder, rank):
            original(folder, rank)
            if rank == 1 and folder.name == ".checkpoint-4.tmp":
                os.kill(os.getpid(), signal.SIGKILL)

        ck._write_rng = write_then_die
        trainer(tok, train, pt, config(out, "dpkd", max_steps=6, save_steps=2, save_total_limit=None)).train()
    elif mode == "midstep":
        tr = trainer(tok, train, pt, config(out, "dpkd", max_steps=6, save_steps=2, save_total_limit=None))
        backward, calls = tr.engine.backward, []

        def backward_then_die(loss):
            backward(loss)
            calls.append(1)
            if RANK == 1 and len(calls) == 5:  # step 3 (0-based 2), after micro-batch 1 of 2
                os.kill(os.getpid(), signal.SIGKILL)

        tr.engine.backward = backward_then_die
        tr.train()
    elif mode == "resume":
        trainer(tok, train, pt, config(out, "dpkd", max_steps=6, save_steps=2, save_total_limit=None)).train(
            resume_from_checkpoint=True)
    elif mode == "bf16":
        tr = trainer(tok, train, pt, config(out, "dpkd", max_steps=2, bf16=True), dtype=torch.float32)
        seen = []
        # inside the autocast the lm_head matmul runs in bf16 (accelerate hands the logits back as float32)
        tr.student.lm_head.register_forward_hook(lambda m, args, o: seen.append(o.dtype))
        res = tr.train()
        if RANK == 0:
            (out / "bf16.json").write_text(json.dumps({"dtypes": sorted({str(d) for d in seen}),
                                                       "loss": [r["loss"] for r in res.log_history]}))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
